"""Spool files no journal row names: adopted at start-up (a lost or damaged journal strands nothing).

A spool file's name is `<id:08d>_<original name>` (`journal.spool_name`). `reconcile_spool` gives
every such file without a row a new `claimed` row, marked adopted (the id from its name when that
id is free, else the next id and a no-replace rename to the matching spool name); start-up recovery
then checks it like a newly dropped file. `find_published` lets the upload path see that the same
content was already published before it sends an adopted file again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loguru import logger

from agent.config import Config
from agent.imports.naming import HASH_CHARS
from agent.logs import file_fields
from agent.store.fsutil import STAGING_SUFFIX, durable_move
from agent.store.journal import FileRecord, FileState, Journal, parse_spool_name, spool_name

_SPLIT_FOLDER = re.compile(r"split-([0-9]+)")


def find_published(names_and_sizes: dict[str, int], record: FileRecord) -> str | None:
    """The remote name (from a listing of remote_dir: name -> size) under which this record's
    content was already published, else None: a name that holds `_<first 8 hex of the SHA-256>`
    (followed by `.`, `_part` or the `-N` of a name made unique), ends with the record's extension
    and has the record's size."""
    if not record.sha256 or record.size is None:
        return None
    tag = f"_{record.sha256[:HASH_CHARS].lower()}"
    _stem, dot, ext = record.name.rpartition(".")
    ending = f".{ext.lower()}" if dot else ""
    for name in sorted(names_and_sizes):
        if names_and_sizes[name] != record.size or not name.lower().endswith(ending):
            continue
        if name.startswith(".") or not any(f"{tag}{after}" in name for after in (".", "_part", "-")):
            continue
        return name
    return None


def reconcile_spool(config: Config, journal: Journal) -> list[FileRecord]:
    """Adopt every spool file no row names (a new `claimed` row each, marked adopted); the rows
    whose files are gone are left to recovery, which reports them as before. Run before anything
    else at start-up, with the agent lock held."""
    spool = config.spool_dir
    try:
        entries = sorted(os.scandir(spool), key=lambda entry: entry.name)
    except FileNotFoundError:
        return []
    named = journal.paths_under(spool)
    top = [entry for entry in entries if entry.is_file(follow_symlinks=False)]
    unnamed_ids = {parsed[0] for entry in top if str(Path(entry.path)) not in named
                   and (parsed := parse_spool_name(entry.name)) is not None}
    adopted: list[FileRecord] = []
    for entry in top:
        path = Path(entry.path)
        if str(path) in named or entry.name.startswith("."):  # hidden: a staging copy (source kept)
            continue
        try:
            adopted.append(_adopt_top(config, journal, path))
        except OSError as exc:
            logger.error("{} in the spool has no journal row and could not be adopted ({}); it is left"
                         " as it is and tried again at the next start", path, exc.strerror or exc)
    for entry in entries:
        found = _SPLIT_FOLDER.fullmatch(entry.name)
        if found is None or not entry.is_dir(follow_symlinks=False):
            continue
        if _will_split_again(journal, int(found[1]), unnamed_ids):
            continue  # its original is checked again and split anew (the folder is remade)
        for part in sorted(Path(entry.path).iterdir()):
            if (str(part) in named or part.name.startswith(".") or part.name.endswith(STAGING_SUFFIX)
                    or not part.is_file()):
                continue
            record = journal.adopt(None, part.name, part, part, _message(config, part))
            _report(record, part)
            adopted.append(record)
    return adopted


def _adopt_top(config: Config, journal: Journal, path: Path) -> FileRecord:
    parsed = parse_spool_name(path.name)
    wanted, name = parsed if parsed else (None, path.name)
    file_id = wanted if wanted is not None and not journal.has_id(wanted) else journal.max_id() + 1
    target = config.spool_dir / spool_name(file_id, name)
    if target != path:
        # renamed first, row second: a crash in between leaves a spool file that is adopted again
        durable_move(path, target)  # never replaces (FileExistsError: left as it is, said in the log)
    # checked as if dropped into drop/ under its original name (its drop/ subfolder is not known)
    record = journal.adopt(file_id, name, config.paths.drop / name, target, _message(config, path))
    _report(record, path)
    return record


def _message(config: Config, path: Path) -> str:
    return f"adopted from spool/{path.relative_to(config.spool_dir)}, journal had no row"


def _report(record: FileRecord, path: Path) -> None:
    logger.bind(**file_fields(record)).warning(
        "{} adopted from {}: the journal had no row for it; it is checked again like a new file",
        record.label, path)


def _will_split_again(journal: Journal, parent_id: int, unnamed_ids: set[int]) -> bool:
    """Whether spool/split-<id>/'s original is about to be checked and split anew (recovery of a
    `claimed` original, or an adopted one): then its parts must not be adopted as well."""
    if parent_id in unnamed_ids and not journal.has_id(parent_id):
        return True
    try:
        parent = journal.get(parent_id)
    except KeyError:
        return False
    return parent.state == FileState.CLAIMED and os.path.lexists(parent.local_path)
