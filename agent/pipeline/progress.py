"""How far each upload in flight has got: for `status` (another process) and the log.

The upload path reports the bytes it has sent after each chunk (`publish.Pacer.on_progress`); this
module keeps the journal out of it. What `status` reads is a small SQLite file beside the journal
(`state_dir/progress.sqlite3`, WAL, no fsync: it is a view, not a record), written at most every
STORE_SECONDS per upload and emptied at start-up; a large upload also says in the log how far it
has got, at most every LOG_SECONDS.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.logs import file_fields
from agent.store.journal import FileRecord, FileState, iso_utc
from agent.units import human_bytes, human_duration

STORE_SECONDS = 2.0  # an upload's row is rewritten at most this often
LOG_SECONDS = 10.0  # a large upload's log line at most this often (the first after this long)
FILE_NAME = "progress.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS progress (
    file_id INTEGER PRIMARY KEY,
    sent INTEGER NOT NULL,
    total INTEGER NOT NULL,
    files INTEGER NOT NULL,
    rate REAL NOT NULL,
    started_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class Progress:
    """Bytes sent of an upload (of its batch when `files` > 1) and the average rate so far."""

    sent: int
    total: int
    files: int
    rate: float  # bytes per second since the upload started
    started_at: str
    updated_at: str

    @property
    def percent(self) -> float:
        return 100.0 * self.sent / self.total if self.total else 100.0

    def text(self) -> str:
        """`12.0 MiB of 80.0 MiB (15%), 3.20 MiB/s, about 25 s left` (of a batch: `batch of 12: ...`)."""
        left = (self.total - self.sent) / self.rate if self.rate > 0 else None
        batch = f"batch of {self.files}: " if self.files > 1 else ""
        return (f"{batch}{human_bytes(self.sent)} of {human_bytes(self.total)} sent ({self.percent:.0f}%),"
                f" {human_bytes(self.rate)}/s" + (f", about {human_duration(left)} left" if left else ""))

    def to_json(self) -> dict[str, Any]:
        return {"sent_bytes": self.sent, "total_bytes": self.total, "files_in_batch": self.files,
                "bytes_per_second": round(self.rate, 1), "started_at": self.started_at,
                "updated_at": self.updated_at}


class UploadProgress:
    """The daemon's side: one small table, written by the upload threads (one lock)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute(_SCHEMA)
        self._db.execute("DELETE FROM progress")  # what a stopped or crashed run left is not in flight

    def track(self, records: Sequence[FileRecord]) -> Tracker:
        return Tracker(self, records)

    def write(self, ids: Sequence[int], progress: Progress) -> None:
        rows = [(file_id, progress.sent, progress.total, progress.files, progress.rate, progress.started_at,
                 progress.updated_at) for file_id in ids]
        with self._guard():
            self._db.executemany("INSERT OR REPLACE INTO progress VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def remove(self, ids: Sequence[int]) -> None:
        with self._guard():
            self._db.executemany("DELETE FROM progress WHERE file_id = ?", [(file_id,) for file_id in ids])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """A failed write of this view (disk full, closed at stop) never stops an upload."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as exc:
                from loguru import logger  # loaded by the daemon only (`status` reads, it never logs)

                logger.debug("upload progress not recorded: {}", exc)


class Tracker:
    """One upload's (or batch's) progress: `update(sent)` after each chunk, `done()` at the end."""

    def __init__(self, store: UploadProgress, records: Sequence[FileRecord],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._records = list(records)
        self._ids = [record.id for record in records]
        self._total = sum(record.size or 0 for record in records)
        self._clock = clock
        self._started = clock()
        self._started_at = iso_utc(datetime.now(UTC))
        self._stored_at = self._started  # nothing is written for an upload done within STORE_SECONDS
        self._logged_at = self._started
        self._written = False

    def update(self, sent: int) -> None:
        from loguru import logger  # already loaded in the daemon; `status` never gets here

        now = self._clock()
        if now - self._stored_at < STORE_SECONDS and now - self._logged_at < LOG_SECONDS:
            return
        elapsed = max(now - self._started, 1e-6)
        progress = Progress(sent, self._total, len(self._ids), sent / elapsed, self._started_at,
                            iso_utc(datetime.now(UTC)))
        if now - self._stored_at >= STORE_SECONDS:
            self._store.write(self._ids, progress)
            self._stored_at, self._written = now, True
        if now - self._logged_at >= LOG_SECONDS:
            self._logged_at = now
            record = self._records[0]
            if len(self._records) == 1:
                logger.bind(**file_fields(record) | {"state": FileState.UPLOADING.value}).info(
                    "{} uploading: {}", record.label, progress.text())
            else:
                logger.info("{} files uploading together ({} first): {}", len(self._records), record.label,
                            progress.text())

    def done(self) -> None:
        if self._written:
            self._store.remove(self._ids)


def read_progress(state_dir: Path) -> dict[int, Progress]:
    """The uploads in flight by journal id, as the daemon last wrote them ({} when none or no file)."""
    path = state_dir / FILE_NAME
    if not path.exists():
        return {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT file_id, sent, total, files, rate, started_at, updated_at"
                              " FROM progress").fetchall()
        finally:
            db.close()
    except sqlite3.Error:  # a view only: never stops `status`
        return {}
    return {int(row[0]): Progress(int(row[1]), int(row[2]), int(row[3]), float(row[4]), str(row[5]),
                                  str(row[6])) for row in rows}
