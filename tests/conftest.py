"""Shared pytest fixtures; the logic lives in tests/helpers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:  # `tests.helpers` importable under a bare `pytest` too
    sys.path.insert(0, _REPO)

from agent.config import load_config  # noqa: E402
from agent.ops.keys import write_new_keypair  # noqa: E402
from agent.ops.sandbox import SandboxServer  # noqa: E402
from agent.pipeline.upload import Uploader  # noqa: E402
from agent.store.archive import Filer  # noqa: E402
from agent.store.journal import Journal  # noqa: E402
from agent.transport.sftp import SftpSession  # noqa: E402
from tests.helpers.agent_env import AgentEnv  # noqa: E402
from tests.helpers.sshd import SshdServer  # noqa: E402
from tests.helpers.tcp_proxy import TcpProxy  # noqa: E402

# Tests by cost: `unit` (no server, no agent process; `pytest -m unit` runs in seconds), `server` (a
# real SFTP server, an agent process), `system` (a booted container). A test is `server` when it
# uses one of these fixtures (directly or through another fixture), or when its module or the test
# says so (one that starts a server or an agent itself); `system` only by its module's mark.
SERVER_FIXTURES = frozenset({"sshd_server", "sshd_proxy", "proxy_known_hosts", "sandbox", "server"})
COSTS = ("unit", "server", "system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(cost) for cost in COSTS):
            continue
        uses_server = SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.server if uses_server else pytest.mark.unit)


@pytest.fixture
def sshd_server() -> Iterator[SshdServer]:
    """A started OpenSSH sshd serving SFTP on 127.0.0.1, fresh for each test (~0.1 s).

    As root: chrooted throw-away user, uploads go to ``remote_dir == "/imports"``.
    Fails (never skips) when sshd is not installed.
    """
    with SshdServer() as server:
        yield server
        # shown by pytest only when the test fails
        print(f"--- sshd log {server.log_path} (tail) ---\n{server.read_log()[-4000:]}")


@pytest.fixture
def make_uploader(sshd_server: SshdServer, tmp_path: Path) -> Iterator[Callable[..., Uploader]]:
    """Builds an `Uploader` to `sshd_server` in this process, with the hooks given (its folders
    made; one journal and session, closed at the end)."""
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server)
    config = load_config(env.config_path)
    for folder in (config.spool_dir, config.paths.archive, config.paths.failed):
        folder.mkdir(parents=True, exist_ok=True)
    journal = Journal(config.journal_path)
    session = SftpSession(config.sftp)

    def make(**hooks: Any) -> Uploader:
        return Uploader(config, journal, Filer(config, journal), session, **hooks)

    yield make
    session.close()
    journal.close()


@pytest.fixture
def sshd_proxy(sshd_server: SshdServer) -> Iterator[TcpProxy]:
    """A :class:`TcpProxy` in front of ``sshd_server`` (trust it with ``proxy_known_hosts``)."""
    with TcpProxy(sshd_server.host, sshd_server.port) as proxy:
        yield proxy


@pytest.fixture
def proxy_known_hosts(sshd_server: SshdServer, sshd_proxy: TcpProxy, tmp_path: Path) -> Path:
    """A known_hosts file trusting ``sshd_server``'s host key at the proxy's port."""
    return sshd_server.write_known_hosts(tmp_path / "known_hosts_proxy", port=sshd_proxy.port)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[SandboxServer, Path]]:
    """The asyncssh sandbox SFTP server (fault switches in `server.faults`) and the client key; its
    files are under tmp_path/sftp-root (uploads: tmp_path/sftp-root/imports)."""
    key = tmp_path / "keys" / "id_ed25519"
    public_line = write_new_keypair(key)
    server = SandboxServer(tmp_path / "sftp-root", "test_sandbox0tenant", public_line)
    server.start()
    try:
        yield server, key
    finally:
        server.stop()
