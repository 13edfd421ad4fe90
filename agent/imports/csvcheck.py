"""Streaming CSV check: one pass over the rows, a few list lookups per record.

The bytes go through a guard that stops at a NUL byte (binary data) and a strict UTF-8 decoder
(BOM accepted). Text without quotes or carriage returns is split with `str.split` (`FastRows`, about
twice as fast as the parser); from the first chunk that has either, the C `csv` reader takes over,
over `newline=""` text so quoted newlines and CRLF stay intact. Memory stays bounded by the read
chunk and the csv module's field size limit.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, islice, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from agent.imports.report import ErrorSink
from agent.imports.rules import REQUIRED, TYPED, shown
from agent.imports.types import ImportType

if TYPE_CHECKING:
    from _csv import Reader

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


class _Resume(io.BufferedIOBase):
    """`head`, then the rest of `guard` (None: it is at its end)."""

    def __init__(self, head: bytes, guard: _NulGuard | None) -> None:
        super().__init__()
        self._head = head
        self._guard = guard

    def readable(self) -> bool:
        return True

    def read1(self, size: int | None = -1) -> bytes:
        if self._head:
            head, self._head = self._head, b""
            return head
        return b"" if self._guard is None else self._guard.read1(size)

    def read(self, size: int | None = -1) -> bytes:
        return self.read1(size)


class FastRows:
    """The rows `csv.reader(text, strict=True)` gives for the text of `guard` (utf-8-sig,
    `newline=""`), and its `line_num` whenever an error surfaces, for about half the CPU.

    Why: without quotes, CSV is lines split on commas, and `str.split` on a chunk beats the parser's
    per-character loop. Chunks of `chunk` bytes are read and decoded as TextIOWrapper does, and each
    chunk's complete lines are yielded (split lazily by a C `map`) before the next read, so a NUL
    byte or bad UTF-8 surfaces after the same rows. Iterating gives `chain`'s iterator: no Python
    code runs per row. "\r\n" (Excel's line end) ends a line as "\n" does. From the first chunk with
    a quote, a lone carriage return (a line end of its own to the parser) or a line longer than
    `csv.field_size_limit()` (so the parser reports it), the csv module reads the rest of the text,
    from the first line not yet yielded.
    """

    def __init__(self, guard: _NulGuard, chunk: int = CHUNK) -> None:
        self._guard = guard
        self._chunk = chunk
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self._fast_lines = 0
        self._reader: Reader | None = None
        self._rows = chain.from_iterable(self._pieces())

    @property
    def line_num(self) -> int:
        return self._fast_lines + (0 if self._reader is None else self._reader.line_num)

    def __iter__(self) -> Iterator[list[str]]:
        return self._rows

    def __next__(self) -> list[str]:
        return next(self._rows)

    def _pieces(self) -> Iterator[Iterable[list[str]]]:
        leftover = ""  # the start of a line that goes on in the next chunk
        while True:
            data = self._guard.read1(self._chunk)  # BinaryData, UnicodeDecodeError: rows so far
            at_end = not data
            text = leftover + self._decoder.decode(data, final=at_end)
            if '"' in text:
                yield self._fall_back(text, at_end)
                return
            cut = len(text) if at_end else text.rfind("\n") + 1
            body, leftover = text[:cut], text[cut:]
            if "\r" in text:  # Excel's "\r\n" line ends are "\n" to the parser; a lone "\r" is not
                body = body.replace("\r\n", "\n")
                if "\r" in body or "\r" in leftover[:-1]:  # (a "\r" ending the leftover may meet its "\n")
                    yield self._fall_back(text, at_end)
                    return
            lines = body.split("\n")
            limit = csv.field_size_limit()
            if len(text) > limit and max(len(leftover), *map(len, lines)) > limit:
                yield self._fall_back(text, at_end)
                return
            last = lines.pop()  # "" after the final "\n"; at the end, a last line without one
            if last:
                lines.append(last)
            if lines:
                self._fast_lines += len(lines)
                if not lines[0] or "\n\n" in body:  # a blank line
                    yield [line.split(",") if line else [] for line in lines]  # csv gives []
                else:
                    yield map(str.split, lines, repeat(","))
            if at_end:
                return

    def _fall_back(self, text: str, at_end: bool) -> Reader:
        # Decoded text has no BOM and encodes back to the bytes it came from.
        head = text.encode("utf-8") + self._decoder.getstate()[0]
        source = _Resume(head, None if at_end else self._guard)
        wrapper = io.TextIOWrapper(cast(BinaryIO, source), encoding="utf-8", newline="")
        wrapper._CHUNK_SIZE = self._chunk  # type: ignore[attr-defined]
        self._reader = csv.reader(wrapper, strict=True)
        return self._reader


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
    reader = FastRows(_NulGuard(stream))
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
