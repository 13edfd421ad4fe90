"""SessionPool (agent/transport/session_pool.py): which SFTP session an upload thread gets, against real sshd.

A connected session is lent first; a thread finding every session in use waits for one to come back
before a new connection is opened; closing the pool stops waiting threads.
"""

from __future__ import annotations

import threading

import pytest

from agent.config import SftpConfig
from agent.transport.session_pool import SessionPool
from agent.transport.sftp import SftpSession
from tests.helpers.servers import ProftpdServer
from tests.helpers.sshd import SshdServer

pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]  # real servers


def sessions(server: SshdServer | ProftpdServer, count: int) -> list[SftpSession]:
    config = SftpConfig(host=server.host, port=server.port, username=server.username,
                        private_key=server.user_key_path, known_hosts=server.known_hosts_path,
                        remote_dir=server.remote_dir, connect_timeout=10.0)
    return [SftpSession(config) for _ in range(count)]


def test_connected_session_is_lent_first_and_reused(sshd_server: SshdServer) -> None:
    first, second, third = sessions(sshd_server, 3)
    pool = SessionPool([first, second, third], connect_timeout=10.0)
    try:
        pool.connect_ahead()  # connects one of them and gives it back
        connected = [s for s in (first, second, third) if s.connected]
        assert len(connected) == 1
        for _ in range(5):  # a lone file at a time rides the open connection: no new handshake
            session = pool.acquire()
            assert session is connected[0]
            session.client().listdir(sshd_server.remote_dir)
            pool.release(session)
        assert sum(s.connected for s in (first, second, third)) == 1
    finally:
        pool.close()


def test_busy_connection_is_waited_for_then_a_new_one_is_opened(sshd_server: SshdServer) -> None:
    first, second = sessions(sshd_server, 2)
    pool = SessionPool([first, second], connect_timeout=10.0, spare_wait=0.05)
    try:
        held = pool.acquire()
        held.client()  # connected and in use by another thread
        got: list[SftpSession] = []
        waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
        waiter.start()
        waiter.join(10.0)  # the session in use never comes back: after the wait, the other one,
        assert got and got[0] is not held and got[0].connected  # connected by the pool
    finally:
        pool.close()


def test_session_given_back_during_the_wait_is_reused(sshd_server: SshdServer) -> None:
    first, second = sessions(sshd_server, 2)
    pool = SessionPool([first, second], connect_timeout=10.0, spare_wait=30.0)
    try:
        held = pool.acquire()
        held.client()
        got: list[SftpSession] = []
        waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive() and not got  # waiting for the busy connection, not opening one
        pool.release(held)
        waiter.join(10.0)
        assert got == [held] and held.connected and not any(s.connected for s in (first, second)
                                                             if s is not held)
    finally:
        pool.close()


def test_closing_the_pool_stops_a_waiting_thread(sshd_server: SshdServer) -> None:
    (only,) = sessions(sshd_server, 1)
    pool = SessionPool([only], connect_timeout=10.0)
    pool.connect_ahead()
    held = pool.acquire()
    pool.close()  # the lent session is closed when it is given back
    with pytest.raises(InterruptedError):
        pool.acquire()
    pool.release(held)
    assert not held.connected


def test_a_refused_second_connection_limits_the_pool_to_the_open_one(tmp_path: object) -> None:
    """ProFTPD `MaxClientsPerUser 1` logs us in, then disconnects a second connection: the pool keeps
    the first, lends it to the next thread when it comes back, and opens no other for a while."""
    from loguru import logger

    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="INFO", format="{level} {message}")
    with ProftpdServer(["MaxClientsPerUser 1"]) as server:
        first, second, third = sessions(server, 3)
        pool = SessionPool([first, second, third], connect_timeout=10.0, spare_wait=0.05)
        try:
            held = pool.acquire()
            assert held.connected
            got: list[SftpSession] = []
            waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
            waiter.start()
            waiter.join(3.0)
            assert waiter.is_alive() and not got and pool.limited  # refused, now waits for `held`
            pool.release(held)
            waiter.join(10.0)
            assert got == [held]
            pool.release(held)
            again = pool.acquire()  # limited: the open connection, no new attempt
            assert again is held
            pool.release(again)
            assert sum(s.connected for s in (first, second, third)) == 1
        finally:
            pool.close()
            logger.remove(sink)
    limit_lines = [line for line in lines if "refused another connection" in line]
    assert len(limit_lines) == 1 and limit_lines[0].startswith("WARNING"), lines
    assert not any(line.startswith("ERROR") or "pasted" in line for line in lines), lines
