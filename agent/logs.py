"""loguru set-up: plain single lines, JSON on request; stdlib logging routed in.

Text lines start with the time in UTC with a `Z` (as `status`, `history` and the journal write
times). `log.format = "json"`: one compact JSON object per line with the fields JSON_FIELDS (time in
UTC with `Z`, level, message, and the file a record is about: file_id, file, remote_name,
import_type, state, error; null when not known), plus `exception` (the traceback as text) when a
record has one.

Under journald (`$JOURNAL_STREAM` names our stderr, see sd-daemon(3)) every line starts with the
syslog priority as `<N>` and carries no timestamp of its own: journald stamps each entry and takes its
PRIORITY from the prefix, so `journalctl -p warning` shows warnings and errors (tracebacks included).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from datetime import UTC
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from agent.config import LogConfig, LogFormat

if TYPE_CHECKING:
    from loguru import Message, Record


class FileFacts(Protocol):
    """What `file_fields` reads of a journal row (store.journal.FileRecord has it; logs sits below
    the store, so it names only these)."""

    @property
    def id(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def remote_name(self) -> str | None: ...
    @property
    def import_type(self) -> str | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def state(self) -> StrEnum: ...

# the time in UTC to the millisecond, put in the record by the patcher `_one_line_stamped` (datetime's own
# formatting, several times cheaper per line than loguru's `{time:YYYY-MM-DDTHH:mm:ss.SSS!UTC}`)
TEXT_FORMAT = "{extra[_utc]}Z {level: <7} {message}"
FILE_FIELDS = ("file_id", "file", "remote_name", "import_type", "state", "error")
JSON_FIELDS = ("time", "level", "message", *FILE_FIELDS)
JOURNAL_FORMAT = "{level: <7} {message}"  # journald adds the time itself
# Control characters in a message (a dropped file's name may hold a newline) are shown escaped, so
# a file name can never forge or split a log line.
_ESCAPED = {c: ("\\n" if c == 10 else "\\r" if c == 13 else f"\\x{c:02x}")
            for c in (*range(32), 127) if c != 9}


def escape_controls(text: str) -> str:
    """Control characters shown escaped (`\\n`, `\\x1b`): what the log and the operator views print
    of a file name, so a name can never forge a line or reach the terminal as a control sequence."""
    if text.isprintable():  # no control character at all (the usual line): nothing to look up per character
        return text
    return text.translate(_ESCAPED)


def _one_line(record: Record) -> None:
    record["message"] = escape_controls(record["message"])


def _one_line_stamped(record: Record) -> None:
    """`_one_line`, and the time in UTC as text lines show it (`2026-01-31T12:00:00.123`)."""
    record["message"] = escape_controls(record["message"])
    record["extra"]["_utc"] = record["time"].astimezone(UTC).isoformat(timespec="milliseconds")[:23]


def file_fields(record: FileFacts) -> dict[str, Any]:
    """What a log record about this file carries (`logger.bind(**file_fields(record))`): the JSON
    fields file_id, file, remote_name, import_type, state and error, as the row is now."""
    return {"file_id": record.id, "file": record.name, "remote_name": record.remote_name,
            "import_type": record.import_type, "state": record.state.value, "error": record.error}


def json_line(record: Record) -> str:
    """One record as one compact JSON object (JSON_FIELDS, and `exception` when there is one)."""
    extra = record["extra"]
    moment = record["time"].astimezone(UTC)
    line: dict[str, Any] = {"time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                            "level": record["level"].name, "message": record["message"]}
    line.update((field, extra.get(field)) for field in FILE_FIELDS)
    exception = record["exception"]
    if exception is not None and exception.type is not None:
        line["exception"] = "".join(traceback.format_exception(exception.type, exception.value,
                                                               exception.traceback)).rstrip()
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"), default=str)


def _with_file(base: str, record: Record) -> str:
    """base; a record about a file whose message does not name it gets `[#id 'name']` added."""
    extra = record["extra"]
    if "file_id" in extra and f"#{extra['file_id']} " not in record["message"]:
        return base + " [#{extra[file_id]} {extra[file]!r}]\n{exception}"
    return base + "\n{exception}"


def _text_format(record: Record) -> str:
    return _with_file(TEXT_FORMAT, record)


def _journal_format(record: Record) -> str:
    return _with_file(JOURNAL_FORMAT, record)


def syslog_priority(level_no: int) -> int:
    """loguru level number -> syslog priority (TRACE/DEBUG 7, INFO 6, SUCCESS 5, WARNING 4, ERROR 3,
    CRITICAL 2)."""
    for threshold, priority in ((50, 2), (40, 3), (30, 4), (25, 5), (20, 6)):
        if level_no >= threshold:
            return priority
    return 7


def under_journald(stream: TextIO | None = None) -> bool:
    """True when $JOURNAL_STREAM (`device:inode`) is the stream's file, as sd-daemon(3) says to check."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError):
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


class _JournalSink:
    """Writes each line of a record (a traceback has several) with its `<N>` priority prefix."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def __call__(self, message: Message) -> None:
        prefix = f"<{syslog_priority(message.record['level'].no)}>"
        lines = str(message).rstrip("\n").split("\n")
        self._stream.write("".join(f"{prefix}{line}\n" for line in lines))
        self._stream.flush()


class _JsonSink:
    """One JSON object per record and line (`<N>`-prefixed under journald)."""

    def __init__(self, stream: TextIO, journald: bool) -> None:
        self._stream = stream
        self._journald = journald

    def __call__(self, message: Message) -> None:
        record = message.record
        prefix = f"<{syslog_priority(record['level'].no)}>" if self._journald else ""
        self._stream.write(f"{prefix}{json_line(record)}\n")
        self._stream.flush()


class _InterceptHandler(logging.Handler):
    """Send records of libraries that use stdlib logging (APScheduler, paramiko) to loguru.

    paramiko logs a dropped or refused connection at ERROR, its traceback one line per record
    ("Exception (client): Error reading SSH protocol banner", then "Traceback ..."); the agent
    reports the same fault itself in one line, so paramiko's ERROR records go to DEBUG.
    """

    def emit(self, record: logging.LogRecord) -> None:
        from loguru import logger

        level: str | int
        if record.name.startswith("paramiko") and record.levelno >= logging.ERROR:
            level = "DEBUG"
        else:
            try:
                level = logger.level(record.levelname).name
            except ValueError:
                level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, "{}: {}", record.name, record.getMessage())


def setup_logging(config: LogConfig | None = None) -> None:
    from loguru import logger  # here, not at import: `status` and `validate` never load loguru (start-up)

    config = config or LogConfig()
    logger.remove()
    journald = under_journald()
    text = config.format != LogFormat.JSON and not journald
    logger.configure(patcher=_one_line_stamped if text else _one_line)
    if config.format == LogFormat.JSON:
        logger.add(_JsonSink(sys.stderr, journald), level=config.level, format="{message}", colorize=False,
                   backtrace=False, diagnose=False)
    elif journald:
        logger.add(_JournalSink(sys.stderr), level=config.level, format=_journal_format, colorize=False,
                   backtrace=False, diagnose=False)
    else:
        logger.add(
            sys.stderr,
            level=config.level,
            format=_text_format,
            colorize=sys.stderr.isatty(),
            backtrace=False,
            diagnose=False,  # never print local variables (they may hold key material)
        )
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)
    # log.level = "DEBUG": paramiko's own account of the connection too (kex, auth, disconnects)
    logging.getLogger("paramiko").setLevel(logging.DEBUG if config.level in ("DEBUG", "TRACE")
                                           else logging.NOTSET)
