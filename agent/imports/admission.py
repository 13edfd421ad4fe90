"""The decision sequence for one file: type, format, content, limits, remote name.

The daemon's intake and the `validate` command both call `admit`, so a file that `validate` passes
is exactly a file the daemon sends. Nothing here moves a file or logs.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.imports.naming import remote_name
from agent.imports.quarantine import errors_csv_text, reason_paragraph
from agent.imports.report import ValidationReport
from agent.imports.types import (
    FileFormat,
    ImportRules,
    ImportType,
    OversizePolicy,
    Refusal,
    classify,
    file_format,
)
from agent.imports.validate import validate_file

_PART_SUFFIX = re.compile(r"_part([1-9][0-9]*)of([1-9][0-9]*)(?:\.[A-Za-z]+)?\Z")


@dataclass(frozen=True)
class PartOf:
    """A part cut from a split file: the original's name, hash and drop/ subfolder, and k of n."""

    original_name: str
    original_sha256: str
    subfolder: str | None
    k: int
    n: int


@dataclass(frozen=True)
class Admission:
    """What the import rules decided for one file."""

    import_type: ImportType | None = None
    remote_name: str | None = None
    refusal: str | None = None  # the reason paragraph, when refused
    errors_csv: str | None = None
    split_format: FileFormat | None = None  # set when a valid file must be split first
    deletes: int = 0
    refused_before_reading: Refusal | None = None  # refused by name or extension
    report: ValidationReport | None = None  # the content check, when the content was read
    sha256: str | None = None  # the file's SHA-256 when admit was asked to compute it and read it all

    @property
    def ok(self) -> bool:
        return self.refusal is None


def part_numbers(part_name: str) -> tuple[int, int] | None:
    """(k, n) from a part's file name `<stem>_part<k>of<n><ext>` (as `split_file` names them)."""
    found = _PART_SUFFIX.search(part_name)
    if not found:
        return None
    k, n = int(found[1]), int(found[2])
    return (k, n) if k <= n else None


def admit(
    path: str | os.PathLike[str],
    name: str,
    subfolder: str | None,
    digest: str | None,
    cfg: ImportRules,
    *,
    fallback: ImportType | None = None,
    follow_symlinks: bool = False,
    part: PartOf | None = None,
    now: datetime | None = None,
    opened: io.FileIO | None = None,
    report: ValidationReport | None = None,
) -> Admission:
    """Decide about the file at `path`, dropped as `name` into drop/`subfolder` (None: drop/ itself).

    `fallback` types a file that neither name nor folder types (the CLI's `--type`). A `part` is
    typed like its original and named `<prefix>_<original stem>_<time>_<original hash>_partKofN`;
    a part over the limits is refused, never split again. `digest` None: the SHA-256 is computed
    while the content is checked (one read) and returned as `sha256`. `opened`: the file at `path`
    already opened by the caller (`validate_file` reads it instead of opening `path` again).
    `report`: the content check already made (by a worker process while the file was sent:
    agent.intake.check_process) as `validate_file(path, <type>, cfg, fmt=<format>,
    digest=sha256())`; the file is not read again.
    """
    typed_as = part.original_name if part else name
    classification = classify(typed_as, part.subfolder if part else subfolder, cfg, fallback=fallback)
    if classification.refusal is not None or classification.import_type is None:
        assert classification.refusal is not None
        return Admission(refusal=reason_paragraph(name, classification.refusal),
                         refused_before_reading=classification.refusal)
    import_type = classification.import_type
    fmt = file_format(name)
    if isinstance(fmt, Refusal):
        return Admission(import_type, refusal=reason_paragraph(name, fmt), refused_before_reading=fmt)
    if report is None:
        report = validate_file(path, import_type, cfg, fmt=fmt, follow_symlinks=follow_symlinks,
                               digest=hashlib.sha256() if digest is None else None, opened=opened)
    if digest is None:
        digest = report.sha256
    if not report.ok:
        return Admission(import_type, refusal=reason_paragraph(name, report),
                         errors_csv=errors_csv_text(report), report=report, sha256=digest)
    if report.over_limits:
        if cfg.oversize == OversizePolicy.REFUSE or part is not None:
            return Admission(import_type, refusal=reason_paragraph(name, report), report=report,
                             sha256=digest)
        return Admission(import_type, split_format=fmt, deletes=report.deletes, report=report,
                         sha256=digest)
    if digest is None:  # the check did not read the whole file in order: hash it on its own
        digest = file_sha256(path, follow_symlinks)
    when = now or datetime.now(UTC)
    prefix = cfg.prefixes.for_type(import_type)
    if part is not None:
        remote = remote_name(prefix, part.original_name, part.original_sha256, when, part=(part.k, part.n))
    else:
        remote = remote_name(prefix, name, digest, when)
    return Admission(import_type, remote_name=remote, deletes=report.deletes, report=report,
                     sha256=digest)


def file_sha256(path: str | os.PathLike[str], follow_symlinks: bool = False) -> str:
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    digest = hashlib.sha256()
    with open(os.open(path, flags), "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def spool_part_of(source_path: Path, spool_dir: Path) -> int | None:
    """The journal id of the split original when `source_path` lies in its staging folder
    (`spool/split-<id>/`), else None."""
    folder = source_path.parent
    if folder.parent != spool_dir:
        return None
    found = re.fullmatch(r"split-([0-9]+)", folder.name)
    return int(found[1]) if found else None
