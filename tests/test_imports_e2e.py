"""Issue 4 end to end: the import rules in the running agent, against OpenSSH's sshd.

One daemon takes a whole corpus of bad, odd and valid inputs; each must end where it should, the
secret behind a symlink must never reach the server, and the daemon must keep working. The
daemon runs without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (util-linux `setpriv`), as a service
account would, so that a mode-000 file is really unreadable to it even though the tests run as root.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import secrets
import shutil
import signal
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent_env import AgentEnv, wait_until
from tests.helpers.sshd import SshdServer

pytestmark = pytest.mark.timeout(180)

PREFIXES = {"users": "users", "user_events": "userEvents", "delete_users": "deleteUsers",
            "reward_redemptions": "rewardRedemptions"}
SAFE_REMOTE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\.(csv|jsonl)")
DROP_CAPS = "-dac_override,-dac_read_search"


class UnprivilegedEnv(AgentEnv):
    """The agent run as root without the capabilities that let root read any file."""

    def command(self, *args: str) -> list[str]:
        setpriv = shutil.which("setpriv")
        assert setpriv, "util-linux setpriv not found: apt-get install -y util-linux"
        return [setpriv, "--bounding-set", DROP_CAPS, "--inh-caps", DROP_CAPS,
                sys.executable, "-m", "agent", *args]


def remote_files(server: SshdServer) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in server.local_remote_dir.iterdir() if p.is_file()}


def rows_by_name(env: AgentEnv) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in env.status()}


def tag() -> str:
    return secrets.token_hex(4)


def users(*rows: str, header: str = "accountId,id,email") -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode()


def valid_users(label: str) -> bytes:
    t = tag()
    return users(f"acct-{t},{label}-{t},{label}@example.com", f"acct2-{t},{label}2-{t},x{label}@example.com")


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    expect: str  # "failed" | "uploaded"
    needle: str = ""  # must appear in reason.txt (case-insensitive)
    folder: str | None = None
    errors_csv: bool = False  # record-level errors: <name>.errors.csv lists them by record number
    by_name: bool = False  # refused by its name or folder before the content is read: no errors.csv
    prefix: str = "users"  # for uploaded files: the remote name's prefix


def corpus() -> list[Case]:
    ev = "accountId,userId,event.key,event.dateTriggered"
    rr = "accountId,userId,valueToRedeem"
    ok_event = json.dumps({"accountId": f"a-{tag()}", "userId": "u1",
                           "event": {"key": "purchase", "dateTriggered": 1767225600000}})
    return [
        # typing and naming
        Case("customers.csv", valid_users("c"), "failed", "no import type", by_name=True),
        Case("user_list.csv", valid_users("ul"), "failed", "accepted name prefixes", by_name=True),
        Case("usersfile.csv", valid_users("uf"), "failed", "no import type", by_name=True),
        Case("users_list.txt", valid_users("t"), "failed", "extension '.txt'", by_name=True),
        Case("users_noext", valid_users("n"), "failed", "has no extension", by_name=True),
        Case("users_data.csv.gz", b"\x1f\x8b\x08\x00" + os.urandom(64), "failed", "extension '.gz'",
             by_name=True),
        Case("users_conflict.csv", valid_users("cf"), "failed", "will not guess", folder="delete-users",
             by_name=True),
        # whole-file content problems
        Case("users_sheet.csv", b"PK\x03\x04" + os.urandom(200), "failed", "excel"),
        Case("users_empty.csv", b"", "failed", "empty"),
        Case("users_blank.csv", b"\n\n  \n", "failed", "empty"),
        Case("users_header.csv", b"accountId,id,email\n", "failed", "header row but no records"),
        Case("users_binary.csv", b"accountId,id\n" + bytes(range(256)) * 4, "failed", "binary data"),
        Case("users_latin1.csv", b"accountId,id,firstName\nacct-1,1,Jos\xe9\n", "failed", "UTF-8",
             ),
        Case("users_utf16.csv", "accountId,id\nacct-1,1\n".encode("utf-16"), "failed", "UTF-16"),
        Case("users_semicolon.csv", b"accountId;id;email\nacct-1;1;a@example.com\n", "failed", "semicolon",
             ),
        Case("users_noid.csv", users("acct-1,a@example.com", header="accountId,email"), "failed",
             "required column 'id' is missing", ),
        Case("users_dupcol.csv", users("acct-1,1,2", header="accountId,id,id"), "failed", "more than once",
             ),
        Case("users_blankfirst.csv", b"\naccountId,id\nacct-1,1\n", "failed", "first line is blank"),
        # record problems (errors.csv with record numbers)
        Case("users_ragged.csv", users("acct-1,1,a@example.com", "acct-2,2", "acct-3,3,c@x.com,extra"),
             "failed", "record 2", errors_csv=True),
        Case("users_unclosed.csv", b'accountId,id,firstName\nacct-1,1,"Ann\n', "failed", "record 1",
             errors_csv=True),
        Case("users_emptyid.csv", users("acct-1,,a@example.com", "acct-2,2,b@example.com"), "failed",
             "'id' is required and must not be empty", errors_csv=True),
        Case("users_bool.csv", users("acct-1,1,yes", header="accountId,id,referable"), "failed",
             "true or false", errors_csv=True),
        Case("users_locale.csv", users("acct-1,1,en-us", header="accountId,id,locale"), "failed",
             "language_COUNTRY", errors_csv=True),
        Case("users_country.csv", users("acct-1,1,Canada", header="accountId,id,countryCode"), "failed",
             "country code", errors_csv=True),
        Case("userEvents_seconds.csv", users("acct-1,u1,purchase,1767225600", header=ev), "failed",
             "looks like seconds", errors_csv=True),
        Case("userEvents_datestr.csv", users("acct-1,u1,purchase,2026-01-01", header=ev), "failed",
             "milliseconds", errors_csv=True),
        Case("userEvents_nokey.csv", users("acct-1,u1", header="accountId,userId"), "failed",
             "'event.key' is missing", ),
        Case("rewardRedemptions_negative.csv", users("acct-1,u1,-5", header=rr), "failed", "negative",
             errors_csv=True),
        Case("rewardRedemptions_text.csv", users("acct-1,u1,ten dollars", header=rr), "failed",
             "positive number", errors_csv=True),
        Case("rewardRedemptions_zero.csv", users("acct-1,u1,0", header=rr), "failed", "zero",
             errors_csv=True),
        Case("deleteUsers_noid.csv", users("acct-1,", header="accountId,id"), "failed",
             "No users were deleted", errors_csv=True),
        # JSONL
        Case("users_array.jsonl", b'{"accountId": "a", "id": "1"}\n[1, 2]\n', "failed", "record 2",
             errors_csv=True),
        Case("users_trailing.jsonl", b'{"accountId": "a", "id": "1",}\n', "failed", "record 1",
             errors_csv=True),
        Case("users_custom.jsonl", b'{"accountId": "a", "id": "1", "customFields": {"tags": ["x"]}}\n',
             "failed", "single value", errors_csv=True),
        Case("users_csvinside.jsonl", b"accountId,id\nacct-1,1\n", "failed", "record 1", errors_csv=True),
        # an unusual name with bad content: named safely in the reason
        Case("users_bad\nname.csv", users("acct-1,,a@example.com"), "failed", "users_bad?name.csv",
             errors_csv=True),
        # valid, though tricky: these must arrive byte for byte under a safe name
        Case("users_bom.csv", b"\xef\xbb\xbf" + valid_users("bom"), "uploaded"),
        Case("users_crlf.csv", valid_users("crlf").replace(b"\n", b"\r\n"), "uploaded"),
        Case("users_quoted.csv", users(f'acct-{tag()},1,"two\nlines"', f'acct-{tag()},2,"a ""quote"""',
                                       header="accountId,id,firstName"), "uploaded"),
        Case("userEvents_bom.jsonl", b"\xef\xbb\xbf" + ok_event.encode() + b"\n", "uploaded",
             prefix="userEvents"),
        Case("users_spring signups 2026.csv", valid_users("sp"), "uploaded"),
        Case("users_ünïcödé_名前.csv", valid_users("uni"), "uploaded"),
        Case("users_new\nline.csv", valid_users("nl"), "uploaded"),
        Case("users_..%2F..%2Fetc%2Fpasswd.csv", valid_users("dots"), "uploaded"),
        Case("users_..\\..\\boot.csv", valid_users("bs"), "uploaded"),
        Case("USERS-UPPER.CSV", valid_users("up"), "uploaded"),
        Case("april.csv", users(f"acct-{tag()},u1,12.5", header=rr), "uploaded", folder="reward-redemptions",
             prefix="rewardRedemptions"),
        Case("leavers.csv", users(f"acct-{tag()},gone-1", f"acct-{tag()},gone-2", f"acct-{tag()},gone-3",
                                  header="accountId,id"), "uploaded", folder="delete-users",
             prefix="deleteUsers"),
    ]


