"""Journal rows as intake leaves small files: claimed into the spool, checked and queued."""

from __future__ import annotations

import hashlib
from pathlib import Path

from agent.pipeline.upload import Uploader
from agent.store.journal import FileRecord, FileState


def queue_files(uploader: Uploader, files: list[tuple[str, bytes]]) -> list[FileRecord]:
    """A queued row per (original name, bytes), its spool copy written; remote names unique per row."""
    records = []
    for index, (name, data) in enumerate(files):
        claimed = uploader.journal.add_claim(name, Path("/drop") / name, uploader.config.spool_dir)
        Path(claimed.local_path).write_bytes(data)
        stem = name.rsplit(".", 1)[0]
        records.append(uploader.journal.update(
            claimed.id, state=FileState.QUEUED, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
            import_type="users", remote_name=f"{stem}_20261201T120000000Z_{index:08x}.csv"))
    return records
