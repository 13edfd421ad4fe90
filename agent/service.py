"""The daemon's lifecycle: start-up recovery, the threads and jobs, signals, clean stop."""

from __future__ import annotations

import fcntl
import functools
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING

from loguru import logger

from agent.config import Config, ConfigError, Transport, load_config
from agent.errors import AgentError
from agent.intake.claim import Intake
from agent.intake.settle import NOTICE_LIMIT, SettleQueue
from agent.intake.watch import DropScanner, DropWatcher
from agent.logs import file_fields, setup_logging
from agent.ops.summary import run_records
from agent.ops.wakeup import WakeListener
from agent.pipeline.lifecycle import TRACKED_STATES, Lifecycle
from agent.pipeline.notify import Notifier as FileNotifier
from agent.pipeline.progress import UploadProgress
from agent.pipeline.upload import Uploader
from agent.pipeline.upload_worker import UploadWorker, upload_sessions
from agent.store.adopt import reconcile_spool
from agent.store.archive import Filer
from agent.store.fsutil import ensure_dir, finish_interrupted_move
from agent.store.journal import ACTIVE_STATES, SENDING_STATES, FileRecord, FileState, Journal
from agent.systemd import Notifier
from agent.transport.session_pool import SessionPool
from agent.transport.sftp import PrivateKeyError, SftpSession, load_private_key, private_key_path

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler

    from agent.ops.metrics import Metrics
    from agent.pipeline.api_upload import ApiUploader


ONCE_POLL_SECONDS = 0.02  # `run --once` looks this often whether everything is done (one COUNT query)


class AlreadyRunning(AgentError):
    """Another agent holds the state_dir's lock."""


class StartError(AgentError):
    """The agent cannot start (its key, its folders); said in the log, like the daemon's lines."""

    in_log = True


def _no_heartbeat() -> None:
    return None


def _ignore_timing(_record: FileRecord, _seconds: float) -> None:
    return None


