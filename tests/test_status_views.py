"""`status` shows full names in a width that fits the terminal, `status NAME|ID` tells everything
about one file (reason and next step included), and `history` gives every event its reason
(issue 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.ops.sandbox import SandboxServer
from tests.helpers.agent_env import REPO, AgentEnv, sandbox_env

pytestmark = pytest.mark.timeout(90)

GOOD = b"accountId,id,email\nacct-1,user-1,ana@example.com\n"
BAD = b"accountId,id,email\nacct-2,,bo@example.com\n"
FIVE = b"accountId,id\n" + b"".join(b"acct-%d,user-%d\n" % (i, i) for i in range(5))


def cli(env: AgentEnv, *args: str, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    """The command with stdout a pipe; COLUMNS set (as a terminal of that width sets it) or unset."""
    environ = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    environ["PYTHONPATH"] = str(REPO)
    if columns is not None:
        environ["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "agent", *args, "--config", str(env.config_path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=environ, check=False)


@pytest.fixture
def delivered(sandbox: tuple[SandboxServer, Path],
              tmp_path: Path) -> tuple[AgentEnv, dict[str, dict[str, Any]]]:
    """One run over a good file, a refused one and one split into three parts."""
    server, key = sandbox
    env = sandbox_env(tmp_path, server, key)
    env.write_config("[imports]\nmax_records = 2\n", settle_seconds=0)
    env.drop_atomically("users_good_with_a_rather_long_name_for_the_columns.csv", GOOD)
    env.drop_atomically("users_bad.csv", BAD)
    env.drop_atomically("users_five.csv", FIVE)
    result = env.run_once()
    assert result.returncode == 1, result.stdout + result.stderr
    return env, {row["name"]: row for row in env.status()}


def test_status_keeps_names_whole_and_fits_the_width(
        delivered: tuple[AgentEnv, dict[str, dict[str, Any]]]) -> None:
    env, rows = delivered
    assert len(rows) == 6  # three files and three parts
    error = rows["users_bad.csv"]["error"].removeprefix("users_bad.csv was not uploaded: ")
    assert len(error) > 200

    wide = cli(env, "status", columns=200).stdout.splitlines()
    assert all(len(line) <= 200 for line in wide), wide
    for row in rows.values():
        assert row["name"] in "\n".join(wide) and (row["remote_name"] or "-") in "\n".join(wide)
    [bad_line] = [line for line in wide if " users_bad.csv " in line]
    assert bad_line.endswith("...") and error[:20] in bad_line, bad_line

    narrow = cli(env, "status", columns=80).stdout.splitlines()
    text = "\n".join(narrow)
    for row in rows.values():  # names are never cut, even where they make a row wider than 80
        assert f" {row['name']} " in text or text.count(row["name"])
        if row["remote_name"]:
            assert row["remote_name"] in text
    # too little room beside the names: the error goes on its own line below its row, cut to 80
    below = narrow[narrow.index(next(line for line in narrow if " users_bad.csv " in line)) + 1]
    assert below.startswith("      ") and error[:30] in below and len(below) <= 80, narrow
    assert "PROGRESS OR LAST ERROR" not in narrow[0]

    piped = cli(env, "status").stdout  # no terminal: whole lines for grep
    assert error in piped


def test_status_of_one_file_says_where_why_and_what_next(
        delivered: tuple[AgentEnv, dict[str, dict[str, Any]]]) -> None:
    env, rows = delivered
    bad = rows["users_bad.csv"]
    result = cli(env, "status", str(bad["id"]))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"#{bad['id']} users_bad.csv"
    fields = dict(line.strip().split(": ", 1) for line in lines[1:] if ": " in line)
    assert fields["state"].strip() == "failed"
    assert fields["reason"].strip() == " ".join(bad["error"].split())
    assert fields["now"].strip().startswith(str(env.failed / "users_bad.csv"))
    assert fields["reason file"].strip() == str(env.failed / "users_bad.csv.reason.txt")
    assert fields["next step"].strip().startswith(f"fix the records listed in {env.failed / 'users_bad.csv'}"
                                                  ".errors.csv")
    assert "saasquatch-agent history" in fields["last event"]

    good = cli(env, "status", "users_good_with_a_rather_long_name_for_the_columns.csv").stdout
    assert "  next step:    nothing: delivered and archived" in good
    remote = rows["users_good_with_a_rather_long_name_for_the_columns.csv"]["remote_name"]
    assert f"on the server as /imports/{remote}" in good
    split = cli(env, "status", "users_five.csv").stdout
    assert "  state:        split" in split and "each part is delivered as a file of its own" in split

    as_json = json.loads(cli(env, "status", "users_bad.csv", "--json").stdout)
    assert [row["id"] for row in as_json] == [bad["id"]] and as_json[0]["progress"] is None
    missing = cli(env, "status", "no_such.csv")
    assert missing.returncode == 1 and "no file in the journal is called 'no_such.csv'" in missing.stderr


def test_history_gives_each_event_its_reason(delivered: tuple[AgentEnv, dict[str, dict[str, Any]]]) -> None:
    env, _rows = delivered
    events = {name: json.loads(cli(env, "history", name, "--json").stdout)[0]["events"]
              for name in ("users_bad.csv", "users_five.csv",
                           "users_good_with_a_rather_long_name_for_the_columns.csv")}
    for name, found in events.items():
        assert all(event["message"] for event in found), (name, found)
    failed = events["users_bad.csv"][-1]
    assert failed["state"] == "failed" and "'id' is required" in failed["message"]
    assert str(env.failed / "users_bad.csv") in failed["message"]
    split = events["users_five.csv"]
    assert split[-1]["state"] == "split" and "parts are sent instead" in split[-1]["message"], split
    archived = events["users_good_with_a_rather_long_name_for_the_columns.csv"][-1]
    assert archived["state"] == "archived" and archived["message"].startswith(f"moved to {env.archive}")
    text = cli(env, "history", "users_bad.csv").stdout
    assert "failed     users_bad.csv was not uploaded" in text, text
    assert all(len(line.split(None, 2)) == 3 for line in text.splitlines()[1:]), text  # no empty reason
