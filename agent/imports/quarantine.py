"""What goes beside a refused file in failed/: `<name>.errors.csv` and `<name>.reason.txt` text.

The errors file has SaaSquatch's error-file shape (recordNumber, field, message); a problem with
the whole file has an empty recordNumber, and a last row says how many errors were not kept.
The reason is one paragraph in plain language: what is wrong, which records, what to do.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

from agent.imports.report import RecordError, ValidationReport
from agent.imports.types import JOB_TYPES, LABELS, ImportType, Refusal, display_name
from agent.units import counted

ERRORS_COLUMNS = ("recordNumber", "field", "message")
SHOWN_IN_REASON = 3

Outcome = ValidationReport | Refusal


def _rows(errors: Outcome | Iterable[RecordError]) -> list[tuple[str, str, str]]:
    if isinstance(errors, Refusal):
        return [("", "", errors.message)]
    kept = errors.errors if isinstance(errors, ValidationReport) else list(errors)
    rows = [("" if e.record is None else str(e.record), e.field, e.message) for e in kept]
    if isinstance(errors, ValidationReport) and errors.error_count > len(kept):
        rows.append(("", "", f"... and {errors.error_count - len(kept):,} more errors not listed "
                             f"({errors.error_count:,} in total; only the first {len(kept)} are kept)"))
    return rows


def errors_csv_text(errors: Outcome | Iterable[RecordError]) -> str:
    """The errors file's content: header plus one row per error (a Refusal gives one row)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(ERRORS_COLUMNS)
    writer.writerows(_rows(errors))
    return out.getvalue()


def _which_records(errors: list[RecordError], total: int) -> str:
    numbers = sorted({e.record for e in errors if e.record is not None})
    if not numbers:
        return ""
    listed = ", ".join(str(n) for n in numbers[:10])
    more = " and others" if len(numbers) > 10 or total > len(errors) else ""
    return f" Records affected: {listed}{more}."


def _examples(errors: list[RecordError]) -> str:
    parts = []
    for error in errors[:SHOWN_IN_REASON]:
        where = "the file" if error.record is None else f"record {error.record}"
        parts.append(f"{where}: {error.message}")
    return "; ".join(parts)


def _report_paragraph(name: str, report: ValidationReport) -> str:
    kind = f"a {LABELS[report.import_type]} file ({JOB_TYPES[report.import_type]})"
    safety = " No users were deleted." if report.import_type == ImportType.DELETE_USERS else ""
    if report.error_count:
        count = f"{report.error_count:,} problem{'s' if report.error_count != 1 else ''}"
        return (
            f"{name} was not uploaded: checked as {kind}, it has {count} that SaaSquatch would "
            f"reject ({_examples(report.errors)}).{_which_records(report.errors, report.error_count)}"
            f" The full list is in {name}.errors.csv (record numbers count data records from 1, "
            f"not the header). Fix the file and drop the corrected copy again; nothing was sent "
            f"to SaaSquatch.{safety}"
        )
    if report.over_limits:
        return (
            f"{name} was not uploaded: it is valid but too large for one upload ({report.bytes:,} "
            f"bytes and {counted(report.records, 'record')}; the limits are {report.max_file_bytes:,} bytes "
            f"and {report.max_records:,} records per file), and the agent is set to refuse "
            "oversized files (imports.oversize = \"refuse\"). Split it into smaller files and drop "
            "those, or set imports.oversize = \"split\" to let the agent split it; nothing was "
            f"sent to SaaSquatch.{safety}"
        )
    return f"{name} passed every check as {kind} ({counted(report.records, 'record')})."


def reason_paragraph(file_name: str, report_or_refusal: Outcome) -> str:
    """One paragraph an operator can act on: what is wrong, which records, what to do."""
    name = display_name(file_name)
    if isinstance(report_or_refusal, Refusal):
        return (f"{name} was not uploaded: {report_or_refusal.message} The file is unchanged and "
                "nothing was sent to SaaSquatch.")
    return _report_paragraph(name, report_or_refusal)
