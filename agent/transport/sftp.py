"""One paramiko SFTP session: key and host-key policy, timeouts, keep-alive, reconnect.

Only the configured key is offered (no ssh-agent, no ~/.ssh lookups) and the server's host key
must already be in `sftp.known_hosts`: an unknown or changed key is refused (RejectPolicy).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import socket
import stat
import struct
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any

import paramiko
from loguru import logger
from paramiko.sftp import CMD_EXTENDED, CMD_EXTENDED_REPLY, CMD_INIT, CMD_VERSION

from agent.config import SftpConfig
from agent.errors import AgentError
from agent.systemd import CREDENTIAL_KEY_NAME, credential_path
from agent.transport.pipelining import PipelinedSFTPClient

SFTP_WRITE_CHUNK = 32768  # the largest write paramiko sends in one request
# Secure algorithms only, fastest first (bench/RESULTS.md). CBC modes, 3DES and MD5/96-bit MACs are
# never offered; AES-GCM is an AEAD (one pass, no separate MAC), CTR + SHA-2 HMAC is the fallback.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr",
                     "aes256-ctr")
PREFERRED_MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com", "hmac-sha2-256",
                  "hmac-sha2-512", "hmac-sha1")
TRANSPORT_WINDOW = 16 * 1024 * 1024  # SSH channel window we grant the server (paramiko's default: 2 MiB)
# Largest SFTP WRITE we send when the server states its limit (limits@openssh.com); servers that do
# not state one get SFTP_WRITE_CHUNK, the size every server takes. bench/RESULTS.md has the numbers.
MAX_WRITE_REQUEST = 128 * 1024
LIMITS_EXTENSION = "limits@openssh.com"
POSIX_RENAME_EXTENSION = "posix-rename@openssh.com"
# SFTP extensions the agent uses when the server offers them (`doctor` reports them)
USED_EXTENSIONS = {
    POSIX_RENAME_EXTENSION: "publishes with posix-rename (else plain rename, which never replaces a name)",
    LIMITS_EXTENSION: "WRITE requests as large as the server allows (up to 128 KiB)",
}
RSA_SHA2_ALGORITHMS = ("rsa-sha2-512", "rsa-sha2-256")
# SFTP channels a large file may use besides the session's own, on the same SSH connection: each
# channel has a flow-control window of its own (OpenSSH: 2 MiB), so one channel carries at most that
# per round trip (transport.publish, bench/RESULTS.md round 4)
EXTRA_LANES = 3


def make_transport(sock: socket.socket | paramiko.ProxyCommand, **kwargs: Any) -> paramiko.Transport:
    """`SSHClient.connect`'s transport factory: our window size and algorithm preference."""
    transport = paramiko.Transport(sock, default_window_size=TRANSPORT_WINDOW, **kwargs)
    options = transport.get_security_options()
    options.ciphers = tuple(name for name in PREFERRED_CIPHERS if name in options.ciphers)
    options.digests = tuple(name for name in PREFERRED_MACS if name in options.digests)
    return transport


class PrivateKeyError(AgentError):
    """The private key cannot be used; the message says how to fix it. The daemon keeps the files
    queued and tries again (the operator may fix the key meanwhile); `run` refuses to start."""

    retryable = True
    connection = True


class ConnectError(AgentError):
    """The server could not be reached or would not let us in; always worth retrying later.

    `dropped` is True when the server closed or refused the connection without a verdict on us
    (EOF or a disconnect before or during login, a refused TCP connection): what a server that
    limits connections per user or unauthenticated connections (ProFTPD MaxClientsPerUser, OpenSSH
    MaxStartups) does to a connection beyond its limit. `key_refused`: the server rejected the key.
    """

    retryable = True
    connection = True

    def __init__(self, message: str, *, dropped: bool = False, key_refused: bool = False) -> None:
        super().__init__(message)
        self.dropped = dropped
        self.key_refused = key_refused


