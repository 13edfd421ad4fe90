"""Resuming an interrupted upload looks at the server first (the publish protocol's crash windows)."""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.pipeline.upload import Uploader
from agent.store.archive import Filer
from agent.store.journal import FileRecord, FileState, Journal
from agent.transport.sftp import SftpSession
from tests.helpers.agent_env import AgentEnv
from tests.helpers.sshd import SshdServer

DATA = b"accountId,id\nacct-1,user-1\n"


@pytest.fixture
def uploader(sshd_server: SshdServer, tmp_path: Path) -> Iterator[Uploader]:
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server)
    config = load_config(env.config_path)
    for folder in (config.spool_dir, config.paths.archive, config.paths.failed):
        folder.mkdir(parents=True, exist_ok=True)
    journal = Journal(config.journal_path)
    session = SftpSession(config.sftp)
    yield Uploader(config, journal, Filer(config, journal), session)
    session.close()
    journal.close()


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
