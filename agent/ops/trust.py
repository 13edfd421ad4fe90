"""Host-key trust: fetch the server's host key, show it, and write it to known_hosts on consent.

Nothing is trusted on first use: `trust-host` shows the key type and SHA256 fingerprint (the form
`ssh-keygen -lf` and SaaSquatch show) and writes the known_hosts line only after the operator
confirms, or when `--fingerprint SHA256:...` given on the command line matches. Entries are written as
OpenSSH does: `host` for port 22, `[host]:port` otherwise, plain or hashed (`|1|salt|hash`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import paramiko

from agent.config import SftpConfig
from agent.errors import AgentError
from agent.store.fsutil import place
from agent.transport.sftp import known_hosts_name, proxy_sock


class TrustError(AgentError):
    """The host key could not be fetched or written; the message says why."""


@dataclass(frozen=True)
class HostKeyInfo:
    name: str  # as known_hosts writes it: host or [host]:port
    key: paramiko.PKey

    @property
    def key_type(self) -> str:
        return str(self.key.get_name())

    @property
    def fingerprint(self) -> str:
        return str(self.key.fingerprint)  # "SHA256:<base64 without padding>"


def fetch_host_key(cfg: SftpConfig) -> HostKeyInfo:
    """Open an SSH transport far enough to receive the server's host key; no authentication."""
    name = known_hosts_name(cfg.host, cfg.port)
    sock: socket.socket | paramiko.ProxyCommand | None = None
    transport: paramiko.Transport | None = None
    try:
        sock = proxy_sock(cfg) or socket.create_connection((cfg.host, cfg.port), timeout=cfg.connect_timeout)
        transport = paramiko.Transport(sock)
        transport.banner_timeout = cfg.connect_timeout
        transport.start_client(timeout=cfg.connect_timeout)
        key = transport.get_remote_server_key()
    except (OSError, EOFError, paramiko.SSHException) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TrustError(f"cannot get the host key of {name}: {reason or type(exc).__name__}") from None
    finally:
        if transport is not None:
            transport.close()
        elif sock is not None:
            sock.close()
    return HostKeyInfo(name, key)


def normalize_fingerprint(text: str) -> str:
    """Accept `SHA256:abc`, `abc` or `abc=` (padding) as the same fingerprint."""
    text = text.strip()
    if text.upper().startswith("SHA256:"):
        text = text[len("SHA256:"):]
    return "SHA256:" + text.rstrip("=")


def known_keys(path: Path, name: str) -> list[paramiko.PKey]:
    """The keys known_hosts holds for name (plain or hashed entries)."""
    if not path.exists():
        return []
    hosts = paramiko.HostKeys(str(path))
    entry = hosts.lookup(name)
    return list(entry.values()) if entry else []


def _entry_matches(line: str, name: str) -> bool:
    entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
    if entry is None:
        return False
    for host in entry.hostnames:
        if host == name:
            return True
        if host.startswith("|1|") and paramiko.HostKeys.hash_host(name, host) == host:
            return True
    return False


def write_known_host(path: Path, info: HostKeyInfo, hashed: bool = False) -> None:
    """Replace every entry for info.name by one line with info.key; atomic, keeps other lines.
    TrustError when it cannot be written."""
    try:
        _write_known_host(path, info, hashed)
    except OSError as exc:
        raise TrustError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _write_known_host(path: Path, info: HostKeyInfo, hashed: bool) -> None:
    lines: list[str] = []
    mode = 0o644
    if path.exists():
        mode = path.stat().st_mode & 0o7777
        lines = [line for line in path.read_text().splitlines()
                 if line.strip().startswith("#") or not line.strip() or not _entry_matches(line, info.name)]
    host = paramiko.HostKeys.hash_host(info.name) if hashed else info.name
    lines.append(f"{host} {info.key.get_name()} {info.key.get_base64()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        with contextlib.suppress(OSError):
            st = path.stat()
            os.chown(temp, st.st_uid, st.st_gid)
        place(Path(temp), path, replace=True)  # known_hosts, rewritten on the operator's consent
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
