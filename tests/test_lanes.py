"""A large file on a long link uses further SFTP channels of its connection while the first one's
window is full (issue 17: one OpenSSH channel carries at most its 2 MiB window per round trip); the
server still ends with exactly the file, and a server that allows one session per connection gets
the file over one channel without a fault."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.pipeline.upload import Uploader
from agent.store.archive import Filer
from agent.store.journal import FileRecord, FileState, Journal
from agent.transport import publish
from agent.transport.sftp import SftpSession
from tests.helpers.agent_env import AgentEnv
from tests.helpers.sshd import SshdServer
from tests.helpers.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(120)
DATA = b"accountId,id,email\n" + b"".join(
    b"acct-%08d,user-%08d,user.%08d@example.com\n" % (i, i, i) for i in range(400_000))  # ~20 MB


def make_uploader(server: SshdServer, tmp_path: Path, port: int, known_hosts: Path) -> Uploader:
    env = AgentEnv.for_sshd(tmp_path / "agent", server)
    env.write_config(port=port, known_hosts=known_hosts)
    config = load_config(env.config_path)
    for folder in (config.spool_dir, config.paths.archive, config.paths.failed):
        folder.mkdir(parents=True, exist_ok=True)
    journal = Journal(config.journal_path)
    return Uploader(config, journal, Filer(config, journal), SftpSession(config.sftp))


def queued(uploader: Uploader) -> FileRecord:
    journal = uploader.journal
    record = journal.add_claim("users_big.csv", Path("/drop/users_big.csv"), uploader.config.spool_dir)
    Path(record.local_path).write_bytes(DATA)
    return journal.update(record.id, state=FileState.QUEUED, size=len(DATA),
                          sha256=hashlib.sha256(DATA).hexdigest(), import_type="users",
                          remote_name="users_big_20261129T120000000Z_abcdef12.csv")


@pytest.fixture
def lanes_used(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The lane each WRITE went over."""
    used: list[int] = []
    choose = publish._WriteWindow._lane_for

    def recording(self: publish._WriteWindow, upload: publish.Upload, size: int) -> int:
        index = choose(self, upload, size)
        used.append(index)
        return index

    monkeypatch.setattr(publish._WriteWindow, "_lane_for", recording)
    yield used


def delivered(uploader: Uploader, server: SshdServer, record: FileRecord) -> None:
    done = uploader.journal.get(record.id)
    assert done.state == FileState.ARCHIVED, (done.state, done.error)
    assert [p.name for p in server.local_remote_dir.iterdir()] == [record.remote_name]  # no temp left
    assert (server.local_remote_dir / str(record.remote_name)).read_bytes() == DATA


def test_large_file_on_a_long_link_spreads_over_channels(sshd_server: SshdServer, sshd_proxy: TcpProxy,
                                                         proxy_known_hosts: Path, tmp_path: Path,
                                                         lanes_used: list[int]) -> None:
    sshd_proxy.delay_ms = 40  # 80 ms round trip: one 2 MiB window per round trip is ~26 MB/s
    uploader = make_uploader(sshd_server, tmp_path, sshd_proxy.port, proxy_known_hosts)
    try:
        record = queued(uploader)
        uploader.process(record)
        delivered(uploader, sshd_server, record)
        assert len(lanes_used) >= len(DATA) // (128 * 1024)
        assert len(set(lanes_used)) > 1, "every WRITE went over the first channel"
        # the channels stay with the connection for the next large file
        assert uploader.session.extra_lanes(uploader.session.client())
    finally:
        uploader.session.close()
        uploader.journal.close()


def test_one_session_per_connection_sends_over_one_channel(tmp_path: Path, lanes_used: list[int]) -> None:
    with SshdServer(extra_config=["MaxSessions 1"]) as server, \
            TcpProxy(server.host, server.port, delay_ms=40) as proxy:
        known = server.write_known_hosts(tmp_path / "known_hosts_proxy", port=proxy.port)
        uploader = make_uploader(server, tmp_path, proxy.port, known)
        try:
            record = queued(uploader)
            uploader.process(record)
            delivered(uploader, server, record)
            assert set(lanes_used) == {0}
            assert uploader.session.client().get_channel().get_transport().is_active()
        finally:
            uploader.session.close()
            uploader.journal.close()
