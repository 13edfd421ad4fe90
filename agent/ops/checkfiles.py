"""`saasquatch-agent validate FILE...`: the daemon's checks, without uploading anything.

Each file goes through `agent.imports.admission.admit`, the same decision the daemon's intake
makes, so a file this command passes is a file the daemon sends. An over-limit file is reported as
"would be split into N parts" (counted, nothing written) or as refused, as the configuration says.
Unlike the daemon, a symbolic link named on the command line is followed (the operator named it);
FIFOs, devices and folders are refused without being read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import ImportsConfig, ImportType
from agent.imports.admission import Admission, admit
from agent.imports.split import SplitError, count_parts
from agent.imports.types import JOB_TYPES, display_name
from agent.imports.validate import open_regular
from agent.units import counted

HASH_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class FileCheck:
    """The outcome for one file named on the command line."""

    path: Path
    admission: Admission | None = None
    problem: str | None = None  # the file could not be checked at all (not a file, I/O error)
    parts: int | None = None  # how many parts a valid over-limit file would be split into
    split_problem: str | None = None  # why a valid over-limit file could not be split

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def ok(self) -> bool:
        return (self.problem is None and self.split_problem is None and self.admission is not None
                and self.admission.ok)

    @property
    def action(self) -> str:
        if not self.ok:
            return "refuse"
        return "split" if self.parts is not None else "upload"

    def to_json(self) -> dict[str, Any]:
        adm = self.admission
        report = adm.report if adm else None
        errors: list[dict[str, Any]] = []
        if self.problem:
            errors = [{"recordNumber": None, "field": "", "message": self.problem}]
        elif adm and adm.refused_before_reading:
            errors = [{"recordNumber": None, "field": "", "message": adm.refused_before_reading.message}]
        elif report:
            errors = [error.to_json() for error in report.errors]
        if self.split_problem:
            errors.append({"recordNumber": None, "field": "", "message": self.split_problem})
        import_type = adm.import_type if adm else None
        return {
            "file": str(self.path),
            "name": self.name,
            "valid": self.ok,
            "action": self.action,
            "import_type": import_type.value if import_type else None,
            "job_type": JOB_TYPES[import_type] if import_type else None,
            "format": report.format.value if report and report.format else None,
            "records": report.records if report else None,
            "bytes": report.bytes if report else None,
            "error_count": max(report.error_count if report else 0, len(errors)),
            "errors": errors,
            "over_limits": report.over_limits if report else False,
            "parts": self.parts,
            "remote_name": adm.remote_name if adm else None,
            "deletes": adm.deletes if adm else 0,
            "reason": self.reason,
        }

    @property
    def reason(self) -> str | None:
        """The paragraph the daemon would write to reason.txt, or None when the file is fine."""
        if self.problem:
            return f"{display_name(self.name)} {self.problem}"
        if self.split_problem:
            return (f"{display_name(self.name)} is too large for one upload and could not be split: "
                    f"{self.split_problem}.")
        return self.admission.refusal if self.admission else None


def check_file(path: Path, cfg: ImportsConfig, *, drop: Path | None = None,
               fallback: ImportType | None = None) -> FileCheck:
    """Check one file as the daemon would if it were dropped where it lies (or into drop/)."""
    try:
        opened = open_regular(path, follow_symlinks=True)
        if isinstance(opened, str):
            return FileCheck(path, problem=opened)
        with opened as raw:
            digest = hashlib.sha256()
            while chunk := raw.read(HASH_CHUNK):
                digest.update(chunk)
        verdict = admit(path, path.name, _subfolder(path, drop), digest.hexdigest(), cfg,
                        fallback=fallback, follow_symlinks=True)
        if verdict.split_format is None:
            return FileCheck(path, verdict)
        try:
            parts = count_parts(path, verdict.split_format, cfg.max_file_bytes, cfg.max_records)
        except SplitError as exc:
            return FileCheck(path, verdict, split_problem=str(exc))
        return FileCheck(path, verdict, parts=parts)
    except OSError as exc:
        return FileCheck(path, problem=f"could not be read: {exc.strerror or exc}")


def _subfolder(path: Path, drop: Path | None) -> str | None:
    """The drop/ subfolder a file lies in, when it lies in the configured drop/ tree."""
    if drop is None:
        return None
    parent = path.absolute().parent
    if parent == drop.absolute():
        return None
    if parent.parent == drop.absolute():
        return parent.name
    return None


def human_lines(result: FileCheck) -> list[str]:
    """Lines for a person: verdict first, then one line per kept error with its record number."""
    shown = display_name(str(result.path))
    adm = result.admission
    report = adm.report if adm else None
    if result.ok:
        assert adm is not None and adm.import_type is not None and report is not None
        fmt = report.format.value.upper() if report.format else "?"
        what = (f"{adm.import_type.value} ({JOB_TYPES[adm.import_type]}), {fmt},"
                f" {counted(report.records, 'record')}, {report.bytes:,} bytes")
        if result.parts is not None:
            tail = (f"over the per-file limits ({report.max_file_bytes:,} bytes, "
                    f"{report.max_records:,} records): would be split into {result.parts} parts")
        else:
            tail = f"would be uploaded as {adm.remote_name}"
        lines = [f"{shown}: valid: {what}; {tail}"]
        if adm.deletes:
            lines.append(f"  warning: sending it will permanently delete {counted(adm.deletes, 'user')}")
        return lines
    lines = [f"{shown}: INVALID"]
    if result.problem or result.split_problem or (adm and adm.refused_before_reading):
        lines.append(f"  {result.reason}")
        return lines
    assert adm is not None and report is not None
    if not report.error_count:  # valid but over the limits, and the configuration refuses
        lines.append(f"  {adm.refusal}")
        return lines
    for error in report.errors:
        where = "file" if error.record is None else f"record {error.record}"
        field = f", field {error.field!r}" if error.field else ""
        lines.append(f"  {where}{field}: {error.message}")
    hidden = report.error_count - len(report.errors)
    if hidden > 0:
        lines.append(f"  ... and {hidden:,} more errors not listed ({report.error_count:,} in total)")
    return lines
