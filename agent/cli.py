"""Command line: `saasquatch-agent` (also `python -m agent`); the logic lives in the modules it calls.

Exit codes: 0 success; 1 runtime failure (or invalid files for `validate`); 2 usage or configuration.
A command raises an error of the agent's family (agent.errors); `AgentGroup.invoke` is the one place
that turns it into its line and its exit code.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sqlite3
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import click

from agent.config import Config, ConfigError, ImportsConfig, ImportType, Transport, load_config
from agent.errors import EXIT_RUNTIME, EXIT_USAGE, AgentError, CommandError, UsageError
from agent.logs import escape_controls, setup_logging
from agent.store.journal import FileRecord, FileState, Journal, journal_error
from agent.units import counted

_CONFIG_PATH = "saasquatch-agent.config_path"  # click's ctx.meta (shared by every context of a call)


def _remember_config_path(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    ctx.meta[_CONFIG_PATH] = value
    return value

config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    callback=_remember_config_path,
    help="Configuration file (default: $SAASQUATCH_AGENT_CONFIG or /etc/saasquatch-agent/agent.toml).",
)


class AgentGroup(click.Group):
    """The command group whose `invoke` maps every error to its exit, in one place: an AgentError
    ends the command with its one line and its exit code (agent.errors), a journal found damaged
    in the middle of a command with the line that says how to repair it, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AgentError as exc:
            exit_with(exc)
        except sqlite3.DatabaseError as exc:
            problem = journal_error(_journal_path(ctx), exc)
            if problem is None:
                raise
            exit_with(problem)


def exit_with(exc: AgentError) -> NoReturn:
    if exc.in_log:  # `run`: the daemon's own lines go to the log (journald)
        from loguru import logger  # loaded only where it logs (start-up time of status, validate)

        logger.error("{}", exc)
    else:
        click.echo(f"saasquatch-agent: {exc}", err=True)
    sys.exit(exc.exit_code)


def _journal_path(ctx: click.Context) -> Path:
    """The journal of the configuration the command was given, for the damaged-journal line."""
    try:
        return load_config(ctx.meta.get(_CONFIG_PATH)).journal_path
    except ConfigError:
        return Path("journal")


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
    credential = (f"api-key:{config.api.api_key_file}" if config.upload.transport == Transport.API
                  else f"sftp-key:{config.sftp.private_key}")
    raise UsageError(
        f"{state_dir} belongs to {user}: run as root, the agent would leave files there that {user} "
        f"cannot use. Run it as {user}, with the key systemd passes: systemd-run --pipe --wait "
        f"-p User={user} -p LoadCredential={credential} {command} run --once "
        f"--config {source} (or let the service do it: systemctl restart {unit})")


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
                newer_than: timedelta | None, key: str | None = None) -> None:
    from agent.ops.views import find, select, status_detail, status_table, terminal_width
    from agent.pipeline.progress import read_progress

    progress = read_progress(config.paths.state_dir)
    events: dict[int, list[tuple[str, str, str | None]]] = {}
    if key is None:
        records = _records(config)
    elif not config.journal_path.exists():
        raise CommandError(f"no journal yet at {config.journal_path}")
    else:
        journal = Journal(config.journal_path, readonly=True)
        try:
            records = find(journal, key)
            events = {record.id: journal.events(record.id) for record in records}
        finally:
            journal.close()
        if not records:
            raise CommandError(f"no file in the journal is called {key!r} (use the ID or a name from"
                               " `status`)")
    records = select(records, states, older_than, newer_than)
    if as_json:
        click.echo(json.dumps([{**record.to_json(), "progress": (
            progress[record.id].to_json() if record.id in progress and record.state == FileState.UPLOADING
            else None)} for record in records], indent=2))
        return
    if key is not None:
        for index, record in enumerate(records):
            if index:
                click.echo("")
            for line in status_detail(record, config, progress.get(record.id), events.get(record.id, [])):
                click.echo(line)
        return
    if not records:
        filtered = " matching the filters" if states or older_than or newer_than else ""
        click.echo(f"no files{filtered} in the journal ({config.journal_path})")
        return
    for line in status_table(records, progress, terminal_width()):
        click.echo(line)


@click.group(cls=AgentGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="saasquatch-agent", prog_name="saasquatch-agent")
def main() -> None:
    """Deliver SaaSquatch bulk-import files from a drop folder to the tenant's SFTP server."""


@main.command()
@config_option
@click.option("--once", is_flag=True, help="Process what is in drop/ now, wait for the uploads, exit.")
@click.option("--dry-run", is_flag=True,
              help="Say what would be taken from drop/ now and what would happen to each file (type,"
                   " remote name, validation, split plan); nothing is moved or sent. Exit 1 when any would"
                   " be refused.")
