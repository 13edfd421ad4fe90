"""Which entries of drop/ are candidates."""

from __future__ import annotations

import os
import stat
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
