"""Operator views and actions on the journal: status table and filters, history, report, retry.

All of it works while the daemon runs: reads open their own read-only connection, and `retry`
writes through SQLite (WAL, busy timeout) with the same journaled move the daemon uses, then wakes
the running agent (agent.ops.wakeup), so a retried file is sent at once.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.config import Config
from agent.errors import AgentError
from agent.imports.naming import remote_name
from agent.imports.types import ImportType
from agent.logs import escape_controls
from agent.store.fsutil import durable_move
from agent.store.journal import FileRecord, FileState, Journal, iso_utc, spool_name
from agent.units import counted

if TYPE_CHECKING:
    from agent.pipeline.progress import Progress

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
RETRYABLE = (FileState.FAILED, FileState.STALE)
MIN_DETAIL_COLUMNS = 24  # the last column of `status` goes on its own line when less room is left
DETAIL_INDENT = 6


class OpsError(AgentError):
    """An operator request that cannot be done; the message says why and what to do."""


def parse_duration(text: str) -> timedelta:
    """`90s`, `15m`, `6h`, `2d`, `1w` (a bare number is seconds)."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m, 6h, 2d or 1w")
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()])


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}" if seconds >= 10 * size else f"{seconds / size:.1f}{unit}"
    return f"{max(0.0, seconds):.0f}s"


def select(records: list[FileRecord], states: tuple[str, ...] = (), older_than: timedelta | None = None,
           newer_than: timedelta | None = None, now: datetime | None = None) -> list[FileRecord]:
    """Filter by state and by age (time since the file was taken from drop/, `created_at`)."""
    now = now or datetime.now(UTC)
    chosen = []
    for record in records:
        if states and record.state.value not in states:
            continue
        age = now - parse_time(record.created_at)
        if older_than is not None and age < older_than:
            continue
        if newer_than is not None and age > newer_than:
            continue
        chosen.append(record)
    return chosen


def status_table(records: list[FileRecord], progress: Mapping[int, Progress] | None = None,
                 width: int | None = None, now: datetime | None = None) -> list[str]:
    """One row per file: names and remote names in full; the last column (an `uploading` file's
    progress, else the last error) cut to `width` columns (None: never cut), or moved to a line of
    its own below the row when too little room is left beside the names."""
    now = now or datetime.now(UTC)
    progress = progress or {}
    rows = []
    for r in records:
        age = human_age((now - parse_time(r.created_at)).total_seconds())
        shown = progress.get(r.id) if r.state == FileState.UPLOADING else None
        error = (r.error or "").removeprefix(f"{r.name} was not uploaded: ")  # the row names the file
        detail = shown.text() if shown is not None else " ".join(
            (error or ("adopted from spool/: the journal had no row" if r.adopted else "")
             or _imported(r)).split())
        rows.append((str(r.id), r.state.value, r.import_type or "-", age, escape_controls(r.name),
                     escape_controls(r.remote_name or "-"), escape_controls(detail)))
    header = ("ID", "STATE", "TYPE", "AGE", "NAME", "REMOTE NAME", "PROGRESS OR LAST ERROR")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(6)]
    room = None if width is None else width - (sum(widths) + 2 * len(widths))
    below = room is not None and room < MIN_DETAIL_COLUMNS  # the names take the room
    lines = []
    for index, row in enumerate([header, *rows]):
        left = "".join(f"{cell:>{size}}  " if column in (0, 3) else f"{cell:<{size}}  "
                       for column, (cell, size) in enumerate(zip(row[:6], widths, strict=True)))
        detail = row[6]
        if not below:
            lines.append((left + (detail if room is None else _cut(detail, room))).rstrip())
            continue
        lines.append(left.rstrip())
        if index and detail:  # below its row, indented
            assert width is not None
            lines.append(" " * DETAIL_INDENT + _cut(detail, max(MIN_DETAIL_COLUMNS, width - DETAIL_INDENT)))
    return lines


def terminal_width() -> int | None:
    """Columns of the terminal `status` prints to ($COLUMNS first); None when stdout is not a
    terminal (a pipe or a file gets whole lines)."""
    if os.environ.get("COLUMNS", "").isdigit() or sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return None


def _cut(text: str, room: int) -> str:
    return text if len(text) <= room else text[: max(0, room - 3)] + "..."


