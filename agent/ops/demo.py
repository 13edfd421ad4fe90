"""`saasquatch-agent demo [--transport api]`: the whole flow against a local sandbox SFTP server, or a
local stand-in for SaaSquatch's import API; no credentials."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import click

from agent.config import Config, load_config
from agent.logs import setup_logging
from agent.ops.keys import write_new_keypair
from agent.store.journal import FileState, Journal

DEMO_TENANT = "test_demo0sandbox"

SAMPLES = {
    "users_spring-signups.csv": (
        "accountId,id,email,firstName,lastName,locale\n"
        "acct-1,user-1,ana@example.com,Ana,Lima,pt_BR\n"
        "acct-2,user-2,bo@example.com,Bo,Berg,sv_SE\n"
    ),
    "userEvents_purchases.jsonl": (
        '{"accountId": "acct-1", "userId": "user-1", "event": {"key": "purchase",'
        ' "dateTriggered": 1767225600000, "fields": {"revenue": 42.5, "currency": "USD"}}}\n'
    ),
    "users_missing-ids.csv": (
        "accountId,id,email\n"
        "acct-3,,carla@example.com\n"
    ),
}


def run_demo(run_once: Callable[[Config], object], keep: bool = False, transport: str = "sftp") -> int:
    """The sample files through `run_once` (the agent's `run --once`, passed in by the CLI: the
    operator commands sit below the service) against a sandbox server; 0 when all went as expected."""
    if transport == "api":
        return run_api_demo(run_once, keep)
    from agent.ops.sandbox import SandboxServer  # needs the optional `demo` extra

    root = Path(tempfile.mkdtemp(prefix="saasquatch-agent-demo-"))
    try:
        public_line = write_new_keypair(root / "keys" / "id_ed25519", comment="saasquatch-agent-demo")
        server = SandboxServer(root / "sftp-server", DEMO_TENANT, public_line)
        server.start()
        try:
            (root / "keys" / "known_hosts").write_text(server.known_hosts_line() + "\n")
            config_path = root / "agent.toml"
            config_path.write_text(
                "[sftp]\n"
                f'host = "{server.host}"\nport = {server.port}\nusername = "{DEMO_TENANT}"\n'
                'private_key = "keys/id_ed25519"\nknown_hosts = "keys/known_hosts"\n'
                'remote_dir = "/imports"\n\n'
                "[paths]\n"
                'drop = "drop"\nstate_dir = "state"\narchive = "archive"\nfailed = "failed"\n\n'
                "[watch]\nsettle_seconds = 0\n\n[retry]\nonce_max_attempts = 2\n"
            )
            config = load_config(config_path)
            setup_logging(config.log)
            config.paths.drop.mkdir(parents=True, exist_ok=True)
            for name, text in SAMPLES.items():
                (config.paths.drop / name).write_text(text)
            click.echo(f"sandbox SFTP server on {server.host}:{server.port}, files under {root}")
            run_once(config)
        finally:
            server.stop()
        return _report(config.journal_path, server_root=root / "sftp-server")
    finally:
        if keep:
            click.echo(f"kept the sandbox folder: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _report(journal_path: Path, server_root: Path) -> int:
    journal = Journal(journal_path, readonly=True)
    records = journal.all()
    journal.close()
    click.echo("")
    expected_ok = 0
    for record in records:
        remote = f"/imports/{record.remote_name}" if record.state == FileState.ARCHIVED else "-"
        click.echo(f"{record.name}\n  state:  {record.state.value}\n  local:  {record.local_path}\n"
                   f"  remote: {remote}")
        if record.error:
            click.echo(f"  reason: {record.error}")
        arrived = record.remote_name and (server_root / "imports" / record.remote_name).is_file()
        refused = record.name == "users_missing-ids.csv"
        if (refused and record.state == FileState.FAILED) or (not refused and arrived):
            expected_ok += 1
    click.echo("")
    if expected_ok == len(SAMPLES) == len(records):
        click.echo("demo finished: two files were delivered and archived, the broken one was refused"
                   " with its reason, as expected")
        return 0
    click.echo("demo did not end as expected; see the log lines above", err=True)
    return 1


def run_api_demo(run_once: Callable[[Config], object], keep: bool = False) -> int:
    """The same flow over the API route, against a local HTTPS stand-in for SaaSquatch's import API
    (agent/ops/api_sandbox.py; its CA is made now and trusted through api.ca_file)."""
    from agent.ops.api_sandbox import ApiSandbox

    root = Path(tempfile.mkdtemp(prefix="saasquatch-agent-demo-api-"))
    try:
        api_key = secrets.token_hex(16)
        key_file = root / "keys" / "api-key"
        key_file.parent.mkdir(parents=True)
        descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(api_key + "\n")
        server = ApiSandbox(root / "api-server", DEMO_TENANT, api_key)
        server.start()
        try:
            config_path = root / "agent.toml"
            config_path.write_text(
                '[upload]\ntransport = "api"\n\n'
                f'[api]\nbase_url = "{server.base_url}"\ntenant_alias = "{DEMO_TENANT}"\n'
                f'api_key_file = "keys/api-key"\nca_file = "{server.ca_path}"\npoll_seconds = 0.5\n\n'
                "[paths]\n"
                'drop = "drop"\nstate_dir = "state"\narchive = "archive"\nfailed = "failed"\n\n'
                "[watch]\nsettle_seconds = 0\n\n[retry]\nonce_max_attempts = 2\n"
            )
            config = load_config(config_path)
            setup_logging(config.log)
            config.paths.drop.mkdir(parents=True, exist_ok=True)
            for name, text in SAMPLES.items():
                (config.paths.drop / name).write_text(text)
            click.echo(f"sandbox of SaaSquatch's import API on {server.base_url} (HTTPS, a CA made for the"
                       f" demo), files under {root}")
            run_once(config)
        finally:
            server.stop()
        return _report_api(config.journal_path, set(server.jobs))
    finally:
        if keep:
            click.echo(f"kept the sandbox folder: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _report_api(journal_path: Path, jobs: set[str]) -> int:
    journal = Journal(journal_path, readonly=True)
    records = journal.all()
    journal.close()
    click.echo("")
    expected_ok = 0
    for record in records:
        click.echo(f"{record.name}\n  state:  {record.state.value}\n  local:  {record.local_path}")
        if record.api_job_id:
            click.echo(f"  job:    {record.api_job_id} (fileRef {record.api_file_ref}),"
                       f" {record.records_processed} record(s) processed")
        if record.error:
            click.echo(f"  reason: {record.error}")
        refused = record.name == "users_missing-ids.csv"
        if (refused and record.state == FileState.FAILED and record.api_job_id is None) or (
                not refused and record.state == FileState.ARCHIVED and record.api_job_id in jobs):
            expected_ok += 1
    click.echo("")
    if expected_ok == len(SAMPLES) == len(records) == len(jobs) + 1:
        click.echo("demo finished: two files were imported by their API jobs (recordsProcessed above) and"
                   " archived, the broken one was refused with its reason, as expected")
        return 0
    click.echo("demo did not end as expected; see the log lines above", err=True)
    return 1
