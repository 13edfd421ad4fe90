"""Split a valid import file that is over a limit into parts that each respect both limits.

Records are copied byte for byte, never re-written by a CSV writer. A CSV record's bytes are the
physical lines the csv module reads for it, so a quoted newline never cuts a record and the
boundaries are exactly the ones validation saw. CSV parts repeat the header; all parts are UTF-8
without a BOM. Blank lines are not records and are dropped. Parts are written under temporary
names, fsynced, and moved to `<stem>_part<k>of<n><ext>` once n is known, by the durable no-replace
move the caller passes (agent.store.fsutil.durable_moves): the rules know no file store.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import BinaryIO

from agent.errors import AgentError
from agent.imports.types import FileFormat

_BOM = b"\xef\xbb\xbf"
# moves (source, destination) that never replace a name, then fsyncs the folders; per move None
# when done, else the OSError that stopped it (agent.store.fsutil.durable_moves)
MoveAll = Callable[[Sequence[tuple[Path, Path]]], Sequence[OSError | None]]
_MAX_STEM_BYTES = 150


class SplitError(AgentError):
    """The file cannot be split within the limits (e.g. one record alone is too large)."""


def csv_records(stream: BinaryIO) -> Generator[bytes, None, None]:
    """The raw bytes of each CSV record (header first), BOM removed, blank lines skipped.

    Record boundaries are the csv module's own (the same parser and settings validation uses): the
    physical lines it pulls for one record are that record's bytes.
    """
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
    pulled: list[str] = []

    def lines() -> Generator[str, None, None]:
        for line in text:
            pulled.append(line)
            yield line

    try:
        reader = csv.reader(lines(), strict=True)
        number = 0
        while True:
            try:
                row = next(reader, None)
            except csv.Error as exc:
                raise SplitError(f"record {number + 1} is not valid CSV ({exc}); validate the "
                                 "file first") from None
            if row is None:
                break
            raw = "".join(pulled)
            pulled.clear()
            if row:
                number += 1
                yield raw.encode("utf-8")
    finally:
        text.detach()


def jsonl_records(stream: BinaryIO) -> Generator[bytes, None, None]:
    """The raw bytes of each JSONL line, BOM removed, blank lines skipped."""
    first = True
    for line in stream:
        if first:
            line = line.removeprefix(_BOM)
            first = False
        if line.strip():
            yield line


class _PartWriter:
    """Writes records into temporary part files in `out_dir`, opening a new one at each limit."""

    def __init__(self, out_dir: Path | None, header: bytes, max_bytes: int, max_records: int) -> None:
        self.out_dir = out_dir  # None: only count the parts (nothing is written)
        self.parts = 0
        self.header = header
        self.max_bytes = max_bytes
        self.max_records = max_records
        self.temps: list[Path] = []
        self.renamed: list[Path] = []
        self._handle: BinaryIO | None = None
        self._bytes = 0
        self._records = 0

    def add(self, record: bytes, number: int) -> None:
        size = len(record)
        if len(self.header) + size > self.max_bytes:
            raise SplitError(f"record {number} alone is {size:,} bytes, which does not fit in a "
                             f"part of at most {self.max_bytes:,} bytes")
        if self._handle is None or self._records >= self.max_records or (
                self._bytes + size > self.max_bytes):
            self._open_next()
        assert self._handle is not None
        self._handle.write(record)
        self._bytes += size
        self._records += 1

    def _open_next(self) -> None:
        self.close()
        self.parts += 1
        if self.out_dir is None:
            self._handle = open(os.devnull, "wb")  # noqa: SIM115 - closed by close()
        else:
            fd, name = tempfile.mkstemp(prefix=".split-", suffix=".tmp", dir=self.out_dir)
            self.temps.append(Path(name))
            self._handle = os.fdopen(fd, "wb")
        self._handle.write(self.header)
        self._bytes = len(self.header)
        self._records = 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            if self.out_dir is not None:
                os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def discard(self) -> None:
        self.close()
        for made in self.temps + self.renamed:
            made.unlink(missing_ok=True)


def part_names(original: Path, count: int) -> list[str]:
    stem = original.stem.encode("utf-8")[:_MAX_STEM_BYTES].decode("utf-8", "ignore")
    return [f"{stem}_part{k}of{count}{original.suffix}" for k in range(1, count + 1)]


def split_file(
    path: str | os.PathLike[str],
    fmt: FileFormat,
    max_bytes: int,
    max_records: int,
    out_dir: str | os.PathLike[str],
    *,
    move: MoveAll,
    name: str | None = None,
) -> list[Path]:
    """Split `path` into parts in `out_dir` (k of n, in order), each at most `max_bytes` bytes and
    `max_records` records; their records joined equal the original's. Always writes copies, even
    when one part suffices; never changes `path`. Parts are named after `name` (default: the
    path's own name) and put in place by `move`. Raises SplitError when a record cannot fit and
    FileExistsError when a part name is already taken; on any error no part is left behind."""
    source = Path(path)
    folder = Path(out_dir)
    with _packing(source, fmt, max_bytes, max_records, folder) as (writer, records):
        try:
            for number, record in enumerate(records, start=1):
                writer.add(record, number)
            writer.close()
            if not writer.temps:
                raise SplitError("the file has no records to split")
            finals = [folder / part for part in part_names(Path(name) if name else source,
                                                         len(writer.temps))]
            taken = [final for final in finals if os.path.lexists(final)]
            if taken:
                raise FileExistsError(f"split part already exists: {taken[0]}")
            errors = move(list(zip(writer.temps, finals, strict=True)))
            writer.renamed = [final for final, error in zip(finals, errors, strict=True) if error is None]
            failure = next((error for error in errors if error is not None), None)
            if failure is not None:
                raise failure
        except BaseException:
            writer.discard()
            raise
    return finals


def count_parts(path: str | os.PathLike[str], fmt: FileFormat, max_bytes: int, max_records: int) -> int:
    """How many parts `split_file` would cut `path` into, without writing any; SplitError as there."""
    with _packing(Path(path), fmt, max_bytes, max_records, None) as (counter, records):
        try:
            for number, record in enumerate(records, start=1):
                counter.add(record, number)
        finally:
            counter.close()
    if not counter.parts:
        raise SplitError("the file has no records to split")
    return counter.parts


@contextmanager
def _packing(source: Path, fmt: FileFormat, max_bytes: int, max_records: int,
             folder: Path | None) -> Iterator[tuple[_PartWriter, Iterator[bytes]]]:
    """The part writer (a counter when folder is None) and the records after the header."""
    if max_bytes <= 0 or max_records <= 0:
        raise ValueError("max_bytes and max_records must be positive")
    with open(source, "rb") as stream, closing(
            csv_records(stream) if fmt == FileFormat.CSV else jsonl_records(stream)) as records:
        header = next(records, b"") if fmt == FileFormat.CSV else b""
        if header and not header.endswith((b"\n", b"\r")):
            raise SplitError("the file has a header row but no records")
        yield _PartWriter(folder, header, max_bytes, max_records), records

