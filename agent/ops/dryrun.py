"""`run --dry-run`: what `run` would take from drop/ now, and what it would do with each file.

Nothing is moved, written or sent: drop/ is listed as the daemon lists it, each file is checked
with `agent.ops.checkfiles.check_file` (the daemon's own `admit`), the hard-link and duplicate
rules are applied as intake applies them (the journal is read, never written), and a file over the
limits shows its split plan (how many parts, and their remote names).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.config import Config, ImportType
from agent.imports.naming import remote_name
from agent.imports.types import JOB_TYPES
from agent.intake.claim import hard_link_reason
from agent.intake.watch import DropScanner, look_at
from agent.logs import escape_controls
from agent.ops.checkfiles import FileCheck, check_file
from agent.ops.explain import first_sentence
from agent.store.journal import Journal, iso_utc
from agent.units import counted, human_bytes


@dataclass(frozen=True)
class Plan:
    """What `run` would do with one entry of drop/."""

    shown: str  # the path below drop/
    action: str  # "send", "split", "refuse", "leave"
    line: str  # the line printed for it


def plan_drop(config: Config, now: datetime | None = None) -> list[Plan]:
    """One plan per entry of drop/ (and its type folders) the daemon would look at, in its order."""
    now = now or datetime.now(UTC)
    drop = config.paths.drop
    scanner = DropScanner(drop, [config.imports.folders.for_type(t) for t in ImportType])
    taken = _journal_contents(config, now)
    seen: dict[tuple[str, str], str] = {}  # content and type -> the file of this listing that has it
    plans = []
    for path, _subfolder in scanner.scan():
        shown = escape_controls(str(path.relative_to(drop)))
        looked = look_at(path)
        if looked is None:
            continue
        info, problem = looked
        if problem:
            plans.append(Plan(shown, "leave", f"{shown}: left alone: it {problem}"))
            continue
        if info.st_nlink > 1:
            plans.append(Plan(shown, "refuse", f"{shown}: would go to failed/: "
                              + hard_link_reason(path.name, info.st_nlink)))
            continue
        plans.append(_plan_file(config, path, shown, check_file(path, config.imports, drop=drop), taken,
                                seen, now))
    return plans


def _plan_file(config: Config, path: Path, shown: str, result: FileCheck,
               taken: dict[tuple[str, str], str], seen: dict[tuple[str, str], str], now: datetime) -> Plan:
    adm = result.admission
    if not result.ok or adm is None or adm.import_type is None or adm.report is None:
        reason = (result.reason or "refused").removeprefix(f"{path.name} was not uploaded: ")
        why = first_sentence(reason, 200)
        return Plan(shown, "refuse", f"{shown}: INVALID, would go to failed/: {why} (`saasquatch-agent"
                    f" validate {path}` lists every problem)")
    import_type, report = adm.import_type, adm.report
    fmt = report.format.value.upper() if report.format else "?"
    what = (f"{import_type.value} ({JOB_TYPES[import_type]}), {fmt}, {counted(report.records, 'record')},"
            f" {human_bytes(report.bytes)}")
    key = (str(adm.sha256), import_type.value)
    earlier = taken.get(key) or seen.get(key)
    if earlier is not None and config.imports.duplicate_window_days > 0:
        return Plan(shown, "refuse", f"{shown}: {what}: would go to failed/ as a duplicate: the same content"
                    f" was {earlier} within imports.duplicate_window_days"
                    f" ({config.imports.duplicate_window_days:g} days)")
    seen[key] = f"also in drop/ as {shown}"
    deletes = f"; it would permanently delete {counted(adm.deletes, 'user')}" if adm.deletes else ""
    if result.parts is None:
        return Plan(shown, "send", f"{shown}: {what}: valid; would be sent as {adm.remote_name}{deletes}")
    parts = result.parts
    prefix = config.imports.prefixes.for_type(import_type)
    first, last = (remote_name(prefix, path.name, str(adm.sha256), now, part=(k, parts)) for k in (1, parts))
    cfg = config.imports
    limits = f"{human_bytes(cfg.max_file_bytes)} and {counted(cfg.max_records, 'record')} per file"
    return Plan(shown, "split", f"{shown}: {what}: valid but over the limits ({limits}): would be split into"
                f" {parts} parts, sent as {first} ... {last}; the original is archived{deletes}")


def _journal_contents(config: Config, now: datetime) -> dict[tuple[str, str], str]:
    """Content and type of the files intake would count as earlier copies (the duplicate rule)."""
    window = config.imports.duplicate_window_days
    if window <= 0 or not config.journal_path.exists():
        return {}
    journal = Journal(config.journal_path, readonly=True)
    try:
        since = iso_utc(now - timedelta(days=window))
        rows = journal.query("WHERE sha256 IS NOT NULL AND import_type IS NOT NULL AND created_at >= ?"
                             " AND state != 'failed'", (since,))
    finally:
        journal.close()
    return {(str(row.sha256), str(row.import_type)): f"taken as #{row.id} {row.name!r} at {row.created_at}"
            for row in reversed(rows)}  # the lowest id wins


def dry_run_lines(config: Config, plans: list[Plan]) -> list[str]:
    lines = [f"dry run: what `run` would take from {config.paths.drop} now (nothing is moved or sent;"
             " the time in a remote name is when the file is queued)"]
    lines += [f"  {plan.line}" for plan in plans]
    counts = {action: sum(plan.action == action for plan in plans) for action in ("send", "split", "refuse",
                                                                                   "leave")}
    words = {"send": "would be sent", "split": "would be split", "refuse": "would go to failed/",
             "leave": "left alone"}
    summary = ", ".join(f"{count} {words[action]}" for action, count in counts.items() if count)
    lines.append(f"{counted(len(plans), 'file')} in drop/" + (f": {summary}" if summary else ""))
    return lines
