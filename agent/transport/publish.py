"""The publish protocol: the steps that put exactly the checked bytes under a final remote name.

One file and a batch of small files take the same steps; a batch sends each step for all of its
files before reading the replies (agent.transport.pipelining). Per file:

1. OPEN the temporary name (derived from the journal row, never from the content).
2. WRITE the local bytes, read as they are sent and hashed on the way. Every WRITE's status is read,
   matched to its request by id (servers may answer pipelined requests out of order), and at most
   WRITE_WINDOW_BYTES are outstanding at a time. `acked` follows the bytes from offset 0 whose every
   WRITE was answered OK; a resumed upload (`resume_from`, at most an earlier attempt's `acked`) opens
   the temporary file without truncating it, hashes the local prefix and writes from there on.
3. Once every WRITE is answered: FSTAT (the size the server holds) and CLOSE.
4. The caller renames only a file whose every step succeeded, whose bytes hash to the checked
   SHA-256 with the checked size, and whose remote size is that size. A file that changed locally
   has its temporary file removed and is never renamed.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import paramiko
from paramiko.sftp import CMD_CLOSE, CMD_FSTAT, CMD_REMOVE, CMD_STAT, CMD_WRITE, int64

from agent.store.journal import FileRecord
from agent.transport import pipelining as sftp_batch

WRITE_WINDOW_BYTES = 4 * 1024 * 1024  # WRITE bytes awaiting their status at most (per connection)
READ_CHUNK = 256 * 1024  # local read size; each read is cut into WRITEs of the server's size


@dataclass
class Upload:
    """One file's passage through the protocol, and what went wrong, if anything."""

    record: FileRecord
    local: str  # the claimed (spool) copy
    temp: str  # remote temporary path
    final: str  # remote final path
    handle: bytes | None = None
    error: OSError | None = None  # the server refused a step (its words)
    step: str = ""  # the step that error belongs to, as "the server refused to <step> <temp>"
    changed: str | None = None  # why the local bytes are not the checked bytes
    unreadable: OSError | None = None  # the local copy could not be read
    sent: int = 0  # bytes read and sent
    remote_size: int | None = None  # the server's FSTAT answer after the writes
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    # resuming: the temporary file's bytes [0, resume_from) are this file's, every WRITE of them
    # answered OK in an earlier attempt; they are hashed locally, not sent again
    resume_from: int = 0
    written: int = 0  # end offset of the last WRITE sent
    acked: int = 0  # every WRITE below this offset was answered OK (none refused)
    local_stamp: tuple[int, int, int] | None = None  # the local copy's (size, mtime_ns, inode) when read
    # called after each chunk read and sent (the uploader keeps `acked` in the journal for a resume)
    checkpoint: Callable[[Upload], None] | None = None

    @property
    def wrote(self) -> int:
        """Bytes sent in WRITEs by this attempt (a resumed upload skips its prefix)."""
        return max(0, self.written - self.resume_from)

    @property
    def complete(self) -> bool:
        """Every step done and the server holds exactly the checked bytes' count."""
        return (self.error is None and self.changed is None and self.unreadable is None
                and self.remote_size == self.record.size)


