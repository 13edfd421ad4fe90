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

from loguru import logger

from agent.config import Config
from agent.fsutil import durable_move, durable_moves, ensure_dir, unique_path, write_durably
from agent.journal import FileRecord, FileState, Journal


class Filer:
    def __init__(self, config: Config, journal: Journal) -> None:
        self.config = config
        self.journal = journal
        self.on_failed: Callable[[FileRecord], None] | None = None  # notify hook (agent.lifecycle)
        # destinations chosen but not yet moved into: with several upload threads (upload.concurrency)
        # two files of the same name must never get the same free name (the second rename would
        # replace the first file). Released when the move is done (finish_move).
        self._names_lock = threading.Lock()
        self._reserved: dict[Path, str] = {}  # destination -> tag (journal id) of the file it is for
        self._split_lock = threading.Lock()  # moves out of spool/split-<id>/ and that folder's removal

    def _reserve(self, folder: Path, name: str, tag: str) -> Path:
        """folder/name, or folder/<stem>-<tag><suffix> when that is taken or reserved (tag: the id)."""
        with self._names_lock:
            dest = unique_path(folder, name, tag)
            if self._reserved.get(dest, tag) != tag:  # another file's; its own again after a failed move
                stem, dot, suffix = name.partition(".")
                dest = folder / (f"{stem}-{tag}{dot}{suffix}" if dot else f"{name}-{tag}")
            self._reserved[dest] = tag
            return dest

    def archive_destination(self, record: FileRecord) -> Path:
        today = datetime.now(UTC)
        folder = self.config.paths.archive / f"{today:%Y}" / f"{today:%m}" / f"{today:%d}"
        return self._reserve(folder, record.name, str(record.id))

    def archive(self, record: FileRecord) -> FileRecord:
        if record.pending_path and record.pending_state == FileState.ARCHIVED:
            record = self.resume_move(record)  # an earlier attempt chose (and may have moved into) it
        else:
            dest = self.archive_destination(record)
            record = self.journal.update(record.id, pending_path=dest, pending_state=FileState.ARCHIVED)
            record = self.finish_move(record)
        logger.bind(file_id=record.id, file=record.name).info(
            "{} archived to {}", record.label, record.local_path)
        return record

    def quarantine(self, record: FileRecord, reason: str, errors_csv: str | None = None) -> FileRecord:
        """Move the file, unchanged, to failed/ with <name>.reason.txt (and .errors.csv) beside it."""
        dest = self._reserve(self.config.paths.failed, record.name, str(record.id))
        record = self.journal.update(
            record.id, pending_path=dest, pending_state=FileState.FAILED, error=reason
        )
        if errors_csv is not None:
            write_durably(dest.with_name(dest.name + ".errors.csv"), errors_csv)
        write_durably(dest.with_name(dest.name + ".reason.txt"), reason.rstrip() + "\n")
        if os.path.lexists(record.local_path):
            record = self.finish_move(record)
        else:
            # Nothing left to move (the file vanished before it was claimed); the reason says so.
            record = self.journal.update(
                record.id, state=FileState.FAILED, pending_path=None, pending_state=None,
                next_attempt_at=None, message=reason,
            )
            with self._names_lock:
                self._reserved.pop(dest, None)
        logger.bind(file_id=record.id, file=record.name).error(
            "{} failed: {} (see {})", record.label, reason, dest.name + ".reason.txt")
        if self.on_failed is not None:
            self.on_failed(record)
        return record

    def finish_move(self, record: FileRecord) -> FileRecord:
        """Do the move the journal holds as an intent, then record it as done."""
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
        with self._names_lock:
            self._reserved.pop(Path(record.pending_path), None)  # taken now: unique_path sees it
        return self.journal.update(
            record.id, state=FileState(record.pending_state), local_path=record.pending_path,
            pending_path=None, pending_state=None, next_attempt_at=None,
        )

    def finish_moves(self, records: list[FileRecord]) -> list[FileRecord]:
        """`finish_move` for a batch (the upload pipeline's archive step): every rename, then one
        fsync per folder involved, then one commit. Each file's ordering is `finish_move`'s: its
        move is durable before the journal says it is done."""
        single = [record for record in records if not self._plain_spool_file(record)]
        batch = [record for record in records if self._plain_spool_file(record)]
        done = {record.id: self.finish_move(record) for record in single}
        for folder in {Path(str(record.pending_path)).parent for record in batch}:
            ensure_dir(folder)
        errors = durable_moves([(Path(record.local_path), Path(str(record.pending_path)))
                                for record in batch])
        moved = [record for record, error in zip(batch, errors, strict=True) if error is None]
        done.update((record.id, record) for record in self.journal.update_many([
            (record.id, None, {"state": FileState(str(record.pending_state)),
                               "local_path": record.pending_path, "pending_path": None,
                               "pending_state": None, "next_attempt_at": None})
            for record in moved
        ]))
        with self._names_lock:
            for record in moved:
                self._reserved.pop(Path(str(record.pending_path)), None)
        failure = next((error for error in errors if error is not None), None)
        if failure is not None:  # those moved are recorded; the rest keep their intent and retry
            raise failure
        return [done[record.id] for record in records]

    def _plain_spool_file(self, record: FileRecord) -> bool:
        """A file straight in spool/ (not a part in spool/split-<id>/, whose folder needs care)."""
        return Path(record.local_path).parent == self.config.spool_dir

    def resume_move(self, record: FileRecord) -> FileRecord:
        """Finish a move a crash interrupted: redo the rename, or record the one already done."""
        assert record.pending_path and record.pending_state
        if os.path.lexists(record.local_path):
            if record.pending_state == FileState.FAILED:
                return self.quarantine(record, record.error or "refused (reason lost in a crash)")
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
