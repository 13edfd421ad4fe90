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


def escape_controls(text: str) -> str:
    """Control characters shown escaped (`\\n`, `\\x1b`): what the log and the operator views print
    of a file name, so a name can never forge a line or reach the terminal as a control sequence."""
    return text.translate(_ESCAPED)


def _one_line(record: Record) -> None:
    record["message"] = escape_controls(record["message"])


def _text_format(record: Record) -> str:
    """TEXT_FORMAT; a record about a file whose message does not name it gets `[#id 'name']` added."""
    extra = record["extra"]
    if "file_id" in extra and f"#{extra['file_id']} " not in record["message"]:
        return TEXT_FORMAT + " [#{extra[file_id]} {extra[file]!r}]\n{exception}"
    return TEXT_FORMAT + "\n{exception}"


class _InterceptHandler(logging.Handler):
    """Send records of libraries that use stdlib logging (APScheduler, paramiko) to loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
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
