"""Resuming an interrupted upload looks at the server first (the publish protocol's crash windows)."""

from __future__ import annotations

import hashlib
import os
import posixpath
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.pipeline.upload import ResumePoint, Uploader
from agent.store.journal import FileRecord, FileState
from agent.transport import publish
from tests.helpers.agent_env import AgentEnv, wait_until
from tests.helpers.sshd import SshdServer
from tests.helpers.tcp_proxy import TcpProxy

DATA = b"accountId,id\nacct-1,user-1\n"


@pytest.fixture
def uploader(make_uploader: Callable[..., Uploader]) -> Uploader:
    return make_uploader()


def interrupted(uploader: Uploader, state: FileState) -> FileRecord:
    """A row as a crash in `state` leaves it: spool copy present, remote name fixed."""
    journal = uploader.journal
    record = journal.add_claim("users_x.csv", Path("/drop/users_x.csv"), uploader.config.spool_dir)
    Path(record.local_path).write_bytes(DATA)
    return journal.update(record.id, state=state, size=len(DATA), sha256=hashlib.sha256(DATA).hexdigest(),
                          import_type="users", remote_name="users_x_20261129T120000000Z_abcdef12.csv")


def test_publishing_with_complete_temp_only_renames(uploader: Uploader, sshd_server: SshdServer) -> None:
    record = interrupted(uploader, FileState.PUBLISHING)
    assert record.remote_name
    temp = sshd_server.local_remote_dir / posixpath.basename(uploader.temp_path(record))
    temp.write_bytes(DATA)
    stamp = temp.stat().st_mtime_ns
    done = uploader.process(record)
    assert done.state == FileState.ARCHIVED
    final = sshd_server.local_remote_dir / record.remote_name
    assert final.read_bytes() == DATA and final.stat().st_mtime_ns == stamp  # the same file, not resent
    assert not temp.exists()


def test_publishing_with_nothing_left_means_the_server_took_it(uploader: Uploader,
                                                               sshd_server: SshdServer) -> None:
    record = interrupted(uploader, FileState.PUBLISHING)
    done = uploader.process(record)
    assert done.state == FileState.ARCHIVED
    assert list(sshd_server.local_remote_dir.iterdir()) == []  # not sent a second time
    assert any("already taken by the server" in (m or "") for _, _, m in uploader.journal.events(done.id))


def test_uploading_with_partial_temp_sends_again(uploader: Uploader, sshd_server: SshdServer) -> None:
    record = interrupted(uploader, FileState.UPLOADING)
    assert record.remote_name
    (sshd_server.local_remote_dir / posixpath.basename(uploader.temp_path(record))).write_bytes(DATA[:5])
    done = uploader.process(record)
    assert done.state == FileState.ARCHIVED
    assert [p.name for p in sshd_server.local_remote_dir.iterdir()] == [record.remote_name]
    assert (sshd_server.local_remote_dir / record.remote_name).read_bytes() == DATA


def test_final_name_with_other_content_is_never_overwritten(uploader: Uploader,
                                                            sshd_server: SshdServer) -> None:
    record = interrupted(uploader, FileState.UPLOADING)
    assert record.remote_name
    (sshd_server.local_remote_dir / record.remote_name).write_bytes(b"someone else's file\n")
    done = uploader.process(record)
    assert done.state == FileState.FAILED
    assert "refusing to overwrite" in (done.error or "")
    assert (sshd_server.local_remote_dir / record.remote_name).read_bytes() == b"someone else's file\n"


# ------------------------------------------------------------------ resuming a large file (issue 17)

