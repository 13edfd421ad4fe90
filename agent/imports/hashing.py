"""Hashing while validating: the bytes the content check reads are hashed as they pass, so intake
reads a file once for both its SHA-256 and its validation (issue 7; bench/RESULTS.md)."""

from __future__ import annotations

import io
from typing import Protocol


class HashObject(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


class HashingReader(io.RawIOBase):
    """A read-only view of `raw` that feeds every byte read, in order, to `digest`.

    `hexdigest()` is the hash of the whole file only if the reading went from the start to the end
    without a seek; otherwise it is None and the caller hashes the file separately.
    """

    def __init__(self, raw: io.FileIO, digest: HashObject) -> None:
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._in_order = raw.tell() == 0
        self._at_end = False

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        count = self._raw.readinto(buffer)
        if count is None:
            return 0
        if count == 0:
            self._at_end = True
        elif self._in_order:
            self._digest.update(memoryview(buffer)[:count])
        return count

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._in_order = False  # a second pass (e.g. locating a bad byte): the running hash is void
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def hexdigest(self) -> str | None:
        return self._digest.hexdigest() if self._in_order and self._at_end else None
