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

from agent.config import Config
from agent.sftp import (
    ConnectError,
    PrivateKeyError,
    SftpSession,
    known_hosts_name,
    load_private_key,
    private_key_path,
    proxy_sock,
)
from agent.trust import TrustError, fetch_host_key, known_keys

PROBE_PREFIX = ".saasquatch-agent-doctor-"  # hidden and without an import prefix: never imported
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


class _Failed(Exception):
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
        self.cfg = config.sftp
        self.failed: set[str] = set()
        self._session: SftpSession | None = None
        self._server_time: float | None = None

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
            raise _Failed(str(exc), "paste the .pub line of the key into SaaSquatch's SFTP integration page"
                          " and use the tenant alias as sftp.username") from None
        return f"logged in as {self.cfg.username} with the key"

    def check_remote_list(self) -> str:
        assert self._session is not None
        try:
            names = self._session.client().listdir(self.cfg.remote_dir)
        except OSError as exc:
            raise _Failed(f"cannot list {self.cfg.remote_dir}: {exc.strerror or exc}",
                          "set sftp.remote_dir to the upload folder SaaSquatch gives you") from None
        return f"{self.cfg.remote_dir} is listable ({len(names)} entries)"

    def check_remote_write(self) -> str:
        assert self._session is not None
        sftp = self._session.client()
        probe = posixpath.join(self.cfg.remote_dir, f"{PROBE_PREFIX}{secrets.token_hex(6)}.probe")
        try:
            with sftp.open(probe, "wb") as handle:
                handle.write(b"saasquatch-agent doctor probe; safe to delete\n")
            mtime = sftp.stat(probe).st_mtime
            self._server_time = float(mtime) if mtime is not None else None
        except OSError as exc:
            with contextlib.suppress(OSError):
                sftp.remove(probe)
            raise _Failed(f"cannot write {probe}: {exc.strerror or exc}",
                          "the SFTP user needs write access to sftp.remote_dir; ask SaaSquatch") from None
        try:
            sftp.remove(probe)
        except OSError as exc:
            raise _Failed(f"wrote {probe} but cannot remove it: {exc.strerror or exc}",
                          f"remove {probe} by hand; the agent needs rename rights in remote_dir") from None
        return f"{self.cfg.remote_dir} is writable (probe file written and removed)"

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
