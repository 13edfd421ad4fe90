"""Integrity end to end: the server gets exactly the checked bytes, from a finished file, once, under a
name no other file has. Each test ends with the same invariant (`assert_delivered`): every input's
bytes are on the server exactly once under a unique final name, or kept locally with a reason; no
temporary file is left; no row claims a delivery the server does not hold.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from agent.ops.sandbox import SandboxServer
from tests.helpers.agent_env import AgentEnv, sandbox_env, wait_until
from tests.helpers.sshd import SshdServer

pytestmark = pytest.mark.timeout(90)


def users_csv(rows: int, tag: str) -> bytes:
    lines = ["accountId,id,email"] + [f"acct-{tag}-{i},{tag}-{i},{tag}.{i}@example.com" for i in range(rows)]
    return ("\n".join(lines) + "\n").encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_delivered(env: AgentEnv, remote: Path, sent: dict[str, bytes],
                     kept: dict[str, bytes] | None = None) -> None:
    """`sent` inputs are on the server exactly once each, byte for byte, under unique final names
    that their rows hold; `kept` inputs are in failed/ with a reason and not on the server; nothing
    else is on the server (no temporary file)."""
    kept = kept or {}
    on_server = {path.name: path.read_bytes() for path in remote.iterdir() if path.is_file()}
    hidden = [name for name in on_server if name.startswith(".") or name.endswith(".part")]
    assert not hidden, f"temporary files left on the server: {hidden}"
    digests = sorted(sha(data) for data in on_server.values())
    assert digests == sorted(sha(data) for data in sent.values()), "server holds other bytes than the inputs"
    rows = env.status()
    names = [row["remote_name"] for row in rows if row["remote_name"]]
    assert len(names) == len(set(names)), f"two rows share a remote name: {names}"
    for row in rows:
        if row["state"] == "archived":
            assert row["remote_name"] in on_server, f"{row['name']} archived but not on the server"
            assert sha(on_server[row["remote_name"]]) == row["sha256"], f"{row['name']}: other bytes"
    for name, data in kept.items():
        assert (env.failed / name).read_bytes() == data
        assert (env.failed / f"{name}.reason.txt").exists()  # and not sent: `digests` is exactly `sent`


class FinalNameWatcher:
    """Looks at the server's final names while the agent runs: none may ever hold bytes other than an
    input's (a hole, a half file, changed bytes)."""

    def __init__(self, remote: Path, inputs: dict[str, bytes]) -> None:
        self.remote, self.allowed = remote, {sha(data) for data in inputs.values()}
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FinalNameWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.wait(0.02) and time.monotonic() < deadline:
            for path in self.remote.iterdir():
                if path.name.startswith("."):
                    continue
                try:
                    data = path.read_bytes()
                except OSError:
                    continue  # taken away meanwhile
                if sha(data) not in self.allowed:
                    self.bad.append(f"{path.name}: {len(data)} bytes, not an input's")


def test_refused_writes_mid_file_never_publish_other_bytes(sandbox: tuple[SandboxServer, Path],
                                                           tmp_path: Path) -> None:
    """A server that refuses random WRITEs mid-file (and writes nothing for them): every final name
    holds an input's exact bytes at every moment; the files get through once the refusals stop."""
    server, key = sandbox
    env = sandbox_env(tmp_path, server, key)
    inputs = {f"users_holes{i}.csv": users_csv(30_000 + 5_000 * i, f"holes{i}") for i in range(3)}
    inputs["users_small.csv"] = users_csv(20, "small")
    server.faults.seed(7)
    server.faults.refuse_write_chance = 0.2
    remote = tmp_path / "sftp-root" / "imports"
    for name, data in inputs.items():
        env.drop_atomically(name, data)
    with FinalNameWatcher(remote, inputs) as watcher:
        env.start()
        try:
            assert wait_until(lambda: server.faults.counts["refused_write"] >= 3, 30), env.log()
            server.faults.refuse_write_chance = 0.0
            assert wait_until(lambda: len(env.archived_files()) == len(inputs), 60), env.log()
        finally:
            env.stop()
    assert not watcher.bad, watcher.bad
    assert "refused to write at offset" in env.log()
    assert_delivered(env, remote, inputs)


