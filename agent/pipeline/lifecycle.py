"""After the upload: the status poll, archive and retention jobs (APScheduler), and notifications.

With `status.mode = "none"` a verified upload is archived at once (as the upload path always did).
With another mode the file stays in the spool in state `uploaded`; the status job then lists each
status folder once per poll, reads the status files named after each upload and moves the file on:

    uploaded -> accepted -> processing -> completed -> archived     (server's files downloaded)
    uploaded | accepted | processing -> failed                     (failed/ + the server's words)
    uploaded | accepted | processing -> stale                      (failed/; no verdict in time)

States only move forward. Every move of the local copy is the journaled move of `agent.store.archive`
(intent, rename, done), so a crash at any point is finished by start-up recovery.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import posixpath
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import paramiko
from loguru import logger

from agent.config import Config, RemoteResults, StatusMode, Transport
from agent.pipeline.notify import Notifier
from agent.store.archive import SERVER_INFIX, Filer
from agent.store.fsutil import copy_bytes, durable_writer, fsync_dir, rewrite_durably, write_bytes_durably
from agent.store.journal import FileRecord, FileState, Journal
from agent.transport.remote_status import (
    MAX_STATUS_BYTES,
    Outcome,
    Reading,
    Snapshot,
    find_status_files,
    read_remote,
    status_folders,
    verdict,
)
from agent.transport.session_pool import SessionPool
from agent.transport.sftp import ConnectError, PrivateKeyError, SftpSession
from agent.units import human_duration

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler  # only `run` as a daemon needs it

TRACKED_STATES = (FileState.UPLOADED, FileState.ACCEPTED, FileState.PROCESSING, FileState.COMPLETED)
_RANK = {state: rank for rank, state in enumerate(TRACKED_STATES)}
ARCHIVE_JOB_SECONDS = 60.0  # compress what was archived but not yet gzipped (after a crash)
RETENTION_JOB_SECONDS = 3600.0
SERVER_FILE_INFIX = SERVER_INFIX  # archive/.../<name>.server.<remote status file name>


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def server_file_path(dest: Path, remote_file: str) -> Path:
    return dest.with_name(f"{dest.name}{SERVER_FILE_INFIX}{remote_file}")


class Lifecycle:
    """The after-upload policy (`after_upload`, `compress`: hooks agent.service gives the uploader)
    and the jobs that follow a file.

    `pool`: the upload threads' sessions; the poll's own session joins them, so a server that allows
    one connection per user is never asked for a second one by the poll (None: its own session).
    `notifier`: the notify.command hook (default: one of its own).
    """

    def __init__(self, config: Config, journal: Journal, filer: Filer, *,
                 notifier: Notifier | None = None, pool: SessionPool | None = None) -> None:
        self.config = config
        self.journal = journal
        self.filer = filer
        self.notifier = notifier or Notifier(config.notify)
        # the status poll's own session (the SFTP route only; the API route follows its jobs itself)
        self.session = SftpSession(config.sftp) if config.upload.transport == Transport.SFTP else None
        self.pool = pool
        if pool is not None and self.session is not None:
            pool.add(self.session)
        self._archive_lock = threading.Lock()  # the compress and retention jobs never overlap
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ the upload path's hooks

    def after_upload(self, record: FileRecord) -> FileRecord:
        """Called by the uploader once a file is published and verified (state `uploaded`)."""
        if self.config.status.tracking:
            logger.info("{} published; the status job follows it ({})", record.label,
                        ", ".join(mode.value for mode in self.config.status.mode))
            return record
        return self.compress(self.filer.archive(record))

    # ------------------------------------------------------------------ jobs

    def add_jobs(self, scheduler: BaseScheduler) -> None:
        now = datetime.now(UTC)
        if self.config.status.tracking:
            scheduler.add_job(self.poll, "interval", seconds=self.config.status.poll_seconds,
                              id="status-poll", coalesce=True, max_instances=1, next_run_time=now)
        scheduler.add_job(self.archive_job, "interval", seconds=ARCHIVE_JOB_SECONDS, id="archive",
                          coalesce=True, max_instances=1, next_run_time=now)
        if self.config.archive.retention_days > 0:
            scheduler.add_job(self.prune, "interval", seconds=RETENTION_JOB_SECONDS, id="retention",
                              coalesce=True, max_instances=1, next_run_time=now + timedelta(seconds=5))

    def stop(self, timeout: float) -> None:
        self._stopping.set()  # a poll in progress stops between two files
        if self.session is not None:
            self.session.close()
        self.notifier.stop(timeout)

    # ------------------------------------------------------------------ status poll

    def tracked(self) -> list[FileRecord]:
        return [r for r in self.journal.unfinished()
                if r.state in _RANK and not r.pending_path and r.remote_name]

    def poll(self) -> None:
        """One status poll: one listing per folder, then each tracked file moves on (or not)."""
        records = self.tracked()
        if not records:
            return
        pool = self.pool
        try:
            session = pool.acquire() if pool is not None else self.session
        except InterruptedError:  # stopping
            return
        if session is None:
            return
        try:
            self._poll(session, records)
        finally:
            if pool is not None:
                pool.release(session)

    def _poll(self, session: SftpSession, records: list[FileRecord]) -> None:
        remote_dir = self.config.sftp.remote_dir
        try:
            sftp = session.client()
            snapshot = Snapshot.take(sftp, status_folders(self.config.status, remote_dir))
        except (ConnectError, PrivateKeyError, OSError, EOFError, paramiko.SSHException) as exc:
            session.drop()
            logger.warning("status poll: cannot list the server ({}); {} file(s) wait for the next poll",
                           exc, len(records))
            return
        for record in records:
            if self._stopping.is_set():
                return
            try:
                self._follow(sftp, snapshot, record)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                session.drop()
                logger.warning("status poll stopped at {}: {}; the rest wait for the next poll",
                               record.label, exc)
                return
            except Exception:  # noqa: BLE001 - one odd file must not stop the others
                logger.exception("status poll: {} could not be followed", record.label)

    def _follow(self, sftp: paramiko.SFTPClient, snapshot: Snapshot, record: FileRecord) -> None:
        cfg = self.config.status
        remote_dir = self.config.sftp.remote_dir
        assert record.remote_name
        readings: list[Reading] = []
        raw: dict[str, bytes] = {}
        for folder, name in find_status_files(snapshot, cfg, remote_dir, record.remote_name):
            data, reading = read_remote(sftp, folder, name)
            readings.append(reading)
            raw[reading.path] = data
        outcome = verdict(readings)
        consumed = (StatusMode.CONSUMED in cfg.mode and snapshot.names.get(remote_dir) is not None
                    and not snapshot.has(remote_dir, record.remote_name))
        if outcome is Outcome.FAILED:
            self._fail(sftp, record, readings, raw)
            return
        if (outcome is Outcome.COMPLETED or record.state == FileState.COMPLETED
                or (consumed and StatusMode.STATUS_FILES not in cfg.mode)):
            self._complete(sftp, record, readings, raw, consumed)
            return
        unknown = "; ".join(f"unrecognised status file {r.name} ({r.message}); kept, not acted on"
                            for r in readings if r.outcome is Outcome.UNKNOWN) or None
        target = (FileState.PROCESSING if outcome is Outcome.PROCESSING
                  else FileState.ACCEPTED if outcome is Outcome.ACCEPTED or consumed else None)
        said = "; ".join(f"{r.name}: {r.message}" for r in readings if r.outcome is not Outcome.UNKNOWN)
        if target is not None and _RANK[target] > _RANK[record.state]:
            why = f"server: {said}" if said else f"gone from {remote_dir}: the server took it"
            record = self.journal.update(record.id, state=target, error=unknown, message=why)
            logger.info("{} is {} ({})", record.label, target.value, why)
        elif unknown != record.error:
            record = self.journal.update(record.id, error=unknown, message=unknown)
            if unknown:
                logger.warning("{}: {}", record.label, unknown)
        uploaded_at = self._uploaded_at(record)
        if datetime.now(UTC) - uploaded_at > timedelta(seconds=cfg.timeout):
            self._stale(record, uploaded_at)

    def _uploaded_at(self, record: FileRecord) -> datetime:
        times = [at for at, state, _message in self.journal.events(record.id) if state == FileState.UPLOADED]
        return parse_iso(max(times) if times else record.updated_at)

    def _complete(self, sftp: paramiko.SFTPClient, record: FileRecord, readings: list[Reading],
                  raw: dict[str, bytes], consumed: bool) -> None:
        said = "; ".join(f"{r.name}: {r.message}" for r in readings if r.outcome is not Outcome.UNKNOWN)
        if record.state != FileState.COMPLETED:
            if consumed and record.state == FileState.UPLOADED:
                record = self.journal.update(
                    record.id, state=FileState.ACCEPTED,
                    message=f"gone from {self.config.sftp.remote_dir}: the server took it")
            record = self.journal.update(record.id, state=FileState.COMPLETED, error=None,
                                         message=f"server: {said}" if said else "taken by the server")
        dest = self.filer.archive_destination(record)
        self._download(sftp, readings, raw, dest)
        record = self.journal.update(record.id, pending_path=dest, pending_state=FileState.ARCHIVED)
        record = self.filer.finish_move(record)
        logger.info("{} completed on the server; archived to {}", record.label, record.local_path)
        self._tidy_remote(sftp, readings)
        self.compress(record)

    def _fail(self, sftp: paramiko.SFTPClient, record: FileRecord, readings: list[Reading],
              raw: dict[str, bytes]) -> None:
        failing = [r for r in readings if r.outcome is Outcome.FAILED]
        said = "; ".join(r.message for r in failing)
        reason = (
            f"{said} (the server's verdict on {record.name}, sent as {record.remote_name}, in"
            f" {', '.join(r.name for r in failing)})."
            f" The server's own files are saved beside this one ({SERVER_FILE_INFIX.strip('.')}.*)."
            f" Fix the file and drop it again, or run `saasquatch-agent retry {record.id}` to send it"
            " again unchanged."
        )
        errors_csv = next((r.errors_csv for r in failing if r.errors_csv), None)
        dest = self.filer.failed_destination(record)  # reserves every name written beside it
        self._download(sftp, readings, raw, dest)
        self.journal.update(record.id, message=f"server: {said}")
        self.filer.quarantine(self.journal.get(record.id), reason, errors_csv, dest=dest)
        self._tidy_remote(sftp, readings)

    def _stale(self, record: FileRecord, uploaded_at: datetime) -> None:
        within = human_duration(self.config.status.timeout)
        reason = (
            f"no final word from the server on {record.name} (sent as {record.remote_name} at"
            f" {iso(uploaded_at)}) within {within}; it may or may not have been imported: check the"
            " File upload history on SaaSquatch's SFTP integration page. `saasquatch-agent retry"
            f" {record.id}` sends it again under a new name."
        )
        record = self.filer.quarantine(record, reason, state=FileState.STALE,
                                       message=f"no verdict within {within}")
        if record.pending_path is None:  # else failed/ cannot take it yet (resume_held finishes it)
            self.notifier.submit(record, "stale")

    def _download(self, sftp: paramiko.SFTPClient, readings: list[Reading], raw: dict[str, bytes],
                  dest: Path) -> None:
        """The server's status and result files, next to where the input is about to go."""
        if not self.config.status.download_results:
            return
        for reading in readings:
            target = server_file_path(dest, reading.name)  # reserved with dest (Filer._free)
            data = raw[reading.path]
            if len(data) > MAX_STATUS_BYTES:
                with durable_writer(target) as handle:
                    sftp.getfo(reading.path, handle)
            else:
                write_bytes_durably(target, data)

    def _tidy_remote(self, sftp: paramiko.SFTPClient, readings: list[Reading]) -> None:
        """Remove or move the server's files once they are safe here, only when configured."""
        cfg = self.config.status
        if cfg.remote_results == RemoteResults.KEEP or not cfg.download_results:
            return
        for reading in readings:
            try:
                if cfg.remote_results == RemoteResults.REMOVE:
                    sftp.remove(reading.path)
                else:
                    sftp.rename(reading.path, posixpath.join(cfg.remote_results_folder, reading.name))
            except OSError as exc:
                logger.warning("could not {} {} on the server: {}", cfg.remote_results.value,
                               reading.path, exc)

    # ------------------------------------------------------------------ archive and retention

    def archive_job(self) -> None:
        """Finish moves to failed/ that waited for it to work again; gzip archived inputs not yet
        compressed (a crash or a config change left them)."""
        self.filer.resume_held()
        if not self.config.archive.compress:
            return
        for record in self.journal.query("WHERE state = ? AND pending_path IS NULL"
                                         " AND local_path NOT LIKE '%.gz'", (FileState.ARCHIVED.value,)):
            try:
                self.compress(record)
            except OSError as exc:
                logger.warning("{} could not be compressed: {}", record.label, exc)

    def compress(self, record: FileRecord) -> FileRecord:
        """archive/.../<name> -> <name>.gz: write, fsync, rename, unlink the original, then journal.

        A crash before the rename leaves the original (done again); after the unlink but before the
        journal update, the next run finds only the .gz and records it.
        """
        if not self.config.archive.compress or record.state != FileState.ARCHIVED:
            return record
        with self._archive_lock:
            src = Path(record.local_path)
            if src.name.endswith(".gz"):
                return record
            packed = src.with_name(src.name + ".gz")  # reserved with src (Filer._free)
            if not os.path.lexists(src):
                if os.path.lexists(packed):
                    return self.journal.update(record.id, local_path=packed,
                                               message="compression finished after a restart")
                return record
            if os.path.lexists(packed):  # a crash after the rename, before the unlink; or not ours
                if not _gzip_holds(packed, record.sha256):
                    raise FileExistsError(f"{packed} exists and does not hold {src.name}; not replaced,"
                                          f" {src.name} stays uncompressed")
                remove_file(src)
                fsync_dir(src.parent)
                return self.journal.update(record.id, local_path=packed,
                                           message="compression finished after a restart")
            mtime = int(os.stat(src).st_mtime)

            def gzip_into(reader: BinaryIO, raw_out: BinaryIO) -> None:
                with gzip.GzipFile(filename=src.name, mode="wb", fileobj=raw_out, mtime=mtime) as writer:
                    copy_bytes(reader, writer)  # type: ignore[arg-type]

            rewrite_durably(src, packed, gzip_into)
            return self.journal.update(record.id, local_path=packed, message=f"compressed to {packed.name}")

    def prune(self, now: datetime | None = None) -> int:
        """Delete archived inputs (and their server files and journal rows) older than retention_days.

        Per file: the files go first, then the row; a crash in between leaves a row whose files are
        gone, which the next prune (it is still due) deletes. Nothing not due is ever touched, and
        failed/ is never pruned.
        """
        days = self.config.archive.retention_days
        if days <= 0:
            return 0
        cutoff = iso((now or datetime.now(UTC)) - timedelta(days=days))
        root = self.config.paths.archive.resolve()
        pruned = 0
        with self._archive_lock:
            due = self.journal.query(
                "WHERE state IN (?, ?) AND pending_path IS NULL AND updated_at < ?",
                (FileState.ARCHIVED.value, FileState.SPLIT.value, cutoff),
            )
            for record in due:
                path = Path(record.local_path)
                if not path.resolve().is_relative_to(root):
                    logger.warning("retention: {} is not under {}; not pruned", record.label, root)
                    continue
                remove_with_server_files(path)
                self.journal.delete(record.id)
                _remove_empty_parents(path.parent, root)
                pruned += 1
        if pruned:
            logger.info("retention: pruned {} archived file(s) older than {:g} days", pruned, days)
        return pruned


def _gzip_holds(packed: Path, sha256: str | None) -> bool:
    """Whether packed is a complete gzip of the content with this SHA-256."""
    if sha256 is None:
        return False
    digest = hashlib.sha256()
    try:
        with gzip.open(packed, "rb") as reader:
            while chunk := reader.read(1 << 20):
                digest.update(chunk)
    except (OSError, EOFError):
        return False
    return digest.hexdigest() == sha256


def remove_with_server_files(path: Path) -> None:
    folder = path.parent
    base = path.name[:-3] if path.name.endswith(".gz") else path.name
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for name in names:
        if name in (base, base + ".gz") or name.startswith(base + SERVER_FILE_INFIX):
            remove_file(folder / name)
    fsync_dir(folder)


def remove_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_empty_parents(folder: Path, root: Path) -> None:
    for _ in range(4):  # DD, MM, YYYY: never above the archive root
        if folder.resolve() == root or not folder.resolve().is_relative_to(root):
            return
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent

