"""Validation: a generated corpus of bad files (each with its specific message) and valid files."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import ImportsConfig, ImportType
from agent.imports.report import RecordError, ValidationReport
from agent.imports.types import FileFormat
from agent.imports.validate import validate_file

U, E, D, R = (ImportType.USERS, ImportType.USER_EVENTS, ImportType.DELETE_USERS,
              ImportType.REWARD_REDEMPTIONS)
MS = 1_709_647_629_000  # 2024-03-05 in milliseconds


@dataclass(frozen=True)
class Bad:
    id: str
    name: str
    data: bytes
    import_type: ImportType
    message: str  # a substring of the first error's message
    record: int | None = None
    field: str = ""


def jl(*objects: object) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objects)


BAD = [
    Bad("empty", "users_a.csv", b"", U, "the file is empty (0 bytes)"),
    Bad("whitespace only", "users_a.csv", b"\xef\xbb\xbf \r\n\n", U, "it has no header row"),
    Bad("header only", "users_a.csv", b"accountId,id\n", U, "header row but no records"),
    Bad("header only with BOM", "users_a.csv", b"\xef\xbb\xbfaccountId,id\r\n\r\n", U,
        "header row but no records"),
    Bad("binary", "users_a.csv", bytes(range(256)) * 4, U, "contains binary data (NUL bytes)"),
    Bad("NUL after the sniffed start", "users_a.csv",
        b"accountId,id\n" + b"a,b\n" * 20000 + b"a,\x00\n", U, "NUL byte at byte 80015"),
    Bad("xlsx", "users_a.csv", b"PK\x03\x04" + b"\x00" * 100, U, "Excel workbook (.xlsx)"),
    Bad("gzip", "users_a.csv", b"\x1f\x8b\x08\x00rest", U, "gzip-compressed"),
    Bad("UTF-16 with BOM", "users_a.csv", "accountId,id\n1,2\n".encode("utf-16"), U, "UTF-16"),
    Bad("UTF-16 without BOM", "users_a.csv", "accountId,id\n1,2\n".encode("utf-16-le"), U,
        "looks like UTF-16"),
    Bad("invalid UTF-8 (Latin-1)", "users_a.csv", b"accountId,id,firstName\n1,2,ok\n3,4,Ren\xe9\n",
        U, "not valid UTF-8: byte 0xE9 at line 3 (byte 37)"),
    Bad("semicolon delimiter", "users_a.csv", b"accountId;id\n1;2\n", U,
        "looks separated by semicolons"),
    Bad("tab delimiter", "users_a.csv", b"accountId\tid\n1\t2\n", U, "looks separated by tabs"),
    Bad("ragged row, too few", "users_a.csv", b"accountId,id,email\n1,2,a@b.c\n3,4\n", U,
        "the record has 2 values but the header has 3 columns", 2),
    Bad("ragged row, too many", "users_a.csv", b"accountId,id\n1,2\n3,4,5\n", U,
        "the record has 3 values but the header has 2 columns", 2),
    Bad("blank line in the middle", "users_a.csv", b"accountId,id\n1,2\n\n3,4\n", U,
        "blank line in the middle", 2),
    Bad("unclosed quote", "users_a.csv", b'accountId,id\n1,2\n3,"4\n5,6\n', U,
        "a quoted value is never closed", 2),
    Bad("text after closing quote", "users_a.csv", b'accountId,id\n1,"2"x\n', U,
        "a closing quote must be followed by a comma", 1),
    Bad("missing required column", "users_a.csv", b"accountId,email\n1,a@b.c\n", U,
        "the required column 'id' is missing from the header", None, "id"),
    Bad("required column with wrong case", "users_a.csv", b"AccountId,id\n1,2\n", U,
        "(found 'AccountId': names are case-sensitive", None, "accountId"),
    Bad("empty header name", "users_a.csv", b"accountId,id,\n1,2,\n", U,
        "column 3 of the header has no name", None, "column 3"),
    Bad("duplicate column", "users_a.csv", b"accountId,id,id\n1,2,3\n", U,
        "appears more than once", None, "id"),
    Bad("empty required value", "users_a.csv", b"accountId,id\n1,2\n3,\n", U,
        "'id' is required and must not be empty", 2, "id"),
    Bad("whitespace required value", "users_a.csv", b"accountId,id\n  ,2\n", U,
        "'accountId' is required and must not be empty", 1, "accountId"),
    Bad("missing event.key column", "userEvents_a.csv", b"accountId,userId\n1,2\n", E,
        "'event.key' is missing", None, "event.key"),
    Bad("bad boolean", "users_a.csv", b"accountId,id,referable\n1,2,yes\n", U,
        "'referable' must be true or false, got 'yes'", 1, "referable"),
    Bad("bad boolean on deletion", "deleteUsers_a.csv",
        b"accountId,id,doNotTrack\n1,2,TRUE\n1,3,1\n", D, "'doNotTrack' must be true or false", 2,
        "doNotTrack"),
    Bad("timestamp in seconds", "userEvents_a.csv",
        b"accountId,userId,event.key,event.dateTriggered\n1,2,purchase,1709647629\n", E,
        "looks like seconds (multiply by 1000)", 1, "event.dateTriggered"),
    Bad("timestamp as a date", "userEvents_a.csv",
        b"accountId,userId,event.key,event.dateTriggered\n1,2,purchase,2024-03-05\n", E,
        "must be a timestamp in milliseconds (a whole number), got '2024-03-05'", 1,
        "event.dateTriggered"),
    Bad("timestamp in microseconds", "userEvents_a.csv",
        b"accountId,userId,event.key,event.dateTriggered\n1,2,k,1709647629000000\n", E,
        "looks like microseconds", 1, "event.dateTriggered"),
    Bad("bad locale", "users_a.csv", b"accountId,id,locale\n1,2,en_US\n1,3,en-US\n", U,
        "must be language_COUNTRY", 2, "locale"),
    Bad("bad country code", "users_a.csv", b"accountId,id,countryCode\n1,2,ca\n", U,
        "two-letter uppercase country code", 1, "countryCode"),
    Bad("bad tax form date", "users_a.csv", b"accountId,id,dateUsTaxFormSubmitted\n1,2,x\n", U,
        "must be a whole number", 1, "dateUsTaxFormSubmitted"),
    Bad("negative valueToRedeem", "rewardRedemptions_a.csv",
        b"accountId,userId,valueToRedeem\n1,2,-5\n", R, "got the negative '-5'", 1,
        "valueToRedeem"),
    Bad("non-numeric valueToRedeem", "rewardRedemptions_a.csv",
        b"accountId,userId,valueToRedeem\n1,2,$5\n", R, "must be a positive number like 10", 1,
        "valueToRedeem"),
    Bad("zero valueToRedeem", "rewardRedemptions_a.csv",
        b"accountId,userId,valueToRedeem\n1,2,0\n", R, "zero is not redeemed", 1, "valueToRedeem"),
    Bad("empty valueToRedeem", "rewardRedemptions_a.csv",
        b"accountId,userId,valueToRedeem\n1,2,5\n1,3,\n", R, "'valueToRedeem' is required", 2,
        "valueToRedeem"),
    Bad("JSONL array line", "users_a.jsonl", jl({"accountId": "1", "id": "2"}, [1, 2]), U,
        "the line is a JSON array", 2),
    Bad("JSONL whole file array", "users_a.jsonl", jl([{"accountId": "1", "id": "2"}]), U,
        "the whole file looks like one JSON array", 1),
    Bad("JSONL scalar line", "users_a.jsonl", b'"just text"\n', U, "the line is a JSON string", 1),
    Bad("JSONL trailing comma", "users_a.jsonl", b'{"accountId": "1", "id": "2",}\n', U,
        "trailing comma before '}'", 1),
    Bad("JSONL comma between lines", "users_a.jsonl",
        b'{"accountId": "1", "id": "2"},\n{"accountId": "1", "id": "3"}\n', U,
        "a comma after the object", 1),
    Bad("JSONL pretty-printed", "users_a.jsonl", b'{\n  "accountId": "1",\n  "id": "2"\n}\n', U,
        "the file looks pretty-printed", 1),
    Bad("JSONL that is CSV", "users_a.jsonl", b"accountId,id\n1,2\n", U, "not valid JSON", 1),
    Bad("JSONL NaN", "users_a.jsonl", b'{"accountId": "1", "id": "2", "x": NaN}\n', U,
        "NaN is not valid JSON", 1),
    Bad("JSONL missing required key", "users_a.jsonl", jl({"accountId": "1"}), U,
        "'id' is required but the record does not have it", 1, "id"),
    Bad("JSONL null required", "users_a.jsonl", jl({"accountId": None, "id": "2"}), U,
        "'accountId' is required and must not be empty", 1, "accountId"),
    Bad("JSONL nested event.key missing", "userEvents_a.jsonl",
        jl({"accountId": "1", "userId": "2", "event": {"fields": {"revenue": 5}}}), E,
        "'event.key' is required but the record does not have it", 1, "event.key"),
    Bad("JSONL float timestamp", "userEvents_a.jsonl",
        jl({"accountId": "1", "userId": "2", "event": {"key": "k", "dateTriggered": MS + 0.5}}),
        E, "must be a timestamp in milliseconds (a whole number)", 1, "event.dateTriggered"),
    Bad("JSONL custom field array", "users_a.jsonl",
        jl({"accountId": "1", "id": "2", "customFields": {"tags": ["a", "b"]}}), U,
        "custom field 'customFields.tags' must be a single value", 1, "customFields.tags"),
    Bad("JSONL custom field object", "users_a.jsonl",
        jl({"accountId": "1", "id": "2", "customFields": {"plan": {"tier": 1}}}), U,
        "custom field 'customFields.plan' must be a single value", 1, "customFields.plan"),
    Bad("JSONL boolean as text", "users_a.jsonl", jl({"accountId": "1", "id": "2",
                                                      "referable": "yes"}), U,
        "'referable' must be true or false", 1, "referable"),
    Bad("JSONL invalid UTF-8", "users_a.jsonl", b'{"accountId": "1", "id": "Ren\xe9"}\n', U,
        "not valid UTF-8: byte 0xE9", 1),
    Bad("JSONL blank line in the middle", "users_a.jsonl",
        jl({"accountId": "1", "id": "2"}) + b"\n" + jl({"accountId": "1", "id": "3"}), U,
        "blank line in the middle", 2),
    Bad("JSONL line over 1 MiB", "users_a.jsonl",
        b'{"accountId": "1", "id": "' + b"x" * (1 << 20) + b'"}\n' + jl({"accountId": "1",
                                                                        "id": "2"}), U,
        "the line is longer than 1,048,576 bytes", 1),
    Bad("wrong extension", "users_a.txt", b"accountId,id\n1,2\n", U,
        "has the extension '.txt'"),
]


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name.replace("/", "_")
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", BAD, ids=[case.id for case in BAD])
def test_bad_file_is_refused_with_its_reason(tmp_path: Path, case: Bad) -> None:
    report = validate_file(_write(tmp_path, case.name, case.data), case.import_type)
    assert not report.ok and report.error_count >= 1 and report.errors
    first = report.errors[0]
    assert case.message in first.message, report.to_json()
    assert (first.record, first.field) == (case.record, case.field), first


def test_corpus_is_large_enough() -> None:
    assert len(BAD) >= 30


VALID = [
    ("users", "users_a.csv", b"accountId,id,email,referable,locale,countryCode\n"
                             b"a1,u1,u1@example.com,TRUE,en_US,CA\na1,u2,,,,\n", U, 2),
    ("BOM", "users_a.csv", b"\xef\xbb\xbfaccountId,id\n1,2\n", U, 1),
    ("CRLF", "users_a.csv", b"accountId,id\r\n1,2\r\n3,4\r\n", U, 2),
    ("quoted newlines", "users_a.csv",
     b'accountId,id,customFields.note\r\n1,2,"line one\r\nline two, with ""quotes"""\r\n3,4,x\r\n',
     U, 2),
    ("no final newline", "users_a.csv", b"accountId,id\n1,2", U, 1),
    ("trailing blank lines", "users_a.csv", b"accountId,id\n1,2\n\n\n", U, 1),
    ("stray quote inside unquoted value", "users_a.csv", b'accountId,id,firstName\n1,2,O"Neil\n',
     U, 1),
    ("uppercase extension", "users_a.CSV", b"accountId,id\n1,2\n", U, 1),
    ("events", "userEvents_a.csv",
     b"accountId,userId,event.key,event.dateTriggered,event.fields.revenue,event.fields.currency\n"
     + f"a,u,purchase,{MS},12.50,USD\na,u,refund,,3,USD\n".encode(), E, 2),
    ("deletion", "deleteUsers_a.csv",
     b"accountId,id,preserveEmptyAccount,doNotTrack\na,u1,false,True\na,u2,,\n", D, 2),
    ("redemption", "rewardRedemptions_a.csv",
     b"accountId,userId,unit,valueToRedeem\na,u,CENTS,500\na,v,CASH/USD,12.5\n", R, 2),
    ("users JSONL", "users_a.jsonl", jl(
        {"accountId": "a", "id": "u", "referable": True, "locale": "fr_CA",
         "referredBy": {"code": "X", "isConverted": "false"}, "dateUsTaxFormSubmitted": MS,
         "customFields": {"plan": "pro", "seats": 3, "vip": False, "gone": None}},
        {"accountId": "a", "id": "v", "customFields.legacy": "dotted key"}), U, 2),
    ("events JSONL CRLF + BOM", "userEvents_a.jsonl", b"\xef\xbb\xbf" + json.dumps(
        {"accountId": "a", "userId": "u", "event": {"key": "purchase", "dateTriggered": MS,
                                                    "fields": {"revenue": 9.99}}}).encode()
     + b"\r\n\r\n", E, 1),
    ("deletion JSONL", "deleteUsers_a.jsonl", jl({"accountId": "a", "id": "u",
                                                   "doNotTrack": True}), D, 1),
    ("redemption JSONL", "rewardRedemptions_a.jsonl",
     jl({"accountId": "a", "userId": "u", "valueToRedeem": 0.25},
        {"accountId": "a", "userId": "v", "valueToRedeem": "7"}), R, 2),
]


