"""Durable file moves and writes that never replace an existing name.

One primitive, `place`, puts a file under a new name without ever replacing what is there
(`renameat2(RENAME_NOREPLACE)` where the kernel and filesystem have it, else link + unlink). Every
move (`durable_move(s)`), rewrite (`rewrite_durably`) and write (`durable_writer`, `write_durably`)
goes through it, so no file the agent did not create for that very purpose is ever overwritten
(ARCHITECTURE.md, rule 2). `replace=True` is only for the agent's own files that it renews on
purpose (the journal backup, known_hosts written by `trust-host`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

STAGING_SUFFIX = ".saq-tmp"  # hidden staging names: .<name>.saq-tmp in the destination folder
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _load_renameat2() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 (or not Linux): link + unlink instead
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return,unused-ignore]


_renameat2 = _load_renameat2()
_use_renameat2 = _renameat2 is not None  # cleared once the kernel says it has no renameat2


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path, mode: int = 0o750) -> None:
    path.mkdir(mode=mode, parents=True, exist_ok=True)


def staging_path(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}{STAGING_SUFFIX}")


def place(src: Path, dst: Path, *, replace: bool = False) -> None:
    """Rename src to dst on one filesystem; FileExistsError when dst exists (nothing replaced).

    `renameat2(RENAME_NOREPLACE)` where the filesystem has it; otherwise `link(src, dst)` (fails
    when dst exists) then `unlink(src)`. A crash between the two leaves both names on one inode:
    the next `place` of the same move sees that and finishes it by unlinking src. No fsync here
    (callers fsync the folders once per batch); EXDEV is raised as OSError for the caller.
    """
    global _use_renameat2
    if replace:  # the agent's own file, renewed on purpose
        os.replace(src, dst)  # the one os.replace in agent/
        return
    if _use_renameat2 and _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            _exists(src, dst)
            return
        if code == errno.ENOSYS:
            _use_renameat2 = False
        elif code != errno.EINVAL:  # EINVAL: this filesystem has no RENAME_NOREPLACE
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        _exists(src, dst)
        return
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # a filesystem without hard links (vfat, some FUSE): last resort, a checked plain rename
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "File exists", str(dst)) from None
        os.rename(src, dst)  # checked just above
        return
    os.unlink(src)


def _exists(src: Path, dst: Path) -> None:
    """dst exists: an interrupted link + unlink of this very move (one inode) is finished, anything
    else is refused."""
    with contextlib.suppress(OSError):
        if os.path.samefile(src, dst) and os.stat(src, follow_symlinks=False).st_nlink >= 2:
            os.unlink(src)
            return
    raise FileExistsError(errno.EEXIST, "File exists (not replaced)", str(dst))


def finish_interrupted_move(src: Path, dst: Path) -> None:
    """If a link + unlink move from src to dst was cut short (both names on one inode), unlink src."""
    with contextlib.suppress(OSError):
        if os.path.samefile(src, dst):
            os.unlink(src)
            fsync_dir(src.parent)


def durable_move(src: Path, dst: Path) -> None:
    """Move src to dst so that after a crash the file is in exactly one of the two places.

    Never replaces dst (FileExistsError). Across filesystems it becomes copy, fsync, no-replace
    rename into place, then unlink of the source: a crash in between leaves two copies, never
    zero, and recovery keys on dst.
    """
    ensure_dir(dst.parent)
    [error] = durable_moves([(src, dst)])
    if error is not None:
        raise error


def durable_moves(moves: Sequence[tuple[Path, Path]]) -> list[OSError | None]:
    """`durable_move` for many files into existing folders: every no-replace rename (a copy across
    filesystems), then one fsync per folder involved, so a batch costs one fsync per folder.
    Per move: None when it is done (and durable), else the OSError that stopped it (not moved)."""
    results: list[OSError | None] = []
    folders: set[Path] = set()
    for src, dst in moves:
        try:
            try:
                place(src, dst)
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


@contextlib.contextmanager
def durable_writer(path: Path, *, replace: bool = False) -> Iterator[BinaryIO]:
    """`with durable_writer(path) as handle:` the one durable write: a hidden staging file in the
    same folder, fsync, no-replace rename to path (FileExistsError when path exists, unless
    replace), fsync of the folder; on any error the staging file is removed and path is untouched."""
    ensure_dir(path.parent)
    if not replace and os.path.lexists(path):  # fail before writing a byte (place checks again)
        raise FileExistsError(errno.EEXIST, "File exists (not replaced)", str(path))
    staging = fresh_staging(path)
    try:
        with open(staging, "xb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        remove_staging(staging)
        raise
    install_staged(staging, path, replace=replace, synced=True)


def fresh_staging(path: Path) -> Path:
    """The staging name for path, a crash's leftover of it removed (never truncated: it may share
    its inode with a name placed by link before the crash)."""
    staging = staging_path(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging)
    return staging


def remove_staging(staging: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(staging)


def install_staged(staging: Path, path: Path, *, replace: bool = False, synced: bool = False) -> None:
    """Put a complete staging file at path: fsync it (unless `synced`), no-replace rename (unless
    replace), fsync the folder; on any error the staging file is removed and path is untouched."""
    try:
        if not synced:
            fd = os.open(staging, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        place(staging, path, replace=replace)
    except BaseException:
        remove_staging(staging)
        raise
    fsync_dir(path.parent)


def rewrite_durably(src: Path, dst: Path, transform: Callable[[BinaryIO, BinaryIO], None]) -> None:
    """Move src to dst = transform(src): write a hidden staging file, fsync, no-replace rename to
    dst, fsync, then unlink src and fsync. A crash at any point leaves src, or both, never neither."""
    with open(src, "rb") as reader, durable_writer(dst) as writer:
        transform(reader, writer)
    os.unlink(src)
    fsync_dir(src.parent)


def write_durably(path: Path, text: str, *, replace: bool = False) -> None:
    """Write a small text file atomically; never over an existing file unless replace."""
    write_bytes_durably(path, text.encode("utf-8"), replace=replace)


def write_bytes_durably(path: Path, data: bytes, *, replace: bool = False) -> None:
    with durable_writer(path, replace=replace) as handle:
        handle.write(data)
