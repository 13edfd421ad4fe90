"""Command line: `saasquatch-agent` (also `python -m agent`); the logic lives in the modules it calls.

Exit codes: 0 success; 1 runtime failure (or invalid files for `validate`); 2 usage or configuration.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import sqlite3
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import NoReturn, ParamSpec

import click

from agent.config import Config, ConfigError, ImportsConfig, ImportType, load_config
from agent.logs import escape_controls, setup_logging
from agent.store.journal import FileRecord, FileState, Journal, JournalError, journal_error

P = ParamSpec("P")
EXIT_RUNTIME = 1
EXIT_USAGE = 2

config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Configuration file (default: $SAASQUATCH_AGENT_CONFIG or /etc/saasquatch-agent/agent.toml).",
)


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"saasquatch-agent: {message}", err=True)
    sys.exit(code)


def load_or_exit(config_path: Path | None) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def journal_errors(command: Callable[P, None]) -> Callable[P, None]:
    """A damaged journal ends the command with one line that says how to fix it (exit 1), never
    with a traceback."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            command(*args, **kwargs)
        except (JournalError, sqlite3.DatabaseError) as exc:
            config_path = kwargs.get("config_path")
            path = load_config(config_path).journal_path if isinstance(config_path, Path | None) else None
            problem = journal_error(path or Path("journal"), exc)
            if problem is None:
                raise
            fail(str(problem), EXIT_RUNTIME)

    return wrapper


def refuse_root_on_service_state(config: Config) -> None:
    """As root on a state_dir that belongs to another user (the service's), files made now (journal,
    lock, archive folders) would lock the service out: refuse, saying exactly what to run instead."""
    state_dir = config.paths.state_dir
    if os.geteuid() != 0:
        return
    try:
        owner = state_dir.stat().st_uid
    except OSError:
        return
    if owner == 0:
        return
    try:
        user = pwd.getpwuid(owner).pw_name
    except KeyError:
        user = str(owner)
    source = config.source or Path("agent.toml")
    unit = "saasquatch-agent" if source.name == "agent.toml" else f"saasquatch-agent@{source.stem}"
    command = shutil.which("saasquatch-agent") or "saasquatch-agent"
    fail(f"{state_dir} belongs to {user}: run as root, the agent would leave files there that {user} "
         f"cannot use. Run it as {user}, with the key systemd passes: systemd-run --pipe --wait "
         f"-p User={user} -p LoadCredential=sftp-key:{config.sftp.private_key} {command} run --once "
         f"--config {source} (or let the service do it: systemctl restart {unit})", EXIT_USAGE)


class DurationType(click.ParamType):  # type: ignore[type-arg]
    name = "DURATION"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        from agent.ops.views import parse_duration

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
    from agent.ops.views import select, status_table

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="saasquatch-agent", prog_name="saasquatch-agent")
def main() -> None:
    """Deliver SaaSquatch bulk-import files from a drop folder to the tenant's SFTP server."""


@main.command()
@config_option
@click.option("--once", is_flag=True, help="Process what is in drop/ now, wait for the uploads, exit.")
@journal_errors
def run(config_path: Path | None, once: bool) -> None:
    """Run the agent (the daemon, or one pass with --once)."""
    from loguru import logger

    from agent.service import Agent, AlreadyRunning, run_daemon
    from agent.transport.sftp import PrivateKeyError, load_private_key, private_key_path

    config = load_or_exit(config_path)
    refuse_root_on_service_state(config)
    setup_logging(config.log)
    try:
        load_private_key(private_key_path(config.sftp))  # unusable key: exit 1 now, files stay queued
        if once:
            agent = Agent(config)
            sys.exit(agent.run_once())
        sys.exit(run_daemon(config))
    except AlreadyRunning as exc:
        fail(str(exc), EXIT_RUNTIME)
    except JournalError as exc:
        fail(str(exc), EXIT_RUNTIME)
    except (PrivateKeyError, OSError) as exc:
        logger.error("cannot start: {}", exc)
        sys.exit(EXIT_RUNTIME)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (the stable contract).")
@state_option
@older_option
@newer_option
@journal_errors
def status(config_path: Path | None, as_json: bool, states: tuple[str, ...], older_than: timedelta | None,
           newer_than: timedelta | None) -> None:
    """One row per file from the journal (filter by state and age)."""
    show_status(load_or_exit(config_path), as_json, states, older_than, newer_than)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--type", "import_type", type=click.Choice([t.value for t in ImportType], case_sensitive=False),
              default=None, help="Type a file whose name and folder do not (never a deletion, by the guard).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Use this configuration's prefixes, folders and limits (default: built-in defaults).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per file.")