class Agent:
    """The one place the agent is wired: every collaborator and hook is given to its constructor.

    `heartbeat` / `heartbeat_interval`: the systemd watchdog ping and how often the upload threads
    must wake for it; `on_published`: each file's upload seconds (metrics).
    """

    def __init__(self, config: Config, *, heartbeat: Callable[[], None] = _no_heartbeat,
                 heartbeat_interval: float | None = None,
                 on_published: Callable[[FileRecord, float], None] = _ignore_timing) -> None:
        self.config = config
        paths = config.paths
        for folder in (paths.state_dir, config.spool_dir):
            ensure_dir(folder)
        for folder in (paths.archive, paths.failed):
            try:
                ensure_dir(folder)
            except OSError as exc:  # files bound there wait in the spool until it works (no restart)
                logger.error("{} is not usable ({}); files bound there wait in the spool until it is",
                             folder, exc.strerror or exc)
        self._lock_file = take_lock(paths.state_dir / "agent.lock")
        tracking = config.status.tracking  # the status job follows an uploaded file, not the uploader
        api = config.upload.transport == Transport.API
        if api:  # the API route's modules (httpx, ssl: ~3 MiB, ~45 ms) only where it is used
            from agent.pipeline.api_upload import API_SENDABLE_STATES, ApiUploader
        self.journal = Journal(config.journal_path, sendable_states=(
            API_SENDABLE_STATES if api else SENDING_STATES if tracking else ACTIVE_STATES))
        notifier = FileNotifier(config.notify)
        self.filer = Filer(config, self.journal, on_failed=lambda record: notifier.submit(record, "failed"))
        self.scanner = DropScanner(paths.drop, _type_folders(config))
        self.scanner.create_folders()
        self.progress = UploadProgress(paths.state_dir)  # `status` shows an upload's bytes sent
        # intake queues a large file unchecked; the uploader has it checked while it is sent
        self.intake = Intake(config, self.journal, self.filer, self.scanner, lambda: self.worker.wake(),
                             on_changed=self._check_again_when_stable)
        self.uploader: Uploader | ApiUploader
        sessions: SessionPool | None = None
        if api:  # SaaSquatch's import API (pipeline/api_upload.py): no SFTP session, no status poll
            self.lifecycle = Lifecycle(config, self.journal, self.filer, notifier=notifier)
            self.uploader = ApiUploader(config, self.journal, self.filer,
                                        after_archive=self.lifecycle.compress,
                                        on_changed=self._check_again_when_stable,
                                        on_stale=functools.partial(notifier.submit, event="stale"),
                                        on_published=on_published, heartbeat=heartbeat)
        else:
            self.session = SftpSession(config.sftp)
            # the status poll borrows the upload threads' connections (a server may allow only one)
            sessions = upload_sessions(self.session, config.sftp, config.upload.concurrency)
            self.lifecycle = Lifecycle(config, self.journal, self.filer, notifier=notifier, pool=sessions)
            # a file whose bytes changed after it was taken waits until stable, then is checked again
            self.uploader = Uploader(config, self.journal, self.filer, self.session, progress=self.progress,
                                     after_upload=self.lifecycle.after_upload,
                                     archive_on_publish=not tracking,  # the batch path files at once
                                     after_archive=self.lifecycle.compress,
                                     on_changed=self._check_again_when_stable,
                                     on_published=on_published, heartbeat=heartbeat,
                                     check_while_sending=self.intake)
        self.worker = UploadWorker(self.uploader, self.journal, config.upload.concurrency, sessions=sessions,
                                   heartbeat_interval=heartbeat_interval)
        self.settle = SettleQueue(config.watch.settle_seconds, self.intake.claim_many,
                                  self.intake.check_again, refill=self.rescan)
        self.watcher: DropWatcher | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.wakeup = WakeListener(paths.state_dir, self.worker.wake)  # `retry`: sent within a second
        self.once_records: list[FileRecord] = []  # `run --once`: the files it dealt with, at its end

    def recover(self) -> None:
        """Bring every unfinished row and the disk into agreement before any new work starts: first
        the spool files no row names are adopted (checked below like new files), then the moves
        to failed/ that waited for it are finished, then each unfinished row."""
        reconcile_spool(self.config, self.journal)
        self.filer.resume_held()
        for record in self.journal.iter_unfinished():
            local_exists = os.path.lexists(record.local_path)
            if record.pending_path:
                self.filer.resume_move(record)
            elif record.state == FileState.CLAIMED:
                if local_exists:
                    # a claim cut short between link and unlink (no renameat2) left two names of one
                    # inode: finish the move first, so the copy is not taken for a hard-linked file
                    finish_interrupted_move(Path(record.source_path), Path(record.local_path))
                    self.intake.check(record)
                elif os.path.lexists(record.source_path):
                    self.journal.delete(record.id)  # the rename never happened; drop/ still has it
                else:
                    self.filer.quarantine(record, f"{record.name} disappeared from drop/ while it"
                                          " was being claimed; nothing was uploaded")
            elif not local_exists:
                self.filer.quarantine(record, f"the claimed copy of {record.name} ({record.local_path})"
                                      " is missing from the spool; it cannot be uploaded")
            else:
                logger.bind(**file_fields(record)).info(
                    "{} resumes in state {}", record.label, record.state.value)

    def _check_again_when_stable(self, record: FileRecord) -> None:
        self.settle.recheck(record.id, Path(record.local_path))

    def rescan(self) -> None:
        """Notice what is in drop/, up to NOTICE_LIMIT paths waiting at once; intake asks for the
        rest (`SettleQueue.refill`) once those are claimed."""
        room = NOTICE_LIMIT - self.settle.pending_count()
        self.settle.more_in_drop = False
        for candidate in self.scanner.scan():
            if room <= 0:
                self.settle.more_in_drop = True
                break
            room -= self.settle.notice(candidate)
        self.worker.wake()  # a file re-queued by another process (`retry`) goes within rescan_seconds

    def start(self) -> None:
        self.recover()
        self.worker.start()
        self.settle.start()
        self.watcher = DropWatcher(self.scanner, self.settle.notice)
        self.watcher.start()
        from apscheduler.schedulers.background import BackgroundScheduler  # daemon only: not for --once

        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.scheduler.add_job(self.rescan, "interval", seconds=self.config.watch.rescan_seconds,
                               id="rescan", coalesce=True, max_instances=1)
        self.lifecycle.add_jobs(self.scheduler)  # status poll, archive, retention
        every = self.config.journal.backup_seconds
        if every > 0:  # the first copy soon after start-up, then every `journal.backup_seconds`
            self.scheduler.add_job(self.backup_journal, "interval", seconds=every, id="journal-backup",
                                   coalesce=True, max_instances=1,
                                   next_run_time=datetime.now(UTC) + timedelta(seconds=min(every, 30.0)))
        self.scheduler.start()
        self.wakeup.start()
        self.rescan()
        logger.info("watching {} (settle {} s, rescan every {} s); uploading to {}",
                    self.config.paths.drop, self.config.watch.settle_seconds,
                    self.config.watch.rescan_seconds, destination(self.config))

    def backup_journal(self) -> None:
        """The periodic online copy of the journal (`journal.backup_seconds`)."""
        try:
            self.journal.backup(self.config.journal_backup_path)
        except (OSError, sqlite3.Error) as exc:
            logger.error("journal backup to {} failed: {}; the previous backup is kept",
                         self.config.journal_backup_path, exc)
            return
        logger.debug("journal backed up to {}", self.config.journal_backup_path)

    def stop(self) -> None:
        """Stop everything within `daemon.stop_timeout_seconds`; an unfinished upload resumes later."""
        deadline = time.monotonic() + self.config.daemon.stop_timeout_seconds
        if self.watcher is not None:
            self.watcher.stop()
        self.wakeup.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        self.settle.stop(max(0.1, deadline - time.monotonic()))
        if not self.worker.stop(max(0.1, deadline - time.monotonic())):
            logger.warning("the upload in flight did not stop in time; it resumes at the next start")
        self.lifecycle.stop(max(0.1, deadline - time.monotonic()))
        if not isinstance(self.uploader, Uploader):  # the API route's HTTP client
            self.uploader.close()
        self.progress.close()
        self.journal.close()
        self._lock_file.close()

    def run_once(self) -> int:
        """Take what is in drop/ now, send it, file it; 0 when every file ended archived."""
        start_ids = self.journal.unfinished_ids()
        first_new_id = self.journal.max_id() + 1
        self.recover()
        # each --once run has its own retry.once_max_attempts budget, starting now
        self.journal.restart_attempts(self.journal.sendable_states)
        # with work in sight, the SSH handshake overlaps the claim and check of the first files
        self.worker.start(preconnect=bool(start_ids) or next(iter(self.scanner.scan()), None) is not None)
        self.settle.start()
        self.rescan()
        limit = self.config.retry.once_max_attempts
        self.uploader.attempt_limit = limit  # the last failed attempt says it gives up, not "retrying"
        while True:
            # one COUNT query: listing every row each 50 ms was quadratic in a backlog
            if (self.settle.idle() and not self.worker.busy.is_set()
                    and (self.uploader.connection_failures >= limit
                         or not self.journal.count_below_attempts(self.journal.sendable_states, limit))):
                break
            time.sleep(ONCE_POLL_SECONDS)
        self.filer.resume_held()  # refused files whose move to failed/ waited for it
        # a split original is done when its parts are (they are rows of the run too)
        done = (FileState.ARCHIVED, FileState.SPLIT, *(TRACKED_STATES if self.config.status.tracking else ()))
        self.once_records = run_records(self.journal, start_ids, first_new_id)
        self.stop()
        return 1 if any(record.state not in done for record in self.once_records) else 0


