"""The settle queue: noticed paths wait here until each file is finished, then intake claims them.

A file is finished when its writer is done with it (ARCHITECTURE.md, rule 6): closed after a write that
was seen, then unchanged for `watch.settle_seconds`; quiet time alone counts only for a file whose
writing was never seen (a scan, a rename into drop/).
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from agent.intake.watch import Candidate

CLAIM_BATCH = 64  # settled files claimed with one journal commit and one fsync per folder
NOTICE_LIMIT = 2000  # paths a rescan hands to the settle queue at once (the rest: when those are in)
WRITER_SILENCE_SECONDS = 600.0  # a file seen being written with no close for this long is taken anyway


@dataclasses.dataclass
class _Watched:
    """A path waiting to settle: what was last seen of it and since when."""

    candidate: Candidate
    signature: tuple[int, int] | None  # (size, mtime_ns) last seen
    since: float  # monotonic time that signature was first seen (or the writer closed the file)
    writing: bool = False  # seen being written and not yet closed (inotify)
    trust_mtime: bool = True  # an old mtime counts as settled (not after a close seen here)
    file_id: int | None = None  # a claimed file to check again (changed after it was taken)


class SettleQueue:
    """Holds noticed paths until each is finished, then claims it.

    A file seen being written (a `created` or `modified` event that changed it) is finished once its
    writer closed it (inotify close-write) and it then stayed unchanged for `settle_seconds`; a file
    found by a scan or renamed in is finished once unchanged for `settle_seconds` (by its mtime or
    by our own watching). Claimed files whose bytes changed wait here the same way (`recheck`) and
    are then checked again from scratch. Waits on a condition variable, never polls: idle costs nothing.
    """

    def __init__(self, settle_seconds: float, claim_many: Callable[[list[Candidate]], object],
                 check_again: Callable[[list[int]], object] | None = None, *,
                 refill: Callable[[], None] | None = None) -> None:
        self.settle_seconds = settle_seconds
        self._claim_many = claim_many  # settled files claimed CLAIM_BATCH at a time (one commit)
        self._check_again = check_again  # claimed files that changed, now stable: checked again
        self._pending: dict[Path, _Watched] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._claiming = False
        self._thread = threading.Thread(target=self._run, name="intake", daemon=True)
        # a rescan that stopped at NOTICE_LIMIT sets more_in_drop; once everything noticed is claimed,
        # intake calls refill (the rescan) for the next part of drop/ (memory stays flat with any backlog)
        self.more_in_drop = False
        self._refill = refill

    def pending_count(self) -> int:
        with self._cond:
            return len(self._pending)

    def notice(self, candidate: Candidate, event: str | None = None) -> bool:
        """Watch this path until it is finished; False when it was already watched. `event` is the
        watchdog event that named it (None: a scan)."""
        path = candidate[0]
        with self._cond:
            watched = self._pending.get(path)
            added = watched is None
            now = time.monotonic()
            if watched is None:
                watched = self._pending[path] = _Watched(candidate, None, now)
            if event in ("closed", "moved"):  # the writer is done: settle from now
                watched.writing, watched.trust_mtime, watched.since = False, False, now
            elif event in ("created", "modified"):
                self._note_write(watched, event, now)
            self._cond.notify()
            return added

    def recheck(self, file_id: int, path: Path) -> None:
        """A claimed file whose bytes changed: check it again once it has been stable for the settle
        time (and is closed, when a writer is seen)."""
        with self._cond:
            self._pending[path] = _Watched((path, None), None, time.monotonic(), trust_mtime=False,
                                           file_id=file_id)
            self._cond.notify()

    @staticmethod
    def _note_write(watched: _Watched, event: str, now: float) -> None:
        """A created file is open for writing by its creator (unless it is a hard link: `ln` makes
        one without writing); a modification that changed size or mtime is a write."""
        try:
            info = os.lstat(watched.candidate[0])
        except OSError:
            return
        current = (info.st_size, info.st_mtime_ns)
        if event == "created" and info.st_nlink > 1:
            return
        if event == "created" or current != watched.signature:
            watched.writing, watched.trust_mtime = True, False
            watched.signature, watched.since = current, now

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def idle(self) -> bool:
        """Nothing waiting to settle and no claim in progress."""
        with self._cond:
            return not self._pending and not self._claiming

    def settled_now(self) -> list[_Watched]:
        """Take every pending path that is finished."""
        ready: list[_Watched] = []
        with self._cond:
            for path in list(self._pending):
                age = self._age(path)  # infinite: gone or not a regular file (claiming says why)
                # a writer still at it is never done, not even with settle_seconds = 0 (0 >= 0)
                if age == math.inf or (age >= self.settle_seconds and not self._pending[path].writing):
                    ready.append(self._pending.pop(path))
            self._claiming = bool(ready)
        return ready

    def _age(self, path: Path) -> float:
        """Seconds the file has been finished: 0 while a writer has it open; else unchanged for this
        long by its mtime (unless a close was seen) or by our own watching of its size and mtime
        (which copes with an mtime in the future). Infinite when it is gone or not a regular file:
        claiming then decides what to say. With no settle time a path not being written is finished
        whatever its facts are (claiming looks at it), so it is not looked at here."""
        if self.settle_seconds <= 0 and not self._pending[path].writing:
            return math.inf
        try:
            info = os.lstat(path)
        except OSError:
            return math.inf
        if not stat.S_ISREG(info.st_mode):
            return math.inf
        watched = self._pending[path]
        now = time.monotonic()
        current = (info.st_size, info.st_mtime_ns)
        if current != watched.signature:
            if watched.signature is not None:
                watched.since = now
            watched.signature = current
        if watched.writing:
            if now - watched.since < WRITER_SILENCE_SECONDS:
                return 0.0
            watched.writing = False
            logger.warning("{} was seen being written and has not changed for {:.0f} s, but its writer was"
                           " never seen closing it; taking it now", path, now - watched.since)
        by_watching = now - watched.since
        return max(time.time() - info.st_mtime, by_watching) if watched.trust_mtime else by_watching

    def _next_wait(self) -> float | None:
        if not self._pending:
            return None
        if self.settle_seconds <= 0:  # whatever the ages: max(0.05, 0 - age)
            return 0.05
        ages = [self._age(path) for path in list(self._pending)]
        return min(max(0.05, self.settle_seconds - age) for age in ages)

    def _run(self) -> None:
        refilled = False
        while True:
            with self._cond:
                if self._stopping:
                    return
                if not refilled:  # after a refill the new paths are looked at at once
                    self._cond.wait(self._next_wait())
                if self._stopping:
                    return
            try:
                ready = self.settled_now()
                again = [watched.file_id for watched in ready if watched.file_id is not None]
                if again and self._check_again is not None:
                    self._guarded(self._check_again, again, f"check again {len(again)} changed file(s)")
                fresh = [watched.candidate for watched in ready if watched.file_id is None]
                for start in range(0, len(fresh), CLAIM_BATCH):
                    batch = fresh[start:start + CLAIM_BATCH]
                    self._guarded(self._claim_many, batch,
                                  f"take {len(batch)} file(s) starting with {batch[0][0]}; they stay in"
                                  " drop/ and are tried again at the next rescan")
                # still "claiming": `run --once` never sees intake idle between two parts of drop/
                refill = self._refill if self.more_in_drop and not self.pending_count() else None
                refilled = refill is not None
                if refill is not None:
                    refill()
            finally:
                with self._cond:
                    self._claiming = False

    @staticmethod
    def _guarded(step: Callable[[Any], object], items: Any, what: str) -> None:
        try:
            step(items)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not stop intake
            logger.opt(exception=exc).error("could not {}: {}", what, exc)
