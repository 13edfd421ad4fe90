"""Command line: `saasquatch-agent` (also `python -m agent`).

Exit codes: 0 success; 1 runtime failure (or invalid files for `validate`); 2 usage or configuration.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import click
from loguru import logger

from agent.config import Config, ConfigError, load_config
from agent.logs import setup_logging

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Deliver SaaSquatch bulk-import files from a drop folder to the tenant's SFTP server."""


@main.command()
@config_option
@click.option("--once", is_flag=True, help="Process what is in drop/ now, wait for the uploads, exit.")
def run(config_path: Path | None, once: bool) -> None:
    """Run the agent (the daemon, or one pass with --once)."""
    from agent.service import Agent, AlreadyRunning, run_daemon

    config = load_or_exit(config_path)
    setup_logging(config.log)
    try:
        if once:
            agent = Agent(config)
            sys.exit(agent.run_once())
        sys.exit(run_daemon(config))
    except AlreadyRunning as exc:
        fail(str(exc), EXIT_RUNTIME)
    except OSError as exc:
        logger.error("cannot start: {}", exc)
        sys.exit(EXIT_RUNTIME)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (the stable contract).")
def status(config_path: Path | None, as_json: bool) -> None:
    """One row per file from the journal."""
    from agent.journal import Journal

    config = load_or_exit(config_path)
    if not config.journal_path.exists():
        records = []
    else:
        journal = Journal(config.journal_path, readonly=True)
        records = journal.all()
        journal.close()
    if as_json:
        click.echo(json.dumps([record.to_json() for record in records], indent=2))
        return
    if not records:
        click.echo(f"no files in the journal ({config.journal_path})")
        return
    click.echo(f"{'ID':>5}  {'STATE':<10} {'TYPE':<18} {'NAME':<32} {'REMOTE NAME':<48} ERROR")
    for r in records:
        click.echo(f"{r.id:>5}  {r.state.value:<10} {r.import_type or '-':<18} {r.name[:32]:<32}"
                   f" {(r.remote_name or '-')[:48]:<48} {r.error or ''}")


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen(path: Path) -> None:
    """Create an ED25519 key without passphrase (mode 0600) and print the public line."""
    from agent.keys import write_new_keypair

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
    from agent.demo import run_demo

    sys.exit(run_demo(keep=keep))


if __name__ == "__main__":
    main()