@pytest.mark.parametrize(("label", "name", "data", "import_type", "records"), VALID,
                         ids=[v[0] for v in VALID])
def test_valid_file_passes(tmp_path: Path, label: str, name: str, data: bytes,
                           import_type: ImportType, records: int) -> None:
    report = validate_file(_write(tmp_path, name, data), import_type)
    assert report.ok, report.to_json()
    assert (report.records, report.bytes, report.error_count) == (records, len(data), 0)
    assert report.deletes == (records if import_type == D else 0)
    assert report.format == (FileFormat.JSONL if name.endswith("jsonl") else FileFormat.CSV)


def test_errors_are_kept_to_100_and_all_counted(tmp_path: Path) -> None:
    data = b"accountId,id,referable\n" + b",,maybe\n" * 250
    report = validate_file(_write(tmp_path, "users_a.csv", data), U)
    assert report.error_count == 750 and len(report.errors) == 100
    assert [e.record for e in report.errors[:4]] == [1, 1, 1, 2]
    assert report.records == 250


def test_errors_keep_record_order_across_columns(tmp_path: Path) -> None:
    data = b"accountId,id,referable\n1,2,x\n,2,true\n1,,true\n"
    report = validate_file(_write(tmp_path, "users_a.csv", data), U)
    assert [(e.record, e.field) for e in report.errors] == [
        (1, "referable"), (2, "accountId"), (3, "id")]