def status_detail(record: FileRecord, config: Config, progress: Progress | None,
                  events: list[tuple[str, str, str | None]]) -> list[str]:
    """`status NAME|ID`: everything known about one file, the reason and the next step included."""
    from agent.ops.explain import first_sentence, next_step, reason_file, where_now

    lines = [f"#{record.id} {record.name}",
             f"  state:        {record.state.value}",
             f"  import type:  {record.import_type or '-'}",
             f"  remote name:  {record.remote_name or '-'}",
             f"  size:         {f'{record.size:,} bytes' if record.size is not None else '-'}",
             f"  sha256:       {record.sha256 or '-'}",
             f"  taken:        {record.created_at} (from {record.source_path})",
             f"  updated:      {record.updated_at}",
             f"  attempts:     {record.attempts}"]
    if record.next_attempt_at is not None and record.state in (FileState.QUEUED, FileState.UPLOADING,
                                                               FileState.PUBLISHING):
        lines.append(f"  next attempt: {iso_utc(datetime.fromtimestamp(record.next_attempt_at, UTC))}")
    if progress is not None and record.state == FileState.UPLOADING:
        lines.append(f"  progress:     {progress.text()} (at {progress.updated_at})")
    lines.append(f"  now:          {where_now(record, config)}")
    if record.error:
        lines.append(f"  reason:       {' '.join(record.error.split())}")
    reason = reason_file(record)
    if reason is not None and os.path.exists(reason):
        lines.append(f"  reason file:  {reason}")
    if record.adopted:
        lines.append("  adopted:      from spool/: the journal had no row for it")
    lines.append(f"  next step:    {next_step(record, config)}")
    if events:
        at, state, message = events[-1]
        said = f": {first_sentence(message, 100)}" if message else ""
        lines.append(f"  last event:   {at} {state}{said} (`saasquatch-agent history {record.id}` shows all"
                     f" {counted(len(events), 'event')})")
    return [escape_controls(line) for line in lines]


def _imported(record: FileRecord) -> str:
    """The API route's outcome: how many records SaaSquatch's import job processed."""
    if record.records_processed is None:
        return ""
    return f"{record.records_processed} records imported (job {record.api_job_id})"


def find(journal: Journal, key: str) -> list[FileRecord]:
    """Rows named by journal id (`12` or `#12`), original name or remote name."""
    digits = key.lstrip("#")
    if digits.isdigit():
        try:
            return [journal.get(int(digits))]
        except KeyError:
            return []
    return journal.query("WHERE name = ? OR remote_name = ?", (key, key))


def history(journal: Journal, key: str) -> list[tuple[FileRecord, list[tuple[str, str, str | None]]]]:
    return [(record, journal.events(record.id)) for record in find(journal, key)]


def history_lines(found: list[tuple[FileRecord, list[tuple[str, str, str | None]]]]) -> list[str]:
    lines: list[str] = []
    for record, events in found:
        if lines:
            lines.append("")
        lines.append(escape_controls(
            f"#{record.id} {record.name} ({record.import_type or 'untyped'}; remote"
            f" {record.remote_name or '-'}; now {record.state.value}; at {record.local_path})"))
        for at, state, message in events:
            if not message and state == record.state.value and record.error:
                message = record.error  # a journal of an older version left the reason out of the event
            lines.append(escape_controls(f"  {at}  {state:<10} {' '.join((message or '').split())}"))
    return lines


@dataclass
class ReportRow:
    day: str
    import_type: str
    counts: Counter[str]
    records_processed: int = 0  # the API route: recordsProcessed of the import jobs that completed

    def to_json(self) -> dict[str, Any]:
        return {"day": self.day, "import_type": self.import_type, "total": sum(self.counts.values()),
                **{outcome: self.counts.get(outcome, 0) for outcome in REPORT_OUTCOMES},
                "records_processed": self.records_processed}


REPORT_OUTCOMES = ("archived", "failed", "stale", "split", "in_progress")


def outcome_of(state: FileState) -> str:
    if state in (FileState.ARCHIVED, FileState.FAILED, FileState.STALE, FileState.SPLIT):
        return state.value
    return "in_progress"


def report(records: list[FileRecord], days: int, now: datetime | None = None) -> list[ReportRow]:
    """Per day (when the file was taken, UTC) and import type: how many ended in each outcome."""
    now = now or datetime.now(UTC)
    first_day = (now - timedelta(days=days - 1)).date().isoformat()
    rows: dict[tuple[str, str], Counter[str]] = {}
    imported: Counter[tuple[str, str]] = Counter()
    for record in records:
        day = record.created_at[:10]
        if day < first_day:
            continue
        key = (day, record.import_type or "-")
        rows.setdefault(key, Counter())[outcome_of(record.state)] += 1
        if record.state == FileState.ARCHIVED and record.records_processed:
            imported[key] += record.records_processed
    return [ReportRow(day, kind, counts, imported[(day, kind)])
            for (day, kind), counts in sorted(rows.items())]