def destination(config: Config) -> str:
    """Where files go, for the log: the SFTP server and folder, or the import API's tenant URL."""
    if config.upload.transport == Transport.API:
        return f"SaaSquatch's import API {config.api.base_url}/api/v1/{config.api.tenant_alias}"
    sftp = config.sftp
    return f"{sftp.username}@{sftp.host}:{sftp.port}{sftp.remote_dir}"


def _type_folders(config: Config) -> list[str]:
    folders = config.imports.folders
    return [folders.users, folders.user_events, folders.delete_users, folders.reward_redemptions]


def take_lock(path: Path) -> IO[str]:
    handle = open(path, "a+")  # noqa: SIM115 - held open for the daemon's lifetime
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise AlreadyRunning(
            f"another saasquatch-agent is already running with state_dir {path.parent}"
        ) from None
    return handle


def run_agent(config: Config, *, once: bool, report: Callable[[str], object] = print) -> int:
    """`saasquatch-agent run`: one pass (`--once`: 0 when every file ended archived; its per-file
    summary goes to `report`) or the daemon. An unusable key stops it before anything is touched
    (files stay queued): StartError."""
    unusable_key: tuple[type[Exception], ...] = (PrivateKeyError, OSError)
    try:
        if config.upload.transport == Transport.API:  # httpx is imported only where it is used
            from agent.transport.api import ApiKeyError, api_key_path, load_api_key

            unusable_key += (ApiKeyError,)
            load_api_key(api_key_path(config.api))
        else:
            load_private_key(private_key_path(config.sftp))
        if not once:
            return run_daemon(config)
        code, summary = run_once_report(config)
        for line in summary:
            report(line)
        return code
    except unusable_key as exc:
        raise StartError(f"cannot start: {exc}") from exc


