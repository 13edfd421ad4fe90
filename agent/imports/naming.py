"""Remote file names: `<prefix>_<stem>_<YYYYMMDDTHHMMSSmmmZ>_<sha8>[_partKofN].<ext>`.

The name always starts with the type's configured prefix (the server types the file by it), keeps
the original stem readable, and is unique per content and second. It is built only from ASCII
letters, digits, `_`, `-` and the one `.` before the extension: unusual characters in the original
name are replaced by `-`, never passed on, so the name cannot carry a path, `..`, a control
character or a leading dot. Same inputs, same name.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime

from agent.imports.namerules import check_prefix
from agent.imports.types import FileFormat, Refusal, file_format

MAX_REMOTE_NAME = 120
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%S"  # then milliseconds and Z
HASH_CHARS = 8

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_RUNS = re.compile(r"[-_]{2,}")
_HEX = re.compile(r"[0-9a-fA-F]{8,}")


def readable_stem(original_name: str, prefix: str) -> str:
    """The original name without extension, reduced to `[A-Za-z0-9_-]`, type prefix not repeated."""
    fmt = file_format(original_name)
    stem = original_name if isinstance(fmt, Refusal) else original_name[: -len(fmt.value) - 1]
    if stem.isascii():  # NFKD leaves ASCII as it is, and it has no combining marks
        ascii_only = stem
    else:
        decomposed = unicodedata.normalize("NFKD", stem)
        ascii_only = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    cleaned = _RUNS.sub("-", _UNSAFE.sub("-", ascii_only)).strip("-_")
    folded_prefix = _RUNS.sub("-", _UNSAFE.sub("-", prefix)).strip("-_").lower()
    if folded_prefix and cleaned.lower().startswith(folded_prefix):
        rest = cleaned[len(folded_prefix):]
        if not rest or rest[0] in "-_":
            cleaned = rest.strip("-_")
    return cleaned


def remote_name(
    prefix: str,
    original_name: str,
    sha256_hex: str,
    when: datetime,
    part: tuple[int, int] | None = None,
    *,
    max_length: int = MAX_REMOTE_NAME,
) -> str:
    """The remote file name for a file (or part k of n of it); ValueError on unusable input.

    `prefix` is the import type's configured prefix (imports.prefixes); `when` must be
    timezone-aware (it is written in UTC); `original_name` must end in .csv or .jsonl. For the
    parts of a split file pass the original file's hash and `part=(k, n)`.
    """
    check_prefix(prefix)
    fmt = file_format(original_name)
    if not isinstance(fmt, FileFormat):
        raise ValueError(f"cannot name {original_name!r}: {fmt.message}")
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("remote_name needs a timezone-aware datetime")
    if not _HEX.fullmatch(sha256_hex):
        raise ValueError("sha256_hex must be a hexadecimal digest")
    moment = when.astimezone(UTC)
    # milliseconds: two claims of the same content never share a name (a claim takes longer than 1 ms)
    # TIMESTAMP_FORMAT written out: strftime costs more than the rest of the name together
    stamp = (f"{moment.year:04d}{moment.month:02d}{moment.day:02d}T{moment.hour:02d}{moment.minute:02d}"
             f"{moment.second:02d}{moment.microsecond // 1000:03d}Z")
    tail = f"_{stamp}_{sha256_hex[:HASH_CHARS].lower()}"
    if part is not None:
        k, n = part
        if not 1 <= k <= n:
            raise ValueError(f"part must be (k, n) with 1 <= k <= n, got {part!r}")
        tail += f"_part{k}of{n}"
    tail += f".{fmt.value}"
    room = max_length - len(prefix) - 1 - len(tail)
    if room < 0:
        raise ValueError(f"prefix {prefix!r} leaves no room in a {max_length}-character name")
    stem = readable_stem(original_name, prefix)[:room].rstrip("-_")
    return f"{prefix}_{stem}{tail}" if stem else f"{prefix}{tail}"
