"""Streaming CSV check: one pass of the C `csv` reader, a few list lookups per record.

The bytes go through a guard that stops at a NUL byte (binary data) and a strict UTF-8 decoder
(BOM accepted); `newline=""` keeps quoted newlines and CRLF intact for the parser. Memory stays
bounded by the read chunk and the csv module's field size limit.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator, Sequence
from itertools import islice
from operator import itemgetter
from typing import Any, BinaryIO, cast

from agent.imports.report import ErrorSink
from agent.imports.rules import REQUIRED, TYPED, shown
from agent.imports.types import ImportType

CHUNK = 64 * 1024
BATCH = 256
GOOD_CACHE = 4096

_DELIMITERS = ((";", "semicolons"), ("\t", "tabs"), ("|", "vertical bars"))


class BinaryData(Exception):
    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class _NulGuard(io.BufferedIOBase):
    """Passes bytes through in large chunks, raising BinaryData at the first NUL byte."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self.offset = 0

    def readable(self) -> bool:
        return True

    def read1(self, size: int | None = -1) -> bytes:
        data = self._raw.read(size if size and size > 0 else CHUNK)
        nul = data.find(b"\x00")
        if nul >= 0:
            raise BinaryData(self.offset + nul)
        self.offset += len(data)
        return data

    def read(self, size: int | None = -1) -> bytes:
        return self.read1(size)


def locate_bad_utf8(stream: BinaryIO) -> tuple[int, int, int]:
    """(byte offset, line number, byte value) of the first invalid UTF-8 byte; second pass only."""
    stream.seek(0)
    decoder = codecs.getincrementaldecoder("utf-8")()
    fed = 0
    lines = 1
    while True:
        chunk = stream.read(CHUNK)
        pending = len(getattr(decoder, "buffer", b""))
        try:
            decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            offset = fed - pending + exc.start
            data = bytes(exc.object)
            lines += data[: exc.start].count(b"\n")
            return offset, lines, data[exc.start]
        if not chunk:
            return fed, lines, 0
        lines += chunk.count(b"\n")
        fed += len(chunk)


def _csv_problem(exc: csv.Error) -> str:
    text = str(exc)
    if "field larger than field limit" in text:
        return (f"a value is longer than {csv.field_size_limit():,} characters, which usually means "
                "a quote (\") is opened and never closed")
    if "unexpected end of data" in text:
        return "a quoted value is never closed: the file ends inside quotes"
    if "expected after" in text:
        return ("a closing quote must be followed by a comma or the end of the line; write a "
                "quote inside a quoted value as two quotes (\"\")")
    return f"the CSV is malformed ({text})"


def _check_header(header: list[str], import_type: ImportType, sink: ErrorSink) -> bool:
    """Header problems; False when they make reading the records pointless."""
    if not header:
        sink.add(None, "", "the first line is blank; the first line must be the header row")
        return False
    if len(header) == 1:
        for delimiter, name in _DELIMITERS:
            if delimiter in header[0]:
                sink.add(None, "", (
                    f"the header row is a single column containing {name}: the file looks "
                    f"separated by {name}, but SaaSquatch needs comma-separated values (in Excel, "
                    "save as 'CSV UTF-8 (Comma delimited)')"))
                return False
    seen: set[str] = set()
    for position, name in enumerate(header, start=1):
        if not name.strip():
            sink.add(None, f"column {position}", f"column {position} of the header has no name")
        elif name in seen:
            sink.add(None, name, f"the column {shown(name)} appears more than once in the header")
        seen.add(name)
    for name in REQUIRED[import_type]:
        if name not in seen:
            near = [h for h in header if h.strip().lower() == name.lower()]
            hint = f" (found {near[0]!r}: names are case-sensitive, without spaces)" if near else ""
            sink.add(None, name, f"the required column '{name}' is missing from the header{hint}")
    return True


