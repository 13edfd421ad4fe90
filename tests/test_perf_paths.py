"""The speed-ups of the performance issue keep their promises.

- next_sendable walks an index (no sort of every queued row per file: a backlog stays linear) and
  still hands out the oldest due file, skipping files in backoff;
- run --once's idle check is one COUNT query;
- the SSH transport offers only secure algorithms, AES-GCM first, and a real sshd agrees to it;
- a batch's WRITEs go to the channel in a few runs, not one SSH packet per file, every status read;
- a batch's rows returned with the changes applied (not read back) are the rows the journal holds;
- an exchange inside a corked block sends what the block holds too (nothing held is dropped).
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from pathlib import Path

import paramiko
import pytest

from agent.config import SftpConfig
from agent.store.journal import ACTIVE_STATES, FileState, Journal
from agent.transport import pipelining, publish
from agent.transport.sftp import PREFERRED_CIPHERS, TRANSPORT_WINDOW, SftpSession, make_transport
from tests.helpers.sshd import SshdServer


def journal_with(tmp_path: Path, states: list[tuple[FileState, float | None, int]]) -> Journal:
    journal = Journal(tmp_path / "journal.sqlite3")
    for index, (state, next_attempt_at, attempts) in enumerate(states):
        record = journal.add_claim(f"users_{index}.csv", tmp_path / f"users_{index}.csv", tmp_path)
        journal.update(record.id, state=state, next_attempt_at=next_attempt_at, attempts=attempts)
    return journal


def test_next_sendable_is_the_oldest_due_file_across_states(tmp_path: Path) -> None:
    later = time.time() + 3600
    journal = journal_with(tmp_path, [
        (FileState.ARCHIVED, None, 0),   # 1: final
        (FileState.QUEUED, later, 1),    # 2: in backoff
        (FileState.UPLOADED, None, 0),   # 3: due
        (FileState.UPLOADING, None, 0),  # 4: due
        (FileState.QUEUED, None, 0),     # 5: due
    ])
    try:
        record, _ = journal.next_sendable()
        assert record is not None and record.id == 3
        journal.sendable_states = (FileState.QUEUED, FileState.UPLOADING)  # status job owns UPLOADED
        record, _ = journal.next_sendable()
        assert record is not None and record.id == 4
        journal.update(4, state=FileState.ARCHIVED)
        journal.update(5, state=FileState.ARCHIVED)
        record, next_due = journal.next_sendable()
        assert record is None and next_due == pytest.approx(later)
        record, _ = journal.next_sendable(now=later + 1)
        assert record is not None and record.id == 2
    finally:
        journal.close()


def test_next_sendable_uses_the_state_id_index_without_sorting(tmp_path: Path) -> None:
    journal = journal_with(tmp_path, [(FileState.QUEUED, None, 0)])
    try:
        plan = journal._db.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM files WHERE state = ? AND"
            " (next_attempt_at IS NULL OR next_attempt_at <= ?) ORDER BY id LIMIT 1",
            ("queued", time.time()),
        ).fetchall()
        text = " ".join(str(row[-1]) for row in plan)
        assert "files_state_id" in text and "TEMP B-TREE" not in text, text
    finally:
        journal.close()


def test_count_below_attempts(tmp_path: Path) -> None:
    journal = journal_with(tmp_path, [
        (FileState.QUEUED, None, 3), (FileState.UPLOADING, None, 1), (FileState.ARCHIVED, None, 0),
    ])
    try:
        assert journal.count_below_attempts(ACTIVE_STATES, 3) == 1
        assert journal.count_below_attempts(ACTIVE_STATES, 4) == 2
        assert journal.count_below_attempts(ACTIVE_STATES, 1) == 0
    finally:
        journal.close()


def test_transport_offers_secure_algorithms_only() -> None:
    left, right = socket.socketpair()
    try:
        transport = make_transport(left)
        options = transport.get_security_options()
        assert options.ciphers[0] == "aes128-gcm@openssh.com"
        assert set(options.ciphers) <= set(PREFERRED_CIPHERS)
        assert not any("cbc" in name or "3des" in name for name in options.ciphers)
        assert not any("md5" in name or name.endswith("-96") for name in options.digests)
        assert transport.default_window_size == TRANSPORT_WINDOW
    finally:
        left.close()
        right.close()


def sshd_session(server: SshdServer) -> SftpSession:
    return SftpSession(SftpConfig(
        host=server.host, port=server.port, username=server.username,
        private_key=server.user_key_path, known_hosts=server.known_hosts_path, remote_dir=server.remote_dir,
    ))


@pytest.mark.timeout(60)
def test_real_sshd_negotiates_aes_gcm(sshd_server: SshdServer) -> None:
    session = sshd_session(sshd_server)
    try:
        sftp = session.client()
        channel = sftp.get_channel()
        assert channel is not None
        transport: paramiko.Transport = channel.get_transport()
        assert transport.local_cipher == "aes128-gcm@openssh.com"
        assert sftp.listdir(sshd_server.remote_dir) == []
    finally:
        session.close()


def test_a_big_drop_folder_is_noticed_a_part_at_a_time(sshd_server: SshdServer, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rescan hands at most NOTICE_LIMIT paths to the settle queue; intake asks for the next part
    once those are claimed, and `run --once` still takes every file (memory flat in a backlog)."""
    from agent import service
    from agent.config import load_config
    from tests.helpers.agent_env import AgentEnv

    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server)
    env.write_config(settle_seconds=0)
    count, limit = 35, 10
    for index in range(count):
        env.drop_atomically(f"users_{index:02d}.csv",
                            f"accountId,id,email\nacct-{index},u{index},u{index}@example.com\n".encode())
    monkeypatch.setattr(service, "NOTICE_LIMIT", limit)
    waiting: list[int] = []
    rescan = service.Agent.rescan

    def counting_rescan(self: service.Agent) -> None:
        rescan(self)
        waiting.append(self.settle.pending_count())

    monkeypatch.setattr(service.Agent, "rescan", counting_rescan)  # before the wiring takes it
    agent = service.Agent(load_config(env.config_path))
    assert agent.run_once() == 0
    assert len(env.archived_files()) == count
    assert len(waiting) >= count // limit and max(waiting) <= limit, waiting