def write_case(drop: Path, case: Case) -> Path:
    folder = drop / case.folder if case.folder else drop
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / case.name
    path.write_bytes(case.data)
    return path


def check_failed(case: Case, row: dict[str, Any], failed_dir: Path) -> None:
    assert row["state"] == "failed", (case.name, row)
    local = Path(row["local_path"])
    assert local.parent == failed_dir and local.read_bytes() == case.data, case.name  # unchanged
    reason = local.with_name(local.name + ".reason.txt").read_text()
    assert case.needle.lower() in reason.lower(), (case.name, reason)
    assert "nothing was sent" in reason.lower() or "not uploaded" in reason.lower(), reason
    assert "\n" not in reason.rstrip("\n"), reason  # one paragraph, one line
    errors = local.with_name(local.name + ".errors.csv")
    assert errors.exists() != case.by_name, (case.name, errors)
    if errors.exists():
        table = list(csv.DictReader(io.StringIO(errors.read_text())))
        assert table and list(table[0]) == ["recordNumber", "field", "message"], case.name
        numbered = [row for row in table if row["recordNumber"]]
        assert bool(numbered) == case.errors_csv, (case.name, table)


def check_uploaded(case: Case, row: dict[str, Any], server: SshdServer) -> None:
    assert row["state"] == "archived", (case.name, row)
    remote = row["remote_name"]
    assert SAFE_REMOTE.fullmatch(remote) and ".." not in remote, remote
    assert remote.startswith(case.prefix + "_"), (case.name, remote)
    assert (server.local_remote_dir / remote).read_bytes() == case.data, case.name


