"""For one file: where it is now, why it is there, and what the operator does next.

One place for these answers, used by the `run --once` summary (agent.ops.summary) and `status
NAME|ID` (agent.ops.views).
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

from agent.config import Config, Transport
from agent.store.journal import FileRecord, FileState, iso_utc
from agent.units import human_duration

SENDING = (FileState.CLAIMED, FileState.QUEUED, FileState.UPLOADING, FileState.PUBLISHING)
AWAITING_VERDICT = (FileState.UPLOADED, FileState.ACCEPTED, FileState.PROCESSING)
_SENTENCE_END = re.compile(r"(?<=[.;])\s")


def first_sentence(text: str, limit: int = 160) -> str:
    """The first sentence (or clause up to `;`) of a reason, at most `limit` characters."""
    one_line = " ".join(text.split())
    head = _SENTENCE_END.split(one_line, maxsplit=1)[0].rstrip(".;")
    return head if len(head) <= limit else head[: limit - 3].rstrip() + "..."


def _side(path: str, suffix: str) -> Path:
    return Path(path + suffix)


def reason_file(record: FileRecord) -> Path | None:
    """The `.reason.txt` beside a refused file (where it is, or where it is bound)."""
    if record.state not in (FileState.FAILED, FileState.STALE):
        return None
    return _side(record.pending_path or record.local_path, ".reason.txt")


def _remote_place(record: FileRecord, config: Config) -> str | None:
    """Where the file is on the server: its path on the SFTP route, its fileRef on the API route."""
    if config.upload.transport == Transport.API:
        return f"fileRef {record.api_file_ref}" if record.api_file_ref else None
    return f"{config.sftp.remote_dir.rstrip('/')}/{record.remote_name}" if record.remote_name else None


def where_now(record: FileRecord, config: Config) -> str:
    """Where the file lies now, and on the server when it is there."""
    remote = _remote_place(record, config)
    state = record.state
    if state in (FileState.FAILED, FileState.STALE):
        if record.pending_path:
            return (f"still {record.local_path} ({Path(record.pending_path).parent} is not usable;"
                    f" it moves to {record.pending_path} once it is)")
        extra = ", reason in .reason.txt"
        if _side(record.local_path, ".errors.csv").exists():
            extra += ", records in .errors.csv"
        return f"{record.local_path} ({extra.lstrip(', ')})"
    if state == FileState.ARCHIVED:
        return record.local_path + (f"; on the server as {remote}" if remote else "")
    if state == FileState.SPLIT:
        return f"{record.local_path} (the original; its parts are files of their own)"
    if state == FileState.UPLOADING:
        return f"{record.local_path} (spool); the server may hold part of it under a temporary name"
    if state == FileState.PUBLISHING:
        return f"{record.local_path} (spool); the server holds it complete, being renamed to {remote}"
    if state in (*AWAITING_VERDICT, FileState.COMPLETED):
        return f"on the server as {remote}; the local copy is {record.local_path} (spool)"
    if state == FileState.CLAIMED and not os.path.lexists(record.local_path):
        return f"{record.source_path} (being taken from drop/)"
    return f"{record.local_path} (spool)"


def next_step(record: FileRecord, config: Config, *, once: bool = False,
              connection_error: str | None = None) -> str:
    """What the operator does now (or that nothing is to be done). `once`: after `run --once`, which
    left unsent files queued (the summary says why beside the name); `connection_error`: why the
    connection failed in that run."""
    state = record.state
    ref = f"saasquatch-agent retry {record.id}"
    if state == FileState.ARCHIVED:
        return "nothing: delivered and archived"
    if state == FileState.SPLIT:
        return "nothing for the original: each part is delivered as a file of its own (`status` lists them)"
    if state in (FileState.FAILED, FileState.STALE):
        return _after_refusal(record, ref)
    if state in SENDING:
        why = record.error or connection_error
        if once:
            if why:
                return ("fix what stopped it (`saasquatch-agent doctor` says how), then run again or start"
                        " the service; the file waits in the spool")
            return "run again or start the service; the file waits in the spool"
        if why and record.next_attempt_at is not None:
            return (f"nothing: sent again by itself {_when(record.next_attempt_at)} (last attempt:"
                    f" {first_sentence(why)}); `saasquatch-agent doctor` says what to fix")
        return "nothing: it is being checked or sent"
    if state in AWAITING_VERDICT:
        status = config.status
        return (f"nothing: waiting for the server's verdict (looked at every"
                f" {human_duration(status.poll_seconds)}; `stale` after {human_duration(status.timeout)}"
                " without one)")
    return "nothing: the server said it completed; it is being archived"


def _after_refusal(record: FileRecord, ref: str) -> str:
    reason = reason_file(record)
    if record.pending_path:
        folder = Path(record.pending_path).parent
        return (f"make {folder} usable (a folder the agent's user can write); the file moves there by"
                " itself within a minute")
    if record.state == FileState.STALE:
        return (f"look for {record.remote_name} in the File upload history on SaaSquatch's SFTP"
                f" integration page; if it was not imported, `{ref}` sends it again under a new name")
    error = record.error or ""
    if _side(record.local_path, ".errors.csv").exists() and record.remote_name is None:
        return (f"fix the records listed in {record.local_path}.errors.csv and drop the corrected file"
                " into drop/ again")
    if "already taken as a" in error:
        return f"nothing if the earlier file was meant; to send this one as well: `{ref}`"
    if "the server's verdict" in error or _server_files(Path(record.local_path)):
        return (f"read {reason} and the server's files beside it; fix the file and drop it again, or"
                f" `{ref}` to send it unchanged")
    return f"read {reason} (it says what to fix); then drop the file again, or `{ref}` once it is fixed"


def _server_files(path: Path) -> bool:
    """The server's own status or result files were saved beside it (`<name>.server.*`)."""
    try:
        return any(entry.startswith(path.name + ".server.") for entry in os.listdir(path.parent))
    except OSError:
        return False


def _when(epoch: float) -> str:
    left = epoch - datetime.now(UTC).timestamp()
    at = iso_utc(datetime.fromtimestamp(epoch, UTC))
    return f"at {at} (in {human_duration(left)})" if left > 0 else f"now (due since {at})"
