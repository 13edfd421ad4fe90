"""Telling a running agent that there is work now (`retry`), without waiting for the rescan.

The daemon listens on a FIFO in state_dir (`state_dir/wake.fifo`, its own file, mode 0600 under
the unit's UMask); `retry` writes one byte to it. A FIFO needs no signal permission and no PID (the
unit's PrivateUsers=, ProtectProc=invisible hide those), only the write access to state_dir that
`retry` needs for the journal anyway, and opening it for writing fails with ENXIO when no agent
listens, so `retry` can say whether a running agent took the hint. The listening thread blocks in
select() (quiet when idle).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from loguru import logger

FIFO_NAME = "wake.fifo"


def fifo_path(state_dir: Path) -> Path:
    return state_dir / FIFO_NAME


def wake_running_agent(state_dir: Path) -> bool:
    """Nudge the agent running on this state_dir; False when none listens (it is not running)."""
    try:
        fd = os.open(fifo_path(state_dir), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENXIO, errno.ENOENT):  # no reader: no agent; no FIFO: never started
            return False
        raise
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        with contextlib.suppress(BlockingIOError):  # the pipe is full: it has been nudged already
            os.write(fd, b"w")
    finally:
        os.close(fd)
    return True


class WakeListener:
    """The daemon's end: calls `on_wake` each time `wake_running_agent` writes."""

    def __init__(self, state_dir: Path, on_wake: Callable[[], None]) -> None:
        self.path = fifo_path(state_dir)
        self._on_wake = on_wake
        self._fds: list[int] = []
        self._stop_r, self._stop_w = -1, -1
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._open()
        except OSError as exc:  # e.g. a file of that name that is not a FIFO: never replaced
            self._close()
            logger.warning("cannot listen on {} ({}); `retry` takes effect at the next rescan instead",
                           self.path, exc.strerror or exc)
            return
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="wake", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkfifo(self.path, 0o600)
        reader = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        self._fds.append(reader)
        if not stat.S_ISFIFO(os.fstat(reader).st_mode):
            raise OSError(errno.EEXIST, "it exists and is not a FIFO")
        # our own writer: the FIFO never reads as closed (EOF) between two `retry` commands
        self._fds.append(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))

    def _run(self) -> None:
        reader = self._fds[0]
        while True:
            ready, _, _ = select.select([reader, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            with contextlib.suppress(BlockingIOError):
                while os.read(reader, 4096):  # one wake-up for however many nudges came
                    pass
            logger.debug("woken through {}", self.path)
            self._on_wake()

    def stop(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(5.0)
            self._thread = None
        self._close()

    def _close(self) -> None:
        for fd in (*self._fds, self._stop_r, self._stop_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds, self._stop_r, self._stop_w = [], -1, -1
