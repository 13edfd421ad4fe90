"""loguru set-up: plain single lines for journald, JSON on request; stdlib logging routed in."""

from __future__ import annotations

import logging
import sys

from loguru import logger

from agent.config import LogConfig, LogFormat

TEXT_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}"


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
    logger.add(
        sys.stderr,
        level=config.level,
        format=TEXT_FORMAT,
        colorize=sys.stderr.isatty(),
        serialize=config.format == LogFormat.JSON,
        backtrace=False,
        diagnose=False,  # never print local variables (they may hold key material)
    )
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)
