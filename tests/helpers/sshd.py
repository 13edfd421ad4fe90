"""A real OpenSSH ``sshd`` serving SFTP on loopback, for tests.

As root the server chroots a throw-away system user into
``/srv/saasquatch-agent-tests/<run-id>/<user>`` with a writable ``imports``
folder (``remote_dir == "/imports"``).  As any other user it serves that user
without chroot and ``remote_dir`` is an absolute path of a temp folder.

sshd runs under a small reaper process (this file run as a script): PID 1 on
some CI machines does not reap orphans, and sshd's per-connection processes
become orphans whenever a connection dies abruptly.  The reaper adopts and
reaps them, and kills the whole sshd tree when asked to stop.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import posixpath
import pwd
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

__all__ = [
    "SSHD_MISSING_MESSAGE",
    "TESTS_ROOT",
    "KeyKind",
    "Mode",
    "SshdNotFoundError",
    "SshdServer",
    "SshdStartError",
    "cleanup_stale_runs",
    "delete_user",
    "ensure_system_user",
    "find_sshd",
    "free_port",
    "keygen",
    "sshd_version",
]

SSHD_MISSING_MESSAGE = "OpenSSH sshd not found: install it with `apt-get install -y openssh-server`"
KEYGEN_MISSING_MESSAGE = "OpenSSH ssh-keygen not found: install it with `apt-get install -y openssh-client`"
TESTS_ROOT = Path("/srv/saasquatch-agent-tests")
PRIVSEP_DIR = Path("/run/sshd")
_OWNER_FILE = "owner"  # in a run folder: "<user> <1 if this run created it>"

KeyKind = Literal["ed25519", "rsa"]
Mode = Literal["chroot", "home", "user"]

_USERNAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_ALNUM = string.ascii_lowercase + string.digits


class SshdNotFoundError(RuntimeError):
    """OpenSSH (sshd or ssh-keygen) is not installed."""


class SshdStartError(RuntimeError):
    """sshd exited or did not answer with an SSH banner in time."""


def find_sshd() -> str:
    """Return the absolute path of ``sshd`` or raise :class:`SshdNotFoundError`."""
    found = shutil.which("sshd")
    if found:
        return os.path.abspath(found)
    for candidate in ("/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise SshdNotFoundError(SSHD_MISSING_MESSAGE)


def _find_keygen() -> str:
    found = shutil.which("ssh-keygen") or (
        "/usr/bin/ssh-keygen" if os.access("/usr/bin/ssh-keygen", os.X_OK) else None
    )
    if not found:
        raise SshdNotFoundError(KEYGEN_MISSING_MESSAGE)
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


_version_cache: dict[str, tuple[int, int]] = {}


def sshd_version(sshd_path: str) -> tuple[int, int]:
    """Return (major, minor) of the OpenSSH release, (0, 0) if unknown."""
    if sshd_path not in _version_cache:
        proc = subprocess.run([sshd_path, "-V"], capture_output=True, text=True, timeout=10, check=False)
        match = re.search(r"OpenSSH_(\d+)\.(\d+)", proc.stdout + proc.stderr)
        _version_cache[sshd_path] = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    return _version_cache[sshd_path]


def _pub(key: Path) -> Path:
    return key.with_name(key.name + ".pub")


def keygen(path: Path, kind: KeyKind = "ed25519", comment: str = "") -> Path:
    """Generate a passphrase-less key pair at ``path`` (+ ``.pub``); return ``path``."""
    if kind not in ("ed25519", "rsa"):
        raise ValueError(f"unsupported key kind {kind!r}")
    path = Path(path)
    if path.exists() or _pub(path).exists():
        raise FileExistsError(f"key file already exists: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [_find_keygen(), "-q", "-t", kind, "-N", "", "-C", comment or f"{kind}-test"]
    if kind == "rsa":
        cmd += ["-b", "3072"]
    cmd += ["-f", str(path)]
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    return path


# --------------------------------------------------------------------------
# process-tree helpers (Linux /proc)


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # "pid (comm) state ppid ..."; comm may contain spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _descendants(root: int) -> set[int]:
    children = _children_map()
    found: set[int] = set()
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _kill_descendants(root: int) -> set[int]:
    """Freeze then SIGKILL every descendant of ``root``; return their pids."""
    victims: set[int] = set()
    for _ in range(10):  # bounded: freeze until no new process appears
        new = _descendants(root) - victims
        if not new:
            break
        _signal_all(new, signal.SIGSTOP)
        victims |= new
    _signal_all(victims, signal.SIGKILL)
    return victims


def _reaper_main(argv: Sequence[str]) -> int:
    """Run ``argv`` as a child and reap every orphan until none is left.

    Kills the whole tree on SIGTERM or when stdin reaches EOF (the test
    process closed the pipe or died).
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0)
    stopping = threading.Event()

    def stop(*_: object) -> None:
        stopping.set()
        _kill_descendants(os.getpid())

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    main_pid = os.posix_spawn(argv[0], list(argv), dict(os.environ))

    def watch_stdin() -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch_stdin, daemon=True).start()
    code = 0
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid == main_pid:
            code = 0 if stopping.is_set() else os.waitstatus_to_exitcode(status)
            if not stopping.is_set():
                stop()  # sshd died on its own: take its sessions down too
    return code if code >= 0 else 128 - code


