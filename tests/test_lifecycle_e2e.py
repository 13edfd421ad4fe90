"""After the upload, end to end: the agent as a real process against OpenSSH's sshd, with a fake
SaaSquatch answering in each status convention; plus `retry`, `history`, `status` filters, `report`."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent_env import AgentEnv, wait_until
from tests.helpers.fake_saasquatch import Consume, FakeSaaSquatch, Step, Write, errors_csv
from tests.helpers.sshd import SshdServer

pytestmark = pytest.mark.timeout(90)

NOTIFY_SCRIPT = """\
import sys
with open(sys.argv[1], "a", encoding="utf-8") as out:
    out.write(sys.stdin.read().strip() + "\\n")
"""


def users_csv(rows: int, tag: str) -> bytes:
    lines = ["accountId,id,email"] + [f"acct-{tag}-{i},{tag}-{i},{tag}{i}@example.com" for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


def make_env(root: Path, server: SshdServer, status: str, *, rescan: float = 30) -> AgentEnv:
    notify_script = root.parent / "notify.py"
    notify_script.write_text(NOTIFY_SCRIPT)
    notify = f"{sys.executable} {notify_script} {root.parent / 'notified.jsonl'}"
    env = AgentEnv.for_sshd(
        root, server,
        extra=f"{status}\n[notify]\ncommand = \"{notify}\"\ntimeout_seconds = 10\n",
    )
    text = env.config_path.read_text().replace("rescan_seconds = 30", f"rescan_seconds = {rescan:g}")
    env.config_path.write_text(text)
    return env


def notified(env: AgentEnv) -> list[dict[str, Any]]:
    path = env.root.parent / "notified.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def row(env: AgentEnv, name: str) -> dict[str, Any]:
    rows = [r for r in env.status() if r["name"] == name]
    assert len(rows) == 1, rows
    return rows[0]


def history(env: AgentEnv, key: str) -> list[dict[str, Any]]:
    result = env.cli("history", key, "--json", "--config", str(env.config_path))
    assert result.returncode == 0, result.stderr
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found


def states_seen(env: AgentEnv, key: str) -> list[str]:
    seen: list[str] = []
    for event in history(env, key)[0]["events"]:
        if not seen or seen[-1] != event["state"]:
            seen.append(event["state"])
    return seen


@pytest.fixture
def running() -> Iterator[list[AgentEnv]]:
    envs: list[AgentEnv] = []
    yield envs
    for env in envs:
        env.kill()


STATUS_FILES = '[status]\nmode = "status-files"\npoll_seconds = 0.3\ntimeout = 60\n'


def text_status_script(name: str) -> Sequence[Step]:
    return [Write("{name}.status", "PROCESSING\n", delay=0.3),
            Write("{name}.status", "COMPLETED: 3 records processed\n", delay=0.8)]


def json_result_script(name: str) -> Sequence[Step]:
    return [Write("receipt_{name}", '{"status": "RECEIVED"}', delay=0.2),
            Write("result_{name}", json.dumps({"status": "COMPLETED", "stats": {"recordsProcessed": 3}}),
                  delay=0.8)]


def consume_script(name: str) -> Sequence[Step]:
    return [Consume(delay=0.5)]


CONVENTIONS = {
    "text-status": (STATUS_FILES, text_status_script,
                    ["uploaded", "processing", "completed", "archived"], ["{name}.status"]),
    "json-result": ('[status]\nmode = ["consumed", "status-files"]\npoll_seconds = 0.3\ntimeout = 60\n'
                    'remote_results = "remove"\n', json_result_script,
                    ["uploaded", "accepted", "completed", "archived"], ["receipt_{name}", "result_{name}"]),
    "consumed": ('[status]\nmode = "consumed"\npoll_seconds = 0.3\ntimeout = 60\n', consume_script,
                 ["uploaded", "accepted", "completed", "archived"], []),
}


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_success_in_each_convention(convention: str, sshd_server: SshdServer, tmp_path: Path,
                                    running: list[AgentEnv]) -> None:
    status, script, expected_states, server_files = CONVENTIONS[convention]
    env = make_env(tmp_path / "agent", sshd_server, status)
    with FakeSaaSquatch(sshd_server.local_remote_dir, script) as fake:
        running.append(env)
        env.start()
        env.drop_atomically("users_ok.csv", users_csv(3, "ok"))
        assert wait_until(lambda: env.states().get("users_ok.csv") == "archived", 30), env.log()
        env.stop()
    record = row(env, "users_ok.csv")
    assert record["error"] is None
    assert states_seen(env, "users_ok.csv")[-4:] == expected_states
    archived = env.archived_files()
    names = sorted(p.name for p in archived)
    remote = record["remote_name"]
    copies = [f"users_ok.csv.server.{pattern.format(name=remote)}" for pattern in server_files]
    expected = sorted(["users_ok.csv", *copies])
    assert names == expected, names
    assert (archived[0].parent / "users_ok.csv").read_bytes() == users_csv(3, "ok")
    if convention == "json-result":  # remote_results = "remove": the server's files are gone there
        assert not any(p.name.endswith(remote) and p.name != remote
                       for p in sshd_server.local_remote_dir.iterdir()), fake.written
    if convention == "text-status":
        status_copy = archived[0].parent / f"users_ok.csv.server.{remote}.status"
        assert status_copy.read_text().startswith("COMPLETED")
    assert notified(env) == []


def journal_state(env: AgentEnv, remote_name: str) -> str | None:
    """The state the agent's journal holds for an upload (read-only, from the test process)."""
    path = env.state / "journal.sqlite3"
    if not path.exists():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        db.execute("PRAGMA busy_timeout=5000")
        found = db.execute("SELECT state FROM files WHERE remote_name = ?", (remote_name,)).fetchone()
    finally:
        db.close()
    return str(found[0]) if found else None


