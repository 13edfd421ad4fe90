"""The API route end to end: the agent as a process against the HTTPS sandbox of SaaSquatch's import
API (test CA made at run time). Each test ends with the invariant: every file got at most one import
job and ended archived (its job COMPLETED) or in failed/ with a reason beside it."""

from __future__ import annotations

import base64
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.ops.api_sandbox import ApiSandbox, Hold, Verdict
from agent.ops.metrics import JournalCollector
from agent.store.journal import Journal
from tests.helpers.agent_env import wait_until
from tests.helpers.api_env import API_KEY, TENANT, ApiAgentEnv, assert_at_most_one_job, sha256, write_key

USERS = b"accountId,id,email\nacct-1,user-1,a@example.com\nacct-2,user-2,b@example.com\n"
EVENTS = (b'{"accountId": "acct-1", "userId": "user-1", "event": {"key": "purchase",'
          b' "dateTriggered": 1767225600000}}\n')


def judge(name: str, data: bytes, job_type: str) -> Verdict:
    if "refused" in name:
        return Verdict(errors=[{"recordNumber": 2, "message": "This request requires a valid non-empty id",
                                "apiErrorCode": "BAD_REQUEST", "statusCode": 400}])
    if "doomed" in name:
        return Verdict(final_status="FAILED", polls_before_final=1)
    if "slow" in name:
        return Verdict(polls_before_final=4)
    if "odd" in name:
        return Verdict(final_status="PARTIALLY_IMPORTED", polls_before_final=0)
    return Verdict()


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[ApiSandbox]:
    server = ApiSandbox(tmp_path / "sandbox", TENANT, "sandbox-key-0123456789abcdef", judge)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def env(tmp_path: Path, sandbox: ApiSandbox) -> Iterator[ApiAgentEnv]:
    agent = ApiAgentEnv(tmp_path / "agent", sandbox)
    try:
        yield agent
    finally:
        agent.kill()


