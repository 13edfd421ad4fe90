"""The upload threads' SFTP sessions: which connection a thread gets for a file or a batch."""

from __future__ import annotations

import math
import threading
import time

from loguru import logger

from agent.transport.sftp import ConnectError, SftpSession

SPARE_CONNECTION_WAIT = 0.1  # seconds work waits for a busy connection before another is opened
# after the server refused another connection while ours were up (a per-user or per-host connection
# limit): seconds the pool works with the connections it has before it tries to open one more
LIMITED_SECONDS = 300.0
MAX_ACQUIRE_ROUNDS = 4  # connection attempts one acquire() makes before it hands a session over
# a server whose first reply to a step comes within this is near (loopback, the same LAN): there the
# upload threads wait on this process's CPU, not on the link (UploadWorker sends small files on one)
NEAR_REPLY_SECONDS = 0.005


class SessionPool:
    """The upload threads' SFTP sessions (one per thread), lent out per file or batch.

    A thread with work takes a connected session when one is free. When every session in use is
    busy it waits up to SPARE_CONNECTION_WAIT for one to come back before it opens another SSH
    connection (and for as long as a connection being opened takes: one connection is opened at a
    time): where a batch takes longer than that (a slow link, a large file, a burst) more
    connections open, up to `upload.concurrency`; where one connection keeps up (a trickle of
    files) the others are never opened.

    The pool opens the connections itself. When the server drops or refuses a new connection while
    another of ours is up (ProFTPD `MaxClientsPerUser`, OpenSSH `MaxStartups`/`MaxSessions`), the
    pool keeps working with the connections it has and opens no more for LIMITED_SECONDS, saying so
    in one log line: threads wait for a connected session instead. A connection that fails with
    none of ours up is handed to the thread, whose attempt reports that very error (no second try).
    """

    def __init__(self, sessions: list[SftpSession], connect_timeout: float,
                 spare_wait: float = SPARE_CONNECTION_WAIT, limited_seconds: float = LIMITED_SECONDS) -> None:
        self._free = list(sessions)
        self._spare_wait = spare_wait
        self._lent = 0  # sessions in use by a thread (busy, or being connected)
        self._lent_up: set[SftpSession] = set()  # of those, the ones that were connected
        self._connecting = 0  # sessions being connected (by acquire() or connect_ahead())
        self._connect_timeout = connect_timeout
        self._limited_seconds = limited_seconds
        self._limited_until = 0.0  # no new connection before this (time.monotonic())
        self._limits_seen = 0
        self.closed = False
        self._cond = threading.Condition()
        self._quickest_replies: dict[SftpSession, float] = {}  # each session's, when it was given back
        self._near_said = False

    def add(self, session: SftpSession) -> None:
        """One more session to lend (the status poll's: it then shares the pool's connections)."""
        with self._cond:
            self._free.append(session)
            self._cond.notify_all()

    @property
    def limited(self) -> bool:
        """The server refused a further connection lately: the pool opens no new one for now."""
        with self._cond:
            return time.monotonic() < self._limited_until

    def connect_ahead(self) -> None:
        """Open a connection for a free session that has none, before any file needs it."""
        with self._cond:
            session = self._take(connected=False)
            self._connecting += 1
        try:
            session.client()
        except Exception as exc:  # noqa: BLE001 - the first file's attempt retries and reports it
            logger.debug("connecting ahead of the first file failed: {}", exc)
        finally:
            with self._cond:
                self._connecting -= 1
            self.release(session)

    def acquire(self) -> SftpSession:
        """A free session: a connected one; else, once the wait above is over, one connected now."""
        session: SftpSession | None = None
        for _ in range(MAX_ACQUIRE_ROUNDS):
            session, needs_connect, others_up = self._wait_and_take()
            if not needs_connect:
                return self._up(session)
            error = session.try_connect()
            with self._cond:
                self._connecting -= 1
                self._cond.notify_all()
            if error is None:
                return self._up(session)
            if not (others_up and _refused_beyond_limit(error)):
                return session  # the thread's attempt raises `error` (retry, backoff, its own message)
            session.forget_error()
            self._limit(error)
            self.release(session)
        assert session is not None
        return session

    def _wait_and_take(self) -> tuple[SftpSession, bool, bool]:
        """Wait (bounded) for a connected free session; take one, connected if possible. Says
        whether it needs connecting (then counted as being connected) and whether another
        connection of ours is up."""
        now = time.monotonic()
        spare_at, connect_deadline = now + self._spare_wait, now + self._connect_timeout
        with self._cond:
            while not self.closed and not any(session.connected for session in self._free):
                now = time.monotonic()
                if now < self._limited_until and self._lent_up:
                    until = self._limited_until  # a connection of ours comes back: wait for it
                else:
                    until = connect_deadline if self._connecting else spare_at if self._lent else now
                if now >= until:
                    break
                self._cond.wait(until - now)
            if self.closed:
                raise InterruptedError("stopping: the upload sessions are closed")
            session = self._take(connected=True)
            others_up = bool(self._lent_up) or any(other.connected for other in self._free)
            needs_connect = not session.connected
            if needs_connect:
                self._connecting += 1
            return session, needs_connect, others_up

    def _up(self, session: SftpSession) -> SftpSession:
        with self._cond:
            self._lent_up.add(session)
        return session

    def _limit(self, error: Exception) -> None:
        with self._cond:
            self._limited_until = time.monotonic() + self._limited_seconds
            self._limits_seen += 1
            first = self._limits_seen == 1
            up = len(self._lent_up) + sum(1 for session in self._free if session.connected)
        level = "WARNING" if first else "INFO"
        logger.log(level, "the server refused another connection ({}); working with the {} open"
                   " connection(s) and opening no more for {:.0f} minutes", error, up,
                   self._limited_seconds / 60)

    def _take(self, connected: bool) -> SftpSession:
        """A free session, connected as asked if there is one (called with the lock held)."""
        # never empty: each thread holds at most one session and there is one per thread
        index = next((i for i, session in enumerate(self._free) if session.connected == connected), 0)
        self._lent += 1
        return self._free.pop(index)

    def server_near(self) -> bool:
        """A connection's quickest reply came within NEAR_REPLY_SECONDS (measured on the connections
        open when they were last given back; a new connection is not measured until it is)."""
        with self._cond:
            return min(self._quickest_replies.values(), default=math.inf) < NEAR_REPLY_SECONDS

    def release(self, session: SftpSession) -> None:
        """Take a session back, with what its connection measured of the round trip."""
        quickest = session.quickest_reply
        with self._cond:
            self._quickest_replies[session] = quickest
            say_near = quickest < NEAR_REPLY_SECONDS and not self._near_said
            self._near_said = self._near_said or say_near
            self._lent -= 1
            self._lent_up.discard(session)
            kept = not self.closed
            if kept:
                self._free.append(session)
                self._cond.notify_all()
        if say_near:
            logger.info("the server answers within {:.1f} ms: small files go over one connection at a"
                        " time (more would only compete for this machine's CPU)", quickest * 1000)
        if not kept:
            session.close()  # lent out when the pool closed: closed by the thread that had it

    def close(self) -> None:
        """Close the free sessions now, and each lent one when it is given back (a thread stuck in
        a connect or a transfer is not waited for)."""
        with self._cond:
            self.closed = True
            free, self._free = self._free, []
            self._cond.notify_all()
        for session in free:
            session.close()


def _refused_beyond_limit(error: Exception) -> bool:
    """A new connection the server dropped or refused without a verdict on us (not a refused key, not
    a host key problem): with another connection of ours up, a connection limit."""
    return isinstance(error, ConnectError) and error.dropped
