"""The benchmark script (bench/run.py) still runs: one tiny burst round, agent against `sftp -b`.

Not a benchmark: no timing is asserted, only that every tool delivered every file and the report
came out. Needs OpenSSH's sshd and sftp (`apt-get install -y openssh-server openssh-client`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server  # a real server or an agent process

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(90)
def test_quick_burst_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--scenario", "burst", "--burst-files", "5",
         "--rounds", "1", "--refs", "sftp", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=80, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ratio" in proc.stdout
    [burst] = json.loads(out.read_text())
    assert burst["scenario"] == "burst" and burst["extra"]["files"] == 5
    assert set(burst["rows"]) == {"agent", "sftp -b"}
    assert all(len(samples) == 1 and samples[0] > 0 for samples in burst["rows"].values())
