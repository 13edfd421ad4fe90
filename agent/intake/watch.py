"""Finding files in drop/: the watchdog observer, the start-up scan and the rescan job.

Only regular files directly in drop/ or in one of its import-type subfolders are candidates.
Hidden and temporary names are left alone quietly; symlinks, FIFOs, devices, sockets and other
folders are never followed or read, and each is warned about once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from loguru import logger
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from agent.imports.validate import entry_kind

TEMPORARY_SUFFIXES = (".tmp", ".part", "~")
MOVE_PAIRING_SECONDS = 0.02


def _shorten_inotify_move_pairing() -> None:
    """watchdog holds every unpaired IN_MOVED_FROM for `InotifyBuffer.delay` (0.5 s) hoping to pair
    it with its IN_MOVED_TO, and its queue hands out nothing queued behind it meanwhile. Every claim
    moves a file out of drop/ (an unpaired IN_MOVED_FROM), so each next file waited 0.5 s (measured:
    p50 451 ms rename-to-published). Both halves of a rename arrive in the same read, so a short
    window still pairs them.

    Its pairing was also quadratic: each IN_MOVED_TO was compared with every event read before it in
    the same read and then with every event waiting in its queue, so a burst of files moved in
    (hundreds per read) cost its reader thread ~0.1 ms CPU per file. `_group_events_by_cookie` pairs
    the same events by cookie in one pass, and drops what the handler never uses: a file's
    IN_MOVED_FROM that is not paired (each claim makes one) and watchdog's record of it."""
    try:
        from watchdog.observers.inotify_buffer import InotifyBuffer
    except ImportError:  # not Linux: another observer, no such buffer
        return
    InotifyBuffer.delay = MOVE_PAIRING_SECONDS
    InotifyBuffer._group_events = _group_events_by_cookie  # type: ignore[method-assign,assignment]


QUEUED_MOVE_SECONDS = 2.0  # an unpaired IN_MOVED_FROM is looked for in the queue this long at most


def _group_events_by_cookie(buffer: Any, event_list: list[Any]) -> list[Any]:
    """watchdog's `InotifyBuffer._group_events` in one pass: each IN_MOVED_TO is paired with the
    IN_MOVED_FROM of its cookie read before it in this read (a dict lookup), else with a folder's one
    an earlier read left waiting in the queue: that queue is searched only for a cookie such a read
    did leave there (recently; an older one was handed on unpaired long ago).

    Unlike watchdog, a file's IN_MOVED_FROM that this read does not pair is not passed on: the
    handler acts on where a file was moved to, never on where it came from, and a move whose two
    halves are not paired is reported as moved in at its new name all the same. So a claim (a move
    out of drop/) costs the observer's threads nothing, and holds nothing queued behind it for the
    pairing delay. A folder's moves are grouped as watchdog does (its watches follow them)."""
    queued: dict[int, float] = buffer.__dict__.setdefault("_agent_queued_moves", {})
    grouped: list[Any] = []
    unpaired: dict[int, int] = {}  # cookie -> index in grouped of an IN_MOVED_FROM not yet paired
    records = getattr(getattr(buffer, "_inotify", None), "_moved_from_events", None)
    for event in event_list:
        if records is not None and event.is_moved_from and not event.is_directory:
            # watchdog's Inotify keeps every IN_MOVED_FROM to follow moved folders' watches and never
            # drops one: a file's (each claim moves one out of drop/) is of no use to it
            records.pop(event.cookie, None)
        if event.is_moved_to:
            index = unpaired.pop(event.cookie, None)
            if index is not None:
                grouped[index] = (grouped[index], event)
                continue
            if queued.pop(event.cookie, None) is not None:
                cookie = event.cookie

                def waiting(item: Any, cookie: int = cookie) -> bool:
                    return not isinstance(item, tuple) and bool(item.is_moved_from) and item.cookie == cookie

                from_event = buffer._queue.remove(waiting)
                if from_event is not None:
                    grouped.append((from_event, event))
                    continue
            grouped.append(event)
            continue
        if event.is_moved_from:
            unpaired.setdefault(event.cookie, len(grouped))
        grouped.append(event)
    now = time.monotonic()
    while queued:  # oldest first: those handed on long ago are forgotten
        oldest = next(iter(queued))
        if now - queued[oldest] <= QUEUED_MOVE_SECONDS:
            break
        del queued[oldest]
    dropped = set()
    for index in unpaired.values():
        if grouped[index].is_directory:  # run() queues it with the pairing delay
            queued[grouped[index].cookie] = now
        else:
            dropped.add(index)
    return [event for index, event in enumerate(grouped) if index not in dropped] if dropped else grouped


def is_ignored_name(name: str) -> bool:
    """Hidden files and the usual names of files still being written."""
    return name.startswith(".") or name.lower().endswith(TEMPORARY_SUFFIXES)


