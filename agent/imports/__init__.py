"""SaaSquatch import rules: typing, remote naming, validation, splitting and quarantine texts.

Pure and I/O-light: the daemon and the CLI call these functions; nothing here moves a file.
"""

from agent.imports.naming import remote_name
from agent.imports.quarantine import errors_csv_text, reason_paragraph, write_errors_csv
from agent.imports.report import RecordError, ValidationReport
from agent.imports.split import SplitError, split_file
from agent.imports.types import (
    JOB_TYPES,
    Classification,
    FileFormat,
    Refusal,
    RefusalCode,
    classify,
    file_format,
    job_type,
)
from agent.imports.validate import validate_file

__all__ = [
    "JOB_TYPES",
    "Classification",
    "FileFormat",
    "RecordError",
    "Refusal",
    "RefusalCode",
    "SplitError",
    "ValidationReport",
    "classify",
    "errors_csv_text",
    "file_format",
    "job_type",
    "reason_paragraph",
    "remote_name",
    "split_file",
    "validate_file",
    "write_errors_csv",
]
