"""Start-up imports only what a command needs (issue 17): `status` and `validate` load no SSH stack and
no logging library; no command loads `invoke` (paramiko's optional `Match exec` helper); the daemon
loads prometheus_client only with [metrics] on. Each command runs in a fresh interpreter; the modules
it loaded are written out when it exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.agent_env import REPO, AgentEnv
from tests.helpers.sshd import SshdServer

PROBE = """
import atexit, json, sys
atexit.register(lambda: open(sys.argv[1], "w").write(json.dumps(sorted(
    name for name, module in sys.modules.items() if module is not None))))  # None: an import blocked
from agent.cli import main
main(sys.argv[2:])
"""
HEAVY = {"paramiko", "cryptography", "invoke", "loguru", "asyncio", "prometheus_client", "apscheduler",
         "watchdog"}


def loaded(tmp_path: Path, *args: str) -> set[str]:
    """Top-level packages a fresh `saasquatch-agent ARGS` process imported."""
    out = tmp_path / "modules.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert out.exists(), proc.stdout + proc.stderr
    names: list[str] = json.loads(out.read_text())
    return {name.split(".")[0] for name in names}


@pytest.fixture
def env(sshd_server: SshdServer, tmp_path: Path) -> AgentEnv:
    return AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0)


def test_status_and_validate_load_no_ssh_and_no_logging_library(env: AgentEnv, tmp_path: Path) -> None:
    small = tmp_path / "users_small.csv"
    small.write_text("accountId,id,email\nacct-1,u1,a@example.com\n")
    config = str(env.config_path)
    for args in (("status", "--config", config), ("status", "--json", "--config", config),
                 ("validate", str(small))):
        modules = loaded(tmp_path, *args)
        assert "agent" in modules and "click" in modules, args  # the probe did run the command
        heavy = sorted(modules & HEAVY)
        assert heavy == [], f"{' '.join(args)} imported {heavy}"


def test_run_once_loads_neither_invoke_nor_prometheus_client_by_default(env: AgentEnv,
                                                                       tmp_path: Path) -> None:
    env.drop_atomically("users_one.csv", b"accountId,id,email\nacct-1,u1,a@example.com\n")
    modules = loaded(tmp_path, "run", "--once", "--config", str(env.config_path))
    assert "paramiko" in modules, "the file was not sent: the probe proves nothing"
    assert len(env.archived_files()) == 1
    assert "invoke" not in modules
    assert "prometheus_client" not in modules
    assert "httpx" not in modules  # the API route's client, with upload.transport = "sftp"
