"""loguru set-up: plain single lines for journald, JSON on request; stdlib logging routed in."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from loguru import logger

from agent.config import LogConfig, LogFormat

if TYPE_CHECKING:
    from loguru import Record

TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}"
# Control characters in a message (a dropped file's name may hold a newline) are shown escaped, so
# a file name can never forge or split a log line.
_ESCAPED = {c: ("\\n" if c == 10 else "\\r" if c == 13 else f"\\x{c:02x}")
            for c in (*range(32), 127) if c != 9}


def _one_line(record: Record) -> None:
    record["message"] = record["message"].translate(_ESCAPED)


def _text_format(record: Record) -> str:
    """TEXT_FORMAT; a record about a file whose message does not name it gets `[#id 'name']` added."""
    extra = record["extra"]
    if "file_id" in extra and f"#{extra['file_id']} " not in record["message"]:
        return TEXT_FORMAT + " [#{extra[file_id]} {extra[file]!r}]\n{exception}"
    return TEXT_FORMAT + "\n{exception}"


class _InterceptHandler(logging.Handler):
    """Send records of libraries that use stdlib logging (APScheduler, paramiko) to loguru.

    paramiko logs a dropped or refused connection at ERROR, its traceback one line per record
    ("Exception (client): Error reading SSH protocol banner", then "Traceback ..."); the agent
    reports the same fault itself in one line, so paramiko's ERROR records go to DEBUG.
    """

    def emit(self, record: logging.LogRecord) -> None:
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
    config = config or LogConfig()
    logger.remove()
    logger.configure(patcher=_one_line)
    logger.add(
        sys.stderr,
        level=config.level,
        format=_text_format,
        colorize=sys.stderr.isatty(),
        serialize=config.format == LogFormat.JSON,
        backtrace=False,
        diagnose=False,  # never print local variables (they may hold key material)
    )
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)
    # log.level = "DEBUG": paramiko's own account of the connection too (kex, auth, disconnects)
    logging.getLogger("paramiko").setLevel(logging.DEBUG if config.level in ("DEBUG", "TRACE")
                                           else logging.NOTSET)
