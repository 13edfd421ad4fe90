"""`run --once` ends with what the operator needs: per file its outcome, where it is now and the next
step, then one line of totals; each refusal is logged once, and the last failed attempt says that
the run gives up instead of announcing a retry that never comes (issue 15)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.ops.sandbox import SandboxServer
from tests.helpers.agent_env import AgentEnv, sandbox_env
from tests.helpers.sshd import free_port

pytestmark = pytest.mark.timeout(90)

GOOD = b"accountId,id,email\nacct-1,user-1,ana@example.com\n"
BAD = b"accountId,id,email\nacct-2,,bo@example.com\n"


def entries(stdout: str) -> dict[str, list[str]]:
    """The summary's entries by file name: the headline and its `now:` and `next:` lines."""
    found: dict[str, list[str]] = {}
    lines = stdout.splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"  #\d+ (\S+): ", line)
        if match:
            found[match[1]] = lines[index:index + 3]
    return found


def test_summary_names_each_file_its_place_and_next_step(sandbox: tuple[SandboxServer, Path],
                                                         tmp_path: Path) -> None:
    server, key = sandbox
    env = sandbox_env(tmp_path, server, key)
    env.drop_atomically("users_good.csv", GOOD)
    env.drop_atomically("users_bad.csv", BAD)

    result = env.run_once(timeout=60)

    assert result.returncode == 1, result.stdout + result.stderr
    found = entries(result.stdout)
    assert set(found) == {"users_good.csv", "users_bad.csv"}, result.stdout
    good_head, good_now, good_next = found["users_good.csv"]
    assert good_head.endswith(": archived"), result.stdout
    [archived] = env.archived_files()
    remote_name = {row["name"]: row for row in env.status()}["users_good.csv"]["remote_name"]
    assert good_now == f"      now:  {archived}; on the server as /imports/{remote_name}", result.stdout
    assert good_next == "      next: nothing: delivered and archived"
    bad_head, bad_now, bad_next = found["users_bad.csv"]
    assert bad_head.startswith("  #") and ": failed (" in bad_head and "'id' is required" in bad_head
    assert str(env.failed / "users_bad.csv") in bad_now and ".errors.csv" in bad_now, result.stdout
    assert f"fix the records listed in {env.failed / 'users_bad.csv'}.errors.csv" in bad_next, result.stdout
    assert result.stdout.rstrip().splitlines()[-1] == "2 files: 1 archived, 1 failed", result.stdout
    # the log says the refusal once; the summary is printed, not logged
    assert result.stderr.count("'id' is required") == 1, result.stderr
    assert "files: " not in result.stderr


def test_unreachable_server_gives_up_without_announcing_a_retry(sandbox: tuple[SandboxServer, Path],
                                                                tmp_path: Path) -> None:
    server, key = sandbox
    env = sandbox_env(tmp_path, server, key)
    env.write_config(settle_seconds=0, port=free_port())  # nothing listens there: refused at once
    env.drop_atomically("users_waiting.csv", GOOD)

    result = env.run_once(timeout=60)

    assert result.returncode == 1, result.stdout + result.stderr
    failures = [line for line in result.stderr.splitlines() if "not uploaded" in line]
    assert len(failures) == 2, result.stderr  # retry.once_max_attempts = 2 in AgentEnv
    assert "retrying in" in failures[0], failures
    assert "retrying in" not in failures[-1] and "giving up for this run" in failures[-1], failures
    [(head, now, step)] = entries(result.stdout).values()
    assert head.startswith("  #1 users_waiting.csv: not sent, left queued (cannot connect to"), result.stdout
    assert "(spool)" in now and str(env.state / "spool") in now, result.stdout
    assert "saasquatch-agent doctor" in step and "run again" in step, result.stdout
    assert result.stdout.rstrip().splitlines()[-1] == "1 file: 1 left queued", result.stdout
    assert env.states() == {"users_waiting.csv": "queued"}


def test_nothing_to_do_says_so(sandbox: tuple[SandboxServer, Path], tmp_path: Path) -> None:
    server, key = sandbox
    env: AgentEnv = sandbox_env(tmp_path, server, key)
    result = env.run_once(timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nothing in drop/ or waiting in the spool" in result.stdout, result.stdout


def test_a_split_file_counts_by_its_parts(sandbox: tuple[SandboxServer, Path], tmp_path: Path) -> None:
    server, key = sandbox
    env = sandbox_env(tmp_path, server, key)
    env.write_config("[imports]\nmax_records = 2\n", settle_seconds=0)
    five = b"accountId,id\n" + b"".join(b"a%d,u%d\n" % (i, i) for i in range(5))
    env.drop_atomically("users_five.csv", five)

    result = env.run_once(timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr  # every part delivered: nothing failed
    found = entries(result.stdout)
    assert found["users_five.csv"][0].endswith(": split"), result.stdout
    assert "each part is delivered as a file of its own" in found["users_five.csv"][2]
    assert [name for name in found if name != "users_five.csv"] == [
        f"users_five_part{k}of3.csv" for k in (1, 2, 3)], result.stdout
    assert result.stdout.rstrip().splitlines()[-1] == "4 files: 3 archived, 1 split", result.stdout
