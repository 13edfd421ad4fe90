"""Quarantine texts: `<name>.errors.csv` content and the one-paragraph reason."""

from __future__ import annotations

import csv
from pathlib import Path

from agent.config import ImportsConfig, ImportType
from agent.imports.quarantine import errors_csv_text, reason_paragraph
from agent.imports.report import RecordError
from agent.imports.types import classify
from agent.imports.validate import validate_file
from agent.store.fsutil import write_durably


def _read(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle))


def test_errors_csv_columns_and_rows(tmp_path: Path) -> None:
    path = tmp_path / "users_a.csv.errors.csv"
    write_durably(path, errors_csv_text([RecordError(2, "id", "'id' is required, and must not be empty"),
                                         RecordError(None, "", "the file is not valid UTF-8")]))
    assert _read(path) == [
        ["recordNumber", "field", "message"],
        ["2", "id", "'id' is required, and must not be empty"],
        ["", "", "the file is not valid UTF-8"],
    ]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_errors_csv_from_a_report_says_how_many_were_not_kept(tmp_path: Path) -> None:
    source = tmp_path / "users_a.csv"
    source.write_bytes(b"accountId,id\n" + b"1,\n" * 130)
    report = validate_file(source, ImportType.USERS)
    rows = _read_text(errors_csv_text(report))
    assert len(rows) == 1 + 100 + 1
    assert rows[1] == ["1", "id", "'id' is required and must not be empty"]
    assert rows[-1][2].startswith("... and 30 more errors not listed (130 in total")


def _read_text(text: str) -> list[list[str]]:
    return list(csv.reader(text.splitlines()))


def test_errors_csv_from_a_refusal() -> None:
    refusal = classify("report.csv", None, ImportsConfig()).refusal
    assert refusal is not None
    rows = _read_text(errors_csv_text(refusal))
    assert rows[0] == ["recordNumber", "field", "message"] and rows[1][:2] == ["", ""]
    assert "has no import type" in rows[1][2]


def test_reason_for_invalid_records(tmp_path: Path) -> None:
    source = tmp_path / "deleteUsers_gdpr.csv"
    source.write_bytes(b"accountId,id,doNotTrack\n1,,true\n2,3,yes\n4,5,false\n")
    report = validate_file(source, ImportType.DELETE_USERS)
    text = reason_paragraph(source.name, report)
    assert "\n" not in text
    assert text.startswith("deleteUsers_gdpr.csv was not uploaded")
    assert "user deletion file (MUTATION/DELETE_USER)" in text
    assert "2 problems" in text and "Records affected: 1, 2." in text
    assert "record 1: 'id' is required" in text and "record 2: 'doNotTrack' must be" in text
    assert "deleteUsers_gdpr.csv.errors.csv" in text and "drop the corrected copy again" in text
    assert "No users were deleted." in text


def test_reason_for_a_whole_file_problem(tmp_path: Path) -> None:
    source = tmp_path / "users_a.csv"
    source.write_bytes(b"accountId;id\n1;2\n")
    text = reason_paragraph(source.name, validate_file(source, ImportType.USERS))
    assert "1 problem that" in text and "the file: the header row is a single column" in text
    assert "Records affected" not in text


def test_reason_for_a_refusal_with_an_odd_name() -> None:
    name = "report\nfinal.csv"
    refusal = classify(name, None, ImportsConfig()).refusal
    assert refusal is not None
    text = reason_paragraph(name, refusal)
    assert "\n" not in text and text.startswith("report?final.csv was not uploaded:")
    assert "Accepted name prefixes" in text and "nothing was sent to SaaSquatch" in text


def test_reason_for_an_oversized_file_refused_by_policy(tmp_path: Path) -> None:
    source = tmp_path / "users_a.csv"
    source.write_bytes(b"accountId,id\n" + b"1,2\n" * 5)
    report = validate_file(source, ImportType.USERS, ImportsConfig(max_records=4))
    text = reason_paragraph(source.name, report)
    assert "5 records" in text and "4 records per file" in text
    assert 'imports.oversize = "split"' in text
