"""fsutil.durable_moves (intake's claim batch, the archive step of an upload batch) and the batch
archive step built on it (`Filer.finish_moves`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.archive import Filer
from agent.config import Config, PathsConfig, SftpConfig
from agent.fsutil import durable_moves
from agent.journal import FileState, Journal


def test_each_move_is_done_or_reported_and_the_others_go_on(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in ("a", "c"):
        (src / name).write_text(name)
    results = durable_moves([(src / "a", dst / "a"), (src / "b", dst / "b"), (src / "c", dst / "c")])
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], FileNotFoundError)
    assert sorted(p.name for p in dst.iterdir()) == ["a", "c"] and list(src.iterdir()) == []


def test_batch_archive_records_what_moved_then_raises_for_the_rest(tmp_path: Path) -> None:
    sftp = SftpConfig(host="127.0.0.1", username="u", private_key=tmp_path / "key",
                      known_hosts=tmp_path / "known_hosts")
    config = Config(sftp=sftp, paths=PathsConfig(drop=tmp_path / "drop", state_dir=tmp_path / "state",
                                                 archive=tmp_path / "archive", failed=tmp_path / "failed"))
    config.spool_dir.mkdir(parents=True)
    journal = Journal(config.journal_path)
    filer = Filer(config, journal)
    try:
        records = journal.add_claims([tmp_path / "drop" / f"users_{i}.csv" for i in range(3)],
                                     config.spool_dir)
        for record in records[::2]:  # the middle one's spool copy is gone
            Path(record.local_path).write_text(record.name)
        intents = journal.update_many([(record.id, None, {
            "state": FileState.UPLOADED, "pending_path": filer.archive_destination(record),
            "pending_state": FileState.ARCHIVED}) for record in records])
        with pytest.raises(FileNotFoundError):
            filer.finish_moves(intents)
        states = [journal.get(record.id) for record in records]
        assert [row.state for row in states] == [FileState.ARCHIVED, FileState.UPLOADED, FileState.ARCHIVED]
        assert Path(states[0].local_path).read_text() == "users_0.csv"
        assert states[1].pending_path is not None  # its intent stays: the retry (resume_move) sees it
    finally:
        journal.close()