def failing_script(env: AgentEnv) -> Callable[[str], Sequence[Step]]:
    """PROCESSING, then (only once the agent has seen it: no poll can skip a state) the errors file."""
    def script(name: str) -> Sequence[Step]:
        return [Write("{name}.status", "PROCESSING\n", delay=0.2),
                Write("{stem}.errors.csv", errors_csv((2, "This request requires a valid non-empty id",
                                                        "BAD_REQUEST", 400)), delay=0.3,
                      when=lambda upload: journal_state(env, upload) == "processing")]
    return script


def test_failure_with_errors_csv(sshd_server: SshdServer, tmp_path: Path, running: list[AgentEnv]) -> None:
    env = make_env(tmp_path / "agent", sshd_server, STATUS_FILES)
    with FakeSaaSquatch(sshd_server.local_remote_dir, failing_script(env)):
        running.append(env)
        env.start()
        env.drop_atomically("users_bad.csv", users_csv(3, "bad"))
        assert wait_until(lambda: env.states().get("users_bad.csv") == "failed", 30), env.log()
        assert wait_until(lambda: len(notified(env)) == 1, 15), env.log()
        env.stop()
    record = row(env, "users_bad.csv")
    assert "record 2: This request requires a valid non-empty id (BAD_REQUEST, 400)" in record["error"]
    assert states_seen(env, "users_bad.csv")[-3:] == ["uploaded", "processing", "failed"]
    failed = env.failed
    assert (failed / "users_bad.csv").read_bytes() == users_csv(3, "bad")
    assert "valid non-empty id" in (failed / "users_bad.csv.reason.txt").read_text()
    assert (failed / "users_bad.csv.errors.csv").read_text().startswith("recordNumber,message")
    stem = record["remote_name"].rsplit(".", 1)[0]
    assert (failed / f"users_bad.csv.server.{stem}.errors.csv").exists()
    event = notified(env)[0]
    assert event["event"] == "failed" and event["name"] == "users_bad.csv" and event["state"] == "failed"
    assert env.archived_files() == []


def test_stale_when_the_server_says_nothing(sshd_server: SshdServer, tmp_path: Path,
                                            running: list[AgentEnv]) -> None:
    status = '[status]\nmode = ["consumed", "status-files"]\npoll_seconds = 0.3\ntimeout = 1.5\n'
    env = make_env(tmp_path / "agent", sshd_server, status)
    running.append(env)
    env.start()
    env.drop_atomically("users_silent.csv", users_csv(2, "s"))
    assert wait_until(lambda: env.states().get("users_silent.csv") == "stale", 30), (env.status(), env.log())
    assert wait_until(lambda: len(notified(env)) == 1, 15), env.log()
    env.stop()
    record = row(env, "users_silent.csv")
    assert "no final word from the server" in record["error"]
    assert states_seen(env, "users_silent.csv")[-2:] == ["uploaded", "stale"]
    assert (env.failed / "users_silent.csv").exists()
    assert "retry" in (env.failed / "users_silent.csv.reason.txt").read_text()
    assert notified(env)[0]["event"] == "stale"
    assert (sshd_server.local_remote_dir / record["remote_name"]).exists()  # never touched remotely


