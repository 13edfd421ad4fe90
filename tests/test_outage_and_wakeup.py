"""After an outage the waiting files go oldest first and promptly once a connection succeeds (the
back-off belongs to the connection, not to each file); `retry` takes effect within a second on a
running agent (issue 15)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from agent.ops.sandbox import SandboxServer
from agent.ops.wakeup import fifo_path, wake_running_agent
from tests.helpers.agent_env import AgentEnv, sandbox_env, wait_until
from tests.helpers.sshd import SshdServer
from tests.helpers.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(120)


def users_csv(tag: str) -> bytes:
    return f"accountId,id,email\nacct-{tag},user-{tag},{tag}@example.com\n".encode()


def test_after_an_outage_waiting_files_go_oldest_first_and_promptly(
        sshd_server: SshdServer, sshd_proxy: TcpProxy, proxy_known_hosts: Path, tmp_path: Path) -> None:
    # one connection, one file at a time: the order of the uploads is the order the agent chose
    env = AgentEnv(tmp_path / "agent", host=sshd_proxy.host, port=sshd_proxy.port,
                   username=sshd_server.username, private_key=sshd_server.user_key_path,
                   known_hosts=proxy_known_hosts, remote_dir=sshd_server.remote_dir, settle_seconds=0)
    max_delay = 1.5
    env.write_config("[upload]\nconcurrency = 1\nbatch_files = 1\n", settle_seconds=0)
    env.config_path.write_text(env.config_path.read_text().replace(
        "max_delay_seconds = 1.0", f"max_delay_seconds = {max_delay}"))
    sshd_proxy.refuse = True  # the server is down
    names = [f"users_wait{i}.csv" for i in range(6)]
    env.start()
    try:
        for index, name in enumerate(names):  # taken one after the other: ids in this order
            env.drop_atomically(name, users_csv(name))
            assert wait_until(lambda index=index: len(env.status()) == index + 1, 15), env.log()
        # several failed connection attempts, each with the oldest file
        assert wait_until(lambda: env.log().count("not uploaded") >= 5, 30), env.log()
        rows = {row["name"]: row for row in env.status()}
        assert [rows[name]["id"] for name in names] == sorted(row["id"] for row in rows.values())
        assert all(row["state"] == "queued" for row in rows.values()), rows
        waiting = [row for row in rows.values() if row["next_attempt_at"]]
        assert len({row["next_attempt_at"] for row in waiting}) <= 1, waiting  # the connection's one time
        back = time.monotonic()
        sshd_proxy.refuse = False
        assert wait_until(lambda: len(env.archived_files()) == len(names), 30), env.log()
        took = time.monotonic() - back
    finally:
        assert env.stop() == 0, env.log()
    uploaded = re.findall(r"#\d+ '(users_wait\d\.csv)' uploaded as ", env.log())
    assert uploaded == names, uploaded  # oldest first
    # the next connection attempt comes within the connection's back-off (capped at max_delay);
    # then nothing waits: each file follows at once
    assert took < max_delay + 6, took


@pytest.mark.timeout(90)
def test_retry_on_a_running_agent_takes_effect_within_a_second(sandbox: tuple[SandboxServer, Path],
                                                              tmp_path: Path) -> None:
    server, key = sandbox
    env = sandbox_env(tmp_path, server, key)  # rescan every 30 s: the wake-up must not wait for it
    server.faults.permission_denied_on_open = True
    env.drop_atomically("users_denied.csv", users_csv("denied"))
    env.start()
    try:
        assert wait_until(lambda: env.states().get("users_denied.csv") == "failed", 20), env.log()
        server.faults.permission_denied_on_open = False
        assert fifo_path(env.state).exists()
        result = env.cli("retry", "users_denied.csv", "--config", str(env.config_path))
        retried = time.monotonic()
        assert result.returncode == 0, result.stderr
        assert "the running agent sends it now" in result.stdout, result.stdout
        assert wait_until(lambda: env.states().get("users_denied.csv") == "archived", 5), env.log()
        assert time.monotonic() - retried < 1.5, env.log()
    finally:
        assert env.stop() == 0, env.log()
    assert not wake_running_agent(env.state)  # nobody listens once it stopped
    server.faults.permission_denied_on_open = True
    env.drop_atomically("users_later.csv", users_csv("later"))
    assert env.run_once().returncode == 1
    server.faults.permission_denied_on_open = False
    result = env.cli("retry", "users_later.csv", "--config", str(env.config_path))
    assert result.returncode == 0 and "the agent is not running" in result.stdout, result.stdout
