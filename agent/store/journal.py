"""The journal: one SQLite row per file, the single truth about where each file is.

WAL mode with synchronous=FULL, so a committed transition survives a power cut. One connection,
guarded by a lock, is shared by the daemon's threads; readers such as `status` open their own.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent.errors import AgentError

SPOOL_NAME_BYTES = 120  # the original-name part of a spool name, at most (UTF-8)
_SPOOL_NAME = re.compile(r"([0-9]{8,})(?:_(.*))?", re.DOTALL)


def spool_name(file_id: int, name: str) -> str:
    """`<id:08d>_<original name>`: a spool file says which row and which file it is, so a lost
    journal strands nothing. The name is made one safe path component (no `/`, no control
    characters) and kept under SPOOL_NAME_BYTES, its extension kept."""
    safe = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in name) or "_"
    if len(safe.encode()) > SPOOL_NAME_BYTES:
        stem, dot, ext = safe.rpartition(".")
        ext = f".{ext}" if dot and stem and len(ext.encode()) <= 16 else ""
        stem = safe[: len(safe) - len(ext)]
        while len((stem + ext).encode()) > SPOOL_NAME_BYTES:
            stem = stem[:-1]
        safe = stem + ext
    return f"{file_id:08d}_{safe}"


def parse_spool_name(file_name: str) -> tuple[int, str] | None:
    """(row id, original name) from a spool file name; an old `<id>` name gives the id as name."""
    found = _SPOOL_NAME.fullmatch(file_name)
    if not found:
        return None
    return int(found[1]), found[2] if found[2] else file_name


class JournalError(AgentError):
    """The journal cannot be opened or read (damaged, not a database); the message is one line
    that says what to do."""


def journal_error(path: Path, exc: BaseException) -> JournalError | None:
    """The operator's line for a damaged journal, or None when `exc` is another kind of fault
    (locked, disk full: those are retried, not repaired)."""
    text = str(exc)
    damaged = ("malformed", "not a database", "file is encrypted", "disk image", "no such table",
               "no such column", "database corrupt")
    if isinstance(exc, JournalError):
        return exc
    if not isinstance(exc, sqlite3.DatabaseError) or not any(word in text for word in damaged):
        return None
    return JournalError(
        f"the journal {path} is damaged ({text}); nothing was changed. Stop the agent, then run"
        " `saasquatch-agent journal rebuild` (it moves the damaged file aside, restores the latest"
        " backup and adopts the files in the spool); `saasquatch-agent journal check` shows what it finds")


class FileState(StrEnum):
    CLAIMED = "claimed"  # row written; the file is being moved into the spool and checked
    QUEUED = "queued"  # in the spool, checked, remote name fixed, waiting to be sent
    UPLOADING = "uploading"  # an upload started; the remote side may hold a temporary file
    PUBLISHING = "publishing"  # the temporary file is complete (size checked); renaming it to the final name
    UPLOADED = "uploaded"  # published under its final remote name, verified by size
    ARCHIVED = "archived"  # final: local copy in archive/
    FAILED = "failed"  # final: local copy in failed/ with a reason file
    SPLIT = "split"  # final: over the limits, sent as parts (rows of their own); original archived
    # the remote lifecycle (status.mode other than "none"; agent/transport/remote_status.py): in the spool
    ACCEPTED = "accepted"  # the server took the file (consumed it, or a status file said so)
    PROCESSING = "processing"  # a status file says the import job is running
    COMPLETED = "completed"  # the server said the job completed; being archived
    STALE = "stale"  # final: no verdict within status.timeout of the upload; local copy in failed/
    # the API route (upload.transport = "api", agent/pipeline/api_upload.py): createJob was (maybe)
    # sent and its answer is not recorded yet; found so after a crash, the file waits for the operator
    STARTING = "starting"


_STATES = {state.value: state for state in FileState}
FINAL_STATES = frozenset({FileState.ARCHIVED, FileState.FAILED, FileState.SPLIT, FileState.STALE})
SENDING_STATES = (FileState.QUEUED, FileState.UPLOADING, FileState.PUBLISHING)  # the upload is not done
ACTIVE_STATES = (*SENDING_STATES, FileState.UPLOADED)  # work left to do

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    source_path TEXT NOT NULL,
    local_path TEXT NOT NULL,
    pending_path TEXT,
    pending_state TEXT,
    size INTEGER,
    sha256 TEXT,
    import_type TEXT,
    remote_name TEXT,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    next_attempt_at REAL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    force_resend INTEGER NOT NULL DEFAULT 0,
    adopted INTEGER NOT NULL DEFAULT 0,
    api_file_ref TEXT,
    api_job_id TEXT,
    records_processed INTEGER,
    resume_point TEXT
);
CREATE INDEX IF NOT EXISTS files_state ON files (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS files_state_id ON files (state, id);  -- next_sendable: oldest first, O(log n)
CREATE INDEX IF NOT EXISTS files_sha256 ON files (sha256);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    file_id INTEGER NOT NULL,
    at TEXT NOT NULL,
    state TEXT NOT NULL,
    message TEXT
);
CREATE INDEX IF NOT EXISTS events_file ON events (file_id);
"""

