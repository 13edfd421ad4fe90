"""One paramiko SFTP session: key and host-key policy, timeouts, keep-alive, reconnect.

Only the configured key is offered (no ssh-agent, no ~/.ssh lookups) and the server's host key
must already be in `sftp.known_hosts`: an unknown or changed key is refused (RejectPolicy).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import threading
from pathlib import Path

import paramiko
from loguru import logger

from agent.config import SftpConfig

SFTP_WRITE_CHUNK = 32768  # the largest write paramiko sends in one request


class PrivateKeyError(Exception):
    """The private key cannot be used; the message says how to fix it."""


class ConnectError(Exception):
    """The server could not be reached or would not let us in; always worth retrying later."""


def load_private_key(path: Path) -> paramiko.PKey:
    """Load an ED25519/RSA/ECDSA private key, refusing what OpenSSH would refuse."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise PrivateKeyError(
            f"private key {path} does not exist: create one with `saasquatch-agent keygen {path}`"
            " and paste its .pub line into SaaSquatch's SFTP integration page"
        ) from None
    except OSError as exc:
        raise PrivateKeyError(f"private key {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise PrivateKeyError(f"private key {path} is not a regular file")
    if info.st_mode & 0o077:
        raise PrivateKeyError(
            f"private key {path} is readable by group or others (mode {stat.S_IMODE(info.st_mode):04o});"
            f" fix it with `chmod 600 {path}`"
        )
    try:
        key = paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException:
        raise PrivateKeyError(
            f"private key {path} is protected by a passphrase; SaaSquatch needs a key without one"
            f" (remove it with `ssh-keygen -p -N '' -f {path}` or make a new key with keygen)"
        ) from None
    except (paramiko.SSHException, ValueError, OSError) as exc:
        raise PrivateKeyError(
            f"private key {path} is not a usable OpenSSH private key ({exc});"
            " SaaSquatch accepts ED25519 and RSA keys"
        ) from None
    return key


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


class SftpSession:
    """A lazily opened, reused SFTP connection; `client()` reconnects after a drop."""

    def __init__(self, config: SftpConfig) -> None:
        self.config = config
        self._ssh: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()

    def client(self) -> paramiko.SFTPClient:
        with self._lock:
            if self._sftp is not None and self._alive():
                return self._sftp
            self._close_locked()
            self._sftp = self._connect()
            return self._sftp

    def _alive(self) -> bool:
        transport = self._ssh.get_transport() if self._ssh else None
        return bool(transport and transport.is_active())

    def _connect(self) -> paramiko.SFTPClient:
        cfg = self.config
        key = load_private_key(cfg.private_key)
        ssh = paramiko.SSHClient()
        try:
            ssh.load_host_keys(str(cfg.known_hosts))
        except FileNotFoundError:
            raise ConnectError(
                f"known_hosts file {cfg.known_hosts} does not exist; add the server's host key"
                f" (`ssh-keyscan -p {cfg.port} {cfg.host} >> {cfg.known_hosts}`, then check its"
                " fingerprint with SaaSquatch)"
            ) from None
        ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            ssh.connect(
                cfg.host, port=cfg.port, username=cfg.username, pkey=key,
                allow_agent=False, look_for_keys=False,
                timeout=cfg.connect_timeout, banner_timeout=cfg.connect_timeout,
                auth_timeout=cfg.connect_timeout, channel_timeout=cfg.connect_timeout,
            )
        except paramiko.BadHostKeyException as exc:
            ssh.close()
            raise ConnectError(
                f"HOST KEY MISMATCH for {known_hosts_name(cfg.host, cfg.port)}: known_hosts has"
                f" {exc.expected_key.get_name()} {exc.expected_key.fingerprint}, the server offered"
                f" {exc.key.get_name()} {exc.key.fingerprint}; nothing was sent. If SaaSquatch"
                f" changed its key, verify the new fingerprint and update {cfg.known_hosts}"
            ) from None
        except paramiko.AuthenticationException as exc:
            ssh.close()
            raise ConnectError(
                f"the server refused key authentication for user {cfg.username!r} ({exc}); check"
                f" that the public key of {cfg.private_key} is pasted into SaaSquatch's SFTP"
                " integration page and that the username is the tenant alias"
            ) from None
        except paramiko.SSHException as exc:
            ssh.close()
            text = str(exc)
            if "not found in known_hosts" in text:
                raise ConnectError(
                    f"the server {known_hosts_name(cfg.host, cfg.port)} is not in {cfg.known_hosts};"
                    " refusing to trust an unknown host key (add it after checking its fingerprint)"
                ) from None
            raise ConnectError(f"SSH error talking to {cfg.host}:{cfg.port}: {text}") from None
        except (OSError, EOFError) as exc:
            ssh.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConnectError(
                f"cannot connect to {cfg.host}:{cfg.port}: {reason or type(exc).__name__}"
            ) from None
        transport = ssh.get_transport()
        assert transport is not None
        if cfg.keepalive_seconds:
            transport.set_keepalive(cfg.keepalive_seconds)
        try:
            sftp = ssh.open_sftp()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            ssh.close()
            raise ConnectError(f"the server did not open an SFTP session: {exc}") from None
        channel = sftp.get_channel()
        if channel is not None:
            channel.settimeout(cfg.operation_timeout)
        self._ssh = ssh
        logger.info("connected to {}:{} as {}", cfg.host, cfg.port, cfg.username)
        return sftp

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._sftp is not None:
            with contextlib.suppress(Exception):  # closing a dead session may fail any way it likes
                self._sftp.close()
        if self._ssh is not None:
            self._ssh.close()
        self._sftp = None
        self._ssh = None

    def drop(self) -> None:
        """Forget the connection after an error, so the next `client()` opens a fresh one."""
        self.close()


def remote_size(sftp: paramiko.SFTPClient, path: str) -> int | None:
    """Size of a remote file, or None when it does not exist."""
    try:
        size = sftp.stat(path).st_size
        return int(size) if size is not None else None
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


def publish_rename(sftp: paramiko.SFTPClient, temp: str, final: str) -> None:
    """posix-rename where the server has it, else plain rename (which refuses to overwrite)."""
    try:
        sftp.posix_rename(temp, final)
    except OSError as exc:
        if exc.errno is not None:
            raise
        logger.debug("posix-rename refused ({}); using plain rename", exc)
        sftp.rename(temp, final)


def is_connection_fault(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectError, socket.timeout, TimeoutError, EOFError, paramiko.SSHException,
                            ConnectionError))
