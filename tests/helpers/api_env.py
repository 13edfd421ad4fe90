"""The agent on the API route (`upload.transport = "api"`) against the HTTPS sandbox of SaaSquatch's
import API (agent/ops/api_sandbox.py), and the invariant every API test ends with."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from agent.ops.api_sandbox import ApiSandbox
from tests.helpers.agent_env import AgentEnv

TENANT = "test_api0sandbox"
API_KEY = "sandbox-key-0123456789abcdef"


def write_key(path: Path, key: str = API_KEY, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    os.chmod(path, mode)
    return path


class ApiAgentEnv(AgentEnv):
    """An AgentEnv whose configuration has no [sftp] section: the API route to `sandbox`."""

    def __init__(self, root: Path, sandbox: ApiSandbox, *, key: str = API_KEY, extra: str = "",
                 settle_seconds: float = 0.0, poll_seconds: float = 0.2, upload_extra: str = "") -> None:
        self.sandbox = sandbox
        self.key_path = write_key(root / "keys" / "api-key", key)
        self.poll_seconds = poll_seconds
        self.upload_extra = upload_extra
        super().__init__(root, host="127.0.0.1", port=0, username=TENANT, private_key=self.key_path,
                         known_hosts=self.key_path, remote_dir="/", extra=extra,
                         settle_seconds=settle_seconds)

    def write_config(self, extra: str = "", settle_seconds: float = 0.0, **override: Any) -> None:
        self.config_path.write_text(
            f'[upload]\ntransport = "api"\n{self.upload_extra}\n\n'
            f'[api]\nbase_url = "{self.sandbox.base_url}"\ntenant_alias = "{self.sandbox.tenant}"\n'
            f'api_key_file = "{self.key_path}"\nca_file = "{self.sandbox.ca_path}"\n'
            f"timeout_seconds = 10.0\npoll_seconds = {self.poll_seconds}\n\n"
            '[paths]\ndrop = "drop"\nstate_dir = "state"\narchive = "archive"\nfailed = "failed"\n\n'
            f"[watch]\nsettle_seconds = {settle_seconds}\nrescan_seconds = 30\n\n"
            "[retry]\ninitial_delay_seconds = 0.2\nmax_delay_seconds = 1.0\nonce_max_attempts = 3\n\n"
            + extra
        )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_at_most_one_job(env: ApiAgentEnv, dropped: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    """The API route's invariant: every dropped file got at most one import job, and ended either
    archived (with its one job, recordsProcessed recorded) or in failed/ with a reason file beside
    it (failed or stale). Returns the final status rows by name."""
    jobs = env.sandbox.jobs_by_content()
    rows = {row["name"]: row for row in env.status()}
    assert set(rows) == set(dropped), (sorted(rows), sorted(dropped))
    for name, data in dropped.items():
        row = rows[name]
        digest = sha256(data)
        assert jobs[digest] <= 1, f"{name} got {jobs[digest]} import jobs"
        local = Path(row["local_path"])
        if row["state"] == "archived":
            assert jobs[digest] == 1, f"{name} archived without a job"
            assert row["job_id"] and row["records_processed"] is not None, row
            assert local.is_file() and local.is_relative_to(env.archive), row
            assert local.read_bytes() == data
        else:
            assert row["state"] in ("failed", "stale"), row
            assert local.is_file() and local.is_relative_to(env.failed), row
            reason = local.with_name(local.name + ".reason.txt")
            assert reason.is_file() and reason.read_text().strip(), f"{name}: no reason beside it"
            assert row["error"], row
    return rows
