"""Filing a file away: archive/ after a verified upload, failed/ with a reason when refused.

Every move is journaled as an intent first (pending_path, pending_state), then done by rename,
then recorded as done. Recovery finishes whichever half a crash interrupted (`resume_move`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from loguru import logger

from agent.config import Config
from agent.logs import file_fields
from agent.store.fsutil import durable_move, durable_moves, ensure_dir, write_durably
from agent.store.journal import FileRecord, FileState, Journal

SERVER_INFIX = ".server."  # <name>.server.<remote status file>: the server's files, downloaded
SIDE_SUFFIXES = (".gz", ".reason.txt", ".errors.csv")  # with SERVER_INFIX: every name written beside one


def move_message(record: FileRecord) -> str:
    """The event message of a finished move: where the file went and why (`history`)."""
    state = FileState(str(record.pending_state))
    if state in (FileState.FAILED, FileState.STALE):
        return f"{' '.join((record.error or 'refused').split())} (moved to {record.pending_path})"
    if state == FileState.SPLIT:
        return (f"over the per-file limits, so its parts are sent instead; the original is kept in"
                f" {record.pending_path}")
    return f"moved to {record.pending_path}"


class Filer:
    """Journaled moves into archive/ and failed/; `on_failed` is told of each file filed as failed
    (the notification hook, wired in agent.service)."""

    def __init__(self, config: Config, journal: Journal, *,
                 on_failed: Callable[[FileRecord], None] = lambda _record: None) -> None:
        self.config = config
        self.journal = journal
        self._on_failed = on_failed
        # destinations chosen but not yet moved into: with several upload threads (upload.concurrency)
        # two files of the same name must never get the same free name (the second rename would
        # replace the first file). Released when the move is done (finish_move).
        self._names_lock = threading.Lock()
        # folder -> {name: tag (journal id) of the file it is for}: the destinations reserved there
        self._reserved: dict[Path, dict[str, str]] = {}
        # folder -> those of its reserved names that are `<base>.server.<...>` (the server's files; few):
        # what `_free` scans for a reserved `<candidate>.server.*`, not every reservation per candidate
        self._reserved_server: dict[Path, set[str]] = {}
        self._split_lock = threading.Lock()  # moves out of spool/split-<id>/ and that folder's removal

    def _reserve(self, folder: Path, name: str, tag: str) -> Path:
        """folder/name, or folder/<stem>-<tag><suffix> (then -<tag>-2, ...) when that is taken.

        A name is free only when none of the names the agent may write for it (`side_names`: the
        data, `.gz`, `.reason.txt`, `.errors.csv`, `.server.*`) exists or is reserved for another
        file, and it is not itself a side name of an existing or reserved file (`foo.csv.gz` while
        `foo.csv` is there). Reserved until the move into it is done (`finish_move`).
        """
        with self._names_lock:
            return self._reserve_locked(folder, name, tag, _listing(folder))

    def _reserve_locked(self, folder: Path, name: str, tag: str, listing: _Listing | None) -> Path:
        """`_reserve` with _names_lock held and `listing` the folder's `_listing` (None: no usable
        folder), taken under the same hold: the names reserved meanwhile are in `_reserved`, and
        every name the agent puts in these folders is reserved before it is written."""
        stem, dot, suffix = name.partition(".")
        for attempt in range(1, 10_000):
            candidate = (name if attempt == 1 else
                         f"{stem}-{tag}{'' if attempt == 2 else f'-{attempt - 1}'}{dot}{suffix}")
            if self._free(folder, candidate, tag, listing):
                self._reserved.setdefault(folder, {})[candidate] = tag
                if SERVER_INFIX in candidate:
                    self._reserved_server.setdefault(folder, set()).add(candidate)
                return folder / candidate
        raise FileExistsError(f"no free name for {name!r} in {folder}")

    def _free(self, folder: Path, candidate: str, tag: str, listing: _Listing | None) -> bool:
        """Called with _names_lock held."""
        reserved = self._reserved.get(folder, {})
        if reserved.get(candidate) == tag:  # its own, again after a failed move
            return True

        def taken(name: str) -> bool:
            if name in reserved:
                return True
            return name in listing.names if listing is not None else os.path.lexists(folder / name)

        if any(taken(candidate + side) for side in ("", *SIDE_SUFFIXES)):
            return False
        bases = [candidate[:-len(side)] for side in SIDE_SUFFIXES if candidate.endswith(side)]
        start = candidate.find(SERVER_INFIX)
        while start > 0:  # <base>.server.<remote file>: every prefix that could be such a base
            bases.append(candidate[:start])
            start = candidate.find(SERVER_INFIX, start + 1)
        if any(base and taken(base) for base in bases):
            return False
        prefix = f"{candidate}{SERVER_INFIX}"  # a reserved <candidate>.server.* in folder
        if any(name.startswith(prefix) for name in self._reserved_server.get(folder, ())):
            return False
        return listing is None or candidate not in listing.server_bases  # no <candidate>.server.* on disk

    def _release(self, *destinations: Path) -> None:
        """The moves into these are done (or will not happen): their names are no longer reserved."""
        with self._names_lock:
            for dest in destinations:
                folder, name = dest.parent, dest.name
                reserved = self._reserved.get(folder)
                if reserved is not None and reserved.pop(name, None) is not None and not reserved:
                    del self._reserved[folder]
                server = self._reserved_server.get(folder)
                if server is not None:
                    server.discard(name)
                    if not server:
                        del self._reserved_server[folder]

    def _archive_folder(self) -> Path:
        today = datetime.now(UTC)
        return self.config.paths.archive / f"{today:%Y}" / f"{today:%m}" / f"{today:%d}"

    def archive_destination(self, record: FileRecord) -> Path:
        return self._reserve(self._archive_folder(), record.name, str(record.id))

    def archive_destinations(self, records: list[FileRecord]) -> list[Path]:
        """`archive_destination` for a batch, the day's folder listed once for all of them (listing it
        per file made a day of many files quadratic: bench/RESULTS.md round 4)."""
        folder = self._archive_folder()
        with self._names_lock:
            listing = _listing(folder)
            return [self._reserve_locked(folder, record.name, str(record.id), listing) for record in records]

    def failed_destination(self, record: FileRecord) -> Path:
        return self._reserve(self.config.paths.failed, record.name, str(record.id))

    def archive(self, record: FileRecord) -> FileRecord:
        if record.pending_path and record.pending_state == FileState.ARCHIVED:
            record = self.resume_move(record)  # an earlier attempt chose (and may have moved into) it
        else:
            dest = self.archive_destination(record)
            record = self.journal.update(record.id, pending_path=dest, pending_state=FileState.ARCHIVED)
            record = self.finish_move(record)
        logger.bind(**file_fields(record)).info("{} archived to {}", record.label, record.local_path)
        return record

    def quarantine(self, record: FileRecord, reason: str, errors_csv: str | None = None, *,
                   state: FileState = FileState.FAILED, dest: Path | None = None,
                   message: str | None = None) -> FileRecord:
        """Move the file, unchanged, to failed/ with <name>.reason.txt (and .errors.csv) beside it.

        The destination is committed as an intent first; the side files are written after it, so
        finishing an interrupted quarantine may write them again (they are this row's own). When
        failed/ cannot take the file (not a folder, no permission, disk full) the row gets its
        final state with the intent kept and the file stays where it is; `resume_held` (the
        archive job, `run --once`, start-up) finishes the move once failed/ works again.
        """
        resuming = record.pending_path is not None and record.pending_state == state
        if resuming:
            dest = Path(str(record.pending_path))
        else:
            dest = dest or self.failed_destination(record)
            record = self.journal.update(record.id, pending_path=dest, pending_state=state, error=reason,
                                         message=message)
        try:
            if errors_csv is not None:
                write_durably(dest.with_name(dest.name + ".errors.csv"), errors_csv, replace=resuming)
            write_durably(dest.with_name(dest.name + ".reason.txt"), reason.rstrip() + "\n",
                          replace=resuming)
            if os.path.lexists(record.local_path):
                record = self.finish_move(record)
            else:
                # Nothing left to move (the file vanished before it was claimed); the reason says so.
                record = self.journal.update(
                    record.id, state=state, pending_path=None, pending_state=None,
                    next_attempt_at=None, message=reason,
                )
                self._release(dest)
        except OSError as exc:
            return self._hold(record, state, dest, exc)
        logger.bind(**file_fields(record)).error("{} {}: {} (see {})", record.label, state.value, reason,
                                                 dest.name + ".reason.txt")
        if state == FileState.FAILED:
            self._on_failed(record)
        return record

    def _hold(self, record: FileRecord, state: FileState, dest: Path, exc: OSError) -> FileRecord:
        """failed/ cannot take the file now: final state, intent kept, the file stays where it is."""
        why = exc.strerror or str(exc)
        text = (f"{record.label} is {state.value} ({record.error}) but cannot be filed in {dest.parent}"
                f" ({why}); it stays in {record.local_path} and moves to {dest} as soon as"
                f" {dest.parent} works again (checked every minute)")
        logger.bind(**file_fields(record) | {"state": state.value}).error(text)
        if record.state == state:
            return record
        return self.journal.update(record.id, state=state, message=f"cannot file in {dest.parent}: {why};"
                                   f" stays in {record.local_path}")

    def resume_held(self) -> int:
        """Finish the moves to failed/ that waited for it to work again; how many are done."""
        done = 0
        held = self.journal.query("WHERE pending_path IS NOT NULL AND state IN (?, ?)",
                                  (FileState.FAILED.value, FileState.STALE.value))
        for record in held:
            try:
                record = self.resume_move(record)
            except OSError as exc:
                logger.warning("{}: move to {} still waits: {}", record.label, record.pending_path, exc)
                continue
            done += record.pending_path is None
        return done

    def finish_move(self, record: FileRecord) -> FileRecord:
        """Do the move the journal holds as an intent, then record it as done. When another writer
        put something at an archive destination after it was chosen, the file is archived under the
        next free name (`_rename_intent`); what is there stays."""
        try:
            return self._finish_move(record)
        except FileExistsError:
            if record.pending_state != FileState.ARCHIVED:
                raise
            return self._finish_move(self._rename_intent(record))

    def _rename_intent(self, record: FileRecord) -> FileRecord:
        """The row's archive intent moved to the next free name of its folder (committed first)."""
        taken = Path(str(record.pending_path))
        self._release(taken)
        dest = self._reserve(taken.parent, record.name, str(record.id))
        logger.bind(**file_fields(record)).warning(
            "{}: {} appeared in {} after it was chosen as this file's archive name (not written by the"
            " agent; left as it is); archiving the file as {} instead", record.label, taken.name,
            taken.parent, dest.name)
        return self.journal.update(record.id, pending_path=dest,
                                   message=f"{taken} was taken by another writer; archiving as {dest.name}")

    def _finish_move(self, record: FileRecord) -> FileRecord:
        """The move of the row's intent, then its record (FileExistsError: the destination is taken)."""
        assert record.pending_path and record.pending_state
        source = Path(record.local_path)
        in_split = source.parent.parent == self.config.spool_dir and source.parent.name.startswith("split-")
        # parts of one split file may be filed by several upload threads: the folder is removed only
        # when no other move out of it (and its fsync of the folder) is in progress
        with self._split_lock if in_split else contextlib.nullcontext():
            durable_move(source, Path(record.pending_path))
            if in_split:
                with contextlib.suppress(OSError):  # the last part of a split file leaves: drop its folder
                    source.parent.rmdir()
        self._release(Path(record.pending_path))  # taken now: _free sees it on disk
        return self.journal.update(
            record.id, state=FileState(record.pending_state), local_path=record.pending_path,
            pending_path=None, pending_state=None, next_attempt_at=None, message=move_message(record),
        )

    def finish_moves(self, records: list[FileRecord]) -> list[FileRecord]:
        """`finish_move` for a batch (the upload pipeline's archive step): every rename, then one
        fsync per folder involved, then one commit. Each file's ordering is `finish_move`'s: its
        move is durable before the journal says it is done. A file straight in spool/ is moved
        with the batch; a part in spool/split-<id>/ (whose folder needs care) on its own. `records`
        are as the journal holds them (just read back): the rows returned are them with the move applied."""
        spool = str(self.config.spool_dir)
        single = [record for record in records if os.path.dirname(record.local_path) != spool]
        batch = [record for record in records if os.path.dirname(record.local_path) == spool]
        done = {record.id: self.finish_move(record) for record in single}
        moves = [(Path(record.local_path), Path(str(record.pending_path))) for record in batch]
        for folder in {dest.parent for _source, dest in moves}:
            ensure_dir(folder)
        errors = durable_moves(moves)
        moved = [(record, dest) for record, (_source, dest), error in zip(batch, moves, errors, strict=True)
                 if error is None]
        for index, (record, error) in enumerate(zip(batch, errors, strict=True)):
            if isinstance(error, FileExistsError) and record.pending_state == FileState.ARCHIVED:
                done[record.id] = self._finish_move(self._rename_intent(record))  # the next free name
                errors[index] = None
        done.update((record.id, record) for record in self.journal.update_many([
            (record.id, move_message(record), {"state": FileState(str(record.pending_state)),
                               "local_path": record.pending_path, "pending_path": None,
                               "pending_state": None, "next_attempt_at": None})
            for record, _dest in moved
        ], known={record.id: record for record, _dest in moved}))
        self._release(*(dest for _record, dest in moved))
        failure = next((error for error in errors if error is not None), None)
        if failure is not None:  # those moved are recorded; the rest keep their intent and retry
            raise failure
        return [done[record.id] for record in records]

    def resume_move(self, record: FileRecord) -> FileRecord:
        """Finish a move a crash interrupted: redo the rename, or record the one already done."""
        assert record.pending_path and record.pending_state
        if os.path.lexists(record.local_path):
            if record.pending_state in (FileState.FAILED, FileState.STALE):
                return self.quarantine(record, record.error or "refused (reason lost in a crash)",
                                       state=FileState(record.pending_state))
            return self.finish_move(record)
        if os.path.lexists(record.pending_path):
            return self.journal.update(
                record.id, state=FileState(record.pending_state), local_path=record.pending_path,
                pending_path=None, pending_state=None, next_attempt_at=None,
                message="move finished by recovery",
            )
        raise FileNotFoundError(
            f"{record.label}: neither {record.local_path} nor {record.pending_path} exists"
        )


class _Listing(NamedTuple):
    """A folder's entries, listed once for a batch of reservations."""

    names: frozenset[str]
    server_bases: frozenset[str]  # every name some `<name>.server.<...>` entry starts with


def _listing(folder: Path) -> _Listing | None:
    """The folder's names, and every name that some `<name>.server.<...>` entry of it starts with (each
    prefix before a SERVER_INFIX), so one set lookup per candidate name replaces a look at the disk
    or a scan of the folder. None when there is no folder (yet) or it cannot be listed: names are
    then looked up one by one (the move into it says what is wrong, and waits)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    bases = set()
    for name in [name for name in names if SERVER_INFIX in name]:  # few: the server's files
        start = name.find(SERVER_INFIX)
        while start > 0:
            bases.add(name[:start])
            start = name.find(SERVER_INFIX, start + 1)
    return _Listing(frozenset(names), frozenset(bases))