# --------------------------------------------------------------------------
# user management (root only)


def _run_retrying(cmd: Sequence[str], ok: Iterable[int], timeout: float) -> int:
    """Run ``cmd`` until its exit code is in ``ok`` or ``timeout`` runs out."""
    ok_codes = set(ok)
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)
        if proc.returncode in ok_codes:
            return proc.returncode
        if time.monotonic() + delay > deadline:
            raise RuntimeError(f"{' '.join(cmd)} failed with code {proc.returncode}: {proc.stderr.strip()}")
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def _shadow_password(username: str) -> str | None:
    try:
        with open("/etc/shadow", encoding="utf-8") as fh:
            for line in fh:
                fields = line.rstrip("\n").split(":")
                if fields[0] == username and len(fields) > 1:
                    return fields[1]
    except OSError:
        return None
    return None


def _user_exists(username: str) -> bool:
    try:
        pwd.getpwnam(username)
    except KeyError:
        return False
    return True


def ensure_system_user(username: str) -> bool:
    """Create a no-login system user with password field ``*``; idempotent.

    Returns True when this call created the user.
    """
    created = False
    if not _user_exists(username):
        # 0 created, 9 name taken (a concurrent creator won the race)
        code = _run_retrying(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                "/",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                "--password",
                "*",
                username,
            ],
            ok=(0, 9),
            timeout=15,
        )
        created = code == 0
    password = _shadow_password(username)
    if password is None or password.startswith("!"):
        # a locked account is refused by sshd with UsePAM no, even for keys
        _run_retrying(["usermod", "--password", "*", username], ok=(0,), timeout=15)
    return created


def delete_user(username: str, timeout: float = 5.0) -> bool:
    """``userdel`` the user (and its private group); return True on success."""
    try:
        _run_retrying(["userdel", username], ok=(0, 6), timeout=timeout)
    except RuntimeError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale_runs(root: Path = TESTS_ROOT) -> list[Path]:
    """Remove run folders (and users they created) left by dead test processes.

    A run folder is named ``<date>-<time>-<pid>-<hex>``; it is stale when that
    pid is gone.  Returns the folders removed.
    """
    removed: list[Path] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for run_dir in entries:
        parts = run_dir.name.split("-")
        if len(parts) != 4 or not parts[2].isdigit() or _pid_alive(int(parts[2])):
            continue
        try:
            username, created = (run_dir / _OWNER_FILE).read_text().split()
        except (OSError, ValueError):
            username, created = "", "0"
        if created == "1" and _USERNAME_RE.match(username):
            delete_user(username, timeout=2.0)
        shutil.rmtree(run_dir, ignore_errors=True)
        removed.append(run_dir)
    return removed


def _random_username() -> str:
    return "test_" + "".join(secrets.choice(_ALNUM) for _ in range(12))


def _mkdir(path: Path, mode: int, uid: int = 0, gid: int = 0) -> None:
    path.mkdir(exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)  # not subject to umask


# --------------------------------------------------------------------------


