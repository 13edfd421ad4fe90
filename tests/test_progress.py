"""Upload progress (issue 15): an `uploading` row shows bytes sent and rate in `status` and
`status --json`; the record is written at most every 2 s (never a journal commit per chunk), and a
large upload's log line comes at most every 10 s."""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from agent.ops.sandbox import SandboxServer
from agent.pipeline.progress import LOG_SECONDS, STORE_SECONDS, Tracker, UploadProgress, read_progress
from agent.store.journal import FileRecord, FileState
from tests.helpers.agent_env import sandbox_env, wait_until


def record(file_id: int, size: int) -> FileRecord:
    return FileRecord(file_id, f"users_{file_id}.csv", "/drop/x", "/spool/x", None, None, size, "0" * 64,
                      "users", f"users_{file_id}.csv", FileState.UPLOADING, 0, None, None,
                      "2026-01-01T00:00:00.000Z", "2026-01-01T00:00:00.000Z", 0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_tracker_writes_at_most_every_2_s_and_logs_at_most_every_10_s(tmp_path: Path) -> None:
    store = UploadProgress(tmp_path)
    clock = Clock()
    tracker = Tracker(store, [record(7, 10_000_000)], clock=clock)
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), format="{message}", level="INFO")
    seen: list[int] = []
    try:
        for step in range(1, 251):  # 25 s in chunks every 0.1 s, 40,000 bytes each
            clock.now += 0.1
            tracker.update(step * 40_000)
            now = read_progress(tmp_path).get(7)
            if now is not None and (not seen or seen[-1] != now.sent):
                seen.append(now.sent)
    finally:
        logger.remove(sink)
    assert STORE_SECONDS == 2.0 and LOG_SECONDS == 10.0
    # 25 s of chunks: a write every 2 s (12 of them), the first after 2 s
    assert len(seen) == 12, seen
    assert all(later - earlier == 800_000 for earlier, later in itertools.pairwise(seen)), seen
    assert lines == [
        "#7 'users_7.csv' uploading: 3.81 MiB of 9.54 MiB sent (40%), 391 KiB/s, about 15 s left\n",
        "#7 'users_7.csv' uploading: 7.63 MiB of 9.54 MiB sent (80%), 391 KiB/s, about 5.0 s left\n"]
    latest = read_progress(tmp_path)[7]
    assert latest.sent == 9_600_000 and latest.total == 10_000_000 and round(latest.rate) == 400_000
    tracker.done()
    assert read_progress(tmp_path) == {}
    store.close()


def test_a_fast_upload_writes_no_progress(tmp_path: Path) -> None:
    store = UploadProgress(tmp_path)
    tracker = store.track([record(1, 1000)])
    tracker.update(1000)
    assert read_progress(tmp_path) == {}
    tracker.done()
    store.close()
    assert read_progress(tmp_path / "nowhere") == {}


@pytest.mark.timeout(120)
def test_status_shows_bytes_sent_and_rate_while_a_large_file_uploads(sandbox: tuple[SandboxServer, Path],
                                                                     tmp_path: Path) -> None:
    server, key = sandbox
    env = sandbox_env(tmp_path, server, key)
    rate = 250_000  # bytes per second: 3 MB take 12 s
    env.write_config(settle_seconds=0, sftp_extra=f"bandwidth_limit = {rate}")
    lines = ["accountId,id,email"] + [f"acct-{i:07d},user-{i:07d},u{i:07d}@example.com"
                                      for i in range(66_000)]
    data = ("\n".join(lines) + "\n").encode()
    assert 2_900_000 < len(data) < 3_300_000
    env.drop_atomically("users_large.csv", data)
    env.start()
    try:
        def uploading() -> dict[str, Any] | None:
            rows = env.status()
            row = rows[0] if rows else None
            return row if row and row["state"] == "uploading" and row["progress"] else None

        assert wait_until(lambda: uploading() is not None, 20), env.log()
        first = uploading()
        assert first is not None
        time.sleep(STORE_SECONDS + 0.5)
        second = uploading()
        assert second is not None, env.status()
        for row in (first, second):
            progress = row["progress"]
            assert 0 < progress["sent_bytes"] < progress["total_bytes"] == len(data), row
            assert 0.5 * rate < progress["bytes_per_second"] < 1.5 * rate, row
            assert progress["files_in_batch"] == 1 and progress["updated_at"].endswith("Z")
        assert second["progress"]["sent_bytes"] > first["progress"]["sent_bytes"]
        table = env.cli("status", "--config", str(env.config_path), timeout=30)
        pattern = r"uploading .* users_large\.csv .* of 2\.\d+ MiB sent \(\d+%\), \d+ KiB/s"
        assert re.search(pattern, table.stdout), table.stdout
        detail = env.cli("status", "users_large.csv", "--config", str(env.config_path), timeout=30)
        assert "  progress:     " in detail.stdout and "MiB sent" in detail.stdout, detail.stdout
        assert wait_until(lambda: "'users_large.csv' uploading: " in env.log(), 20), env.log()
        assert wait_until(lambda: env.states().get("users_large.csv") == "archived", 40), env.log()
    finally:
        assert env.stop() == 0, env.log()
    [row] = json.loads(env.cli("status", "--json", "--config", str(env.config_path)).stdout)
    assert row["progress"] is None
    progress_lines = [line for line in env.log().splitlines() if "' uploading: " in line]
    assert 1 <= len(progress_lines) <= 2, progress_lines  # 12 s: one line after 10 s (at most every 10 s)
