"""Claim and check: a settled file (agent.intake.settle) is claimed into the spool, checked, queued.

Claiming writes the journal row first and then renames the file out of drop/, so at every instant
the file is in exactly one place and the journal knows which. Checking hashes the spool copy,
applies the import rules and fixes the remote name before anything is sent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from loguru import logger

from agent.config import Config, Transport
from agent.imports.admission import Admission, PartOf, admit, part_numbers, spool_part_of
from agent.imports.report import ValidationReport
from agent.imports.split import SplitError, split_file
from agent.imports.types import FileFormat, ImportType, classify, file_format
from agent.intake.check_process import CheckProcess, CheckRequest
from agent.intake.watch import Candidate, DropScanner, entry_problem, look_at
from agent.logs import file_fields
from agent.store.archive import Filer
from agent.store.fsutil import durable_moves, ensure_dir, fsync_dir
from agent.store.journal import FileRecord, FileState, Journal, iso_utc
from agent.units import counted

HASH_CHUNK = 1024 * 1024
QUEUE_FLUSH_BYTES = 8 * 1024 * 1024  # checked files are queued at least every this many bytes
QUEUE_FLUSH_SECONDS = 0.05  # and at least this often


def subfolder_of(source_path: Path, drop: Path) -> str | None:
    return None if source_path.parent == drop else source_path.parent.name


class Intake:
    """Claims and checks files; `on_queued` is told when a file is ready to send, `on_changed` of a
    file that changed while it was checked (it waits to be stable, then is checked again)."""

    def __init__(self, config: Config, journal: Journal, filer: Filer, scanner: DropScanner,
                 on_queued: Callable[[], None],
                 on_changed: Callable[[FileRecord], None] = lambda _record: None) -> None:
        self.config = config
        self.journal = journal
        self.filer = filer
        self.scanner = scanner
        self.on_queued = on_queued
        self._on_changed = on_changed
        # the duplicate check and the commit of what it let through are one step, whether intake
        # queues a checked file or an upload thread concludes a check made while sending
        self._admitting = threading.Lock()

    def claim_many(self, candidates: list[Candidate]) -> None:
        """Claim settled files as one batch: one commit for every row, then the renames, then one
        fsync per folder involved, then each file's check. Ordering 1 holds for each file (its row
        is durable before its rename; its rename is durable before its check commits)."""
        paths = []
        for path, _subfolder in candidates:
            looked = look_at(path)
            if looked is None:
                continue
            problem = looked[1]
            if problem:
                self.scanner.warn_once(path, problem)
                continue
            paths.append(path)
        if not paths:
            return
        spool = self.config.spool_dir
        records = self.journal.add_claims(paths, spool)
        ensure_dir(spool)
        moved: list[FileRecord] = []
        moves = [(Path(record.source_path), Path(record.local_path)) for record in records]
        errors = durable_moves(moves)
        for record, (source, _spooled), error in zip(records, moves, errors, strict=True):
            if isinstance(error, FileNotFoundError):
                self.journal.delete(record.id)  # taken away by its writer before we could claim it
            elif error is not None:
                self.journal.delete(record.id)
                logger.error("cannot claim {}: {}; it stays in drop/ and will be tried again",
                             record.source_path, error.strerror or error)
            else:
                self.scanner.forget(source)
                moved.append(record)
        if not moved:
            return
        ready: list[_Ready] = []  # checked files, queued with one commit
        ready_bytes = 0  # their bytes
        since = time.monotonic()
        try:
            for record in moved:
                waiting = len(ready)
                with logger.contextualize(file_id=record.id, file=record.name):
                    logger.debug("{} claimed", record.label)  # the "queued" or "failed" line follows
                    self._check(record, ready, while_sending=True)
                if len(ready) > waiting:
                    ready_bytes += ready[-1].record.size or 0
                # a big file or a slow check does not hold back the files checked before it
                if ready_bytes >= QUEUE_FLUSH_BYTES or time.monotonic() - since >= QUEUE_FLUSH_SECONDS:
                    self._queue(ready)
                    ready_bytes, since = 0, time.monotonic()
        finally:  # a file whose check failed does not hold back those checked before it
            self._queue(ready)

    def check_again(self, file_ids: list[int]) -> None:
        """Claimed files whose bytes changed after an earlier check, now stable: checked from scratch."""
        for file_id in file_ids:
            record = self.journal.get(file_id)
            if record.state == FileState.CLAIMED:  # not moved on meanwhile (e.g. by `retry`)
                self.check(record)

    def check(self, record: FileRecord) -> FileRecord:
        """Hash the claimed file, apply the import rules, fix the remote name, queue it."""
        with logger.contextualize(file_id=record.id, file=record.name):  # log records name the file
            ready: list[_Ready] = []
            record = self._check(record, ready)
            if not ready:  # refused, split or unreadable: already filed
                return record
            queued = self._queue(ready)
        return queued[0] if queued else self.journal.get(record.id)  # else: refused as a duplicate

    def _queue(self, ready: list[_Ready]) -> list[FileRecord]:
        """Queue checked files: their findings and remote names in one commit; nothing is sent
        before it. A file to be checked while it is sent is queued with its size and type only.
        Empties `ready`."""
        with self._admitting:
            ready[:] = self._refuse_duplicates(ready)
            if not ready:
                return []
            queued = self.journal.update_many([
                (item.record.id,
                 f"queued as {item.remote_name}" if item.remote_name else "queued; checked while it is sent",
                 {**item.checked, "state": FileState.QUEUED, "remote_name": item.remote_name})
                for item in ready
            ])
        for record, item in zip(queued, ready, strict=True):
            log = logger.bind(**file_fields(record))
            if item.deletes:
                log.warning("{} is a user-deletion file: sending it will permanently delete {}",
                            record.label, counted(item.deletes, "user"))
            if record.remote_name is None:
                log.info("{} queued ({}, {} bytes); checked in a worker process while it is sent, and"
                         " published only once the check passes", record.label, record.import_type,
                         record.size)
            else:
                log.info("{} queued as {} ({})", record.label, record.remote_name, record.import_type)
        ready.clear()
        self.on_queued()
        return queued

    def _check(self, record: FileRecord, ready: list[_Ready], while_sending: bool = False) -> FileRecord:
        """Check one claimed file: refused, split or duplicate are filed at once; a file to send is
        added to `ready` for `_queue`. `while_sending`: a large file may be queued unchecked, to be
        checked by a worker process while it is sent (`begin`, `conclude`)."""
        spool_path = Path(record.local_path)
        # One open for the whole check: the facts before, the check itself (admit reads this very
        # file), the facts after (the same file: one that changed meanwhile is checked again).
        try:
            handle, before = _open_checked(spool_path)
        except (_NotRegular, OSError) as exc:
            return self._unreadable(record, exc)
        with handle:
            if before.st_nlink > 1:
                verdict = None
            else:
                subfolder = subfolder_of(Path(record.source_path), self.config.paths.drop)
                if while_sending and self._check_while_sending(record, before.st_size, subfolder, ready):
                    return record
                # admit hashes while it validates (one read of the file, not two: bench/RESULTS.md round 2)
                verdict = admit(spool_path, record.name, subfolder, None, self.config.imports,
                                part=self._part_of(record), opened=handle)
                after = os.fstat(handle.fileno())
        if verdict is None:
            return self.filer.quarantine(record, hard_link_reason(record.name, before.st_nlink))
        size = before.st_size
        digest = verdict.sha256
        if digest is None:  # refused before its content was read, or not read to the end
            try:
                size, digest = _hash_regular_file(spool_path)
                after = _stat_regular(spool_path)
            except (_NotRegular, OSError) as exc:
                return self._unreadable(record, exc)
        if (after.st_size, after.st_mtime_ns, size) != (before.st_size, before.st_mtime_ns, after.st_size):
            logger.warning("{} changed while it was being checked; checking it again once it is stable",
                           record.label)
            self._on_changed(record)
            return record
        return self._decide(record, verdict, size, digest, ready)

    def _decide(self, record: FileRecord, verdict: Admission, size: int, digest: str,
                ready: list[_Ready]) -> FileRecord:
        """What the rules' verdict means for a checked file: filed (refused, split), or added to
        `ready` (the duplicate check and the commit follow)."""
        checked: dict[str, Any] = {"size": size, "sha256": digest, "import_type": verdict.import_type}
        if verdict.refusal is not None:
            record = self.journal.update(record.id, **checked)
            return self.filer.quarantine(record, verdict.refusal, verdict.errors_csv)
        if verdict.split_format is not None:
            return self._split(self.journal.update(record.id, **checked), verdict.split_format)
        # The duplicate check (one query for the batch), then the check's findings and the queueing
        # in one commit (`_queue`): nothing is sent before it.
        ready.append(_Ready(dataclasses.replace(record, **checked), checked, str(verdict.remote_name),
                            verdict.deletes))
        return record

    def _check_while_sending(self, record: FileRecord, size: int, subfolder: str | None,
                             ready: list[_Ready]) -> bool:
        """Queue a large file with its size and type only (no remote name yet), to be checked in a
        worker process while its bytes are sent; False when it is checked first as usual: too small,
        over the limits (split), a user-deletion file (its warning names the users before the first
        byte), a part, typed only by `--type`, named wrongly (refused at once), or the API route."""
        threshold = self.config.upload.check_while_sending_bytes
        if (not threshold or size < threshold or size > self.config.imports.max_file_bytes
                or self.config.upload.transport != Transport.SFTP):
            return False
        typed = classify(record.name, subfolder, self.config.imports)
        if (typed.import_type is None or typed.import_type == ImportType.DELETE_USERS
                or not isinstance(file_format(record.name), FileFormat) or self._part_of(record) is not None):
            return False
        checked: dict[str, Any] = {"size": size, "sha256": None, "import_type": typed.import_type}
        ready.append(_Ready(dataclasses.replace(record, **checked), checked, None, 0))
        return True

    def begin(self, record: FileRecord) -> CheckProcess:
        """Start checking a file queued unchecked (`_check_while_sending`) in a worker process; the
        uploader sends its bytes meanwhile and hands the report to `conclude`."""
        fmt = file_format(record.name)
        if not isinstance(fmt, FileFormat) or record.import_type is None:
            raise ValueError(f"{record.label} has no import type or format to be checked as")
        limits = self.config.imports
        return CheckProcess(CheckRequest(record.local_path, ImportType(record.import_type), fmt,
                                         limits.max_file_bytes, limits.max_records))

    def conclude(self, record: FileRecord, report: ValidationReport,
                 discard: Callable[[], None]) -> FileRecord | None:
        """The rules' verdict on a file checked while it was sent, as `_check` gives it for any other
        file. Returns the row with its findings and remote name committed (its state unchanged: the
        uploader renames next), or None when the file was filed instead (refused, split, duplicate).
        `discard` removes what was sent of a duplicate before it is filed (a crash in between checks
        it again); the uploader removes a refused or split file's bytes before asking."""
        with logger.contextualize(file_id=record.id, file=record.name):
            subfolder = subfolder_of(Path(record.source_path), self.config.paths.drop)
            verdict = admit(record.local_path, record.name, subfolder, None, self.config.imports,
                            report=report)
            ready: list[_Ready] = []
            self._decide(record, verdict, int(record.size or report.bytes), str(verdict.sha256), ready)
            with self._admitting:
                keep, duplicates = self._duplicates(ready)
                if keep:
                    item = keep[0]
                    return self.journal.update(record.id, f"checked while it was sent; to be published as"
                                               f" {item.remote_name}", **item.checked,
                                               remote_name=item.remote_name)
            if duplicates:  # outside the lock: the removal is a round trip to the server
                discard()
                self._file_duplicates(duplicates)
            return None

    def _unreadable(self, record: FileRecord, exc: Exception) -> FileRecord:
        if isinstance(exc, _NotRegular):
            return self.filer.quarantine(record, f"{record.name} {exc}; it was not read")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return self.filer.quarantine(
            record, f"{record.name} could not be read ({reason}); check its permissions and drop it again"
        )

    def _part_of(self, record: FileRecord) -> PartOf | None:
        """For a part cut by `_split`: its original's name, hash and folder, and k of n."""
        numbers = part_numbers(record.name)  # first: most names are not a part's
        if numbers is None:
            return None
        parent_id = spool_part_of(Path(record.source_path), self.config.spool_dir)
        if parent_id is None:
            return None
        try:
            parent = self.journal.get(parent_id)
        except KeyError:  # an adopted part whose original's row was lost: checked on its own
            return None
        if parent.sha256 is None:
            return None
        return PartOf(parent.name, parent.sha256,
                      subfolder_of(Path(parent.source_path), self.config.paths.drop), *numbers)

    def _refuse_duplicates(self, ready: list[_Ready]) -> list[_Ready]:
        """File to failed/ each checked file whose content and type another file not refused already
        has (`_duplicates`); the others, to be queued."""
        keep, duplicates = self._duplicates(ready)
        self._file_duplicates(duplicates)
        return keep

    def _file_duplicates(self, duplicates: list[tuple[_Ready, str]]) -> None:
        for item, reason in duplicates:
            with logger.contextualize(file_id=item.record.id, file=item.record.name):
                record = self.journal.update(item.record.id, **item.checked)
                self.filer.quarantine(record, reason)

    def _duplicates(self, ready: list[_Ready]) -> tuple[list[_Ready], list[tuple[_Ready, str]]]:
        """The checked files to queue, and those (with the reason) whose content and type another
        file not refused already has (queued, being sent, sent, or earlier in this batch) within
        imports.duplicate_window_days, unless `retry` forced it."""
        window = self.config.imports.duplicate_window_days
        keys = [None if item.record.force_resend or item.record.sha256 is None  # checked while sent
                else (str(item.record.sha256), str(item.record.import_type)) for item in ready]
        if window <= 0 or not any(keys):
            return ready, []
        since = iso_utc(datetime.now(UTC) - timedelta(days=window))
        earlier = self.journal.find_duplicates({key for key in keys if key is not None}, since,
                                               exclude={item.record.id for item in ready})
        first: dict[tuple[str, str], tuple[FileRecord, str]] = {
            key: (record, str(record.remote_name)) for key, record in earlier.items()}
        keep, duplicates = [], []
        for item, key in zip(ready, keys, strict=True):
            taken = first.get(key) if key is not None else None
            if taken is None:
                if key is not None:
                    first[key] = (item.record, str(item.remote_name))  # later copies in this batch
                keep.append(item)
            else:
                duplicates.append((item, duplicate_reason(item.record, *taken, window)))
        return keep, duplicates

    def _split(self, record: FileRecord, fmt: FileFormat) -> FileRecord:
        """Cut a valid, oversized file into parts; each part becomes a file of its own.

        The parts are written to a staging folder; then one transaction records every part and the
        original's move to archive/ (state `split`); a crash before that commit splits again.
        """
        staging = self.config.spool_dir / f"split-{record.id:08d}"
        if staging.exists():
            shutil.rmtree(staging)  # parts of an attempt a crash cut short; no row names them
        staging.mkdir()
        limits = self.config.imports
        try:
            parts = split_file(record.local_path, fmt, limits.max_file_bytes, limits.max_records, staging,
                               move=durable_moves, name=record.name)
        except SplitError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            return self.filer.quarantine(
                record, f"{record.name} is too large for one upload and could not be split: {exc}."
                " Split it by hand into files within the limits and drop those; nothing was sent."
            )
        fsync_dir(self.config.spool_dir)
        dest = self.filer.archive_destination(record)
        part_records = self.journal.add_parts(record, parts, dest, FileState.SPLIT)
        logger.info("{} is over the per-file limits; split into {} parts", record.label, len(parts))
        self.filer.finish_move(self.journal.get(record.id))
        for part in part_records:
            self.check(part)
        return self.journal.get(record.id)


