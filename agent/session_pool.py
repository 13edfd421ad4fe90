"""The upload threads' SFTP sessions: which connection a thread gets for a file or a batch."""

from __future__ import annotations

import threading
import time

from loguru import logger

from agent.sftp import SftpSession

SPARE_CONNECTION_WAIT = 0.1  # seconds work waits for a busy connection before another is opened


class SessionPool:
    """The upload threads' SFTP sessions (one per thread), lent out per file or batch.

    A thread with work takes a connected session when one is free. When every session in use is
    busy it waits up to SPARE_CONNECTION_WAIT for one to come back before it opens another SSH
    connection (and for as long as a connection opened ahead takes): where a batch takes longer
    than that (a slow link, a large file, a burst) more connections open, up to `upload.concurrency`;
    where one connection keeps up (a trickle of files) the others are never opened.
    """

    def __init__(self, sessions: list[SftpSession], connect_timeout: float,
                 spare_wait: float = SPARE_CONNECTION_WAIT) -> None:
        self._free = list(sessions)
        self._spare_wait = spare_wait
        self._lent = 0  # sessions in use by a thread (busy, or being connected)
        self._connecting = 0  # of those, being connected by connect_ahead()
        self._connect_timeout = connect_timeout
        self.closed = False
        self._cond = threading.Condition()

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
        """A free session: a connected one; else, once the wait above is over, one to connect."""
        now = time.monotonic()
        spare_at, connect_deadline = now + self._spare_wait, now + self._connect_timeout
        with self._cond:
            while not self.closed and not any(session.connected for session in self._free):
                now = time.monotonic()
                until = connect_deadline if self._connecting else spare_at if self._lent else now
                if now >= until:
                    break
                self._cond.wait(until - now)
            if self.closed:
                raise InterruptedError("stopping: the upload sessions are closed")
            return self._take(connected=True)

    def _take(self, connected: bool) -> SftpSession:
        """A free session, connected as asked if there is one (called with the lock held)."""
        # never empty: each thread holds at most one session and there is one per thread
        index = next((i for i, session in enumerate(self._free) if session.connected == connected), 0)
        self._lent += 1
        return self._free.pop(index)

    def release(self, session: SftpSession) -> None:
        with self._cond:
            self._lent -= 1
            if not self.closed:
                self._free.append(session)
                self._cond.notify_all()
                return
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