def validate(files: tuple[Path, ...], import_type: str | None, config_path: Path | None,
             as_json: bool) -> None:
    """Check FILEs against the import rules without uploading; exit 1 when any is invalid."""
    from agent.ops.checkfiles import check_file, human_lines

    config = load_or_exit(config_path) if config_path else None
    cfg = config.imports if config else ImportsConfig()
    fallback = ImportType(import_type.lower()) if import_type else None
    results = [check_file(path, cfg, drop=config.paths.drop if config else None, fallback=fallback)
               for path in files]
    if as_json:
        click.echo(json.dumps([result.to_json() for result in results], indent=2))
    else:
        for result in results:
            for line in human_lines(result):
                click.echo(line)
        bad = sum(not result.ok for result in results)
        click.echo(f"{len(results) - bad} of {len(results)} file(s) valid"
                   + (f", {bad} invalid" if bad else ""))
    sys.exit(EXIT_RUNTIME if any(not result.ok for result in results) else 0)


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen(path: Path) -> None:
    """Create an ED25519 key without passphrase (mode 0600) and print the public line."""
    from agent.ops.keys import write_new_keypair

    try:
        public_line = write_new_keypair(path)
    except FileExistsError:
        fail(f"{path} already exists; not overwriting a key", EXIT_RUNTIME)
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror}", EXIT_RUNTIME)
    click.echo(f"private key: {path} (mode 0600; keep it on this machine)")
    click.echo(f"public key:  {path}.pub")
    click.echo("Paste this line into SaaSquatch (Integrations > SFTP Import > public key):")
    click.echo(public_line)


@main.command()
@click.option("--keep", is_flag=True, help="Keep the sandbox folder and print where it is.")
def demo(keep: bool) -> None:
    """Run the whole flow against a local sandbox SFTP server (no credentials needed)."""
    from agent.ops.demo import run_demo

    sys.exit(run_demo(keep=keep))


@main.command("trust-host")
@config_option
@click.option("--fingerprint", metavar="SHA256:...",
              help="Trust without asking when the server's key has this fingerprint (scripted installs).")
@click.option("--hash", "hashed", is_flag=True, help="Write the host name hashed (as HashKnownHosts does).")
def trust_host(config_path: Path | None, fingerprint: str | None, hashed: bool) -> None:
    """Show the SFTP server's host key and add it to known_hosts once you confirm it."""
    from agent.ops.trust import (
        TrustError,
        fetch_host_key,
        known_keys,
        normalize_fingerprint,
        write_known_host,
    )

    config = load_or_exit(config_path)
    cfg = config.sftp
    try:
        info = fetch_host_key(cfg)
    except TrustError as exc:
        fail(str(exc), EXIT_RUNTIME)
    click.echo(f"{info.name} offers a {info.key_type} host key")
    click.echo(f"  fingerprint: {info.fingerprint}")
    known = known_keys(cfg.known_hosts, info.name)
    if any(k.get_name() == info.key_type and k.get_base64() == info.key.get_base64() for k in known):
        click.echo(f"already trusted in {cfg.known_hosts}; nothing to do")
        return
    for old_key in known:
        click.echo(f"WARNING: {cfg.known_hosts} has a DIFFERENT key for {info.name}: {old_key.get_name()}"
                   f" {old_key.fingerprint}. Replace it only if SaaSquatch confirms the new fingerprint.")
    if fingerprint is not None:
        if normalize_fingerprint(fingerprint) != info.fingerprint:
            fail(f"fingerprint mismatch: expected {normalize_fingerprint(fingerprint)}, the server offered"
                 f" {info.fingerprint}; nothing written", EXIT_RUNTIME)
    elif not click.confirm("Does this fingerprint match the one SaaSquatch shows for your SFTP server?",
                           default=False):
        fail("not confirmed; nothing written", EXIT_RUNTIME)
    try:
        write_known_host(cfg.known_hosts, info, hashed=hashed)
    except OSError as exc:
        fail(f"cannot write {cfg.known_hosts}: {exc.strerror or exc}", EXIT_RUNTIME)
    click.echo(f"trusted: wrote {info.name} {info.key_type} to {cfg.known_hosts}")


@main.command()
@config_option
def doctor(config_path: Path | None) -> None:
    """Check configuration, folders, key, host key, network, login and remote folder; say what to fix."""
    from agent.ops.doctor import Doctor, Outcome

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"FAIL configuration: {exc}")
        click.echo("     fix: correct the key it names (config/agent.example.toml lists every key)")
        sys.exit(EXIT_USAGE)
    setup_logging(config.log.model_copy(update={"level": "WARNING"}))
    click.echo(f"PASS configuration: {config.source}")
    failed = 0
    for result in Doctor(config).run():
        click.echo(f"{result.outcome.value} {result.name}: {result.detail}")
        if result.fix:
            click.echo(f"     fix: {result.fix}")
        failed += result.outcome != Outcome.PASS
    if failed:
        click.echo(f"{failed} check(s) did not pass")
        sys.exit(EXIT_RUNTIME)
    click.echo("all checks passed")


