"""Pipelined SFTP requests: send one step for many files, then read every reply.

A small file costs four round trips (open, write + close, stat, rename). Done one file at a time
through paramiko that is about 2 ms per file on loopback, most of it waiting for thread hand-offs,
so a burst of small files is bound by latency, not by bytes. SFTP lets a client keep many requests
outstanding (draft-ietf-secsh-filexfer-02, section 6), and paramiko itself pipelines writes and
read-ahead this way (`SFTPFile.set_pipelined`, `SFTPFile.prefetch`): its `_async_request` sends a
request and `_read_response` reads replies and hands each to the object registered for it. This
module uses those two methods to send a whole step for a batch of files at once; the protocol
itself stays paramiko's. Each reply is matched to its request, and an error status becomes that
file's OSError, so one file's refusal never fails the others.
"""

from __future__ import annotations

import contextlib
import errno
import math
import struct
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import paramiko
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_EXTENDED,
    CMD_HANDLE,
    CMD_OPEN,
    CMD_RENAME,
    CMD_STATUS,
    SFTP_FLAG_CREATE,
    SFTP_FLAG_TRUNC,
    SFTP_FLAG_WRITE,
)

RECEIVE_CHUNK = 64 * 1024  # the most one channel read takes
CORK_FLUSH_BYTES = 16 * 1024  # held requests are sent on once they fill about half an SSH packet
Request = tuple[int, tuple[Any, ...]]  # (SFTP packet type, its arguments after the request id)


@dataclass(frozen=True)
class Reply:
    kind: int  # SFTP packet type of the reply
    message: paramiko.Message | None  # its body after the request id; None for an OK status
    error: OSError | None  # what an error status means, as paramiko itself would raise it


class PipelinedSFTPClient(paramiko.SFTPClient):  # type: ignore[misc]
    """paramiko's SFTP client that holds back the requests made inside `corked()` and writes them
    to the channel in runs of about CORK_FLUSH_BYTES (and the rest when the block ends).

    paramiko sends every SFTP request as an SSH packet of its own (one encryption, one socket write,
    about 35 us on loopback): 1,000 small files make 5,000 of them. Written in runs, the channel
    packs the same requests into a few packets of up to its maximum packet size, and the server
    starts on the first run while the next is built; the SFTP stream the server reads is byte for
    byte the same. Replies are read through a buffer the same way round (`_read_all`).
    """

    def __init__(self, sock: paramiko.Channel) -> None:
        self._held: list[bytes] | None = None  # set first: the base class sends its INIT at once
        self._held_bytes = 0
        self._received = bytearray()  # read from the channel, not yet taken by _read_all
        # the shortest wait seen between sending a step's requests and its first reply (seconds): about
        # the round trip to the server, which tells whether the link or this process is the bottleneck
        self.quickest_reply = math.inf
        super().__init__(sock)
        # request id -> who takes its reply: a plain dict, not paramiko's WeakValueDictionary (a weak
        # reference made and dropped per request, five per small file). What it holds is released when
        # the reply is read, and with the client when the connection is dropped.
        self._expecting: dict[int, Any] = {}

    def _read_all(self, n: int) -> bytes:
        """paramiko's `_read_all` through a buffer: one channel read takes every reply that has
        arrived, instead of two reads (length, then body) per reply."""
        received = self._received
        while len(received) < n:
            chunk = self.sock.recv(max(n - len(received), RECEIVE_CHUNK))
            if not chunk:
                raise EOFError()
            received += chunk
        out = bytes(received[:n])
        del received[:n]
        return out

    def _send_packet(self, t: int, packet: paramiko.Message) -> None:
        if self._held is None:
            super()._send_packet(t, packet)
            return
        body = packet.asbytes()
        self._held.append(struct.pack(">IB", len(body) + 1, t) + body)
        self._held_bytes += len(body) + 5
        if self._held_bytes >= CORK_FLUSH_BYTES:  # the server starts on these while more are built
            self._flush()

    def _flush(self) -> None:
        if self._held:
            self._write_all(b"".join(self._held))
            self._held.clear()
        self._held_bytes = 0

    def response_ready(self) -> bool:
        """A whole reply has arrived, so reading it does not wait for the server (what is waiting in
        the channel is moved into the buffer without blocking)."""
        received = self._received
        for _ in range(2):  # the buffer, then once more after taking what the channel holds
            if len(received) >= 4 and len(received) >= 4 + struct.unpack(">I", received[:4])[0]:
                return True
            if not self.sock.recv_ready():
                return False
            chunk = self.sock.recv(RECEIVE_CHUNK)  # does not block: data is waiting
            if not chunk:
                return False  # EOF: the next blocking read reports it
            received += chunk
        return len(received) >= 4 and len(received) >= 4 + struct.unpack(">I", received[:4])[0]

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """Requests made in this block go out in runs; the last run when it ends (not if it raises:
        the caller then drops the connection, as after any fault mid-exchange). Inside another
        corked block (an exchange while a batch's WRITEs are held) it sends what is held when it
        ends and leaves the outer block corked."""
        outer = self._held is not None
        if not outer:
            self._held, self._held_bytes = [], 0
        try:
            yield
            self._flush()
        finally:
            if not outer:
                self._held = None


