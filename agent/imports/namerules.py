"""What a configured import prefix or drop/ subfolder name may look like: one definition, used by
the configuration (checked when it is loaded) and by remote naming (checked again before use).

A leaf module: it imports nothing from the agent, so `config` and `imports` can both use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_NAME_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
_TEMPORARY_ENDINGS = (".tmp", ".part")  # the names drop/ leaves alone as still being written


def check_prefix(prefix: str) -> None:
    """Raise ValueError unless the configured prefix is safe to start a remote name with."""
    if not _NAME_OK.fullmatch(prefix) or ".." in prefix:
        raise ValueError(
            f"import prefix {prefix!r} is not safe in a remote file name: use 1-40 ASCII letters, "
            "digits, '_', '-' or '.', starting with a letter or digit, without '..'"
        )


def check_folder(folder: str) -> None:
    """Raise ValueError unless the name is safe as a drop/ subfolder (one plain, visible name)."""
    if not _NAME_OK.fullmatch(folder) or ".." in folder or folder.lower().endswith(_TEMPORARY_ENDINGS):
        raise ValueError(
            f"folder name {folder!r} is not a plain subfolder name: use 1-40 ASCII letters, digits, "
            "'_', '-' or '.', starting with a letter or digit, without '..' and not ending in .tmp "
            "or .part"
        )


def check_distinct(names: Iterable[tuple[str, str]], what: str) -> None:
    """Raise ValueError when two (key, value) pairs share a value, compared case-insensitively."""
    seen: dict[str, str] = {}
    for key, value in names:
        other = seen.setdefault(value.lower(), key)
        if other != key:
            raise ValueError(
                f"'{other}' and '{key}' have the same {what} {value!r}; each import type needs its "
                f"own {what}, or a file could be sent as the wrong type"
            )