def test_journal_rows_map_onto_file_records_by_position() -> None:
    """FileRecord.from_row builds records positionally: its fields must stay in _COLUMNS order."""
    import dataclasses

    from agent.store.journal import _COLUMNS, FileRecord

    assert [field.name for field in dataclasses.fields(FileRecord)] == list(_COLUMNS)


def test_a_record_read_from_a_row_is_the_record_its_constructor_makes(tmp_path: Path) -> None:
    """from_row fills the record without the generated __init__: the same record (equal, hashable,
    frozen, replace works), the state a FileState."""
    import dataclasses

    from agent.store.journal import _COLUMNS, FileRecord

    journal = journal_with(tmp_path, [(FileState.QUEUED, 12.5, 2)])
    try:
        row = journal._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM files").fetchone()
        record = FileRecord.from_row(row)
        values = list(row)
        values[_COLUMNS.index("state")] = FileState(values[_COLUMNS.index("state")])
        assert record == FileRecord(*values) and hash(record) == hash(FileRecord(*values))
        assert record.state is FileState.QUEUED and record.next_attempt_at == 12.5 and record.attempts == 2
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.attempts = 3  # type: ignore[misc]
        assert dataclasses.replace(record, attempts=3).attempts == 3
    finally:
        journal.close()


def test_remote_name_lookup_uses_the_index(tmp_path: Path) -> None:
    """Queueing a file looks its remote name up in the partial unique index, not by reading every row
    (that was one full scan per file queued, growing with the journal)."""
    journal = journal_with(tmp_path, [(FileState.ARCHIVED, None, 0)] * 3)
    record = journal.add_claim("users_x.csv", tmp_path / "users_x.csv", tmp_path)
    statements: list[str] = []
    journal._db.set_trace_callback(statements.append)
    try:
        journal.update(record.id, state=FileState.QUEUED, remote_name="users_x_1.csv")
        journal._db.set_trace_callback(None)
        lookups = [sql for sql in statements if sql.startswith("SELECT") and "remote_name" in sql]
        assert lookups
        for sql in lookups:
            plan = " ".join(str(row[-1]) for row in journal._db.execute(f"EXPLAIN QUERY PLAN {sql}"))
            assert "files_remote_name" in plan or "PRIMARY KEY" in plan, (sql, plan)
    finally:
        journal._db.set_trace_callback(None)
        journal.close()


def test_remote_names_of_rows_below_the_index_floor_still_count(tmp_path: Path) -> None:
    """A journal of an older version had two rows with one remote name: its index starts above them,
    and a new file with that name still gets `-2` (rows below the floor are looked at too)."""
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    journal._db.execute("DROP INDEX files_remote_name")
    for index in range(2):
        record = journal.add_claim(f"users_{index}.csv", tmp_path / f"users_{index}.csv", tmp_path)
        journal.update(record.id, state=FileState.ARCHIVED)
    journal._db.execute("UPDATE files SET remote_name = 'users_a.csv'")  # as an older version could
    journal.close()
    journal = Journal(path)  # migrates: the index covers rows above id 2
    try:
        assert journal._name_floor == 2
        record = journal.add_claim("users_a.csv", tmp_path / "users_a.csv", tmp_path)
        queued = journal.update(record.id, state=FileState.QUEUED, remote_name="users_a.csv")
        assert queued.remote_name == "users_a-2.csv"
        other = journal.add_claim("users_b.csv", tmp_path / "users_b.csv", tmp_path)
        queued = journal.update(other.id, state=FileState.QUEUED, remote_name="users_a-2.csv")
        assert queued.remote_name == "users_a-2-2.csv"  # held above the floor: found by the index
    finally:
        journal.close()