@pytest.mark.parametrize("checked", ["before sending", "while sending"])
def test_bytes_changed_after_the_check_are_never_published(checked: str, sshd_server: SshdServer,
                                                           tmp_path: Path) -> None:
    """The claimed copy is rewritten in place (same size, now invalid) while it is being sent, as a
    writer that still holds it open would: nothing of it is published, the log says why, and once
    stable it is checked again (before sending, this time) and refused for what it now holds. The
    file was checked before its first byte, or is being checked by a worker process meanwhile
    (upload.check_while_sending_bytes below its size)."""
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0.3)
    env.write_config("[upload]\ncheck_while_sending_bytes = 100000\n" if checked == "while sending" else "",
                     settle_seconds=0.3)
    text = env.config_path.read_text().replace("[paths]", "bandwidth_limit = 100000\n\n[paths]", 1)
    env.config_path.write_text(text)
    data = users_csv(8_000, "changing")  # ~330 KB: over 3 s at 100 kB/s
    env.drop_atomically("users_changing.csv", data)
    remote = sshd_server.local_remote_dir
    with FinalNameWatcher(remote, {"users_changing.csv": data}) as watcher:
        env.start()
        try:
            assert wait_until(lambda: env.states().get("users_changing.csv") == "uploading", 20), env.log()
            [spool] = [p for p in (env.state / "spool").iterdir() if p.is_file()]
            changed = data.replace(b"accountId,id,email", b"accountXX,id,email")  # same size, invalid
            with open(spool, "r+b") as handle:  # the same inode, as an open writer would
                handle.write(changed)
            assert wait_until(lambda: env.states().get("users_changing.csv") == "failed", 30), env.log()
        finally:
            env.stop()
    assert not watcher.bad, watcher.bad
    assert "changed after it was taken" in env.log()
    assert ("checked in a worker process while it is sent" in env.log()) == (checked == "while sending")
    assert "is its disk full" not in env.log()
    reason = (env.failed / "users_changing.csv.reason.txt").read_text()
    assert "accountId" in reason  # refused for what it now holds
    assert (env.failed / "users_changing.csv").read_bytes() == changed
    assert [p.name for p in remote.iterdir()] == []  # not published, no temporary file left


def test_a_hard_linked_file_is_refused_with_the_reason(sshd_server: SshdServer, tmp_path: Path) -> None:
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0)
    data = users_csv(5, "linked")
    elsewhere = tmp_path / "users_linked.csv"
    elsewhere.write_bytes(data)
    env.drop.mkdir(parents=True, exist_ok=True)
    os.link(elsewhere, env.drop / "users_linked.csv")
    result = env.run_once()
    assert result.returncode == 1, env.log()
    reason = (env.failed / "users_linked.csv.reason.txt").read_text()
    assert "2 hard links" in reason and "cp" in reason
    assert elsewhere.read_bytes() == data  # the operator's other name is untouched
    assert_delivered(env, sshd_server.local_remote_dir, {}, {"users_linked.csv": data})


def test_a_writer_that_pauses_longer_than_settle_is_taken_after_it_closes(sshd_server: SshdServer,
                                                                          tmp_path: Path) -> None:
    """One record, a pause of 3 s (settle is 1 s), five more through the same open file: the server
    gets all six records, once."""
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=1.0)
    env.write_config(settle_seconds=1.0)
    env.drop.mkdir(parents=True, exist_ok=True)
    env.start()
    try:
        assert wait_until(lambda: "watching" in env.log(), 20), env.log()
        path = env.drop / "users_slow.csv"
        with open(path, "wb") as writer:
            writer.write(b"accountId,id,email\nacct-0,u-0,u0@example.com\n")
            writer.flush()
            time.sleep(3.0)  # the scenario itself: a writer idle longer than settle_seconds
            for i in range(1, 6):
                writer.write(f"acct-{i},u-{i},u{i}@example.com\n".encode())
        data = b"accountId,id,email\n" + b"".join(
            f"acct-{i},u-{i},u{i}@example.com\n".encode() for i in range(6))
        assert wait_until(lambda: len(env.archived_files()) == 1, 30), env.log()
    finally:
        env.stop()
    assert_delivered(env, sshd_server.local_remote_dir, {"users_slow.csv": data})
    [row] = env.status()
    assert row["size"] == len(data)