_COLUMNS = (
    "id", "name", "source_path", "local_path", "pending_path", "pending_state", "size", "sha256",
    "import_type", "remote_name", "state", "attempts", "error", "next_attempt_at", "created_at",
    "updated_at", "force_resend", "adopted", "api_file_ref", "api_job_id", "records_processed",
    "resume_point",
)
_UPDATABLE = frozenset(_COLUMNS) - {"id", "created_at", "updated_at"}
_STATE_INDEX = _COLUMNS.index("state")
_SELECT_FILES = f"SELECT {', '.join(_COLUMNS)} FROM files"


def _column_value(value: Any) -> Any:
    """What SQLite stores for a field value: an enum's value, a path's text, else the value."""
    if isinstance(value, StrEnum):
        return value.value
    return str(value) if isinstance(value, Path) else value


def _changed(record: FileRecord, fields: Mapping[str, Any], now: str) -> FileRecord:
    """`record` with `fields` as the journal now holds them (what `from_row` would read back)."""
    values = {key: _column_value(value) for key, value in fields.items()}
    if "state" in values:
        values["state"] = _STATES.get(values["state"]) or FileState(values["state"])
    changed = object.__new__(FileRecord)
    changed.__dict__.update(record.__dict__, **values, updated_at=now)
    return changed


