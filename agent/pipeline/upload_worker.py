"""The upload threads draining the queue: each takes the oldest due file (or batch) no other holds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from loguru import logger

from agent.config import Config, SftpConfig
from agent.pipeline.upload import BATCH_FILE_MAX_BYTES, BATCH_MAX_BYTES, LOCAL_FAULT_PAUSE_SECONDS, Uploader
from agent.store.journal import FileRecord, FileState, Journal
from agent.transport.session_pool import SessionPool
from agent.transport.sftp import SftpSession


class Sender(Protocol):
    """What the upload threads drive: `Uploader` (SFTP) or `ApiUploader` (agent/pipeline/api_upload.py)."""

    config: Config
    stop_requested: threading.Event
    heartbeat: Callable[[], None]

    def bind_session(self, session: SftpSession | None) -> None: ...

    def process(self, record: FileRecord) -> FileRecord: ...

    def process_batch(self, records: list[FileRecord]) -> list[FileRecord]: ...

    def wait_for_connection_slot(self) -> float: ...


class UploadWorker:
    """The upload threads (`upload.concurrency`, each with its own SFTP session) draining the queue.

    Each thread takes the oldest due file that no other thread holds: `_take` asks the journal with
    the held ids excluded and adds the answer to them under one lock, so a file is handed to exactly
    one thread at a time. Each borrows a session from `sessions` per file or batch (default: the
    uploader's session and `concurrency - 1` more). `heartbeat_interval`: wake at least this often
    to ping the systemd watchdog (None: no watchdog).

    On a near server (`SessionPool.server_near`) small files go through one thread at a time: each
    batch costs a few round trips and far more of this process's CPU, so further threads would only
    take turns at the GIL (bench/RESULTS.md round 6: a third more CPU for the same burst). The thread
    holding them keeps taking the next batch; the others wait until it takes a large file or finds
    nothing, and take large files meanwhile only as they come up oldest first.
    """

    def __init__(self, uploader: Sender, journal: Journal, concurrency: int = 1, *,
                 sessions: SessionPool | None = None, heartbeat_interval: float | None = None) -> None:
        self.uploader = uploader
        self.journal = journal
        self.concurrency = max(1, concurrency)
        self._cond = threading.Condition()  # wake(): a generation count, so no thread misses a wake-up
        self._generation = 0
        self._claim_lock = threading.Lock()
        self._claimed: set[int] = set()  # journal ids a thread is working on
        self._small_files_thread: int | None = None  # on a near server, the thread sending small files
        self._small_files_waiting = False  # a thread waits for it to finish with them
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True,
                                          name="upload" if index == 0 else f"upload-{index + 1}")
                         for index in range(self.concurrency)]
        self.busy = threading.Event()  # set while any thread holds a file
        self._heartbeat_interval = heartbeat_interval
        self._preconnect = False
        # the SFTP route's sessions; None on the API route (one HTTP client serves every thread)
        self._sessions: SessionPool | None = sessions
        self.batch_files = 1  # the API route sends one file at a time
        if isinstance(uploader, Uploader):
            config = uploader.config.sftp
            if self._sessions is None:
                self._sessions = upload_sessions(uploader.session, config, self.concurrency)
            # upload.batch_files; one at a time under sftp.bandwidth_limit (the batch path does not pace)
            self.batch_files = 1 if config.bandwidth_limit else uploader.config.upload.batch_files

    def wake(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    @property
    def sessions(self) -> SessionPool:
        """The upload threads' SFTP sessions (the status poll borrows them too); SFTP route only."""
        assert self._sessions is not None, "the API route has no SFTP sessions"
        return self._sessions

    def start(self, *, preconnect: bool = False) -> None:
        """Start the threads; `preconnect` (`run --once` with work in sight): one connection opens
        while intake checks the first files."""
        self._preconnect = preconnect
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float) -> bool:
        """Ask every upload thread to stop; True when all did within the timeout."""
        self.uploader.stop_requested.set()
        if self._sessions is not None:
            self._sessions.close()  # the idle connections now; one in use when its thread gives it back
        self.wake()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _wait(self, seen: int, timeout: float | None) -> None:
        """Sleep until `wake()` (unless one came since `seen` was read) or the timeout."""
        interval = self._heartbeat_interval
        if interval is not None:
            timeout = interval if timeout is None else min(timeout, interval)
        with self._cond:
            if self._generation == seen and not self.uploader.stop_requested.is_set():
                self._cond.wait(timeout)

    def _take(self, index: int) -> tuple[list[FileRecord], float | None]:
        """The oldest due file no other thread holds, with the small queued files after it (batch),
        now held by thread `index`; else nothing and when a file falls due (nothing and None also
        while another thread sends small files to a near server)."""
        with self._claim_lock:
            if self._small_files_thread not in (None, index) and self._near():
                self._small_files_waiting = True
                return [], None
            record, next_due = self.journal.next_sendable(exclude=self._claimed)
            small = (record is not None and self.batch_files > 1 and record.state == FileState.QUEUED
                     and (record.size or 0) <= BATCH_FILE_MAX_BYTES)
            if not small:
                self._leave_small_files(index)
            if record is None:
                return [], next_due
            batch = [record]
            if small:
                self._small_files_thread = index
                batch, total = [], 0
                for candidate in self.journal.queued_after(record, self.batch_files, BATCH_FILE_MAX_BYTES,
                                                           exclude=self._claimed):
                    total += candidate.size or 0
                    if batch and total > BATCH_MAX_BYTES:
                        break
                    batch.append(candidate)
                if not batch or batch[0].id != record.id:  # it changed state in between: send it alone
                    batch = [record]
            self._claimed.update(member.id for member in batch)
            self.busy.set()
        return batch, None

    def _near(self) -> bool:
        return self._sessions is not None and self._sessions.server_near()

    def _leave_small_files(self, index: int) -> None:
        """Thread `index` sends no more small files for now: a thread waiting for them looks again
        (called with the claim lock held)."""
        if self._small_files_thread == index:
            self._small_files_thread = None
            if self._small_files_waiting:
                self._small_files_waiting = False
                self.wake()

    def _release_all(self, records: list[FileRecord]) -> None:
        for record in records:
            self._release(record.id)

    def _release(self, file_id: int) -> None:
        with self._claim_lock:
            self._claimed.discard(file_id)
            if not self._claimed:
                self.busy.clear()

    def _run(self, index: int) -> None:
        try:
            if index == 0 and self._preconnect and self._sessions is not None:
                self._sessions.connect_ahead()
            self._loop(index)
        finally:
            with self._claim_lock:
                self._leave_small_files(index)
            self.uploader.bind_session(None)

    def _loop(self, index: int) -> None:
        while not self.uploader.stop_requested.is_set():
            self.uploader.heartbeat()
            with self._cond:
                seen = self._generation
            hold = self.uploader.wait_for_connection_slot()
            if hold > 0:
                with self._claim_lock:
                    self._leave_small_files(index)
                self._wait(seen, hold)
                continue
            batch, next_due = self._take(index)
            if not batch:
                self._wait(seen, None if next_due is None else max(0.0, next_due - time.time()))
                continue
            retry = False
            try:
                # a connected one first (see SessionPool); the API route needs none
                session = self._sessions.acquire() if self._sessions is not None else None
            except InterruptedError:  # stopping
                self._release_all(batch)
                break
            self.uploader.bind_session(session)
            try:
                if len(batch) == 1:
                    with logger.contextualize(file_id=batch[0].id, file=batch[0].name):  # log lines name it
                        results = [self.uploader.process(batch[0])]
                else:
                    results = self.uploader.process_batch(batch)
                retry = any(result.next_attempt_at is not None for result in results)
            except Exception:  # noqa: BLE001 - e.g. the journal's disk is full: keep the thread alive
                logger.exception("{} could not be processed; trying again in {:.0f} s",
                                 batch[0].label if len(batch) == 1 else f"a batch of {len(batch)} files",
                                 LOCAL_FAULT_PAUSE_SECONDS)
                self._give_back(session)
                self._release_all(batch)
                with self._claim_lock:
                    self._leave_small_files(index)
                with self._cond:
                    seen = self._generation  # the pause is not cut short by wake-ups during the attempt
                self._wait(seen, LOCAL_FAULT_PAUSE_SECONDS)
                continue
            self._give_back(session)
            self._release_all(batch)
            if retry and self.concurrency > 1:
                self.wake()  # its new due time: threads that were waiting without it look again

    def _give_back(self, session: SftpSession | None) -> None:
        if self._sessions is not None and session is not None:
            self._sessions.release(session)


def upload_sessions(first: SftpSession, config: SftpConfig, concurrency: int) -> SessionPool:
    """The upload threads' pool: `first` (the uploader's own) and `concurrency - 1` more sessions."""
    return SessionPool([first] + [SftpSession(config) for _ in range(concurrency - 1)],
                       config.connect_timeout)
