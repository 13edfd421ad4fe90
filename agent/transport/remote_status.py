"""Remote status conventions: reading what the server did with an upload (`[status]`).

SaaSquatch documents no status files, so the convention is configuration (`status.mode`):
- `consumed`: the upload disappearing from `remote_dir` means the server took it;
- `status-files`: files named after the upload by `status.patterns` (`{name}` = remote name,
  `{stem}` = remote name without extension), in `remote_dir` or `status.folder`; their content
  decides: JSON with a `status` field, text whose first word is a status, or SaaSquatch's errors
  CSV (`recordNumber,message,apiErrorCode,statusCode`);
- `none`: nothing is followed.
This module only reads and classifies; `agent.pipeline.lifecycle` decides and moves files.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
from dataclasses import dataclass
from enum import IntEnum

import paramiko

from agent.config import StatusConfig, StatusMode

MAX_STATUS_BYTES = 10 * 1024 * 1024  # larger status/result files are downloaded, never parsed
ERRORS_CSV_HEADER = ("recordnumber", "message", "apierrorcode", "statuscode")

ACCEPTED_WORDS = frozenset({"ACCEPTED", "RECEIVED", "QUEUED", "PENDING", "CREATED", "IMPORT_JOB_CREATED"})
PROCESSING_WORDS = frozenset({"PROCESSING", "RUNNING", "IN_PROGRESS", "INPROGRESS", "STARTED"})
SUCCESS_WORDS = frozenset({"COMPLETED", "COMPLETE", "SUCCESS", "SUCCEEDED", "SUCCESSFUL", "PROCESSED",
                           "DONE", "OK"})
FAILURE_WORDS = frozenset({"FAILED", "FAILURE", "FAIL", "ERROR", "ERRORS", "ABORTED", "REJECTED",
                           "CANCELLED", "CANCELED"})


class Outcome(IntEnum):
    """What one status file says; a higher value wins when several files speak."""

    UNKNOWN = 0  # not understood: kept, shown, never guessed at
    ACCEPTED = 1
    PROCESSING = 2
    COMPLETED = 3
    FAILED = 4


@dataclass(frozen=True)
class Reading:
    folder: str
    name: str
    outcome: Outcome
    message: str
    errors_csv: str | None = None  # the server's errors CSV text, when the file is one

    @property
    def path(self) -> str:
        return posixpath.join(self.folder, self.name)


def word_outcome(word: str) -> Outcome:
    key = re.sub(r"[\s-]+", "_", word.strip().upper())
    for words, outcome in ((FAILURE_WORDS, Outcome.FAILED), (SUCCESS_WORDS, Outcome.COMPLETED),
                           (PROCESSING_WORDS, Outcome.PROCESSING), (ACCEPTED_WORDS, Outcome.ACCEPTED)):
        if key in words:
            return outcome
    return Outcome.UNKNOWN


def _snippet(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def read_status(data: bytes) -> tuple[Outcome, str, str | None]:
    """Classify one status file's content: (outcome, message, errors CSV text or None)."""
    if len(data) > MAX_STATUS_BYTES:
        return Outcome.UNKNOWN, f"{len(data)} bytes, too large to read as a status", None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return Outcome.UNKNOWN, "not UTF-8 text", None
    stripped = text.strip()
    if not stripped:
        return Outcome.UNKNOWN, "empty file", None
    if stripped.startswith("{"):
        return _read_json(stripped)
    first_line = stripped.splitlines()[0]
    header = tuple(cell.strip().lower() for cell in next(csv.reader([first_line])))
    if header[:4] == ERRORS_CSV_HEADER:
        return _read_errors_csv(text)
    if first_line.strip().lower().startswith("import job created"):  # the integration page's words
        return Outcome.ACCEPTED, _snippet(first_line, 300), None
    match = re.match(r"[A-Za-z_-]+", stripped)
    if match is None or word_outcome(match.group(0)) is Outcome.UNKNOWN:
        return Outcome.UNKNOWN, f"starts with {_snippet(first_line, 60)!r}", None
    rest = stripped[match.end():].lstrip(" :-\t\r\n")
    return word_outcome(match.group(0)), _snippet(rest, 300) or match.group(0).upper(), None


