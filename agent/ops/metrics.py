"""Metrics for Prometheus: an endpoint on loopback and/or a node_exporter textfile ([metrics]).

Everything that the journal knows is read from it when the metrics are collected (a read-only
SQLite connection of its own, WAL lets it read beside the daemon), so there is no second copy of
the state to drift: files by state and import type, queue depth, the age of the oldest waiting file,
bytes and files uploaded, retries and the time of the last successful upload. Only the upload
durations are observed live (a histogram fed by the upload thread), since the journal keeps no
durations.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from loguru import logger
from prometheus_client import CollectorRegistry, Histogram, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.config import Config
from agent.store.journal import ACTIVE_STATES, FileRecord, FileState

PREFIX = "saasquatch_agent"
LOOPBACK = "127.0.0.1"
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class JournalCollector(Collector):
    """Reads the journal at every collection."""

    def __init__(self, journal_path: Path) -> None:
        self.journal_path = journal_path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _connection(self) -> sqlite3.Connection | None:
        if self._db is None:
            if not self.journal_path.exists():
                return None
            self._db = sqlite3.connect(f"file:{self.journal_path}?mode=ro", uri=True, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout=5000")
        return self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def collect(self) -> Iterator[Metric]:
        files = GaugeMetricFamily(f"{PREFIX}_files", "Files in the journal by state and import type",
                                  labels=["state", "import_type"])
        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Files waiting to be uploaded or filed")
        oldest = GaugeMetricFamily(f"{PREFIX}_oldest_waiting_seconds",
                                   "Age of the oldest file not yet uploaded (0 when none waits)")
        uploaded_bytes = CounterMetricFamily(f"{PREFIX}_uploaded_bytes", "Bytes published on the server")
        uploaded_files = CounterMetricFamily(f"{PREFIX}_uploaded_files", "Files published on the server")
        retries = CounterMetricFamily(f"{PREFIX}_retries", "Upload attempts that failed and were retried")
        last_ok = GaugeMetricFamily(f"{PREFIX}_last_success_timestamp_seconds",
                                    "Unix time of the last successful upload (0 when none yet)")
        imported = CounterMetricFamily(f"{PREFIX}_records_processed",
                                       "Records SaaSquatch's import jobs processed (the API route)",
                                       labels=["import_type"])
        done = tuple(s.value for s in (FileState.UPLOADED, FileState.ARCHIVED))
        active = tuple(s.value for s in ACTIVE_STATES)
        with self._lock:
            db = self._connection()
            rows: list[tuple[str, str | None, int]] = []
            sums = (0, 0, 0)
            oldest_at: str | None = None
            last_at: str | None = None
            by_type: list[tuple[str | None, int]] = []
            if db is not None:
                rows = db.execute("SELECT state, import_type, COUNT(*) FROM files"
                                  " GROUP BY state, import_type").fetchall()
                sums = db.execute(
                    f"SELECT COALESCE(SUM(CASE WHEN state IN ({_marks(done)}) THEN size END), 0),"
                    f" COUNT(CASE WHEN state IN ({_marks(done)}) THEN 1 END), COALESCE(SUM(attempts), 0)"
                    " FROM files", (*done, *done)).fetchone()
                oldest_at = db.execute(f"SELECT MIN(created_at) FROM files WHERE state IN ({_marks(active)})"
                                       " AND state != ?", (*active, FileState.UPLOADED.value)).fetchone()[0]
                last_at = db.execute("SELECT MAX(at) FROM events WHERE state = ?",
                                     (FileState.UPLOADED.value,)).fetchone()[0]
                by_type = db.execute("SELECT import_type, SUM(records_processed) FROM files WHERE"
                                     " records_processed IS NOT NULL AND state = ? GROUP BY import_type",
                                     (FileState.ARCHIVED.value,)).fetchall()
        queued = 0
        for state, import_type, count in rows:
            files.add_metric([state, import_type or "unknown"], count)
            if state in active:
                queued += count
        depth.add_metric([], queued)
        started = _epoch(oldest_at)
        oldest.add_metric([], max(0.0, time.time() - started) if started else 0.0)
        uploaded_bytes.add_metric([], sums[0])
        uploaded_files.add_metric([], sums[1])
        retries.add_metric([], sums[2])
        last_ok.add_metric([], _epoch(last_at) or 0.0)
        for import_type, total in by_type:
            imported.add_metric([import_type or "unknown"], int(total or 0))
        yield from (files, depth, oldest, uploaded_bytes, uploaded_files, retries, last_ok, imported)


def _marks(values: tuple[str, ...]) -> str:
    return ", ".join("?" * len(values))


class Metrics:
    """The registry, the optional HTTP endpoint and the optional textfile writer."""

    def __init__(self, config: Config) -> None:
        self.config = config.metrics
        self.registry = CollectorRegistry()
        self.collector = JournalCollector(config.journal_path)
        self.registry.register(self.collector)
        self.duration = Histogram(f"{PREFIX}_upload_duration_seconds",
                                  "Time from the first byte sent to the published rename, per file",
                                  registry=self.registry, buckets=DURATION_BUCKETS)
        self._server: object | None = None
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self.port: int | None = None

    def observe_upload(self, _record: FileRecord, seconds: float) -> None:
        self.duration.observe(seconds)

    def start(self) -> None:
        if self.config.prometheus_port:
            server, _thread = start_http_server(self.config.prometheus_port, addr=LOOPBACK,
                                                registry=self.registry)
            self._server = server
            self.port = int(server.server_port)
            logger.info("metrics on http://{}:{}/metrics", LOOPBACK, self.port)
        if self.config.textfile:
            self.write_textfile()
            self._writer = threading.Thread(target=self._write_loop, name="metrics-textfile", daemon=True)
            self._writer.start()
            logger.info("metrics written to {} every {} s", self.config.textfile,
                        self.config.textfile_seconds)

    def write_textfile(self) -> None:
        if self.config.textfile is None:
            return
        try:
            write_to_textfile(str(self.config.textfile), self.registry)  # temp file + rename
        except OSError as exc:
            logger.warning("cannot write metrics textfile {}: {}", self.config.textfile, exc.strerror or exc)

    def _write_loop(self) -> None:
        while not self._stop.wait(self.config.textfile_seconds):
            self.write_textfile()

    def stop(self) -> None:
        self._stop.set()
        if self._writer is not None:
            self._writer.join(5)
            self.write_textfile()
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.shutdown()  # type: ignore[attr-defined]
                self._server.server_close()  # type: ignore[attr-defined]
        self.collector.close()
