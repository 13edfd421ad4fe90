"""`saasquatch-agent doctor`: every check an operator would otherwise do by hand, each with its fix.

The checks run in order; a check that needs an earlier one (SSH login needs the key and the host key)
is skipped, not failed twice, when that one failed. Nothing here needs the service to run, and
nothing is left behind: the remote write probe is removed again.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import secrets
import socket
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import paramiko

from agent.config import Config, SftpConfig, Transport
from agent.errors import AgentError
from agent.ops.trust import TrustError, fetch_host_key, known_keys
from agent.transport.sftp import (
    LIMITS_EXTENSION,
    POSIX_RENAME_EXTENSION,
    USED_EXTENSIONS,
    ConnectError,
    PrivateKeyError,
    SftpSession,
    known_hosts_name,
    load_private_key,
    plain_rename,
    posix_rename_refused,
    private_key_path,
    proxy_sock,
    server_extensions,
    server_write_limit,
)

PROBE_PREFIX = ".saasquatch-agent-doctor-"  # hidden and without an import prefix: never imported
VISIBLE_PROBE_PREFIX = "saasquatch-agent-doctor-"  # for a server that refuses hidden names
PROBE_BYTES = b"saasquatch-agent doctor probe; safe to delete\n"
# offered by some servers, not used: the agent hashes what it sends and checks the remote size
NOT_USED_EXTENSIONS = ("check-file", "check-file-name", "check-file-handle", "md5-hash", "md5-hash-handle",
                       "copy-data", "hardlink@openssh.com", "fsync@openssh.com", "statvfs@openssh.com")
MAX_CLOCK_SKEW_SECONDS = 300.0
EARLIEST_SANE_YEAR = 2025


class Outcome(StrEnum):
    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class Result:
    name: str
    outcome: Outcome
    detail: str
    fix: str = ""


class _Failed(AgentError):
    """A check failed: what was found and how to fix it."""

    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


class Doctor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.failed: set[str] = set()
        self._session: SftpSession | None = None
        self._server_time: float | None = None
        self._posix_rename: bool | None = None  # None: not tried; False: refused (plain rename used)

    @property
    def cfg(self) -> SftpConfig:
        return self.config.sftp

    # ------------------------------------------------------------------ checks

    def check_paths(self) -> str:
        paths = self.config.paths
        problems: list[str] = []
        for label, folder in (("drop", paths.drop), ("state_dir", paths.state_dir),
                              ("archive", paths.archive), ("failed", paths.failed)):
            base = _nearest_existing(folder)
            if not base.is_dir():
                problems.append(f"paths.{label} {folder}: {base} is not a folder")
            elif not os.access(base, os.W_OK | os.X_OK):
                problems.append(f"paths.{label} {folder}: {base} is not writable by this user")
        if paths.state_dir.is_dir():
            mode = stat.S_IMODE(paths.state_dir.stat().st_mode)
            if mode & 0o022:
                problems.append(f"paths.state_dir {paths.state_dir} is writable by group or others"
                                f" (mode {mode:04o})")
        if problems:
            raise _Failed("; ".join(problems), "create the folders with scripts/install.sh, or fix the"
                          " [paths] keys; state_dir must be private to the service (chmod 0711 or 0700)")
        return "drop, state_dir, archive and failed exist or can be created"

    def check_same_filesystem(self) -> str:
        drop = _nearest_existing(self.config.paths.drop).stat().st_dev
        spool = _nearest_existing(self.config.spool_dir).stat().st_dev
        if drop != spool:
            raise _Failed(f"drop {self.config.paths.drop} and state_dir {self.config.paths.state_dir} are"
                          " on different filesystems, so claiming a file is a copy instead of a rename",
                          "put drop/ and state_dir on the same filesystem (e.g. drop inside state_dir)")
        return "drop/ and the spool are on one filesystem (claiming is an atomic rename)"

    def check_key(self) -> str:
        path = private_key_path(self.cfg)
        try:
            key = load_private_key(path)
        except PrivateKeyError as exc:
            raise _Failed(str(exc), "see above; `saasquatch-agent keygen PATH` makes a good key") from None
        source = " (systemd credential)" if path != self.cfg.private_key else ""
        return f"{path}{source}: {key.get_name()} {key.fingerprint}, mode 0600, no passphrase"

    def check_known_hosts(self) -> str:
        name = known_hosts_name(self.cfg.host, self.cfg.port)
        try:
            keys = known_keys(self.cfg.known_hosts, name)
        except OSError as exc:
            raise _Failed(f"cannot read {self.cfg.known_hosts}: {exc.strerror}",
                          "make it readable by the service user") from None
        if not keys:
            raise _Failed(f"{self.cfg.known_hosts} has no entry for {name}",
                          f"run `saasquatch-agent trust-host --config {self.config.source}` and check the"
                          " fingerprint with SaaSquatch")
        return f"{self.cfg.known_hosts} trusts " + ", ".join(f"{k.get_name()} {k.fingerprint}" for k in keys)

    def check_dns(self) -> str:
        if self.cfg.proxy_command:
            return f"{self.cfg.host} is resolved by sftp.proxy_command"
        try:
            infos = socket.getaddrinfo(self.cfg.host, self.cfg.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise _Failed(f"cannot resolve {self.cfg.host}: {exc.strerror}",
                          "check sftp.host against SaaSquatch's integration page and this machine's DNS"
                          ) from None
        addresses = sorted({str(info[4][0]) for info in infos})
        return f"{self.cfg.host} -> {', '.join(addresses)}"

    def check_tcp(self) -> str:
        target = f"{self.cfg.host}:{self.cfg.port}"
        try:
            if self.cfg.proxy_command:
                sock = proxy_sock(self.cfg)
                assert sock is not None
                sock.settimeout(self.cfg.connect_timeout)
                try:
                    banner = sock.recv(64)
                finally:
                    sock.close()
            else:
                with socket.create_connection((self.cfg.host, self.cfg.port),
                                              timeout=self.cfg.connect_timeout) as conn:
                    banner = conn.recv(64)
        except (OSError, paramiko.SSHException) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise _Failed(f"cannot connect to {target}: {reason or type(exc).__name__}",
                          "check sftp.host and sftp.port, and that a firewall lets this machine out to"
                          " that port (or set sftp.proxy_command)") from None
        if not banner.startswith(b"SSH-"):
            raise _Failed(f"{target} answered, but not with an SSH banner ({banner[:20]!r})",
                          "check sftp.port: it must be the SFTP server's SSH port")
        return f"{target} accepts connections ({banner.decode(errors='replace').strip()})"

    def check_host_key(self) -> str:
        try:
            info = fetch_host_key(self.cfg)
        except TrustError as exc:
            raise _Failed(str(exc), "check the network checks above") from None
        known = known_keys(self.cfg.known_hosts, info.name)
        if not any(k.get_name() == info.key_type and k.get_base64() == info.key.get_base64() for k in known):
            had = ", ".join(f"{k.get_name()} {k.fingerprint}" for k in known) or "nothing"
            raise _Failed(f"HOST KEY MISMATCH: the server offers {info.key_type} {info.fingerprint};"
                          f" {self.cfg.known_hosts} has {had}",
                          "verify the new fingerprint with SaaSquatch, then run `saasquatch-agent"
                          f" trust-host --config {self.config.source} --fingerprint {info.fingerprint}`")
        return f"the server's {info.key_type} {info.fingerprint} matches known_hosts"

    def check_login(self) -> str:
        self._session = SftpSession(self.cfg)
        try:
            self._session.client()
        except (ConnectError, PrivateKeyError) as exc:
            if isinstance(exc, ConnectError) and exc.key_refused and self._rsa_sha1_helps():
                raise _Failed(f"{exc}; the server does accept this RSA key with ssh-rsa (SHA-1) signatures",
                              "set sftp.rsa_sha1 = true (the server accepts no SHA-2 RSA signature), or"
                              " make an ED25519 key with keygen and paste it into SaaSquatch") from None
            if isinstance(exc, ConnectError) and exc.dropped:
                raise _Failed(str(exc), "the server closed the connection before or during login: check"
                              " that no other client holds its connections for this user, then try"
                              " again") from None
            raise _Failed(str(exc), "paste the .pub line of the key into SaaSquatch's SFTP integration page"
                          " and use the tenant alias as sftp.username") from None
        return f"logged in as {self.cfg.username} with the key"

    def _rsa_sha1_helps(self) -> bool:
        """An RSA key refused without sftp.rsa_sha1: would ssh-rsa (SHA-1) signatures be accepted?"""
        if self.cfg.rsa_sha1:
            return False
        try:
            if load_private_key(private_key_path(self.cfg)).get_name() != "ssh-rsa":
                return False
        except PrivateKeyError:
            return False
        trial = SftpSession(self.cfg.model_copy(update={"rsa_sha1": True}))
        try:
            trial.client()
        except (ConnectError, PrivateKeyError):
            return False
        finally:
            trial.close()
        return True

    def check_remote_list(self) -> str:
        assert self._session is not None
        try:
            names = self._session.client().listdir(self.cfg.remote_dir)
        except OSError as exc:
            raise _Failed(f"cannot list {self.cfg.remote_dir}: {exc.strerror or exc}",
                          "set sftp.remote_dir to the upload folder SaaSquatch gives you") from None
        return f"{self.cfg.remote_dir} is listable ({len(names)} entries)"

    def _probe_names(self, token: str) -> tuple[str, str]:
        """The temporary name (upload.temp_name and temp_dir, a doctor id) and a unique final name no
        import prefix matches: hidden like the temporary name, or visible when that one is."""
        upload = self.config.upload
        temp_name = upload.temp_name.format(id=f"doctor-{token}", stem="saasquatch-agent-doctor")
        temp = posixpath.join(upload.temp_dir or self.cfg.remote_dir, temp_name)
        prefix = PROBE_PREFIX
        if not temp_name.startswith(".") and not any(
                VISIBLE_PROBE_PREFIX.startswith(p) for p in self._import_prefixes()):
            prefix = VISIBLE_PROBE_PREFIX  # the server may refuse hidden names
        return temp, posixpath.join(self.cfg.remote_dir, f"{prefix}{token}.probe")

    def _import_prefixes(self) -> list[str]:
        prefixes = self.config.imports.prefixes
        return [str(value) for value in prefixes.model_dump().values()]

    def check_remote_write(self) -> str:
        """The publish protocol once, with the configured names: write the temporary file, check its
        size, rename it to a final name, delete that; says which step and name the server refused."""
        assert self._session is not None
        sftp = self._session.client()
        temp, final = self._probe_names(secrets.token_hex(6))
        step = "create the temporary file"
        try:
            with sftp.open(temp, "wb") as handle:
                step = "write the temporary file"
                handle.write(PROBE_BYTES)
            step = "check the temporary file's size"
            attributes = sftp.stat(temp)
            if attributes.st_size != len(PROBE_BYTES):
                raise OSError(None, f"the server kept {attributes.st_size} of {len(PROBE_BYTES)} bytes")
            mtime = attributes.st_mtime
            self._server_time = float(mtime) if mtime is not None else None
            step = "rename the temporary file to a final name"
            how = self._rename(sftp, temp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                sftp.remove(temp)
            name = final if step.startswith("rename") else temp
            raise _Failed(f"could not {step}: the server refused {name} ({exc.strerror or exc})",
                          self._write_fix(step, temp)) from None
        try:
            sftp.remove(final)
        except OSError as exc:
            raise _Failed(f"published {final} but cannot remove it: {exc.strerror or exc}",
                          f"remove {final} by hand; the agent needs rename rights in remote_dir") from None
        return (f"publish protocol works: wrote {temp}, size checked, {how} to {final}, removed it"
                " (probe file written and removed)")

    def _rename(self, sftp: paramiko.SFTPClient, temp: str, final: str) -> str:
        extensions = server_extensions(sftp)
        if extensions is None or POSIX_RENAME_EXTENSION in extensions:
            try:
                sftp.posix_rename(temp, final)
                self._posix_rename = True
                return "posix-renamed"
            except OSError as exc:
                if not posix_rename_refused(exc):
                    raise
        plain_rename(sftp, temp, final)
        self._posix_rename = False
        return "renamed (plain rename: the server refuses or lacks posix-rename)"

    def _write_fix(self, step: str, temp: str) -> str:
        temp_name = posixpath.basename(temp)
        if step.startswith(("create", "write")) and temp_name.startswith("."):
            return ("the server may refuse hidden names: set upload.temp_name to a visible pattern such as"
                    ' "agent-{id}.part" (or upload.temp_dir to a folder it allows); else the SFTP user needs'
                    " write access to sftp.remote_dir: ask SaaSquatch")
        if step.startswith("rename"):
            return "the SFTP user needs rename rights in sftp.remote_dir; ask SaaSquatch"
        return "the SFTP user needs write access to sftp.remote_dir (and upload.temp_dir); ask SaaSquatch"

    def check_extensions(self) -> str:
        """The SFTP extensions the server announced, and which of them the agent uses."""
        assert self._session is not None
        sftp = self._session.client()
        extensions = server_extensions(sftp)
        if extensions is None:
            return "the server's extensions are not known"
        used = []
        if POSIX_RENAME_EXTENSION in extensions:
            used.append("posix-rename" if self._posix_rename is not False
                        else "not posix-rename (offered, but refused: plain rename is used)")
        else:
            used.append("plain rename (no posix-rename offered; it never replaces a name)")
        if LIMITS_EXTENSION in extensions:
            limit = server_write_limit(sftp)
            used.append(f"limits (writes of {min(limit, 128 * 1024) if limit else 32768} bytes)")
        unused = [name for name in extensions if name not in USED_EXTENSIONS]
        offered = ", ".join(sorted(extensions)) or "none"
        detail = f"offered: {offered}; the agent uses: {'; '.join(used)}"
        known_unused = [name for name in unused if name in NOT_USED_EXTENSIONS]
        if known_unused:
            detail += f"; not used: {', '.join(sorted(known_unused))} (the agent hashes what it sends)"
        return detail

    def check_clock(self) -> str:
        now = time.time()
        year = datetime.fromtimestamp(now, UTC).year
        if year < EARLIEST_SANE_YEAR:
            raise _Failed(f"the clock says {year}", "set the time (timedatectl set-ntp true)")
        if self._server_time is None:
            return f"local clock {datetime.fromtimestamp(now, UTC):%Y-%m-%d %H:%M:%S} UTC (server's unknown)"
        skew = now - self._server_time
        if abs(skew) > MAX_CLOCK_SKEW_SECONDS:
            raise _Failed(f"this machine's clock is {skew:+.0f} s off the SFTP server's",
                          "enable time sync (timedatectl set-ntp true, or chrony)")
        return f"within {abs(skew):.0f} s of the SFTP server's clock"

    # ------------------------------------------------------------------- runner

    def plan(self) -> list[tuple[str, Callable[[], str], tuple[str, ...]]]:
        if self.config.upload.transport == Transport.API:  # agent/ops/doctor_api.py
            from agent.ops.doctor_api import ApiCheckFailed, ApiChecks

            def check(run: Callable[[], str]) -> Callable[[], str]:
                def checked() -> str:
                    try:
                        return run()
                    except ApiCheckFailed as exc:
                        raise _Failed(exc.detail, exc.fix) from None
                return checked

            return [
                ("paths and permissions", self.check_paths, ()),
                ("same filesystem", self.check_same_filesystem, ("paths and permissions",)),
                *((name, check(run), needs) for name, run, needs in ApiChecks(self.config.api).plan()),
                ("clock", self.check_clock, ()),
            ]
        return [
            ("paths and permissions", self.check_paths, ()),
            ("same filesystem", self.check_same_filesystem, ("paths and permissions",)),
            ("private key", self.check_key, ()),
            ("known_hosts", self.check_known_hosts, ()),
            ("DNS", self.check_dns, ()),
            ("TCP", self.check_tcp, ("DNS",)),
            ("host key", self.check_host_key, ("TCP", "known_hosts")),
            ("SSH login", self.check_login, ("private key", "host key")),
            ("remote folder listable", self.check_remote_list, ("SSH login",)),
            ("remote folder writable", self.check_remote_write, ("remote folder listable",)),
            ("SFTP extensions", self.check_extensions, ("SSH login",)),
            ("clock", self.check_clock, ()),
        ]

    def run(self) -> Iterator[Result]:
        try:
            for name, check, needs in self.plan():
                blocked = [need for need in needs if need in self.failed]
                if blocked:
                    self.failed.add(name)
                    yield Result(name, Outcome.SKIP, f"not checked: {', '.join(blocked)} failed")
                    continue
                try:
                    detail = check()
                except _Failed as exc:
                    self.failed.add(name)
                    yield Result(name, Outcome.FAIL, exc.detail, exc.fix)
                    continue
                yield Result(name, Outcome.PASS, detail)
        finally:
            if self._session is not None:
                self._session.close()