def _read_json(text: str) -> tuple[Outcome, str, str | None]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        return Outcome.UNKNOWN, f"not valid JSON ({exc.msg})", None
    if not isinstance(doc, dict):
        return Outcome.UNKNOWN, "JSON without a status field", None
    lowered = {str(key).lower(): value for key, value in doc.items()}
    status = lowered.get("status")
    if not isinstance(status, str):
        return Outcome.UNKNOWN, "JSON without a status field", None
    outcome = word_outcome(status)
    if outcome is Outcome.UNKNOWN:
        return outcome, f"status {status!r} is not one the agent knows", None
    parts = [str(lowered[key]) for key in ("message", "error", "detail") if lowered.get(key)]
    errors = lowered.get("errors")
    if isinstance(errors, list) and errors:
        shown = "; ".join(_snippet(json.dumps(error), 120) for error in errors[:3])
        parts.append(f"{len(errors)} error(s): {shown}")
    stats = lowered.get("stats")
    if isinstance(stats, dict) and stats:
        parts.append(", ".join(f"{key} {value}" for key, value in stats.items()))
    return outcome, _snippet(" - ".join(parts), 300) or status.upper(), None


def _read_errors_csv(text: str) -> tuple[Outcome, str, str | None]:
    rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)][1:]
    if not rows:
        return Outcome.COMPLETED, "errors file lists no errors", text
    shown = []
    for row in rows[:3]:
        number, message, code, http = (cell.strip() for cell in [*row, "", "", "", ""][:4])
        shown.append(f"record {number}: {message} ({code}, {http})")
    more = f"; and {len(rows) - 3} more" if len(rows) > 3 else ""
    return Outcome.FAILED, f"SaaSquatch refused {len(rows)} record(s): " + "; ".join(shown) + more, text


def remote_stem(remote_name: str) -> str:
    stem, dot, _ext = remote_name.rpartition(".")
    return stem if dot else remote_name


def expected_names(remote_name: str, patterns: tuple[str, ...]) -> list[str]:
    names = [pattern.format(name=remote_name, stem=remote_stem(remote_name)) for pattern in patterns]
    return list(dict.fromkeys(name for name in names if name != remote_name))


def status_folders(config: StatusConfig, remote_dir: str) -> list[str]:
    """Every remote folder one poll lists (each exactly once)."""
    folders = [remote_dir]
    if StatusMode.STATUS_FILES in config.mode and config.folder and config.folder != remote_dir:
        folders.append(config.folder)
    return folders


@dataclass
class Snapshot:
    """One poll's view of the server: the names in each listed folder (None: listing failed)."""

    names: dict[str, frozenset[str] | None]

    @classmethod
    def take(cls, sftp: paramiko.SFTPClient, folders: list[str]) -> Snapshot:
        names: dict[str, frozenset[str] | None] = {}
        for folder in folders:
            try:
                names[folder] = frozenset(sftp.listdir(folder))  # one OPENDIR/READDIR/CLOSE run
            except FileNotFoundError:
                names[folder] = None
        return cls(names)

    def has(self, folder: str, name: str) -> bool:
        listed = self.names.get(folder)
        return listed is not None and name in listed


def find_status_files(snapshot: Snapshot, config: StatusConfig, remote_dir: str,
                      remote_name: str) -> list[tuple[str, str]]:
    """(folder, name) of every status/result file the server holds for this upload."""
    if StatusMode.STATUS_FILES not in config.mode:
        return []
    wanted = expected_names(remote_name, config.patterns)
    return [(folder, name) for folder in status_folders(config, remote_dir) for name in wanted
            if snapshot.has(folder, name)]


def read_remote(sftp: paramiko.SFTPClient, folder: str, name: str) -> tuple[bytes, Reading]:
    path = posixpath.join(folder, name)
    with sftp.open(path, "rb") as handle:
        data = handle.read(MAX_STATUS_BYTES + 1)
    outcome, message, errors_csv = read_status(data)
    return data, Reading(folder, name, outcome, message, errors_csv)


def verdict(readings: list[Reading]) -> Outcome:
    return max((reading.outcome for reading in readings), default=Outcome.UNKNOWN)
