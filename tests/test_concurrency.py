"""upload.concurrency: several upload threads, each file handed to exactly one of them (issue 7).

- next_sendable skips (and does not wait for) the ids other threads hold;
- UploadWorker with 4 threads: every queued file is processed exactly once, two at the same time;
- on a near server small files go through one thread at a time, on a far one through several;
- intake's batched claim: one commit for the rows, then the moves; a vanished file leaves no row;
- end to end: `run --once` with concurrency 3 sends every file once and archives it;
- the config key is validated.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from agent.config import Config, ConfigError, parse_config
from agent.pipeline.upload import Uploader
from agent.pipeline.upload_worker import UploadWorker
from agent.store.archive import Filer
from agent.store.journal import FileRecord, FileState, Journal
from agent.transport.session_pool import SessionPool
from agent.transport.sftp import SftpSession
from tests.helpers.agent_env import AgentEnv
from tests.helpers.configs import make_config
from tests.helpers.sshd import SshdServer
from tests.helpers.tcp_proxy import TcpProxy

TIMEOUT = 20.0


def queued_journal(tmp_path: Path, count: int) -> Journal:
    journal = Journal(tmp_path / "journal.sqlite3")
    for index in range(count):
        record = journal.add_claim(f"users_{index}.csv", tmp_path / f"users_{index}.csv", tmp_path)
        journal.update(record.id, state=FileState.QUEUED, remote_name=f"r{index}.csv")
    return journal


def test_next_sendable_skips_held_ids_and_does_not_wait_for_them(tmp_path: Path) -> None:
    journal = queued_journal(tmp_path, 3)
    try:
        journal.update(1, next_attempt_at=time.time() - 5)  # due (a retry whose time has come)
        record, _ = journal.next_sendable(exclude={1})
        assert record is not None and record.id == 2
        record, next_due = journal.next_sendable(exclude={1, 2, 3})
        assert record is None and next_due is None  # a held row's past due time is not a reason to spin
    finally:
        journal.close()


class CountingUploader(Uploader):
    """Records which thread processed which file; the first two files meet at a barrier, so the
    test only passes when two threads work at the same time."""

    def __init__(self, config: Config, journal: Journal) -> None:
        super().__init__(config, journal, Filer(config, journal), SftpSession(config.sftp))
        self.seen: list[tuple[int, str]] = []
        self.sessions: set[int] = set()
        self.meet = threading.Barrier(2, timeout=TIMEOUT)
        self._seen_lock = threading.Lock()

    def process(self, record: FileRecord) -> FileRecord:
        with self._seen_lock:
            self.seen.append((record.id, threading.current_thread().name))
            self.sessions.add(id(self.session))
            first_two = len(self.seen) <= 2
        if first_two:
            self.meet.wait()
        return self.journal.update(record.id, state=FileState.ARCHIVED)


def drain(worker: UploadWorker, journal: Journal) -> None:
    """Start the worker, wait (bounded) until nothing is queued, stop it."""
    worker.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while journal.count_in((FileState.QUEUED,)) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        assert worker.stop(TIMEOUT)


@pytest.mark.timeout(60)
def test_four_workers_process_every_file_exactly_once(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    journal = queued_journal(tmp_path, 60)
    uploader = CountingUploader(config, journal)
    worker = UploadWorker(uploader, journal, concurrency=4)
    drain(worker, journal)
    counts = Counter(file_id for file_id, _thread in uploader.seen)
    assert sorted(counts) == list(range(1, 61))
    assert set(counts.values()) == {1}, [i for i, n in counts.items() if n > 1]
    assert len({thread for _id, thread in uploader.seen}) >= 2
    assert len(uploader.sessions) >= 2  # each thread has its own SFTP session
    assert not worker.busy.is_set()
    journal.close()


class FixedDistancePool(SessionPool):
    """Sessions that never connect, from a server as near or as far as the test says."""

    def __init__(self, config: Config, near: bool) -> None:
        super().__init__([], config.sftp.connect_timeout)
        self.config, self.near = config, near

    def server_near(self) -> bool:
        return self.near

    def acquire(self) -> SftpSession:
        return SftpSession(self.config.sftp)

    def release(self, session: SftpSession) -> None:
        return None


class BatchRecorder(Uploader):
    """Records each batch and the most batches in progress at once. `meet`: the first two batches
    wait for each other (the test passes only when two threads send at the same time)."""

    def __init__(self, config: Config, journal: Journal, meet: bool) -> None:
        super().__init__(config, journal, Filer(config, journal), SftpSession(config.sftp))
        self.batches: list[list[int]] = []
        self.active = self.most = 0
        self.meet = threading.Barrier(2, timeout=TIMEOUT) if meet else None
        self._lock = threading.Lock()

    def process_batch(self, records: list[FileRecord]) -> list[FileRecord]:
        with self._lock:
            self.batches.append([record.id for record in records])
            self.active += 1
            self.most = max(self.most, self.active)
            first_two = len(self.batches) <= 2
        if self.meet is not None and first_two:
            self.meet.wait()
        else:
            time.sleep(0.01)  # time for another thread to take the next batch, were it allowed to
        with self._lock:
            self.active -= 1
        return [self.journal.update(record.id, state=FileState.ARCHIVED) for record in records]

    def process(self, record: FileRecord) -> FileRecord:
        return self.process_batch([record])[0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("near", [True, False], ids=["near server", "far server"])
def test_small_files_go_through_one_thread_only_on_a_near_server(tmp_path: Path, near: bool) -> None:
    config = make_config(tmp_path, {"upload": {"batch_files": 4}})
    journal = queued_journal(tmp_path, 120)
    uploader = BatchRecorder(config, journal, meet=not near)
    worker = UploadWorker(uploader, journal, concurrency=4, sessions=FixedDistancePool(config, near))
    drain(worker, journal)
    sent = Counter(file_id for batch in uploader.batches for file_id in batch)
    assert sorted(sent) == list(range(1, 121)) and set(sent.values()) == {1}  # each file once
    assert len(uploader.batches) >= 30
    if near:
        assert uploader.most == 1, uploader.most
    else:
        assert uploader.most >= 2, uploader.most
    assert not worker.busy.is_set()
    journal.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("delay_ms", [0, 25], ids=["loopback", "25 ms each way"])
def test_run_once_tells_a_near_server_from_a_far_one(sshd_server: SshdServer, sshd_proxy: TcpProxy,
                                                     proxy_known_hosts: Path, tmp_path: Path,
                                                     delay_ms: int) -> None:
    extra = "[upload]\nconcurrency = 4\nbatch_files = 8\n"
    if delay_ms:  # through the proxy, which delays every chunk each way
        sshd_proxy.delay_ms = delay_ms
        env = AgentEnv(tmp_path / "agent", host=sshd_proxy.host, port=sshd_proxy.port,
                       username=sshd_server.username, private_key=sshd_server.user_key_path,
                       known_hosts=proxy_known_hosts, remote_dir=sshd_server.remote_dir, settle_seconds=0,
                       extra=extra)
    else:
        env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0, extra=extra)
    result = run_once_delivering_each_once(env, sshd_server, "users_n", 80)
    said_near = "small files go over one connection at a time" in result.stderr
    assert said_near == (delay_ms == 0), result.stderr[-3000:]


def test_batched_claim_commits_rows_then_moves_and_forgets_vanished_files(tmp_path: Path) -> None:
    from agent.intake.claim import Intake
    from agent.intake.watch import DropScanner

    config = make_config(tmp_path)
    for folder in (config.paths.drop, config.spool_dir):
        folder.mkdir(parents=True)
    journal = Journal(config.journal_path)
    queued: list[int] = []
    intake = Intake(config, journal, Filer(config, journal), DropScanner(config.paths.drop, []),
                    lambda: queued.append(1))
    files = [config.paths.drop / f"users_{i}.csv" for i in range(3)]
    for index, path in enumerate(files):  # distinct contents: equal ones are refused as duplicates
        path.write_text(f"accountId,id,email\nacct-{index},u{index},a{index}@example.com\n")
    missing = config.paths.drop / "users_gone.csv"
    intake.claim_many([(files[0], None), (missing, None), (files[1], None), (files[2], None)])
    try:
        rows = journal.all()
        assert [row.name for row in rows] == ["users_0.csv", "users_1.csv", "users_2.csv"]
        assert {row.state for row in rows} == {FileState.QUEUED}
        assert all(Path(row.local_path).parent == config.spool_dir and Path(row.local_path).exists()
                   for row in rows)
        assert not any(path.exists() for path in files)
        assert len(queued) == 1  # the upload threads are woken once for the batch
    finally:
        journal.close()


def test_batched_queue_refuses_content_sent_recently(tmp_path: Path) -> None:
    """The duplicate check runs once for a claim batch; a duplicate goes to failed/, the others are
    queued, and a single check (recovery) of a duplicate returns its failed row."""
    from agent.intake.claim import Intake
    from agent.intake.watch import DropScanner

    config = make_config(tmp_path)
    for folder in (config.paths.drop, config.spool_dir):
        folder.mkdir(parents=True)
    journal = Journal(config.journal_path)
    intake = Intake(config, journal, Filer(config, journal), DropScanner(config.paths.drop, []), lambda: None)
    sent_text = "accountId,id,email\nacct-9,u9,z@example.com\n"
    first = config.paths.drop / "users_first.csv"
    first.write_text(sent_text)
    intake.claim_many([(first, None)])
    [sent] = journal.all()
    journal.update(sent.id, state=FileState.ARCHIVED)  # it went to the server
    names = {"users_new.csv": "accountId,id,email\nacct-1,u1,a@example.com\n",
             "users_again.csv": sent_text,
             "users_more.csv": "accountId,id,email\nacct-2,u2,b@example.com\n"}
    for name, text in names.items():
        (config.paths.drop / name).write_text(text)
    try:
        intake.claim_many([(config.paths.drop / name, None) for name in names])
        states = {row.name: row.state for row in journal.all()}
        assert states == {"users_first.csv": FileState.ARCHIVED, "users_new.csv": FileState.QUEUED,
                          "users_again.csv": FileState.FAILED, "users_more.csv": FileState.QUEUED}
        reason = (config.paths.failed / "users_again.csv.reason.txt").read_text()
        assert f"file #{sent.id}" in reason and "saasquatch-agent retry" in reason

        third = config.paths.drop / "users_third.csv"
        claimed = journal.add_claim(third.name, third, config.spool_dir)
        Path(claimed.local_path).write_text(sent_text)  # claimed before a crash: recovery checks it
        assert intake.check(claimed).state == FileState.FAILED
    finally:
        journal.close()


def run_once_delivering_each_once(env: AgentEnv, server: SshdServer, prefix: str,
                                  count: int) -> subprocess.CompletedProcess[str]:
    """`count` small files dropped, then `run --once`: each on the server once, each archived."""
    payloads = {f"{prefix}{i:03d}.csv": f"accountId,id,email\nacct-{i},u{i},u{i}@example.com\n".encode()
                for i in range(count)}
    for name, data in payloads.items():
        env.drop_atomically(name, data)
    result = env.run_once()
    assert result.returncode == 0, result.stderr[-3000:]
    remote = [p.read_bytes() for p in server.local_remote_dir.iterdir() if p.is_file()]
    assert sorted(remote) == sorted(payloads.values())  # each once, and no temporary left behind
    assert sorted(p.read_bytes() for p in env.archived_files()) == sorted(payloads.values())
    return result


@pytest.mark.timeout(90)
def test_run_once_with_three_upload_threads_sends_each_file_once(sshd_server: SshdServer,
                                                                 tmp_path: Path) -> None:
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0,
                            extra="[upload]\nconcurrency = 3\n")
    result = run_once_delivering_each_once(env, sshd_server, "users_c", 24)
    assert 1 <= result.stderr.count("connected to") <= 3


@pytest.mark.parametrize("value", [0, 17, "two"])
def test_concurrency_is_validated(tmp_path: Path, value: object) -> None:
    data = {"sftp": {"host": "h", "username": "u", "private_key": "k", "known_hosts": "kh"},
            "upload": {"concurrency": value}}
    with pytest.raises(ConfigError, match=r"upload\.concurrency"):
        parse_config(data, tmp_path / "agent.toml")


def test_concurrency_default_is_set(tmp_path: Path) -> None:
    data = {"sftp": {"host": "h", "username": "u", "private_key": "k", "known_hosts": "kh"}}
    assert parse_config(data, tmp_path / "agent.toml").upload.concurrency >= 1


def test_same_name_archived_by_two_threads_gets_two_destinations(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        filer = Filer(config, journal)
        first = journal.add_claim("users_same.csv", tmp_path / "a" / "users_same.csv", tmp_path)
        second = journal.add_claim("users_same.csv", tmp_path / "b" / "users_same.csv", tmp_path)
        dest_1 = filer.archive_destination(first)  # chosen, not moved yet (another thread's move)
        dest_2 = filer.archive_destination(second)
        assert dest_1 != dest_2 and dest_1.name == "users_same.csv"
        assert filer.archive_destination(first) == dest_1  # the same file again: same name
        failed_1 = filer._reserve(config.paths.failed, "users_x.csv", "1")
        assert filer._reserve(config.paths.failed, "users_x.csv", "2") != failed_1
    finally:
        journal.close()


def test_archive_finishes_an_earlier_attempts_move_instead_of_starting_anew(tmp_path: Path) -> None:
    """An attempt that renamed the file but failed before recording it (e.g. another thread removed
    a split folder under its directory fsync) is finished, not retried from a vanished source."""
    config = make_config(tmp_path)
    config.spool_dir.mkdir(parents=True)
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        filer = Filer(config, journal)
        record = journal.add_claim("users_moved.csv", tmp_path / "users_moved.csv", config.spool_dir)
        Path(record.local_path).write_text("accountId,id\nacct-1,u1\n")
        dest = filer.archive_destination(record)
        record = journal.update(record.id, state=FileState.UPLOADED, pending_path=dest,
                                pending_state=FileState.ARCHIVED)
        dest.parent.mkdir(parents=True)
        Path(record.local_path).rename(dest)  # the rename happened; recording it did not
        done = filer.archive(journal.get(record.id))
        assert done.state == FileState.ARCHIVED and Path(done.local_path) == dest and dest.exists()
    finally:
        journal.close()


def test_a_file_changed_while_it_is_checked_is_checked_again_not_queued(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check opens the spool copy once: its facts before, the import rules' check of that very
    file, its facts after. Bytes that change meanwhile are caught (the file goes back to `on_changed`,
    nothing is queued); an unchanged file is opened once for the whole check."""
    from agent.intake import claim
    from agent.intake.claim import Intake
    from agent.intake.watch import DropScanner

    config = make_config(tmp_path)
    for folder in (config.paths.drop, config.spool_dir):
        folder.mkdir(parents=True)
    journal = Journal(config.journal_path)
    changed: list[int] = []
    intake = Intake(config, journal, Filer(config, journal), DropScanner(config.paths.drop, []), lambda: None,
                    on_changed=lambda record: changed.append(record.id))
    for name in ("users_steady.csv", "users_growing.csv"):
        (config.paths.drop / name).write_text(f"accountId,id,email\nacct-1,{name},a@example.com\n")
    real_admit = claim.admit
    opens: list[str] = []
    real_open = claim.os.open

    def counting_open(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        opens.append(os.fspath(path))
        return real_open(path, flags, *args)

    def admit_while_written(path: Path, name: str, *args: object, **kwargs: object) -> object:
        verdict = real_admit(path, name, *args, **kwargs)  # type: ignore[arg-type]
        if name == "users_growing.csv":
            with open(path, "a") as handle:  # the writer goes on after the check read it
                handle.write("acct-2,u2,b@example.com\n")
        return verdict

    monkeypatch.setattr(claim, "admit", admit_while_written)
    monkeypatch.setattr(claim.os, "open", counting_open)
    try:
        intake.claim_many([(config.paths.drop / "users_steady.csv", None),
                           (config.paths.drop / "users_growing.csv", None)])
        rows = {row.name: row for row in journal.all()}
        assert rows["users_steady.csv"].state == FileState.QUEUED
        growing = rows["users_growing.csv"]
        assert growing.state == FileState.CLAIMED and growing.remote_name is None
        assert changed == [rows["users_growing.csv"].id]
        assert opens.count(rows["users_steady.csv"].local_path) == 1
    finally:
        journal.close()
