"""A large file is checked in a worker process while its bytes are sent (issue 17), and published
only when the check passed and the bytes checked are the bytes sent. Each end-to-end test ends with
the delivery invariant of test_integrity: every input on the server once under a name of its own,
or kept in failed/ with a reason; no temporary file left; no final name ever held other bytes.
Bytes changed while they are sent and checked: test_integrity's changed-bytes test, "while sending".
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.imports.types import FileFormat, ImportType
from agent.intake.check_process import CheckProcess, CheckProcessError, CheckRequest
from agent.intake.claim import Intake
from agent.intake.watch import DropScanner
from agent.pipeline.upload import Uploader
from agent.store.archive import Filer
from agent.store.journal import FileState, Journal
from tests.helpers.agent_env import AgentEnv, wait_until
from tests.helpers.configs import make_config
from tests.helpers.sshd import SshdServer
from tests.test_integrity import FinalNameWatcher, assert_delivered, sha, users_csv

pytestmark = pytest.mark.timeout(90)

THRESHOLD = 100_000  # upload.check_while_sending_bytes in these tests (the default is 16 MiB)
OVERLAP = f"[upload]\ncheck_while_sending_bytes = {THRESHOLD}\n"
QUEUED_UNCHECKED = "checked in a worker process while it is sent"


def overlap_env(tmp_path: Path, server: SshdServer, extra: str = "") -> AgentEnv:
    return AgentEnv.for_sshd(tmp_path / "agent", server, settle_seconds=0, extra=OVERLAP + extra)


def test_a_large_file_is_checked_while_sent_and_published_once(sshd_server: SshdServer,
                                                                tmp_path: Path) -> None:
    env = overlap_env(tmp_path, sshd_server)
    inputs = {"users_large.csv": users_csv(8_000, "large"), "users_small.csv": users_csv(20, "small")}
    assert len(inputs["users_large.csv"]) > THRESHOLD > len(inputs["users_small.csv"])
    for name, data in inputs.items():
        env.drop_atomically(name, data)
    with FinalNameWatcher(sshd_server.local_remote_dir, inputs) as watcher:
        result = env.run_once()
    log = result.stderr
    assert result.returncode == 0, log
    assert not watcher.bad, watcher.bad
    assert log.count(QUEUED_UNCHECKED) == 1, log  # the large one only; the small one is checked first
    rows = {row["name"]: row for row in env.status()}
    large = rows["users_large.csv"]
    assert large["state"] == "archived" and large["sha256"] == sha(inputs["users_large.csv"])
    assert sha(inputs["users_large.csv"])[:8] in large["remote_name"]  # named from the checked hash
    assert_delivered(env, sshd_server.local_remote_dir, inputs)


def test_a_large_file_failing_its_check_is_never_published(sshd_server: SshdServer, tmp_path: Path) -> None:
    """A record near the end breaks the rules: the bytes went to the temporary name meanwhile, but
    the file is never renamed; it goes to failed/ with the record named, its temporary file removed."""
    env = overlap_env(tmp_path, sshd_server)
    good = users_csv(8_000, "bad")
    bad = good + b",no-account-id,x@example.com\n"  # record 8001: accountId empty
    env.drop_atomically("users_bad.csv", bad)
    with FinalNameWatcher(sshd_server.local_remote_dir, {}) as watcher:
        result = env.run_once()
    assert result.returncode == 1, result.stderr
    assert not watcher.bad, watcher.bad
    assert QUEUED_UNCHECKED in result.stderr
    reason = (env.failed / "users_bad.csv.reason.txt").read_text()
    assert "8001" in reason or "8002" in reason, reason  # the record (or its line) is named
    assert (env.failed / "users_bad.csv.errors.csv").exists()
    assert_delivered(env, sshd_server.local_remote_dir, {}, {"users_bad.csv": bad})


def test_two_large_files_with_the_same_bytes_are_published_once(sshd_server: SshdServer,
                                                                 tmp_path: Path) -> None:
    """Neither has a hash when queued, so the duplicate guard runs when each check concludes, one at
    a time (two upload threads may send them at once): one is published, the other refused."""
    env = overlap_env(tmp_path, sshd_server)
    data = users_csv(8_000, "twice")
    env.drop_atomically("users_monday.csv", data)
    env.drop_atomically("users_monday_copy.csv", data)
    result = env.run_once()
    assert result.returncode == 1, result.stderr
    states = env.states()
    assert sorted(states.values()) == ["archived", "failed"], states
    [refused] = [name for name, state in states.items() if state == "failed"]
    [sent] = [name for name, state in states.items() if state == "archived"]
    assert "same content" in (env.failed / f"{refused}.reason.txt").read_text()
    assert_delivered(env, sshd_server.local_remote_dir, {sent: data}, {refused: data})


def test_a_duplicates_bytes_are_discarded_before_it_is_filed(tmp_path: Path) -> None:
    """What was sent of a duplicate is removed while its row is still `uploading`: a crash between
    the two checks it again; a crash after the filing would have left the bytes on the server."""
    config = make_config(tmp_path, folders=True)
    journal = Journal(config.journal_path)
    intake = Intake(config, journal, Filer(config, journal), DropScanner(config.paths.drop, []), lambda: None)
    data = users_csv(2_000, "same")
    digest = hashlib.sha256(data).hexdigest()
    try:
        first = journal.add_claim("users_first.csv", config.paths.drop / "users_first.csv", config.spool_dir)
        journal.update(first.id, state=FileState.QUEUED, size=len(data), sha256=digest, import_type="users",
                       remote_name="users_first_20261201T120000000Z_00000001.csv")
        record = journal.add_claim("users_again.csv", config.paths.drop / "users_again.csv", config.spool_dir)
        Path(record.local_path).write_bytes(data)
        record = journal.update(record.id, state=FileState.UPLOADING, size=len(data), import_type="users")
        report = intake.begin(record).result(lambda: None)
        seen: list[FileState] = []  # the row's state when the bytes were discarded
        concluded = intake.conclude(record, report, discard=lambda: seen.append(journal.get(record.id).state))
        assert concluded is None
        assert seen == [FileState.UPLOADING]
        assert journal.get(record.id).state == FileState.FAILED
        assert "same content" in (config.paths.failed / "users_again.csv.reason.txt").read_text()
    finally:
        journal.close()


def test_kill_during_a_checked_while_sent_upload_resumes_and_publishes_once(sshd_server: SshdServer,
                                                                              tmp_path: Path) -> None:
    """kill -9 while the file is sent and checked: the next run looks at the server first, checks
    the file again in a worker process, sends only what was not acknowledged, and publishes once."""
    env = overlap_env(tmp_path, sshd_server)
    text = env.config_path.read_text().replace("[paths]", "bandwidth_limit = 300000\n\n[paths]", 1)
    env.config_path.write_text(text)
    data = users_csv(30_000, "killed")  # ~1.3 MB: over 4 s at 300 kB/s
    env.drop_atomically("users_killed.csv", data)
    with FinalNameWatcher(sshd_server.local_remote_dir, {"users_killed.csv": data}) as watcher:
        env.start()
        try:
            assert wait_until(lambda: "resume_point" in _row_fields(env), 30), env.log()
        finally:
            env.kill()
        result = env.run_once()
    assert result.returncode == 0, result.stderr
    assert not watcher.bad, watcher.bad
    assert "resumes at byte" in result.stderr
    assert_delivered(env, sshd_server.local_remote_dir, {"users_killed.csv": data})


def _row_fields(env: AgentEnv) -> str:
    """The journal's row of the only file, as text (a resume point is committed about once a second)."""
    import sqlite3

    db = sqlite3.connect(f"file:{env.state / 'journal.sqlite3'}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute("SELECT resume_point FROM files WHERE resume_point IS NOT NULL").fetchall()
    finally:
        db.close()
    return "resume_point" if rows else ""


def test_check_while_sending_off_checks_every_file_first(sshd_server: SshdServer, tmp_path: Path) -> None:
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0,
                            extra="[upload]\ncheck_while_sending_bytes = 0\n")
    data = users_csv(8_000, "first")
    env.drop_atomically("users_first.csv", data)
    result = env.run_once()
    assert result.returncode == 0, result.stderr
    assert "queued as" in result.stderr and QUEUED_UNCHECKED not in result.stderr
    assert_delivered(env, sshd_server.local_remote_dir, {"users_first.csv": data})


