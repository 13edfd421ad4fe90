"""Splitting: parts within both limits whose records, joined, equal the original's exactly."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import ImportsConfig, ImportType
from agent.imports.split import SplitError, split_file
from agent.imports.types import FileFormat
from agent.imports.validate import validate_file
from agent.store.fsutil import durable_moves

BOM = b"\xef\xbb\xbf"


def csv_rows(data: bytes) -> list[list[str]]:
    text = data.removeprefix(BOM).decode("utf-8")
    return [row for row in csv.reader(io.StringIO(text, newline=""), strict=True) if row]


def jsonl_objects(data: bytes) -> list[object]:
    return [json.loads(line) for line in data.removeprefix(BOM).splitlines() if line.strip()]


def _check_parts(parts: list[Path], max_bytes: int, max_records: int, fmt: FileFormat,
                 original: bytes) -> None:
    assert parts, "at least one part"
    n = len(parts)
    joined: list[object] = []
    for k, part in enumerate(parts, start=1):
        assert part.name.endswith(f"_part{k}of{n}.{fmt.value}")
        data = part.read_bytes()
        assert not data.startswith(BOM)
        assert len(data) <= max_bytes
        if fmt == FileFormat.CSV:
            rows = csv_rows(data)
            assert rows[0] == csv_rows(original)[0], "every CSV part repeats the header"
            records: list[object] = list(rows[1:])
        else:
            records = jsonl_objects(data)
        assert 1 <= len(records) <= max_records
        joined.extend(records)
    expected = csv_rows(original)[1:] if fmt == FileFormat.CSV else jsonl_objects(original)
    assert joined == expected


cell = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | \
    st.sampled_from(["", ",", '"', '""', "a\nb", "a\r\nb", "x\ry", " lead", "é😀"])


def _serialise(row: list[str], terminator: str) -> str:
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator=terminator).writerow(row)
    return out.getvalue()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 4),
    data=st.data(),
    terminator=st.sampled_from(["\n", "\r\n"]),
    bom=st.booleans(),
    final_newline=st.booleans(),
    max_records=st.integers(1, 12),
    slack=st.integers(0, 200),
)
def test_csv_split_property(width: int, data: st.DataObject, terminator: str, bom: bool,
                            final_newline: bool, max_records: int, slack: int) -> None:
    header = [f"col{i}" for i in range(width)]
    rows = data.draw(st.lists(st.lists(cell, min_size=width, max_size=width), min_size=1,
                              max_size=40))
    lines = [_serialise(row, terminator) for row in [header, *rows]]
    text = "".join(lines) if final_newline else "".join(lines)[: -len(terminator)]
    original = (BOM if bom else b"") + text.encode("utf-8")
    max_bytes = len(lines[0].encode()) + max(len(line.encode()) for line in lines[1:]) + slack
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "users_big.csv"
        source.write_bytes(original)
        parts = split_file(source, FileFormat.CSV, max_bytes, max_records, tmp, move=durable_moves)
        _check_parts(parts, max_bytes, max_records, FileFormat.CSV, original)
        assert source.read_bytes() == original


json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6,
)


@settings(max_examples=80, deadline=None)
@given(
    objects=st.lists(st.dictionaries(st.text(max_size=6), json_value, max_size=4), min_size=1,
                     max_size=40),
    crlf=st.booleans(),
    bom=st.booleans(),
    max_records=st.integers(1, 9),
    slack=st.integers(0, 300),
)
def test_jsonl_split_property(objects: list[dict[str, object]], crlf: bool, bom: bool,
                              max_records: int, slack: int) -> None:
    ending = b"\r\n" if crlf else b"\n"
    lines = [json.dumps(o, ensure_ascii=False).encode() + ending for o in objects]
    original = (BOM if bom else b"") + b"".join(lines)
    max_bytes = max(len(line) for line in lines) + slack
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "users_big.jsonl"
        source.write_bytes(original)
        parts = split_file(source, FileFormat.JSONL, max_bytes, max_records, tmp, move=durable_moves)
        _check_parts(parts, max_bytes, max_records, FileFormat.JSONL, original)
        assert b"".join(p.read_bytes() for p in parts) == original.removeprefix(BOM)


def test_generated_file_over_both_limits_validates_per_part(tmp_path: Path) -> None:
    cfg = ImportsConfig(max_file_bytes=20_000, max_records=300)
    lines = ["accountId,id,customFields.note"]
    lines += [f'a{i},u{i},"note {i}\nsecond line, with comma"' for i in range(2000)]
    source = tmp_path / "users_big.csv"
    source.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    report = validate_file(source, ImportType.USERS, cfg)
    assert report.ok and report.over_limits
    out = tmp_path / "parts"
    out.mkdir()
    parts = split_file(source, FileFormat.CSV, cfg.max_file_bytes, cfg.max_records, out, move=durable_moves)
    assert len(parts) >= 7
    total = 0
    for part in parts:
        part_report = validate_file(part, ImportType.USERS, cfg)
        assert part_report.ok and not part_report.over_limits, part_report.to_json()
        total += part_report.records
    assert total == 2000
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in parts)


def test_record_too_large_leaves_nothing_behind(tmp_path: Path) -> None:
    source = tmp_path / "users_a.csv"
    source.write_bytes(b"accountId,id\n1,2\n3," + b"4" * 100 + b"\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SplitError, match="record 2 alone is 103 bytes"):
        split_file(source, FileFormat.CSV, 60, 10, out, move=durable_moves)
    assert list(out.iterdir()) == []


def test_existing_part_is_never_overwritten(tmp_path: Path) -> None:
    source = tmp_path / "users_a.jsonl"
    source.write_bytes(b'{"a": 1}\n{"a": 2}\n')
    (tmp_path / "users_a_part2of2.jsonl").write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        split_file(source, FileFormat.JSONL, 100, 1, tmp_path, move=durable_moves)
    assert (tmp_path / "users_a_part2of2.jsonl").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users_a.jsonl", "users_a_part2of2.jsonl"]


def test_header_only_cannot_be_split(tmp_path: Path) -> None:
    source = tmp_path / "users_a.csv"
    source.write_bytes(b"accountId,id\n")
    with pytest.raises(SplitError, match="no records"):
        split_file(source, FileFormat.CSV, 100, 10, tmp_path, move=durable_moves)


def test_single_part_is_still_a_copy(tmp_path: Path) -> None:
    source = tmp_path / "users_a.csv"
    source.write_bytes(b"\xef\xbb\xbfaccountId,id\n1,2\n")
    out = tmp_path / "out"
    out.mkdir()
    [part] = split_file(source, FileFormat.CSV, 1000, 10, out, move=durable_moves)
    assert part.name == "users_a_part1of1.csv" and part.read_bytes() == b"accountId,id\n1,2\n"