def test_retry_history_and_status_filters(sshd_server: SshdServer, tmp_path: Path,
                                          running: list[AgentEnv]) -> None:
    """A remote failure, retried while the daemon runs, goes again under a new name and completes."""
    answered: list[str] = []

    def fail_first(name: str) -> Sequence[Step]:
        """The first upload of users_again fails (whatever order the upload threads take)."""
        again = name.startswith("users_again")
        first_again = again and not any(n.startswith("users_again") for n in answered)
        answered.append(name)
        if first_again:
            return [Write("{stem}.errors.csv", errors_csv((1, "bad locale", "BAD_REQUEST", 400)), delay=0.2)]
        return [Write("{name}.status", "SUCCESS\n", delay=0.2)]

    env = make_env(tmp_path / "agent", sshd_server, STATUS_FILES, rescan=1)
    with FakeSaaSquatch(sshd_server.local_remote_dir, fail_first) as fake:
        running.append(env)
        env.start()
        env.drop_atomically("users_again.csv", users_csv(2, "a"))
        env.drop_atomically("users_fine.csv", users_csv(2, "f"))
        assert wait_until(lambda: env.states().get("users_again.csv") == "failed"
                          and env.states().get("users_fine.csv") == "archived", 30), (env.status(), env.log())
        first = row(env, "users_again.csv")
        cfg = str(env.config_path)

        filtered = env.cli("status", "--state", "failed", "--json", "--config", str(env.config_path))
        assert [r["name"] for r in json.loads(filtered.stdout)] == ["users_again.csv"]
        table = env.cli("status", "--state", "failed", "--state", "archived", "--config", cfg)
        assert table.returncode == 0 and "users_again.csv" in table.stdout
        assert "users_fine.csv" in table.stdout
        assert "bad locale" in table.stdout and "AGE" in table.stdout.splitlines()[0]
        old = env.cli("status", "--older-than", "1h", "--json", "--config", str(env.config_path))
        assert json.loads(old.stdout) == []
        recent = env.cli("status", "--since", "1h", "--json", "--config", str(env.config_path))
        assert {r["name"] for r in json.loads(recent.stdout)} == {"users_again.csv", "users_fine.csv"}
        bad = env.cli("status", "--older-than", "soon", "--config", str(env.config_path))
        assert bad.returncode == 2 and "not a duration" in bad.stderr

        refused = env.cli("retry", "users_fine.csv", "--config", str(env.config_path))
        assert refused.returncode == 1 and "only failed or stale" in refused.stderr
        result = env.cli("retry", str(first["id"]), "--config", str(env.config_path))
        assert result.returncode == 0, result.stderr
        assert wait_until(lambda: env.states().get("users_again.csv") == "archived", 30), env.log()
        env.stop()
        assert len(fake.seen) == 3  # fine, again (1st), again (2nd)
    second = row(env, "users_again.csv")
    assert second["remote_name"] != first["remote_name"] and second["error"] is None
    assert states_seen(env, "users_again.csv")[-7:] == ["failed", "queued", "uploading", "publishing",
                                                         "uploaded", "completed", "archived"]
    messages = [e["message"] or "" for e in history(env, "users_again.csv")[0]["events"]]
    assert any("retry requested by the operator" in m for m in messages)
    text = env.cli("history", "users_again.csv", "--config", str(env.config_path))
    assert text.returncode == 0 and "retry requested" in text.stdout and "bad locale" in text.stdout
    missing = env.cli("history", "nope.csv", "--config", str(env.config_path))
    assert missing.returncode == 1
    report = env.cli("report", "--json", "--config", str(env.config_path))
    assert report.returncode == 0, report.stderr
    (day,) = json.loads(report.stdout)
    assert day["import_type"] == "users" and day["total"] == 2 and day["archived"] == 2


def test_retry_forces_a_duplicate_through(sshd_server: SshdServer, tmp_path: Path,
                                          running: list[AgentEnv]) -> None:
    """With status.mode = "none" (the default): the same content twice is refused; retry sends it."""
    env = make_env(tmp_path / "agent", sshd_server, "", rescan=1)
    running.append(env)
    env.start()
    env.drop_atomically("users_one.csv", users_csv(2, "d"))
    assert wait_until(lambda: env.states().get("users_one.csv") == "archived", 30), env.log()
    env.drop_atomically("users_two.csv", users_csv(2, "d"))
    assert wait_until(lambda: env.states().get("users_two.csv") == "failed", 30), (env.status(), env.log())
    result = env.cli("retry", "users_two.csv", "--config", str(env.config_path))
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: env.states().get("users_two.csv") == "archived", 30), (env.status(), env.log())
    env.stop()
    remote = {p.name for p in sshd_server.local_remote_dir.iterdir()}
    assert row(env, "users_two.csv")["remote_name"] in remote
    assert row(env, "users_one.csv")["remote_name"] in remote


def test_status_is_followed_across_a_restart(sshd_server: SshdServer, tmp_path: Path,
                                             running: list[AgentEnv]) -> None:
    """Stopped while the server is still processing: after the restart the verdict is picked up."""

    def slow(name: str) -> Sequence[Step]:
        return [Write("{name}.status", "RUNNING\n", delay=0.2), Write("{name}.status", "DONE\n", delay=2.0)]

    env = make_env(tmp_path / "agent", sshd_server, STATUS_FILES)
    with FakeSaaSquatch(sshd_server.local_remote_dir, slow) as fake:
        running.append(env)
        env.start()
        env.drop_atomically("users_slow.csv", users_csv(2, "r"))
        assert wait_until(lambda: env.states().get("users_slow.csv") == "processing", 30), env.log()
        assert env.stop() == 0
        assert env.states()["users_slow.csv"] == "processing"
        assert wait_until(lambda: fake.idle, 10)  # the server finished while the agent was down
        env.start()
        assert wait_until(lambda: env.states().get("users_slow.csv") == "archived", 30), env.log()
        env.stop()
    assert "resumes in state processing" in env.log()
    assert states_seen(env, "users_slow.csv")[-3:] == ["processing", "completed", "archived"]