def report_lines(rows: list[ReportRow]) -> list[str]:
    outcomes = " ".join(f"{outcome.upper():>11}" for outcome in REPORT_OUTCOMES)
    records = any(row.records_processed for row in rows)  # the API route: records imported
    header = f"{'DAY':<10}  {'TYPE':<18} {'TOTAL':>6} {outcomes}" + (f" {'RECORDS':>9}" if records else "")
    lines = [header]
    for row in rows:
        data = row.to_json()
        lines.append(f"{row.day:<10}  {escape_controls(row.import_type):<18} {data['total']:>6} "
                     + " ".join(f"{data[o]:>11}" for o in REPORT_OUTCOMES)
                     + (f" {row.records_processed:>9}" if records else ""))
    return lines


def _sha256(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def retry(config: Config, journal: Journal, key: str) -> FileRecord:
    """Put a failed or stale file back in the queue, under a new remote name, forcing a resend.

    The move back from failed/ to the spool is journaled like every other (intent, rename, done);
    running `retry` again finishes one a crash interrupted.
    """
    matches = find(journal, key)
    if not matches:
        raise OpsError(f"no file in the journal is called {key!r} (use the ID from `status`)")
    candidates = [r for r in matches if r.state in RETRYABLE]
    if not candidates:
        states = ", ".join(f"#{r.id} is {r.state.value}" for r in matches)
        raise OpsError(f"only failed or stale files can be retried; {states}")
    if len(candidates) > 1:
        ids = ", ".join(f"#{r.id}" for r in candidates)
        raise OpsError(f"{key!r} names several failed files ({ids}); retry one by its ID")
    record = candidates[0]
    spool = config.spool_dir / spool_name(record.id, record.name)
    if record.pending_path and record.pending_state == FileState.QUEUED.value:
        return _finish_requeue(journal, record, "retry finished after an interruption")
    if record.pending_path:
        raise OpsError(f"#{record.id} is being moved by the agent right now; try again in a moment")
    local = Path(record.local_path)
    if not os.path.lexists(local):
        raise OpsError(f"#{record.id}: its copy {local} is no longer in failed/; drop the file again")
    import_type = record.import_type
    if record.remote_name is None or import_type is None or record.sha256 is None:
        import_type = _admit_again(config, record, local)
    if record.sha256 and record.size is not None:
        size, sha256 = record.size, record.sha256
    else:
        size, sha256 = _sha256(local)
    when = datetime.now(UTC)
    prefix = config.imports.prefixes.for_type(ImportType(import_type))
    new_name = remote_name(prefix, record.name, sha256, when)
    if new_name == record.remote_name:  # the same second as the first attempt: never reuse a name
        new_name = remote_name(prefix, record.name, sha256, when + timedelta(seconds=1))
    os.makedirs(config.spool_dir, exist_ok=True)
    record = journal.update(
        record.id, pending_path=spool, pending_state=FileState.QUEUED, remote_name=new_name,
        import_type=import_type, size=size, sha256=sha256, attempts=0, force_resend=1,
        message=f"retry requested by the operator: re-queued as {new_name}",
    )
    durable_move(local, spool)
    return _finish_requeue(journal, record, None)


def _finish_requeue(journal: Journal, record: FileRecord, message: str | None) -> FileRecord:
    assert record.pending_path
    if os.path.lexists(record.local_path) and not os.path.lexists(record.pending_path):
        durable_move(Path(record.local_path), Path(record.pending_path))
    return journal.update(
        record.id, state=FileState.QUEUED, local_path=record.pending_path, pending_path=None,
        pending_state=None, error=None, next_attempt_at=None, attempts=0, force_resend=1, message=message,
    )


def _admit_again(config: Config, record: FileRecord, local: Path) -> str:
    """A file refused before it was named: it must pass the import rules now (duplicates aside)."""
    from agent.imports.admission import admit
    from agent.intake.claim import subfolder_of

    _size, digest = _sha256(local)
    verdict = admit(local, record.name, subfolder_of(Path(record.source_path), config.paths.drop), digest,
                    config.imports)
    if verdict.refusal is not None:
        raise OpsError(f"#{record.id} still breaks the import rules, so it was not re-queued:\n"
                       f"{verdict.refusal.strip()}")
    if verdict.split_format is not None or verdict.import_type is None:
        raise OpsError(f"#{record.id} is over the per-file limits; drop it again so the agent splits it")
    return verdict.import_type.value
