"""`saasquatch-agent validate FILE... [--type TYPE] [--json] [--config PATH]` as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent_env import REPO
from tests.test_imports_e2e import corpus, write_case

pytestmark = pytest.mark.timeout(60)

USERS_OK = b"accountId,id,email\nacct-1,u-1,a@example.com\nacct-2,u-2,b@example.com\n"


def validate(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SAASQUATCH_AGENT_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "agent", "validate", *map(str, args)], capture_output=True,
                          text=True, timeout=30, cwd=REPO, env=env, check=False)


def as_json(*args: str | Path) -> tuple[int, list[dict[str, Any]]]:
    result = validate("--json", *args)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def write_config(tmp_path: Path, imports: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text('[sftp]\nhost = "127.0.0.1"\nusername = "test_x"\nprivate_key = "k"\n'
                    'known_hosts = "kh"\n\n'
                    '[paths]\ndrop = "drop"\nstate_dir = "state"\narchive = "archive"\nfailed = "failed"\n\n'
                    + imports)
    return path


def test_valid_files_pass_with_their_type_and_remote_name(tmp_path: Path) -> None:
    files = {
        "users_a.csv": USERS_OK,
        "userEvents_b.jsonl": b'{"accountId": "a", "userId": "u", "event": {"key": "k", '
                              b'"dateTriggered": 1767225600000}}\n',
        "deleteUsers_c.csv": b"accountId,id\na,1\nb,2\n",
        "rewardRedemptions_d.csv": b"accountId,userId,valueToRedeem\na,u,10\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    result = validate(*(tmp_path / name for name in files))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "4 of 4 files valid"
    assert any(line.startswith(f"{tmp_path}/users_a.csv: valid: users (MUTATION/USER), CSV, 2 records")
               and "would be uploaded as users_a_" in line for line in lines), lines
    assert "  warning: sending it will permanently delete 2 users" in lines
    code, report = as_json(*(tmp_path / name for name in files))
    assert code == 0 and [r["valid"] for r in report] == [True] * 4
    assert [r["job_type"] for r in report] == ["MUTATION/USER", "MUTATION/USER_EVENT", "MUTATION/DELETE_USER",
                                               "MUTATION/REDEEMABLE_REWARD_BALANCE"]
    assert report[2]["deletes"] == 2 and report[0]["remote_name"].startswith("users_a_")


def test_invalid_file_lists_record_numbers_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "users_bad.csv"
    bad.write_bytes(b"accountId,id,locale\na,1,en_US\nb,,en-us\nc,3\n")
    good = tmp_path / "users_good.csv"
    good.write_bytes(USERS_OK)
    result = validate(bad, good)
    assert result.returncode == 1
    out = result.stdout
    assert f"{bad}: INVALID" in out
    assert "  record 2, field 'id': 'id' is required and must not be empty" in out
    assert "  record 2, field 'locale':" in out and "record 3" in out
    assert out.splitlines()[-1] == "1 of 2 files valid, 1 invalid"
    code, report = as_json(bad, good)
    assert code == 1
    assert report[0]["valid"] is False and report[0]["action"] == "refuse"
    assert report[0]["error_count"] == 3
    found = {(e["recordNumber"], e["field"]) for e in report[0]["errors"]}
    assert found == {(2, "id"), (2, "locale"), (3, "")}
    assert "not uploaded" in report[0]["reason"] and report[1]["valid"] is True


def test_oversize_is_split_or_refused_as_configured(tmp_path: Path) -> None:
    big = tmp_path / "users_big.csv"
    big.write_bytes(b"accountId,id\n" + b"".join(b"a%d,%d\n" % (i, i) for i in range(7)))
    split_cfg = write_config(tmp_path, "[imports]\nmax_records = 3\n")
    result = validate("--config", split_cfg, big)
    assert result.returncode == 0, result.stdout
    assert "over the per-file limits" in result.stdout and "would be split into 3 parts" in result.stdout
    code, report = as_json("--config", split_cfg, big)
    assert code == 0 and report[0]["action"] == "split" and report[0]["parts"] == 3
    refuse_cfg = write_config(tmp_path, '[imports]\nmax_records = 3\noversize = "refuse"\n')
    code, report = as_json("--config", refuse_cfg, big)
    assert code == 1 and report[0]["action"] == "refuse" and "too large" in report[0]["reason"]
    tiny_cfg = write_config(tmp_path, "[imports]\nmax_file_bytes = 10\n")  # one record cannot fit
    code, report = as_json("--config", tiny_cfg, big)
    assert code == 1 and "could not be split" in report[0]["reason"]


def test_type_option_configured_prefixes_and_drop_folders(tmp_path: Path) -> None:
    export = tmp_path / "export.csv"
    export.write_bytes(USERS_OK)
    assert validate(export).returncode == 1  # no type at all
    code, report = as_json("--type", "users", export)
    assert code == 0 and report[0]["import_type"] == "users"
    code, report = as_json("--type", "delete_users", export)
    assert code == 1 and "deletion guard" in report[0]["reason"]
    named = tmp_path / "deleteUsers_x.csv"
    named.write_bytes(b"accountId,id\na,1\n")
    code, report = as_json("--type", "users", named)
    assert code == 1 and "will not guess" in report[0]["reason"]

    cfg = write_config(tmp_path, '[imports.prefixes]\nusers = "members"\nuser_events = "ev"\n'
                                 'delete_users = "gone"\nreward_redemptions = "rr"\n')
    members = tmp_path / "members_a.csv"
    members.write_bytes(USERS_OK)
    assert validate(members).returncode == 1
    code, report = as_json("--config", cfg, members)
    assert code == 0 and report[0]["remote_name"].startswith("members_a_")
    in_folder = tmp_path / "drop" / "delete-users" / "leavers.csv"
    in_folder.parent.mkdir(parents=True)
    in_folder.write_bytes(b"accountId,id\na,1\n")
    code, report = as_json("--config", cfg, in_folder)
    assert code == 0 and report[0]["import_type"] == "delete_users"
    assert report[0]["remote_name"].startswith("gone_leavers_")


def test_not_files_and_usage_errors(tmp_path: Path) -> None:
    fifo = tmp_path / "users_pipe.csv"
    os.mkfifo(fifo)
    folder = tmp_path / "users_dir.csv"
    folder.mkdir()
    code, report = as_json(fifo, folder)  # must not block on the FIFO
    assert code == 1 and "FIFO" in report[0]["reason"] and "directory" in report[1]["reason"]
    assert validate().returncode == 2
    missing = validate(tmp_path / "missing.csv")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert validate("--type", "customers", fifo).returncode == 2
    broken = write_config(tmp_path, "[imports]\nmax_record = 3\n")
    result = validate("--config", broken, fifo)
    assert result.returncode == 2 and str(broken) in result.stderr and "imports.max_record" in result.stderr


def test_validate_agrees_with_the_daemon_on_the_whole_corpus(tmp_path: Path) -> None:
    """The e2e corpus: `validate` says invalid exactly for the files the daemon puts in failed/."""
    cfg = write_config(tmp_path)
    drop = tmp_path / "drop"
    cases = corpus()
    paths = [write_case(drop, case) for case in cases]
    code, report = as_json("--config", cfg, *paths)
    assert code == 1
    verdicts = {Path(entry["file"]).name: entry["valid"] for entry in report}
    assert verdicts == {case.name: case.expect == "uploaded" for case in cases}
