"""Upload: publish each queued file atomically under its fixed remote name.

Order for one file: the journal says UPLOADING before the first byte; the bytes go to a hidden
temporary name; the remote size is checked; a rename publishes the final name; the journal says
UPLOADED; the local copy is archived. A file found UPLOADING at the next attempt (a crash or a
fault came in between) is first looked up remotely, so it is never published twice.
"""

from __future__ import annotations

import errno
import os
import posixpath
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
from loguru import logger

from agent import sftp_batch
from agent.archive import Filer
from agent.config import Config
from agent.journal import FINAL_STATES, FileRecord, FileState, Journal
from agent.sftp import (
    SFTP_WRITE_CHUNK,
    ConnectError,
    PrivateKeyError,
    SftpSession,
    publish_rename,
    remote_size,
)

LOCAL_FAULT_PAUSE_SECONDS = 5.0
BATCH_FILE_MAX_BYTES = 256 * 1024  # files up to this size are sent together (upload.batch_files)
BATCH_MAX_BYTES = 4 * 1024 * 1024  # bytes of one batch in flight at most
SPARE_CONNECTION_WAIT = 0.1  # seconds work waits for a busy connection before another is opened


class PermanentUploadError(Exception):
    """Retrying cannot fix this; the file goes to failed/ with this message."""


def temporary_name(remote_name: str) -> str:
    """Hidden, and not starting with an import prefix, so the server never takes it half-written."""
    return f".{remote_name}.part"