def test_an_uploader_that_cannot_check_while_sending_gives_the_file_back_to_intake(
        make_uploader: Callable[..., Uploader], sshd_server: SshdServer) -> None:
    given_back: list[int] = []
    uploader = make_uploader(on_changed=lambda record: given_back.append(record.id))
    journal, config = uploader.journal, uploader.config
    record = journal.add_claim("users_u.csv", Path("/drop/users_u.csv"), config.spool_dir)
    Path(record.local_path).write_bytes(users_csv(5, "u"))
    record = journal.update(record.id, state=FileState.QUEUED, size=100, import_type="users")
    done = uploader.process(record)
    assert done.state == FileState.CLAIMED and given_back == [record.id]
    assert list(sshd_server.local_remote_dir.iterdir()) == []  # nothing sent


# ------------------------------------------------------------------ the worker process itself

@pytest.mark.unit
def test_the_worker_process_reports_the_check_and_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "users_w.csv"
    data = users_csv(50, "w")
    path.write_bytes(data)
    report = CheckProcess(CheckRequest(str(path), ImportType.USERS, FileFormat.CSV, 10**8, 10**6)).result()
    assert report.ok and report.records == 50 and report.bytes == len(data)
    assert report.sha256 == hashlib.sha256(data).hexdigest()
    worse = CheckProcess(CheckRequest(str(path), ImportType.USERS, FileFormat.CSV, 10**8, 10)).result()
    assert worse.ok and worse.over_limits  # the limits sent are the ones applied


@pytest.mark.unit
def test_the_worker_checks_while_nobody_waits_for_it(tmp_path: Path) -> None:
    """The check runs while the caller sends: it is done before its report is asked for."""
    path = tmp_path / "users_w.csv"
    path.write_bytes(users_csv(50, "w"))
    check = CheckProcess(CheckRequest(str(path), ImportType.USERS, FileFormat.CSV, 10**8, 10**6))
    assert wait_until(lambda: check.finished, 20), "the worker waited for its caller"
    assert check.result().ok


@pytest.mark.unit
def test_the_worker_process_says_why_it_gave_no_report(tmp_path: Path) -> None:
    missing = tmp_path / "gone.csv"
    with pytest.raises(CheckProcessError, match="No such file"):
        CheckProcess(CheckRequest(str(missing), ImportType.USERS, FileFormat.CSV, 10**8, 10**6)).result()


@pytest.mark.unit
def test_a_stop_while_waiting_ends_the_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    silent = tmp_path / "silent-worker"
    silent.write_text("#!/bin/sh\nexec sleep 60\n")  # a worker that never answers
    silent.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(silent))
    check = CheckProcess(CheckRequest(str(tmp_path / "users_w.csv"), ImportType.USERS, FileFormat.CSV,
                                      10**8, 10**6))

    def stop() -> None:
        raise InterruptedError("stopping")

    with pytest.raises(InterruptedError):
        check.result(stop)
    assert wait_until(lambda: _gone(check.pid), 5)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
