"""Local disk trouble: a full state_dir loses nothing, and the agent recovers when space returns."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.agent_env import AgentEnv, wait_until
from tests.helpers.sshd import SshdServer


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (a disk we may fill). Needs root, as the suite's sshd fixture does."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test (run the tests as root): {result.stderr}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as handle:
        try:
            for _ in range(64):  # bounded: 64 x 1 MiB > the 8 MiB disk
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError:
            pass
    return filler


@pytest.mark.timeout(90)
def test_full_state_dir_keeps_the_file_and_recovers(sshd_server: SshdServer, small_disk: Path,
                                                    tmp_path: Path) -> None:
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0)
    text = env.config_path.read_text()
    text = text.replace('drop = "drop"', f'drop = "{small_disk / "drop"}"')
    text = text.replace('state_dir = "state"', f'state_dir = "{small_disk / "state"}"')
    env.config_path.write_text(text.replace("rescan_seconds = 30", "rescan_seconds = 1"))
    env.drop = small_disk / "drop"
    first = b"accountId,id\nacct-1,user-1\n"
    second = b"accountId,id\nacct-2,user-2\n"
    env.start()
    try:
        env.drop_atomically("users_first.csv", first)  # archive/ is on another disk: copy, fsync, unlink
        assert wait_until(lambda: len(env.archived_files()) == 1, 20), env.log()
        hidden = env.drop / ".users_second.csv.tmp"
        hidden.write_bytes(second)
        filler = fill(small_disk)
        os.rename(hidden, env.drop / "users_second.csv")
        assert wait_until(lambda: "disk is full" in env.log(), 20), env.log()
        assert (env.drop / "users_second.csv").read_bytes() == second  # still there, untouched
        assert env.process is not None and env.process.poll() is None  # still running
        filler.unlink()
        assert wait_until(lambda: len(env.archived_files()) == 2, 30), env.log()
    finally:
        assert env.stop() == 0, env.log()
    remote = sorted(p.read_bytes() for p in sshd_server.local_remote_dir.iterdir() if p.is_file())
    assert remote == sorted([first, second])
    assert sorted(p.read_bytes() for p in env.archived_files()) == sorted([first, second])