# --------------------------------------------------------------------------- tests


def test_each_type_arrives_under_a_correct_unique_name(sshd_server: SshdServer, tmp_path: Path) -> None:
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0)
    event = {"accountId": "a1", "userId": "u1",
             "event": {"key": "purchase", "dateTriggered": 1767225600000, "fields": {"revenue": 42.5}}}
    files = {
        "users_spring.csv": users("acct-1,u-1,ana@example.com", "acct-2,u-2,bo@example.com"),
        "userEvents_purchases.jsonl": (json.dumps(event) + "\n").encode(),
        "deleteUsers_leavers.csv": users("acct-9,u-9", header="accountId,id"),
        "rewardRedemptions_april.csv": users("acct-1,u-1,10", "acct-2,u-2,2.5",
                                             header="accountId,userId,valueToRedeem"),
        # typed by its folder, same readable stem and type as the first: must not collide
        "spring.csv": users("acct-3,u-3,cy@example.com"),
    }
    for name, data in files.items():
        env.drop_atomically(name, data, folder="users" if name == "spring.csv" else None)
    result = env.run_once()
    assert result.returncode == 0, result.stderr
    rows = rows_by_name(env)
    arrived = remote_files(sshd_server)
    assert len(arrived) == len(files) == len({row["remote_name"] for row in rows.values()})
    expected_types = {"users_spring.csv": "users", "userEvents_purchases.jsonl": "user_events",
                      "deleteUsers_leavers.csv": "delete_users",
                      "rewardRedemptions_april.csv": "reward_redemptions", "spring.csv": "users"}
    for name, data in files.items():
        row = rows[name]
        prefix = PREFIXES[expected_types[name]]
        assert row["state"] == "archived" and row["import_type"] == expected_types[name]
        remote = row["remote_name"]
        assert SAFE_REMOTE.fullmatch(remote), remote
        assert re.fullmatch(rf"{prefix}_[A-Za-z0-9_-]+_\d{{8}}T\d{{9}}Z_{row['sha256'][:8]}\.\w+", remote)
        assert arrived[remote] == data
    assert re.search(r"permanently delete 1 user$", result.stderr, re.MULTILINE), result.stderr


