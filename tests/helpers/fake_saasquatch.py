"""Plays SaaSquatch's part on the test server's filesystem: takes uploads, answers with status files.

Runs as a thread next to the sshd fixture (as root the remote folder is a local path,
``SshdServer.local_remote_dir``). For each published upload (a name not starting with ``.``) it
asks ``script(name)`` what to do and carries the steps out in order, each after its delay:

- ``Write(pattern, text)``: write ``pattern.format(name=..., stem=...)`` (atomically: temp + rename)
  in the upload folder, or in ``folder`` when given; with ``when``, not before ``when(upload name)``
  is true (the steps after it wait too), so a script can wait for the agent instead of a time;
- ``Consume(to)``: move the upload out of the folder (into ``to``), or delete it when ``to`` is None.

Every loop is bounded: the thread polls every ``interval`` seconds and stops on ``stop()``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Write:
    pattern: str
    text: str
    delay: float = 0.0
    folder: Path | None = None
    when: Callable[[str], bool] | None = None  # also wait for this (given the upload's name)


@dataclass(frozen=True)
class Consume:
    to: Path | None = None
    delay: float = 0.0


Step = Write | Consume
Script = Callable[[str], Sequence[Step]]


def stem_of(name: str) -> str:
    stem, dot, _ext = name.rpartition(".")
    return stem if dot else name


def errors_csv(*rows: tuple[int, str, str, int]) -> str:
    """SaaSquatch's errors file: `recordNumber,message,apiErrorCode,statusCode`."""
    lines = ["recordNumber,message,apiErrorCode,statusCode"]
    lines += [f'{number},"{message}",{code},{status}' for number, message, code, status in rows]
    return "\n".join(lines) + "\n"


class FakeSaaSquatch:
    def __init__(self, folder: Path, script: Script, *, interval: float = 0.05,
                 max_seconds: float = 120.0) -> None:
        self.folder = folder
        self.script = script
        self.interval = interval
        self.max_seconds = max_seconds
        self.seen: list[str] = []  # uploads taken, in order
        self.written: list[Path] = []
        self._plans: list[tuple[float, str, Step]] = []  # (due monotonic time, upload name, step)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="fake-saasquatch", daemon=True)

    def __enter__(self) -> FakeSaaSquatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        for _ in range(int(self.max_seconds / self.interval) + 1):  # bounded in count and time
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            self._take_new()
            self._carry_out_due()
            self._stop.wait(self.interval)

    def _take_new(self) -> None:
        try:
            names = sorted(os.listdir(self.folder))
        except FileNotFoundError:
            return
        for name in names:
            if name.startswith(".") or name in self.seen or not (self.folder / name).is_file():
                continue
            if any(path.name == name for path in self.written):
                continue  # one of our own status files
            self.seen.append(name)
            at = time.monotonic()
            with self._lock:
                for step in self.script(name):
                    at += step.delay
                    self._plans.append((at, name, step))

    @staticmethod
    def _target_name(upload: str, step: Write) -> str:
        return step.pattern.format(name=upload, stem=stem_of(upload))

    def _carry_out_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due, kept, waiting = [], [], set()
            for plan in self._plans:  # in each upload's script order
                _at, upload, step = plan
                ready = plan[0] <= now and upload not in waiting
                if ready and isinstance(step, Write) and step.when is not None:
                    ready = step.when(upload)
                if ready:
                    due.append(plan)
                else:
                    kept.append(plan)
                    waiting.add(upload)  # its later steps wait for this one
            self._plans = kept
        for _at, upload, step in due:
            if isinstance(step, Write):
                target = (step.folder or self.folder) / self._target_name(upload, step)
                temp = target.with_name(f".{target.name}.writing")
                temp.write_text(step.text)
                os.chmod(temp, 0o644)
                os.rename(temp, target)
                self.written.append(target)
            else:
                source = self.folder / upload
                if step.to is None:
                    source.unlink(missing_ok=True)
                else:
                    step.to.mkdir(parents=True, exist_ok=True)
                    os.rename(source, step.to / upload)

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._plans