def hard_link_reason(name: str, links: int) -> str:
    return (
        f"{name} has {links} hard links: another name could change its bytes while it is being sent,"
        " so it was not taken. Copy the file into drop/ (cp, or write it elsewhere and mv it in)"
        " instead of linking it; nothing was sent."
    )


def duplicate_reason(record: FileRecord, earlier: FileRecord, sent_as: str, window_days: float) -> str:
    where = (f"sent as {sent_as}" if earlier.state not in (FileState.CLAIMED, FileState.QUEUED,
                                                           FileState.UPLOADING, FileState.PUBLISHING)
             else f"now {earlier.state.value}, to be sent as {sent_as}")
    return (
        f"{record.name} was not uploaded: the same content (SHA-256 {record.sha256}) was already taken"
        f" as a {record.import_type} import within the last {window_days:g} days: file #{earlier.id}"
        f" {earlier.name!r}, claimed {earlier.created_at}, {where}. Sending it again would import the"
        f" same records twice. If that is what you want, run `saasquatch-agent retry {record.id}` (it"
        " forces the resend), or set imports.duplicate_window_days = 0 to turn this check off."
    )


class _NotRegular(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class _Ready:
    """A checked file waiting for the commit that queues it."""

    record: FileRecord
    checked: dict[str, Any]  # size, sha256, import_type
    remote_name: str | None  # None: to be checked while it is sent (no hash, so no name yet)
    deletes: int  # users a deletion file removes (logged as a warning)


def _stat_regular(path: Path) -> os.stat_result:
    """lstat-like facts of a regular file, refusing anything else (no link followed, no FIFO blocks)."""
    return _open_regular(path, read=False)[2]


def _hash_regular_file(path: Path) -> tuple[int, str]:
    size, digest, _info = _open_regular(path, read=True)
    return size, digest


def _open_checked(path: Path) -> tuple[io.FileIO, os.stat_result]:
    """The file opened for reading and its fstat, refusing anything but a regular file (no link is
    followed, no FIFO blocks)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: a symlink was swapped in
            raise _NotRegular("is a symbolic link") from None
        raise
    try:
        info = os.fstat(fd)
        problem = entry_problem(info.st_mode)
        if problem:
            raise _NotRegular(problem)
        return io.FileIO(fd, "rb", closefd=True), info
    except BaseException:
        os.close(fd)
        raise


def _open_regular(path: Path, read: bool) -> tuple[int, str, os.stat_result]:
    """Size and SHA-256, refusing anything but a regular file (no link is followed, no FIFO blocks).
    With read=False only the checks and the size (the SHA-256 is then "")."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: a symlink was swapped in
            raise _NotRegular("is a symbolic link") from None
        raise
    if not read:
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        problem = entry_problem(info.st_mode)
        if problem:
            raise _NotRegular(problem)
        return info.st_size, "", info
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        problem = entry_problem(info.st_mode)
        if problem:
            raise _NotRegular(problem)
        digest = hashlib.sha256()
        size = 0
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest(), info
