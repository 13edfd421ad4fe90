"""CPU per file of the upload side in-process against a local OpenSSH sshd (needs root, like the
tests): files are claimed and queued by intake first (not timed), then `Uploader.process_batch` sends
them 64 at a time over one connected session, as an upload thread does in a burst. Prints, per run,
the sending thread's CPU per file and the whole process's (with paramiko's transport thread), and the
minimum of each. `python bench/upload_cpu.py --files 1000 --runs 5`; AGENT_ROOT= another tree;
--profile: cProfile of one run's sending thread (SORT=, TOP=)."""

from __future__ import annotations

import argparse
import cProfile
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if os.environ.get("AGENT_ROOT"):  # the `agent` package of another tree (e.g. `git archive` of a commit)
    sys.path.insert(0, os.environ["AGENT_ROOT"])

from agent.intake.settle import CLAIM_BATCH
from agent.pipeline.upload import Uploader
from agent.store.journal import FileState
from agent.transport.sftp import SftpSession
from bench.intake_cpu import burst_setup, log_to_nowhere, print_costs, print_profile
from tests.helpers.sshd import SshdServer


def one_run(server: SshdServer, base: Path, files: int,
            profile: cProfile.Profile | None) -> tuple[float, float]:
    for entry in os.scandir(server.local_remote_dir):
        os.unlink(entry.path)
    config, journal, filer, intake, candidates = burst_setup(
        base, files, f'host = "{server.host}"\nport = {server.port}\nusername = "{server.username}"\n'
        f'private_key = "{server.user_key_path}"\nknown_hosts = "{server.known_hosts_path}"\n'
        f'remote_dir = "{server.remote_dir}"')
    for first in range(0, len(candidates), CLAIM_BATCH):
        intake.claim_many(candidates[first:first + CLAIM_BATCH])
    session = SftpSession(config.sftp)
    uploader = Uploader(config, journal, filer, session)
    uploader.process_batch(journal.query("WHERE state = ?", (FileState.QUEUED.value,))[:1])  # connects
    queued = journal.query("WHERE state = ?", (FileState.QUEUED.value,))
    thread_start, process_start = time.thread_time(), time.process_time()
    if profile is not None:
        profile.enable()
    for first in range(0, len(queued), CLAIM_BATCH):
        uploader.process_batch(queued[first:first + CLAIM_BATCH])
    if profile is not None:
        profile.disable()
    thread_cpu, process_cpu = time.thread_time() - thread_start, time.process_time() - process_start
    archived = journal.query("WHERE state = ?", (FileState.ARCHIVED.value,))
    assert len(archived) == files, f"{len(archived)} of {files} archived"
    session.close()
    journal.close()
    return thread_cpu / len(queued), process_cpu / len(queued)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    log_to_nowhere()
    with SshdServer(log_level="ERROR") as server, tempfile.TemporaryDirectory(prefix="upload-cpu-") as tmp:
        if args.profile:
            profile = cProfile.Profile()
            one_run(server, Path(tmp) / "run", args.files, profile)
            print_profile(profile)
            return 0
        costs = [one_run(server, Path(tmp) / "run", args.files, None) for _ in range(args.runs)]
    print_costs(costs, ("upload sending thread", "upload process"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