def test_errors_before_a_parse_failure_are_still_reported(tmp_path: Path) -> None:
    data = b"accountId,id\n1,\n" + b"1,2\n" * 300 + b'1,"x\n'
    report = validate_file(_write(tmp_path, "users_a.csv", data), U)
    assert [(e.record, e.field) for e in report.errors] == [(1, "id"), (302, "")]
    assert report.records == 301


def test_over_limits(tmp_path: Path) -> None:
    data = b"accountId,id\n" + b"a,b\n" * 11
    path = _write(tmp_path, "users_a.csv", data)
    by_records = validate_file(path, U, ImportsConfig(max_records=10))
    assert by_records.ok and by_records.over_limits and by_records.over_records
    by_bytes = validate_file(path, U, ImportsConfig(max_file_bytes=len(data) - 1))
    assert by_bytes.ok and by_bytes.over_limits and by_bytes.over_bytes
    within = validate_file(path, U, ImportsConfig(max_records=11, max_file_bytes=len(data)))
    assert within.ok and not within.over_limits


def test_report_json(tmp_path: Path) -> None:
    report = validate_file(_write(tmp_path, "deleteUsers_a.csv", b"accountId,id\n1,\n1,2\n"), D)
    assert report.to_json() == {
        "ok": False, "import_type": "delete_users", "format": "csv", "records": 2, "bytes": 20,
        "error_count": 1,
        "errors": [{"recordNumber": 1, "field": "id",
                    "message": "'id' is required and must not be empty"}],
        "over_limits": False, "deletes": 2, "max_file_bytes": 100 * 1024 * 1024,
        "max_records": 500_000,
    }


