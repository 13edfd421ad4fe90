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