class Pacer:
    """What the write loop asks between two chunks: stop?, ping the watchdog, keep to the bandwidth."""

    def __init__(self, stop: Callable[[], bool], heartbeat: Callable[[], None], limit: int,
                 wait: Callable[[float], object]) -> None:
        self._stop = stop
        self._heartbeat = heartbeat
        self.limit = limit  # bytes per second; 0: no limit
        self._wait = wait
        self._started = time.monotonic()
        self._sent = 0

    def read_size(self) -> int:
        """Bytes to read at a time: under a bandwidth limit a quarter second of it, so pacing is smooth."""
        return min(READ_CHUNK, max(1024, self.limit // 4)) if self.limit else READ_CHUNK

    def after(self, sent: int) -> None:
        if self._stop():
            raise InterruptedError("stopping: upload abandoned, it restarts at next start")
        self._heartbeat()
        self._sent += sent
        if self.limit:  # never ahead of limit bytes per second on average
            self._wait(max(0.0, self._sent / self.limit - (time.monotonic() - self._started)))


def open_all(sftp: paramiko.SFTPClient, uploads: Sequence[Upload]) -> None:
    """OPEN every temporary name (created or truncated; a resumed one as it is); a refusal is that
    file's error."""
    existing = {upload.temp for upload in uploads if upload.resume_from}
    for upload, result in zip(uploads, sftp_batch.open_for_writing(sftp, [u.temp for u in uploads], existing),
                              strict=True):
        if isinstance(result, OSError):
            upload.error, upload.step = result, "open"
        else:
            upload.handle = result


def write_all(sftp: paramiko.SFTPClient, uploads: Sequence[Upload], request_size: int, pacer: Pacer) -> None:
    """WRITE each open file's local bytes, hashing them as they are read, and read every status.

    A connection fault is raised as it comes (the caller drops the connection). A refused WRITE
    stops that file (its error); a local change stops it too (`changed`).
    """
    window = _WriteWindow(sftp)
    for upload in uploads:
        if upload.handle is None:
            continue
        _write_one(sftp, upload, request_size, pacer, window)
    window.drain(0)


def close_all(sftp: paramiko.SFTPClient, uploads: Sequence[Upload]) -> None:
    """FSTAT each file whose writes all succeeded, CLOSE every handle, and remove the temporary file
    of each that must not be published (changed locally, unreadable, or refused mid-way)."""
    requests: list[sftp_batch.Request] = []
    owners: list[tuple[Upload, int]] = []
    for upload in uploads:
        if upload.handle is None:
            continue
        if upload.error is None and upload.changed is None and upload.unreadable is None:
            requests.append((CMD_FSTAT, (upload.handle,)))
            owners.append((upload, CMD_FSTAT))
        requests.append((CMD_CLOSE, (upload.handle,)))
        owners.append((upload, CMD_CLOSE))
    for (upload, kind), reply in zip(owners, sftp_batch.exchange(sftp, requests), strict=True):
        if reply.error is not None:
            if upload.error is None:
                upload.step = "close" if kind == CMD_CLOSE else "report the size of"
                upload.error = reply.error
        elif kind == CMD_FSTAT:
            size = sftp_batch.reply_size(reply)
            if isinstance(size, OSError):
                upload.error, upload.step = size, "report the size of"
            else:
                upload.remote_size = size
        upload.handle = None
    unsized = [upload for upload in uploads if upload.step == "report the size of"]
    if unsized:  # a server without FSTAT: the size by path, now that the file is closed
        for upload, reply in zip(unsized, sftp_batch.exchange(sftp, [(CMD_STAT, (u.temp,)) for u in unsized]),
                                 strict=True):
            size = reply.error or sftp_batch.reply_size(reply)
            if not isinstance(size, OSError):
                upload.error, upload.step, upload.remote_size = None, "", size
    doomed = [upload for upload in uploads if upload.changed is not None or upload.unreadable is not None]
    if doomed:  # never leave a temporary file of bytes that must not be published
        sftp_batch.exchange(sftp, [(CMD_REMOVE, (upload.temp,)) for upload in doomed])


class _WriteWindow:
    """WRITE requests awaiting their status, by request id: at most WRITE_WINDOW_BYTES of them."""

    def __init__(self, sftp: paramiko.SFTPClient) -> None:
        self.sftp = sftp
        self.replies = sftp_batch.ReplyCollector()
        self.pending: dict[int, tuple[Upload, int, int]] = {}  # request id -> (upload, offset, bytes)
        # per upload (by id()): request id -> offset of its unanswered WRITEs, in the order sent
        self.outstanding: dict[int, dict[int, int]] = {}
        self.bytes = 0

    def send(self, upload: Upload, offset: int, data: bytes) -> None:
        number = self.sftp._async_request(self.replies, CMD_WRITE, upload.handle, int64(offset), data)
        self.pending[number] = (upload, offset, len(data))
        self.outstanding.setdefault(id(upload), {})[number] = offset
        upload.written = offset + len(data)
        self.bytes += len(data)
        if self.bytes > WRITE_WINDOW_BYTES:
            self.drain(WRITE_WINDOW_BYTES // 2)
        else:
            self.collect_arrived()

    def collect_arrived(self) -> None:
        """Read the replies that have already arrived, without waiting for more: `acked` stays within
        a round trip of the server (what a resume may skip), not a window behind."""
        ready = getattr(self.sftp, "response_ready", None)
        if ready is None:
            return
        for _ in range(len(self.pending)):
            if not ready():
                return
            self.sftp._read_response()
            self._settle()

    def drain(self, down_to: int) -> None:
        """Read replies (in whatever order they come) until at most `down_to` bytes are outstanding."""
        sftp_batch.flush_held(self.sftp)
        while self.pending and self.bytes > down_to:
            self.sftp._read_response()
            self._settle()

    def _settle(self) -> None:
        """Match the replies read so far to their WRITEs."""
        for number, (kind, message) in self.replies.take():
            owner = self.pending.pop(number, None)
            if owner is None:
                continue
            upload, offset, size = owner
            self.bytes -= size
            unanswered = self.outstanding[id(upload)]
            del unanswered[number]
            error = sftp_batch.reply_error(self.sftp, kind, message)
            if error is not None and upload.error is None:
                upload.error, upload.step = error, f"write at offset {offset} of"
            elif upload.error is None:  # WRITEs go out in offset order: the first unanswered one
                upload.acked = next(iter(unanswered.values()), upload.written)


def _write_one(sftp: paramiko.SFTPClient, upload: Upload, request_size: int, pacer: Pacer,
               window: _WriteWindow) -> None:
    expected = upload.record.size or 0
    try:
        fd = os.open(upload.local, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        upload.unreadable = exc
        return
    try:
        before = os.fstat(fd)
        upload.local_stamp = (before.st_size, before.st_mtime_ns, before.st_ino)
        if upload.resume_from:
            _hash_prefix(fd, upload, pacer)
            if upload.changed is not None:
                return
        chunk = pacer.read_size()
        while upload.error is None:
            data = os.read(fd, chunk)
            if not data:
                break
            if upload.sent + len(data) > expected:
                upload.changed = f"it now holds more than the {expected} bytes that were checked"
                return
            upload.digest.update(data)
            view = memoryview(data)
            for start in range(0, len(data), request_size):
                window.send(upload, upload.sent + start, bytes(view[start:start + request_size]))
            upload.sent += len(data)
            pacer.after(len(data))
            if upload.checkpoint is not None:
                upload.checkpoint(upload)
        after = os.fstat(fd)
    except OSError as exc:
        upload.unreadable = exc
        return
    finally:
        os.close(fd)
    if upload.error is not None:
        return
    upload.changed = changed_since_check(upload.record, upload.sent, upload.digest.hexdigest(),
                                         (before.st_size, before.st_mtime_ns),
                                         (after.st_size, after.st_mtime_ns))


def _hash_prefix(fd: int, upload: Upload, pacer: Pacer) -> None:
    """Read and hash the local bytes [0, resume_from) that an earlier attempt sent (not sent again)."""
    upload.written = upload.acked = upload.resume_from
    for _ in range(upload.resume_from // READ_CHUNK + 2):  # bounded: the prefix, then the short read
        data = os.read(fd, min(READ_CHUNK, upload.resume_from - upload.sent))
        if not data:
            break
        upload.digest.update(data)
        upload.sent += len(data)
    pacer.after(0)  # a stop asked meanwhile; the watchdog
    if upload.sent != upload.resume_from:
        upload.changed = f"it holds fewer than the {upload.resume_from} bytes sent before"


def changed_since_check(record: FileRecord, size: int, sha256: str, before: tuple[int, int],
                        after: tuple[int, int]) -> str | None:
    """Why the bytes just read are not the bytes that were checked, or None when they are."""
    if size != record.size:
        return f"{size} bytes were read, {record.size} were checked"
    if sha256 != record.sha256:
        return f"its SHA-256 is now {sha256[:16]}..., {str(record.sha256)[:16]}... was checked"
    if before != after:
        return "it was written to while it was being sent"
    return None