def test_format_can_be_forced(tmp_path: Path) -> None:
    path = _write(tmp_path, "users_a.txt", jl({"accountId": "1", "id": "2"}))
    assert validate_file(path, U, fmt=FileFormat.JSONL).ok


def test_large_random_file_matches_expectations(tmp_path: Path) -> None:
    rng = random.Random(7)
    lines = [b"accountId,id,referable,locale"]
    bad: list[int] = []
    for number in range(1, 5001):
        referable = rng.choice([b"true", b"FALSE", b""])
        if rng.random() < 0.01:
            referable = b"nope"
            bad.append(number)
        lines.append(b"a%d,u%d,%s,en_US" % (number, number, referable))
    report = validate_file(_write(tmp_path, "users_a.csv", b"\n".join(lines) + b"\n"), U)
    assert report.records == 5000
    assert [e.record for e in report.errors] == bad[:100]


# --- what is not a regular file, or cannot be read ------------------------------------------

def _only(report: ValidationReport) -> RecordError:
    assert not report.ok and report.error_count == 1 and report.records == 0
    return report.errors[0]


def test_symlink_is_refused(tmp_path: Path) -> None:
    target = _write(tmp_path, "real.csv", b"accountId,id\n1,2\n")
    link = tmp_path / "users_link.csv"
    link.symlink_to(target)
    assert "symbolic link" in _only(validate_file(link, U)).message
    assert validate_file(link, U, follow_symlinks=True).ok


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "users_pipe.csv"
    os.mkfifo(fifo)
    assert "FIFO (named pipe)" in _only(validate_file(fifo, U)).message