def run_once_report(config: Config) -> tuple[int, list[str]]:
    """`run --once`: its exit code and the per-file summary it ends with (outcome, where the file
    is now, the next step; a totals line)."""
    from agent.ops.summary import summary_lines

    agent = Agent(config)
    code = agent.run_once()
    return code, summary_lines(agent.once_records, config, agent.uploader.last_connection_error)


def run_daemon(config: Config) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP re-reads the configuration (a bad one is refused)."""
    stop = threading.Event()
    reload = threading.Event()
    wake = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        (reload if signum == signal.SIGHUP else stop).set()
        wake.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    notifier = Notifier()  # systemd Type=notify; a no-op outside systemd
    agent, metrics = _start(config, notifier)
    notifier.ready(f"watching {config.paths.drop}; {agent.journal.count_in(ACTIVE_STATES)} file(s) queued")
    while True:
        wake.wait()
        wake.clear()
        if stop.is_set():
            break
        if reload.is_set():
            reload.clear()
            new_config = _reread(config)
            if new_config is None:
                continue
            notifier.reloading()
            _stop(agent, metrics, config, reloading=True)
            config = new_config
            setup_logging(config.log)
            agent, metrics = _start(config, notifier)
            notifier.ready(f"configuration reloaded from {config.source}")
            logger.info("configuration reloaded from {}", config.source)
    notifier.stopping()
    _stop(agent, metrics, config)
    logger.info("stopped")
    notifier.close()
    return 0


def _start(config: Config, notifier: Notifier) -> tuple[Agent, Metrics | None]:
    metrics = None
    if config.metrics.enabled:
        from agent.ops.metrics import Metrics  # prometheus_client is loaded only when asked for (idle RSS)

        metrics = Metrics(config)
    # WatchdogSec=: pings come from the upload thread
    agent = Agent(config, heartbeat=notifier.heartbeat, heartbeat_interval=notifier.watchdog_interval,
                  on_published=metrics.observe_upload if metrics is not None else _ignore_timing)
    if metrics is not None:
        metrics.start()
    agent.start()
    return agent, metrics


def _stop(agent: Agent, metrics: Metrics | None, config: Config, reloading: bool = False) -> None:
    logger.info("{} (an upload in flight gets up to {} s)",
                "reloading: restarting the agent with the new configuration" if reloading else "stopping",
                config.daemon.stop_timeout_seconds)
    agent.stop()
    if metrics is not None:
        metrics.stop()


def _reread(config: Config) -> Config | None:
    try:
        return load_config(config.source)
    except ConfigError as exc:
        logger.error("SIGHUP: new configuration refused, the running one stays: {}", exc)
        return None
