"""`run --dry-run`: what would be taken from drop/ now, with type, remote name, verdict and split
plan; nothing moved, nothing written, nothing sent (issue 15)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from agent.ops.sandbox import SandboxServer
from tests.helpers.agent_env import sandbox_env

pytestmark = pytest.mark.timeout(90)

GOOD = b"accountId,id,email\nacct-1,user-1,ana@example.com\n"
BAD = b"accountId,id,email\nacct-2,,bo@example.com\n"
FIVE = b"accountId,id\n" + b"".join(b"acct-%d,user-%d\n" % (i, i) for i in range(5))


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry below root with its inode, size and mtime: what `nothing moved` compares."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        found[str(path.relative_to(root))] = (info.st_ino, info.st_size, info.st_mtime_ns)
    return found


def plan_lines(stdout: str) -> dict[str, str]:
    return {m[1]: m[2] for m in re.finditer(r"^  (\S+): (.*)$", stdout, re.MULTILINE)}


def test_dry_run_plans_each_file_and_touches_nothing(sandbox: tuple[SandboxServer, Path],
                                                     tmp_path: Path) -> None:
    server, key = sandbox
    env = sandbox_env(tmp_path, server, key)
    env.write_config("[imports]\nmax_records = 2\n", settle_seconds=0)
    env.drop_atomically("users_good.csv", GOOD)
    env.drop_atomically("users_bad.csv", BAD)
    env.drop_atomically("five.csv", FIVE, folder="users")  # typed by its folder; 5 records: 3 parts
    env.drop_atomically("users_same.csv", GOOD)  # the same content as users_good.csv
    (env.drop / "users_link.csv").symlink_to(env.drop / "users_good.csv")
    outside = tmp_path / "elsewhere.csv"
    outside.write_bytes(b"accountId,id\nacct-9,user-9\n")
    os.link(outside, env.drop / "users_linked.csv")
    before = tree(tmp_path)

    result = env.cli("run", "--dry-run", "--config", str(env.config_path))

    assert result.returncode == 1, result.stdout + result.stderr  # some would be refused
    plans = plan_lines(result.stdout)
    assert set(plans) == {"users_good.csv", "users_bad.csv", "users/five.csv", "users_same.csv",
                          "users_link.csv", "users_linked.csv"}, result.stdout
    assert re.fullmatch(r"users \(MUTATION/USER\), CSV, 1 record, \d+ B: valid; would be sent as"
                        r" users_good_\d{8}T\d{9}Z_[0-9a-f]{8}\.csv", plans["users_good.csv"]), result.stdout
    assert plans["users_bad.csv"].startswith("INVALID, would go to failed/:"), result.stdout
    assert "'id' is required" in plans["users_bad.csv"], result.stdout
    assert re.fullmatch(r"users \(MUTATION/USER\), CSV, 5 records, \d+ B: valid but over the limits \(.*2"
                        r" records per file\): would be split into 3 parts, sent as"
                        r" users_five_\S+_part1of3\.csv \.\.\. users_five_\S+_part3of3\.csv;"
                        r" the original is archived",
                        plans["users/five.csv"]), result.stdout
    assert "would go to failed/ as a duplicate" in plans["users_same.csv"], result.stdout
    assert "also in drop/ as users_good.csv" in plans["users_same.csv"], result.stdout
    assert plans["users_link.csv"] == "left alone: it is a symbolic link; links are never followed"
    assert "2 hard links" in plans["users_linked.csv"], result.stdout
    assert result.stdout.rstrip().splitlines()[-1] == (
        "6 files in drop/: 1 would be sent, 1 would be split, 3 would go to failed/, 1 left alone")
    assert tree(tmp_path) == before  # nothing moved, created or changed (no state_dir, no journal)
    assert not env.state.exists()
    assert server.counts["open"] == 0 and not any((tmp_path / "sftp-root" / "imports").iterdir())


def test_dry_run_knows_what_the_journal_already_took(sandbox: tuple[SandboxServer, Path],
                                                     tmp_path: Path) -> None:
    server, key = sandbox
    env = sandbox_env(tmp_path, server, key)
    env.drop_atomically("users_first.csv", GOOD)
    assert env.run_once().returncode == 0
    env.drop_atomically("users_again.csv", GOOD)
    env.drop_atomically("users_new.csv", FIVE)

    result = env.cli("run", "--dry-run", "--config", str(env.config_path))

    assert result.returncode == 1, result.stdout + result.stderr
    plans = plan_lines(result.stdout)
    assert "users_again.csv" in plans, result.stdout + result.stderr
    assert "duplicate" in plans["users_again.csv"], result.stdout
    assert "taken as #1 'users_first.csv'" in plans["users_again.csv"], result.stdout
    assert "would be sent as users_new_" in plans["users_new.csv"], result.stdout
    assert env.states() == {"users_first.csv": "archived"}  # the dry run queued nothing
    assert sorted(p.name for p in env.drop.iterdir() if p.is_file()) == ["users_again.csv", "users_new.csv"]
