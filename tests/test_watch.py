"""Which entries of drop/ are candidates."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.intake.watch import DropScanner, entry_problem, is_ignored_name


@pytest.mark.parametrize("name", [".hidden.csv", "users_a.csv.tmp", "users_a.CSV.PART", "users_a.csv~", "."])
def test_hidden_and_temporary_names_are_ignored(name: str) -> None:
    assert is_ignored_name(name)


@pytest.mark.parametrize("name", ["users_a.csv", "userEvents-x.jsonl", "users.tmp.csv", "part.csv"])
def test_ordinary_names_are_candidates(name: str) -> None:
    assert not is_ignored_name(name)


def test_entry_problem_names_each_kind() -> None:
    assert entry_problem(stat.S_IFREG | 0o644) is None
    assert "symbolic link" in (entry_problem(stat.S_IFLNK | 0o777) or "")
    assert "FIFO" in (entry_problem(stat.S_IFIFO | 0o644) or "")
    assert "folder" in (entry_problem(stat.S_IFDIR | 0o755) or "")
    assert "device" in (entry_problem(stat.S_IFCHR | 0o644) or "")
    assert "socket" in (entry_problem(stat.S_IFSOCK | 0o644) or "")


def test_scanner_locates_drop_and_type_folders_only(tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    scanner = DropScanner(drop, ["users", "user-events"])
    scanner.create_folders()
    assert (drop / "users").is_dir() and (drop / "user-events").is_dir()
    assert scanner.locate(drop / "users_a.csv") == (drop / "users_a.csv", None)
    assert scanner.locate(drop / "users" / "a.csv") == (drop / "users" / "a.csv", "users")
    assert scanner.locate(drop / "other" / "a.csv") is None
    assert scanner.locate(drop / "users" / "deeper" / "a.csv") is None
    assert scanner.locate(drop / "users") is None
    assert scanner.locate(drop / ".a.csv") is None
    (drop / "users_b.csv").write_text("x")
    (drop / "users" / "c.csv").write_text("x")
    (drop / "x.tmp").write_text("x")
    os.mkdir(drop / "other")
    found = sorted((p.name, sub) for p, sub in scanner.scan())
    assert found == [("c.csv", "users"), ("other", None), ("users_b.csv", None)]


class _Event:
    """An inotify event as watchdog's buffer sees it (the fields its pairing reads)."""

    def __init__(self, kind: str, cookie: int, name: str, directory: bool = False) -> None:
        self.is_moved_to = kind == "to"
        self.is_moved_from = kind == "from"
        self.is_directory = directory
        self.cookie = cookie
        self.name = name


class _Buffer:
    """watchdog's InotifyBuffer as `_group_events_by_cookie` uses it: the delayed queue."""

    def __init__(self) -> None:
        from watchdog.utils.delayed_queue import DelayedQueue

        self._queue: DelayedQueue[object] = DelayedQueue(0.02)


def _names(grouped: Sequence[object]) -> list[object]:
    return [(g[0].name, g[1].name) if isinstance(g, tuple) else g.name for g in grouped]  # type: ignore[attr-defined]


def test_moves_are_paired_by_cookie_as_watchdog_pairs_them() -> None:
    """The one-pass pairing gives watchdog's grouping, less the IN_MOVED_FROM of files it cannot
    pair: halves of a rename in one read are paired, a folder's IN_MOVED_TO whose IN_MOVED_FROM an
    earlier read left in the queue is paired from the queue, a move in from outside stays unpaired,
    and a file moved out (or whose other half comes later) is not passed on."""
    from watchdog.observers.inotify_buffer import InotifyBuffer

    from agent.intake.watch import _group_events_by_cookie

    buffer = _Buffer()
    first = [_Event("to", 1, "in_from_outside"), _Event("from", 2, "renamed_a"), _Event("other", 0, "modify"),
             _Event("to", 2, "renamed_b"), _Event("from", 3, "moved_out"),
             _Event("from", 4, "folder_renamed", directory=True)]
    grouped = _group_events_by_cookie(buffer, first)
    assert _names(grouped) == ["in_from_outside", ("renamed_a", "renamed_b"), "modify", "folder_renamed"]
    # watchdog's own method gives the same, with the file moved out
    expected = InotifyBuffer._group_events(_Buffer(), first)  # type: ignore[arg-type]
    assert [name for name in _names(expected) if name != "moved_out"] == _names(grouped)
    for event in grouped:  # as InotifyBuffer.run queues them (unpaired IN_MOVED_FROM with the delay)
        buffer._queue.put(event, delay=not isinstance(event, tuple) and event.is_moved_from)
    second = _group_events_by_cookie(buffer, [_Event("to", 4, "folder_renamed_b", directory=True),
                                              _Event("to", 9, "in")])
    assert _names(second) == [("folder_renamed", "folder_renamed_b"), "in"]
    assert len(buffer._queue._queue) == 3  # the paired IN_MOVED_FROM was taken out of the queue