def test_same_bytes_under_two_names_get_two_remote_names(sshd_server: SshdServer, tmp_path: Path) -> None:
    """With the duplicate check off, four drops are four deliveries, even when their names sanitise to
    the same remote name and their bytes are equal (claimed in one batch, the same millisecond)."""
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0,
                            extra="[imports]\nduplicate_window_days = 0\n")
    data = users_csv(4, "same")
    env.drop_atomically("users_report.csv", data)
    env.drop_atomically("report.csv", data, folder="users")
    env.drop_atomically("users_col lide.csv", data)
    env.drop_atomically("users_col-lide.csv", data)
    result = env.run_once()
    assert result.returncode == 0, env.log()
    on_server = sorted(p.name for p in sshd_server.local_remote_dir.iterdir())
    assert len(on_server) == 4, on_server
    assert all(p.read_bytes() == data for p in sshd_server.local_remote_dir.iterdir())
    assert len({row["remote_name"] for row in env.status()}) == 4


def test_the_same_content_dropped_again_while_the_first_is_queued_is_refused(
        sshd_server: SshdServer, tmp_path: Path) -> None:
    """Duplicate guard: two identical files dropped together, and a re-drop while the first copy is
    still being sent: one delivery; each copy kept in failed/ naming the first file and `retry`."""
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0)
    text = env.config_path.read_text().replace("[paths]", "bandwidth_limit = 100000\n\n[paths]", 1)
    env.config_path.write_text(text)
    data = users_csv(6_000, "gdpr")  # ~250 KB: over 2 s at 100 kB/s
    env.drop_atomically("users_gdpr.csv", data)
    env.drop_atomically("purge.csv", data, folder="users")
    env.start()
    try:
        assert wait_until(lambda: env.states().get("users_gdpr.csv") == "uploading"
                          or env.states().get("purge.csv") == "uploading", 20), env.log()
        env.drop_atomically("users_gdpr_again.csv", data)
        assert wait_until(lambda: sorted(env.states().values()) == ["archived", "failed", "failed"], 40), \
            env.log()
    finally:
        env.stop()
    states = env.states()
    [first] = [name for name, state in states.items() if state == "archived"]
    copies = {name: data for name, state in states.items() if state == "failed"}
    for name in copies:
        reason = (env.failed / f"{name}.reason.txt").read_text()
        assert repr(first) in reason and "saasquatch-agent retry" in reason, reason
    assert_delivered(env, sshd_server.local_remote_dir, {first: data}, copies)


def test_a_lost_journal_never_sends_an_adopted_file_twice(sshd_server: SshdServer, tmp_path: Path) -> None:
    """A file published but still in the spool (its status is followed) when the journal is lost:
    adopted at the next start, found on the server by its content hash in the remote name, and
    recorded as published instead of being sent a second time."""
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0,
                            extra='[status]\nmode = "consumed"\npoll_seconds = 0.3\ntimeout = 600\n')
    data = users_csv(7, "lost")
    env.drop_atomically("users_lost.csv", data)
    assert env.run_once().returncode == 0, env.log()
    assert env.states() == {"users_lost.csv": "uploaded"}
    journal = env.state / "journal.sqlite3"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{journal}{suffix}").unlink(missing_ok=True)
    result = env.run_once()
    assert result.returncode == 0, env.log()
    [row] = env.status()
    assert row["state"] == "uploaded" and row["adopted"], row
    assert "not sending it again" in result.stderr + result.stdout, result.stderr
    assert_delivered(env, sshd_server.local_remote_dir, {"users_lost.csv": data})
