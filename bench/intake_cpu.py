"""CPU per file of the daemon's local steps in-process (no daemon, no server), 64 files at a time as
in a burst: intake's claim + check + queue (the single intake thread), then the upload side's
`Uploader._finish` (uploaded + archive intent, the moves to archive/, the log lines) as if each batch
had been published. `python bench/intake_cpu.py --files 1000 --runs 5` prints the thread CPU per
file of each run and the minimum (the machine is shared: the minimum is the cost). With --profile:
cProfile of one run (SORT=tottime|cumulative, TOP=40)."""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if os.environ.get("AGENT_ROOT"):  # the `agent` package of another tree (e.g. `git archive` of a commit)
    sys.path.insert(0, os.environ["AGENT_ROOT"])

from agent.config import Config, load_config
from agent.intake.claim import Intake
from agent.intake.settle import CLAIM_BATCH
from agent.intake.watch import Candidate, DropScanner
from agent.logs import setup_logging
from agent.pipeline.upload import Uploader
from agent.store.archive import Filer
from agent.store.journal import FileRecord, FileState, Journal
from agent.transport.sftp import SftpSession
from bench.run import small_csv


def burst_setup(base: Path, files: int, sftp: str) -> tuple[Config, Journal, Filer, Intake, list[Candidate]]:
    """`files` small users CSVs in `base`/drop, and intake as the daemon builds it to take them
    (settle 0, no duplicate window; `sftp`: the [sftp] table's lines; `base`/key exists, empty)."""
    shutil.rmtree(base, ignore_errors=True)
    drop = base / "drop"
    drop.mkdir(parents=True)
    (base / "key").write_text("")
    config_path = base / "agent.toml"
    config_path.write_text(
        f"[sftp]\n{sftp}\n"
        f'\n[paths]\ndrop = "{drop}"\nstate_dir = "{base / "state"}"\narchive = "{base / "archive"}"\n'
        f'failed = "{base / "failed"}"\n\n[watch]\nsettle_seconds = 0\n'
        "\n[imports]\nduplicate_window_days = 0\n")
    config = load_config(config_path)
    config.paths.state_dir.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        (drop / f"users_s{index:06d}.csv").write_text(small_csv(index))
    journal = Journal(config.journal_path)
    filer = Filer(config, journal)
    scanner = DropScanner(drop, [])
    return config, journal, filer, Intake(config, journal, filer, scanner, lambda: None), list(scanner.scan())


def one_run(base: Path, files: int, profile: cProfile.Profile | None) -> tuple[float, float]:
    key = base / "key"
    config, journal, filer, intake, candidates = burst_setup(
        base, files, f'host = "127.0.0.1"\nusername = "u"\nprivate_key = "{key}"\nknown_hosts = "{key}"')
    start = time.thread_time()
    phase = os.environ.get("PROFILE_PHASE", "intake")  # --profile: which phase
    if profile is not None and phase == "intake":
        profile.enable()
    for first in range(0, len(candidates), CLAIM_BATCH):
        intake.claim_many(candidates[first:first + CLAIM_BATCH])
    if profile is not None:
        profile.disable()
    intake_cpu = time.thread_time() - start
    uploader = Uploader(config, journal, filer, SftpSession(config.sftp))  # never connects here
    queued = journal.query("WHERE state = ?", (FileState.QUEUED.value,))
    start = time.thread_time()
    if profile is not None and phase == "finish":
        profile.enable()
    for first in range(0, len(queued), CLAIM_BATCH):
        batch = queued[first:first + CLAIM_BATCH]
        results: dict[int, FileRecord] = {}
        uploader._finish([(record, f"published as /x/{record.remote_name}") for record in batch], results)
    if profile is not None:
        profile.disable()
    finish_cpu = time.thread_time() - start
    assert len(journal.query("WHERE state = ?", (FileState.ARCHIVED.value,))) == files
    journal.close()
    return intake_cpu / files, finish_cpu / files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--phase", choices=("intake", "finish", "both"), default="both",
                        help="run only this phase's loop under --runs (for an outside sampler: py-spy)")
    args = parser.parse_args()
    log_to_nowhere()
    with tempfile.TemporaryDirectory(prefix="intake-cpu-") as tmp:
        if args.profile:
            profile = cProfile.Profile()
            one_run(Path(tmp) / "run", args.files, profile)
            print_profile(profile)
            return 0
        costs = [one_run(Path(tmp) / "run", args.files, None) for _ in range(args.runs)]
    print_costs(costs, ("intake", "finish"))
    return 0


def log_to_nowhere() -> None:
    """The agent's logging as configured (BENCH_LOG_LEVEL, default INFO; WARNING shows what the INFO
    lines cost): each line formatted and written, to /dev/null."""
    from agent.config import LogConfig

    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - the log lines are formatted and written, not kept
    setup_logging(LogConfig(level=os.environ.get("BENCH_LOG_LEVEL", "INFO")))
    sys.stderr = sys.__stderr__


def print_profile(profile: cProfile.Profile) -> None:
    stats = pstats.Stats(profile).sort_stats(os.environ.get("SORT", "tottime"))
    stats.print_stats(int(os.environ.get("TOP", "40")))


def print_costs(costs: list[tuple[float, float]], what: tuple[str, str]) -> None:
    """Each measured part's CPU per file of every run, and the least of them."""
    for index, part in enumerate(what):
        print(f"{part} CPU per file (us): " + " ".join(f"{cost[index] * 1e6:.0f}" for cost in costs)
              + f"; min {min(cost[index] for cost in costs) * 1e6:.0f}")


if __name__ == "__main__":
    raise SystemExit(main())
