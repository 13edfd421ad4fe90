"""Durable file moves: rename plus directory fsync, copy only across filesystems."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, mode: int = 0o750) -> None:
    path.mkdir(mode=mode, parents=True, exist_ok=True)


def durable_move(src: Path, dst: Path) -> None:
    """Move src to dst so that after a crash the file is in exactly one of the two places.

    A rename is atomic. Across filesystems it becomes copy, fsync, rename into place, then unlink
    of the source: a crash in between leaves two copies, never zero, and recovery keys on dst.
    """
    ensure_dir(dst.parent)
    [error] = durable_moves([(src, dst)])
    if error is not None:
        raise error


def durable_moves(moves: Sequence[tuple[Path, Path]]) -> list[OSError | None]:
    """`durable_move` for many files into existing folders: every rename (a copy across filesystems),
    then one fsync per folder involved, so a batch costs one fsync per folder, not two per file.
    Per move: None when it is done (and durable), else the OSError that stopped it (not moved)."""
    results: list[OSError | None] = []
    folders: set[Path] = set()
    for src, dst in moves:
        try:
            try:
                os.rename(src, dst)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                rewrite_durably(src, dst, copy_bytes)  # fsyncs its own folders
            else:
                folders.update((src.parent, dst.parent))
        except OSError as exc:
            results.append(exc)
            continue
        results.append(None)
    for folder in folders:
        fsync_dir(folder)
    return results


def copy_bytes(reader: BinaryIO, writer: BinaryIO) -> None:
    shutil.copyfileobj(reader, writer, 1024 * 1024)


def rewrite_durably(src: Path, dst: Path, transform: Callable[[BinaryIO, BinaryIO], None]) -> None:
    """Replace src by dst = transform(src): write a hidden staging file, fsync it, rename it to dst,
    fsync, then unlink src and fsync. A crash at any point leaves src, or both, never neither."""
    staging = dst.with_name(f".{dst.name}.tmp")
    with open(src, "rb") as reader, open(staging, "wb") as writer:
        transform(reader, writer)
        writer.flush()
        os.fsync(writer.fileno())
    os.rename(staging, dst)
    fsync_dir(dst.parent)
    os.unlink(src)
    fsync_dir(src.parent)


def write_durably(path: Path, text: str) -> None:
    """Write a small text file atomically (temp name, fsync, rename, fsync dir)."""
    ensure_dir(path.parent)
    staging = path.with_name(f".{path.name}.tmp")
    with open(staging, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(staging, path)
    fsync_dir(path.parent)


def unique_path(folder: Path, name: str, tag: str) -> Path:
    """folder/name, or folder/<stem>-<tag><suffix> when that is taken."""
    candidate = folder / name
    if not os.path.lexists(candidate):
        return candidate
    stem, dot, suffix = name.partition(".")
    return folder / (f"{stem}-{tag}{dot}{suffix}" if dot else f"{name}-{tag}")
