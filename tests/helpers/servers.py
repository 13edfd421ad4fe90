"""Real SFTP servers on 127.0.0.1 for the conformance suite (tests/test_conformance.py).

Every server here offers what the tests use of :class:`tests.helpers.sshd.SshdServer`: ``host``,
``port``, ``username``, ``user_key_path`` (a client key made at run time, authorised on the
server), ``known_hosts_path`` (the server's host key, written at run time), ``remote_dir`` (the
upload folder as the agent sees it), ``local_remote_dir`` (the same folder on this machine),
``read_log()``, ``start()``/``close()`` and the context manager. The OpenSSH variants are
``SshdServer`` itself with extra configuration; ProFTPD (mod_sftp) and Dropbear get a small class
of their own on the same plumbing (throw-away system user under TESTS_ROOT, the reaper process of
sshd.py, a bounded wait for the SSH banner).

A server whose program is not installed FAILS with the apt-get line that installs it (never skips).
Needs root (CI runs as root), as the chrooted OpenSSH fixture does.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

from tests.helpers import sshd as sshd_module
from tests.helpers.sshd import (
    _OWNER_FILE,
    TESTS_ROOT,
    KeyKind,
    SshdServer,
    _mkdir,
    _random_username,
    cleanup_stale_runs,
    delete_user,
    ensure_system_user,
    free_port,
    keygen,
)

PROFTPD = "/usr/sbin/proftpd"
PROFTPD_MODULES = Path("/usr/lib/proftpd")
DROPBEAR = "/usr/sbin/dropbear"
DROPBEARKEY = "/usr/bin/dropbearkey"
GESFTPSERVER = "/usr/libexec/gesftpserver"
OPENSSH_SFTP_SERVER = "/usr/lib/openssh/sftp-server"


class ProgramMissingError(RuntimeError):
    """A server program is not installed; the message has the line that installs it."""


def require_program(path: str | Path, package: str) -> str:
    if not os.access(path, os.X_OK):
        raise ProgramMissingError(f"{path} not found: install it with `apt-get install -y {package}`")
    return str(path)


class SftpTestServer(Protocol):
    """What the conformance tests use of a server fixture."""

    host: str
    port: int
    username: str
    user_key_path: Path
    known_hosts_path: Path
    remote_dir: str
    local_remote_dir: Path

    def read_log(self) -> str: ...
    def close(self) -> None: ...


def _read_banner(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            data = b""
            end = time.monotonic() + timeout
            while b"\n" not in data and len(data) < 512 and time.monotonic() < end:
                chunk = conn.recv(512)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    return data.split(b"\n")[0].strip().decode("ascii", "replace") if data.startswith(b"SSH-") else None


class _DaemonServer:
    """A server program run as root for one throw-away system user whose home is
    ``TESTS_ROOT/<run-id>/<user>`` (root-owned 0755) with a writable ``imports`` folder."""

    host = "127.0.0.1"
    program_name = "server"
    remote_dir: str
    local_remote_dir: Path

    def __init__(self, *, key_kind: KeyKind = "ed25519", startup_timeout: float = 10.0) -> None:
        if os.geteuid() != 0:
            raise RuntimeError(f"the {self.program_name} fixture needs root (CI runs as root)")
        self.startup_timeout = startup_timeout
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{os.urandom(4).hex()}"
        self.port = free_port(self.host)
        self.username = _random_username()
        self.banner: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._created_user = False
        self._lock = threading.RLock()
        self.temp_dir = Path(tempfile.mkdtemp(prefix=f"saasquatch-{self.program_name}-"))
        self.log_path = self.temp_dir / "server.log"
        self.user_key_path = self.temp_dir / f"id_{key_kind}"
        self.known_hosts_path = self.temp_dir / "known_hosts"
        self.key_kind: KeyKind = key_kind
        if not TESTS_ROOT.parent.exists():
            _mkdir(TESTS_ROOT.parent, 0o755)
        _mkdir(TESTS_ROOT, 0o755)
        cleanup_stale_runs()
        self.run_dir = TESTS_ROOT / self.run_id
        self.home = self.run_dir / self.username
        atexit.register(self.close)
        try:
            _mkdir(self.run_dir, 0o755)
            self._created_user = ensure_system_user(self.username)
            (self.run_dir / _OWNER_FILE).write_text(f"{self.username} {int(self._created_user)}\n")
            subprocess.run(["usermod", "--home", str(self.home), "--shell", "/bin/sh", self.username],
                           check=True, capture_output=True, timeout=30)
            entry = pwd.getpwnam(self.username)
            self.uid, self.gid = entry.pw_uid, entry.pw_gid
            _mkdir(self.home, 0o755)
            self.local_remote_dir = self.home / "imports"
            _mkdir(self.local_remote_dir, 0o755, self.uid, self.gid)
            keygen(self.user_key_path, key_kind, comment=f"{self.username}-{key_kind}")
            self._prepare()
        except BaseException:
            self.close()
            raise

    # subclasses: host key, authorised key, config; the command line
    def _prepare(self) -> None:
        raise NotImplementedError

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _write_known_hosts(self, host_key_line: str) -> None:
        key_type, key_b64 = host_key_line.split()[:2]
        self.known_hosts_path.write_text(f"[{self.host}]:{self.port} {key_type} {key_b64}\n")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> _DaemonServer:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.program_name} fixture is closed")
            if self.running:
                return self
            cmd = [sys.executable, "-I", "-S", os.path.abspath(sshd_module.__file__), "--reap", "--",
                   *self._command()]
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=log,
                                              start_new_session=True)
            deadline = time.monotonic() + self.startup_timeout
            while True:  # bounded by startup_timeout
                code = self._proc.poll()
                if code is not None:
                    raise RuntimeError(f"{self.program_name} exited with code {code}:\n"
                                       f"{self.read_log()[-3000:]}")
                wait = max(0.1, min(1.0, deadline - time.monotonic()))
                self.banner = _read_banner(self.host, self.port, wait)
                if self.banner is not None:
                    return self
                if time.monotonic() >= deadline:
                    self._terminate()
                    raise RuntimeError(f"{self.program_name} did not answer on {self.host}:{self.port} within"
                                       f" {self.startup_timeout} s:\n{self.read_log()[-3000:]}")
                time.sleep(0.05)

    def _terminate(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # the reaper kills the server's whole tree on EOF
            proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, OSError):
            sshd_module._kill_descendants(proc.pid)
            proc.kill()
            proc.wait(timeout=timeout)

    def stop(self) -> None:
        with self._lock:
            self._terminate()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self.close)
            try:
                self._terminate()
            finally:
                shutil.rmtree(self.run_dir, ignore_errors=True)
                shutil.rmtree(self.temp_dir, ignore_errors=True)
                if self._created_user:
                    delete_user(self.username)

    def read_log(self) -> str:
        parts = []
        for path in sorted(self.temp_dir.glob("*.log")):
            try:
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')}")
            except OSError:
                continue
        return "\n".join(parts)

    def local_path(self, remote_path: str) -> Path:
        return self.local_remote_dir / Path(remote_path).name

    def __enter__(self) -> _DaemonServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.username}@{self.host}:{self.port}>"


class ProftpdServer(_DaemonServer):
    """ProFTPD 1.3.8 with mod_sftp, standalone; the user is jailed in its home (DefaultRoot ~), so
    ``remote_dir`` is ``/imports``. ``extra_config`` lines go into the server's configuration."""

    program_name = "proftpd"

    def __init__(self, extra_config: Sequence[str] = (), **kwargs: object) -> None:
        self.proftpd = require_program(PROFTPD, "proftpd-core")
        if not (PROFTPD_MODULES / "mod_sftp.so").exists():
            raise ProgramMissingError(f"{PROFTPD_MODULES}/mod_sftp.so not found: install it with"
                                      " `apt-get install -y proftpd-core proftpd-mod-crypto`")
        self.extra_config = list(extra_config)
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def _prepare(self) -> None:
        self.remote_dir = "/imports"
        host_key = self.temp_dir / "ssh_host_rsa_key"  # PEM RSA: what every mod_sftp release reads
        subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "", "-f",
                        str(host_key)], check=True, capture_output=True, timeout=60)
        os.chmod(host_key, 0o600)
        self._write_known_hosts(host_key.with_name(host_key.name + ".pub").read_text())
        keys_dir = self.run_dir / "keys"
        _mkdir(keys_dir, 0o755)
        rfc4716 = subprocess.run(["ssh-keygen", "-e", "-f", f"{self.user_key_path}.pub"], check=True,
                                 capture_output=True, text=True, timeout=30).stdout
        (keys_dir / self.username).write_text(rfc4716)
        self.config_path = self.temp_dir / "proftpd.conf"
        lines = [
            f"# saasquatch-agent test ProFTPD, run {self.run_id}",
            f"ModulePath {PROFTPD_MODULES}",
            "<IfModule mod_dso.c>",
            "  LoadModule mod_sftp.c",
            "</IfModule>",
            "ServerType standalone",
            'ServerName "saasquatch-agent test"',
            "DefaultServer on",
            "UseIPv6 off",
            f"DefaultAddress {self.host}",
            "SocketBindTight on",
            f"Port {self.port}",
            "User nobody",
            "Group nogroup",
            "Umask 022",
            f"PidFile {self.temp_dir}/proftpd.pid",
            f"ScoreboardFile {self.temp_dir}/proftpd.scoreboard",
            "DelayTable none",
            "WtmpLog off",
            "UseReverseDNS off",
            "RequireValidShell off",
            "AuthOrder mod_auth_unix.c",
            "MaxInstances 60",
            f"SystemLog {self.temp_dir}/proftpd.log",
            "TransferLog none",
            "DefaultRoot ~",
            "AllowOverwrite on",
            "SFTPEngine on",
            f"SFTPLog {self.temp_dir}/sftp.log",
            f"SFTPHostKey {host_key}",
            "SFTPAuthMethods publickey",
            f"SFTPAuthorizedUserKeys file:{keys_dir}/%u",
            "SFTPCompression off",
            *self.extra_config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")
        check = subprocess.run([self.proftpd, "-t", "-c", str(self.config_path)], capture_output=True,
                               text=True, timeout=30, check=False)
        if check.returncode != 0:
            raise RuntimeError(f"proftpd refused its test configuration:\n{check.stdout}{check.stderr}")

    def _command(self) -> list[str]:
        return [self.proftpd, "--nodaemon", "-c", str(self.config_path)]


class DropbearServer(_DaemonServer):
    """Dropbear with OpenSSH's sftp-server as the forced command of the user's key (Debian's dropbear
    looks for /usr/lib/sftp-server, which no package installs). No chroot: ``remote_dir`` is the
    full path of the upload folder."""

    program_name = "dropbear"

    def __init__(self, **kwargs: object) -> None:
        self.dropbear = require_program(DROPBEAR, "dropbear-bin")
        self.dropbearkey = require_program(DROPBEARKEY, "dropbear-bin")
        self.sftp_server = require_program(OPENSSH_SFTP_SERVER, "openssh-sftp-server")
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def _prepare(self) -> None:
        self.remote_dir = str(self.local_remote_dir)
        self.host_key = self.temp_dir / "dropbear_ed25519_host_key"
        subprocess.run([self.dropbearkey, "-t", "ed25519", "-f", str(self.host_key)], check=True,
                       capture_output=True, timeout=60)
        shown = subprocess.run([self.dropbearkey, "-y", "-f", str(self.host_key)], check=True,
                               capture_output=True, text=True, timeout=30).stdout
        self._write_known_hosts(next(line for line in shown.splitlines() if line.startswith("ssh-")))
        ssh_dir = self.home / ".ssh"
        _mkdir(ssh_dir, 0o700, self.uid, self.gid)
        authorized = ssh_dir / "authorized_keys"
        public = Path(f"{self.user_key_path}.pub").read_text().strip()
        authorized.write_text(f'command="{self.sftp_server}",no-port-forwarding,no-agent-forwarding,'
                              f"no-X11-forwarding,no-pty {public}\n")
        os.chown(authorized, self.uid, self.gid)
        os.chmod(authorized, 0o600)

    def _command(self) -> list[str]:
        return [self.dropbear, "-F", "-E", "-s", "-w", "-j", "-k", "-p", f"{self.host}:{self.port}",
                "-r", str(self.host_key), "-P", str(self.temp_dir / "dropbear.pid")]


def _gesftpserver_sshd() -> SshdServer:
    program = require_program(GESFTPSERVER, "gesftpserver")
    return SshdServer(chroot=False, extra_config=[f"ForceCommand {program}"])


@dataclass(frozen=True)
class ServerSpec:
    """One server fixture: how to make it, what the agent needs for it, and what it stands for."""

    id: str
    make: Callable[[], SftpTestServer]
    software: str
    settings: str = "none"  # the agent settings this server needs (README's compatibility table)
    sftp_config: str = ""  # extra lines for the agent's [sftp] table
    upload_config: str = ""  # extra lines for the agent's [upload] table
    notes: str = ""
    tags: frozenset[str] = field(default_factory=frozenset)


SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("openssh-chroot", lambda: SshdServer(), "OpenSSH internal-sftp, ChrootDirectory"),
    ServerSpec("proftpd", lambda: ProftpdServer(), "ProFTPD mod_sftp, DefaultRoot ~"),
    ServerSpec("proftpd-maxclients", lambda: ProftpdServer(["MaxClientsPerUser 1"]),
               "ProFTPD mod_sftp, MaxClientsPerUser 1", notes="one connection per user"),
    ServerSpec("proftpd-nohidden", lambda: ProftpdServer(['PathDenyFilter "(^|/)[.][^/]*$"']),
               'ProFTPD mod_sftp, PathDenyFilter "(^|/)[.][^/]*$"',
               settings='upload.temp_name = "agent-{id}.part"',
               upload_config='temp_name = "agent-{id}.part"', notes="refuses hidden names"),
    ServerSpec("dropbear", lambda: DropbearServer(), "Dropbear + OpenSSH sftp-server (no chroot)"),
    ServerSpec("gesftpserver", _gesftpserver_sshd, "OpenSSH + Green End SFTP server (gesftpserver)",
               notes="answers pipelined requests out of order"),
    ServerSpec("openssh-no-posix-rename",
               lambda: SshdServer(extra_config=["ForceCommand internal-sftp -P posix-rename"]),
               "OpenSSH internal-sftp -P posix-rename", notes="posix-rename denied"),
    ServerSpec("openssh-maxstartups",
               lambda: SshdServer(extra_config=["MaxStartups 1:100:1", "MaxSessions 1"]),
               "OpenSSH MaxStartups 1:100:1, MaxSessions 1"),
    ServerSpec("openssh-rsa-sha1",
               lambda: SshdServer(key_kind="rsa", extra_config=["PubkeyAcceptedAlgorithms ssh-rsa"]),
               "OpenSSH PubkeyAcceptedAlgorithms ssh-rsa (SHA-1 only), RSA key",
               settings="sftp.rsa_sha1 = true", sftp_config="rsa_sha1 = true"),
)
SERVER_IDS = tuple(spec.id for spec in SERVERS)