def drop_all(env: ApiAgentEnv, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        env.drop_atomically(name, data)


def final(env: ApiAgentEnv, names: int) -> bool:
    rows = env.status()
    return len(rows) == names and all(row["state"] in ("archived", "failed", "stale") for row in rows)


@pytest.mark.timeout(120)
def test_outcomes_refused_validation_failed_job_and_completed(env: ApiAgentEnv, sandbox: ApiSandbox) -> None:
    files = {"users_good.csv": USERS, "userEvents_good.jsonl": EVENTS,
             "users_refused.csv": USERS.replace(b"user-2", b"user-9"),
             "users_doomed.csv": USERS.replace(b"user-1", b"user-7")}
    drop_all(env, files)
    result = env.run_once(timeout=90)
    assert result.returncode == 1, result.stderr  # two files did not end archived
    rows = assert_at_most_one_job(env, files)

    good = rows["users_good.csv"]
    assert good["state"] == "archived" and good["records_processed"] == 2
    assert rows["userEvents_good.jsonl"]["records_processed"] == 1
    assert good["file_ref"].startswith(f"imports/{TENANT}/users_good_")
    job = sandbox.jobs[good["job_id"]]
    assert job.type == "MUTATION/USER" and job.sha256 == sha256(USERS)
    assert sandbox.jobs[rows["userEvents_good.jsonl"]["job_id"]].type == "MUTATION/USER_EVENT"

    refused = rows["users_refused.csv"]
    assert refused["state"] == "failed" and refused["job_id"] is None
    assert "when validating it" in refused["error"] and "valid non-empty id" in refused["error"]
    local = Path(refused["local_path"])
    errors = local.with_name(local.name + ".errors.csv").read_text()
    assert errors.splitlines() == ["recordNumber,message,apiErrorCode,statusCode",
                                   "2,This request requires a valid non-empty id,BAD_REQUEST,400"]
    assert sandbox.jobs_by_content()[sha256(files["users_refused.csv"])] == 0

    doomed = rows["users_doomed.csv"]
    assert doomed["state"] == "failed" and doomed["job_id"] in sandbox.jobs
    assert f"import job {doomed['job_id']}" in doomed["error"] and "ended FAILED" in doomed["error"]

    # recordsProcessed in history, report (and status --json above)
    history = env.cli("history", "users_good.csv", "--config", str(env.config_path))
    assert "2 record(s) processed" in history.stdout, history.stdout
    report = env.cli("report", "--json", "--config", str(env.config_path))
    days = json.loads(report.stdout)
    assert sum(day["records_processed"] for day in days) == 3, days
    table = env.cli("status", "--config", str(env.config_path))
    assert "2 records imported" in table.stdout, table.stdout
    collector = JournalCollector(env.state / "journal.sqlite3")
    try:
        samples = {(sample.name, sample.labels.get("import_type")): sample.value
                   for metric in collector.collect() for sample in metric.samples}
    finally:
        collector.close()
    assert samples[("saasquatch_agent_records_processed_total", "users")] == 2
    assert samples[("saasquatch_agent_records_processed_total", "user_events")] == 1


@pytest.mark.timeout(120)
def test_429_5xx_and_answers_lost_before_the_work_are_retried(env: ApiAgentEnv, sandbox: ApiSandbox) -> None:
    files = {"users_a.csv": USERS, "users_b.csv": USERS.replace(b"acct-2", b"acct-3"),
             "users_slow.csv": USERS.replace(b"acct-1", b"acct-4")}
    sandbox.fail_next("upload", 429, 500)
    sandbox.fail_next("upload", 502, after_work=True)  # stored, answer lost: uploaded again (no job yet)
    sandbox.fail_next("validate", 503, 500)
    sandbox.fail_next("createJob", 429, 503)  # refused before any work: createJob is sent again
    sandbox.fail_next("job", 500, 429, 504)
    drop_all(env, files)
    result = env.run_once(timeout=90)
    assert result.returncode == 0, result.stderr
    rows = assert_at_most_one_job(env, files)
    assert all(row["state"] == "archived" for row in rows.values())
    assert len(sandbox.uploads) == 4  # one stored upload lost its answer; it was sent again
    assert sum(sandbox.jobs_by_content().values()) == 3
    assert "HTTP 429" in result.stderr and "HTTP 503" in result.stderr and "retrying in" in result.stderr
    events = env.cli("history", "--json", "users_slow.csv", "--config", str(env.config_path)).stdout
    assert "import job" in events


@pytest.mark.timeout(120)
def test_create_job_answer_lost_after_the_job_was_made_waits_for_the_operator(
        env: ApiAgentEnv, sandbox: ApiSandbox) -> None:
    files = {"users_once.csv": USERS}
    sandbox.fail_next("createJob", 500, after_work=True)  # the job exists; the agent cannot know it
    drop_all(env, files)
    result = env.run_once(timeout=90)
    assert result.returncode == 1
    rows = assert_at_most_one_job(env, files)
    row = rows["users_once.csv"]
    assert row["state"] == "stale" and row["job_id"] is None
    assert "may or may not have an import job" in row["error"] and "saasquatch-agent retry" in row["error"]
    assert sandbox.counts["createJob"] == 1  # never a second createJob
    assert sum(sandbox.jobs_by_content().values()) == 1


@pytest.mark.timeout(120)
def test_an_unknown_job_word_is_kept_and_shown_never_guessed(env: ApiAgentEnv, sandbox: ApiSandbox) -> None:
    env.write_config("[status]\ntimeout = 2\n")  # the wait for a final word, shortened for the test
    files = {"users_odd.csv": USERS}
    drop_all(env, files)
    result = env.run_once(timeout=90)
    assert result.returncode == 1
    rows = assert_at_most_one_job(env, files)
    row = rows["users_odd.csv"]
    assert row["state"] == "stale" and "no final word from SaaSquatch on import job" in row["error"]
    history = env.cli("history", "users_odd.csv", "--config", str(env.config_path)).stdout
    assert "unrecognised job status 'PARTIALLY_IMPORTED'" in history, history
    assert sandbox.jobs[row["job_id"]].polls >= 2  # asked again, not acted on


@pytest.mark.timeout(120)
def test_refused_key_keeps_the_file_queued_until_the_key_is_fixed(env: ApiAgentEnv,
                                                                   sandbox: ApiSandbox) -> None:
    env.write_config('[log]\nlevel = "DEBUG"\n')  # not even DEBUG lines show the key
    write_key(env.key_path, "not-the-key")
    files = {"users_k.csv": USERS}
    drop_all(env, files)
    result = env.run_once(timeout=90)
    assert result.returncode == 1
    [row] = env.status()
    assert row["state"] == "queued", row
    assert "the API key was refused (HTTP 401)" in row["error"]
    assert " DEBUG " in result.stderr  # the DEBUG lines are there
    for secret in ("not-the-key", base64.b64encode(b":not-the-key").decode()):
        assert secret not in result.stderr
    assert sandbox.counts["unauthorized"] >= 1 and not sandbox.uploads and not sandbox.jobs

    write_key(env.key_path)  # fixed
    result = env.run_once(timeout=90)
    assert result.returncode == 0, result.stderr
    for secret in (API_KEY, base64.b64encode(f":{API_KEY}".encode()).decode()):
        assert secret not in result.stderr
    rows = assert_at_most_one_job(env, files)
    assert rows["users_k.csv"]["state"] == "archived"


@pytest.mark.timeout(60)
def test_a_key_file_readable_by_others_is_refused_at_start(env: ApiAgentEnv, sandbox: ApiSandbox) -> None:
    env.key_path.chmod(0o644)
    env.drop_atomically("users_m.csv", USERS)
    result = env.run_once(timeout=50)
    assert result.returncode == 1
    assert "readable by group or others" in result.stderr and "chmod 600" in result.stderr
    assert not sandbox.uploads


# ---------------------------------------------------------------------- kill -9 of the agent process

def crash_at(env: ApiAgentEnv, hold: Hold, files: dict[str, bytes]) -> None:
    """Start the daemon, wait until it is inside the held request, kill -9 it, then let the sandbox
    finish that request (its answer goes nowhere)."""
    env.start()
    drop_all(env, files)
    assert hold.reached.wait(30), env.log()
    env.stop(signal.SIGKILL, timeout=10)
    hold.release.set()


def restart_until_final(env: ApiAgentEnv, count: int) -> None:
    offset = len(env.log())
    env.start()
    try:
        assert wait_until(lambda: final(env, count), 60, interval=0.2), env.log()[offset:]
    finally:
        env.stop()


@pytest.mark.timeout(120)
def test_crash_after_the_upload_before_its_answer(env: ApiAgentEnv, sandbox: ApiSandbox) -> None:
    files = {"users_c1.csv": USERS}
    crash_at(env, sandbox.hold("upload", after_work=True), files)
    assert [row["state"] for row in env.status()] == ["uploading"]
    restart_until_final(env, 1)
    rows = assert_at_most_one_job(env, files)
    assert rows["users_c1.csv"]["state"] == "archived"
    assert len(sandbox.uploads) == 2  # the first upload's answer was lost; it imports nothing


@pytest.mark.timeout(120)
def test_crash_after_the_file_ref_was_recorded(env: ApiAgentEnv, sandbox: ApiSandbox) -> None:
    files = {"users_c2.csv": USERS}
    crash_at(env, sandbox.hold("validate"), files)
    [row] = env.status()
    assert row["state"] == "uploaded" and row["file_ref"]
    restart_until_final(env, 1)
    rows = assert_at_most_one_job(env, files)
    assert rows["users_c2.csv"]["state"] == "archived"
    assert rows["users_c2.csv"]["file_ref"] == row["file_ref"]  # validated again, not uploaded again
    assert len(sandbox.uploads) == 1


@pytest.mark.timeout(120)
def test_crash_after_validation_waits_for_the_operator_then_retry_delivers(
        env: ApiAgentEnv, sandbox: ApiSandbox) -> None:
    files = {"users_c3.csv": USERS}
    hold = sandbox.hold("createJob")  # held before the job is made, and never made
    hold.abandon = True
    crash_at(env, hold, files)
    assert [row["state"] for row in env.status()] == ["starting"]
    restart_until_final(env, 1)
    rows = assert_at_most_one_job(env, files)
    row = rows["users_c3.csv"]
    assert row["state"] == "stale" and "after asking SaaSquatch to start the import job" in row["error"]
    assert not sandbox.jobs and sandbox.counts["createJob"] == 1  # the agent never asked again by itself

    # the operator looked: no job. `retry` sends it again and starts exactly one.
    retried = env.cli("retry", row["name"], "--config", str(env.config_path))
    assert retried.returncode == 0, retried.stderr
    result = env.run_once(timeout=90)
    assert result.returncode == 0, result.stderr
    rows = assert_at_most_one_job(env, files)
    assert rows["users_c3.csv"]["state"] == "archived"
    assert len(sandbox.jobs) == 1


@pytest.mark.timeout(120)
def test_crash_after_create_job_before_its_id_was_recorded(env: ApiAgentEnv, sandbox: ApiSandbox) -> None:
    files = {"users_c4.csv": USERS}
    crash_at(env, sandbox.hold("createJob", after_work=True), files)  # the job exists now
    restart_until_final(env, 1)
    rows = assert_at_most_one_job(env, files)
    assert rows["users_c4.csv"]["state"] == "stale"
    assert len(sandbox.jobs) == 1 and sandbox.counts["createJob"] == 1


@pytest.mark.timeout(120)
def test_restart_mid_poll_follows_the_recorded_job(env: ApiAgentEnv, sandbox: ApiSandbox) -> None:
    files = {"users_slow_c5.csv": USERS, "users_c5.csv": USERS.replace(b"acct-2", b"acct-5")}
    hold = sandbox.hold("job", after_work=True)
    crash_at(env, hold, files)
    polling = [row for row in env.status() if row["state"] == "processing"]
    assert polling and all(row["job_id"] in sandbox.jobs for row in polling)
    restart_until_final(env, 2)
    rows = assert_at_most_one_job(env, files)
    assert all(row["state"] == "archived" for row in rows.values())
    assert len(sandbox.jobs) == 2 and sandbox.counts["createJob"] == 2
    for row in polling:
        assert rows[row["name"]]["job_id"] == row["job_id"]  # the same job, polled after the restart


@pytest.mark.timeout(120)
def test_rows_restored_from_a_backup_wait_for_the_operator(env: ApiAgentEnv, sandbox: ApiSandbox) -> None:
    """`journal rebuild` restores a backup that may be older than the truth: a row without a job id
    there may have got one since, so it is never sent on without the operator."""
    files = {"users_r.csv": USERS}
    crash_at(env, sandbox.hold("validate"), files)
    journal = Journal(env.state / "journal.sqlite3")
    try:
        journal.backup(env.state / "journal.backup.sqlite3")
    finally:
        journal.close()
    rebuilt = env.cli("journal", "rebuild", "--config", str(env.config_path))
    assert rebuilt.returncode == 0, rebuilt.stderr
    restart_until_final(env, 1)
    rows = assert_at_most_one_job(env, files)
    row = rows["users_r.csv"]
    assert row["state"] == "stale" and "lost this file's history" in row["error"]
    assert not sandbox.jobs

    assert env.cli("retry", "users_r.csv", "--config", str(env.config_path)).returncode == 0
    assert env.run_once(timeout=90).returncode == 0
    rows = assert_at_most_one_job(env, files)
    assert rows["users_r.csv"]["state"] == "archived" and len(sandbox.jobs) == 1