def test_bad_input_corpus_against_a_running_daemon(sshd_server: SshdServer, tmp_path: Path) -> None:
    env = UnprivilegedEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0.2)
    cases = corpus()
    assert sum(case.expect == "failed" for case in cases) >= 30
    assert len({case.name for case in cases}) == len(cases)
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    secret_token = f"SECRET-{secrets.token_hex(8)}"
    secret_file = secret / "users_payroll.csv"
    secret_file.write_bytes(users(f"{secret_token},1,boss@example.com"))  # valid: a follow would send it

    env.start()
    try:
        drop = env.drop
        assert wait_until(lambda: (drop / "delete-users").is_dir(), 10), env.log()
        # entries that must be left alone, with one warning each
        (drop / "users_secret.csv").symlink_to(secret_file)
        (drop / "users" / "linked.csv").symlink_to(secret_file)
        (drop / "users_dirlink.csv").symlink_to(secret)
        os.mkfifo(drop / "users_pipe.csv")
        (drop / "notafolder").mkdir()
        (drop / "notafolder" / "users_inside.csv").write_bytes(valid_users("inside"))
        (drop / "users" / "nested").mkdir()
        # quietly left alone
        (drop / ".users_hidden.csv").write_bytes(valid_users("hidden"))
        # unreadable to the agent (it runs without DAC override)
        locked = drop / "users_locked.csv"
        locked.write_bytes(valid_users("locked"))
        locked.chmod(0)
        for case in cases:
            write_case(drop, case)

        expected_rows = len(cases) + 1  # + users_locked.csv
        assert wait_until(lambda: _final_rows(env) >= expected_rows, 60), env.log()

        # still working afterwards: a good file dropped now is delivered
        after = valid_users("after")
        env.drop_atomically("users_after.csv", after)
        assert wait_until(lambda: rows_by_name(env).get("users_after.csv", {}).get("state") == "archived",
                          20), env.log()
        assert env.process is not None and env.process.poll() is None
    finally:
        assert env.stop() == 0, env.log()

    log = env.log()
    rows = rows_by_name(env)
    problems = []
    for case in cases:
        try:
            assert case.name in rows, (case.name, sorted(rows))
            if case.expect == "failed":
                check_failed(case, rows[case.name], env.failed)
            else:
                check_uploaded(case, rows[case.name], sshd_server)
        except AssertionError as exc:
            problems.append(f"{case.name!r}: {exc}")
    assert not problems, "\n".join(problems)

    locked_row = rows["users_locked.csv"]
    assert locked_row["state"] == "failed" and "permission denied" in locked_row["error"].lower()
    assert Path(locked_row["local_path"]).parent == env.failed

    for name, what in (("users_secret.csv", "is a symbolic link"), ("linked.csv", "is a symbolic link"),
                       ("users_dirlink.csv", "is a symbolic link"), ("users_pipe.csv", "is a FIFO"),
                       ("notafolder", "is a folder"), ("nested", "is a folder")):
        assert log.count(f"{name} {what}") == 1, (name, log)
    for left in ("users_secret.csv", "users/linked.csv", "users_dirlink.csv", "users_pipe.csv",
                 "notafolder/users_inside.csv", "users/nested", ".users_hidden.csv"):
        assert os.path.lexists(drop / left), left
    assert stat.S_ISFIFO(os.lstat(drop / "users_pipe.csv").st_mode)
    assert secret_file.read_bytes().startswith(b"accountId")  # the secret is untouched
    for name in ("users_secret.csv", "linked.csv", "users_dirlink.csv", "users_pipe.csv",
                 "users_inside.csv", ".users_hidden.csv"):
        assert name not in rows

    arrived = remote_files(sshd_server)
    assert all(secret_token.encode() not in data for data in arrived.values())
    uploaded = [case for case in cases if case.expect == "uploaded"]
    assert len(arrived) == len(uploaded) + 1
    assert not [name for name in os.listdir(sshd_server.local_remote_dir) if name.startswith(".")]

    # the deletion guard: the count is logged before the file is sent
    warn = log.find("'leavers.csv' is a user-deletion file: sending it will permanently delete 3 users")
    sent = log.find("'leavers.csv' uploaded as")
    assert 0 <= warn < sent, log
    assert "Traceback" not in log and "failed; it will be retried" not in log, log


