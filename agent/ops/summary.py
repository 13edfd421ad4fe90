"""The end of `run --once`: one entry per file of the run (name, outcome, where it is now, the next
step) and one line of totals. Printed by the command (and the demo), not logged: the log already
said each refusal once."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from agent.config import Config
from agent.logs import escape_controls
from agent.ops.explain import AWAITING_VERDICT, SENDING, first_sentence, next_step, where_now
from agent.store.journal import FileRecord, FileState, Journal, iso_utc
from agent.units import counted

ARCHIVED_SHOWN = 20  # archived files listed one by one; beyond, one line says how many more


def run_records(journal: Journal, start_ids: list[int], first_new_id: int) -> list[FileRecord]:
    """The rows a `run --once` dealt with: those unfinished at its start and those it created."""
    records = journal.query("WHERE id >= ?", (first_new_id,))
    for start in range(0, len(start_ids), 500):
        chunk = tuple(start_ids[start:start + 500])
        records += journal.query(f"WHERE id IN ({', '.join('?' * len(chunk))})", chunk)
    return sorted({record.id: record for record in records}.values(), key=lambda record: record.id)


def outcome(record: FileRecord, tracking: bool) -> str:
    state = record.state
    if state in SENDING:
        return "not sent, left queued" if state == FileState.QUEUED else f"not finished ({state.value})"
    if state in AWAITING_VERDICT and tracking:
        return f"{state.value}, awaiting the server's verdict"
    return state.value


def summary_lines(records: list[FileRecord], config: Config, connection_error: str | None = None,
                  now: datetime | None = None) -> list[str]:
    """What `run --once` prints when it ends."""
    tracking = config.status.tracking
    stamp = iso_utc(now or datetime.now(UTC))
    if not records:
        return [f"run --once at {stamp}: nothing in drop/ or waiting in the spool"]
    lines = [f"run --once at {stamp}:"]
    archived = [record for record in records if record.state == FileState.ARCHIVED]
    hidden = len(archived) - ARCHIVED_SHOWN if len(archived) > ARCHIVED_SHOWN else 0
    shown_archived = {record.id for record in archived[:ARCHIVED_SHOWN]}
    for record in records:
        if record.state == FileState.ARCHIVED and record.id not in shown_archived:
            continue
        headline = f"  #{record.id} {record.name}: {outcome(record, tracking)}"
        why = record.error or (connection_error if record.state in SENDING else None)
        if why and record.state not in (FileState.ARCHIVED, FileState.SPLIT):
            headline += f" ({first_sentence(why.removeprefix(f'{record.name} was not uploaded: '), 180)})"
        lines.append(escape_controls(headline))
        lines.append(escape_controls(f"      now:  {where_now(record, config)}"))
        lines.append(escape_controls(
            f"      next: {next_step(record, config, once=True, connection_error=connection_error)}"))
    if hidden:
        lines.append(f"  ... and {counted(hidden, 'more file')} archived (`saasquatch-agent status"
                     " --state archived` lists them)")
    lines.append(totals_line(records, tracking))
    return lines


def totals_line(records: list[FileRecord], tracking: bool) -> str:
    counts: Counter[str] = Counter()
    for record in records:
        if record.state in SENDING:
            counts["left queued"] += 1
        elif record.state in AWAITING_VERDICT and tracking:
            counts["awaiting the server's verdict"] += 1
        else:
            counts[record.state.value] += 1
    order = ("archived", "split", "awaiting the server's verdict", "completed", "failed", "stale",
             "left queued")
    parts = [f"{counts[key]} {key}" for key in order if counts.get(key)]
    parts += [f"{count} {key}" for key, count in sorted(counts.items()) if key not in order]
    return f"{counted(len(records), 'file')}: {', '.join(parts)}"
