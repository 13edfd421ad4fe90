"""FastRows (csvcheck's split-on-commas path) against the csv module, over seeded random CSV texts.

Each case is checked for the rows read (header by `next`, then `islice` batches, as check_csv does),
the exception that ends them (type and message) and `line_num` at that point. Read chunks are small
and random so lines, multi-byte characters and the BOM straddle chunk boundaries.
"""

from __future__ import annotations

import codecs
import csv
import io
import random
from collections.abc import Iterator
from itertools import islice
from typing import Any, BinaryIO, cast

import pytest

from agent.imports.csvcheck import CHUNK, BinaryData, FastRows, _NulGuard

CASES = 3000
WORDS = ["a", "b", "xyz", " ", "0", "42", "é", "漢字", "😀", ";", "\t", "O'N"]
LIMITS = [131072, 131072, 24, 60]  # csv.field_size_limit for a case: small ones make long fields cheap
Outcome = tuple[list[list[str]], tuple[str, str] | None, int]


@pytest.fixture
def restore_field_limit() -> Iterator[None]:
    saved = csv.field_size_limit()
    try:
        yield
    finally:
        csv.field_size_limit(saved)


def _value(rng: random.Random, quotes: bool, limit: int) -> str:
    roll = rng.random()
    if roll < 0.15:
        return ""
    if roll < 0.2:
        return "x" * (min(limit, 300) + rng.randint(-2, 2))  # about the field size limit
    text = "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
    if quotes and roll < 0.45:
        inside = [rng.choice([text, ",", "\n", '""', "\r\n", ", x", ""]) for _ in range(rng.randint(1, 4))]
        return '"' + "".join(inside) + '"'
    return text


def _csv_text(rng: random.Random, limit: int) -> str:
    """A random CSV text: plain about half the time (the fast path), else with quotes, CR or errors."""
    roll = rng.random()
    plain = roll < 0.5  # no quotes: the fast path, with "\n" or Excel's "\r\n" line ends
    endings = (["\n"] if roll < 0.25 else ["\r\n"] if roll < 0.4 else ["\n", "\r\n"] if plain
               else ["\n", "\n", "\r\n", "\r"])
    lines = []
    for _ in range(rng.randint(0, 12)):
        if rng.random() < 0.1:
            lines.append("")
        else:
            width = rng.randint(1, 5)
            lines.append(",".join(_value(rng, not plain, limit) for _ in range(width)))
    text = "".join(line + rng.choice(endings) for line in lines)
    if text and rng.random() < 0.3:
        text = text[:-1]  # no final newline (or, after "\r\n", a lone "\r")
    if plain and "\r" in text and rng.random() < 0.2:  # a lone carriage return: the csv module
        at = rng.randint(0, len(text))
        text = text[:at] + "\r" + text[at:]
    if not plain and rng.random() < 0.3:
        at = rng.randint(0, len(text))
        bad = rng.choice(['"', '"x\ny', '"a"b', '"a"",', 'O"Neil', "\r"])  # unclosed, after close...
        text = text[:at] + bad + text[at:]
    return text


def _chunk(rng: random.Random) -> int:
    return rng.choice([rng.randint(1, 8), rng.randint(9, 100), rng.randint(100, 400), CHUNK])


def _collect(reader: Any, batch: int) -> Outcome:
    rows: list[list[str]] = []
    try:
        header = next(reader, None)
        if header is not None:
            rows.append(header)
            while True:
                before = len(rows)
                rows.extend(islice(reader, batch))
                if len(rows) - before < batch:
                    break
    except (csv.Error, BinaryData, UnicodeDecodeError) as exc:
        return rows, (type(exc).__name__, str(exc)), reader.line_num
    return rows, None, reader.line_num


def _fast(data: bytes, chunk: int, batch: int) -> tuple[Outcome, bool]:
    rows = FastRows(_NulGuard(cast(BinaryIO, io.BytesIO(data))), chunk=chunk)
    outcome = _collect(rows, batch)
    return outcome, rows._reader is None


def _text_wrapper(data: bytes, chunk: int, batch: int) -> Outcome:
    """The reading before FastRows: csv.reader over TextIOWrapper over the NUL guard."""
    guard = _NulGuard(cast(BinaryIO, io.BytesIO(data)))
    text = io.TextIOWrapper(cast(BinaryIO, guard), encoding="utf-8-sig", newline="")
    text._CHUNK_SIZE = chunk  # type: ignore[attr-defined]
    return _collect(csv.reader(text, strict=True), batch)


def test_same_rows_errors_and_line_numbers_as_the_csv_module(restore_field_limit: None) -> None:
    rng = random.Random(20240611)
    fast_only = 0
    for case in range(CASES):
        limit = rng.choice(LIMITS)
        csv.field_size_limit(limit)
        text = _csv_text(rng, limit)
        batch = rng.choice([1, 3, 256])
        data = (codecs.BOM_UTF8 if rng.random() < 0.2 else b"") + text.encode("utf-8")
        expected = _collect(csv.reader(io.StringIO(text, newline=""), strict=True), batch)
        got, fast = _fast(data, _chunk(rng), batch)
        assert got == expected, (case, text, limit)
        fast_only += fast
    assert fast_only > CASES // 3  # the fast path itself was tested, not only the fallback


def test_nul_bytes_and_bad_utf8_surface_after_the_same_rows(restore_field_limit: None) -> None:
    rng = random.Random(7)
    for case in range(CASES // 2):
        limit = rng.choice(LIMITS)
        csv.field_size_limit(limit)
        data = _csv_text(rng, limit).encode("utf-8")
        for _ in range(rng.randint(0, 2)):
            at = rng.randint(0, len(data))
            data = data[:at] + rng.choice([b"\x00", b"\xff", b"\xe9", b"\xc3", b"\xed\xa0\x80"]) + data[at:]
        chunk, batch = _chunk(rng), rng.choice([1, 256])
        got, _ = _fast(data, chunk, batch)
        assert got == _text_wrapper(data, chunk, batch), (case, data, chunk, limit)
