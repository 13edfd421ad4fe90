"""`saasquatch-agent demo` is the newcomer's first command: it must work from a clean state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server  # a real server or an agent process

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(90)
def test_demo_runs_the_whole_flow_and_exits_zero() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": "/nonexistent"}
    result = subprocess.run([sys.executable, "-m", "agent", "demo"], capture_output=True, text=True,
                            timeout=80, env=env, cwd=REPO, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "users_spring-signups.csv\n  state:  archived" in out
    assert "userEvents_purchases.jsonl\n  state:  archived" in out
    assert "users_missing-ids.csv\n  state:  failed" in out
    assert "remote: /imports/users_spring-signups_" in out
    assert "'id' is required" in out


@pytest.mark.timeout(90)
def test_demo_shows_the_api_route_against_the_local_https_sandbox() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": "/nonexistent"}
    result = subprocess.run([sys.executable, "-m", "agent", "demo", "--transport", "api"],
                            capture_output=True, text=True, timeout=80, env=env, cwd=REPO, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "users_spring-signups.csv\n  state:  archived" in out
    assert "userEvents_purchases.jsonl\n  state:  archived" in out
    assert "users_missing-ids.csv\n  state:  failed" in out
    assert "2 record(s) processed" in out and "1 record(s) processed" in out
    assert "fileRef imports/test_demo0sandbox/users_spring-signups_" in out
