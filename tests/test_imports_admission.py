"""admit(): the one decision sequence intake and `validate` share; split parts; part counting."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import ImportsConfig, ImportType, OversizePolicy
from agent.imports.admission import PartOf, admit, part_numbers, spool_part_of
from agent.imports.split import count_parts, split_file
from agent.imports.types import FileFormat, RefusalCode
from agent.store.fsutil import durable_moves

WHEN = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
SHA = "ab12cd34" + "0" * 56
CFG = ImportsConfig()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_valid_file_gets_its_remote_name_and_deletion_count(tmp_path: Path) -> None:
    path = write(tmp_path, "list.csv", b"accountId,id\na,1\nb,2\n")
    verdict = admit(path, "list.csv", "delete-users", SHA, CFG, now=WHEN)
    assert verdict.ok and verdict.import_type == ImportType.DELETE_USERS
    assert verdict.remote_name == "deleteUsers_list_20261129T120000000Z_ab12cd34.csv"
    assert verdict.deletes == 2 and verdict.report is not None and verdict.report.records == 2


def test_refusals_keep_their_structured_cause(tmp_path: Path) -> None:
    path = write(tmp_path, "x.csv", b"accountId,id\na,1\n")
    by_name = admit(path, "x.csv", None, SHA, CFG)
    assert not by_name.ok and by_name.refused_before_reading is not None
    assert by_name.refused_before_reading.code == RefusalCode.NO_TYPE and by_name.errors_csv is None
    guarded = admit(path, "x.csv", None, SHA, CFG, fallback=ImportType.DELETE_USERS)
    assert guarded.refused_before_reading
    assert guarded.refused_before_reading.code == RefusalCode.DELETION_GUARD
    bad = write(tmp_path, "users_bad.csv", b"accountId,id\na,\n")
    content = admit(bad, "users_bad.csv", None, SHA, CFG)
    assert not content.ok and content.errors_csv and content.report and content.report.error_count == 1


def test_oversize_splits_or_refuses_and_a_part_is_never_split_again(tmp_path: Path) -> None:
    path = write(tmp_path, "users_big.csv", b"accountId,id\n" + b"a,1\n" * 5)
    small = ImportsConfig(max_records=2)
    assert admit(path, "users_big.csv", None, SHA, small).split_format == FileFormat.CSV
    refuse = ImportsConfig(max_records=2, oversize=OversizePolicy.REFUSE)
    assert "imports.oversize" in (admit(path, "users_big.csv", None, SHA, refuse).refusal or "")
    part = PartOf("users_big.csv", SHA, None, 1, 3)
    assert not admit(path, "users_big_part1of3.csv", None, "ff" * 32, small, part=part).ok


def test_a_part_is_typed_and_named_after_its_original(tmp_path: Path) -> None:
    path = write(tmp_path, "leavers_part2of3.csv", b"accountId,id\na,1\n")
    part = PartOf("leavers.csv", SHA, "delete-users", 2, 3)
    verdict = admit(path, "leavers_part2of3.csv", None, "ff" * 32, CFG, part=part, now=WHEN)
    assert verdict.ok and verdict.import_type == ImportType.DELETE_USERS  # the folder, not the guard
    assert verdict.remote_name == "deleteUsers_leavers_20261129T120000000Z_ab12cd34_part2of3.csv"
    assert part_numbers("leavers_part2of3.csv") == (2, 3)
    assert part_numbers("x_part4of3.csv") is None and part_numbers("x.csv") is None
    spool = tmp_path / "spool"
    assert spool_part_of(spool / "split-00000042" / "a_part1of2.csv", spool) == 42
    assert spool_part_of(spool / "00000042", spool) is None
    assert spool_part_of(tmp_path / "split-00000042" / "a.csv", spool) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="abc,\"\n\r é", max_size=30), min_size=1, max_size=25),
       st.integers(1, 6), st.integers(60, 400), st.booleans())
def test_count_parts_matches_split_file(values: list[str], max_records: int, max_bytes: int,
                                        jsonl: bool) -> None:
    if jsonl:
        data = "".join(json.dumps({"v": v}) + "\n" for v in values)
        fmt = FileFormat.JSONL
    else:
        data = "accountId,id\n" + "".join(f'"{v.replace(chr(34), chr(34) * 2)}",x\n' for v in values)
        fmt = FileFormat.CSV
    with tempfile.TemporaryDirectory() as folder:
        source = write(Path(folder), "users_in." + fmt.value, data.encode())
        out = Path(folder) / "out"
        out.mkdir()
        try:
            parts = split_file(source, fmt, max_bytes, max_records, out, move=durable_moves,
                               name="users_n.csv")
            expected: int | str = len(parts)
        except Exception as exc:  # noqa: BLE001 - both must fail the same way
            expected = type(exc).__name__
        try:
            counted: int | str = count_parts(source, fmt, max_bytes, max_records)
        except Exception as exc:  # noqa: BLE001
            counted = type(exc).__name__
        assert counted == expected
        if isinstance(expected, int):
            assert sorted(p.name for p in out.iterdir()) == sorted(
                f"users_n_part{k}of{expected}.csv" for k in range(1, expected + 1))
