"""fsutil.durable_moves (intake's claim batch, the archive step of an upload batch) and the batch
archive step built on it (`Filer.finish_moves`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Config, PathsConfig, SftpConfig
from agent.store import archive
from agent.store.archive import Filer
from agent.store.fsutil import durable_moves
from agent.store.journal import FileState, Journal
from tests.helpers.configs import make_config


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
    config = make_config(tmp_path)
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


# ---------------------------------------------------------------- never replace (issue 12)

import errno  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402

from agent.store import fsutil  # noqa: E402


@pytest.fixture(params=["renameat2", "link"])
def primitive(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with renameat2(RENAME_NOREPLACE) and with the link + unlink fallback."""
    if request.param == "link":
        monkeypatch.setattr(fsutil, "_use_renameat2", False)
    else:
        assert fsutil._renameat2 is not None, "glibc has renameat2 on this machine"
    return str(request.param)


def test_place_never_replaces_an_existing_name(tmp_path: Path, primitive: str) -> None:
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").write_text("old")
    with pytest.raises(FileExistsError):
        fsutil.place(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a").read_text() == "new" and (tmp_path / "b").read_text() == "old"
    fsutil.place(tmp_path / "a", tmp_path / "c")
    assert not (tmp_path / "a").exists() and (tmp_path / "c").read_text() == "new"
    errors = fsutil.durable_moves([(tmp_path / "c", tmp_path / "b")])
    assert isinstance(errors[0], FileExistsError) and (tmp_path / "b").read_text() == "old"


def test_place_finishes_a_link_a_crash_left_with_two_names(tmp_path: Path, primitive: str) -> None:
    (tmp_path / "a").write_text("data")
    os.link(tmp_path / "a", tmp_path / "b")  # the crash came between link and unlink
    fsutil.place(tmp_path / "a", tmp_path / "b")
    assert not (tmp_path / "a").exists() and (tmp_path / "b").read_text() == "data"


def test_move_across_filesystems_never_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_place = fsutil.place

    def no_cross(src: Path, dst: Path, *, replace: bool = False) -> None:
        if src.parent != dst.parent:  # what rename(2) says across filesystems
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_place(src, dst, replace=replace)

    monkeypatch.setattr(fsutil, "place", no_cross)
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    (tmp_path / "src" / "a").write_text("moved")
    (tmp_path / "src" / "b").write_text("kept")
    (tmp_path / "dst" / "b").write_text("theirs")
    errors = fsutil.durable_moves([(tmp_path / "src" / "a", tmp_path / "dst" / "a"),
                                   (tmp_path / "src" / "b", tmp_path / "dst" / "b")])
    assert errors[0] is None and isinstance(errors[1], FileExistsError)
    assert (tmp_path / "dst" / "a").read_text() == "moved" and not (tmp_path / "src" / "a").exists()
    assert (tmp_path / "dst" / "b").read_text() == "theirs" and (tmp_path / "src" / "b").read_text() == "kept"
    assert sorted(os.listdir(tmp_path / "dst")) == ["a", "b"]  # no staging file left


def test_durable_writer_never_replaces_and_leaves_nothing_on_error(tmp_path: Path, primitive: str) -> None:
    target = tmp_path / "x.reason.txt"
    fsutil.write_durably(target, "first\n")
    with pytest.raises(FileExistsError):
        fsutil.write_durably(target, "second\n")
    with pytest.raises(RuntimeError), fsutil.durable_writer(tmp_path / "y") as handle:
        handle.write(b"half")
        raise RuntimeError("writer failed")
    fsutil.write_durably(target, "renewed\n", replace=True)  # the agent's own file, on purpose
    assert target.read_text() == "renewed\n" and sorted(os.listdir(tmp_path)) == ["x.reason.txt"]


def test_nothing_in_agent_renames_or_replaces_but_fsutil() -> None:
    """Every move and write goes through fsutil.place (no-replace by default)."""
    root = Path(__file__).resolve().parent.parent / "agent"
    pattern = re.compile(r"\bos\.(rename|replace|renames)\s*\(|\bshutil\.move\s*\(|\.rename\(|\.replace\(")
    offenders = []
    for path in root.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            for found in pattern.finditer(code):
                text = found.group(0)
                if text in (".rename(", ".replace(") and not re.search(
                        r"\b(Path|path|src|dst|source|target|staging|temp|dest|folder|spool)\w*\.(rename|replace)\(",
                        code):
                    continue  # str.replace, sftp.rename (remote), datetime.replace
                offenders.append(f"{path.relative_to(root.parent)}:{number}: {line.strip()}")
    allowed = {"agent/store/fsutil.py"}
    assert [o for o in offenders if o.split(":", 1)[0] not in allowed] == []


def test_refused_file_waits_for_failed_folder_and_moves_on_without_restart(tmp_path: Path) -> None:
    """failed/ unusable: the file stays in the spool with its intent; resume_held (the archive
    job's first step) moves it once failed/ works again, in the same process."""
    config = make_config(tmp_path)
    config.spool_dir.mkdir(parents=True)
    config.paths.failed.write_text("not a folder")
    journal = Journal(config.journal_path)
    filer = Filer(config, journal)
    try:
        [record] = journal.add_claims([tmp_path / "drop" / "users_x.csv"], config.spool_dir)
        Path(record.local_path).write_text("refused bytes")
        held = filer.quarantine(record, "bad file")
        assert held.state == FileState.FAILED and held.pending_path is not None
        assert Path(held.local_path).read_text() == "refused bytes"
        assert filer.resume_held() == 0  # still unusable: nothing moves, nothing lost
        config.paths.failed.unlink()
        assert filer.resume_held() == 1
        done = journal.get(record.id)
        assert done.pending_path is None and Path(done.local_path) == config.paths.failed / "users_x.csv"
        assert Path(done.local_path).read_text() == "refused bytes"
        assert (config.paths.failed / "users_x.csv.reason.txt").read_text() == "bad file\n"
    finally:
        journal.close()


def test_reservation_covers_every_side_name(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config.paths.failed.mkdir(parents=True)
    journal = Journal(tmp_path / "j.sqlite3")
    filer = Filer(config, journal)
    try:
        failed = config.paths.failed
        (failed / "a.csv.reason.txt").write_text("x")  # a refused file of that name
        assert filer._reserve(failed, "a.csv", "7").name == "a-7.csv"
        (failed / "b.csv").write_text("x")
        assert filer._reserve(failed, "b.csv.gz", "8").name == "b-8.csv.gz"  # a side name of b.csv
        assert filer._reserve(failed, "b.csv.server.x", "9").name == "b-9.csv.server.x"
        (failed / "c.csv.server.c.csv.status").write_text("x")
        assert filer._reserve(failed, "c.csv", "10").name == "c-10.csv"
        first = filer._reserve(failed, "d.csv", "11")
        assert first.name == "d.csv"
        assert filer._reserve(failed, "d.csv.errors.csv", "12").name == "d-12.csv.errors.csv"
        assert filer._reserve(failed, "d.csv", "13").name == "d-13.csv"  # reserved for #11
        server_file = filer._reserve(failed, "e.csv.server.r.csv", "14")  # the server's file of an e.csv
        assert filer._reserve(failed, "e.csv", "15").name == "e-15.csv"
        filer._release(server_file)  # written, or given up: e.csv.server.r.csv is no longer reserved
        assert filer._reserve(failed, "e.csv", "16").name == "e.csv"
    finally:
        journal.close()


def test_finish_interrupted_move_unlinks_only_a_second_name_of_the_same_file(tmp_path: Path) -> None:
    """A claim cut short between link and unlink: drop/ and spool/ name one inode; the drop/ name
    goes (so the spool copy is not refused as a hard-linked file). A different file is kept."""
    drop, spool = tmp_path / "drop.csv", tmp_path / "spool.csv"
    spool.write_bytes(b"claimed")
    os.link(spool, drop)
    fsutil.finish_interrupted_move(drop, spool)
    assert not drop.exists() and spool.read_bytes() == b"claimed" and spool.stat().st_nlink == 1
    drop.write_bytes(b"a new file of the same name")
    fsutil.finish_interrupted_move(drop, spool)
    assert drop.read_bytes() == b"a new file of the same name"


def test_batch_reservation_lists_the_folder_once_and_keeps_every_rule(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """archive_destinations: one listing of the day's folder for a whole batch (a listing per file made a
    busy day quadratic), with the same names one-by-one reservation gives."""
    sftp = SftpConfig(host="127.0.0.1", username="u", private_key=tmp_path / "key",
                      known_hosts=tmp_path / "known_hosts")
    config = Config(sftp=sftp, paths=PathsConfig(drop=tmp_path / "drop", state_dir=tmp_path / "state",
                                                 archive=tmp_path / "archive", failed=tmp_path / "failed"))
    journal = Journal(tmp_path / "j.sqlite3")
    filer = Filer(config, journal)
    try:
        folder = filer._archive_folder()
        folder.mkdir(parents=True)
        for i in range(300):
            (folder / f"old{i}.csv").write_text("x")
        (folder / "b.csv.server.result_b.csv").write_text("x")  # the server's file of an earlier b.csv
        (folder / "a.csv").write_text("x")
        records = [journal.add_claim(name, tmp_path / "drop" / name, config.spool_dir)
                   for name in ("a.csv", "b.csv", "c.csv", "c.csv", "c.csv.server.x", "new.csv")]
        listings: list[Path] = []
        real = archive.os.listdir

        def counting(path: Path) -> list[str]:
            listings.append(path)
            return real(path)

        monkeypatch.setattr(archive.os, "listdir", counting)
        names = [dest.name for dest in filer.archive_destinations(records)]
        assert len(listings) == 1
        ids = [record.id for record in records]
        assert names == [f"a-{ids[0]}.csv", f"b-{ids[1]}.csv", "c.csv", f"c-{ids[3]}.csv",
                         f"c-{ids[4]}.csv.server.x", "new.csv"]
    finally:
        journal.close()