def test_the_observer_reports_moves_in_out_and_within_drop(tmp_path: Path) -> None:
    """With the agent's pairing in place, a real observer still says what intake needs: a file moved
    in (from outside, or renamed within drop/) is reported at its new name as moved."""
    import threading
    import time

    from agent.intake.watch import DropWatcher

    drop, outside = tmp_path / "drop", tmp_path / "outside"
    drop.mkdir()
    outside.mkdir()
    scanner = DropScanner(drop, [])
    seen: list[tuple[Path, str | None]] = []
    arrived = threading.Event()

    def notice(candidate: tuple[Path, str | None], event: str | None) -> None:
        seen.append((candidate[0], event))
        if candidate[0].name == "users_done.csv":
            arrived.set()

    watcher = DropWatcher(scanner, notice)
    watcher.start()
    try:
        time.sleep(0.2)
        for index in range(300):  # a burst: many IN_MOVED_TO in one read
            (outside / f"users_{index}.csv").write_text("x")
            os.rename(outside / f"users_{index}.csv", drop / f"users_{index}.csv")
        for index in range(100, 200):  # moved out (as claims do): not candidates
            os.rename(drop / f"users_{index}.csv", outside / f"users_{index}.csv")
        os.rename(drop / "users_1.csv", drop / "users_done.csv")  # renamed within drop/
        assert arrived.wait(10)
        time.sleep(0.2)
        # watchdog keeps no record of each file moved out (it kept one per file, for ever)
        [emitter] = list(watcher.observer.emitters)
        assert len(emitter._inotify._inotify._moved_from_events) < 10  # type: ignore[attr-defined]
    finally:
        watcher.stop()
    moved = {path.name for path, event in seen if event == "moved"}
    assert {f"users_{index}.csv" for index in range(300)} <= moved
    assert "users_done.csv" in moved
    assert not {path.name for path, event in seen if event != "moved"} & {"users_done.csv"}


def test_with_no_settle_time_a_file_not_being_written_is_taken_without_a_look(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """settle_seconds = 0: a file renamed in (or found by a scan) is finished at once, without a look
    at its facts (claiming looks at it anyway); one seen being written is still looked at."""
    from agent.intake import settle
    from agent.intake.settle import SettleQueue

    moved, written = tmp_path / "users_moved.csv", tmp_path / "users_written.csv"
    moved.write_text("x")
    written.write_text("x")
    queue = SettleQueue(0.0, lambda _candidates: None)
    queue.notice((moved, None), "moved")
    queue.notice((written, None), "created")  # its writer has it open
    looked: list[str] = []
    real_lstat = os.lstat

    def lstat(path: str | os.PathLike[str]) -> os.stat_result:
        looked.append(os.fspath(path))
        return real_lstat(path)

    monkeypatch.setattr(settle.os, "lstat", lstat)  # type: ignore[attr-defined]
    assert moved in [watched.candidate[0] for watched in queue.settled_now()]
    assert looked == [str(written)]  # only the file being written is looked at


def test_with_no_settle_time_a_file_being_written_waits_for_its_writer_to_close_it(tmp_path: Path) -> None:
    """settle_seconds = 0 drops the quiet time, not the close-write: a file seen being written is
    taken only once its writer closed it (design principle 8)."""
    from agent.intake.settle import SettleQueue

    written = tmp_path / "users_written.csv"
    written.write_text("accountId,id\n")
    queue = SettleQueue(0.0, lambda _candidates: None)
    queue.notice((written, None), "created")  # its writer has it open
    assert queue.settled_now() == []
    queue.notice((written, None), "closed")
    assert [watched.candidate[0] for watched in queue.settled_now()] == [written]
    link = tmp_path / "users_link.csv"
    link.symlink_to(written)  # "created", never closed: not a file to wait for; claiming refuses it
    queue.notice((link, None), "created")
    assert [watched.candidate[0] for watched in queue.settled_now()] == [link]
