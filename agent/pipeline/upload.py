"""Upload: publish each queued file atomically under its fixed remote name, with exactly its checked bytes.

Order for one file (a batch of small files takes the same steps together, agent.transport.publish): the
journal says UPLOADING before the first byte; the bytes go to the row's temporary name, hashed as
they are read and every WRITE status read; the hash and size must equal the checked ones and the
server must hold that size; the journal says PUBLISHING; a rename publishes the final name; the
journal says UPLOADED; the local copy is archived. A file found UPLOADING or PUBLISHING at the next
attempt (a crash or a fault came in between) is first looked up remotely, so it is never published
twice. While a large file is sent, the journal keeps what the server acknowledged of its temporary
file (`ResumePoint`, about once a second); an attempt that finds that temporary file again, at least
that long and no longer than the file, with the local copy unchanged, sends only the rest (the prefix
is hashed locally, so the hash checked before the rename still covers every byte). Any doubt sends
the file from its first byte. A file whose bytes changed after the check is never published: its
temporary file is removed and it goes back to intake to be checked again once it is stable.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import posixpath
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import paramiko
from loguru import logger

from agent.config import Config, ImportType
from agent.errors import AgentError, Fault, classify
from agent.imports.naming import readable_stem
from agent.imports.report import ValidationReport
from agent.logs import file_fields
from agent.pipeline.progress import UploadProgress
from agent.store.adopt import find_published
from agent.store.archive import Filer
from agent.store.journal import FINAL_STATES, FileRecord, FileState, Journal
from agent.transport import pipelining as sftp_batch
from agent.transport import publish
from agent.transport.sftp import SftpSession, remote_size
from agent.units import human_duration

LOCAL_FAULT_PAUSE_SECONDS = 5.0
BATCH_FILE_MAX_BYTES = 256 * 1024  # files up to this size are sent together (upload.batch_files)
BATCH_MAX_BYTES = 4 * 1024 * 1024  # bytes of one batch in flight at most
TEMP_STEM_CHARS = 60  # of the readable stem in a temporary name ({stem})
RESUME_CHECKPOINT_SECONDS = 1.0  # how often a large file's acknowledged offset is committed


class PermanentUploadError(AgentError):
    """Retrying cannot fix this; the file goes to failed/ with this message."""


class TransientUploadError(AgentError):
    """The server did not take this file this time (its words in the message); sent again later."""

    retryable = True


def legacy_temporary_name(remote_name: str) -> str:
    """The temporary name of versions before upload.temp_name (looked for when resuming their rows)."""
    return f".{remote_name}.part"


@dataclass(frozen=True)
class ResumePoint:
    """What an attempt that was cut short left on the server (the journal's `resume_point`): every
    WRITE below `acked` into `temp` was answered OK, and those bytes were read from the local copy
    while it had `local` (size, mtime_ns, inode)."""

    temp: str
    acked: int
    local: tuple[int, int, int]

    def dumps(self) -> str:
        return json.dumps({"temp": self.temp, "acked": self.acked, "local": list(self.local)})

    @classmethod
    def loads(cls, text: str | None) -> ResumePoint | None:
        """The point written by `dumps`; None for none or anything else (then nothing is resumed)."""
        if not text:
            return None
        try:
            data = json.loads(text)
            temp, acked, local = data["temp"], data["acked"], data["local"]
            if (isinstance(temp, str) and isinstance(acked, int) and isinstance(local, list)
                    and len(local) == 3 and all(isinstance(value, int) for value in local)):
                return cls(temp, acked, (local[0], local[1], local[2]))
        except (ValueError, TypeError, KeyError):
            pass
        return None


class _Checkpoint:
    """Commits what the server acknowledged of one file about once a second (`ResumePoint`)."""

    def __init__(self, journal: Journal, saved: int) -> None:
        self.journal = journal
        self.saved = saved
        self.at = time.monotonic()

    def __call__(self, upload: publish.Upload) -> None:
        if upload.acked <= self.saved or upload.local_stamp is None or upload.error is not None:
            return
        now = time.monotonic()
        if now - self.at < RESUME_CHECKPOINT_SECONDS:
            return
        self.at, self.saved = now, upload.acked
        point = ResumePoint(upload.temp, upload.acked, upload.local_stamp)
        self.journal.update(upload.file_id, resume_point=point.dumps())


class PendingCheck(Protocol):
    """A file's check running in a worker process (agent.intake.check_process.CheckProcess)."""

    def result(self, keep_going: Callable[[], None]) -> ValidationReport: ...

    def cancel(self) -> None: ...


class CheckWhileSending(Protocol):
    """Intake's side of a file queued unchecked (agent.intake.claim.Intake): `begin` starts its
    check; `conclude` applies the rules to the report and returns the row with its SHA-256 and
    remote name committed, or None when it filed the file (refused, split, duplicate)."""

    def begin(self, record: FileRecord) -> PendingCheck: ...

    def conclude(self, record: FileRecord, report: ValidationReport,
                 discard: Callable[[], None]) -> FileRecord | None: ...


def backoff_delay(attempts: int, initial: float, cap: float) -> float:
    """Capped exponential backoff with jitter: between half and all of min(cap, initial * 2^(n-1))."""
    ceiling = min(cap, initial * 2.0 ** max(0, attempts - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def _no_heartbeat() -> None:
    return None


def _ignore(_record: FileRecord) -> None:
    return None


def _ignore_timing(_record: FileRecord, _seconds: float) -> None:
    return None


def _unchanged(record: FileRecord) -> FileRecord:
    return record


class Uploader:
    """Publishes files; what follows a published file comes in as hooks (wired in agent.service).

    `after_upload`: what follows a verified upload (default: archive it), e.g. leave it to the
    status job (agent.pipeline.lifecycle). `archive_on_publish`: with no status tracking, "uploaded"
    and the archive intent are one commit and the files are filed together; `after_archive` then
    runs per file (compress). `on_changed`: a file whose bytes changed after the check (intake
    checks it again once it is stable). `on_published`: each file's upload seconds (metrics).
    `heartbeat`: the systemd watchdog ping, called while progress is made. `check_while_sending`:
    checks a file queued unchecked (no SHA-256 yet) while its bytes are sent; without it such a file
    goes back to intake to be checked first.
    """

    def __init__(self, config: Config, journal: Journal, filer: Filer, session: SftpSession, *,
                 after_upload: Callable[[FileRecord], FileRecord] | None = None,
                 archive_on_publish: bool = True,
                 after_archive: Callable[[FileRecord], FileRecord] = _unchanged,
                 on_changed: Callable[[FileRecord], None] = _ignore,
                 on_published: Callable[[FileRecord, float], None] = _ignore_timing,
                 heartbeat: Callable[[], None] = _no_heartbeat, attempt_limit: int | None = None,
                 progress: UploadProgress | None = None,
                 check_while_sending: CheckWhileSending | None = None) -> None:
        self.config = config
        self.journal = journal
        self.filer = filer
        self._default_session = session
        self._local = threading.local()  # upload.concurrency: each worker thread binds its own session
        self.stop_requested = threading.Event()
        # the back-off after a failed connection belongs to the connection: every waiting file is
        # due again when the next connection attempt is (oldest first), not each on its own clock
        self._connection_lock = threading.Lock()
        self._connection_retry_at = 0.0
        self.heartbeat = heartbeat
        self._after_upload = after_upload or filer.archive
        self._archive_on_publish = archive_on_publish
        self._after_archive = after_archive
        self._on_changed = on_changed
        self._on_published = on_published
        self.connection_failures = 0  # connection attempts failed in a row (0 once one succeeds)
        self.last_connection_error: str | None = None
        self.attempt_limit = attempt_limit  # `run --once`: attempts (per file, and connections in a row)
        self.progress = progress  # the `uploading` rows' bytes sent (status, log)
        self._check_while_sending = check_while_sending

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

    def final_path(self, record: FileRecord) -> str:
        return posixpath.join(self.remote_dir, str(record.remote_name))

    def temp_path(self, record: FileRecord) -> str:
        """upload.temp_name in upload.temp_dir (else remote_dir): derived from the row, so unique."""
        stem = ""
        if "{stem}" in self.config.upload.temp_name and record.import_type:
            prefix = self.config.imports.prefixes.for_type(ImportType(record.import_type))
            stem = readable_stem(record.name, prefix)[:TEMP_STEM_CHARS]
        name = self.config.upload.temp_name.format(id=record.id, stem=stem)
        return posixpath.join(self.config.upload.temp_dir or self.remote_dir, name)

    def process(self, record: FileRecord) -> FileRecord:
        """One attempt at one file; any error becomes a retry or a refusal, never an exception."""
        return self.process_batch([record])[0]

    def process_batch(self, records: list[FileRecord]) -> list[FileRecord]:
        """One attempt at one or more files over this thread's connection.

        A file already published goes on to archive; one an earlier attempt left uploading or
        publishing is looked up remotely first; the rest are sent together (agent.transport.publish). A
        connection fault makes every file not yet published retry later, as it would one file.
        """
        results: dict[int, FileRecord] = {}
        try:
            self._attempt(records, results)
        except Exception as exc:  # noqa: BLE001 - every other fault is retried; the files stay queued
            waiting = []
            for record in records:
                if record.id in results:
                    continue
                current = self.journal.get(record.id)
                if current.state in FINAL_STATES:  # filed before the fault (finish_moves records those)
                    results[record.id] = current
                    continue
                waiting.append(current)
            if classify(exc) is Fault.CONNECTION:
                results.update((record.id, record) for record in self._wait_for_connection(waiting, exc))
            for current in waiting:
                if current.id not in results:
                    with logger.contextualize(file_id=current.id, file=current.name):
                        results[current.id] = self._fault(current, exc)
        return [results[record.id] for record in records]

    def _attempt(self, records: list[FileRecord], results: dict[int, FileRecord]) -> None:
        to_send: list[FileRecord] = []
        found: list[tuple[FileRecord, str]] = []
        resume_at: dict[int, int] = {}  # file id -> offset its send continues at
        listing = self._remote_listing(records)
        for record in records:
            with logger.contextualize(file_id=record.id, file=record.name):
                if record.state == FileState.UPLOADED:
                    results[record.id] = self._after_upload(record)
                    continue
                if record.state not in (FileState.UPLOADING, FileState.PUBLISHING):
                    earlier = self._published_before(listing, record) if listing is not None else None
                    if earlier is not None:
                        found.append(earlier)
                    else:
                        to_send.append(record)
                    continue
                try:
                    outcome = self._resume(self._client(), record, resume_at)
                except (PermanentUploadError, TransientUploadError) as exc:
                    results[record.id] = self._fault(record, exc)
                    continue
                if outcome is None:
                    to_send.append(record)
                else:
                    found.append((record, outcome))
        self._finish(found, results)
        if to_send:
            self._send(to_send, results, resume_at)

    def _remote_listing(self, records: list[FileRecord]) -> dict[str, int] | None:
        """remote_dir's names and sizes, when a file adopted from the spool is about to be sent."""
        if not any(record.adopted and record.state == FileState.QUEUED for record in records):
            return None
        return {entry.filename: int(entry.st_size or 0)
                for entry in self._client().listdir_attr(self.remote_dir)}

    def _published_before(self, listing: dict[str, int], record: FileRecord) -> tuple[FileRecord, str] | None:
        """An adopted file (the journal had lost its row) already on the server under a remote name no
        other row holds: recorded as published, not sent again."""
        if not record.adopted:
            return None
        name = find_published(listing, record)
        if name is None or self.journal.query("WHERE remote_name = ? AND id != ?", (name, record.id)):
            return None
        logger.info("{} was adopted from the spool and is already on the server as {}; not sending it"
                    " again", record.label, name)
        record = self.journal.update(record.id, remote_name=name)
        return record, f"found on the server as {name} (adopted: its row was lost); not sent again"

    def _send(self, records: list[FileRecord], results: dict[int, FileRecord],
              resume_at: dict[int, int]) -> None:
        """The publish protocol for these files (transport.publish), each step for all of them at once;
        a file in `resume_at` continues at that offset."""
        if self._check_while_sending is None:  # nothing here checks while sending: intake checks first
            for record in records:
                if record.sha256 is None:
                    results[record.id] = self.journal.update(
                        record.id, state=FileState.CLAIMED, next_attempt_at=None,
                        message="queued to be checked while it is sent; checked before sending instead")
                    self._on_changed(results[record.id])
            records = [record for record in records if record.sha256 is not None]
            if not records:
                return
        sftp = self._client()
        started = time.monotonic()
        rows = {record.id: record for record in records}
        uploads = [self._upload(record, resume_at.get(record.id, 0)) for record in records]
        for upload in uploads:
            if upload.size > BATCH_FILE_MAX_BYTES:  # worth resuming: keep what is acknowledged
                upload.checkpoint = _Checkpoint(self.journal, upload.resume_from)
        # what an earlier attempt acknowledged is forgotten before its temporary file is truncated
        self.journal.update_many([
            (upload.file_id,
             f"resuming at byte {upload.resume_from} of {upload.size}" if upload.resume_from
             else f"sending to {upload.final or upload.temp}",
             {"state": FileState.UPLOADING,
              "resume_point": rows[upload.file_id].resume_point if upload.resume_from else None})
            for upload in uploads
            if (upload.resume_from or rows[upload.file_id].state != FileState.UPLOADING
                or rows[upload.file_id].resume_point)
        ], fetch=False)
        pacer = publish.Pacer(self.stop_requested.is_set, self.heartbeat, self.config.sftp.bandwidth_limit,
                              self.stop_requested.wait)
        tracker = self.progress.track([rows[upload.file_id] for upload in uploads]) if self.progress else None
        if tracker is not None:
            pacer.on_progress = tracker.update
        checks: dict[int, PendingCheck] = {}  # files queued unchecked: checked while they are sent
        try:
            for upload in uploads:
                if upload.sha256 is None:
                    checks[upload.file_id] = self._begin_check(rows[upload.file_id])
            publish.open_all(sftp, uploads)
            self._check_stop()
            session = self.session
            lanes = (lambda: session.extra_lanes(sftp)) if len(uploads) == 1 else None
            publish.write_all(sftp, uploads, session.write_request_size(sftp), pacer, lanes)
            if tracker is not None:
                tracker.done()
                tracker = None
            publish.close_all(sftp, uploads)
            self.heartbeat()
            self._check_stop()
            complete = self._conclude_checks(sftp, [upload for upload in uploads if upload.complete],
                                             checks, rows, results)
        finally:
            if tracker is not None:
                tracker.done()
            for check in checks.values():  # the send failed or stopped: nothing waits for these
                check.cancel()
        self.journal.update_many([(upload.file_id, f"renaming to {upload.final}",
                                   {"state": FileState.PUBLISHING}) for upload in complete], fetch=False)
        published = []
        for upload, error in zip(complete, sftp_batch.renames(sftp, [(u.temp, u.final) for u in complete]),
                                 strict=True):
            if error is None:
                published.append(upload)
            else:
                upload.error, upload.step = error, "rename"
        elapsed = time.monotonic() - started
        uploaded: dict[int, str] = {}  # file id -> what its log line says of the upload
        for upload in published:
            record = rows[upload.file_id]
            resumed = (f", resumed at byte {upload.resume_from}: {upload.wrote} bytes sent"
                       if upload.resume_from else "")
            together = f", {len(uploads)} sent together" if len(uploads) > 1 else ""
            uploaded[record.id] = (f"uploaded as {upload.final} ({record.size} bytes in {elapsed:.2f} s"
                                   f"{together}{resumed})")
            self._on_published(record, elapsed / len(published))  # each file's share of the batch's time
        self._finish([(rows[upload.file_id], f"published as {upload.final}") for upload in published],
                     results, uploaded)
        for upload in uploads:
            if upload.file_id not in results:
                with logger.contextualize(file_id=upload.file_id, file=rows[upload.file_id].name):
                    results[upload.file_id] = self._not_published(sftp, upload)

    def _upload(self, record: FileRecord, resume_from: int = 0) -> publish.Upload:
        """The protocol's view of a row: its id, the checked size and SHA-256, the local and remote paths
        (and where a resumed send continues). A file queued unchecked has neither SHA-256 nor final
        name until its check concludes."""
        return publish.Upload(record.id, int(record.size or 0), record.sha256, record.local_path,
                              self.temp_path(record), self.final_path(record) if record.remote_name else "",
                              resume_from=resume_from)

    def _begin_check(self, record: FileRecord) -> PendingCheck:
        assert self._check_while_sending is not None  # `_send` gave the others back to intake
        check = self._check_while_sending.begin(record)
        logger.debug("{} is being checked in worker process {} while it is sent", record.label,
                     getattr(check, "pid", "?"))
        return check

    def _conclude_checks(self, sftp: paramiko.SFTPClient, complete: list[publish.Upload],
                         checks: dict[int, PendingCheck], rows: dict[int, FileRecord],
                         results: dict[int, FileRecord]) -> list[publish.Upload]:
        """The files sent completely that may be renamed: for one checked while it was sent, once its
        check passed and the bytes checked are the bytes sent (its row then has its SHA-256 and remote
        name). A file refused by the check, or whose bytes differ, has its temporary file removed
        and is never renamed."""
        keep = []
        for upload in complete:
            check = checks.pop(upload.file_id, None)
            if check is None:
                keep.append(upload)
                continue
            record = rows[upload.file_id]
            with logger.contextualize(file_id=record.id, file=record.name):
                waited = time.monotonic()
                try:
                    report = check.result(self._keep_going)
                except InterruptedError:
                    raise
                except Exception as exc:  # the worker died or could not read the file: sent again
                    raise TransientUploadError(f"its check in a worker process gave no verdict ({exc});"
                                               " nothing was published") from exc
                sent = upload.digest.hexdigest()
                if report.sha256 is not None and (report.sha256, report.bytes) != (sent, upload.sent):
                    _remove_temporary(sftp, upload)
                    results[record.id] = self._changed(
                        record, f"{report.bytes} bytes with SHA-256 {report.sha256[:16]}... were checked,"
                        f" {upload.sent} with {sent[:16]}... were sent")
                    continue
                assert self._check_while_sending is not None  # it began the check
                doomed = not report.ok or report.over_limits  # refused or split: these bytes never go
                if doomed:  # removed before the file is filed: a crash in between sends and checks again
                    _remove_temporary(sftp, upload)
                concluded = self._check_while_sending.conclude(  # `discard`: a duplicate's bytes
                    record, report, discard=functools.partial(_remove_temporary, sftp, upload))
                if concluded is None:  # refused, split or a duplicate: filed by intake, never renamed
                    results[record.id] = self.journal.get(record.id)
                    continue
                if concluded.sha256 != sent:
                    _remove_temporary(sftp, upload)
                    results[record.id] = self._changed(concluded, "the bytes checked are not the bytes sent")
                    continue
                logger.debug("{} passed its check while it was sent (its report came {:.2f} s after the last"
                             " byte); publishing it as {}", record.label, time.monotonic() - waited,
                             concluded.remote_name)
                rows[upload.file_id] = concluded
                upload.sha256, upload.final = concluded.sha256, self.final_path(concluded)
                keep.append(upload)
        return keep

    def _keep_going(self) -> None:
        """While waiting for a check: ping the watchdog; a stop ends the wait (InterruptedError)."""
        self.heartbeat()
        self._check_stop()

    def _finish(self, published: list[tuple[FileRecord, str]], results: dict[int, FileRecord],
                uploaded: dict[int, str] | None = None) -> None:
        """Record files as uploaded; with no status tracking, together with the archive intent (one
        commit), then file them (recovery finishes a move a crash cut short: resume_move).

        `uploaded`: what each file's "uploaded as" line says (the files just sent). A file archived
        right away gets one line for both steps (a burst of small files: one log line fewer per
        file); otherwise that line is logged as the upload is recorded.
        """
        if not published:
            return
        uploaded = dict(uploaded or {})
        done: dict[str, Any] = {"state": FileState.UPLOADED, "error": None}
        if not self._archive_on_publish:
            for record in self.journal.update_many([(record.id, message, done)
                                                    for record, message in published]):
                self._say_uploaded(record, uploaded)
                with logger.contextualize(file_id=record.id, file=record.name):
                    results[record.id] = self._after_upload(record)
            return
        try:
            destinations = self.filer.archive_destinations([record for record, _message in published])
            batch = self.journal.update_many([
                (record.id, message, {**done, "pending_path": dest, "pending_state": FileState.ARCHIVED})
                for (record, message), dest in zip(published, destinations, strict=True)])
            for record in self.filer.finish_moves(batch):
                words = uploaded.pop(record.id, None)
                logger.bind(**file_fields(record)).info("{} {}archived to {}", record.label,
                                                        f"{words}; " if words else "", record.local_path)
                with logger.contextualize(file_id=record.id, file=record.name):
                    results[record.id] = self._after_archive(record)
        finally:  # not archived now (the fault is handled by the caller): the upload has its own line
            for record, _message in published:
                self._say_uploaded(record, uploaded)

    @staticmethod
    def _say_uploaded(record: FileRecord, uploaded: dict[int, str]) -> None:
        words = uploaded.pop(record.id, None)
        if words is not None:
            logger.bind(**file_fields(record) | {"state": FileState.UPLOADED.value}).info(
                "{} {}", record.label, words)

    def _not_published(self, sftp: paramiko.SFTPClient, upload: publish.Upload) -> FileRecord:
        """What happens to a file the protocol did not publish: checked again, refused, or retried."""
        record = self.journal.get(upload.file_id)
        if upload.changed is not None:
            return self._changed(record, upload.changed)
        if upload.unreadable is not None:
            exc = upload.unreadable
            return self._fault(record, PermanentUploadError(
                f"the claimed copy {upload.local} could not be read ({exc.strerror or exc});"
                " it was not sent"))
        error = upload.error
        if error is None:  # every step succeeded, yet the server holds another size
            return self._fault(record, TransientUploadError(
                f"the server holds {upload.remote_size} bytes of {upload.temp} after all {record.size} were"
                " written and acknowledged; nothing was published; sending it again"))
        words = error.strerror or str(error) or type(error).__name__
        denied = error.errno in (errno.EACCES, errno.EPERM)
        if upload.step == "open" and denied:
            return self._fault(record, PermanentUploadError(
                f"the server refused to create the temporary file {upload.temp} (permission denied);"
                f" check that remote_dir {self.remote_dir!r} is the tenant's upload folder, or choose another"
                " upload.temp_name / upload.temp_dir (some servers refuse hidden names)"))
        if upload.step == "rename":
            if remote_size(sftp, upload.final) is not None:
                return self._fault(record, PermanentUploadError(
                    f"the server already has {upload.final}; refusing to overwrite it (this file was not"
                    f" published; its bytes stay in {upload.temp} on the server until it is retried)"))
            if denied:
                return self._fault(record, PermanentUploadError(
                    f"the server refused the name {record.remote_name} (permission denied on renaming"
                    f" {upload.temp})"))
        return self._fault(record, TransientUploadError(
            f"the server refused to {upload.step} {upload.temp} ({words}); nothing was published"))

    def _changed(self, record: FileRecord, why: str) -> FileRecord:
        """The local bytes are not those that were checked: nothing of them was published; intake
        checks the file again from scratch once it is stable."""
        logger.warning("{} changed after it was taken ({}); nothing of it was published; checking it"
                       " again once it is stable", record.label, why)
        record = self.journal.update(
            record.id, state=FileState.CLAIMED, error=None, next_attempt_at=None,
            message=f"changed after it was taken ({why}); checking it again")
        self._on_changed(record)
        return record

    def _check_stop(self) -> None:
        if self.stop_requested.is_set():
            raise InterruptedError("stopping: upload abandoned, it restarts at next start")

    def _resume(self, sftp: paramiko.SFTPClient, record: FileRecord, resume_at: dict[int, int]) -> str | None:
        """An earlier attempt got at least as far as sending: look at the server before sending again.

        Returns the journal message once the file is published (it is not sent again), or None
        when it must be sent (again): from the offset put in `resume_at` when the row's temporary
        file holds what the journal says was acknowledged, else from the start. The final name is
        this row's alone (unique in the journal).
        """
        final, temp = self.final_path(record), self.temp_path(record)
        # a file queued unchecked gets its remote name only once checked, before the rename
        found = remote_size(sftp, final) if record.remote_name else None
        if found == record.size:
            logger.info("{} was already published as {}; not sending it again", record.label, final)
            return "found published on the server"
        if found is not None:
            raise PermanentUploadError(
                f"the server already has {final} with {found} bytes, not the {record.size} of this"
                " file; refusing to overwrite it"
            )
        partial = remote_size(sftp, temp)
        if partial is None and record.remote_name:  # a row of an older version: its temporary name
            legacy = posixpath.join(self.remote_dir, legacy_temporary_name(record.remote_name))
            if remote_size(sftp, legacy) is not None:
                temp, partial = legacy, remote_size(sftp, legacy)
        if record.state == FileState.PUBLISHING:
            # PUBLISHING is committed only after the bytes were hashed and the size checked
            if partial == record.size:  # complete and checked; only the rename was cut short
                [error] = sftp_batch.renames(sftp, [(temp, final)])
                if error is not None:
                    raise TransientUploadError(f"renaming {temp} to {final} failed: {error}")
                return f"published as {final}"
            if partial is None:  # renamed, and the server has already taken the final name away
                logger.info("{} was renamed to {} and taken by the server; not sending it again",
                            record.label, final)
                return "renamed before the crash; already taken by the server"
        if partial is not None:
            offset = self._resumable(record, temp, partial)
            if offset:
                resume_at[record.id] = offset
                return None
            sftp.remove(temp)
        return None

    def _resumable(self, record: FileRecord, temp: str, partial: int) -> int:
        """Where to continue sending `record` into its temporary file `temp` that holds `partial`
        bytes, or 0 to start again. Only bytes whose every WRITE was answered OK count (the
        journal's ResumePoint), only in the row's own temporary file, only if the server still holds
        at least those and no more than the file, and only if the local copy is the one they were
        read from: a temporary file of another row, a refused WRITE, a server that lost bytes or a
        local copy that changed all mean sending from the first byte."""
        point = ResumePoint.loads(record.resume_point)
        if point is None or point.temp != temp or record.state != FileState.UPLOADING or record.size is None:
            return 0
        if not 0 < point.acked <= partial <= record.size:
            logger.info("{}: the server holds {} bytes of {} where {} of {} were acknowledged; sending it"
                        " again from the start", record.label, partial, temp, point.acked, record.size)
            return 0
        try:
            info = os.stat(record.local_path)
        except OSError:
            return 0
        if (info.st_size, info.st_mtime_ns, info.st_ino) != point.local or info.st_size != record.size:
            logger.info("{}: the local copy is not the one the first {} bytes were read from; sending it"
                        " again from the start", record.label, point.acked)
            return 0
        logger.info("{} resumes at byte {} of {} (the server acknowledged them in {}; it holds {})",
                    record.label, point.acked, record.size, temp, partial)
        return point.acked

    def _client(self) -> paramiko.SFTPClient:
        client = self.session.client()
        if self.connection_failures:
            with self._connection_lock:
                self.connection_failures = 0
                self.last_connection_error = None
        return client

    def _fault(self, record: FileRecord, exc: BaseException) -> FileRecord:
        """A refusal goes to failed/; anything else is retried later (agent.errors.classify)."""
        fault = classify(exc)
        if fault is Fault.REFUSE:
            return self.filer.quarantine(self.journal.get(record.id), str(exc))
        return self._retry_later(record, exc, fault)

    def _retry_later(self, record: FileRecord, exc: BaseException, fault: Fault) -> FileRecord:
        if fault is Fault.CONNECTION:
            [record] = self._wait_for_connection([record], exc)
            return record
        if fault in (Fault.RESET, Fault.STOPPING):
            self.session.drop()  # the connection may be in any state after a fault mid-operation
        reason = _describe_fault(exc, fault)
        attempts = record.attempts + 1
        delay = backoff_delay(attempts, self.config.retry.initial_delay_seconds,
                              self.config.retry.max_delay_seconds)
        if fault is Fault.STOPPING:
            delay = 0.0
        limit = self.attempt_limit
        then = (f"giving up for this run (attempt {attempts} of {limit}); it stays queued"
                if limit is not None and attempts >= limit and fault is not Fault.STOPPING
                else f"retrying in {human_duration(delay)}")
        record = self.journal.update(record.id, attempts=attempts, error=reason,
                                     next_attempt_at=time.time() + delay, message=f"retry: {reason}")
        logger.bind(**file_fields(record)).warning("{} not uploaded (attempt {}): {}; {}", record.label,
                                                   attempts, reason, then)
        return record

    def _wait_for_connection(self, records: list[FileRecord], exc: BaseException) -> list[FileRecord]:
        """No connection: the files wait for the connection's next attempt (one back-off for all,
        growing with the failed attempts in a row), all due together then, oldest first. One log line."""
        reason = _describe_fault(exc, Fault.CONNECTION)
        now = time.time()
        with self._connection_lock:
            if now >= self._connection_retry_at:  # a new attempt failed (not a concurrent one of it)
                self.connection_failures += 1
                self._connection_retry_at = now + backoff_delay(
                    self.connection_failures, self.config.retry.initial_delay_seconds,
                    self.config.retry.max_delay_seconds)
            failures, retry_at = self.connection_failures, self._connection_retry_at
            self.last_connection_error = reason
        if not records:
            return []
        limit = self.attempt_limit
        if limit is not None and failures >= limit:
            then = f"giving up for this run ({failures} failed connection attempts in a row); left queued"
        else:
            then = f"retrying in {human_duration(retry_at - now)}, with the next connection attempt"
        if len(records) == 1:
            record = records[0]
            logger.bind(**file_fields(record) | {"error": reason}).warning(
                "{} not uploaded (attempt {}): {}; {}", record.label, record.attempts + 1, reason, then)
        else:
            shown = ", ".join(record.label for record in records[:5])
            more = f" and {len(records) - 5} more" if len(records) > 5 else ""
            logger.warning("{} files not uploaded ({}{}): {}; {}", len(records), shown, more, reason, then)
        return self.journal.update_many([
            (record.id, f"retry: {reason}", {"attempts": record.attempts + 1, "error": reason,
                                             "next_attempt_at": retry_at}) for record in records])

    def wait_for_connection_slot(self) -> float:
        """Seconds to hold off every file after a connection fault, so N files make one attempt."""
        return max(0.0, self._connection_retry_at - time.time())


def _remove_temporary(sftp: paramiko.SFTPClient, upload: publish.Upload) -> None:
    """Remove the temporary file of bytes that must not be published (a leftover one would only
    ever be overwritten by this row's next attempt: its name is the row's)."""
    try:
        sftp.remove(upload.temp)
    except OSError as exc:
        logger.warning("could not remove the temporary file {} ({}); it is not published", upload.temp,
                       exc.strerror or exc)


def _describe_fault(exc: BaseException, fault: Fault) -> str:
    if fault is not Fault.RESET:  # the agent's own words (or the stop's)
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({type(exc).__name__})"
    text = str(exc) or type(exc).__name__
    return f"{text} ({type(exc).__name__})"