def run(config_path: Path | None, once: bool, dry_run: bool) -> None:
    """Run the agent (the daemon, or one pass with --once)."""
    from agent.service import run_agent

    config = load_config(config_path)
    if dry_run:
        from agent.ops.dryrun import dry_run_lines, plan_drop

        setup_logging(config.log.model_copy(update={"level": "WARNING"}))
        plans = plan_drop(config)
        for line in dry_run_lines(config, plans):
            click.echo(line)
        sys.exit(EXIT_RUNTIME if any(plan.action == "refuse" for plan in plans) else 0)
    refuse_root_on_service_state(config)
    setup_logging(config.log)
    sys.exit(run_agent(config, once=once, report=click.echo))


@main.command()
@config_option
@click.argument("key", metavar="[NAME|ID]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (the stable contract).")
@state_option
@older_option
@newer_option
def status(config_path: Path | None, key: str | None, as_json: bool, states: tuple[str, ...],
           older_than: timedelta | None, newer_than: timedelta | None) -> None:
    """One row per file from the journal (filter by state and age); with NAME or ID, everything known
    about that file: where it is, why, and what to do next."""
    show_status(load_config(config_path), as_json, states, older_than, newer_than, key)


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

    config = load_config(config_path) if config_path else None
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
        click.echo(f"{len(results) - bad} of {counted(len(results), 'file')} valid"
                   + (f", {bad} invalid" if bad else ""))
    sys.exit(EXIT_RUNTIME if any(not result.ok for result in results) else 0)


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen(path: Path) -> None:
    """Create an ED25519 key without passphrase (mode 0600) and print the public line."""
    from agent.ops.keys import write_new_keypair

    public_line = write_new_keypair(path)
    click.echo(f"private key: {path} (mode 0600; keep it on this machine)")
    click.echo(f"public key:  {path}.pub")
    click.echo("Paste this line into SaaSquatch (Integrations > SFTP Import > public key):")
    click.echo(public_line)


@main.command()
@click.option("--keep", is_flag=True, help="Keep the sandbox folder and print where it is.")
@click.option("--transport", type=click.Choice([t.value for t in Transport]), default=Transport.SFTP.value,
              show_default=True, help="The route to show: the SFTP server, or SaaSquatch's import API.")
def demo(keep: bool, transport: str) -> None:
    """Run the whole flow against a local sandbox (SFTP server or import API; no credentials needed)."""
    from agent.ops.demo import missing_extra_message, run_demo
    from agent.service import run_once_report

    try:
        sys.exit(run_demo(run_once_report, keep=keep, transport=transport))
    except ImportError as exc:
        if exc.name != "asyncssh":
            raise
        raise CommandError(missing_extra_message()) from None


@main.command("trust-host")
@config_option
@click.option("--fingerprint", metavar="SHA256:...",
              help="Trust without asking when the server's key has this fingerprint (scripted installs).")
@click.option("--hash", "hashed", is_flag=True, help="Write the host name hashed (as HashKnownHosts does).")
def trust_host(config_path: Path | None, fingerprint: str | None, hashed: bool) -> None:
    """Show the SFTP server's host key and add it to known_hosts once you confirm it."""
    from agent.ops.trust import (
        fetch_host_key,
        known_keys,
        normalize_fingerprint,
        write_known_host,
    )

    config = load_config(config_path)
    if config.upload.transport == Transport.API:
        raise UsageError('upload.transport is "api": trust-host is for the SFTP route (the API route checks'
                         " the server's TLS certificate against the system's CAs, or api.ca_file)")
    cfg = config.sftp
    info = fetch_host_key(cfg)
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
            raise CommandError(f"fingerprint mismatch: expected {normalize_fingerprint(fingerprint)}, the"
                               f" server offered {info.fingerprint}; nothing written")
    else:
        try:
            confirmed = click.confirm("Does this fingerprint match the one SaaSquatch shows for your SFTP"
                                      " server?", default=False)
        except click.Abort:  # no answer (no terminal, stdin closed): say how to confirm without one
            click.echo("", err=True)
            source = f" --config {config.source}" if config_path else ""
            raise CommandError(
                f"no terminal to confirm the fingerprint on; nothing written. Check {info.fingerprint}"
                " against the one SaaSquatch shows for your SFTP server, then run: saasquatch-agent"
                f" trust-host{source} --fingerprint {info.fingerprint}") from None
        if not confirmed:
            raise CommandError("not confirmed; nothing written")
    write_known_host(cfg.known_hosts, info, hashed=hashed)
    click.echo(f"trusted: wrote {info.name} {info.key_type} to {cfg.known_hosts}")


