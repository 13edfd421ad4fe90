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

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import paramiko
from paramiko.sftp import CMD_CLOSE, CMD_FSTAT, CMD_REMOVE, CMD_STAT, CMD_WRITE, int64

from agent.transport import pipelining as sftp_batch

WRITE_WINDOW_BYTES = 4 * 1024 * 1024  # WRITE bytes awaiting their status at most (per SFTP channel)
LANE_MIN_BYTES = 16 * 1024 * 1024  # a file this large, sent on its own, may use further SFTP channels
WRITE_OVERHEAD = 64  # bytes of an SFTP WRITE request besides its data (header, handle, offset)
READ_CHUNK = 256 * 1024  # local read size; each read is cut into WRITEs of the server's size


@dataclass
class Upload:
    """One file's passage through the protocol, and what went wrong, if anything. It carries the
    checked facts (size, SHA-256) as plain values: the transport knows no journal."""

    file_id: int  # the journal row, for the caller
    size: int  # the checked size
    sha256: str | None  # the checked SHA-256; None while a worker process still checks the file
    local: str  # the claimed (spool) copy
    temp: str  # remote temporary path
    final: str  # remote final path ("" until the check that names the file is done)
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
                and self.remote_size == self.size)


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
        self.on_progress: Callable[[int], None] | None = None  # told the bytes sent so far (status, log)

    def read_size(self) -> int:
        """Bytes to read at a time: under a bandwidth limit a quarter second of it, so pacing is smooth."""
        return min(READ_CHUNK, max(1024, self.limit // 4)) if self.limit else READ_CHUNK

    def after(self, sent: int) -> None:
        if self._stop():
            raise InterruptedError("stopping: upload abandoned, it restarts at next start")
        self._heartbeat()
        self._sent += sent
        if self.on_progress is not None:
            self.on_progress(self._sent)
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


def write_all(sftp: paramiko.SFTPClient, uploads: Sequence[Upload], request_size: int, pacer: Pacer,
              extra_lanes: Callable[[], Sequence[paramiko.SFTPClient]] | None = None) -> None:
    """WRITE each open file's local bytes, hashing them as they are read, and read every status.

    A connection fault is raised as it comes (the caller drops the connection). A refused WRITE
    stops that file (its error); a local change stops it too (`changed`). `extra_lanes`: further
    SFTP channels of the connection a large file may use while the first one's window is full.
    The WRITEs of several (small) files go out in runs (`PipelinedSFTPClient.corked`), not one SSH
    packet each; a run is sent before any wait for replies.
    """
    window = _WriteWindow(sftp, extra_lanes)
    several = len(uploads) > 1 and isinstance(sftp, sftp_batch.PipelinedSFTPClient)
    with sftp.corked() if several else contextlib.nullcontext():
        for upload in uploads:
            if upload.handle is None:
                continue
            _write_one(sftp, upload, request_size, pacer, window)
        window.finish()


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


class _Lane:
    """An SFTP channel a file's WRITEs go over: its client, the replies read from it, and the handle
    each file has on it (the first lane: the handle of `open_all`; the others: opened when first used,
    None when the server refused)."""

    def __init__(self, sftp: paramiko.SFTPClient) -> None:
        self.sftp = sftp
        self.replies = sftp_batch.ReplyCollector()
        self.handles: dict[int, bytes | None] = {}  # id(upload) -> its handle on this channel


class _WriteWindow:
    """WRITE requests awaiting their status, by (lane, request id): at most WRITE_WINDOW_BYTES per
    lane in use.

    A file of LANE_MIN_BYTES or more sent on its own may also use `extra_lanes()`: further SFTP
    channels of the same SSH connection. Each SSH channel has its own flow-control window (OpenSSH
    grants 2 MiB), so on a long fat link one channel carries at most a window per round trip; a WRITE
    goes on the first lane whose window has room for it, so the extra ones carry bytes only while the
    first one is full (never on a link that keeps up). WRITEs still go out in offset order, hashed as
    they are read; `acked` is the first unanswered offset across every lane.
    """

    def __init__(self, sftp: paramiko.SFTPClient,
                 extra_lanes: Callable[[], Sequence[paramiko.SFTPClient]] | None = None) -> None:
        self.lanes = [_Lane(sftp)]
        self._extra_lanes = extra_lanes
        # (lane, request id) -> (upload, offset, bytes)
        self.pending: dict[tuple[int, int], tuple[Upload, int, int]] = {}
        # per upload (by id()): (lane, request id) -> offset of its unanswered WRITEs, in the order sent
        self.outstanding: dict[int, dict[tuple[int, int], int]] = {}
        self.uploads: dict[int, Upload] = {}  # by id()
        self.bytes = 0

    @property
    def limit(self) -> int:
        return WRITE_WINDOW_BYTES * len(self.lanes)

    def send(self, upload: Upload, offset: int, data: bytes) -> None:
        self.uploads[id(upload)] = upload
        index = self._lane_for(upload, len(data))
        lane = self.lanes[index]
        handle = upload.handle if index == 0 else lane.handles[id(upload)]
        number = lane.sftp._async_request(lane.replies, CMD_WRITE, handle, int64(offset), data)
        self.pending[(index, number)] = (upload, offset, len(data))
        self.outstanding.setdefault(id(upload), {})[(index, number)] = offset
        upload.written = offset + len(data)
        self.bytes += len(data)
        if self.bytes > self.limit:
            self.drain(self.limit // 2)
        else:
            self.collect_arrived()

    def _lane_for(self, upload: Upload, size: int) -> int:
        """The first lane whose channel window takes `size` bytes now (opening this file's handle on
        a lane that has none yet); the first lane when none does (its send waits for the window)."""
        if self._extra_lanes is None or upload.size < LANE_MIN_BYTES:
            return 0
        if _window(self.lanes[0].sftp) >= size + WRITE_OVERHEAD:
            return 0
        known = {id(lane.sftp) for lane in self.lanes}
        self.lanes += [_Lane(extra) for extra in self._extra_lanes() if id(extra) not in known]
        for index, lane in enumerate(self.lanes[1:], start=1):
            if id(upload) not in lane.handles:
                [result] = sftp_batch.open_for_writing(lane.sftp, [upload.temp], existing={upload.temp})
                lane.handles[id(upload)] = None if isinstance(result, OSError) else result
            if lane.handles[id(upload)] is not None and _window(lane.sftp) >= size + WRITE_OVERHEAD:
                return index
        return 0

    def collect_arrived(self) -> int:
        """Read the replies that have already arrived, without waiting for more: `acked` stays within
        a round trip of the server (what a resume may skip), not a window behind. How many."""
        taken = 0
        for index, lane in enumerate(self.lanes):
            ready = getattr(lane.sftp, "response_ready", None)
            if ready is None:
                continue
            for _ in range(len(self.pending)):
                if not ready():
                    break
                lane.sftp._read_response()
                taken += self._settle(index)
        return taken

    def drain(self, down_to: int) -> None:
        """Read replies (in whatever order they come) until at most `down_to` bytes are outstanding."""
        for lane in self.lanes:
            sftp_batch.flush_held(lane.sftp)
        for _ in range(2 * len(self.pending) + 2):  # each round reads at least one reply
            if not self.pending or self.bytes <= down_to:
                return
            if len(self.lanes) > 1 and self.collect_arrived():
                continue
            index = next(iter(self.pending))[0]  # wait on the lane of the oldest unanswered WRITE
            self.lanes[index].sftp._read_response()
            self._settle(index)

    def finish(self) -> None:
        """Every reply read; the handles the extra lanes opened are closed (a refusal is the file's)."""
        self.drain(0)
        for lane in self.lanes[1:]:
            owners = [(upload_id, handle) for upload_id, handle in lane.handles.items() if handle is not None]
            replies = sftp_batch.exchange(lane.sftp, [(CMD_CLOSE, (handle,)) for _id, handle in owners])
            for (upload_id, _handle), reply in zip(owners, replies, strict=True):
                upload = self.uploads.get(upload_id)
                if reply.error is not None and upload is not None and upload.error is None:
                    upload.error, upload.step = reply.error, "close"
            lane.handles.clear()

    def _settle(self, index: int) -> int:
        """Match the replies read so far on lane `index` to their WRITEs; how many."""
        taken = 0
        for number, (kind, message) in self.lanes[index].replies.take():
            owner = self.pending.pop((index, number), None)
            if owner is None:
                continue
            taken += 1
            upload, offset, size = owner
            self.bytes -= size
            unanswered = self.outstanding[id(upload)]
            del unanswered[(index, number)]
            error = sftp_batch.reply_error(self.lanes[index].sftp, kind, message)
            if error is not None and upload.error is None:
                upload.error, upload.step = error, f"write at offset {offset} of"
            elif upload.error is None:  # WRITEs go out in offset order: the first unanswered one
                upload.acked = next(iter(unanswered.values()), upload.written)
        return taken


def _window(sftp: paramiko.SFTPClient) -> int:
    """Bytes the SSH channel of `sftp` may send now without waiting for the server's window."""
    channel = sftp.get_channel()
    return int(getattr(channel, "out_window_size", 0)) if channel is not None else 0


def _write_one(sftp: paramiko.SFTPClient, upload: Upload, request_size: int, pacer: Pacer,
               window: _WriteWindow) -> None:
    expected = upload.size
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
    upload.changed = changed_since_check(upload.size, upload.sha256, upload.sent, upload.digest.hexdigest(),
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


def changed_since_check(checked_size: int, checked_sha256: str | None, size: int, sha256: str,
                        before: tuple[int, int], after: tuple[int, int]) -> str | None:
    """Why the bytes just read are not the bytes that were checked, or None when they are (the
    hash is compared by the caller when the check is still running: `checked_sha256` None)."""
    if size != checked_size:
        return f"{size} bytes were read, {checked_size} were checked"
    if checked_sha256 is not None and sha256 != checked_sha256:
        return f"its SHA-256 is now {sha256[:16]}..., {checked_sha256[:16]}... was checked"
    if before != after:
        return "it was written to while it was being sent"
    return None