SUPPORTED_KEY_TYPES = {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA"}  # what SaaSquatch accepts


def private_key_path(cfg: SftpConfig) -> Path:
    """The key systemd passed (LoadCredential=sftp-key:...), else the configured sftp.private_key."""
    return credential_path(CREDENTIAL_KEY_NAME) or cfg.private_key


def load_private_key(path: Path) -> paramiko.PKey:
    """Load an ED25519 or RSA private key, refusing what OpenSSH or SaaSquatch would refuse."""
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cryptography's deprecation notice for DSA keys
            key = paramiko.PKey.from_path(path)
    except paramiko.UnknownKeyType as exc:
        kind = str(getattr(exc.key_type, "__name__", exc.key_type)).removesuffix("PrivateKey") or "unknown"
        raise PrivateKeyError(
            f"private key {path} is a {kind} key, which SaaSquatch does not accept; make an ED25519 key"
            f" with `saasquatch-agent keygen PATH` and paste its .pub line into SaaSquatch"
        ) from None
    except (paramiko.PasswordRequiredException, TypeError) as exc:  # paramiko 4 lets cryptography's through
        if isinstance(exc, TypeError) and "password" not in str(exc).lower():
            raise PrivateKeyError(f"private key {path} is not a usable OpenSSH private key ({exc})") from None
        raise PrivateKeyError(
            f"private key {path} is protected by a passphrase; SaaSquatch needs a key without one"
            f" (remove it with `ssh-keygen -p -N '' -f {path}` or make a new key with keygen)"
        ) from None
    except (paramiko.SSHException, ValueError, OSError) as exc:
        raise PrivateKeyError(
            f"private key {path} is not a usable OpenSSH private key ({exc});"
            " SaaSquatch accepts ED25519 and RSA keys"
        ) from None
    if key.get_name() not in SUPPORTED_KEY_TYPES:
        raise PrivateKeyError(
            f"private key {path} is of type {key.get_name()}, which SaaSquatch does not accept (ED25519"
            " and RSA only); make an ED25519 key with `saasquatch-agent keygen PATH` and paste its .pub"
            " line into SaaSquatch"
        )
    return key


def proxy_sock(cfg: SftpConfig) -> paramiko.ProxyCommand | None:
    """sftp.proxy_command as the SSH connection's socket (OpenSSH's %h, %p, %r and %% tokens)."""
    if not cfg.proxy_command:
        return None
    tokens = {"h": cfg.host, "p": str(cfg.port), "r": cfg.username, "%": "%"}
    command = re.sub(r"%(.)", lambda m: tokens.get(m.group(1), m.group(0)), cfg.proxy_command)
    return paramiko.ProxyCommand(command)


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def disabled_algorithms(cfg: SftpConfig, key: paramiko.PKey) -> dict[str, list[str]]:
    """paramiko's `disabled_algorithms`: ssh-rsa (SHA-1) signatures only with sftp.rsa_sha1."""
    if cfg.rsa_sha1 and key.get_name() == "ssh-rsa":
        return {}  # SHA-2 first; SHA-1 after the server refused it (SftpSession._connect)
    return {"pubkeys": ["ssh-rsa"]}


def key_refused(exc: paramiko.AuthenticationException, ssh: paramiko.SSHClient) -> bool:
    """The server answered our key with a refusal (the connection is still up), as opposed to
    closing the connection during login, which paramiko raises as an AuthenticationException too."""
    transport = ssh.get_transport()
    if transport is None or not transport.is_active():
        return False
    return "saw EOF" not in str(exc)


class AgentSFTPClient(PipelinedSFTPClient):
    """The agent's SFTP client: `PipelinedSFTPClient` that keeps the extensions the server announced
    in its VERSION packet (paramiko reads and discards them): `extensions`, name -> data."""

    extensions: dict[str, bytes] | None = None

    def _send_version(self) -> int:
        message = paramiko.Message()
        message.add_int(3)
        self._send_packet(CMD_INIT, message)
        kind, data = self._read_packet()
        if kind != CMD_VERSION:
            raise paramiko.SFTPError("Incompatible sftp protocol")
        version = int(struct.unpack(">I", data[:4])[0])
        self.extensions = parse_extensions(data[4:])
        return version


def parse_extensions(data: bytes) -> dict[str, bytes]:
    """The (name, data) string pairs after the version number in an SFTP VERSION packet."""
    found: dict[str, bytes] = {}
    offset = 0
    for _ in range(256):  # bounded: a server announces a handful
        if offset + 4 > len(data):
            break
        pair: list[bytes] = []
        for _ in range(2):
            if offset + 4 > len(data):
                return found
            (length,) = struct.unpack(">I", data[offset:offset + 4])
            offset += 4
            if offset + length > len(data):
                return found
            pair.append(data[offset:offset + length])
            offset += length
        found[pair[0].decode("utf-8", "replace")] = pair[1]
    return found


def server_extensions(sftp: paramiko.SFTPClient) -> dict[str, bytes] | None:
    """The extensions the server announced on this connection; None when not known."""
    return getattr(sftp, "extensions", None)


class SftpSession:
    """A lazily opened, reused SFTP connection; `client()` reconnects after a drop."""

    def __init__(self, config: SftpConfig) -> None:
        self.config = config
        self._ssh: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._lock = threading.Lock()
        self._write_size: tuple[paramiko.SFTPClient, int] | None = None  # per connection
        self._pending_error: Exception | None = None  # try_connect()'s failure, for the next client()
        self._lanes: list[paramiko.SFTPClient] = []  # extra SFTP channels of this connection
        self._lanes_asked = False  # their opening started on this connection

    def client(self) -> paramiko.SFTPClient:
        with self._lock:
            pending, self._pending_error = self._pending_error, None
            if pending is not None:
                raise pending  # the attempt try_connect() just made failed: reported, not repeated
            if self._sftp is not None and self._alive():
                return self._sftp
            self._close_locked()
            self._sftp = self._connect()
            return self._sftp

    def try_connect(self) -> Exception | None:
        """Connect now (SessionPool); the failure is returned and raised once more by the next
        `client()` call, so the caller that gets this session reports it without connecting again."""
        try:
            self.client()
        except (ConnectError, PrivateKeyError) as exc:
            with self._lock:
                self._pending_error = exc
            return exc
        return None

    def forget_error(self) -> None:
        """Drop the failure try_connect() kept (the pool handled it)."""
        with self._lock:
            self._pending_error = None

    @property
    def connected(self) -> bool:
        """A connection is open and alive (client() will not have to connect)."""
        with self._lock:
            return self._sftp is not None and self._alive()

    @property
    def quickest_reply(self) -> float:
        """Its connection's quickest first reply to a step (about the round trip; `PipelinedSFTPClient`),
        infinite before one was measured."""
        sftp = self._sftp
        return sftp.quickest_reply if isinstance(sftp, PipelinedSFTPClient) else math.inf

    def _alive(self) -> bool:
        transport = self._ssh.get_transport() if self._ssh else None
        return bool(transport and transport.is_active())

    def _connect(self) -> paramiko.SFTPClient:
        cfg = self.config
        key = load_private_key(private_key_path(cfg))
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
            try:
                ssh.connect(
                    cfg.host, port=cfg.port, username=cfg.username, pkey=key,
                    allow_agent=False, look_for_keys=False,
                    timeout=cfg.connect_timeout, banner_timeout=cfg.connect_timeout,
                    auth_timeout=cfg.connect_timeout, channel_timeout=cfg.connect_timeout,
                    sock=proxy_sock(cfg), transport_factory=make_transport,
                    disabled_algorithms=disabled_algorithms(cfg, key),
                )
            except paramiko.AuthenticationException as exc:
                if not (cfg.rsa_sha1 and key.get_name() == "ssh-rsa" and key_refused(exc, ssh)):
                    raise
                # sftp.rsa_sha1: the server refused the SHA-2 signature; sign with ssh-rsa (SHA-1)
                transport = ssh.get_transport()
                assert transport is not None
                logger.debug("RSA SHA-2 signature refused ({}); trying ssh-rsa (SHA-1), as sftp.rsa_sha1"
                             " allows", exc)
                transport.disabled_algorithms = {"pubkeys": list(RSA_SHA2_ALGORITHMS)}
                transport.auth_publickey(cfg.username, key)
        except paramiko.BadHostKeyException as exc:
            ssh.close()
            raise ConnectError(
                f"HOST KEY MISMATCH for {known_hosts_name(cfg.host, cfg.port)}: known_hosts has"
                f" {exc.expected_key.get_name()} {exc.expected_key.fingerprint}, the server offered"
                f" {exc.key.get_name()} {exc.key.fingerprint}; nothing was sent. If SaaSquatch"
                f" changed its key, verify the new fingerprint and update {cfg.known_hosts}"
            ) from None
        except paramiko.AuthenticationException as exc:
            refused = key_refused(exc, ssh)
            ssh.close()
            if not refused:  # e.g. ProFTPD MaxClientsPerUser: logged in, then disconnected
                raise ConnectError(
                    f"the server {cfg.host}:{cfg.port} closed the connection during login ({exc});"
                    " it may limit connections per user", dropped=True,
                ) from None
            hint = ""
            if key.get_name() == "ssh-rsa" and not cfg.rsa_sha1:
                hint = ("; an RSA key may be refused by a server that accepts only ssh-rsa (SHA-1)"
                        " signatures: `saasquatch-agent doctor` tells whether sftp.rsa_sha1 = true helps")
            raise ConnectError(
                f"the server refused key authentication for user {cfg.username!r} ({exc}); check"
                f" that the public key of {cfg.private_key} is pasted into SaaSquatch's SFTP"
                f" integration page and that the username is the tenant alias{hint}", key_refused=True,
            ) from None
        except paramiko.SSHException as exc:
            ssh.close()
            text = str(exc)
            if "not found in known_hosts" in text:
                raise ConnectError(
                    f"the server {known_hosts_name(cfg.host, cfg.port)} is not in {cfg.known_hosts};"
                    " refusing to trust an unknown host key (add it after checking its fingerprint)"
                ) from None
            raise ConnectError(f"SSH error talking to {cfg.host}:{cfg.port}: {text}", dropped=True) from None
        except (OSError, EOFError) as exc:
            ssh.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConnectError(
                f"cannot connect to {cfg.host}:{cfg.port}: {reason or type(exc).__name__}",
                dropped=isinstance(exc, (EOFError, ConnectionError)),
            ) from None
        transport = ssh.get_transport()
        assert transport is not None
        if cfg.keepalive_seconds:
            transport.set_keepalive(cfg.keepalive_seconds)
        try:
            # paramiko's client, able to send a batch's requests together (agent.transport.pipelining)
            sftp = AgentSFTPClient.from_transport(transport)
            if sftp is None:
                raise paramiko.SSHException("the SFTP channel could not be opened")
        except (paramiko.SSHException, OSError, EOFError) as exc:
            ssh.close()  # e.g. OpenSSH MaxSessions, or a server that drops a session beyond its limit
            raise ConnectError(f"the server did not open an SFTP session: {exc}", dropped=True) from None
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
        for lane in self._lanes:
            with contextlib.suppress(Exception):
                lane.close()
        self._lanes, self._lanes_asked = [], False
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

    def extra_lanes(self, sftp: paramiko.SFTPClient) -> list[paramiko.SFTPClient]:
        """Further SFTP channels open on the connection of `sftp` (this session's client). The first
        call starts opening up to EXTRA_LANES of them in the background (a few round trips each);
        until then, and on a server that allows one session per connection, it returns fewer."""
        with self._lock:
            if self._sftp is not sftp or self._ssh is None or not _lanes_allowed():
                return []
            if not self._lanes_asked:
                self._lanes_asked = True
                for number in range(EXTRA_LANES):  # at once: each takes a few round trips
                    threading.Thread(target=self._open_lane, args=(sftp, self._ssh.get_transport()),
                                     name=f"sftp-lane-{number + 1}", daemon=True).start()
            return list(self._lanes)

    def _open_lane(self, sftp: paramiko.SFTPClient, transport: paramiko.Transport | None) -> None:
        try:
            lane = AgentSFTPClient.from_transport(transport) if transport is not None else None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            if transport is not None and not transport.is_active():
                _forbid_lanes(f"the server closed the connection when another SFTP channel was opened"
                              f" ({exc})")
            else:
                logger.debug("the server opens no further SFTP channel on this connection ({})", exc)
            return
        if lane is None:
            return
        channel = lane.get_channel()
        if channel is not None:
            channel.settimeout(self.config.operation_timeout)
        with self._lock:
            if self._sftp is not sftp:  # closed or replaced meanwhile
                with contextlib.suppress(Exception):
                    lane.close()
                return
            self._lanes.append(lane)

    def write_request_size(self, sftp: paramiko.SFTPClient) -> int:
        """Bytes per SFTP WRITE on `sftp`, this session's connection: asked once per connection."""
        cached = self._write_size
        if cached is not None and cached[0] is sftp:
            return cached[1]
        size = write_request_size(sftp)
        self._write_size = (sftp, size)
        return size


_lanes_forbidden_lock = threading.Lock()
_lanes_forbidden: list[str] = []  # why extra SFTP channels are not opened any more in this process


def _lanes_allowed() -> bool:
    with _lanes_forbidden_lock:
        return not _lanes_forbidden


def _forbid_lanes(why: str) -> None:
    """A server that drops the connection when a further channel is opened gets none again."""
    with _lanes_forbidden_lock:
        if _lanes_forbidden:
            return
        _lanes_forbidden.append(why)
    logger.info("{}; large files use one SFTP channel from now on", why)


def server_write_limit(sftp: paramiko.SFTPClient) -> int | None:
    """The server's max-write-length from limits@openssh.com; None when it does not state one.

    A server without the extension answers SSH_FX_OP_UNSUPPORTED (the SFTP draft requires a status
    for unknown extended requests), which paramiko raises as an OSError. A timeout is not a refusal:
    it is raised, like any other fault of the connection.
    """
    try:
        kind, reply = sftp._request(CMD_EXTENDED, LIMITS_EXTENSION)
    except TimeoutError:
        raise
    except (OSError, EOFError, paramiko.SFTPError) as exc:
        logger.debug("the server does not state its SFTP limits ({})", exc)
        return None
    if kind != CMD_EXTENDED_REPLY:
        return None
    reply.get_int64()  # max-packet-length
    reply.get_int64()  # max-read-length
    limit = int(reply.get_int64())  # max-write-length; 0 means "not stated"
    return limit or None


def write_request_size(sftp: paramiko.SFTPClient) -> int:
    """Bytes per SFTP WRITE: the server's stated limit up to MAX_WRITE_REQUEST, else 32 KiB."""
    limit = server_write_limit(sftp)
    size = SFTP_WRITE_CHUNK if limit is None else min(limit, MAX_WRITE_REQUEST)
    logger.debug("SFTP write requests of {} bytes (server limit: {})", size, limit or "not stated")
    return size


def remote_size(sftp: paramiko.SFTPClient, path: str) -> int | None:
    """Size of a remote file, or None when it does not exist."""
    try:
        size = sftp.stat(path).st_size
        return int(size) if size is not None else None
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


_no_posix_rename: weakref.WeakSet[paramiko.SFTPClient] = weakref.WeakSet()
_no_posix_rename_lock = threading.Lock()


def posix_rename_supported(sftp: paramiko.SFTPClient) -> bool:
    """Whether to try posix-rename on this connection: the server announced it (or did not say)
    and has not refused it on this connection yet (`mark_no_posix_rename`)."""
    extensions = server_extensions(sftp)
    if extensions is not None and POSIX_RENAME_EXTENSION not in extensions:
        return False
    with _no_posix_rename_lock:
        return sftp not in _no_posix_rename


def mark_no_posix_rename(sftp: paramiko.SFTPClient) -> None:
    """Remember that this connection's server refuses posix-rename: plain rename from now on."""
    with _no_posix_rename_lock:
        if sftp in _no_posix_rename:
            return
        _no_posix_rename.add(sftp)
    logger.info("the server refuses posix-rename; publishing with plain rename on this connection"
                " (it never replaces an existing name)")


def posix_rename_refused(exc: OSError) -> bool:
    """A posix-rename error that plain rename may not share: the request denied (PERMISSION_DENIED,
    e.g. OpenSSH `sftp-server -P posix-rename`) or not supported (OP_UNSUPPORTED, no errno)."""
    return exc.errno is None or exc.errno in (errno.EACCES, errno.EPERM)


def plain_rename(sftp: paramiko.SFTPClient, temp: str, final: str) -> None:
    """SFTP v3 rename, which never replaces an existing name; the final name is looked at first, so
    an existing one is reported as such. Errors keep their errno and name the refused name."""
    if remote_size(sftp, final) is not None:
        raise FileExistsError(errno.EEXIST, f"{final} already exists on the server; not replaced", final)
    try:
        sftp.rename(temp, final)
    except OSError as exc:
        reason = exc.strerror or str(exc) or "refused"
        raise OSError(exc.errno, f"the server refused to rename {temp} to {final}: {reason}") from None


def publish_rename(sftp: paramiko.SFTPClient, temp: str, final: str) -> None:
    """posix-rename where the server has it, else plain rename (which refuses to overwrite).

    A refused or unsupported posix-rename falls back to plain rename; once that works the
    connection is marked, so later files go straight to plain rename. Were plain rename refused
    too, the refusal was about the names, not the request: its error is raised, naming the name.
    """
    if posix_rename_supported(sftp):
        try:
            sftp.posix_rename(temp, final)
            return
        except OSError as exc:
            if not posix_rename_refused(exc):
                raise
            logger.debug("posix-rename of {} to {} refused ({}); trying plain rename", temp, final, exc)
        plain_rename(sftp, temp, final)
        mark_no_posix_rename(sftp)
        return
    plain_rename(sftp, temp, final)