def test_directory_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "users_dir.csv"
    folder.mkdir()
    assert "is a directory" in _only(validate_file(folder, U)).message


def test_unreadable_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, "users_a.csv", b"accountId,id\n1,2\n")
    real_open = os.open

    def deny(target: object, flags: int, *args: object) -> int:
        if str(target) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(target, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", deny)
    assert "permission denied" in _only(validate_file(path, U)).message


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        validate_file(tmp_path / "users_gone.csv", U)


def test_ragged_rows_keep_record_order(tmp_path: Path) -> None:
    data = b"accountId,id,referable\n1,2,x\n1,2\n,2,true\n"
    report = validate_file(_write(tmp_path, "users_a.csv", data), U)
    assert [(e.record, e.field) for e in report.errors] == [
        (1, "referable"), (2, ""), (3, "accountId")]


def test_utf8_across_read_chunks(tmp_path: Path) -> None:
    head = b"accountId,id,firstName\n"
    filler = b"a,b,c\n" * 12000  # well past the 64 KiB read chunk and sniff window
    before = head + filler + b"a,b,"
    before += b"x" * ((65535 - len(before)) % 65536)
    assert len(before) % 65536 == 65535  # the two bytes of é straddle two reads
    straddling = before + "é".encode() + b"\n"
    assert validate_file(_write(tmp_path, "users_ok.csv", straddling), U).ok
    broken = head + filler + b"a,b,Ren\xe9\n"
    report = validate_file(_write(tmp_path, "users_bad.csv", broken), U)
    offset = len(head) + len(filler) + 7
    assert report.errors[0].message.startswith(
        f"the file is not valid UTF-8: byte 0xE9 at line 12002 (byte {offset})")
