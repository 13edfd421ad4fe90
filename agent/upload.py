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
