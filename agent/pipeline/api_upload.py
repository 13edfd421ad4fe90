"""The API route's steps for one file, each journaled before the request that follows it.

`upload.transport = "api"`: the same drop folder, rules, journal, archive and operator commands as
the SFTP route; only the delivery differs (agent/transport/api.py speaks HTTP and knows no journal):

    queued -> uploading -> uploaded -> starting -> processing -> completed -> archived
       (commit)  POST upload  (fileRef)  validate,   (job id)     job(id)      (recordsProcessed)
                              committed  commit,     committed    polled
                                         createJob

Every step is committed before the next request goes out, so a crash or a fault resumes from the
last committed step: `uploading` uploads again (an upload without a job imports nothing),
`uploaded` validates the recorded fileRef again (a read), `processing` polls the recorded job.
`starting` found at the start of an attempt is the one window left: createJob may have been carried
out and its answer was lost (a crash, or a fault after the request went out). The agent never
starts a second job blindly: the file goes to failed/ as `stale` with a reason saying how to check
for the job in the portal, and `saasquatch-agent retry ID` sends it again when there is none.

`attempts` counts the faults of the step the file is at (each step that succeeds starts it again),
so `retry.once_max_attempts` bounds each step of a `run --once`, not the whole way.

Outcomes: validation errors -> failed/ with the server's errors in `.errors.csv`; job `COMPLETED` ->
archived with `recordsProcessed`; a job that failed or was aborted -> failed/ with the server's
word; connection, TLS, 429, 5xx -> retried with the usual backoff (the file keeps its step);
401/403 -> "the API key was refused", retried, all files held off together.
"""

from __future__ import annotations

import csv
import io
import json
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from agent.config import Config, ImportType
from agent.imports.types import job_type
from agent.pipeline.upload import backoff_delay
from agent.store.archive import Filer
from agent.store.journal import FileRecord, FileState, Journal
from agent.transport.api import (
    ApiError,
    ApiKeyError,
    ApiKeyRefused,
    ApiRefused,
    ImportApi,
    api_key_path,
    error_words,
    load_api_key,
)

if TYPE_CHECKING:
    from agent.transport.sftp import SftpSession

# what the upload threads hand this route, oldest first (next_attempt_at paces the job polls)
API_SENDABLE_STATES = (FileState.QUEUED, FileState.UPLOADING, FileState.UPLOADED, FileState.STARTING,
                       FileState.PROCESSING, FileState.COMPLETED)
SUCCESS_WORDS = frozenset({"COMPLETED"})  # the only final word SaaSquatch documents
# final words that say the job did not import the file ("a fatal error leaves the job aborted")
FAILURE_WORDS = frozenset({"FAILED", "FAILURE", "ABORTED", "ERROR", "CANCELLED", "CANCELED", "REJECTED"})
RUNNING_WORDS = frozenset({"IN_PROGRESS", "INPROGRESS", "PROCESSING", "RUNNING", "STARTED", "QUEUED",
                           "PENDING", "CREATED", "ACCEPTED", "RECEIVED", "NEW", "SCHEDULED", "WAITING"})
ERRORS_CSV_COLUMNS = ("recordNumber", "message", "apiErrorCode", "statusCode")


class _Changed(Exception):
    """The bytes read are not the checked ones: nothing may be started from them."""


def _nothing() -> None:
    return None


def _ignore(_record: FileRecord) -> None:
    return None


def _unchanged(record: FileRecord) -> FileRecord:
    return record