_NOT_TAKEN = {
    "link": "is a symbolic link; links are never followed",
    "directory": "is a folder that is not an import-type folder; it is not looked into",
    "fifo": "is a FIFO; only regular files are read",
    "socket": "is a socket; only regular files are read",
}


def entry_problem(mode: int) -> str | None:
    """Why an entry must not be read, or None for a regular file."""
    kind = entry_kind(mode)
    return None if kind is None else _NOT_TAKEN.get(kind, "is a device; only regular files are read")


def look_at(path: Path) -> tuple[os.stat_result, str | None] | None:
    """The entry's lstat and why it must not be read (None for a regular file); None when it is gone.
    Intake's claim and `run --dry-run` decide on a drop/ entry through this one look."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info, entry_problem(info.st_mode)


Candidate = tuple[Path, str | None]  # the path and the import-type subfolder it lies in


class DropScanner:
    """Knows the drop folder's layout and turns paths into candidates."""

    def __init__(self, drop: Path, type_folders: list[str]) -> None:
        self.drop = drop
        self.type_folders = set(type_folders)
        self._warned: set[Path] = set()
        self._warned_lock = threading.Lock()

    def create_folders(self) -> None:
        self.drop.mkdir(parents=True, exist_ok=True)
        for folder in sorted(self.type_folders):
            (self.drop / folder).mkdir(exist_ok=True)

    def warn_once(self, path: Path, problem: str) -> None:
        with self._warned_lock:
            if path in self._warned:
                return
            self._warned.add(path)
        logger.warning("left alone: {} {}", path, problem)

    def forget(self, path: Path) -> None:
        with self._warned_lock:
            self._warned.discard(path)

    def locate(self, path: Path) -> Candidate | None:
        """The candidate for a path an event named, or None when it is not ours to take."""
        parent = path.parent
        if parent == self.drop:
            subfolder = None
        elif parent.parent == self.drop and parent.name in self.type_folders:
            subfolder = parent.name
        else:
            return None
        if is_ignored_name(path.name):
            return None
        if subfolder is None and path.name in self.type_folders:
            return None
        return path, subfolder

    def scan(self) -> Iterator[Candidate]:
        folders: list[tuple[Path, str | None]] = [(self.drop, None)]
        folders += [(self.drop / name, name) for name in sorted(self.type_folders)]
        for folder, subfolder in folders:
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.error("cannot list {}: {}", folder, exc.strerror)
                continue
            for entry in sorted(entries, key=lambda e: e.name):
                if is_ignored_name(entry.name):
                    continue
                is_type_folder = entry.name in self.type_folders and entry.is_dir(follow_symlinks=False)
                if subfolder is None and is_type_folder:
                    continue
                yield Path(entry.path), subfolder


Notice = Callable[[Candidate, str | None], object]  # a path, and the event that named it (None: a scan)


class _Handler(FileSystemEventHandler):
    """Hands each event about a candidate to intake with its kind: `created` and `modified` say a
    writer may have it open, `closed` (inotify close-write) and `moved` (renamed in) say it is done."""

    def __init__(self, scanner: DropScanner, notice: Notice) -> None:
        self.scanner = scanner
        self.notice = notice

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write", "deleted"):
            return
        raw = event.dest_path if event.event_type == "moved" else event.src_path
        if not raw:  # moved out of drop/ (full events name no destination)
            return
        path = Path(os.fsdecode(raw))
        candidate = self.scanner.locate(path)
        if candidate is not None:
            self.notice(candidate, event.event_type)


def _observer() -> BaseObserver:
    """The platform's observer; on Linux with full move events, so a file renamed into drop/ from
    outside is reported as moved in (complete), not as created (being written)."""
    try:
        observer: BaseObserver = Observer(generate_full_events=True)  # type: ignore[call-arg]
    except TypeError:  # not inotify
        observer = Observer()
    return observer


class DropWatcher:
    """watchdog observer on drop/ (recursive, so the type subfolders are seen too)."""

    def __init__(self, scanner: DropScanner, notice: Notice) -> None:
        _shorten_inotify_move_pairing()
        self.observer = _observer()
        self.observer.daemon = True
        # only the events the handler acts on: inotify then reports no opens, plain closes or deletes,
        # and no "folder modified" event doubles each file event on its way to the handler
        self.observer.schedule(_Handler(scanner, notice), str(scanner.drop), recursive=True,
                               event_filter=[FileCreatedEvent, FileModifiedEvent, FileClosedEvent,
                                             FileMovedEvent, DirCreatedEvent, DirMovedEvent])

    def start(self) -> None:
        self.observer.start()

    def stop(self) -> None:
        self.observer.stop()
        self.observer.join(timeout=5)
