"""Log lines in UTC with a zone marker; `log.format = "json"`: one compact object per line with the
documented fields (issue 15). Each case logs in a process of its own, as the agent does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime

from agent.logs import JSON_FIELDS
from tests.helpers.agent_env import REPO

STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z (INFO|WARNING|ERROR) ")

SETUP = """
from loguru import logger
from agent.config import LogConfig
from agent.logs import file_fields, setup_logging
from agent.store.journal import FileRecord, FileState
setup_logging(LogConfig(format="{fmt}"))
record = FileRecord(12, "users_x.csv", "/d/users_x.csv", "/s/00000012_users_x.csv", None, None, 10,
                    "ab" * 32, "users", "users_x_20260101T000000000Z_abababab.csv", FileState.QUEUED, 1,
                    "cannot connect", None, "2026-01-01T00:00:00.000Z", "2026-01-01T00:00:00.000Z", 0)
logger.bind(**file_fields(record)).warning("#12 'users_x.csv' not uploaded:\\nsecond line")
logger.info("not about a file")
try:
    raise ValueError("boom")
except ValueError:
    logger.exception("it failed")
"""


def logged(fmt: str, tz: str = "UTC") -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TZ": tz}
    env.pop("JOURNAL_STREAM", None)
    result = subprocess.run([sys.executable, "-c", SETUP.replace("{fmt}", fmt)], capture_output=True,
                            text=True, env=env, timeout=30, cwd=REPO, check=True)
    return result.stderr.splitlines()


def test_text_lines_are_utc_with_a_zone_marker_whatever_the_local_zone() -> None:
    lines = logged("text", tz="Asia/Kolkata")  # UTC+05:30
    stamped = [line for line in lines if STAMP.match(line)]
    assert len(stamped) == 3, lines  # the traceback's own lines follow the third
    for line in stamped:
        match = STAMP.match(line)
        assert match
        moment = datetime.fromisoformat(match[1]).replace(tzinfo=UTC)
        assert abs((datetime.now(UTC) - moment).total_seconds()) < 60, line
    assert stamped[0].endswith("#12 'users_x.csv' not uploaded:\\nsecond line")  # one line, escaped


def test_json_lines_are_one_compact_object_with_the_documented_fields() -> None:
    lines = logged("json", tz="America/New_York")
    assert len(lines) == 3, lines  # one line per record, the traceback included
    first, second, third = (json.loads(line) for line in lines)
    assert list(first) == list(JSON_FIELDS) == ["time", "level", "message", "file_id", "file",
                                               "remote_name", "import_type", "state", "error"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    moment = datetime.fromisoformat(first["time"].replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - moment).total_seconds()) < 60
    assert first["level"] == "WARNING" and first["message"] == "#12 'users_x.csv' not uploaded:\\nsecond line"
    assert (first["file_id"], first["file"], first["state"], first["error"]) == (
        12, "users_x.csv", "queued", "cannot connect")
    assert first["remote_name"] == "users_x_20260101T000000000Z_abababab.csv"
    assert first["import_type"] == "users"
    assert list(second) == list(JSON_FIELDS) and second["file_id"] is None
    assert second["message"] == "not about a file"
    assert third["level"] == "ERROR" and list(third) == [*JSON_FIELDS, "exception"]
    assert "Traceback" in third["exception"] and "ValueError: boom" in third["exception"]
    assert all(len(line) < 400 for line in lines[:2]), lines  # compact: no record dump, no source paths
    assert '", "' not in lines[1] and '": ' not in lines[1]  # compact separators
    assert "agent/logs.py" not in lines[0] and "\u2139" not in lines[1]  # no source path, no icon
