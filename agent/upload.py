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

import paramiko
from loguru import logger

from agent.archive import Filer
from agent.config import Config
from agent.journal import FileRecord, FileState, Journal
from agent.sftp import (
    SFTP_WRITE_CHUNK,
    ConnectError,
    PrivateKeyError,
    SftpSession,
    publish_rename,
    remote_size,
)

LOCAL_FAULT_PAUSE_SECONDS = 5.0


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

    @property
    def session(self) -> SftpSession:
        """The SFTP session of the calling upload thread (`bind_session`), else the default one."""
        bound: SftpSession | None = getattr(self._local, "session", None)
        return bound if bound is not None else self._default_session

    def bind_session(self, session: SftpSession) -> None:
        """Use `session` for every file this thread sends (one SSH connection per upload thread)."""
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
            try:
                remote = sftp.open(temp, "wb")
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


def _describe_fault(exc: BaseException) -> str:
    if isinstance(exc, (ConnectError, InterruptedError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({type(exc).__name__})"
    text = str(exc) or type(exc).__name__
    return f"{text} ({type(exc).__name__})"


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
        self.preconnect = False  # `run --once`: the first thread connects while intake checks files

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

    def _take(self) -> tuple[FileRecord | None, float | None]:
        """The oldest due file no other thread holds, now held by this one; else when one falls due."""
        with self._claim_lock:
            record, next_due = self.journal.next_sendable(exclude=self._claimed)
            if record is not None:
                self._claimed.add(record.id)
                self.busy.set()
        return record, next_due

    def _release(self, file_id: int) -> None:
        with self._claim_lock:
            self._claimed.discard(file_id)
            if not self._claimed:
                self.busy.clear()

    def _run(self, index: int) -> None:
        if index > 0:
            self.uploader.bind_session(SftpSession(self.uploader.config.sftp))
        try:
            if index == 0 and self.preconnect:
                try:
                    self.uploader.session.client()
                except Exception as exc:  # noqa: BLE001 - the first file's attempt retries and reports it
                    logger.debug("connecting ahead of the first file failed: {}", exc)
            self._loop()
        finally:
            self.uploader.session.close()

    def _loop(self) -> None:
        while not self.uploader.stop_requested.is_set():
            self.uploader.heartbeat()
            with self._cond:
                seen = self._generation
            hold = self.uploader.wait_for_connection_slot()
            if hold > 0:
                self._wait(seen, hold)
                continue
            record, next_due = self._take()
            if record is None:
                self._wait(seen, None if next_due is None else max(0.0, next_due - time.time()))
                continue
            retry = False
            try:
                with logger.contextualize(file_id=record.id, file=record.name):  # log records name the file
                    retry = self.uploader.process(record).next_attempt_at is not None
            except Exception:  # noqa: BLE001 - e.g. the journal's disk is full: keep the thread alive
                logger.exception("{} could not be processed; trying again in {:.0f} s", record.label,
                                 LOCAL_FAULT_PAUSE_SECONDS)
                self._release(record.id)
                with self._cond:
                    seen = self._generation  # the pause is not cut short by wake-ups during the attempt
                self._wait(seen, LOCAL_FAULT_PAUSE_SECONDS)
                continue
            self._release(record.id)
            if retry and self.concurrency > 1:
                self.wake()  # its new due time: threads that were waiting without it look again