def test_a_batch_of_remote_names_is_looked_up_in_one_query(tmp_path: Path) -> None:
    """Queueing a batch asks once which of its names are held; only a held name (or a clash inside the
    batch) is looked at on its own, and the names come out as one by one: `-2` for a name another row
    holds, `-2` for the second file of the batch with the same name."""
    journal = journal_with(tmp_path, [(FileState.ARCHIVED, None, 0)])
    journal.update(1, remote_name="users_held.csv")
    records = [journal.add_claim(f"users_{index}.csv", tmp_path / f"users_{index}.csv", tmp_path)
               for index in range(6)]
    names = ["users_a.csv", "users_held.csv", "users_b.csv", "users_b.csv", "users_c.csv", "users_d.csv"]
    statements: list[str] = []
    journal._db.set_trace_callback(statements.append)
    try:
        queued = journal.update_many([(record.id, None, {"state": FileState.QUEUED, "remote_name": name})
                                      for record, name in zip(records, names, strict=True)])
        journal._db.set_trace_callback(None)
        assert [record.remote_name for record in queued] == [
            "users_a.csv", "users_held-2.csv", "users_b.csv", "users_b-2.csv", "users_c.csv", "users_d.csv"]
        lookups = [sql for sql in statements if sql.startswith("SELECT") and "remote_name" in sql]
        # the batch's query, then users_held and its -2, and the -2 of the second users_b
        assert len(lookups) == 4, lookups
    finally:
        journal._db.set_trace_callback(None)
        journal.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("files", [1, 24])
def test_a_batch_writes_in_runs_and_reads_every_status(sshd_server: SshdServer, tmp_path: Path,
                                                       files: int) -> None:
    session = sshd_session(sshd_server)
    try:
        sftp = session.client()
        uploads = []
        for index in range(files):
            data = f"accountId,id\nacct-{index},{'x' * 1000}\n".encode()
            local = tmp_path / f"users_{index}.csv"
            local.write_bytes(data)
            uploads.append(publish.Upload(index, len(data), hashlib.sha256(data).hexdigest(), str(local),
                                          f"{sshd_server.remote_dir}/.{index}.part", ""))
        publish.open_all(sftp, uploads)
        writes = 0
        channel_write = sftp._write_all

        def counted(data: bytes) -> None:
            nonlocal writes
            writes += 1
            channel_write(data)

        sftp._write_all = counted  # type: ignore[method-assign]
        pacer = publish.Pacer(lambda: False, lambda: None, 0, threading.Event().wait)
        publish.write_all(sftp, uploads, 32 * 1024, pacer)
        del sftp._write_all
        assert writes == (1 if files == 1 else 2), writes  # 24 KiB of WRITEs: runs of about 16 KiB
        assert all(upload.error is None and upload.acked == upload.size for upload in uploads)
        publish.close_all(sftp, uploads)
        for index, upload in enumerate(uploads):
            assert upload.remote_size == upload.size
            assert (sshd_server.local_remote_dir / f".{index}.part").read_bytes() == \
                (tmp_path / f"users_{index}.csv").read_bytes()
    finally:
        session.close()


def test_rows_returned_with_the_changes_applied_are_the_rows_read_back(tmp_path: Path) -> None:
    journal = journal_with(tmp_path, [(FileState.UPLOADED, None, 2), (FileState.UPLOADED, time.time(), 0)])
    try:
        before = {record.id: record for record in journal.query("")}
        changes = [(file_id, "archived", {"state": FileState.ARCHIVED, "local_path": tmp_path / f"a{file_id}",
                                          "pending_path": None, "pending_state": None,
                                          "next_attempt_at": None})
                   for file_id in before]
        applied = journal.update_many(changes, known=before)
        assert applied == [journal.get(file_id) for file_id in before]
        assert all(record.state is FileState.ARCHIVED for record in applied)
        with pytest.raises(KeyError):  # every row changed must be known
            journal.update_many(changes[:1], known={})
    finally:
        journal.close()


@pytest.mark.timeout(60)
def test_an_exchange_inside_a_corked_block_sends_what_it_holds(sshd_server: SshdServer) -> None:
    session = sshd_session(sshd_server)
    try:
        sftp = session.client()
        assert isinstance(sftp, pipelining.PipelinedSFTPClient)
        held = pipelining.ReplyCollector()
        with sftp.corked():
            number = sftp._async_request(held, paramiko.sftp.CMD_STAT, sshd_server.remote_dir)
            [reply] = pipelining.exchange(sftp, [(paramiko.sftp.CMD_STAT, (sshd_server.remote_dir,))])
            assert reply.error is None
        deadline = time.monotonic() + 5
        while number not in held.by_number and time.monotonic() < deadline:  # the held request's reply
            if sftp.response_ready():
                sftp._read_response()
            else:
                time.sleep(0.01)
        assert number in held.by_number
    finally:
        session.close()
