"""`saasquatch-agent demo [--transport api]`: the whole flow against a local sandbox SFTP server, or a
local stand-in for SaaSquatch's import API; no credentials."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import click

from agent.config import Config, load_config
from agent.logs import setup_logging
from agent.ops.keys import write_new_keypair
from agent.ops.views import status_table, terminal_width
from agent.pipeline.progress import read_progress
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


DISTRIBUTION = "saasquatch-agent"
CHECKOUT = Path(__file__).resolve().parents[2]  # where this code runs from (a checkout or site-packages)


def install_line(extra: str, direct_url: dict[str, Any] | None = None, installed: bool = True,
                 python: str = sys.executable, running_from: Path = CHECKOUT) -> str:
    """The pip command that adds `extra` the way this agent was installed: from a checkout (editable
    or not), a wheel or sdist file, a VCS URL, or an index/wheelhouse (pip's direct_url.json says
    which, PEP 610); code run from a checkout that is not the installed one: that checkout."""
    pip = f"{shlex.quote(python)} -m pip install"
    url = str((direct_url or {}).get("url", ""))
    parsed = urlparse(url)
    if not installed or (direct_url and "dir_info" in direct_url
                         and Path(unquote(parsed.path)).resolve() != running_from):
        if (running_from / "pyproject.toml").exists():
            return f"{pip} -e {shlex.quote(f'{running_from}[{extra}]')}"
        return f"{pip} {shlex.quote(f'{DISTRIBUTION}[{extra}]')}"
    if direct_url and "dir_info" in direct_url:
        editable = "-e " if direct_url["dir_info"].get("editable") else ""
        return f"{pip} {editable}{shlex.quote(f'{unquote(parsed.path)}[{extra}]')}"
    if direct_url and "archive_info" in direct_url and parsed.scheme == "file":
        return f"{pip} {shlex.quote(f'{unquote(parsed.path)}[{extra}]')}"
    if direct_url and "vcs_info" in direct_url:
        vcs = direct_url["vcs_info"]
        kind = vcs.get("vcs", "git")
        ref = "@" + str(vcs["requested_revision"]) if vcs.get("requested_revision") else ""
        return f"{pip} {shlex.quote(f'{DISTRIBUTION}[{extra}] @ {kind}+{url}{ref}')}"
    if direct_url:
        return f"{pip} {shlex.quote(f'{DISTRIBUTION}[{extra}] @ {url}')}"
    return (f"{pip} {shlex.quote(f'{DISTRIBUTION}[{extra}]')}   (offline, as install.sh --wheels: add"
            " --no-index --find-links WHEELHOUSE, with the extra's wheels in it:"
            f" pip wheel -w WHEELHOUSE '.[{extra}]')")


def how_installed() -> tuple[dict[str, Any] | None, bool]:
    """(the distribution's direct_url.json, whether it is installed at all)."""
    try:
        distribution = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None, False
    text = distribution.read_text("direct_url.json")
    try:
        found = json.loads(text) if text else None
    except ValueError:
        found = None
    return (found if isinstance(found, dict) else None), True


def missing_extra_message() -> str:
    direct_url, installed = how_installed()
    return ("the demo needs the optional `demo` extra (the asyncssh package), which is not installed."
            f" Install it with:\n  {install_line('demo', direct_url, installed)}")


def run_demo(run_once: Callable[[Config], tuple[int, list[str]]], keep: bool = False,
             transport: str = "sftp") -> int:
    """The sample files through `run_once` (the agent's `run --once`, passed in by the CLI: the
    operator commands sit below the service; it returns the exit code and the summary lines)
    against a sandbox server; 0 when all went as expected."""
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
            config = _config_with_samples(root, (
                "[sftp]\n"
                f'host = "{server.host}"\nport = {server.port}\nusername = "{DEMO_TENANT}"\n'
                'private_key = "keys/id_ed25519"\nknown_hosts = "keys/known_hosts"\n'
                'remote_dir = "/imports"\n\n'))
            click.echo(f"sandbox SFTP server on {server.host}:{server.port}, files under {root}")
            _show_run(run_once, config)
        finally:
            server.stop()
        return _report(config, server_root=root / "sftp-server")
    finally:
        if keep:
            click.echo(f"kept the sandbox folder: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _config_with_samples(root: Path, route: str) -> Config:
    """root/agent.toml for the demo (the route's section, then the folders under root), logging set
    up, and the sample files in drop/."""
    config_path = root / "agent.toml"
    config_path.write_text(
        route + "[paths]\n"
        'drop = "drop"\nstate_dir = "state"\narchive = "archive"\nfailed = "failed"\n\n'
        "[watch]\nsettle_seconds = 0\n\n[retry]\nonce_max_attempts = 2\n"
    )
    config = load_config(config_path)
    setup_logging(config.log)
    config.paths.drop.mkdir(parents=True, exist_ok=True)
    for name, text in SAMPLES.items():
        (config.paths.drop / name).write_text(text)
    return config


def _show_run(run_once: Callable[[Config], tuple[int, list[str]]], config: Config) -> None:
    _code, summary = run_once(config)
    click.echo("\n$ saasquatch-agent run --once   # what it prints when it ends")
    for line in summary:
        click.echo(line)


def _report(config: Config, server_root: Path) -> int:
    journal = Journal(config.journal_path, readonly=True)
    records = journal.all()
    journal.close()
    click.echo("\n$ saasquatch-agent status")
    for line in status_table(records, read_progress(config.paths.state_dir), terminal_width()):
        click.echo(line)
    click.echo("")
    expected_ok = 0
    for record in records:
        arrived = record.remote_name and (server_root / "imports" / record.remote_name).is_file()
        refused = record.name == "users_missing-ids.csv"
        if (refused and record.state == FileState.FAILED) or (not refused and arrived):
            expected_ok += 1
    if expected_ok == len(SAMPLES) == len(records):
        click.echo("demo finished: two files were delivered and archived, the broken one was refused"
                   " with its reason, as expected")
        return 0
    click.echo("demo did not end as expected; see the log lines above", err=True)
    return 1


def run_api_demo(run_once: Callable[[Config], tuple[int, list[str]]], keep: bool = False) -> int:
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
            config = _config_with_samples(root, (
                '[upload]\ntransport = "api"\n\n'
                f'[api]\nbase_url = "{server.base_url}"\ntenant_alias = "{DEMO_TENANT}"\n'
                f'api_key_file = "keys/api-key"\nca_file = "{server.ca_path}"\npoll_seconds = 0.5\n\n'))
            click.echo(f"sandbox of SaaSquatch's import API on {server.base_url} (HTTPS, a CA made for the"
                       f" demo), files under {root}")
            _show_run(run_once, config)
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
