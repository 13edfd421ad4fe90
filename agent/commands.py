"""Operator commands on the journal: `status` (table, filters), `history`, `retry`, `report`.

Registered on the main click group by `agent.cli`; the logic lives in `agent.ops`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import click

from agent.config import Config
from agent.journal import FileRecord, FileState, Journal

EXIT_RUNTIME = 1
EXIT_USAGE = 2


class DurationType(click.ParamType):  # type: ignore[type-arg]
    name = "DURATION"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        from agent.ops import parse_duration

        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _records(config: Config) -> list[FileRecord]:
    if not config.journal_path.exists():
        return []
    journal = Journal(config.journal_path, readonly=True)
    try:
        return journal.all()
    finally:
        journal.close()


state_option = click.option(
    "--state", "states", multiple=True, type=click.Choice([s.value for s in FileState]),
    help="Only files in this state (repeat for several).",
)
older_option = click.option("--older-than", type=DurationType(), default=None,
                            help="Only files taken from drop/ longer ago than this (90s, 15m, 6h, 2d, 1w).")
newer_option = click.option("--newer-than", "--since", "newer_than", type=DurationType(), default=None,
                            help="Only files taken from drop/ within this long (90s, 15m, 6h, 2d, 1w).")


def show_status(config: Config, as_json: bool, states: tuple[str, ...], older_than: timedelta | None,
                newer_than: timedelta | None) -> None:
    from agent.ops import select, status_table

    records = select(_records(config), states, older_than, newer_than)
    if as_json:
        click.echo(json.dumps([record.to_json() for record in records], indent=2))
        return
    if not records:
        filtered = " matching the filters" if states or older_than or newer_than else ""
        click.echo(f"no files{filtered} in the journal ({config.journal_path})")
        return
    for line in status_table(records):
        click.echo(line)


def make_commands(opt: Callable[[Callable[..., Any]], Callable[..., Any]],
                  load: Callable[[Path | None], Config],
                  die: Callable[[str, int], NoReturn]) -> list[click.Command]:
    """The commands, given cli.py's shared `--config` option, config loader and `fail`."""

    @click.command()
    @opt
    @click.argument("key", metavar="NAME|ID")
    @click.option("--json", "as_json", is_flag=True, help="Print a JSON array of files with their events.")
    def history(config_path: Path | None, key: str, as_json: bool) -> None:
        """Every state change of one file (by journal ID, original name or remote name)."""
        from agent.ops import history as file_history
        from agent.ops import history_lines

        config = load(config_path)
        if not config.journal_path.exists():
            die(f"no journal yet at {config.journal_path}", EXIT_RUNTIME)
        journal = Journal(config.journal_path, readonly=True)
        try:
            found = file_history(journal, key)
        finally:
            journal.close()
        if not found:
            die(f"no file in the journal is called {key!r} (use the ID from `status`)", EXIT_RUNTIME)
        if as_json:
            click.echo(json.dumps([{**record.to_json(), "events": [
                {"at": at, "state": state, "message": message} for at, state, message in events
            ]} for record, events in found], indent=2))
            return
        for line in history_lines(found):
            click.echo(line)

    @click.command()
    @opt
    @click.argument("key", metavar="NAME|ID")
    def retry(config_path: Path | None, key: str) -> None:
        """Re-queue a failed or stale file (sent again under a new name, even if a duplicate)."""
        from agent.ops import OpsError
        from agent.ops import retry as requeue

        config = load(config_path)
        if not config.journal_path.exists():
            die(f"no journal yet at {config.journal_path}", EXIT_RUNTIME)
        journal = Journal(config.journal_path)
        try:
            record = requeue(config, journal, key)
        except OpsError as exc:
            die(str(exc), EXIT_RUNTIME)
        except (OSError, sqlite3.Error) as exc:
            die(f"retry of {key!r} did not finish ({exc}); run it again", EXIT_RUNTIME)
        finally:
            journal.close()
        click.echo(f"#{record.id} {record.name} re-queued as {record.remote_name}; a running agent sends it"
                   f" within {config.watch.rescan_seconds:g} s (or at its next start)")

    @click.command()
    @opt
    @click.option("--days", type=click.IntRange(min=1), default=30, show_default=True,
                  help="How many days back, today included (UTC).")
    @click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
    def report(config_path: Path | None, days: int, as_json: bool) -> None:
        """Per-day counts by import type and outcome."""
        from agent.ops import report as daily_report
        from agent.ops import report_lines

        config = load(config_path)
        rows = daily_report(_records(config), days)
        if as_json:
            click.echo(json.dumps([row.to_json() for row in rows], indent=2))
            return
        if not rows:
            click.echo(f"no files in the last {days} day(s)")
            return
        for line in report_lines(rows):
            click.echo(line)

    return [history, retry, report]
