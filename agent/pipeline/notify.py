"""The notification hook: `notify.command` run with one file's JSON on stdin.

Called on final failures (refused, failed remotely) and on stale files, so operators can wire mail,
chat or a pager without code changes. The command runs without a shell (split like a POSIX shell
line), one at a time on a thread of its own, and is killed after `notify.timeout_seconds`; what it
prints and its exit code go to the log. A notification never holds up the file it is about.
"""

from __future__ import annotations

import json
import queue
import shlex
import subprocess
import threading
from typing import Any

from loguru import logger

from agent.config import NotifyConfig
from agent.store.journal import FileRecord

QUEUE_LIMIT = 1000  # notifications beyond this while the command is slow are dropped (and logged)


def notification(record: FileRecord, event: str) -> dict[str, Any]:
    """The JSON the command reads: the `status --json` object plus `event`."""
    return {**record.to_json(), "event": event}


def run_command(argv: list[str], payload: dict[str, Any], timeout: float) -> tuple[int | None, str]:
    """Run once; (exit code or None when killed for time, combined output tail)."""
    try:
        proc = subprocess.run(argv, input=json.dumps(payload) + "\n", capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"killed after {timeout:g} s"
    except OSError as exc:
        return 127, f"cannot run {argv[0]!r}: {exc.strerror or exc}"
    return proc.returncode, (proc.stdout + proc.stderr).strip()[-500:]


class Notifier:
    def __init__(self, config: NotifyConfig) -> None:
        self.config = config
        self.argv = shlex.split(config.command) if config.command.strip() else []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_LIMIT)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.argv)

    def submit(self, record: FileRecord, event: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(notification(record, event))
        except queue.Full:
            logger.error("notify: {} notifications waiting; dropped the one for {}", QUEUE_LIMIT,
                         record.label)

    def stop(self, timeout: float) -> None:
        with self._lock:
            thread = self._thread
        if thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        thread.join(timeout)

    def _run(self) -> None:
        while True:
            payload = self._queue.get()
            if payload is None:
                return
            code, output = run_command(self.argv, payload, self.config.timeout_seconds)
            label = f"#{payload['id']} {payload['name']!r} ({payload['event']})"
            if code == 0:
                logger.info("notify: command ran for {}", label)
            else:
                logger.warning("notify: command for {} ended {}: {}", label,
                               "by timeout" if code is None else f"with exit code {code}", output)
