"""`saasquatch-agent demo` is the newcomer's first command: it must work from a clean state."""

from __future__ import annotations

import os
import re
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
    # the `run --once` summary, then the `status` table
    assert re.search(r"^  #\d+ users_spring-signups\.csv: archived$", out, re.MULTILINE), out
    assert re.search(r"^  #\d+ userEvents_purchases\.jsonl: archived$", out, re.MULTILINE), out
    assert re.search(r"^  #\d+ users_missing-ids\.csv: failed \(.*'id' is required", out, re.MULTILINE), out
    assert "on the server as /imports/users_spring-signups_" in out
    assert "3 files: 2 archived, 1 failed" in out
    assert re.search(r"^ID +STATE +TYPE +AGE +NAME +REMOTE NAME", out, re.MULTILINE), out


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