def backoff_delay(attempts: int, initial: float, cap: float) -> float:
    """Capped exponential backoff with jitter: between half and all of min(cap, initial * 2^(n-1))."""
    ceiling = min(cap, initial * 2.0 ** max(0, attempts - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class Uploader:
    def __init__(self, config: Config, journal: Journal, filer: Filer, session: SftpSession) -> None:
        self.config = config
        self.journal = journal
        self.filer = filer
        self._default_session = session
        self._local = threading.local()  # upload.concurrency: each worker thread binds its own session
        self.stop_requested = threading.Event()
        self._connection_retry_at = 0.0
        self.heartbeat: Callable[[], None] = _no_heartbeat  # systemd watchdog ping: progress is made
        # what follows a verified upload: archive now, or leave it to the status job (agent.lifecycle)
        self.after_upload: Callable[[FileRecord], FileRecord] = filer.archive
        self.on_published: Callable[[FileRecord, float], None] | None = None  # metrics: upload seconds
        # the batch path (process_batch): with no status tracking, "uploaded" and the archive intent
        # are one commit and the batch is filed together; after_archive then runs per file (compress)
        self.archive_on_publish = True
        self.after_archive: Callable[[FileRecord], FileRecord] = _unchanged

    @property
    def session(self) -> SftpSession:
        """The SFTP session of the calling upload thread (`bind_session`), else the default one."""
        bound: SftpSession | None = getattr(self._local, "session", None)
        return bound if bound is not None else self._default_session

    def bind_session(self, session: SftpSession | None) -> None:
        """Use `session` for what this thread sends now (None: the default session again)."""
        self._local.session = session

    @property
    def remote_dir(self) -> str:
        return self.config.sftp.remote_dir

    def process(self, record: FileRecord) -> FileRecord:
        """One attempt at one file; any error becomes a retry or a refusal, never an exception."""
        try:
            if record.state == FileState.UPLOADED:
                return self.after_upload(record)
            record = self._publish(record)
            return self.after_upload(record)
        except PermanentUploadError as exc:
            return self.filer.quarantine(self.journal.get(record.id), str(exc))
        except Exception as exc:  # noqa: BLE001 - every other fault is retried; the file stays queued
            return self._retry_later(self.journal.get(record.id), exc)

    def process_batch(self, records: list[FileRecord]) -> list[FileRecord]:
        """One attempt at several small `queued` files over this thread's connection.

        The steps are the single-file path's (uploading, temp name, size check, publishing,
        rename, uploaded), each sent for every file before any reply is read (agent.sftp_batch) and
        each committed once for the batch. A file whose own step fails is left in the state it
        reached and gets a single-file attempt after the batch (`process`: resume, classify, retry
        or refuse), so every fault keeps the meaning it has there. A connection fault makes every
        file not yet published retry later, as it would one file.
        """
        if len(records) == 1:
            return [self.process(records[0])]
        results: dict[int, FileRecord] = {}
        redo: list[int] = []
        try:
            self._publish_batch(records, results, redo)
        except Exception as exc:  # noqa: BLE001 - as in `process`: the files stay queued and retry
            for record in records:
                if record.id in results:
                    continue
                current = self.journal.get(record.id)
                if current.state in FINAL_STATES:  # filed before the fault (finish_moves records those)
                    results[record.id] = current
                    continue
                with logger.contextualize(file_id=record.id, file=record.name):
                    results[record.id] = self._retry_later(current, exc)
            redo.clear()
        for file_id in redo:
            record = self.journal.get(file_id)
            with logger.contextualize(file_id=record.id, file=record.name):
                results[file_id] = self.process(record)
        return [results[record.id] for record in records]

    def _publish_batch(self, records: list[FileRecord], results: dict[int, FileRecord],
                       redo: list[int]) -> None:
        """The batch's steps; fills `results` with each file done and `redo` with each to try alone."""
        sftp = self._client()
        started = time.monotonic()
        contents = {}
        for record in records:
            content = _read_claimed(Path(record.local_path))
            if content is None or len(content) != record.size:
                redo.append(record.id)  # the single-file path says what is wrong with it
            else:
                contents[record.id] = content
        finals = {record.id: posixpath.join(self.remote_dir, str(record.remote_name)) for record in records}
        temps = {record.id: posixpath.join(self.remote_dir, temporary_name(str(record.remote_name)))
                 for record in records}
        batch = [record for record in records if record.id in contents]
        self.journal.update_many([(record.id, f"sending to {finals[record.id]}",
                                   {"state": FileState.UPLOADING}) for record in batch], fetch=False)

        def keep(ok: list[bool]) -> list[FileRecord]:
            for record, fine in zip(batch, ok, strict=True):
                if not fine:
                    redo.append(record.id)
            self.heartbeat()  # each step is progress (systemd watchdog)
            self._check_stop()
            return [record for record, fine in zip(batch, ok, strict=True) if fine]

        handles = sftp_batch.open_for_writing(sftp, [temps[record.id] for record in batch])
        batch = keep([not isinstance(handle, OSError) for handle in handles])
        sizes = sftp_batch.write_and_close(sftp, [h for h in handles if not isinstance(h, OSError)],
                                           [contents[record.id] for record in batch],
                                           self.session.write_request_size(sftp))
        batch = keep([size == record.size for size, record in zip(sizes, batch, strict=True)])
        self.journal.update_many([(record.id, f"renaming to {finals[record.id]}",
                                   {"state": FileState.PUBLISHING}) for record in batch], fetch=False)
        errors = sftp_batch.renames(sftp, [(temps[record.id], finals[record.id]) for record in batch])
        batch = keep([error is None for error in errors])
        elapsed = time.monotonic() - started
        for record in batch:
            logger.bind(file_id=record.id, file=record.name).info(
                "{} uploaded as {} ({} bytes in {:.2f} s, {} sent together)", record.label,
                finals[record.id], record.size, elapsed, len(records))
            if self.on_published is not None:  # metrics: each file's share of the batch's time
                self.on_published(record, elapsed / len(batch))
        published: dict[str, Any] = {"state": FileState.UPLOADED, "error": None}
        if not self.archive_on_publish:
            for record in self.journal.update_many([(record.id, f"published as {finals[record.id]}",
                                                     published) for record in batch]):
                with logger.contextualize(file_id=record.id, file=record.name):
                    results[record.id] = self.after_upload(record)
            return
        # "uploaded" and the archive intent in one commit: recovery finishes the move (resume_move)
        batch = self.journal.update_many([
            (record.id, f"published as {finals[record.id]}",
             {**published, "pending_path": self.filer.archive_destination(record),
              "pending_state": FileState.ARCHIVED}) for record in batch])
        for record in self.filer.finish_moves(batch):
            logger.bind(file_id=record.id, file=record.name).info(
                "{} archived to {}", record.label, record.local_path)
            with logger.contextualize(file_id=record.id, file=record.name):
                results[record.id] = self.after_archive(record)

    def _check_stop(self) -> None:
        if self.stop_requested.is_set():
            raise InterruptedError("stopping: upload abandoned, it restarts at next start")

    def _publish(self, record: FileRecord) -> FileRecord:
        assert record.remote_name and record.size is not None
        final = posixpath.join(self.remote_dir, record.remote_name)
        temp = posixpath.join(self.remote_dir, temporary_name(record.remote_name))
        sftp = self._client()
        if record.state in (FileState.UPLOADING, FileState.PUBLISHING):
            done = self._resume(sftp, record, temp, final)
            if done is not None:
                return done
        else:
            record = self.journal.update(record.id, state=FileState.UPLOADING,
                                         message=f"sending to {final}")
        started = time.monotonic()
        self._send(sftp, Path(record.local_path), temp, record)
        sent = remote_size(sftp, temp)
        if sent != record.size:
            raise OSError(
                f"the server kept {sent} of {record.size} bytes of {temp} (is its disk full?);"
                " sending again"
            )
        record = self.journal.update(record.id, state=FileState.PUBLISHING, message=f"renaming to {final}")
        self._rename(sftp, record, temp, final)
        elapsed = time.monotonic() - started
        logger.info("{} uploaded as {} ({} bytes in {:.2f} s)", record.label, final, record.size, elapsed)
        if self.on_published is not None:
            self.on_published(record, elapsed)
        return self.journal.update(record.id, state=FileState.UPLOADED, error=None,
                                   message=f"published as {final}")

    def _resume(self, sftp: paramiko.SFTPClient, record: FileRecord, temp: str,
                final: str) -> FileRecord | None:
        """An earlier attempt got at least as far as sending: look at the server before sending again.

        Returns the record once it is published, or None when the file must be sent (again).
        """
        found = remote_size(sftp, final)
        if found == record.size:
            logger.info("{} was already published as {}; not sending it again", record.label, final)
            return self.journal.update(record.id, state=FileState.UPLOADED, error=None,
                                       message="found published on the server")
        if found is not None:
            raise PermanentUploadError(
                f"the server already has {final} with {found} bytes, not the {record.size} of this"
                " file; refusing to overwrite it"
            )
        partial = remote_size(sftp, temp)
        if record.state == FileState.PUBLISHING:
            if partial == record.size:  # complete and checked; only the rename was cut short
                self._rename(sftp, record, temp, final)
                return self.journal.update(record.id, state=FileState.UPLOADED, error=None,
                                           message=f"published as {final}")
            if partial is None:  # renamed, and the server has already taken the final name away
                logger.info("{} was renamed to {} and taken by the server; not sending it again",
                            record.label, final)
                return self.journal.update(record.id, state=FileState.UPLOADED, error=None,
                                           message="renamed before the crash; already taken by the server")
        if partial is not None:
            sftp.remove(temp)
        return None

    def _rename(self, sftp: paramiko.SFTPClient, record: FileRecord, temp: str, final: str) -> None:
        try:
            publish_rename(sftp, temp, final)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise PermanentUploadError(
                    f"the server refused the name {record.remote_name} (permission denied on rename)"
                ) from None
            raise

    def _send(self, sftp: paramiko.SFTPClient, local: Path, temp: str, record: FileRecord) -> None:
        try:
            fd = os.open(local, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise PermanentUploadError(
                f"the claimed copy {local} could not be read ({exc.strerror}); it was not sent"
            ) from None
        with os.fdopen(fd, "rb") as reader:
            request_size = self.session.write_request_size(sftp)  # limits@openssh.com, else 32 KiB
            try:
                remote = sftp.open(temp, "wb", bufsize=0)
                remote.MAX_REQUEST_SIZE = request_size  # paramiko's per-WRITE cap, for this file only
            except OSError as exc:
                if exc.errno == errno.EACCES:
                    raise PermanentUploadError(
                        f"the server denied writing {temp} (permission denied); check that"
                        f" remote_dir {self.remote_dir!r} is the upload folder for this tenant"
                    ) from None
                raise
            limit = self.config.sftp.bandwidth_limit
            chunk_size = min(SFTP_WRITE_CHUNK * 8, max(1024, limit // 4)) if limit else SFTP_WRITE_CHUNK * 8
            started, sent = time.monotonic(), 0
            with remote:
                remote.set_pipelined(True)
                while chunk := reader.read(chunk_size):
                    if self.stop_requested.is_set():
                        raise InterruptedError("stopping: upload abandoned, it restarts at next start")
                    remote.write(chunk)
                    sent += len(chunk)
                    self.heartbeat()
                    if limit:  # sftp.bandwidth_limit: never ahead of limit bytes per second on average
                        self.stop_requested.wait(max(0.0, sent / limit - (time.monotonic() - started)))

    def _client(self) -> paramiko.SFTPClient:
        try:
            return self.session.client()
        except PrivateKeyError as exc:
            raise ConnectError(str(exc)) from None

    def _retry_later(self, record: FileRecord, exc: BaseException) -> FileRecord:
        if not isinstance(exc, (ConnectError, PermanentUploadError)):
            self.session.drop()  # the connection may be in any state after a fault mid-operation
        reason = _describe_fault(exc)
        attempts = record.attempts + 1
        delay = backoff_delay(attempts, self.config.retry.initial_delay_seconds,
                              self.config.retry.max_delay_seconds)
        if isinstance(exc, ConnectError):
            self._connection_retry_at = time.time() + delay
        if isinstance(exc, InterruptedError):
            delay = 0.0
        logger.warning("{} not uploaded (attempt {}): {}; retrying in {:.1f} s", record.label, attempts,
                       reason, delay)
        return self.journal.update(record.id, attempts=attempts, error=reason,
                                   next_attempt_at=time.time() + delay, message=f"retry: {reason}")

    def wait_for_connection_slot(self) -> float:
        """Seconds to hold off every file after a connection fault, so N files make one attempt."""
        return max(0.0, self._connection_retry_at - time.time())


def _no_heartbeat() -> None:
    return None


def _unchanged(record: FileRecord) -> FileRecord:
    return record


def _read_claimed(path: Path) -> bytes | None:
    """The whole of a small claimed file (never through a link), or None when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, BATCH_MAX_BYTES):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _describe_fault(exc: BaseException) -> str:
    if isinstance(exc, (ConnectError, InterruptedError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({type(exc).__name__})"
    text = str(exc) or type(exc).__name__
    return f"{text} ({type(exc).__name__})"


class SessionPool:
    """The upload threads' SFTP sessions (one per thread), lent out per file or batch.

    A thread with work takes a connected session when one is free. When every session in use is
    busy it waits up to SPARE_CONNECTION_WAIT for one to come back before it opens another SSH
    connection (and for as long as a connection opened ahead takes): where a batch takes longer
    than that (a slow link, a large file, a burst) more connections open, up to `upload.concurrency`;
    where one connection keeps up (a trickle of files) the others are never opened.
    """

    def __init__(self, sessions: list[SftpSession], connect_timeout: float,
                 spare_wait: float = SPARE_CONNECTION_WAIT) -> None:
        self._free = list(sessions)
        self._spare_wait = spare_wait
        self._lent = 0  # sessions in use by a thread (busy, or being connected)
        self._connecting = 0  # of those, being connected by connect_ahead()
        self._connect_timeout = connect_timeout
        self.closed = False
        self._cond = threading.Condition()

    def connect_ahead(self) -> None:
        """Open a connection for a free session that has none, before any file needs it."""
        with self._cond:
            session = self._take(connected=False)
            self._connecting += 1
        try:
            session.client()
        except Exception as exc:  # noqa: BLE001 - the first file's attempt retries and reports it
            logger.debug("connecting ahead of the first file failed: {}", exc)
        finally:
            with self._cond:
                self._connecting -= 1
            self.release(session)

    def acquire(self) -> SftpSession:
        """A free session: a connected one; else, once the wait above is over, one to connect."""
        now = time.monotonic()
        spare_at, connect_deadline = now + self._spare_wait, now + self._connect_timeout
        with self._cond:
            while not self.closed and not any(session.connected for session in self._free):
                now = time.monotonic()
                until = connect_deadline if self._connecting else spare_at if self._lent else now
                if now >= until:
                    break
                self._cond.wait(until - now)
            if self.closed:
                raise InterruptedError("stopping: the upload sessions are closed")
            return self._take(connected=True)

    def _take(self, connected: bool) -> SftpSession:
        """A free session, connected as asked if there is one (called with the lock held)."""
        # never empty: each thread holds at most one session and there is one per thread
        index = next((i for i, session in enumerate(self._free) if session.connected == connected), 0)
        self._lent += 1
        return self._free.pop(index)

    def release(self, session: SftpSession) -> None:
        with self._cond:
            self._lent -= 1
            if not self.closed:
                self._free.append(session)
                self._cond.notify_all()
                return
        session.close()  # lent out when the pool closed: closed by the thread that had it

    def close(self) -> None:
        """Close the free sessions now, and each lent one when it is given back (a thread stuck in
        a connect or a transfer is not waited for)."""
        with self._cond:
            self.closed = True
            free, self._free = self._free, []
            self._cond.notify_all()
        for session in free:
            session.close()


class UploadWorker:
    """The upload threads (`upload.concurrency`, each with its own SFTP session) draining the queue.

    Each thread takes the oldest due file that no other thread holds: `_take` asks the journal with
    the held ids excluded and adds the answer to them under one lock, so a file is handed to exactly
    one thread at a time. Thread 1 uses the uploader's session; the others open their own.
    """

    def __init__(self, uploader: Uploader, journal: Journal, concurrency: int = 1) -> None:
        self.uploader = uploader
        self.journal = journal
        self.concurrency = max(1, concurrency)
        self._cond = threading.Condition()  # wake(): a generation count, so no thread misses a wake-up
        self._generation = 0
        self._claim_lock = threading.Lock()
        self._claimed: set[int] = set()  # journal ids a thread is working on
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True,
                                          name="upload" if index == 0 else f"upload-{index + 1}")
                         for index in range(self.concurrency)]
        self.busy = threading.Event()  # set while any thread holds a file
        self.heartbeat_interval: float | None = None  # wake at least this often to ping the watchdog
        self.preconnect = False  # `run --once`: one connection opens while intake checks the first files
        config = uploader.config.sftp
        self._sessions = SessionPool([uploader.session] + [SftpSession(config)
                                                           for _ in range(self.concurrency - 1)],
                                     config.connect_timeout)
        # upload.batch_files; one at a time under sftp.bandwidth_limit (the batch path does not pace)
        self.batch_files = 1 if uploader.config.sftp.bandwidth_limit else uploader.config.upload.batch_files

    def wake(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float) -> bool:
        """Ask every upload thread to stop; True when all did within the timeout."""
        self.uploader.stop_requested.set()
        self._sessions.close()  # the idle connections now; one in use when its thread gives it back
        self.wake()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _wait(self, seen: int, timeout: float | None) -> None:
        """Sleep until `wake()` (unless one came since `seen` was read) or the timeout."""
        interval = self.heartbeat_interval
        if interval is not None:
            timeout = interval if timeout is None else min(timeout, interval)
        with self._cond:
            if self._generation == seen and not self.uploader.stop_requested.is_set():
                self._cond.wait(timeout)

    def _take(self) -> tuple[list[FileRecord], float | None]:
        """The oldest due file no other thread holds, with the small queued files after it (batch),
        now held by this one; else nothing and when a file falls due."""
        with self._claim_lock:
            record, next_due = self.journal.next_sendable(exclude=self._claimed)
            if record is None:
                return [], next_due
            batch = [record]
            if (self.batch_files > 1 and record.state == FileState.QUEUED
                    and (record.size or 0) <= BATCH_FILE_MAX_BYTES):
                batch, total = [], 0
                for candidate in self.journal.queued_after(record, self.batch_files, BATCH_FILE_MAX_BYTES,
                                                           exclude=self._claimed):
                    total += candidate.size or 0
                    if batch and total > BATCH_MAX_BYTES:
                        break
                    batch.append(candidate)
                if not batch or batch[0].id != record.id:  # it changed state in between: send it alone
                    batch = [record]
            self._claimed.update(member.id for member in batch)
            self.busy.set()
        return batch, None

    def _release_all(self, records: list[FileRecord]) -> None:
        for record in records:
            self._release(record.id)

    def _release(self, file_id: int) -> None:
        with self._claim_lock:
            self._claimed.discard(file_id)
            if not self._claimed:
                self.busy.clear()

    def _run(self, index: int) -> None:
        try:
            if index == 0 and self.preconnect:
                self._sessions.connect_ahead()
            self._loop()
        finally:
            self.uploader.bind_session(None)

    def _loop(self) -> None:
        while not self.uploader.stop_requested.is_set():
            self.uploader.heartbeat()
            with self._cond:
                seen = self._generation
            hold = self.uploader.wait_for_connection_slot()
            if hold > 0:
                self._wait(seen, hold)
                continue
            batch, next_due = self._take()
            if not batch:
                self._wait(seen, None if next_due is None else max(0.0, next_due - time.time()))
                continue
            retry = False
            try:
                session = self._sessions.acquire()  # a connected one first (see SessionPool)
            except InterruptedError:  # stopping
                self._release_all(batch)
                break
            self.uploader.bind_session(session)
            try:
                if len(batch) == 1:
                    with logger.contextualize(file_id=batch[0].id, file=batch[0].name):  # log lines name it
                        results = [self.uploader.process(batch[0])]
                else:
                    results = self.uploader.process_batch(batch)
                retry = any(result.next_attempt_at is not None for result in results)
            except Exception:  # noqa: BLE001 - e.g. the journal's disk is full: keep the thread alive
                logger.exception("{} could not be processed; trying again in {:.0f} s",
                                 batch[0].label if len(batch) == 1 else f"a batch of {len(batch)} files",
                                 LOCAL_FAULT_PAUSE_SECONDS)
                self._sessions.release(session)
                self._release_all(batch)
                with self._cond:
                    seen = self._generation  # the pause is not cut short by wake-ups during the attempt
                self._wait(seen, LOCAL_FAULT_PAUSE_SECONDS)
                continue
            self._sessions.release(session)
            self._release_all(batch)
            if retry and self.concurrency > 1:
                self.wake()  # its new due time: threads that were waiting without it look again