class SshdServer:
    """A real OpenSSH sshd on 127.0.0.1 that serves SFTP for one user.

    Construction prepares keys, user and folders; :meth:`start` launches sshd.
    Use it as a context manager, or call :meth:`close` to remove everything.
    """

    host = "127.0.0.1"
    #: folder that receives uploads, as the SFTP client sees it ("/imports")
    remote_dir: str
    #: the same folder on the local filesystem
    local_remote_dir: Path
    authorized_keys_path: Path

    def __init__(
        self,
        username: str | None = None,
        *,
        chroot: bool | None = None,
        extra_config: Sequence[str] = (),
        key_kind: KeyKind = "ed25519",
        log_level: str = "VERBOSE",
        startup_timeout: float = 10.0,
    ) -> None:
        """Prepare a server; ``chroot`` defaults to True as root, else False.

        As root, ``chroot=False`` serves a throw-away user without chroot ("home"
        mode: ``remote_dir`` is the full path of its upload folder), for an SFTP
        server program that lives outside the chroot (``ForceCommand PROGRAM``).
        ``extra_config`` lines are written before the defaults, so they win
        (for most sshd keywords the first value is used); no ``Match`` blocks.
        ``key_kind`` is the kind of the client key made at ``user_key_path``.
        """
        self.sshd_path = find_sshd()
        _find_keygen()
        is_root = os.geteuid() == 0
        if chroot is None:
            chroot = is_root
        if chroot and not is_root:
            raise ValueError("chroot mode needs root")
        self.mode: Mode = "chroot" if chroot else "home" if is_root else "user"
        current_user = pwd.getpwuid(os.geteuid()).pw_name
        if self.mode == "user":
            if username not in (None, current_user):
                raise ValueError(f"without chroot sshd can only log in {current_user!r}")
            username = current_user
        elif username is None:
            username = _random_username()
        if not _USERNAME_RE.match(username) or username in ("keys", _OWNER_FILE):
            raise ValueError(f"invalid user name {username!r}")
        self.username: str = username
        self.extra_config = list(extra_config)
        self.key_kind: KeyKind = key_kind
        self.log_level = log_level
        self.startup_timeout = startup_timeout
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(4)}"
        self.port: int = free_port(self.host)
        self.banner: str | None = None

        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self._closed = False
        self._created_user = False
        self._lock = threading.RLock()

        self.temp_dir = Path(tempfile.mkdtemp(prefix="saasquatch-sshd-"))
        self.config_path = self.temp_dir / "sshd_config"
        self.log_path = self.temp_dir / "sshd.log"
        self.pid_path = self.temp_dir / "sshd.pid"
        self.host_key_path = self.temp_dir / "ssh_host_ed25519_key"
        self.user_key_path = self.temp_dir / f"id_{key_kind}"
        self.known_hosts_path = self.temp_dir / "known_hosts"
        self.run_dir: Path | None = None
        self.chroot_dir: Path | None = None
        atexit.register(self.close)
        try:
            self._prepare()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _prepare(self) -> None:
        keygen(self.host_key_path, "ed25519", comment="saasquatch-test-host")
        if self.mode in ("chroot", "home"):
            if not TESTS_ROOT.parent.exists():
                _mkdir(TESTS_ROOT.parent, 0o755)
            _mkdir(TESTS_ROOT, 0o755)
            cleanup_stale_runs()
            self.run_dir = TESTS_ROOT / self.run_id
            _mkdir(self.run_dir, 0o755)
            self._created_user = ensure_system_user(self.username)
            # lets cleanup_stale_runs() undo this run if the process gets SIGKILLed
            (self.run_dir / _OWNER_FILE).write_text(f"{self.username} {int(self._created_user)}\n")
            entry = pwd.getpwnam(self.username)
            user_dir = self.run_dir / self.username
            _mkdir(user_dir, 0o755)
            self.local_remote_dir = user_dir / "imports"
            _mkdir(self.local_remote_dir, 0o755, entry.pw_uid, entry.pw_gid)
            keys_dir = self.run_dir / "keys"
            _mkdir(keys_dir, 0o755)
            self.authorized_keys_path = keys_dir / self.username
            if self.mode == "chroot":
                self.chroot_dir = user_dir
                self.remote_dir = "/imports"
            else:
                self.remote_dir = str(self.local_remote_dir)
                # sshd runs a ForceCommand program through the user's shell (nologin would refuse it)
                _run_retrying(["usermod", "--shell", "/bin/sh", self.username], ok=(0,), timeout=15)
        else:
            self.local_remote_dir = self.temp_dir / "imports"
            self.local_remote_dir.mkdir(mode=0o755)
            self.authorized_keys_path = self.temp_dir / "authorized_keys"
            self.remote_dir = str(self.local_remote_dir)
        self.authorized_keys_path.touch(mode=0o644)
        os.chmod(self.authorized_keys_path, 0o644)
        self.make_user_key(self.user_key_path, self.key_kind)
        self._write_known_hosts()

    def _config_text(self) -> str:
        lines = [f"# saasquatch-agent test sshd, run {self.run_id}", *self.extra_config]
        lines += [
            f"Port {self.port}",
            f"ListenAddress {self.host}:{self.port}",
            "AddressFamily inet",
            f"HostKey {self.host_key_path}",
            f"PidFile {self.pid_path}",
            f"LogLevel {self.log_level}",
            f"AuthorizedKeysFile {self.authorized_keys_path.parent}/%u"
            if self.mode != "user"
            else f"AuthorizedKeysFile {self.authorized_keys_path}",
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "UsePAM no",
            f"AllowUsers {self.username}",
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding no",
            "AllowAgentForwarding no",
            "X11Forwarding no",
            "PermitTunnel no",
            "PrintMotd no",
            "UseDNS no",
            "LoginGraceTime 30",
            "MaxStartups 100",
            "MaxAuthTries 10",
            "Subsystem sftp internal-sftp",
            "ForceCommand internal-sftp",
        ]
        if self.mode == "chroot":
            assert self.chroot_dir is not None
            lines.append(f"ChrootDirectory {self.chroot_dir}")
        if sshd_version(self.sshd_path) >= (9, 8):
            # 9.8+ would penalise the many failed / aborted test logins
            lines.append("PerSourcePenalties no")
        return "\n".join(lines) + "\n"

    def _write_known_hosts(self) -> None:
        self.known_hosts_path.write_text(self.known_hosts_line() + "\n")

    # ----------------------------------------------------------------- keys

    def make_user_key(self, path: Path | str, kind: KeyKind = "ed25519", *, authorize: bool = True) -> Path:
        """Generate a user key pair (no passphrase) at ``path``; return ``path``.

        The key is added to the authorized keys unless ``authorize`` is False.
        """
        key = keygen(Path(path), kind, comment=f"{self.username}-{kind}")
        if authorize:
            self.authorize_key(_pub(key))
        return key

    def authorize_key(self, pub_path: Path | str) -> None:
        """Append a public key (``.pub`` file, or the private key next to it)."""
        pub = Path(pub_path)
        if pub.suffix != ".pub" and _pub(pub).exists():
            pub = _pub(pub)
        line = pub.read_text().strip()
        if not line.startswith(("ssh-", "ecdsa-", "sk-")):
            raise ValueError(f"{pub} does not look like an OpenSSH public key")
        with open(self.authorized_keys_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def known_hosts_line(self, port: int | None = None, host: str | None = None) -> str:
        """Return the known_hosts line for this server's host key."""
        key_type, key_b64 = _pub(self.host_key_path).read_text().split()[:2]
        return f"[{host or self.host}]:{port or self.port} {key_type} {key_b64}"

    def write_known_hosts(
        self, path: Path | str, *, port: int | None = None, host: str | None = None
    ) -> Path:
        """Write a known_hosts file for this host key at another port (e.g. a proxy)."""
        out = Path(path)
        out.write_text(self.known_hosts_line(port=port, host=host) + "\n")
        return out

    def wrong_known_hosts(self, path: Path | str, *, port: int | None = None) -> Path:
        """Write a known_hosts with a different, fresh host key for our host:port."""
        out = Path(path)
        fake = self.temp_dir / f"wrong_host_key_{secrets.token_hex(4)}"
        keygen(fake, "ed25519", comment="wrong-host-key")
        key_type, key_b64 = _pub(fake).read_text().split()[:2]
        out.write_text(f"[{self.host}]:{port or self.port} {key_type} {key_b64}\n")
        return out

    # ------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        """True while the sshd process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def is_chroot(self) -> bool:
        """True when the user is chrooted (running as root)."""
        return self.mode == "chroot"

    def start(self) -> SshdServer:
        """Start sshd (again, on the same port after :meth:`stop`) and wait for it."""
        with self._lock:
            if self._closed:
                raise RuntimeError("SshdServer is closed")
            if self.running:
                return self
            if os.geteuid() == 0 and not PRIVSEP_DIR.exists():
                PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
            attempts = 1 if self._started_once else 3
            for attempt in range(attempts):
                self.config_path.write_text(self._config_text())
                self._launch()
                try:
                    self._wait_ready()
                    break
                except SshdStartError:
                    self._terminate()
                    bind_failed = "Address already in use" in self.read_log()
                    if not bind_failed or attempt == attempts - 1:
                        raise
                    # lost the free-port race before the first start: pick again
                    self.port = free_port(self.host)
                    self._write_known_hosts()
            self._started_once = True
            return self

    def _launch(self) -> None:
        self.pid_path.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-I",
            "-S",
            os.path.abspath(__file__),
            "--reap",
            "--",
            self.sshd_path,
            "-D",
            "-e",
            "-f",
            str(self.config_path),
            "-E",
            str(self.log_path),
        ]
        with open(self.log_path, "ab") as log:  # early errors land in the log too
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=log, stderr=log, start_new_session=True
            )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise SshdStartError(
                    f"sshd exited with code {code}; log {self.log_path}:\n{self.read_log()[-4000:]}"
                )
            banner = self._read_banner(timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            if banner is not None:
                self.banner = banner
                return
            if time.monotonic() >= deadline:
                raise SshdStartError(
                    f"sshd did not answer on {self.host}:{self.port} within "
                    f"{self.startup_timeout}s; log {self.log_path}:\n"
                    f"{self.read_log()[-4000:]}"
                )
            time.sleep(0.01)

    def _read_banner(self, timeout: float) -> str | None:
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as s:
                data = b""
                end = time.monotonic() + timeout
                while b"\n" not in data and len(data) < 512 and time.monotonic() < end:
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return None
        if data.startswith(b"SSH-"):
            return data.split(b"\r\n")[0].split(b"\n")[0].decode("ascii", "replace")
        return None

    @property
    def sshd_pid(self) -> int | None:
        """PID of the listening sshd process, if running."""
        if not self.running:
            return None
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            assert self._proc is not None
            kids = _children_map().get(self._proc.pid, [])
            return kids[0] if kids else None

    def kill_sessions(self) -> int:
        """Abruptly kill every live SSH connection but keep listening.

        Returns the number of processes killed.
        """
        with self._lock:
            listener = self.sshd_pid
            if listener is None:
                return 0
            _signal_all([listener], signal.SIGSTOP)  # no new sessions meanwhile
            try:
                victims = _kill_descendants(listener)
            finally:
                _signal_all([listener], signal.SIGCONT)
            return len(victims)

    def stop(self, timeout: float = 5.0) -> None:
        """Kill sshd and all its sessions (abruptly); files are kept."""
        with self._lock:
            self._terminate(timeout)

    def _terminate(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()  # the reaper kills the sshd tree on EOF
                proc.wait(timeout=timeout)
            except (subprocess.TimeoutExpired, OSError):
                _kill_descendants(proc.pid)
                proc.kill()
                proc.wait(timeout=timeout)

    def close(self) -> None:
        """Stop sshd, remove its folders and keys, and delete the user we created."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self.close)
            try:
                self._terminate()
            finally:
                if self.run_dir is not None:
                    shutil.rmtree(self.run_dir, ignore_errors=True)
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                if self._created_user and not delete_user(self.username):
                    warnings.warn(
                        f"could not userdel test user {self.username!r}",
                        RuntimeWarning,
                        stacklevel=2,
                    )

    def __enter__(self) -> SshdServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -------------------------------------------------------------- helpers

    def read_log(self) -> str:
        """Return the sshd log so far ('' if none)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def local_path(self, remote_path: str) -> Path:
        """Map an absolute path as the SFTP client sees it to the local file."""
        if not remote_path.startswith("/"):
            remote_path = posixpath.join(self.remote_dir, remote_path)
        if self.chroot_dir is None:
            return Path(remote_path)
        return self.chroot_dir / posixpath.normpath(remote_path).lstrip("/")

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<SshdServer {self.username}@{self.host}:{self.port} mode={self.mode} {state}>"


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--reap" and sys.argv[2] == "--":
        sys.exit(_reaper_main(sys.argv[3:]))
    sys.exit("usage: sshd.py --reap -- COMMAND [ARGS...]")