class ApiUploader:
    """One attempt at one file's next step(s); the upload threads (UploadWorker) call `process`."""

    def __init__(self, config: Config, journal: Journal, filer: Filer, *,
                 after_archive: Callable[[FileRecord], FileRecord] = _unchanged,
                 on_changed: Callable[[FileRecord], None] = _ignore,
                 on_stale: Callable[[FileRecord], None] = _ignore,
                 on_published: Callable[[FileRecord, float], None] | None = None,
                 heartbeat: Callable[[], None] = _nothing) -> None:
        """`journal` must hand out API_SENDABLE_STATES (service.Agent builds it so). Hooks: compress
        (lifecycle), intake's check of a changed file, notify.command ("stale"), metrics, the
        systemd watchdog ping."""
        self.config = config
        self.cfg = config.api
        self.journal = journal
        self.filer = filer
        self.stop_requested = threading.Event()
        self.heartbeat = heartbeat
        self.on_published = on_published
        self.on_changed = on_changed
        self.on_stale = on_stale
        self.after_archive = after_archive
        self._api: ImportApi | None = None
        self._api_lock = threading.Lock()
        self._hold_until = 0.0  # after a connection fault or a refused key every file waits (time.time())
        # what `run --once` reads and sets on either route (pipeline/upload.Uploader has the same)
        self.attempt_limit: int | None = None
        self.connection_failures = 0
        self.last_connection_error: str | None = None

    # ------------------------------------------------------------------ what UploadWorker calls

    def bind_session(self, _session: SftpSession | None) -> None:
        return None  # one HTTP client with keep-alive connections serves every thread

    def wait_for_connection_slot(self) -> float:
        return max(0.0, self._hold_until - time.time())

    def process_batch(self, records: list[FileRecord]) -> list[FileRecord]:
        return [self.process(record) for record in records]

    def process(self, record: FileRecord) -> FileRecord:
        """The file's next steps until one waits on the server (or fails); never raises."""
        try:
            return self._steps(record)
        except Exception as exc:  # noqa: BLE001 - a fault of the journal or a surprise: try again later
            current = self.journal.get(record.id)
            if current.state in (FileState.ARCHIVED, FileState.FAILED, FileState.STALE, FileState.CLAIMED):
                return current
            return self._retry_later(current, exc)

    def close(self) -> None:
        with self._api_lock:
            if self._api is not None:
                self._api.close()
                self._api = None

    # ------------------------------------------------------------------ the steps

    def _steps(self, record: FileRecord) -> FileRecord:
        if self._needs_operator(record):
            return self._hold_for_operator(record, (
                "the journal lost this file's history (adopted from the spool, or restored from a backup),"
                " so the agent cannot tell whether SaaSquatch already has an import job for it"))
        if record.state == FileState.QUEUED:
            record = self.journal.update(
                record.id, "sending to SaaSquatch's import API", state=FileState.UPLOADING, api_file_ref=None,
                api_job_id=None, records_processed=None, error=None)
        if record.state == FileState.UPLOADING:
            record = self._upload(record)
            if record.state != FileState.UPLOADED:
                return record
        if record.state == FileState.UPLOADED:
            return self._validate_and_start(record)
        if record.state == FileState.STARTING:  # an earlier attempt sent createJob and lost the answer
            return self._hold_for_operator(record, (
                "the agent stopped (or lost the connection) after asking SaaSquatch to start the import job"
                " and before it recorded the answer"))
        if record.state == FileState.PROCESSING:
            return self._poll(record)
        if record.state == FileState.COMPLETED:
            return self._archive(record)
        return record

    def _needs_operator(self, record: FileRecord) -> bool:
        return (bool(record.adopted) and not record.force_resend and record.api_job_id is None
                and record.state in (FileState.QUEUED, FileState.UPLOADING, FileState.UPLOADED))

    def _upload(self, record: FileRecord) -> FileRecord:
        path = Path(record.local_path)
        try:
            size = os.stat(path).st_size
        except OSError as exc:
            return self._refuse(record, f"the claimed copy {path} could not be read ({exc.strerror or exc});"
                                " it was not sent")
        if size != record.size:
            return self._changed(record, f"{size} bytes now, {record.size} when checked")
        api = self._client()
        started = time.monotonic()
        try:
            sent = api.upload(path, record.remote_name or record.name, size, self._on_chunk)
        except ApiRefused as exc:
            return self._refuse(record, f"SaaSquatch refused the upload of {record.name}:"
                                f" {error_words(exc.errors)} (nothing was imported). Fix the file and drop it"
                                " again.")
        except PermissionError as exc:
            return self._refuse(record, f"the claimed copy {path} could not be read ({exc.strerror or exc});"
                                " it was not sent")
        elapsed = time.monotonic() - started
        if sent.size != record.size or sent.sha256 != record.sha256:
            return self._changed(record, f"{sent.size} bytes sent with SHA-256 {sent.sha256[:12]}...,"
                                 f" checked {record.size} bytes with {str(record.sha256)[:12]}...; the upload"
                                 f" {sent.file_ref} is left unused (no job was started)")
        record = self.journal.update(record.id, f"uploaded as fileRef {sent.file_ref}",
                                     state=FileState.UPLOADED, api_file_ref=sent.file_ref, error=None,
                                     next_attempt_at=None, attempts=0)
        logger.info("{} uploaded to SaaSquatch's import API as {} ({} bytes in {:.2f} s)", record.label,
                    sent.file_ref, sent.size, elapsed)
        if self.on_published is not None:
            self.on_published(record, elapsed)
        return record

    def _validate_and_start(self, record: FileRecord) -> FileRecord:
        api = self._client()
        file_ref = str(record.api_file_ref)
        kind = job_type(ImportType(str(record.import_type)))
        try:
            errors = api.validate(file_ref, kind)
        except ApiRefused as exc:
            return self._refuse(record, f"SaaSquatch refused to validate {record.name} (sent as"
                                f" {file_ref}): {error_words(exc.errors)}. Nothing was imported (no job was"
                                " started). Fix the file and drop it again, or run `saasquatch-agent retry"
                                f" {record.id}` to send it again unchanged.", _errors_csv(exc.errors))
        if errors:
            return self._refuse(record, (
                f"SaaSquatch found {len(errors)} problem(s) in {record.name} when validating it for a {kind}"
                f" job: {error_words(errors[:5])}{' ...' if len(errors) > 5 else ''}. Nothing was imported"
                " (no job was started); the server's errors are in the .errors.csv file beside this one. Fix"
                " the file and drop it again."), _errors_csv(errors),
                message=f"validateJobCreation: {len(errors)} error(s)")
        # committed before createJob: a crash from here on until the job id is committed leaves
        # `starting`, which is never sent again without the operator (see the module doc)
        record = self.journal.update(record.id, f"validated by SaaSquatch (no errors); starting a {kind} job",
                                     state=FileState.STARTING)
        try:
            job = api.create_job(file_ref, kind)
        except ApiRefused as exc:
            return self._refuse(record, f"SaaSquatch refused to start the import job for {record.name}"
                                f" (sent as {file_ref}): {error_words(exc.errors)}. Nothing was imported. Fix"
                                " the file and drop it again, or run `saasquatch-agent retry"
                                f" {record.id}` to send it again.", _errors_csv(exc.errors))
        except ApiError as exc:
            if exc.maybe_done:
                return self._hold_for_operator(
                    record, f"SaaSquatch's answer to starting the import job was lost ({exc})")
            # provably not carried out (no connection, 429, 503, key refused): no job exists
            self.journal.update(record.id, f"createJob not carried out ({exc}); no job was started",
                                state=FileState.UPLOADED)
            raise
        # logged before the commit: should the commit fail, the log still names the job
        logger.info("{}: SaaSquatch started import job {} for it (fileRef {}); asking for its outcome every"
                    " {:g} s", record.label, job.id, file_ref, self.cfg.poll_seconds)
        return self.journal.update(
            record.id, f"import job {job.id} started ({job.type or kind}, requester {job.requester or '?'},"
            f" dateCreated {job.date_created})", state=FileState.PROCESSING, api_job_id=job.id, error=None,
            next_attempt_at=time.time() + self.cfg.poll_seconds, attempts=0)

    def _poll(self, record: FileRecord) -> FileRecord:
        job_id = str(record.api_job_id)
        try:
            status = self._client().job(job_id)
        except ApiRefused as exc:  # e.g. the job is not found (yet): asked again; stale after status.timeout
            return self._wait_for_job(record, f"job {job_id}: SaaSquatch answered {error_words(exc.errors)}")
        word = status.status.strip()
        key = word.upper().replace(" ", "_").replace("-", "_")
        records = status.records_processed
        if key in SUCCESS_WORDS:
            record = self.journal.update(
                record.id, f"import job {job_id} {word}: {records if records is not None else '?'} record(s)"
                " processed", state=FileState.COMPLETED, records_processed=records, error=None)
            return self._archive(record)
        if key in FAILURE_WORDS:
            reason = (f"SaaSquatch's import job {job_id} for {record.name} (fileRef {record.api_file_ref})"
                      f" ended {word}" + (f" after {records} record(s) processed" if records else "") +
                      ". The job's own errors file is on SaaSquatch's Reports page (Analytics > Reports >"
                      f" Import). Fix the file and drop it again, or run `saasquatch-agent retry {record.id}`"
                      " to send it again unchanged (a new job).")
            self.journal.update(record.id, f"import job {job_id}: {word}", records_processed=records)
            return self._refuse(self.journal.get(record.id), reason)
        unknown = None if key in RUNNING_WORDS else (
            f"unrecognised job status {word!r} from SaaSquatch; kept, not acted on (asked again every"
            f" {self.cfg.poll_seconds:g} s)")
        return self._wait_for_job(record, unknown, records)

    def _wait_for_job(self, record: FileRecord, note: str | None, records: int | None = None) -> FileRecord:
        """The job has no final word yet: ask again in api.poll_seconds, or give up after status.timeout."""
        started = self._job_started_at(record)
        timeout = self.config.status.timeout
        if datetime.now(UTC) - started > timedelta(seconds=timeout):
            hours = timeout / 3600
            reason = (f"no final word from SaaSquatch on import job {record.api_job_id} for {record.name}"
                      f" within {hours:g} h of its start ({started:%Y-%m-%d %H:%M:%S}Z); it may still run or"
                      " may have ended: look at it on SaaSquatch's Reports page (Analytics > Reports >"
                      " Import)."
                      f" `saasquatch-agent retry {record.id}` sends the file again (a new job).")
            record = self.filer.quarantine(record, reason, state=FileState.STALE,
                                           message=f"no final job status within {hours:g} h")
            if record.pending_path is None:
                self.on_stale(record)
            return record
        if note != record.error:
            if note:
                logger.warning("{}: {}", record.label, note)
            return self.journal.update(record.id, note, error=note, records_processed=records, attempts=0,
                                       next_attempt_at=time.time() + self.cfg.poll_seconds)
        return self.journal.update(record.id, records_processed=records, attempts=0,
                                   next_attempt_at=time.time() + self.cfg.poll_seconds)

    def _job_started_at(self, record: FileRecord) -> datetime:
        times = [at for at, state, _message in self.journal.events(record.id)
                 if state == FileState.PROCESSING]
        return datetime.fromisoformat((min(times) if times else record.updated_at).replace("Z", "+00:00"))

    def _archive(self, record: FileRecord) -> FileRecord:
        record = self.filer.archive(record)
        records = record.records_processed
        logger.info("{} imported by SaaSquatch (job {}, {} record(s) processed)", record.label,
                    record.api_job_id, records if records is not None else "?")
        return self.after_archive(record)

    # ------------------------------------------------------------------ outcomes

    def _refuse(self, record: FileRecord, reason: str, errors_csv: str | None = None, *,
                message: str | None = None) -> FileRecord:
        return self.filer.quarantine(self.journal.get(record.id), reason, errors_csv, message=message)

    def _hold_for_operator(self, record: FileRecord, why: str) -> FileRecord:
        """Unknown whether a job exists: failed/ as `stale`, never a second job without the operator."""
        ref = f" (uploaded as fileRef {record.api_file_ref})" if record.api_file_ref else ""
        reason = (f"{why}. SaaSquatch may or may not have an import job for {record.name}{ref}, and the agent"
                  " does not start another one by itself (that could import the records twice). Look on"
                  " SaaSquatch's Reports page (Analytics > Reports > Import) for a job of that file started"
                  f" around {record.updated_at}: if there is one, nothing is left to do; if there is none,"
                  f" run `saasquatch-agent retry {record.id}` to upload it again and start one.")
        record = self.filer.quarantine(
            self.journal.get(record.id), reason, state=FileState.STALE,
            message="unknown whether an import job was started; waits for the operator")
        if record.pending_path is None:
            self.on_stale(record)
        return record

    def _changed(self, record: FileRecord, why: str) -> FileRecord:
        logger.warning("{} changed after it was taken ({}); no job was started from it; checking it again"
                       " once it is stable", record.label, why)
        record = self.journal.update(record.id, f"changed after it was taken ({why}); checking it again",
                                     state=FileState.CLAIMED, error=None, next_attempt_at=None)
        self.on_changed(record)
        return record

    def _retry_later(self, record: FileRecord, exc: BaseException) -> FileRecord:
        reason = _describe(exc)
        attempts = record.attempts + 1
        retry = self.config.retry
        delay = backoff_delay(attempts, retry.initial_delay_seconds, retry.max_delay_seconds)
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, retry.max_delay_seconds))
        if isinstance(exc, InterruptedError):
            delay = 0.0
        elif isinstance(exc, ApiError | ApiKeyError):
            self._hold_until = time.time() + delay  # the server or the key: every file waits, one tries
        level = "ERROR" if isinstance(exc, ApiKeyRefused | ApiKeyError) else "WARNING"  # the key: loud
        logger.log(level, "{} not sent (attempt {}): {}; retrying in {:.1f} s", record.label, attempts,
                   reason, delay)
        fields: dict[str, Any] = {}
        if record.state == FileState.UPLOADING and (
                isinstance(exc, ApiKeyError) or (isinstance(exc, ApiError) and not exc.maybe_done)):
            fields["state"] = FileState.QUEUED  # provably nothing reached the server: still just queued
        return self.journal.update(record.id, f"retry: {reason}", attempts=attempts, error=reason,
                                   next_attempt_at=time.time() + delay, **fields)

    # ------------------------------------------------------------------ plumbing

    def _client(self) -> ImportApi:
        with self._api_lock:
            if self._api is None:
                key = load_api_key(api_key_path(self.cfg))
                self._api = ImportApi(self.cfg, key, connections=self.config.upload.concurrency)
            return self._api

    def _on_chunk(self) -> None:
        self.heartbeat()
        if self.stop_requested.is_set():
            raise InterruptedError("stopping: upload abandoned, it restarts at the next start")


def _errors_csv(errors: list[Any]) -> str:
    """The server's errors as SaaSquatch's errors file: recordNumber, message, apiErrorCode, statusCode
    (an error that is not an object keeps its text as the message)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(ERRORS_CSV_COLUMNS)
    for item in errors:
        if isinstance(item, dict):
            lowered = {str(key).lower(): value for key, value in item.items()}
            row = [lowered.get(column.lower()) for column in ERRORS_CSV_COLUMNS]
            if row[1] is None:
                row[1] = json.dumps(item, sort_keys=True)
            writer.writerow(["" if value is None else value for value in row])
        else:
            writer.writerow(["", str(item), "", ""])
    return out.getvalue()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiError | ApiKeyError | InterruptedError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({type(exc).__name__})"
    return f"{str(exc) or type(exc).__name__} ({type(exc).__name__})"

