"""Validate one import file against SaaSquatch's rules, streaming, before it leaves the machine.

The file is opened without following a symbolic link and without blocking on a FIFO; anything but
a regular file is refused with a reason, as is an unreadable one. Other OS errors (a vanished file,
EIO) propagate: the caller decides whether they are transient.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
from pathlib import Path
from typing import BinaryIO, cast

from agent.imports.csvcheck import check_csv
from agent.imports.hashing import HashingReader, HashObject
from agent.imports.jsonlcheck import check_jsonl
from agent.imports.report import MAX_KEPT_ERRORS, ErrorSink, RecordError, ValidationReport
from agent.imports.types import DefaultLimits, FileFormat, ImportType, Limits, Refusal, file_format

SNIFF_BYTES = 64 * 1024

_SIGNATURES = (
    (b"PK\x03\x04", "a ZIP archive or an Excel workbook (.xlsx); export the sheet as CSV UTF-8"),
    (b"\xd0\xcf\x11\xe0", "an old Excel workbook (.xls); export the sheet as CSV UTF-8"),
    (b"\x1f\x8b", "gzip-compressed; decompress it first"),
    (b"%PDF", "a PDF document"),
    (b"\xff\xfe", "UTF-16 text; save it with UTF-8 encoding"),
    (b"\xfe\xff", "UTF-16 text; save it with UTF-8 encoding"),
)

__all__ = ["RecordError", "ValidationReport", "validate_file"]


_KINDS = ((stat.S_ISLNK, "link"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "fifo"),
          (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device"))
_NOT_READ = {
    "directory": "is a directory, not a file",
    "fifo": "is a FIFO (named pipe), not a file; it was not read",
    "device": "is a device, not a file; it was not read",
}


def entry_kind(mode: int) -> str | None:
    """None for a regular file, else what the entry is: link, directory, fifo, socket, device or
    other (one reading of st_mode for the validator and intake; each says it in its own words)."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "other")


def _kind(mode: int) -> str | None:
    kind = entry_kind(mode)
    return None if kind is None else _NOT_READ.get(kind, "is not a regular file; it was not read")


def open_regular(path: str | os.PathLike[str], follow_symlinks: bool = False) -> io.FileIO | str:
    """The file opened for reading, or why it is refused (link, not a regular file, no access)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return ("is a symbolic link; the agent does not follow links: drop the file itself, "
                    "not a link to it")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return ("cannot be read: permission denied; make it readable by the agent's user and "
                    "drop it again")
        if exc.errno == errno.ENXIO:
            return "is a socket, not a file; it was not read"
        raise
    problem = _kind(os.fstat(fd).st_mode)
    if problem:
        os.close(fd)
        return problem
    return io.FileIO(fd, "rb", closefd=True)


def sniff_problem(head: bytes, size: int) -> str | None:
    """A whole-file problem visible in the first bytes: empty, binary, or a known non-text format."""
    if size == 0:
        return "the file is empty (0 bytes)"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return f"the file is {what}, not a text CSV/JSONL file"
    if b"\x00" in head:
        half = len(head) // 2
        if half >= 2 and max(head[0::2].count(0), head[1::2].count(0)) >= 0.9 * half:
            return "the file looks like UTF-16 text; save it with UTF-8 encoding"
        return "the file contains binary data (NUL bytes); it is not a text CSV/JSONL file"
    if size <= len(head) and not head.removeprefix(b"\xef\xbb\xbf").strip():
        return "the file is empty: it has no header row and no records"
    return None


def validate_file(
    path: str | os.PathLike[str],
    import_type: ImportType,
    cfg: Limits | None = None,
    *,
    fmt: FileFormat | None = None,
    follow_symlinks: bool = False,
    max_errors: int = MAX_KEPT_ERRORS,
    digest: HashObject | None = None,
    opened: io.FileIO | None = None,
) -> ValidationReport:
    """Check the file at `path` as `import_type`; the format comes from its extension unless given.

    With `digest`, the bytes read are hashed on the way (one read for both): the report's `sha256`
    is set when the check read the whole file in order, else None (then hash it separately).
    `opened`: that file, already opened by the caller as `open_regular` does (at offset 0), read
    instead of opening `path` again; the caller closes it.

    Reads the file once, in constant memory. Never raises for bad content: every problem becomes a
    RecordError in the report. Raises OSError only for I/O trouble other than the refusals above.
    """
    cfg = cfg or DefaultLimits()
    sink = ErrorSink(max_errors)
    size = 0
    records = 0
    sha256: str | None = None
    if fmt is None:
        found = file_format(Path(path).name)
        if isinstance(found, Refusal):
            sink.add(None, "", found.message)
        else:
            fmt = found
    if fmt is not None:
        handle = opened if opened is not None else open_regular(path, follow_symlinks)
        if isinstance(handle, str):
            sink.add(None, "", f"the path {handle}")
        else:
            with contextlib.nullcontext(handle) if opened is not None else handle as raw:
                size = os.fstat(raw.fileno()).st_size
                if digest is None:
                    records = _check_content(raw, fmt, import_type, sink, size)
                else:
                    hashing = HashingReader(raw, digest)
                    records = _check_content(hashing, fmt, import_type, sink, size)
                    sha256 = hashing.hexdigest()
    return ValidationReport(
        ok=sink.count == 0,
        import_type=import_type,
        format=fmt,
        records=records,
        bytes=size,
        error_count=sink.count,
        errors=sink.kept,
        over_limits=size > cfg.max_file_bytes or records > cfg.max_records,
        deletes=records if import_type == ImportType.DELETE_USERS else 0,
        max_file_bytes=cfg.max_file_bytes,
        max_records=cfg.max_records,
        sha256=sha256,
    )


def _check_content(raw: io.RawIOBase, fmt: FileFormat, import_type: ImportType, sink: ErrorSink,
                   size: int) -> int:
    head = os.pread(raw.fileno(), SNIFF_BYTES, 0)
    problem = sniff_problem(head, size)
    if problem:
        sink.add(None, "", problem)
        return 0
    if fmt == FileFormat.CSV:
        return check_csv(cast(BinaryIO, raw), import_type, sink)
    buffered = io.BufferedReader(raw, buffer_size=1 << 20)
    try:
        return check_jsonl(buffered, import_type, sink)
    finally:
        buffered.detach()
