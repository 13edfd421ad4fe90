"""A small thread-based TCP proxy on loopback that injects network faults.

Put it between the agent and the test sshd (tc netem is not available):
latency, abrupt cuts, a stalled peer, refused connections, and a cut after a
given number of uploaded bytes.  Every wait is a ``select`` with a timeout;
all threads are daemons.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

__all__ = ["ProxyStats", "TcpProxy"]

_CHUNK = 65536
_MAX_BUFFERED = 4 * 1024 * 1024  # per direction; stop reading beyond this
_IDLE_WAIT = 1.0  # select timeout when nothing is due


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of the proxy counters."""

    connections_total: int
    connections_active: int
    connections_refused: int
    connections_cut: int
    bytes_to_target: int
    bytes_to_client: int


def _abort_socket(sock: socket.socket) -> None:
    """Close ``sock`` with an RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


class _Direction:
    """Bytes flowing one way: read from ``src``, delayed, written to ``dst``."""

    def __init__(self, src: socket.socket, dst: socket.socket, to_target: bool) -> None:
        self.src = src
        self.dst = dst
        self.to_target = to_target
        self.pending: deque[tuple[float, bytes]] = deque()
        self.pending_bytes = 0
        self.out = bytearray()
        self.eof = False
        self.shut = False
        self.sent = 0

    @property
    def buffered(self) -> int:
        return self.pending_bytes + len(self.out)


class _Connection:
    """One proxied connection, served by its own daemon thread."""

    def __init__(self, proxy: TcpProxy, client: socket.socket, number: int) -> None:
        self.proxy = proxy
        self.client = client
        self.aborted = False
        self.cut = False
        self._wake_lock = threading.Lock()
        self._wake_closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.thread = threading.Thread(
            target=self._run, name=f"tcp-proxy-{proxy.port}-conn{number}", daemon=True
        )

    def wake(self) -> None:
        with self._wake_lock:  # never send on a closed (maybe reused) fd
            if self._wake_closed:
                return
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    def abort(self, cut: bool = True) -> None:
        self.cut = self.cut or cut
        self.aborted = True
        self.wake()

    def _run(self) -> None:
        proxy = self.proxy
        upstream: socket.socket | None = None
        graceful = False
        try:
            upstream = socket.create_connection(
                (proxy.target_host, proxy.target_port), timeout=proxy.connect_timeout
            )
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream.setblocking(False)
            self.client.setblocking(False)
            graceful = self._pump(
                _Direction(self.client, upstream, to_target=True),
                _Direction(upstream, self.client, to_target=False),
            )
        except OSError:
            graceful = False
        finally:
            for sock in (self.client, upstream):
                if sock is not None:
                    if graceful:
                        sock.close()
                    else:
                        _abort_socket(sock)
            with self._wake_lock:
                self._wake_closed = True
                self._wake_r.close()
                self._wake_w.close()
            proxy._forget(self)

    def _pump(self, up: _Direction, down: _Direction) -> bool:
        """Forward until both sides finished (True) or an abort/error (False)."""
        proxy = self.proxy
        directions = (up, down)
        while not (self.aborted or proxy.closed):
            now = time.monotonic()
            stalled = proxy.stalled
            rlist: list[socket.socket] = [self._wake_r]
            wlist: list[socket.socket] = []
            timeout = _IDLE_WAIT
            for d in directions:
                if stalled:
                    continue
                while d.pending and d.pending[0][0] <= now:
                    _, data = d.pending.popleft()
                    d.pending_bytes -= len(data)
                    d.out += data
                if d.pending:
                    timeout = min(timeout, d.pending[0][0] - now)
                if d.out:
                    wlist.append(d.dst)
                elif d.eof and not d.pending and not d.shut:
                    try:
                        d.dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        return False
                    d.shut = True
                if not d.eof and d.buffered < _MAX_BUFFERED:
                    rlist.append(d.src)
            if up.shut and down.shut:
                return True
            readable, writable, _ = select.select(rlist, wlist, [], max(0.0, timeout))
            if self._wake_r in readable:
                _drain(self._wake_r)
            now = time.monotonic()
            for d in directions:
                if d.src in readable and not d.eof:
                    try:
                        chunk = d.src.recv(_CHUNK)
                    except (BlockingIOError, InterruptedError):
                        chunk = None
                    if chunk is not None:
                        if not chunk:
                            d.eof = True
                        elif proxy.delay_ms > 0:
                            d.pending.append((now + proxy.delay_ms / 1000.0, chunk))
                            d.pending_bytes += len(chunk)
                        else:
                            d.out += chunk
                if d.dst in writable and d.out and not self._send(d):
                    self.cut = True
                    return False
        return False

    def _send(self, d: _Direction) -> bool:
        """Write buffered bytes; False when the cut-after limit was reached."""
        proxy = self.proxy
        limit = proxy.cut_after_bytes if d.to_target else None
        chunk = memoryview(d.out)
        if limit is not None:
            chunk = chunk[: max(0, limit - d.sent)]
        sent = 0
        if chunk:
            try:
                sent = d.dst.send(chunk)
            except (BlockingIOError, InterruptedError):
                sent = 0
            finally:
                chunk.release()
        else:
            chunk.release()
        del d.out[:sent]
        d.sent += sent
        proxy._count(d.to_target, sent)
        return limit is None or d.sent < limit


class TcpProxy:
    """Forward 127.0.0.1:``port`` to ``target_host:target_port`` with fault controls.

    Controls (all may change while connections are live):

    * ``delay_ms``: latency added to every chunk, each way;
    * ``refuse``: accept then reset new connections at once;
    * ``stall()`` / ``resume()``: keep connections open but forward nothing;
    * ``cut_all()``: reset every live connection;
    * ``cut_after_bytes``: reset a connection once it has forwarded that many
      client-to-target bytes (exactly that many reach the target).
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        delay_ms: float = 0.0,
        connect_timeout: float = 5.0,
    ) -> None:
        """Start listening on a free port of ``listen_host``."""
        self.target_host = target_host
        self.target_port = target_port
        self.connect_timeout = connect_timeout
        self.delay_ms: float = delay_ms
        self.refuse: bool = False
        self.cut_after_bytes: int | None = None
        self._stalled = False
        self._closed = False
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._number = 0
        self._total = 0
        self._refused = 0
        self._cut = 0
        self._to_target = 0
        self._to_client = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((listen_host, 0))
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.host: str = listen_host
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"tcp-proxy-{self.port}", daemon=True
        )
        self._accept_thread.start()

    # ----------------------------------------------------------- controls

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` the clients should connect to."""
        return (self.host, self.port)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def stalled(self) -> bool:
        """True between :meth:`stall` and :meth:`resume`."""
        return self._stalled

    def stall(self) -> None:
        """Keep accepting and holding connections, but forward no byte."""
        self._stalled = True
        self._wake_all()

    def resume(self) -> None:
        """Forward again after :meth:`stall` (held bytes are delivered)."""
        self._stalled = False
        self._wake_all()

    def cut_all(self) -> int:
        """Reset every live connection; return how many were cut."""
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.abort()
        deadline = time.monotonic() + 5.0
        for conn in conns:
            conn.thread.join(max(0.0, deadline - time.monotonic()))
        return len(conns)

    # ------------------------------------------------------------ counters

    @property
    def connections_total(self) -> int:
        """Connections accepted so far (refused ones included)."""
        return self._total

    @property
    def connections_active(self) -> int:
        """Connections currently open."""
        with self._lock:
            return len(self._conns)

    @property
    def connections_refused(self) -> int:
        """Connections reset at once because ``refuse`` was set."""
        return self._refused

    @property
    def connections_cut(self) -> int:
        """Connections reset by :meth:`cut_all` or ``cut_after_bytes``."""
        return self._cut

    @property
    def bytes_to_target(self) -> int:
        """Bytes forwarded client -> target."""
        return self._to_target

    @property
    def bytes_to_client(self) -> int:
        """Bytes forwarded target -> client."""
        return self._to_client

    def stats(self) -> ProxyStats:
        """Return a consistent snapshot of all counters."""
        with self._lock:
            return ProxyStats(
                connections_total=self._total,
                connections_active=len(self._conns),
                connections_refused=self._refused,
                connections_cut=self._cut,
                bytes_to_target=self._to_target,
                bytes_to_client=self._to_client,
            )

    def wait_until(self, predicate: Callable[[TcpProxy], bool], timeout: float = 5.0) -> bool:
        """Poll ``predicate(self)`` every 10 ms for at most ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    # ----------------------------------------------------------- internals

    def _count(self, to_target: bool, nbytes: int) -> None:
        if nbytes:
            with self._lock:
                if to_target:
                    self._to_target += nbytes
                else:
                    self._to_client += nbytes

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)
            if conn.cut:
                self._cut += 1

    def _wake_all(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.wake()

    def _accept_loop(self) -> None:
        while not self._closed:
            readable, _, _ = select.select([self._listener, self._wake_r], [], [], _IDLE_WAIT)
            if self._wake_r in readable:
                _drain(self._wake_r)
            if self._closed or self._listener not in readable:
                continue
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                if self._closed:
                    break
                continue
            with self._lock:
                self._total += 1
                self._number += 1
                if self.refuse:
                    self._refused += 1
                    conn = None
                else:
                    conn = _Connection(self, client, self._number)
                    self._conns.add(conn)
            if conn is None:
                _abort_socket(client)
            else:
                conn.thread.start()

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop accepting, reset every connection, and join the threads."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._accept_thread.join(5.0)
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.abort(cut=False)
        deadline = time.monotonic() + 5.0
        for conn in conns:
            conn.thread.join(max(0.0, deadline - time.monotonic()))
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<TcpProxy {self.host}:{self.port} -> {self.target_host}:"
            f"{self.target_port} delay_ms={self.delay_ms} stalled={self._stalled} "
            f"refuse={self.refuse}>"
        )