BIG = b"accountId,id,email\n" + b"".join(
    b"acct-%07d,user-%07d,user.%07d@example.com\n" % (i, i, i) for i in range(40_000))  # ~1.8 MB


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes of every WRITE the agent sends (the publish protocol's window), one entry per request."""
    sizes: list[int] = []
    send = publish._WriteWindow.send

    def counting(self: publish._WriteWindow, upload: publish.Upload, offset: int, data: bytes) -> None:
        sizes.append(len(data))
        send(self, upload, offset, data)

    monkeypatch.setattr(publish._WriteWindow, "send", counting)
    return sizes


def cut_short(uploader: Uploader, server: SshdServer, prefix: bytes, acked: int,
              point_temp: str | None = None, data: bytes = BIG) -> FileRecord:
    """A large row as a kill mid-send leaves it: `uploading`, `prefix` in its temporary file on the
    server, and a journal point saying the first `acked` bytes were acknowledged."""
    journal = uploader.journal
    record = journal.add_claim("users_big.csv", Path("/drop/users_big.csv"), uploader.config.spool_dir)
    Path(record.local_path).write_bytes(data)
    record = journal.update(record.id, state=FileState.UPLOADING, size=len(data),
                            sha256=hashlib.sha256(data).hexdigest(), import_type="users",
                            remote_name="users_big_20261129T120000000Z_abcdef12.csv")
    temp = uploader.temp_path(record)
    on_server = server.local_remote_dir / posixpath.basename(temp)
    on_server.write_bytes(prefix)
    folder = server.local_remote_dir.stat()
    os.chown(on_server, folder.st_uid, folder.st_gid)  # the server's user wrote it
    info = os.stat(record.local_path)
    point = ResumePoint(point_temp or temp, acked, (info.st_size, info.st_mtime_ns, info.st_ino))
    return journal.update(record.id, resume_point=point.dumps())


def delivered(uploader: Uploader, server: SshdServer, record: FileRecord, data: bytes = BIG) -> None:
    done = uploader.journal.get(record.id)
    assert done.state == FileState.ARCHIVED, (done.state, done.error)
    assert [p.name for p in server.local_remote_dir.iterdir()] == [record.remote_name]  # no temp left
    assert (server.local_remote_dir / str(record.remote_name)).read_bytes() == data


def test_acknowledged_prefix_is_not_sent_again(uploader: Uploader, sshd_server: SshdServer,
                                               counted: list[int]) -> None:
    acked = 1_000_000
    record = cut_short(uploader, sshd_server, BIG[:acked + 12_345], acked)  # more arrived than was answered
    uploader.process(record)
    delivered(uploader, sshd_server, record)
    assert sum(counted) == len(BIG) - acked  # from the acknowledged offset on, each byte once
    assert any("resuming at byte 1000000" in (m or "") for _, _, m in uploader.journal.events(record.id))


def test_everything_acknowledged_is_only_checked_and_renamed(uploader: Uploader, sshd_server: SshdServer,
                                                             counted: list[int]) -> None:
    record = cut_short(uploader, sshd_server, BIG, len(BIG))  # cut after the last status, before publishing
    uploader.process(record)
    delivered(uploader, sshd_server, record)
    assert counted == []


@pytest.mark.parametrize("case", ["temp larger than the file", "server holds less than acknowledged",
                                  "another temporary name", "local copy touched", "no point"])
def test_any_doubt_sends_from_the_first_byte(case: str, uploader: Uploader, sshd_server: SshdServer,
                                             counted: list[int]) -> None:
    acked = 800_000
    prefix, point_temp = BIG[:acked], None
    if case == "temp larger than the file":
        prefix = BIG + b"stale tail of another file\n"
    elif case == "server holds less than acknowledged":
        prefix = BIG[:acked - 1]
    elif case == "another temporary name":
        point_temp = "/imports/.elsewhere.part"
    record = cut_short(uploader, sshd_server, prefix, acked, point_temp)
    if case == "local copy touched":
        os.utime(record.local_path, ns=(1, 1))
    elif case == "no point":
        record = uploader.journal.update(record.id, resume_point=None)
    uploader.process(record)
    delivered(uploader, sshd_server, record)
    assert sum(counted) == len(BIG), case
    assert uploader.journal.get(record.id).resume_point is None


def test_a_new_send_forgets_the_old_point_before_truncating(uploader: Uploader, sshd_server: SshdServer,
                                                            counted: list[int]) -> None:
    """A row sent again from the start (here: queued again) keeps no point from an earlier attempt,
    so a crash right after the new OPEN truncated the temporary file cannot resume into it."""
    record = cut_short(uploader, sshd_server, BIG[:500_000], 500_000)
    record = uploader.journal.update(record.id, state=FileState.QUEUED)
    seen: list[str | None] = []
    open_all = publish.open_all

    def spying(sftp: Any, uploads: Any) -> None:
        seen.append(uploader.journal.get(record.id).resume_point)
        open_all(sftp, uploads)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(publish, "open_all", spying)
        uploader.process(record)
    assert seen == [None]
    delivered(uploader, sshd_server, record)
    assert sum(counted) == len(BIG)


def test_resume_point_round_trip_and_garbage() -> None:
    point = ResumePoint("/imports/.7.part", 123, (4, 5, 6))
    assert ResumePoint.loads(point.dumps()) == point
    for text in (None, "", "{", "[]", '{"temp": 1, "acked": 2, "local": [1, 2, 3]}',
                 '{"temp": "x", "acked": 2, "local": [1, 2]}', '{"temp": "x"}'):
        assert ResumePoint.loads(text) is None, text


def acknowledged(env: AgentEnv) -> int:
    """What the running agent's journal says the server acknowledged of the file being sent."""
    try:
        journal = sqlite3.connect(f"file:{load_config(env.config_path).journal_path}?mode=ro", uri=True)
    except sqlite3.Error:  # not created yet
        return 0
    try:
        rows = journal.execute("SELECT resume_point FROM files WHERE resume_point IS NOT NULL").fetchall()
    except sqlite3.Error:  # not created yet
        return 0
    finally:
        journal.close()
    points = [ResumePoint.loads(text) for (text,) in rows]
    return max((point.acked for point in points if point is not None), default=0)


@pytest.mark.timeout(120)
def test_kill_9_mid_upload_resumes_from_what_the_server_acknowledged(
        sshd_server: SshdServer, sshd_proxy: TcpProxy, proxy_known_hosts: Path, tmp_path: Path) -> None:
    """kill -9 while a 24 MB file is sent (paced by sftp.bandwidth_limit); `run --once` through a
    counting proxy then sends only what was not acknowledged, and the server ends with the file, once."""
    rows = 24_000_000 // 100
    data = b"accountId,id,email\n" + b"".join(
        b"acct-%09d,user-%09d,user.%09d@example.com/padpadpadpadpadpadpad\n" % (i, i, i) for i in range(rows))
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0,
                            sftp_extra="bandwidth_limit = 6000000")  # ~4 s for the file
    env.drop_atomically("users_resume.csv", data)
    env.spawn()
    try:
        assert wait_until(lambda: acknowledged(env) >= 0.4 * len(data), 60, interval=0.02), env.log()[-3000:]
    finally:
        env.kill()
    remote = sshd_server.local_remote_dir
    partial = [path.stat().st_size for path in remote.iterdir()]
    assert len(partial) == 1 and partial[0] < len(data), f"not cut mid-file: {partial}"
    point = acknowledged(env)

    env.write_config(settle_seconds=0, port=sshd_proxy.port, known_hosts=proxy_known_hosts, sftp_extra="")
    result = env.run_once()
    assert result.returncode == 0, result.stderr[-3000:]
    sent = sshd_proxy.bytes_to_target  # SSH bytes of the second run: handshake, requests, file bytes
    assert sent < len(data) - point + 200_000, (sent, len(data), point)
    assert "resumes at byte" in result.stderr
    assert [path.read_bytes() == data for path in remote.iterdir()] == [True]  # once, identical, no temp
    [row] = env.status()
    assert row["state"] == "archived" and row["sha256"] == hashlib.sha256(data).hexdigest()