class _Columns:
    """Checks a batch of full-width records column by column: each column is pulled out with a C
    loop (map/itemgetter) and each distinct value is checked once; values known to be valid are
    remembered (up to GOOD_CACHE per column), so booleans, locales and country codes cost a set
    lookup. Only a column with a problem is scanned again, to name the records."""

    def __init__(self, header: list[str], import_type: ImportType) -> None:
        columns = {name: index for index, name in enumerate(header)}
        self.required = [(name, itemgetter(columns[name]))
                         for name in REQUIRED[import_type] if name in columns]
        self.typed = [(name, itemgetter(columns[name]), check, set[str]())
                      for name, check in TYPED[import_type].items() if name in columns]

    def check(self, rows: list[list[str]], numbers: Sequence[int],
              found: list[tuple[int, str, str]]) -> None:
        """Adds (record, field, message) for each problem to `found`."""
        for name, getter in self.required:
            if not all(map(str.strip, map(getter, rows))):
                message = f"'{name}' is required and must not be empty"
                found.extend((numbers[i], name, message)
                             for i, row in enumerate(rows) if not getter(row).strip())
        for name, getter, check, good in self.typed:
            fresh = set(map(getter, rows))
            fresh -= good
            fresh.discard("")
            bad: dict[str, str] = {}
            for value in fresh:
                problem = check(value)
                if problem:
                    bad[value] = f"'{name}' {problem}"
                elif len(good) < GOOD_CACHE:
                    good.add(value)
            if bad:
                found.extend((numbers[i], name, bad[getter(row)])
                             for i, row in enumerate(rows) if getter(row) in bad)


def check_csv(stream: BinaryIO, import_type: ImportType, sink: ErrorSink) -> int:
    """Check a CSV from its start; returns the number of data records read."""
    guard = _NulGuard(stream)
    text = io.TextIOWrapper(cast(BinaryIO, guard), encoding="utf-8-sig", newline="")
    text._CHUNK_SIZE = CHUNK  # type: ignore[attr-defined]
    reader = csv.reader(text, strict=True)
    try:
        try:
            header = next(reader, None)
        except (csv.Error, BinaryData, UnicodeDecodeError) as exc:
            _report_failure(exc, stream, reader, 1, sink)
            return 0
        if header is None:
            sink.add(None, "", "the file is empty: it has no header row and no records")
            return 0
        if not _check_header(header, import_type, sink):
            return 0
        return _check_records(reader, len(header), _Columns(header, import_type), sink, stream)
    finally:
        text.detach()


def _check_records(reader: Iterator[list[str]], width: int, columns: _Columns, sink: ErrorSink,
                   stream: BinaryIO) -> int:
    records = 0
    blank = 0
    while True:
        batch: list[list[str]] = []
        failure: Exception | None = None
        try:
            # On a parse error list.extend keeps the rows read before it, so they are still checked.
            batch.extend(islice(reader, BATCH))
        except (csv.Error, BinaryData, UnicodeDecodeError) as exc:
            failure = exc
        found: list[tuple[int, str, str]] = []
        if batch and set(map(len, batch)) == {width}:
            records = _blank_lines(records, blank, found)
            blank = 0
            columns.check(batch, range(records + 1, records + 1 + len(batch)), found)
            records += len(batch)
        elif batch:
            rows: list[list[str]] = []
            numbers: list[int] = []
            for row in batch:
                if not row:
                    blank += 1
                    continue
                records = _blank_lines(records, blank, found) + 1
                blank = 0
                if len(row) == width:
                    rows.append(row)
                    numbers.append(records)
                else:
                    found.append((records, "", (
                        f"the record has {len(row)} values but the header has {width} columns "
                        "(look for an unquoted comma or a missing value)")))
            columns.check(rows, numbers, found)
        for number, name, message in sorted(found, key=itemgetter(0)):
            sink.add(number, name, message)
        if failure is not None:
            _report_failure(failure, stream, reader, records + blank + 1, sink)
            return records
        if len(batch) < BATCH:
            break
    if records == 0:
        sink.add(None, "", "the file has a header row but no records")
    return records


def _blank_lines(records: int, blank: int, found: list[tuple[int, str, str]]) -> int:
    """Blank lines followed by a record are errors (trailing ones are not): count and report."""
    for _ in range(blank):
        records += 1
        found.append((records, "", "blank line in the middle of the file; remove it"))
    return records


def _report_failure(exc: Exception, stream: BinaryIO, reader: Any, record: int,
                    sink: ErrorSink) -> None:
    if isinstance(exc, csv.Error):
        sink.add(record, "", f"{_csv_problem(exc)} (line {reader.line_num})")
    elif isinstance(exc, BinaryData):
        sink.add(None, "", f"the file contains binary data (a NUL byte at byte {exc.offset}); "
                           "it is not a text CSV file")
    else:
        offset, line, value = locate_bad_utf8(stream)
        sink.add(None, "", (
            f"the file is not valid UTF-8: byte 0x{value:02X} at line {line} (byte {offset}); "
            "save it with UTF-8 encoding (in Excel: 'CSV UTF-8')"))