def iso_utc(moment: datetime) -> str:
    """ISO 8601 in UTC with a Z, as the journal stores and `status --json` prints times."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now_iso() -> str:
    return iso_utc(datetime.now(UTC))


@dataclass(frozen=True)
class FileRecord:
    id: int
    name: str
    source_path: str
    local_path: str
    pending_path: str | None
    pending_state: str | None
    size: int | None
    sha256: str | None
    import_type: str | None
    remote_name: str | None
    state: FileState
    attempts: int
    error: str | None
    next_attempt_at: float | None
    created_at: str
    updated_at: str
    force_resend: int  # 1: the operator asked to send it even if the same content went recently
    adopted: int = 0  # 1: found in spool/ with no row (journal lost or damaged) and taken up again
    api_file_ref: str | None = None  # the API route: the upload's fileRef, committed before validation
    api_job_id: str | None = None  # the API route: the import job, committed as soon as createJob answers
    records_processed: int | None = None  # the API route: the job's recordsProcessed
    # an upload in progress: what the server acknowledged of the row's temporary file (JSON, written
    # by agent.pipeline.upload; a resume starts there), None when nothing may be resumed
    resume_point: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> FileRecord:
        values = list(row)  # in _COLUMNS order, which is the order of the fields above
        state = values[_STATE_INDEX]
        values[_STATE_INDEX] = _STATES.get(state) or FileState(state)  # a dict lookup, not Enum's call
        # what the generated __init__ does, without its 22 object.__setattr__ calls (a row per file and
        # step: the frozen __init__ was the larger part of reading a batch back)
        record = object.__new__(cls)
        record.__dict__.update(zip(_COLUMNS, values, strict=True))
        return record

    @property
    def label(self) -> str:
        """How log lines name the file: journal id and original name."""
        return f"#{self.id} {self.name!r}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "remote_name": self.remote_name,
            "import_type": self.import_type,
            "state": self.state.value,
            "size": self.size,
            "sha256": self.sha256,
            "error": self.error,
            "attempts": self.attempts,
            "next_attempt_at": (
                iso_utc(datetime.fromtimestamp(self.next_attempt_at, UTC))
                if self.next_attempt_at is not None else None
            ),
            "local_path": self.local_path,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "adopted": bool(self.adopted),
            "file_ref": self.api_file_ref,
            "job_id": self.api_job_id,
            "records_processed": self.records_processed,
        }


class Journal:
    """`sendable_states`: what `next_sendable` hands the upload threads (ACTIVE_STATES; without
    UPLOADED when the status job follows an uploaded file)."""

    def __init__(self, path: Path, *, readonly: bool = False,
                 sendable_states: tuple[FileState, ...] = ACTIVE_STATES) -> None:
        self.sendable_states = sendable_states
        try:
            self._connect(path, readonly)
        except sqlite3.DatabaseError as exc:
            problem = journal_error(path, exc)
            if problem is None:
                raise
            raise problem from None

    def _connect(self, path: Path, readonly: bool) -> None:
        self.path = path
        self._name_floor: int | None = None  # see _migrate
        if readonly:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._migrate()
        self._db.execute("PRAGMA busy_timeout=10000")
        if readonly:
            self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # not a database: now
        self._lock = threading.Lock()  # the writing connection
        # Reads go through a second connection: in WAL mode it sees only committed rows, never the
        # changes of a group commit that is still being gathered (see _transaction).
        self._readonly = readonly
        # one reading connection per thread, so reads run in parallel; dropped with its thread
        self._readers: weakref.WeakKeyDictionary[threading.Thread, sqlite3.Connection] = (
            weakref.WeakKeyDictionary())
        self._gate = threading.Lock()  # guards the counters below
        self._arriving = 0  # threads waiting to add their changes to the open transaction
        self._open = False  # a transaction is open on the writing connection
        self._generation = 0  # number of the open (or last) transaction
        self._committed = 0  # every transaction up to this number is committed (or failed)
        self._commit_lock = threading.Lock()  # one committer at a time; the others wait for it
        self._failures: dict[int, BaseException] = {}  # transaction number -> why its COMMIT failed

    def _migrate(self) -> None:
        """Add columns and indexes that journals made by older versions lack."""
        present = {row[1] for row in self._db.execute("PRAGMA table_info(files)")}
        if "force_resend" not in present:
            self._db.execute("ALTER TABLE files ADD COLUMN force_resend INTEGER NOT NULL DEFAULT 0")
        if "adopted" not in present:
            self._db.execute("ALTER TABLE files ADD COLUMN adopted INTEGER NOT NULL DEFAULT 0")
        api_columns = (("api_file_ref", "TEXT"), ("api_job_id", "TEXT"), ("records_processed", "INTEGER"))
        for column, kind in api_columns:
            if column not in present:  # the API route's columns (journals of earlier versions lack them)
                self._db.execute(f"ALTER TABLE files ADD COLUMN {column} {kind}")
        if "resume_point" not in present:
            self._db.execute("ALTER TABLE files ADD COLUMN resume_point TEXT")
        indexed = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'files_remote_name'").fetchone()
        if indexed is None:
            # No two rows share a remote name. Rows of older versions that did are left as history:
            # the rule holds from the last of them on.
            floor = self._db.execute(
                "SELECT COALESCE(MAX(id), 0) FROM files WHERE remote_name IN (SELECT remote_name FROM files"
                " WHERE remote_name IS NOT NULL GROUP BY remote_name HAVING COUNT(*) > 1)").fetchone()[0]
            self._db.execute(f"CREATE UNIQUE INDEX files_remote_name ON files (remote_name)"
                             f" WHERE remote_name IS NOT NULL AND id > {int(floor)}")
        # the index's floor: a lookup by remote name says `id > floor` so SQLite can use the (partial)
        # index; rows at or below it (older versions' history) are looked at by id range
        sql = self._db.execute("SELECT sql FROM sqlite_master WHERE name = 'files_remote_name'").fetchone()[0]
        found = re.search(r"id > (\d+)", str(sql))
        self._name_floor = int(found.group(1)) if found else None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """The caller's changes, committed durably (WAL, synchronous=FULL) before this returns.

        Group commit: threads that write at the same time share one transaction and so one fsync.
        Each caller's statements run in a savepoint of the open transaction (a failing statement
        undoes only that caller's changes); then one of them commits for all, and every caller
        returns only once the commit holding its changes is durable, or raises if it failed. So
        each caller's "committed before the next step" ordering holds exactly as with one commit
        per change. Readers use the other connection and never see changes not yet committed.
        """
        with self._gate:
            self._arriving += 1
        failure: BaseException | None = None
        with self._lock:
            with self._gate:
                self._arriving -= 1
            if not self._open:
                self._db.execute("BEGIN IMMEDIATE")
                self._open = True
                self._generation += 1
            generation = self._generation
            self._db.execute("SAVEPOINT change")
            try:
                yield
            except BaseException as exc:  # noqa: BLE001 - raised again below, once the others are safe
                failure = exc
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK TO change")
            if self._db.in_transaction:
                self._db.execute("RELEASE change")
            else:  # SQLite rolled the whole transaction back (e.g. disk full): all of it is lost
                self._open = False
                self._failures[generation] = failure or sqlite3.OperationalError("rolled back")
        if failure is None:
            self._commit(generation)
            return
        with contextlib.suppress(sqlite3.Error):
            self._commit(generation)  # the other callers' changes in it; this caller's own error wins
        raise failure

    def _commit(self, generation: int) -> None:
        """Return once transaction `generation` is committed, committing it if nobody has yet."""
        with self._commit_lock:
            if self._committed < generation:
                with self._gate:
                    arriving = self._arriving
                if arriving:
                    time.sleep(0)  # let the threads already at the door add their changes first
                with self._lock:
                    if self._db.in_transaction:  # whatever is open, which includes `generation`
                        try:
                            self._db.execute("COMMIT")
                        except Exception as exc:  # noqa: BLE001 - every waiter of it is told below
                            if self._db.in_transaction:
                                self._db.execute("ROLLBACK")
                            self._failures[self._generation] = exc
                    self._open = False
                    self._committed = self._generation
                    for old in [number for number in self._failures if number < generation - 1000]:
                        del self._failures[old]
            failure = self._failures.get(generation)
        if failure is not None:
            raise sqlite3.OperationalError(f"journal commit failed: {failure}") from failure

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """This thread's reading connection (the only connection of a read-only journal)."""
        if self._readonly:
            with self._lock:
                yield self._db
            return
        thread = threading.current_thread()
        with self._gate:
            reader = self._readers.get(thread)
        if reader is None:
            reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            reader.execute("PRAGMA busy_timeout=10000")
            with self._gate:
                self._readers[thread] = reader
        yield reader

    def close(self) -> None:
        with self._lock:
            self._db.close()
        with self._gate:
            readers = list(self._readers.values())
            self._readers.clear()
        for reader in readers:
            reader.close()

    def _select(self, where: str = "", params: tuple[Any, ...] = (), tail: str = "") -> list[FileRecord]:
        sql = f"{_SELECT_FILES} {where} {tail}"
        with self._reading() as reader:
            rows = reader.execute(sql, params).fetchall()
        return [FileRecord.from_row(row) for row in rows]

    def _insert(self, name: str, source_path: Path, local_path: Path | None, now: str,
                message: str) -> int:
        """A new `claimed` row (inside a transaction); without local_path it goes to spool/<id>."""
        cursor = self._db.execute(
            "INSERT INTO files (name, source_path, local_path, state, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (name, str(source_path), str(local_path or ""), FileState.CLAIMED.value, now, now),
        )
        file_id = int(cursor.lastrowid or 0)
        self._log_event(file_id, now, FileState.CLAIMED.value, message)
        return file_id

    def _log_event(self, file_id: int, now: str, state: str, message: str | None) -> None:
        self._log_events([(file_id, now, state, message)])

    def _log_events(self, events: list[tuple[int, str, str, str | None]]) -> None:
        """(file id, time, state, message) rows of the events table (inside a transaction)."""
        self._db.executemany("INSERT INTO events (file_id, at, state, message) VALUES (?, ?, ?, ?)", events)

    def add_claim(self, name: str, source_path: Path, spool_dir: Path) -> FileRecord:
        """Write the row before the file moves, so a crash mid-claim is always found again."""
        [record] = self.add_claims([source_path], spool_dir, names=[name])
        return record

    def add_claims(self, sources: list[Path], spool_dir: Path,
                   names: list[str] | None = None) -> list[FileRecord]:
        """`add_claim` for several files in one commit (intake claims a burst as one batch); each
        row's spool path is spool/`spool_name(id, name)`."""
        now = utc_now_iso()
        ids = []
        spooled = []
        with self._transaction():
            for index, source_path in enumerate(sources):
                name = names[index] if names else source_path.name
                file_id = self._insert(name, source_path, None, now, f"claimed from {source_path}")
                ids.append(file_id)
                spooled.append((str(spool_dir / spool_name(file_id, name)), file_id))
            # spool/<id>_<name>: known once the rows exist
            self._db.executemany("UPDATE files SET local_path = ? WHERE id = ?", spooled)
        if not ids:
            return []
        return self._select("WHERE id BETWEEN ? AND ?", (ids[0], ids[-1]), "ORDER BY id")

    def adopt(self, file_id: int | None, name: str, source_path: Path, local_path: Path,
              message: str) -> FileRecord:
        """A `claimed` row, marked adopted, for a file found in the spool that no row names (the
        journal was lost or damaged); with the given id (free, checked by the caller) or the next."""
        now = utc_now_iso()
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO files (id, name, source_path, local_path, state, created_at, updated_at,"
                " adopted) VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                (file_id, name, str(source_path), str(local_path), FileState.CLAIMED.value, now, now),
            )
            new_id = int(cursor.lastrowid or 0)
            self._log_event(new_id, now, FileState.CLAIMED.value, message)
        return self.get(new_id)

    def paths_under(self, folder: Path) -> set[str]:
        """Every local or pending path of any row that lies in `folder` (one scan)."""
        prefix = f"{folder}{os.sep}"
        with self._reading() as reader:
            rows = reader.execute(
                "SELECT local_path, pending_path FROM files WHERE substr(local_path, 1, ?) = ?"
                " OR substr(pending_path, 1, ?) = ?", (len(prefix), prefix, len(prefix), prefix),
            ).fetchall()
        return {str(path) for row in rows for path in row if path}

    def has_id(self, file_id: int) -> bool:
        with self._reading() as reader:
            return reader.execute("SELECT 1 FROM files WHERE id = ?", (file_id,)).fetchone() is not None

    def add_parts(self, parent: FileRecord, parts: list[Path], parent_dest: Path,
                  parent_state: FileState) -> list[FileRecord]:
        """Record every part (state `claimed`, where it lies) and the parent's move, in one commit."""
        now = utc_now_iso()
        with self._transaction():
            ids = [self._insert(part.name, part, part, now, f"part of #{parent.id}") for part in parts]
            self._db.execute(
                "UPDATE files SET pending_path = ?, pending_state = ?, updated_at = ? WHERE id = ?",
                (str(parent_dest), parent_state.value, now, parent.id),
            )
            self._log_event(parent.id, now, FileState.CLAIMED.value,
                            f"split into parts #{ids[0]}..#{ids[-1]}")
        return [self.get(file_id) for file_id in ids]

    def update(self, file_id: int, message: str | None = None, **fields: Any) -> FileRecord:
        """Change fields of one row in one transaction; a state change is also logged as an event."""
        [record] = self.update_many([(file_id, message, fields)])
        return record

    def update_many(self, changes: list[tuple[int, str | None, dict[str, Any]]],
                    fetch: bool = True, known: Mapping[int, FileRecord] | None = None) -> list[FileRecord]:
        """`update` for several rows (file id, event message, fields) in one commit: a batch of files
        moving to the same step costs one fsync, not one each. Returns the rows in the given order
        (fetch=False: nothing, for a caller that has what it needs). `known`: the rows as the caller
        read them, each changed here; the rows returned are those with the changes applied, not read
        back (no remote name among the changes: the journal may make a new one unique)."""
        if not changes:
            return []
        now = utc_now_iso()
        keys = tuple(changes[0][2])
        renaming = any("remote_name" in fields for _id, _message, fields in changes)
        with self._transaction():
            if renaming:
                changes = self._unique_remote_names(changes)
            if "state" in keys and all(tuple(fields) == keys for _id, _message, fields in changes):
                self._apply_same(keys, now, changes)  # a batch moving to one step: two statements
            else:
                for file_id, message, fields in changes:
                    self._apply(file_id, now, message, fields)
        if not fetch:
            return []
        if known is not None and not renaming:
            return [_changed(known[file_id], fields, now) for file_id, _message, fields in changes]
        ids = [file_id for file_id, _message, _fields in changes]
        marks = ", ".join("?" * len(ids))
        by_id = {record.id: record for record in self._select(f"WHERE id IN ({marks})", tuple(ids))}
        missing = [file_id for file_id in ids if file_id not in by_id]
        if missing:
            raise KeyError(missing[0])
        return [by_id[file_id] for file_id in ids]

    def _unique_remote_names(self, changes: list[tuple[int, str | None, dict[str, Any]]]
                             ) -> list[tuple[int, str | None, dict[str, Any]]]:
        """Each new remote name made unique across the journal and the batch (inside the
        transaction): a name another row holds gets `-2`, `-3`, ... before its extension."""
        taken: set[str] = set()
        held = self._held_remote_names([str(fields["remote_name"]) for _id, _message, fields in changes
                                        if fields.get("remote_name") is not None])
        out = []
        for file_id, message, fields in changes:
            name = fields.get("remote_name")
            if name is not None:
                name = self._free_remote_name(str(name), file_id, taken, held)
                taken.add(name)
                if message is not None:
                    message = message.replace(str(fields["remote_name"]), name)
                fields = {**fields, "remote_name": name}
            out.append((file_id, message, fields))
        return out

    def _held_remote_names(self, names: list[str]) -> set[str] | None:
        """Which of these names some row holds (any row, this batch's own too), in one query per few
        hundred names instead of one per name: a name not among them is free without a look of its
        own. None: no index as we make it (every name is looked up on its own)."""
        floor = self._name_floor
        if floor is None:
            return None
        held: set[str] = set()
        for start in range(0, len(names), 500):
            part = names[start:start + 500]
            marks = ", ".join("?" * len(part))
            rows = self._db.execute(
                f"SELECT remote_name FROM files WHERE remote_name IN ({marks}) AND id > ?", (*part, floor)
            ).fetchall()
            if floor:  # the rows below the index's floor, by id range
                rows += self._db.execute(
                    f"SELECT remote_name FROM files WHERE id <= ? AND remote_name IN ({marks})",
                    (floor, *part),
                ).fetchall()
            held.update(str(row[0]) for row in rows)
        return held

    def _free_remote_name(self, name: str, file_id: int, taken: set[str],
                          held: set[str] | None = None) -> str:
        """`name`, or `name` with `-2`, `-3`, ... before its extension: the first that neither another
        row nor an earlier file of the batch (`taken`) holds. `held`: `_held_remote_names` of the
        batch's names (a name not in it needs no lookup)."""
        stem, dot, extension = name.rpartition(".")
        candidate, number = name, 1
        while candidate in taken or (
                (held is None or candidate != name or candidate in held)
                and self._remote_name_held(candidate, file_id)):
            number += 1
            candidate = f"{stem}-{number}{dot}{extension}" if dot else f"{name}-{number}"
        return candidate

    def _remote_name_held(self, name: str, file_id: int) -> bool:
        """Another row has this remote name: an index lookup (a bare `remote_name = ?` cannot use the
        partial index and read every row, once per file queued), then the rows below its floor."""
        floor = self._name_floor
        if floor is None:  # no index as we make it: every row
            return self._db.execute("SELECT 1 FROM files WHERE remote_name = ? AND id != ?",
                                    (name, file_id)).fetchone() is not None
        if self._db.execute("SELECT 1 FROM files WHERE remote_name = ? AND id > ? AND id != ?",
                            (name, floor, file_id)).fetchone() is not None:
            return True
        return bool(floor) and self._db.execute(
            "SELECT 1 FROM files WHERE id <= ? AND remote_name = ? AND id != ?",
            (floor, name, file_id)).fetchone() is not None

    def _apply_same(self, keys: tuple[str, ...], now: str,
                    changes: list[tuple[int, str | None, dict[str, Any]]]) -> None:
        """`_apply` for rows that all change the same columns, state among them."""
        unknown = set(keys) - _UPDATABLE
        if unknown:
            raise ValueError(f"not journal columns: {sorted(unknown)}")
        assignments = "".join(f"{key} = ?, " for key in keys)
        self._db.executemany(
            f"UPDATE files SET {assignments}updated_at = ? WHERE id = ?",
            [(*(_column_value(fields[key]) for key in keys), now, file_id)
             for file_id, _message, fields in changes],
        )
        self._log_events([(file_id, now, _column_value(fields["state"]), message)
                          for file_id, message, fields in changes])

    def _apply(self, file_id: int, now: str, message: str | None, fields: dict[str, Any]) -> None:
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"not journal columns: {sorted(unknown)}")
        values = {key: _column_value(val) for key, val in fields.items()}
        assignments = "".join(f"{key} = ?, " for key in values)  # none: a message-only event
        self._db.execute(
            f"UPDATE files SET {assignments}updated_at = ? WHERE id = ?",
            (*values.values(), now, file_id),
        )
        if "state" in values or message:
            state = values.get("state")
            if state is None:
                state = self._db.execute("SELECT state FROM files WHERE id = ?", (file_id,)).fetchone()[0]
            self._log_event(file_id, now, state, message)

    def delete(self, file_id: int) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM events WHERE file_id = ?", (file_id,))
            self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def get(self, file_id: int) -> FileRecord:
        rows = self._select("WHERE id = ?", (file_id,))
        if not rows:
            raise KeyError(file_id)
        return rows[0]

    def all(self) -> list[FileRecord]:
        return self._select(tail="ORDER BY id")

    def query(self, where: str, params: tuple[Any, ...] = ()) -> list[FileRecord]:
        """Rows matching a WHERE clause (fixed SQL text, values as parameters), in id order."""
        return self._select(where, params, "ORDER BY id")

    def events(self, file_id: int) -> list[tuple[str, str, str | None]]:
        """Every (at, state, message) logged for one file, oldest first."""
        with self._reading() as reader:
            rows = reader.execute(
                "SELECT at, state, message FROM events WHERE file_id = ? ORDER BY id", (file_id,)
            ).fetchall()
        return [(str(at), str(state), message) for at, state, message in rows]

    def unfinished(self) -> list[FileRecord]:
        final = tuple(state.value for state in FINAL_STATES)
        return self._select(f"WHERE state NOT IN ({', '.join('?' * len(final))})", final, "ORDER BY id")

    def iter_unfinished(self, page: int = 500) -> Iterator[FileRecord]:
        """`unfinished()` a page at a time, in id order (memory flat in a backlog; rows may change
        state while this runs)."""
        final = tuple(state.value for state in FINAL_STATES)
        last = 0
        while rows := self._select(f"WHERE id > ? AND state NOT IN ({', '.join('?' * len(final))})",
                                   (last, *final), f"ORDER BY id LIMIT {int(page)}"):
            yield from rows
            last = rows[-1].id

    def unfinished_ids(self) -> list[int]:
        final = tuple(state.value for state in FINAL_STATES)
        with self._reading() as reader:
            rows = reader.execute(f"SELECT id FROM files WHERE state NOT IN ({', '.join('?' * len(final))})"
                                  " ORDER BY id", final).fetchall()
        return [int(row[0]) for row in rows]

    def next_sendable(self, now: float | None = None,
                      exclude: Collection[int] = ()) -> tuple[FileRecord | None, float | None]:
        """The oldest file due for sending, else None and the time the next one falls due.

        `exclude`: ids other upload threads hold (a handful); they are neither returned nor waited for.
        """
        now = time.time() if now is None else now
        states = tuple(state.value for state in self.sendable_states)
        marks = ", ".join("?" * len(states))
        skip = tuple(exclude)
        not_held = f" AND id NOT IN ({', '.join('?' * len(skip))})" if skip else ""
        # One query per state walks the (state, id) index in id order and stops at the first due row;
        # a single `state IN (...) ORDER BY id` query would sort every queued row, each time.
        due = [row for state in states for row in self._select(
            f"WHERE state = ? AND (next_attempt_at IS NULL OR next_attempt_at <= ?){not_held}",
            (state, now, *skip), "ORDER BY id LIMIT 1",
        )]
        if due:
            return min(due, key=lambda record: record.id), None
        with self._reading() as reader:
            row = reader.execute(
                f"SELECT MIN(next_attempt_at) FROM files WHERE state IN ({marks}){not_held}", (*states, *skip)
            ).fetchone()
        return None, (row[0] if row and row[0] is not None else None)

    def queued_after(self, first: FileRecord, limit: int, max_size: int, now: float | None = None,
                     exclude: Collection[int] = ()) -> list[FileRecord]:
        """Up to `limit` due `queued` rows of at most `max_size` bytes from `first` on, in id order:
        the files an upload thread sends together with `first` (one indexed range query)."""
        now = time.time() if now is None else now
        skip = tuple(exclude)
        not_held = f" AND id NOT IN ({', '.join('?' * len(skip))})" if skip else ""
        return self._select(
            "WHERE state = ? AND id >= ? AND size <= ?"
            f" AND (next_attempt_at IS NULL OR next_attempt_at <= ?){not_held}",
            (FileState.QUEUED.value, first.id, max_size, now, *skip), f"ORDER BY id LIMIT {int(limit)}",
        )

    def find_duplicates(self, contents: Collection[tuple[str, str]], since_iso: str,
                        exclude: Collection[int] = ()) -> dict[tuple[str, str], FileRecord]:
        """For each (sha256, import_type): the first file with that content and type claimed since
        the given time that was not refused (queued, being sent, sent or filed; one query for a batch
        of checked files). `exclude`: the rows being checked now."""
        hashes = tuple({sha256 for sha256, _import_type in contents})
        if not hashes:
            return {}
        skip = tuple(exclude)
        not_these = f" AND id NOT IN ({', '.join('?' * len(skip))})" if skip else ""
        rows = self._select(
            f"WHERE sha256 IN ({', '.join('?' * len(hashes))}) AND created_at >= ? AND state != ?{not_these}",
            (*hashes, since_iso, FileState.FAILED.value, *skip), "ORDER BY id DESC",
        )
        first = {(str(row.sha256), str(row.import_type)): row for row in rows}  # the lowest id wins
        return {key: first[key] for key in contents if key in first}

    def restart_attempts(self, states: tuple[FileState, ...]) -> None:
        """Make files in these states due now with a fresh attempt count (earlier tries stay in events)."""
        marks = ", ".join("?" * len(states))
        with self._transaction():
            self._db.execute(
                f"UPDATE files SET attempts = 0, next_attempt_at = NULL WHERE state IN ({marks})",
                tuple(state.value for state in states),
            )

    def count_below_attempts(self, states: tuple[FileState, ...], attempts: int) -> int:
        """Rows in these states that have had fewer than `attempts` attempts (one index query)."""
        with self._reading() as reader:
            row = reader.execute(
                f"SELECT COUNT(*) FROM files WHERE state IN ({', '.join('?' * len(states))})"
                " AND attempts < ?",
                (*(state.value for state in states), attempts),
            ).fetchone()
        return int(row[0])

    def max_id(self) -> int:
        with self._reading() as reader:
            row = reader.execute("SELECT MAX(id) FROM files").fetchone()
        return int(row[0] or 0)

    def backup(self, dest: Path) -> None:
        """An online copy of the journal (SQLite's backup API, consistent while others write) at
        dest: written to a staging name, checked, fsynced, then renamed over the previous backup
        (the agent's own file, renewed on purpose). A copy that fails its check replaces nothing."""
        from agent.store.fsutil import fresh_staging, install_staged, remove_staging

        staging = fresh_staging(dest)
        source = sqlite3.connect(self.path)
        try:
            target = sqlite3.connect(staging)
            try:
                source.backup(target)
                target.execute("PRAGMA journal_mode=DELETE")
                verdict = target.execute("PRAGMA quick_check").fetchone()[0]
            finally:
                target.close()
        finally:
            source.close()
        if verdict != "ok":
            remove_staging(staging)
            raise sqlite3.DatabaseError(f"the copy fails its check ({verdict})")
        install_staged(staging, dest, replace=True)

    def count_in(self, states: tuple[FileState, ...]) -> int:
        with self._reading() as reader:
            row = reader.execute(
                f"SELECT COUNT(*) FROM files WHERE state IN ({', '.join('?' * len(states))})",
                tuple(state.value for state in states),
            ).fetchone()
        return int(row[0])

