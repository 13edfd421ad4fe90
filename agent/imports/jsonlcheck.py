"""Streaming JSONL check: one JSON object per line, flattened to the CSV's dotted field paths.

Lines are read with a length cap (MAX_LINE_BYTES) so a file without newlines cannot be pulled into
memory whole. JSON values are turned into the text a CSV would carry (true -> "true", 12 -> "12")
and checked with the same rules as CSV values; strings are accepted for booleans and numbers.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, BinaryIO

from agent.imports.report import ErrorSink
from agent.imports.rules import REQUIRED, SCALAR_CUSTOM_FIELDS, TYPED, shown
from agent.imports.types import ImportType

MAX_LINE_BYTES = 1 << 20
_BOM = b"\xef\xbb\xbf"
_NONSCALAR = object()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def flatten(obj: dict[str, Any], prefix: str = "", out: dict[str, Any] | None = None
            ) -> dict[str, Any]:
    """Nested objects become dotted paths; `customFields` is flattened one level only, so a
    nested object inside it stays a (non-scalar) value."""
    out = {} if out is None else out
    for key, value in obj.items():
        path = prefix + key
        if isinstance(value, dict) and value:
            if path == "customFields":
                for name, inner in value.items():
                    out[f"customFields.{name}"] = inner
            else:
                flatten(value, path + ".", out)
        else:
            out[path] = value
    return out


def as_text(value: Any) -> Any:
    """The CSV text of a JSON scalar; None for null; _NONSCALAR for arrays and objects."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f")
    return _NONSCALAR


def describe_json_error(exc: json.JSONDecodeError, text: str) -> str:
    before = text[: exc.pos].rstrip()
    after = text[exc.pos:].lstrip()
    if before.endswith(",") and after[:1] in ("}", "]"):
        return "trailing comma before '" + after[:1] + "' (JSON does not allow it)"
    if exc.msg == "Extra data":
        if after.startswith(","):
            return ("a comma after the object: each line must hold exactly one JSON object, "
                    "with no comma between lines")
        return "more than one JSON value on the line; each line must hold exactly one JSON object"
    if text.strip() in ("{", "["):
        return ("the line is not a complete JSON object; each record must be on a single line "
                "(the file looks pretty-printed)")
    return f"not valid JSON: {exc.msg} at column {exc.colno}"


def _not_object(value: Any) -> str:
    if isinstance(value, list):
        hint = (" (the whole file looks like one JSON array; write one object per line)"
                if value and all(isinstance(item, dict) for item in value) else "")
        return f"the line is a JSON array; each line must be one JSON object {{...}}{hint}"
    kind = {str: "string", bool: "boolean", int: "number", float: "number"}.get(type(value), "null")
    return f"the line is a JSON {kind}; each line must be one JSON object {{...}}"


def check_record(flat: dict[str, Any], import_type: ImportType, record: int,
                 sink: ErrorSink) -> None:
    for name in REQUIRED[import_type]:
        if name not in flat:
            sink.add(record, name, f"'{name}' is required but the record does not have it")
            continue
        value = as_text(flat[name])
        if value is _NONSCALAR:
            sink.add(record, name, f"'{name}' must be a single value, not an array or object")
        elif value is None or not value or value.isspace():
            sink.add(record, name, f"'{name}' is required and must not be empty")
    for name, check in TYPED[import_type].items():
        if name in flat:
            value = as_text(flat[name])
            if value is _NONSCALAR:
                sink.add(record, name, f"'{name}' must be a single value, not an array or object")
            elif value:
                problem = check(value)
                if problem:
                    sink.add(record, name, f"'{name}' {problem}")
    if import_type in SCALAR_CUSTOM_FIELDS:
        for name, value in flat.items():
            if name == "customFields":
                if value is not None and value != {}:
                    sink.add(record, name, "'customFields' must be an object of name: value pairs")
            elif name.startswith("customFields.") and isinstance(value, (list, dict)):
                sink.add(record, name, f"custom field {shown(name)} must be a single value "
                                       "(text, number or boolean), not an array or object")


def _skip_rest_of_line(stream: BinaryIO) -> None:
    while chunk := stream.readline(MAX_LINE_BYTES):
        if chunk.endswith(b"\n"):
            return


def check_jsonl(stream: BinaryIO, import_type: ImportType, sink: ErrorSink) -> int:
    """Check a JSONL stream (buffered, at its start); returns the number of records read."""
    records = 0
    blank = 0
    line_no = 0
    while line := stream.readline(MAX_LINE_BYTES + 1):
        line_no += 1
        if line_no == 1 and line.startswith(_BOM):
            line = line[len(_BOM):]
        if b"\x00" in line:
            sink.add(None, "", f"the file contains binary data (a NUL byte on line {line_no}); it "
                               "is not a text JSONL file")
            return records
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            _skip_rest_of_line(stream)
        elif not line.strip():
            blank += 1
            continue
        for _ in range(blank):
            records += 1
            sink.add(records, "", "blank line in the middle of the file; remove it")
        blank = 0
        records += 1
        if len(line) > MAX_LINE_BYTES:
            sink.add(records, "", f"the line is longer than {MAX_LINE_BYTES:,} bytes")
            continue
        _check_line(line, import_type, records, sink)
    if records == 0:
        sink.add(None, "", "the file is empty: it has no records")
    return records


def _check_line(line: bytes, import_type: ImportType, record: int, sink: ErrorSink) -> None:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        sink.add(record, "", f"not valid UTF-8: byte 0x{line[exc.start]:02X} at byte "
                             f"{exc.start + 1} of the line; save the file with UTF-8 encoding")
        return
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        sink.add(record, "", describe_json_error(exc, text))
        return
    except ValueError as exc:
        sink.add(record, "", str(exc))
        return
    if not isinstance(value, dict):
        sink.add(record, "", _not_object(value))
        return
    check_record(flatten(value), import_type, record, sink)
