"""What validation found: SaaSquatch-style record errors and the report for one file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.imports.types import FileFormat, ImportType

MAX_KEPT_ERRORS = 100


@dataclass(frozen=True)
class RecordError:
    """One problem. `record` is the 1-based data record (header not counted); None means the
    problem concerns the whole file or its header. `field` is the column/dotted path, or ''."""

    record: int | None
    field: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"recordNumber": self.record, "field": self.field, "message": self.message}


class ErrorSink:
    """Keeps the first `keep` errors and counts all of them."""

    def __init__(self, keep: int = MAX_KEPT_ERRORS) -> None:
        self.keep = keep
        self.kept: list[RecordError] = []
        self.count = 0

    def add(self, record: int | None, field_name: str, message: str) -> None:
        self.count += 1
        if len(self.kept) < self.keep:
            self.kept.append(RecordError(record, field_name, message))


@dataclass
class ValidationReport:
    """The outcome for one file. `ok` means no rule is broken; a file can be ok and still
    `over_limits` (too many bytes or records for one upload): the caller splits or refuses it.
    `records` counts data records read (up to the point a fatal problem stopped the reading);
    `deletes` is the number of users a deletion file would delete (0 for other types)."""

    ok: bool
    import_type: ImportType
    format: FileFormat | None
    records: int
    bytes: int
    error_count: int
    errors: list[RecordError] = field(default_factory=list)
    over_limits: bool = False
    deletes: int = 0
    max_file_bytes: int = 0
    max_records: int = 0
    sha256: str | None = None  # set when validate_file was given a hash object and read the whole file

    @property
    def over_bytes(self) -> bool:
        return self.bytes > self.max_file_bytes > 0

    @property
    def over_records(self) -> bool:
        return self.records > self.max_records > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "import_type": self.import_type.value,
            "format": self.format.value if self.format else None,
            "records": self.records,
            "bytes": self.bytes,
            "error_count": self.error_count,
            "errors": [error.to_json() for error in self.errors],
            "over_limits": self.over_limits,
            "deletes": self.deletes,
            "max_file_bytes": self.max_file_bytes,
            "max_records": self.max_records,
        }
