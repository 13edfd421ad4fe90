"""The four SaaSquatch import types, and how a dropped file is given one.

A file is typed by its name's prefix (case-insensitive, the prefix followed by `_`, `-` or `.`, the
longest matching prefix winning) or by the drop/ subfolder it was dropped into. When both say
something they must agree: a disagreement is refused and the refusal names both, because guessing
which one the operator meant could turn an update into a deletion. A file may also be typed by a
caller-supplied fallback (e.g. a CLI `--type`), but never as a user deletion while the deletion
guard is on: deletion needs the deletion folder or the deletion prefix, spelled out.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

MAX_FILE_BYTES = 100 * 1024 * 1024  # SaaSquatch's limit per file (imports.max_file_bytes default)
MAX_RECORDS = 500_000  # imports.max_records default


class ImportType(StrEnum):
    USERS = "users"
    USER_EVENTS = "user_events"
    DELETE_USERS = "delete_users"
    REWARD_REDEMPTIONS = "reward_redemptions"


class OversizePolicy(StrEnum):
    SPLIT = "split"
    REFUSE = "refuse"


class NamesByType(Protocol):
    """One configured name per import type (prefixes, drop/ folders)."""

    def for_type(self, import_type: ImportType) -> str: ...


class Limits(Protocol):
    """The per-file limits a file is checked against."""

    @property
    def max_file_bytes(self) -> int: ...

    @property
    def max_records(self) -> int: ...


class ImportRules(Limits, Protocol):
    """What the import rules read of the configuration ([imports]; `agent.config.ImportsConfig` is
    one). A protocol, so the rules never import the configuration module."""

    @property
    def prefixes(self) -> NamesByType: ...

    @property
    def folders(self) -> NamesByType: ...

    @property
    def deletion_guard(self) -> bool: ...

    @property
    def oversize(self) -> OversizePolicy: ...


@dataclass(frozen=True)
class DefaultLimits:
    max_file_bytes: int = MAX_FILE_BYTES
    max_records: int = MAX_RECORDS

JOB_TYPES: dict[ImportType, str] = {
    ImportType.USERS: "MUTATION/USER",
    ImportType.USER_EVENTS: "MUTATION/USER_EVENT",
    ImportType.DELETE_USERS: "MUTATION/DELETE_USER",
    ImportType.REWARD_REDEMPTIONS: "MUTATION/REDEEMABLE_REWARD_BALANCE",
}

LABELS: dict[ImportType, str] = {
    ImportType.USERS: "users",
    ImportType.USER_EVENTS: "user events",
    ImportType.DELETE_USERS: "user deletion",
    ImportType.REWARD_REDEMPTIONS: "reward redemption",
}

PREFIX_SEPARATORS = ("_", "-", ".")


class FileFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"


_FORMAT_SUFFIXES = tuple((f".{fmt.value}", fmt) for fmt in FileFormat)  # file_format, per file: no Enum walk


class RefusalCode(StrEnum):
    BAD_NAME = "bad_name"
    BAD_EXTENSION = "bad_extension"
    NO_TYPE = "no_type"
    UNKNOWN_FOLDER = "unknown_folder"
    TYPE_CONFLICT = "type_conflict"
    AMBIGUOUS_CONFIG = "ambiguous_config"
    DELETION_GUARD = "deletion_guard"


@dataclass(frozen=True)
class Refusal:
    """A file refused before its content is read; `message` is meant for the operator."""

    code: RefusalCode
    message: str


@dataclass(frozen=True)
class Classification:
    import_type: ImportType | None
    refusal: Refusal | None = None
    by_prefix: bool = False
    by_folder: bool = False

    @property
    def ok(self) -> bool:
        return self.import_type is not None

    @property
    def job_type(self) -> str | None:
        return JOB_TYPES[self.import_type] if self.import_type else None


def job_type(import_type: ImportType) -> str:
    return JOB_TYPES[import_type]


def display_name(name: str, limit: int = 200) -> str:
    """The name as safe one-line text for messages: control characters shown as `?`."""
    shown = "".join("?" if unicodedata.category(ch).startswith("C") else ch for ch in name)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def accepted_summary(cfg: ImportRules) -> str:
    """One sentence listing the accepted prefixes and folders (used in refusals)."""
    prefixes = ", ".join(f"{cfg.prefixes.for_type(t)}_ ({LABELS[t]})" for t in ImportType)
    folders = ", ".join(f"drop/{cfg.folders.for_type(t)}/" for t in ImportType)
    return (
        f"Accepted name prefixes (case-insensitive, followed by _, - or .): {prefixes}. "
        f"Accepted subfolders: {folders}."
    )


def file_format(file_name: str) -> FileFormat | Refusal:
    """The format from the extension (`.csv` or `.jsonl`, case-insensitive), or a refusal."""
    lower = file_name.lower()
    for suffix, fmt in _FORMAT_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return fmt
    dot = file_name.rfind(".")
    if dot > 0:
        found = f"has the extension '{display_name(file_name[dot:], 40)}'"
    else:
        found = "has no name before its extension" if dot == 0 else "has no extension"
    return Refusal(
        RefusalCode.BAD_EXTENSION,
        f"the file {found}; SaaSquatch imports only .csv or .jsonl files. Save or rename it "
        "with one of those extensions and drop it again.",
    )


def type_by_prefix(file_name: str, cfg: ImportRules) -> ImportType | Refusal | None:
    """The type whose prefix the name starts with (longest wins), None when none does."""
    lower = file_name.lower()
    best: list[tuple[int, ImportType]] = []
    for import_type in ImportType:
        prefix = cfg.prefixes.for_type(import_type).lower()
        if lower.startswith(prefix) and lower[len(prefix):len(prefix) + 1] in PREFIX_SEPARATORS:
            best.append((len(prefix), import_type))
    if not best:
        return None
    best.sort(key=lambda item: item[0], reverse=True)
    if len(best) > 1 and best[0][0] == best[1][0]:
        return Refusal(
            RefusalCode.AMBIGUOUS_CONFIG,
            f"the name prefix matches two import types ({LABELS[best[0][1]]} and "
            f"{LABELS[best[1][1]]}) because the configuration gives them the same prefix; fix "
            "[imports.prefixes] in the agent's configuration.",
        )
    return best[0][1]


def type_by_folder(subfolder: str, cfg: ImportRules) -> ImportType | None:
    """The type of a drop/ subfolder (exact name, as created by the agent), None if unknown."""
    matches = [t for t in ImportType if cfg.folders.for_type(t) == subfolder]
    return matches[0] if len(matches) == 1 else None


def classify(
    file_name: str,
    subfolder: str | None,
    cfg: ImportRules,
    *,
    fallback: ImportType | None = None,
) -> Classification:
    """Give a dropped file its import type, or refuse it with a reason an operator can act on.

    `file_name` is the base name; `subfolder` is the drop/ subfolder it was dropped into (None for
    drop/ itself). `fallback` is the type the caller expects (CLI `--type`): it types a file that
    neither name nor folder types, and a name or folder that says otherwise is a conflict.
    """
    if not file_name or "/" in file_name or "\x00" in file_name or file_name in (".", ".."):
        return Classification(None, Refusal(
            RefusalCode.BAD_NAME,
            f"'{display_name(file_name)}' is not a plain file name (it is empty or contains a "
            "path separator); give the file a plain name and drop it again.",
        ))
    by_prefix = type_by_prefix(file_name, cfg)
    if isinstance(by_prefix, Refusal):
        return Classification(None, by_prefix)
    by_folder: ImportType | None = None
    if subfolder is not None:
        by_folder = type_by_folder(subfolder, cfg)
        if by_folder is None:
            shown = display_name(file_name)  # only a refusal shows it
            return Classification(None, Refusal(
                RefusalCode.UNKNOWN_FOLDER,
                f"'{shown}' was dropped into drop/{display_name(subfolder)}/, which is not an "
                f"import folder. {accepted_summary(cfg)}",
            ))
    if by_prefix and by_folder and by_prefix != by_folder:
        shown = display_name(file_name)  # only a refusal shows it
        return Classification(None, Refusal(
            RefusalCode.TYPE_CONFLICT,
            f"'{shown}' was dropped into drop/{display_name(subfolder or '')}/ (a "
            f"{LABELS[by_folder]} folder) but its name starts with the "
            f"{LABELS[by_prefix]} prefix '{cfg.prefixes.for_type(by_prefix)}'; the agent will not "
            "guess which one is meant. Move it to the matching folder or rename it.",
        ), by_prefix=True, by_folder=True)
    chosen = by_prefix or by_folder
    if chosen is not None and fallback is not None and fallback != chosen:
        how = "name prefix" if by_prefix else "folder"
        shown = display_name(file_name)  # only a refusal shows it
        return Classification(None, Refusal(
            RefusalCode.TYPE_CONFLICT,
            f"'{shown}' was given the type {LABELS[fallback]} but its {how} says "
            f"{LABELS[chosen]}; the agent will not guess which one is meant.",
        ), by_prefix=by_prefix is not None, by_folder=by_folder is not None)
    if chosen is not None:
        return Classification(chosen, by_prefix=by_prefix is not None,
                              by_folder=by_folder is not None)
    if fallback is None:
        shown = display_name(file_name)  # only a refusal shows it
        return Classification(None, Refusal(
            RefusalCode.NO_TYPE,
            f"'{shown}' has no import type: its name does not start with an accepted prefix and "
            f"it was not dropped into an import folder. {accepted_summary(cfg)}",
        ))
    if fallback == ImportType.DELETE_USERS and cfg.deletion_guard:
        prefix = cfg.prefixes.for_type(ImportType.DELETE_USERS)
        folder = cfg.folders.for_type(ImportType.DELETE_USERS)
        shown = display_name(file_name)  # only a refusal shows it
        return Classification(None, Refusal(
            RefusalCode.DELETION_GUARD,
            f"'{shown}' would delete users, which cannot be undone, so the deletion guard requires "
            f"it to be dropped into drop/{folder}/ or named with the prefix '{prefix}_'.",
        ))
    return Classification(fallback)
