"""Command line: `saasquatch-agent` (also `python -m agent`).

Exit codes: 0 success; 1 runtime failure (or invalid files for `validate`); 2 usage or configuration.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import click
from loguru import logger

from agent.commands import make_commands, newer_option, older_option, show_status, state_option
from agent.config import Config, ConfigError, ImportsConfig, ImportType, load_config
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
    from agent.sftp import PrivateKeyError, load_private_key, private_key_path

    config = load_or_exit(config_path)
    setup_logging(config.log)
    try:
        load_private_key(private_key_path(config.sftp))  # unusable key: exit 1 now, files stay queued
        if once:
            agent = Agent(config)
            sys.exit(agent.run_once())
        sys.exit(run_daemon(config))
    except AlreadyRunning as exc:
        fail(str(exc), EXIT_RUNTIME)
    except PrivateKeyError as exc:
        logger.error("cannot start: {}", exc)
        sys.exit(EXIT_RUNTIME)
    except OSError as exc:
        logger.error("cannot start: {}", exc)
        sys.exit(EXIT_RUNTIME)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (the stable contract).")
@state_option
@older_option
@newer_option
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
    from agent.checkfiles import check_file, human_lines

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


@main.command("trust-host")
@config_option
@click.option("--fingerprint", metavar="SHA256:...",
              help="Trust without asking when the server's key has this fingerprint (scripted installs).")
@click.option("--hash", "hashed", is_flag=True, help="Write the host name hashed (as HashKnownHosts does).")
def trust_host(config_path: Path | None, fingerprint: str | None, hashed: bool) -> None:
    """Show the SFTP server's host key and add it to known_hosts once you confirm it."""
    from agent.trust import TrustError, fetch_host_key, known_keys, normalize_fingerprint, write_known_host

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
    from agent.doctor import Doctor, Outcome

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


for _command in make_commands(config_option, load_or_exit, fail):  # history, retry, report
    main.add_command(_command)


if __name__ == "__main__":
    main()
