"""Self-describing spool names, adoption of spool files no row names, find_published (issue 12)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from agent.store.adopt import find_published, reconcile_spool
from agent.store.journal import FileState, Journal, parse_spool_name, spool_name
from tests.helpers.configs import make_config


def test_spool_name_carries_id_and_a_safe_readable_name() -> None:
    assert spool_name(42, "users_jan.csv") == "00000042_users_jan.csv"
    assert parse_spool_name("00000042_users_jan.csv") == (42, "users_jan.csv")
    odd = spool_name(7, "a/b\nc\x1b.csv")
    assert odd == "00000007_a_b_c_.csv" and "/" not in odd
    long = spool_name(1, "users_" + "é" * 300 + ".jsonl")
    assert long.endswith(".jsonl") and len(long.encode()) <= 9 + 120
    assert parse_spool_name("00000009") == (9, "00000009")  # an old-style spool name
    assert parse_spool_name(".00000009_x.saq-tmp") is None


def test_claims_are_spooled_under_id_and_name(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    journal = Journal(tmp_path / "j.sqlite3")
    try:
        [a, b] = journal.add_claims([tmp_path / "drop" / "users_a.csv", tmp_path / "drop" / "users_b.csv"],
                                    config.spool_dir)
        assert Path(a.local_path).name == f"{a.id:08d}_users_a.csv"
        assert Path(b.local_path).name == f"{b.id:08d}_users_b.csv"
    finally:
        journal.close()


def test_spool_files_without_rows_are_adopted_with_their_names(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config.spool_dir.mkdir(parents=True)
    journal = Journal(config.journal_path)
    try:
        [kept] = journal.add_claims([tmp_path / "drop" / "users_kept.csv"], config.spool_dir)
        Path(kept.local_path).write_text("kept")
        (config.spool_dir / "00000005_users_lost.csv").write_text("lost")  # id 5 is free: kept
        (config.spool_dir / f"{kept.id:08d}_users_clash.csv").write_text("clash")  # id taken: renamed
        (config.spool_dir / ".00000009_x.csv.saq-tmp").write_text("staging")  # never adopted
        adopted = reconcile_spool(config, journal)
        by_name = {record.name: record for record in adopted}
        assert set(by_name) == {"users_lost.csv", "users_clash.csv"}
        assert by_name["users_lost.csv"].id == 5
        clash = by_name["users_clash.csv"]
        assert clash.id not in (kept.id, 5) and Path(clash.local_path).read_text() == "clash"
        assert Path(clash.local_path).name == spool_name(clash.id, "users_clash.csv")
        assert all(r.state == FileState.CLAIMED and r.adopted == 1 for r in adopted)
        assert "journal had no row" in str(journal.events(5)[0][2])
        assert reconcile_spool(config, journal) == []  # each file is adopted once
        assert sorted(p.read_text() for p in config.spool_dir.iterdir()) == ["clash", "kept", "lost",
                                                                            "staging"]
    finally:
        journal.close()


def test_adopted_column_is_added_to_an_old_journal(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE files (id INTEGER PRIMARY KEY, name TEXT NOT NULL, source_path TEXT NOT NULL,"
        " local_path TEXT NOT NULL, pending_path TEXT, pending_state TEXT, size INTEGER, sha256 TEXT,"
        " import_type TEXT, remote_name TEXT, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
        " error TEXT, next_attempt_at REAL, created_at TEXT NOT NULL, updated_at TEXT NOT NULL);"
        "INSERT INTO files (name, source_path, local_path, state, created_at, updated_at)"
        " VALUES ('a.csv', '/d/a.csv', '/s/1', 'queued', 'x', 'x');")
    db.close()
    journal = Journal(path)
    try:
        [row] = journal.all()
        assert row.adopted == 0 and row.force_resend == 0
    finally:
        journal.close()


def test_find_published_matches_hash_extension_and_size(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    journal = Journal(tmp_path / "j.sqlite3")
    try:
        [record] = journal.add_claims([tmp_path / "drop" / "users_jan.csv"], config.spool_dir)
        data = b"accountId,id\n1,2\n"
        digest = hashlib.sha256(data).hexdigest()
        record = journal.update(record.id, sha256=digest, size=len(data))
        sha8 = digest[:8]
        listing = {
            f"users_jan_20240101T000000000Z_{sha8}.jsonl": len(data),  # other extension
            f"users_jan_20240101T000000000Z_{sha8}.csv.status": len(data),  # a status file
            f"users_feb_20240101T000000000Z_{sha8}.csv": len(data) + 1,  # other size
            f".{record.id}.part": len(data),  # a temporary file
            "users_jan_20240101T000000000Z_00000000.csv": len(data),  # other content
        }
        assert find_published(listing, record) is None
        published = f"users_x_20240102T000000000Z_{sha8}.csv"
        assert find_published({**listing, published: len(data)}, record) == published
        part = f"users_x_20240102T000000000Z_{sha8}_part1of2.CSV"
        assert find_published({part: len(data)}, record) == part
    finally:
        journal.close()