@main.command()
@config_option
@click.argument("key", metavar="NAME|ID")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of files with their events.")
@journal_errors
def history(config_path: Path | None, key: str, as_json: bool) -> None:
    """Every state change of one file (by journal ID, original name or remote name)."""
    from agent.ops.views import history as file_history
    from agent.ops.views import history_lines

    config = load_or_exit(config_path)
    if not config.journal_path.exists():
        fail(f"no journal yet at {config.journal_path}", EXIT_RUNTIME)
    journal = Journal(config.journal_path, readonly=True)
    try:
        found = file_history(journal, key)
    finally:
        journal.close()
    if not found:
        fail(f"no file in the journal is called {key!r} (use the ID from `status`)", EXIT_RUNTIME)
    if as_json:
        click.echo(json.dumps([{**record.to_json(), "events": [
            {"at": at, "state": state, "message": message} for at, state, message in events
        ]} for record, events in found], indent=2))
        return
    for line in history_lines(found):
        click.echo(line)

@main.command()
@config_option
@click.argument("key", metavar="NAME|ID")
@journal_errors
def retry(config_path: Path | None, key: str) -> None:
    """Re-queue a failed or stale file (sent again under a new name, even if a duplicate)."""
    from agent.ops.views import OpsError
    from agent.ops.views import retry as requeue

    config = load_or_exit(config_path)
    if not config.journal_path.exists():
        fail(f"no journal yet at {config.journal_path}", EXIT_RUNTIME)
    journal = Journal(config.journal_path)
    try:
        record = requeue(config, journal, key)
    except OpsError as exc:
        fail(str(exc), EXIT_RUNTIME)
    except (OSError, sqlite3.Error) as exc:
        fail(f"retry of {key!r} did not finish ({exc}); run it again", EXIT_RUNTIME)
    finally:
        journal.close()
    click.echo(escape_controls(
        f"#{record.id} {record.name} re-queued as {record.remote_name}; a running agent sends it"
        f" within {config.watch.rescan_seconds:g} s (or at its next start)"))

@main.command()
@config_option
@click.option("--days", type=click.IntRange(min=1), default=30, show_default=True,
              help="How many days back, today included (UTC).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@journal_errors
def report(config_path: Path | None, days: int, as_json: bool) -> None:
    """Per-day counts by import type and outcome."""
    from agent.ops.views import report as daily_report
    from agent.ops.views import report_lines

    config = load_or_exit(config_path)
    rows = daily_report(_records(config), days)
    if as_json:
        click.echo(json.dumps([row.to_json() for row in rows], indent=2))
        return
    if not rows:
        click.echo(f"no files in the last {days} day(s)")
        return
    for line in report_lines(rows):
        click.echo(line)


@main.group()
def journal() -> None:
    """Check the journal, or rebuild a damaged or lost one from its backup and the spool."""


@journal.command("check")
@config_option
def journal_check(config_path: Path | None) -> None:
    """Integrity, spool files no row names, rows whose files are gone; exit 1 when something is wrong."""
    from agent.store.repair import check

    ok, lines = check(load_or_exit(config_path))
    for line in lines:
        click.echo(escape_controls(line))
    sys.exit(0 if ok else EXIT_RUNTIME)


@journal.command("rebuild")
@config_option
def journal_rebuild(config_path: Path | None) -> None:
    """Move the journal aside (never deleted), restore the latest backup (or start empty), adopt the
    spool. Refused while the agent runs."""
    from agent.service import AlreadyRunning, take_lock
    from agent.store.repair import rebuild

    config = load_or_exit(config_path)
    setup_logging(config.log.model_copy(update={"level": "WARNING"}))
    config.paths.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = take_lock(config.paths.state_dir / "agent.lock")
    except AlreadyRunning as exc:
        fail(f"{exc}; stop it first (systemctl stop saasquatch-agent), then run this again", EXIT_RUNTIME)
    try:
        lines = rebuild(config)
    except (OSError, sqlite3.Error) as exc:
        fail(f"rebuild did not finish ({exc}); nothing was deleted, run it again", EXIT_RUNTIME)
    finally:
        lock.close()
    for line in lines:
        click.echo(escape_controls(line))


if __name__ == "__main__":
    main()
