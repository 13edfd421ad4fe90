"""The journal's group commit (issue 7): threads writing at once share a commit, yet each caller
returns only once its own change is durable; readers never see a change not yet committed; a
failing caller undoes only its own change."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from agent.store.journal import FileState, Journal


def fresh(tmp_path: Path, rows: int) -> Journal:
    journal = Journal(tmp_path / "journal.sqlite3")
    for index in range(rows):
        journal.add_claim(f"users_{index}.csv", tmp_path / f"users_{index}.csv", tmp_path)
    return journal


@pytest.mark.timeout(60)
def test_many_threads_writing_at_once_lose_nothing(tmp_path: Path) -> None:
    journal = fresh(tmp_path, 8)
    errors: list[BaseException] = []

    def work(file_id: int) -> None:
        try:
            for attempt in range(1, 41):
                record = journal.update(file_id, attempts=attempt, message=f"try {attempt}")
                assert record.attempts == attempt  # the caller reads its own committed change
            journal.update(file_id, state=FileState.QUEUED)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(file_id,)) for file_id in range(1, 9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors and not any(thread.is_alive() for thread in threads)
    journal.close()
    again = Journal(tmp_path / "journal.sqlite3")  # what is on disk, through a new connection
    try:
        assert {(r.attempts, r.state) for r in again.all()} == {(40, FileState.QUEUED)}
        assert all(len(again.events(file_id)) == 1 + 40 + 1 for file_id in range(1, 9))
    finally:
        again.close()


def test_readers_never_see_a_change_before_its_commit(tmp_path: Path) -> None:
    journal = fresh(tmp_path, 1)
    try:
        with journal._transaction():
            journal._db.execute("UPDATE files SET state = 'queued' WHERE id = 1")
            assert journal.get(1).state == FileState.CLAIMED  # not committed yet
        assert journal.get(1).state == FileState.QUEUED
    finally:
        journal.close()


def test_a_failing_caller_undoes_only_its_own_change_and_raises(tmp_path: Path) -> None:
    journal = fresh(tmp_path, 2)
    try:
        with pytest.raises(sqlite3.OperationalError, match="no such column"), journal._transaction():
            journal._db.execute("UPDATE files SET attempts = 7 WHERE id = 1")
            journal._db.execute("UPDATE files SET nonsense = 1 WHERE id = 1")
        assert journal.get(1).attempts == 0
        assert journal.update(2, attempts=3).attempts == 3  # the journal goes on working
        assert not journal._db.in_transaction
    finally:
        journal.close()
