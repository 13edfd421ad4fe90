"""The one way tests build an in-process Config: folders under one root, an SFTP section that
points at nothing unless given, any other table as in agent.toml. Goes through `parse_config`, so
a test's config is checked (and its relative paths resolved) exactly as a file's would be."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.config import Config, SftpConfig, parse_config


def make_config(root: Path, tables: Mapping[str, Any] | None = None, *,
                sftp: SftpConfig | Mapping[str, Any] | None = None, port: int = 22,
                folders: bool = False) -> Config:
    """drop/, state/, archive/ and failed/ under `root` (made when `folders`); `tables`: further
    sections (`{"status": {"mode": "consumed"}}`); `sftp`: a server's settings (default: 127.0.0.1
    at `port`, user test_tenant, keys/id and keys/known_hosts under root, remote_dir /imports)."""
    if isinstance(sftp, SftpConfig):
        sftp = sftp.model_dump(exclude_defaults=True)
    data: dict[str, Any] = {
        "sftp": dict(sftp) if sftp is not None else {
            "host": "127.0.0.1", "port": port, "username": "test_tenant", "private_key": "keys/id",
            "known_hosts": "keys/known_hosts", "remote_dir": "/imports"},
        "paths": {"drop": "drop", "state_dir": "state", "archive": "archive", "failed": "failed"},
        **(tables or {}),
    }
    config = parse_config(data, root / "agent.toml")
    if folders:
        for folder in (config.paths.state_dir, config.spool_dir, config.paths.archive, config.paths.failed):
            folder.mkdir(parents=True, exist_ok=True)
    return config
