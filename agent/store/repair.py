"""`saasquatch-agent journal check` and `journal rebuild`: a damaged or lost journal, and the way back.

Rebuild never deletes: the damaged database (and its -wal/-shm) is moved aside under a timestamped
name, a new journal is made from the latest good backup (`journal.backup_seconds`) or empty, and
the spool files no row names are adopted (agent.store.adopt). archive/ and failed/ are left as they are.
"""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.config import Config, Transport
from agent.store.adopt import reconcile_spool
from agent.store.fsutil import durable_move, durable_writer, ensure_dir
from agent.store.journal import FileState, Journal, JournalError


def integrity(path: Path) -> str:
    """'ok', or what SQLite's integrity_check (or opening the file) says is wrong."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = db.execute("PRAGMA integrity_check").fetchall()
            db.execute("SELECT COUNT(*) FROM files").fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    problems = [str(row[0]) for row in rows if row[0] != "ok"]
    return "; ".join(problems[:5]) if problems else "ok"


def check(config: Config) -> tuple[bool, list[str]]:
    """Integrity, spool files no row names, unfinished rows whose files are gone."""
    path = config.journal_path
    lines: list[str] = []
    ok = True
    spool_files = _spool_files(config)
    if not path.exists():
        lines.append(f"journal: none at {path} (a new one is made at the next start)")
        named: set[str] = set()
        ok = not spool_files
    else:
        verdict = integrity(path)
        if verdict != "ok":
            lines.append(f"journal: DAMAGED ({verdict}); fix: stop the agent, then"
                         " `saasquatch-agent journal rebuild`")
            return False, [*lines, *(f"spool file (kept; adopted by the rebuild): {p}" for p in spool_files)]
        lines.append(f"journal: {path} passes SQLite's integrity check")
        journal = Journal(path, readonly=True)
        try:
            named = journal.paths_under(config.spool_dir)
            unfinished = journal.unfinished()
            held = journal.query("WHERE pending_path IS NOT NULL AND state IN (?, ?)",
                                 (FileState.FAILED.value, FileState.STALE.value))
        finally:
            journal.close()
        for record in unfinished:
            if not os.path.lexists(record.local_path) and not (
                    record.pending_path and os.path.lexists(record.pending_path)):
                ok = False
                lines.append(f"row {record.label} ({record.state.value}): its file {record.local_path}"
                             " is gone; the next start files it as failed")
        for record in held:
            lines.append(f"row {record.label} ({record.state.value}) waits to move to {record.pending_path}"
                         f" (still in {record.local_path}); fix failed/ and it moves within a minute")
    orphans = [p for p in spool_files if str(p) not in named]
    for orphan in orphans:
        ok = False
        lines.append(f"spool file with no row: {orphan}; the next start adopts it (checked again like"
                     " a new file)")
    backup = config.journal_backup_path
    if backup.exists():
        taken = datetime.fromtimestamp(backup.stat().st_mtime, UTC)
        lines.append(f"backup: {backup} ({taken:%Y-%m-%d %H:%M:%S}Z)")
    else:
        lines.append(f"backup: none yet at {backup}")
    lines.append("nothing wrong found" if ok else "something is wrong (see above)")
    return ok, lines


def _spool_files(config: Config) -> list[Path]:
    spool = config.spool_dir
    if not spool.is_dir():
        return []
    found = [p for p in sorted(spool.iterdir()) if p.is_file() and not p.name.startswith(".")]
    for folder in sorted(spool.glob("split-*")):
        found += [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return found


def rebuild(config: Config) -> list[str]:
    """Set the journal aside and make a new one (backup or empty), then adopt the spool. The caller
    holds the agent lock (the agent is not running)."""
    path = config.journal_path
    lines: list[str] = []
    ensure_dir(config.paths.state_dir)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for suffix in ("", "-wal", "-shm", "-journal"):
        old = path.with_name(path.name + suffix)
        if os.path.lexists(old):
            aside = path.with_name(f"{path.name}.damaged-{stamp}{suffix}")
            durable_move(old, aside)  # never deleted, never over an earlier one
            lines.append(f"moved {old.name} aside to {aside}")
    backup = config.journal_backup_path
    if backup.exists() and integrity(backup) == "ok":
        with open(backup, "rb") as reader, durable_writer(path) as writer:
            while chunk := reader.read(1 << 20):
                writer.write(chunk)
        taken = datetime.fromtimestamp(backup.stat().st_mtime, UTC)
        lines.append(f"restored the backup of {taken:%Y-%m-%d %H:%M:%S}Z; changes after it are lost")
    else:
        lines.append("no good backup: a new, empty journal" if not backup.exists()
                     else f"backup {backup} is damaged too: a new, empty journal")
    journal = Journal(path)
    try:
        _distrust_unsent(journal)
        if config.upload.transport == Transport.API:
            _distrust_unstarted_jobs(journal)
        adopted = reconcile_spool(config, journal)
    finally:
        journal.close()
    lines.append(f"adopted {len(adopted)} spool file(s) no row named; the next start checks them again")
    lines.append("archive/ and failed/ are unchanged; start the agent again")
    return lines


def _distrust_unsent(journal: Journal) -> None:
    """Rows restored from a backup may be behind: a `queued` file may have been sent since, so it
    is looked up on the server before anything is sent (`uploading`), and a `claimed` one is
    treated like an adopted file (its remote name was not fixed yet)."""
    rows = journal.unfinished()
    Change = tuple[int, str | None, dict[str, Any]]
    look: list[Change] = [(r.id, "restored from a backup: looked up on the server before sending",
                           {"state": FileState.UPLOADING}) for r in rows if r.state == FileState.QUEUED]
    again: list[Change] = [(r.id, "restored from a backup: checked again", {"adopted": 1})
                           for r in rows if r.state == FileState.CLAIMED]
    journal.update_many(look, fetch=False)
    journal.update_many(again, fetch=False)


def _distrust_unstarted_jobs(journal: Journal) -> None:
    """The API route: a row restored from a backup without a job id may have got one since (the
    backup is older), and there is no way to ask SaaSquatch: such rows are marked like adopted
    files, which the API route never sends without the operator (`retry`)."""
    waiting = (FileState.QUEUED, FileState.UPLOADING, FileState.UPLOADED)
    journal.update_many([(r.id, "restored from a backup: unknown whether an import job was started since",
                          {"adopted": 1}) for r in journal.unfinished()
                         if r.state in waiting and r.api_job_id is None], fetch=False)


__all__ = ["JournalError", "check", "integrity", "rebuild"]
