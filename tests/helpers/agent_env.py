"""Run the agent as a real process against a test SFTP server, and look at what it did."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll predicate until true or timeout; bounded in time and count."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        if predicate():
            return True
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return predicate()


class AgentEnv:
    """A config file and folders for one agent, pointed at host:port with the given key files."""

    def __init__(self, root: Path, *, host: str, port: int, username: str, private_key: Path,
                 known_hosts: Path, remote_dir: str, extra: str = "", settle_seconds: float = 0.3,
                 sftp_extra: str = "") -> None:
        self.root = root
        self.config_path = root / "agent.toml"
        self.drop = root / "drop"
        self.archive = root / "archive"
        self.failed = root / "failed"
        self.state = root / "state"
        self.log_path = root / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.settings = dict(host=host, port=port, username=username, private_key=private_key,
                             known_hosts=known_hosts, remote_dir=remote_dir, sftp_extra=sftp_extra)
        self.write_config(extra, settle_seconds)

    @classmethod
    def for_sshd(cls, root: Path, server: Any, **kwargs: Any) -> AgentEnv:
        return cls(root, host=server.host, port=server.port, username=server.username,
                   private_key=server.user_key_path, known_hosts=server.known_hosts_path,
                   remote_dir=server.remote_dir, **kwargs)

    def write_config(self, extra: str = "", settle_seconds: float = 0.3, **override: Any) -> None:
        s = {**self.settings, **override}
        self.config_path.write_text(
            "[sftp]\n"
            f'host = "{s["host"]}"\nport = {s["port"]}\nusername = "{s["username"]}"\n'
            f'private_key = "{s["private_key"]}"\nknown_hosts = "{s["known_hosts"]}"\n'
            f'remote_dir = "{s["remote_dir"]}"\nconnect_timeout = 5.0\noperation_timeout = 10.0\n'
            f'{s["sftp_extra"]}\n\n'
            '[paths]\ndrop = "drop"\nstate_dir = "state"\narchive = "archive"\nfailed = "failed"\n\n'
            f"[watch]\nsettle_seconds = {settle_seconds}\nrescan_seconds = 30\n\n"
            "[retry]\ninitial_delay_seconds = 0.2\nmax_delay_seconds = 1.0\nonce_max_attempts = 2\n\n"
            + extra
        )

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "agent", *args]

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout,
                              cwd=REPO, env=env, check=False)

    def run_once(self, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.cli("run", "--once", "--config", str(self.config_path), timeout=timeout)

    def start(self) -> subprocess.Popen[bytes]:
        offset = len(self.log())
        process = self.spawn()
        if not wait_until(lambda: "watching" in self.log()[offset:] or process.poll() is not None, 20):
            raise AssertionError(f"agent did not start:\n{self.log()}")
        return process

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the daemon and return at once (it may still be starting up)."""
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(self.command("run", "--config", str(self.config_path)),
                                        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        log.close()
        return self.process

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(5)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> list[dict[str, Any]]:
        result = self.cli("status", "--json", "--config", str(self.config_path))
        assert result.returncode == 0, result.stderr
        rows: list[dict[str, Any]] = json.loads(result.stdout)
        return rows

    def states(self) -> dict[str, str]:
        return {row["name"]: row["state"] for row in self.status()}

    def archived_files(self) -> list[Path]:
        return sorted(p for p in self.archive.rglob("*") if p.is_file())

    def drop_atomically(self, name: str, data: bytes, folder: str | None = None) -> Path:
        target_dir = self.drop / folder if folder else self.drop
        target_dir.mkdir(parents=True, exist_ok=True)
        temp = target_dir / f".{name}.tmp"
        temp.write_bytes(data)
        os.rename(temp, target_dir / name)
        return target_dir / name


def sandbox_env(tmp_path: Path, server: Any, key: Path) -> AgentEnv:
    """An AgentEnv under tmp_path/agent that uploads to the `sandbox` fixture's server (settle 0)."""
    known_hosts = tmp_path / "keys" / "known_hosts"
    known_hosts.write_text(server.known_hosts_line() + "\n")
    return AgentEnv(tmp_path / "agent", host=server.host, port=server.port, username=server.username,
                    private_key=key, known_hosts=known_hosts, remote_dir="/imports", settle_seconds=0)