class ReplyCollector:
    """Collects the replies `SFTPClient._read_response` hands over, by request id (any order)."""

    def __init__(self) -> None:
        self.by_number: dict[int, tuple[int, paramiko.Message]] = {}

    def _async_response(self, kind: int, message: paramiko.Message, number: int) -> None:
        self.by_number[number] = (kind, message)

    def take(self) -> list[tuple[int, tuple[int, paramiko.Message]]]:
        """The replies collected so far (request id, (kind, message)), handed over once."""
        taken = list(self.by_number.items())
        self.by_number.clear()
        return taken


def flush_held(sftp: paramiko.SFTPClient) -> None:
    """Send requests a corked client still holds (before waiting for their replies)."""
    if isinstance(sftp, PipelinedSFTPClient):
        sftp._flush()


def exchange(sftp: paramiko.SFTPClient, requests: Sequence[Request]) -> list[Reply]:
    """Send every request, then read until each has its reply; replies in request order.

    A connection fault (paramiko.SSHException, EOFError, socket errors) is raised as it comes:
    the caller treats the whole batch as interrupted. The caller bounds the bytes in flight.
    """
    replies = ReplyCollector()
    cork = sftp.corked() if isinstance(sftp, PipelinedSFTPClient) else contextlib.nullcontext()
    with cork:
        numbers = [sftp._async_request(replies, kind, *args) for kind, args in requests]
    sent = time.perf_counter()
    first = True
    while len(replies.by_number) < len(numbers):
        sftp._read_response()
        if first and isinstance(sftp, PipelinedSFTPClient):
            first = False
            sftp.quickest_reply = min(sftp.quickest_reply, time.perf_counter() - sent)
    return [_reply(sftp, *replies.by_number.pop(number)) for number in numbers]


def _reply(sftp: paramiko.SFTPClient, kind: int, message: paramiko.Message) -> Reply:
    if kind != CMD_STATUS:
        return Reply(kind, message, None)
    return Reply(kind, None, reply_error(sftp, kind, message))


def reply_error(sftp: paramiko.SFTPClient, kind: int, message: paramiko.Message) -> OSError | None:
    """What a reply means as paramiko would raise it: None for OK (or a non-status reply)."""
    if kind != CMD_STATUS:
        return None
    try:
        sftp._convert_status(message)
    except EOFError as exc:
        return OSError(str(exc))
    except OSError as exc:
        return exc
    return None


def open_for_writing(sftp: paramiko.SFTPClient, paths: Sequence[str],
                     existing: Collection[str] = ()) -> list[bytes | OSError]:
    """Create or truncate each path for writing, except those in `existing`, which are opened as
    they are (and must exist: a resumed upload); its handle, or why the server refused."""
    fresh = SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC
    replies = exchange(sftp, [(CMD_OPEN, (path, SFTP_FLAG_WRITE if path in existing else fresh,
                                          paramiko.SFTPAttributes())) for path in paths])
    results: list[bytes | OSError] = []
    for reply in replies:
        if reply.error is None and reply.kind == CMD_HANDLE and reply.message is not None:
            results.append(reply.message.get_binary())
        else:
            results.append(reply.error or OSError(f"unexpected reply {reply.kind} to open"))
    return results


def reply_size(reply: Reply) -> int | OSError:
    if reply.kind == CMD_ATTRS and reply.message is not None:
        size = paramiko.SFTPAttributes._from_msg(reply.message).st_size
        return int(size) if size is not None else OSError("the server gave no size")
    return OSError(f"unexpected reply {reply.kind} to a size request")


def renames(sftp: paramiko.SFTPClient, pairs: Sequence[tuple[str, str]]) -> list[OSError | None]:
    """Publish each (temporary, final) pair: posix-rename, and plain rename where the server does
    not have posix-rename or refuses the request (a refusal without errno, or permission denied
    from a server that denies the extension). Plain SFTP rename never replaces an existing name.
    Per pair None when done, else the error of the last try."""
    from agent.transport.sftp import mark_no_posix_rename, posix_rename_supported  # sftp imports this module

    results: list[OSError | None]
    if posix_rename_supported(sftp):
        results = [reply.error for reply in exchange(
            sftp, [(CMD_EXTENDED, ("posix-rename@openssh.com", old, new)) for old, new in pairs])]
    else:  # not offered, or refused before on this connection
        results = [OSError("posix-rename not used")] * len(pairs)
    again = [index for index, error in enumerate(results)
             if error is not None and error.errno in (None, errno.EACCES, errno.EPERM)]
    if again:
        plain = exchange(sftp, [(CMD_RENAME, pairs[index]) for index in again])
        for index, reply in zip(again, plain, strict=True):
            results[index] = reply.error
        if posix_rename_supported(sftp) and any(reply.error is None for reply in plain):
            mark_no_posix_rename(sftp)  # plain rename works where posix-rename was refused
    return results
