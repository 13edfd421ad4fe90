"""A link emulator for the benchmarks: a TCP forwarder on loopback that adds a one-way delay in each
direction and caps the bandwidth, as a WAN link between the agent and a remote SFTP server would.

    with Link("127.0.0.1", sshd_port, delay_ms=20, mbit=100) as link:
        ... connect to link.port instead of sshd_port ...

Model: each direction is one bottleneck shared by every connection through the link (several SSH
connections share its bandwidth, as on a real link). A chunk read at time t leaves the bottleneck once
the chunks before it have (`rate`), and arrives `delay` later. The bottleneck queue holds at most
`queue_seconds` of traffic; beyond it the emulator stops reading, so the sender's TCP backs off. tc
netem would do this in the kernel, but it needs its own network namespace (loopback is shared with
other work on the machine); all of this runs in one thread with one selector, whose CPU is the
benchmark's, not the agent's.

`cut_after(n)` resets every connection once n more bytes have gone towards the server (a connection
cut mid-transfer); new connections are accepted again at once.
"""

from __future__ import annotations

import collections
import contextlib
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

CHUNK = 256 * 1024
MIN_QUEUE_BYTES = 1024 * 1024
IDLE_WAIT = 0.5  # seconds the loop sleeps when nothing is due (bounded: it checks for close)


@dataclass
class _Pipe:
    """One direction of one connection: bytes read from src, waiting for their arrival time."""

    src: socket.socket
    dst: socket.socket
    towards_server: bool
    due: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    out: bytearray = field(default_factory=bytearray)
    queued: int = 0
    eof: bool = False
    shut: bool = False


@dataclass
class _Bottleneck:
    """A direction of the link: when its bottleneck is free again, bytes queued in it."""

    rate: float  # bytes per second; 0: unlimited
    free_at: float = 0.0
    queued: int = 0


class Link:
    def __init__(self, target_host: str, target_port: int, *, delay_ms: float = 0.0, mbit: float = 0.0,
                 queue_seconds: float = 0.25) -> None:
        self.target = (target_host, target_port)
        self.delay = delay_ms / 1000.0
        rate = mbit * 1_000_000 / 8
        self.queue_limit = max(MIN_QUEUE_BYTES, int(rate * queue_seconds)) if rate else 16 * MIN_QUEUE_BYTES
        self._links = {True: _Bottleneck(rate), False: _Bottleneck(rate)}  # key: towards the server
        self.bytes_to_server = 0
        self.bytes_to_client = 0
        self.connections = 0
        self.cuts = 0
        self._cut_at: int | None = None
        self._cut_now = False
        self._closed = False
        self._pipes: list[_Pipe] = []
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.host = "127.0.0.1"
        self.port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"link-{self.port}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        rate = self._links[True].rate
        return f"<Link :{self.port} delay {self.delay * 1000:g} ms each way, {rate * 8 / 1e6:g} Mbit/s>"

    # ---- controls

    def cut_after(self, nbytes: int) -> None:
        """Reset every connection once `nbytes` more bytes have gone towards the server."""
        with self._lock:
            self._cut_at = self.bytes_to_server + nbytes

    def cut_all(self) -> None:
        with self._lock:
            self._cut_now = True
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()
        self._thread.join(10)
        for pipe in self._pipes:
            _close(pipe.src, abort=True)
        self._listener.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Link:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    # ---- the loop

    def _run(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        while not self._closed:
            now = time.monotonic()
            timeout = IDLE_WAIT
            for pipe in self._pipes:
                self._release(pipe, now)
                if pipe.due:
                    timeout = min(timeout, max(0.0, pipe.due[0][0] - now))
            self._register_interest()
            for key, _events in self._selector.select(timeout):
                if key.data == "accept":
                    self._accept()
                elif key.data == "wake":
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                else:
                    self._service(key.fileobj, _events)  # type: ignore[arg-type]
            self._cut_if_due()

    def _register_interest(self) -> None:
        wanted: dict[socket.socket, int] = {}
        for pipe in self._pipes:
            link = self._links[pipe.towards_server]
            if not pipe.eof and link.queued < self.queue_limit:
                wanted[pipe.src] = wanted.get(pipe.src, 0) | selectors.EVENT_READ
            if pipe.out:
                wanted[pipe.dst] = wanted.get(pipe.dst, 0) | selectors.EVENT_WRITE
        for sock in {s for pipe in self._pipes for s in (pipe.src, pipe.dst)}:
            events = wanted.get(sock, 0)
            try:
                current = self._selector.get_key(sock).events
            except KeyError:
                current = 0
            if events == current:
                continue
            if current and events:
                self._selector.modify(sock, events, "conn")
            elif events:
                self._selector.register(sock, events, "conn")
            else:
                self._selector.unregister(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            _close(client, abort=True)
            return
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        self.connections += 1
        self._pipes += [_Pipe(client, server, True), _Pipe(server, client, False)]

    def _service(self, sock: socket.socket, events: int) -> None:
        now = time.monotonic()
        for pipe in list(self._pipes):
            if events & selectors.EVENT_READ and pipe.src is sock and not pipe.eof:
                self._read(pipe, now)
            if events & selectors.EVENT_WRITE and pipe.dst is sock and pipe.out:
                self._write(pipe)

    def _read(self, pipe: _Pipe, now: float) -> None:
        try:
            data = pipe.src.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(pipe)
            return
        if not data:
            pipe.eof = True
            return
        link = self._links[pipe.towards_server]
        start = max(now, link.free_at)
        link.free_at = start + (len(data) / link.rate if link.rate else 0.0)
        link.queued += len(data)
        pipe.queued += len(data)
        pipe.due.append((link.free_at + self.delay, data))

    def _release(self, pipe: _Pipe, now: float) -> None:
        link = self._links[pipe.towards_server]
        while pipe.due and pipe.due[0][0] <= now:
            _, data = pipe.due.popleft()
            pipe.out += data
            link.queued -= len(data)
            pipe.queued -= len(data)
        if pipe.eof and not pipe.due and not pipe.out and not pipe.shut:
            pipe.shut = True
            with contextlib.suppress(OSError):
                pipe.dst.shutdown(socket.SHUT_WR)
            if all(p.shut for p in self._pipes if p.src in (pipe.src, pipe.dst)):
                self._drop(pipe, abort=False)

    def _write(self, pipe: _Pipe) -> None:
        try:
            sent = pipe.dst.send(pipe.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(pipe)
            return
        del pipe.out[:sent]
        with self._lock:
            if pipe.towards_server:
                self.bytes_to_server += sent
            else:
                self.bytes_to_client += sent

    def _cut_if_due(self) -> None:
        with self._lock:
            due = self._cut_now or (self._cut_at is not None and self.bytes_to_server >= self._cut_at)
            if due:
                self._cut_now, self._cut_at = False, None
        if due and self._pipes:
            self.cuts += 1
            for pipe in list(self._pipes):
                self._drop(pipe)

    def _drop(self, pipe: _Pipe, abort: bool = True) -> None:
        """Close both sockets of pipe's connection (abort: with a reset) and forget both directions."""
        ends = (pipe.src, pipe.dst)
        for other in [p for p in self._pipes if p.src in ends]:
            self._pipes.remove(other)
            self._links[other.towards_server].queued -= other.queued
        for sock in ends:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
            _close(sock, abort)


def _close(sock: socket.socket, abort: bool) -> None:
    if abort:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