@main.command()
@config_option
def doctor(config_path: Path | None) -> None:
    """Check configuration, folders, key, host key, network, login and remote folder; say what to fix."""
    from agent.ops.doctor import Doctor, Outcome

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        from agent.config import resolve_config_path
        from agent.ops.configshow import config_fixes

        click.echo(f"FAIL configuration: {exc}")
        for fix in config_fixes(exc, resolve_config_path(config_path)):
            click.echo(f"     fix: {fix}")
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
        click.echo(f"{counted(failed, 'check')} did not pass")
        sys.exit(EXIT_RUNTIME)
    click.echo("all checks passed")


@main.command()
@config_option
@click.argument("key", metavar="NAME|ID")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of files with their events.")
def history(config_path: Path | None, key: str, as_json: bool) -> None:
    """Every state change of one file (by journal ID, original name or remote name)."""
    from agent.ops.views import history as file_history
    from agent.ops.views import history_lines

    config = load_config(config_path)
    if not config.journal_path.exists():
        raise CommandError(f"no journal yet at {config.journal_path}")
    journal = Journal(config.journal_path, readonly=True)
    try:
        found = file_history(journal, key)
    finally:
        journal.close()
    if not found:
        raise CommandError(f"no file in the journal is called {key!r} (use the ID from `status`)")
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
def retry(config_path: Path | None, key: str) -> None:
    """Re-queue a failed or stale file (sent again under a new name, even if a duplicate)."""
    from agent.ops.views import retry as requeue

    config = load_config(config_path)
    if not config.journal_path.exists():
        raise CommandError(f"no journal yet at {config.journal_path}")
    journal = Journal(config.journal_path)
    try:
        record = requeue(config, journal, key)
    except (OSError, sqlite3.Error) as exc:  # the operator's words for an interrupted retry
        raise CommandError(f"retry of {key!r} did not finish ({exc}); run it again") from exc
    finally:
        journal.close()
    from agent.ops.wakeup import wake_running_agent

    try:
        woken = wake_running_agent(config.paths.state_dir)
    except OSError as exc:  # the hint only: the rescan picks the file up anyway
        from loguru import logger

        logger.debug("could not wake the agent: {}", exc)
        woken = False
    when = ("the running agent sends it now" if woken else
            "the agent is not running (or not listening): it is sent at its next start or rescan")
    click.echo(escape_controls(f"#{record.id} {record.name} re-queued as {record.remote_name}; {when}"))

@main.command()
@config_option
@click.option("--days", type=click.IntRange(min=1), default=30, show_default=True,
              help="How many days back, today included (UTC).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
def report(config_path: Path | None, days: int, as_json: bool) -> None:
    """Per-day counts by import type and outcome."""
    from agent.ops.views import report as daily_report
    from agent.ops.views import report_lines

    config = load_config(config_path)
    rows = daily_report(_records(config), days)
    if as_json:
        click.echo(json.dumps([row.to_json() for row in rows], indent=2))
        return
    if not rows:
        click.echo(f"no files in the last {days} day(s)")
        return
    for line in report_lines(rows):
        click.echo(line)


@main.group("config")
def config_group() -> None:
    """Show the configuration the agent uses."""


@config_group.command("show")
@config_option
@click.option("--defaults", is_flag=True, help="Every key with its default instead (no file needed).")
def config_show(config_path: Path | None, defaults: bool) -> None:
    """Print the effective configuration as TOML (defaults filled in, secrets masked)."""
    from agent.ops.configshow import show

    for line in show(None if defaults else load_config(config_path)):
        click.echo(line)


@main.group()
def journal() -> None:
    """Check the journal, or rebuild a damaged or lost one from its backup and the spool."""


@journal.command("check")
@config_option
def journal_check(config_path: Path | None) -> None:
    """Integrity, spool files no row names, rows whose files are gone; exit 1 when something is wrong."""
    from agent.store.repair import check

    ok, lines = check(load_config(config_path))
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

    config = load_config(config_path)
    setup_logging(config.log.model_copy(update={"level": "WARNING"}))
    config.paths.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = take_lock(config.paths.state_dir / "agent.lock")
    except AlreadyRunning as exc:  # said with what to do instead
        raise CommandError(f"{exc}; stop it first (systemctl stop saasquatch-agent), then run this"
                           " again") from exc
    try:
        lines = rebuild(config)
    except (OSError, sqlite3.Error) as exc:
        raise CommandError(f"rebuild did not finish ({exc}); nothing was deleted, run it again") from exc
    finally:
        lock.close()
    for line in lines:
        click.echo(escape_controls(line))


if __name__ == "__main__":
    main()
