"""Check a large file in a worker process while its bytes are being sent (issue 17).

Validation and SHA-256 of a 100 MB file take about 0.7 s of CPU; sending it takes about as long on
loopback and longer on any real link. In the daemon's own process a checking thread and paramiko's
send fight for the GIL (1.15x slower than one after the other on loopback, bench/RESULTS.md round 4);
in another process they overlap (0.82x). So a large file is queued as soon as it is claimed and
`CheckProcess` runs `validate_file` (with its hash) in `python -m agent.intake.check_process`, a
fresh interpreter that imports only the import rules: no fork of a threaded daemon, no journal, no
connection. The parent reads the report when the bytes are sent; nothing is published before.

The exchange is pickled over the child's stdin and stdout; both ends are this module, run by the
same interpreter from the same tree (PYTHONPATH is set to the tree the daemon itself runs from).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.imports.report import ValidationReport
from agent.imports.types import DefaultLimits, FileFormat, ImportType

WAIT_STEP_SECONDS = 0.5  # how often a wait for the report lets the caller ping and check for a stop
_AGENT_TREE = str(Path(__file__).resolve().parents[2])  # the folder holding this `agent` package


class CheckProcessError(Exception):
    """The worker process gave no report (it died, or its check raised); its words."""


@dataclass(frozen=True)
class CheckRequest:
    """What the worker checks: the spool copy, as which type and format, against which limits."""

    path: str
    import_type: ImportType
    fmt: FileFormat
    max_file_bytes: int
    max_records: int


class CheckProcess:
    """One worker process checking one file; `result` waits for its report, `cancel` ends it."""

    def __init__(self, request: CheckRequest) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_AGENT_TREE, env.get("PYTHONPATH")]))
        self._process = subprocess.Popen(  # our own interpreter and module
            [sys.executable, "-m", "agent.intake.check_process"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, close_fds=True)
        self.pid = self._process.pid
        # the request now (a few hundred bytes: the pipe takes them at once), so the check runs while
        # the caller sends; stdin closed and forgotten, so `communicate` only reads
        stdin = self._process.stdin
        assert stdin is not None
        try:
            stdin.write(pickle.dumps(request))
            stdin.close()
        except BrokenPipeError:  # the worker died at start: `result` says how
            pass
        self._process.stdin = None

    @property
    def finished(self) -> bool:
        """The worker has ended (its report, if any, waits in the pipe)."""
        return self._process.poll() is not None

    def result(self, keep_going: Callable[[], None] = lambda: None) -> ValidationReport:
        """The report, once the worker is done. `keep_going` is called every WAIT_STEP_SECONDS of
        waiting (the caller's watchdog ping; it raises to stop waiting, and the worker is ended)."""
        try:
            for _ in range(1_000_000):  # bounded: about 5 days of half-second steps
                try:
                    out, err = self._process.communicate(timeout=WAIT_STEP_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    keep_going()
            else:
                raise CheckProcessError("the check did not finish")
        except BaseException:
            self.cancel()
            raise
        if self._process.returncode != 0:
            words = err.decode("utf-8", "replace").strip().splitlines()
            raise CheckProcessError(words[-1] if words else f"exit status {self._process.returncode}")
        report = pickle.loads(out)  # written by this module, in our child
        if not isinstance(report, ValidationReport):
            raise CheckProcessError(f"the worker answered {type(report).__name__}, not a report")
        return report

    def cancel(self) -> None:
        """End the worker (a stop, or the send failed): nothing waits for its report any more."""
        if self._process.poll() is None:
            self._process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired, ValueError, OSError):
            self._process.communicate(timeout=5)


def _main() -> int:
    """The worker: read a CheckRequest on stdin, write the pickled ValidationReport on stdout."""
    import hashlib

    from agent.imports.validate import validate_file

    # this file runs as __main__: the class the parent pickled is the one of the module by its name
    from agent.intake.check_process import CheckRequest as Request

    request = pickle.load(sys.stdin.buffer)  # written by CheckProcess, our parent
    if not isinstance(request, Request):
        sys.stderr.write(f"expected a CheckRequest, got {type(request).__name__}\n")
        return 2
    report = validate_file(request.path, request.import_type,
                           DefaultLimits(request.max_file_bytes, request.max_records),
                           fmt=request.fmt, digest=hashlib.sha256())
    sys.stdout.buffer.write(pickle.dumps(report))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
