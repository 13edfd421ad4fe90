"""A local sandbox SFTP server for `saasquatch-agent demo` and for fault tests.

It runs asyncssh (an optional extra: ``pip install -e '.[demo]'``) on 127.0.0.1, on a free port,
in a background daemon thread with its own event loop. One user, public-key auth only, the
served folder is a chroot. ``SandboxServer.faults`` holds switches that tests flip at run time to
produce failures a stock OpenSSH sshd will not: permission denied on open, a full disk, no
``posix-rename@openssh.com``, stalled writes. It also counts SFTP requests per operation.

Nothing else in the package imports this module, so asyncssh stays optional.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import errno
import functools
import inspect
import os
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISDIR
from types import TracebackType
from typing import Any, Self, TypeVar, cast

try:
    import asyncssh
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the sandbox SFTP server needs asyncssh, an optional extra; "
        "install it with: pip install -e '.[demo]'",
        name="asyncssh",
    ) from exc

from agent.errors import AgentError

__all__ = ["SandboxError", "SandboxFaults", "SandboxServer"]

HOST = "127.0.0.1"
IMPORTS_DIR = "imports"
START_TIMEOUT = 10.0  # seconds start() waits for the listener
STOP_TIMEOUT = 5.0  # seconds each stop() step may take (stop() takes at most twice this)
_STALL_POLL = 0.02  # seconds between checks of `stall_writes`

_T = TypeVar("_T")
_F = TypeVar("_F", bound=Callable[..., Any])


class SandboxError(AgentError, RuntimeError):
    """The sandbox server could not start or stop."""


@dataclass
class SandboxFaults:
    """Fault switches read by the server on every request; flip them from any thread.

    `counts` counts SFTP requests by the asyncssh `SFTPServer` method that served them:
    "open", "close", "read", "write", "stat", "lstat", "fstat", "setstat", "fsetstat",
    "scandir" (one per directory listing, i.e. per OPENDIR), "remove", "mkdir", "rmdir",
    "realpath", "rename", "posix_rename", "readlink", "symlink", "fsync", "statvfs", ...
    Refused requests are counted too.
    """

    permission_denied_on_open: bool = False
    disk_full_after_bytes: int | None = None
    no_posix_rename: bool = False
    stall_writes: bool = False
    refuse_write_chance: float = 0.0  # each WRITE is refused (nothing written) with this probability
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    # the refusals' random sequence: seeded (`seed`), so a failing run repeats
    _rng: random.Random = field(default_factory=lambda: random.Random(0), repr=False)

    def seed(self, value: int) -> None:
        self._rng.seed(value)

    def refuse_this_write(self) -> bool:
        if self.refuse_write_chance <= 0:
            return False
        refused = self._rng.random() < self.refuse_write_chance
        self.counts["refused_write"] += refused
        return refused

    def reset(self) -> None:
        """Clear every fault and the request counts."""
        self.permission_denied_on_open = False
        self.disk_full_after_bytes = None
        self.no_posix_rename = False
        self.stall_writes = False
        self.refuse_write_chance = 0.0
        self.counts.clear()


async def _settle(value: _T | Awaitable[_T]) -> _T:
    """Await `value` if it is awaitable (asyncssh's MaybeAwait)."""
    if inspect.isawaitable(value):
        return await value
    return value


def _counted(method: _F) -> _F:
    """Wrap an `asyncssh.SFTPServer` method so each call is counted under its name."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: _SandboxSFTPServer, *args: Any, **kwargs: Any) -> Any:
        self.faults.counts[name] += 1
        return method(self, *args, **kwargs)

    return cast(_F, wrapper)


class _SandboxSFTPServer(asyncssh.SFTPServer):
    """asyncssh's file-system SFTP server, chrooted, with counters and fault injection."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], owner: SandboxServer) -> None:
        super().__init__(chan, chroot=os.fsencode(owner.root))
        self._owner = owner

    @property
    def faults(self) -> SandboxFaults:
        """The owner's current fault switches (looked up each time, so they can be replaced)."""
        return self._owner.faults

    # Plain pass-through operations, only counted.
    close = _counted(asyncssh.SFTPServer.close)
    read = _counted(asyncssh.SFTPServer.read)
    stat = _counted(asyncssh.SFTPServer.stat)
    lstat = _counted(asyncssh.SFTPServer.lstat)
    fstat = _counted(asyncssh.SFTPServer.fstat)
    setstat = _counted(asyncssh.SFTPServer.setstat)
    lsetstat = _counted(asyncssh.SFTPServer.lsetstat)
    fsetstat = _counted(asyncssh.SFTPServer.fsetstat)
    remove = _counted(asyncssh.SFTPServer.remove)
    mkdir = _counted(asyncssh.SFTPServer.mkdir)
    rmdir = _counted(asyncssh.SFTPServer.rmdir)
    realpath = _counted(asyncssh.SFTPServer.realpath)
    rename = _counted(asyncssh.SFTPServer.rename)
    readlink = _counted(asyncssh.SFTPServer.readlink)
    symlink = _counted(asyncssh.SFTPServer.symlink)
    link = _counted(asyncssh.SFTPServer.link)
    statvfs = _counted(asyncssh.SFTPServer.statvfs)
    fstatvfs = _counted(asyncssh.SFTPServer.fstatvfs)
    fsync = _counted(asyncssh.SFTPServer.fsync)

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        """Open a file, or refuse a write open when `permission_denied_on_open` is set."""
        faults = self.faults
        faults.counts["open"] += 1
        if faults.permission_denied_on_open and pflags & (asyncssh.FXF_WRITE | asyncssh.FXF_APPEND):
            raise asyncssh.SFTPError(asyncssh.FX_PERMISSION_DENIED, "Permission denied")
        return super().open(path, pflags, attrs)

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        """Write, after any stall; past `disk_full_after_bytes` write what fits, then fail."""
        faults = self.faults
        faults.counts["write"] += 1
        while self.faults.stall_writes and not self._owner.stopping:
            await asyncio.sleep(_STALL_POLL)
        if self._owner.stopping:
            raise asyncssh.SFTPError(asyncssh.FX_FAILURE, "sandbox server is stopping")
        if faults.refuse_this_write():
            raise asyncssh.SFTPError(asyncssh.FX_FAILURE, "write refused (sandbox fault)")
        limit = self.faults.disk_full_after_bytes
        if limit is not None and offset + len(data) > limit:
            room = max(0, limit - offset)
            if room:
                await _settle(super().write(file_obj, offset, data[:room]))
            raise asyncssh.SFTPError(asyncssh.FX_FAILURE, "No space left on device")
        return await _settle(super().write(file_obj, offset, data))

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        """Rename over an existing file, or refuse when `no_posix_rename` is set."""
        faults = self.faults
        faults.counts["posix_rename"] += 1
        if faults.no_posix_rename:
            raise asyncssh.SFTPError(asyncssh.FX_OP_UNSUPPORTED, "posix-rename@openssh.com not supported")
        await _settle(super().posix_rename(oldpath, newpath))

    def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        """List a directory; counted once per OPENDIR (not when the client reads the entries)."""
        self.faults.counts["scandir"] += 1
        # Fail at OPENDIR, as sshd does, not at the first READDIR (asyncssh's default).
        if not S_ISDIR(os.stat(self.map_path(path)).st_mode):
            raise OSError(errno.ENOTDIR, "Not a directory")
        return self._scan(path)

    async def _scan(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        # Like asyncssh's default scandir, but "." and ".." are stat'ed directly rather than via
        # self.lstat, so a listing does not also count as two LSTAT requests.
        for name in (b".", b".."):
            local = self.map_path(path + b"/" + name)
            yield asyncssh.SFTPName(name, attrs=asyncssh.SFTPAttrs.from_local(os.lstat(local)))
        with os.scandir(self.map_path(path)) as entries:
            for entry in entries:
                attrs = asyncssh.SFTPAttrs.from_local(entry.stat(follow_symlinks=False))
                yield asyncssh.SFTPName(entry.name, attrs=attrs)


class _SandboxSSHServer(asyncssh.SSHServer):
    """Public-key auth for one user and one key; every other method and user is refused."""

    def __init__(self, owner: SandboxServer) -> None:
        self._owner = owner
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        """Track the connection so stop() can close it."""
        self._conn = conn
        self._owner.connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection."""
        if self._conn is not None:
            self._owner.connections.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        """Always require authentication."""
        return True

    def password_auth_supported(self) -> bool:
        """No passwords."""
        return False

    def kbdint_auth_supported(self) -> bool:
        """No keyboard-interactive."""
        return False

    def host_based_auth_supported(self) -> bool:
        """No host-based auth."""
        return False

    def public_key_auth_supported(self) -> bool:
        """Public keys only."""
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Accept only the configured user with the configured key."""
        owner = self._owner
        return username == owner.username and key.public_data == owner.authorized_key.public_data


class SandboxServer:
    """A local SFTP server on 127.0.0.1 serving `root` (chrooted) to one user and one key."""

    host: str = HOST

    def __init__(
        self,
        root: Path,
        username: str,
        authorized_public_key: str,
        host_key_path: Path | None = None,
    ) -> None:
        """Prepare the server (and `root/imports`); start() makes it listen."""
        if not username:
            raise ValueError("username must not be empty")
        try:
            self.authorized_key = asyncssh.import_public_key(authorized_public_key.strip())
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ValueError(f"authorized_public_key is not an OpenSSH public key: {exc}") from exc
        root = Path(root)
        (root / IMPORTS_DIR).mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.username = username
        self.host_key_path = host_key_path
        self.host_key = self._load_or_create_host_key(host_key_path)
        self.faults = SandboxFaults()
        self.port = 0
        self.connections: set[asyncssh.SSHServerConnection] = set()
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._start_error: BaseException | None = None

    @staticmethod
    def _load_or_create_host_key(path: Path | None) -> asyncssh.SSHKey:
        """Load the host key at `path`; else generate an ED25519 one (saved 0600 at `path`)."""
        if path is not None and path.exists():
            return asyncssh.read_private_key(str(path))
        key = asyncssh.generate_private_key("ssh-ed25519", comment="saasquatch-sandbox")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(key.export_private_key("openssh"))
        return key

    @property
    def counts(self) -> collections.Counter[str]:
        """SFTP request counts per operation (same object as `faults.counts`)."""
        return self.faults.counts

    @property
    def stopping(self) -> bool:
        """True once stop() has begun."""
        return self._stopping.is_set()

    @property
    def running(self) -> bool:
        """True while the server thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def host_public_key_line(self) -> str:
        """The host public key as "ssh-ed25519 AAAA..."."""
        blob = base64.b64encode(self.host_key.public_data).decode("ascii")
        return f"{self.host_key.get_algorithm()} {blob}"

    def known_hosts_line(self) -> str:
        """The known_hosts line for this server: "[127.0.0.1]:PORT ssh-ed25519 AAAA..."."""
        if not self.port:
            raise SandboxError("the sandbox server is not started; no port yet")
        return f"[{self.host}]:{self.port} {self.host_public_key_line()}"

    def start(self) -> None:
        """Listen on 127.0.0.1 on a free port in a daemon thread; return once listening."""
        if self._thread is not None:
            raise SandboxError("the sandbox server is already started")
        self._stopping.clear()
        self._start_error = None
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        thread = threading.Thread(
            target=self._run, args=(loop, ready), name="saasquatch-sandbox-sftp", daemon=True
        )
        self._loop, self._thread = loop, thread
        thread.start()
        if not ready.wait(START_TIMEOUT):
            self.stop()
            raise SandboxError(f"the sandbox SFTP server did not listen within {START_TIMEOUT:g}s")
        if self._start_error is not None:
            error = self._start_error
            self.stop()
            raise SandboxError(f"the sandbox SFTP server failed to start: {error}") from error

    def stop(self) -> None:
        """Close connections, the listener and the loop; each step is bounded. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._stopping.set()
        if thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop may close under us
                future = asyncio.run_coroutine_threadsafe(self._close(), loop)
                try:
                    future.result(timeout=STOP_TIMEOUT)
                except (TimeoutError, concurrent.futures.CancelledError, OSError, asyncssh.Error):
                    future.cancel()  # stop regardless
                loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=STOP_TIMEOUT)
        self._loop = self._thread = None
        self._acceptor = None
        self.port = 0

    def __enter__(self) -> Self:
        """Start the server."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    def _run(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        """Thread body: listen, signal `ready`, serve until stop(), then tidy the loop."""
        asyncio.set_event_loop(loop)
        try:
            try:
                self._acceptor = loop.run_until_complete(self._listen())
                self.port = self._acceptor.get_port()
            except Exception as exc:  # noqa: BLE001 - any failure is re-raised by start()
                self._start_error = exc
                return
            finally:
                ready.set()
            loop.run_forever()
        finally:
            self._shutdown_loop(loop)

    async def _listen(self) -> asyncssh.SSHAcceptor:
        """Create the asyncssh listener."""
        return await asyncssh.listen(
            self.host,
            0,
            server_factory=lambda: _SandboxSSHServer(self),
            server_host_keys=[self.host_key],
            sftp_factory=lambda chan: _SandboxSFTPServer(chan, self),
            allow_scp=False,
            allow_pty=False,
            agent_forwarding=False,
            x11_forwarding=False,
            gss_host=None,  # no GSSAPI, and no slow getfqdn() at start
            login_timeout=30,
        )

    async def _close(self) -> None:
        """Close the listener and every connection, waiting a bounded time."""
        waits: list[Awaitable[None]] = []
        if self._acceptor is not None:
            self._acceptor.close()
            waits.append(self._acceptor.wait_closed())
        for conn in list(self.connections):
            conn.close()
            waits.append(conn.wait_closed())
        if waits:
            tasks = [asyncio.ensure_future(wait) for wait in waits]
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
        # Let the SFTP session tasks see their channel close and run their cleanup (which closes
        # any file left open) rather than being cancelled mid-way.
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        if others:
            await asyncio.wait(others, timeout=STOP_TIMEOUT)

    @staticmethod
    def _shutdown_loop(loop: asyncio.AbstractEventLoop) -> None:
        """Cancel leftover tasks (bounded) and close the loop."""
        try:
            pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=STOP_TIMEOUT))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