def _final_rows(env: AgentEnv) -> int:
    return sum(row["state"] in ("archived", "failed", "split") for row in env.status())


def test_oversize_file_is_split_into_parts_that_join_to_the_original(sshd_server: SshdServer,
                                                                     tmp_path: Path) -> None:
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0.1,
                            extra="[imports]\nmax_records = 3\nmax_file_bytes = 400\n")
    header = "accountId,id,firstName"
    records = [f'acct-{i},u-{i},"Name {i}"' for i in range(7)] + ['acct-7,u-7,"two\nlines"']
    big_csv = ("\ufeff" + header + "\r\n" + "\r\n".join(records) + "\r\n").encode()
    lines = [json.dumps({"accountId": f"a-{i}", "id": f"j-{i}", "firstName": "x" * 100}) for i in range(5)]
    big_jsonl = ("\n".join(lines) + "\n").encode()
    env.start()
    try:
        env.drop_atomically("users_big.csv", big_csv)
        env.drop_atomically("members.jsonl", big_jsonl, folder="users")
        assert wait_until(lambda: _final_rows(env) >= 2 + 3 + 3, 30), env.log()
    finally:
        assert env.stop(signal.SIGTERM) == 0, env.log()

    rows = env.status()
    by_name = {row["name"]: row for row in rows}
    arrived = remote_files(sshd_server)
    for original, data, n, ext in (("users_big.csv", big_csv, 3, "csv"), ("members.jsonl", big_jsonl, 3,
                                                                          "jsonl")):
        parent = by_name[original]
        assert parent["state"] == "split" and parent["remote_name"] is None
        archived = Path(parent["local_path"])
        assert env.archive in archived.parents and archived.read_bytes() == data
        stem = original.rsplit(".", 1)[0]
        parts = [by_name[f"{stem}_part{k}of{n}.{ext}"] for k in range(1, n + 1)]
        joined: list[Any] = []
        for k, part in enumerate(parts, start=1):
            assert part["state"] == "archived" and part["import_type"] == "users"
            remote = part["remote_name"]
            assert re.fullmatch(rf"users_{stem.removeprefix('users_')}_\d{{8}}T\d{{9}}Z_"
                                rf"{parent['sha256'][:8]}_part{k}of{n}\.{ext}", remote), remote
            body = arrived[remote]
            assert len(body) <= 400
            if ext == "csv":
                table = list(csv.reader(io.StringIO(body.decode(), newline="")))
                assert table[0] == header.split(",") and 1 <= len(table) - 1 <= 3
                joined += table[1:]
            else:
                part_lines = body.decode().splitlines()
                assert 1 <= len(part_lines) <= 3
                joined += part_lines
        if ext == "csv":
            original_rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))[1:]
            assert joined == original_rows
        else:
            assert joined == lines
    assert len(arrived) == 6
    assert len(rows) == 8
    assert not list((env.state / "spool").iterdir())  # no part and no staging folder left behind
