"""Benchmarks: the agent against OpenSSH `sftp -b` and `rclone`, on a real sshd on loopback.

Run (as root, like the tests, so sshd can chroot):  python bench/run.py [--quick] [--scenario NAME ...]

Every scenario runs the agent and each reference in the same run, alternating their order round by
round, and prints medians and the ratio agent / reference (lower is better for the agent). It is not a
test: nothing here asserts a timing; the targets are printed beside the measured numbers.

Scenarios: burst (many small files), large (one big file), latency (rename into a running daemon ->
final remote name), backlog (many files waiting at start-up: time per file and peak RSS), idle
(daemon CPU and RSS when nothing happens), slow (burst and large through a 20 ms-each-way proxy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.helpers.sshd import SshdServer  # noqa: E402
from tests.helpers.tcp_proxy import TcpProxy  # noqa: E402

RCLONE_MISSING = "rclone not found: install it with `apt-get install -y rclone` (Debian package)"
SFTP_MISSING = "OpenSSH sftp not found: install it with `apt-get install -y openssh-client`"
SCENARIOS = ("burst", "large", "latency", "backlog", "idle", "slow")
HEADER = "accountId,id,email,firstName,lastName,locale,customFields.note\n"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sizes:
    rounds: int
    burst_files: int
    large_mb: float
    latency_files: int
    backlog_counts: tuple[int, ...]
    idle_seconds: float
    slow_burst_files: int
    slow_large_mb: float


FULL = Sizes(rounds=3, burst_files=1000, large_mb=100, latency_files=200, backlog_counts=(1000, 10000),
             idle_seconds=60, slow_burst_files=100, slow_large_mb=20)
QUICK = Sizes(rounds=2, burst_files=200, large_mb=20, latency_files=40, backlog_counts=(200, 1000),
              idle_seconds=10, slow_burst_files=40, slow_large_mb=5)


@dataclass
class Result:
    scenario: str
    rows: dict[str, list[float]] = field(default_factory=dict)  # tool -> seconds per round
    extra: dict[str, float | str] = field(default_factory=dict)

    def add(self, tool: str, seconds: float) -> None:
        self.rows.setdefault(tool, []).append(seconds)


# ----------------------------------------------------------------------------- inputs


def small_csv(index: int, target_bytes: int = 1024) -> str:
    lines = [HEADER]
    size = len(HEADER)
    row = 0
    while size < target_bytes:
        row += 1
        user = f"u{index:06d}-{row:03d}"
        line = f"acct-{index:06d},{user},{user}@example.com,Ada,Lovelace,en_US,bench row {row}\n"
        lines.append(line)
        size += len(line)
    return "".join(lines)


def make_small_files(folder: Path, count: int, tag: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"users_{tag}{i:06d}.csv").write_text(small_csv(i))
    backdate(folder)
    return folder


def make_large_file(folder: Path, megabytes: float) -> Path:
    """A valid users CSV of about `megabytes` MB with rows of ~400 bytes (well under 500,000 records)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "users_large.csv"
    target = int(megabytes * 1_000_000)
    note = "x" * 300
    with path.open("w", encoding="utf-8") as handle:
        handle.write(HEADER)
        written = len(HEADER)
        row = 0
        while written < target:
            block = []
            for _ in range(1000):
                row += 1
                block.append(f"acct-{row // 3:08d},u{row:09d},u{row:09d}@example.com,Ada,Lovelace,en_US,"
                             f"{note}\n")
            text = "".join(block)
            handle.write(text)
            written += len(text)
    backdate(folder)
    return path


def backdate(folder: Path) -> None:
    """Inputs are files that have been waiting a while (as for a cron job): older than any settle time."""
    past = time.time() - 3600
    for entry in os.scandir(folder):
        os.utime(entry.path, (past, past))


def stage(sources: Path, drop: Path) -> int:
    """Copy every input into drop/ (untimed); the masters stay for the next round. Not hard links: the
    agent refuses a file with another name that could change it while it is sent."""
    drop.mkdir(parents=True, exist_ok=True)
    count = 0
    for entry in os.scandir(sources):
        shutil.copy2(entry.path, drop / entry.name)
        count += 1
    return count


@contextlib.contextmanager
def server_storage(server: SshdServer, kind: str) -> Iterator[None]:
    """Give sshd's upload folder a filesystem of its own (kind "tmpfs"), as a remote server has.

    On one disk, every fsync the agent makes (its journal is synchronous) makes the kernel commit
    the filesystem journal, and file creations by sshd wait for that commit: 64 creates took 57 ms
    instead of 20 ms beside an fsync loop. The references do not fsync, so a shared disk charges the
    agent for the server's file creations; in production the server is another machine.
    """
    if kind == "shared":
        yield
        return
    folder = server.local_remote_dir
    info = folder.stat()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=4g,mode=0755,uid={info.st_uid},gid={info.st_gid}",
                    "tmpfs", str(folder)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# ----------------------------------------------------------------------------- the tools


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    username: str
    key: Path
    known_hosts: Path
    remote_dir: str


class Bench:
    def __init__(self, server: SshdServer, work: Path, refs: Sequence[str], concurrency: int | None,
                 agent_root: Path = REPO) -> None:
        self.server = server
        self.agent_root = agent_root  # the folder holding the `agent` package that runs
        self.work = work
        self.refs = list(refs)
        self.concurrency = concurrency
        self.direct = Endpoint(server.host, server.port, server.username, server.user_key_path,
                               server.known_hosts_path, server.remote_dir)
        self._runs = 0
        rclone_conf = work / "rclone.conf"
        rclone_conf.write_text("")
        self.rclone_env = {**os.environ, "RCLONE_CONFIG": str(rclone_conf)}

    # ---- remote side

    def remote_files(self) -> list[str]:
        return [name for name in os.listdir(self.server.local_remote_dir) if not name.startswith(".")]

    def clear_remote(self) -> None:
        for entry in os.scandir(self.server.local_remote_dir):
            os.unlink(entry.path)

    # ---- agent

    def agent_dirs(self) -> Path:
        self._runs += 1
        base = self.work / f"agent-{self._runs:03d}"
        base.mkdir()
        return base

    def agent_config(self, base: Path, ep: Endpoint, settle: float = 2.0) -> Path:
        config = base / "agent.toml"
        upload = f"\n[upload]\nconcurrency = {self.concurrency}\n" if self.concurrency else ""
        config.write_text(
            f'[sftp]\nhost = "{ep.host}"\nport = {ep.port}\nusername = "{ep.username}"\n'
            f'private_key = "{ep.key}"\nknown_hosts = "{ep.known_hosts}"\nremote_dir = "{ep.remote_dir}"\n'
            f'\n[paths]\ndrop = "{base / "drop"}"\nstate_dir = "{base / "state"}"\n'
            f'archive = "{base / "archive"}"\nfailed = "{base / "failed"}"\n'
            f"\n[watch]\nsettle_seconds = {settle}\nrescan_seconds = 3600\n{upload}"
        )
        return config

    def agent_once(self, sources: Path, ep: Endpoint) -> tuple[float, float]:
        """`run --once` over a drop/ holding `sources`; (seconds, peak RSS in MiB)."""
        base = self.agent_dirs()
        config = self.agent_config(base, ep)
        expected = stage(sources, base / "drop")
        log = (base / "agent.log").open("wb")
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--once", "--config", str(config)],
                                cwd=self.agent_root, stdout=log, stderr=log)
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.close()
        if proc.returncode != 0:
            raise RuntimeError(f"agent exited {proc.returncode}; log {base / 'agent.log'}:\n"
                               + (base / "agent.log").read_text()[-3000:])
        got = len(self.remote_files())
        archived = sum(len(files) for _root, _dirs, files in os.walk(base / "archive"))
        if got != expected or archived != expected:
            raise RuntimeError(f"agent: {got} remote / {archived} archived files, expected {expected}")
        shutil.rmtree(base)
        return seconds, usage.ru_maxrss / 1024

    # ---- references

    def sftp_put(self, sources: Path, ep: Endpoint) -> float:
        expected = len(os.listdir(sources))
        batch = self.work / "sftp.batch"
        batch.write_text(f"lcd {sources}\ncd {ep.remote_dir}\nput *\n")
        cmd = ["sftp", "-q", "-b", str(batch), "-F", "/dev/null", "-i", str(ep.key), "-P", str(ep.port),
               "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
               "-o", f"UserKnownHostsFile={ep.known_hosts}", f"{ep.username}@{ep.host}"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=3600)
        seconds = time.perf_counter() - start
        if len(self.remote_files()) != expected:
            raise RuntimeError(f"sftp: {len(self.remote_files())} remote files, expected {expected}")
        return seconds

    def rclone(self, verb: str, sources: Path, ep: Endpoint) -> float:
        """`rclone move` (burst: deletes the local copies, like the agent's archiving) or `copy`."""
        staged = self.work / "rclone-src"
        shutil.rmtree(staged, ignore_errors=True)
        expected = stage(sources, staged)
        remote = (f":sftp,host={ep.host},port={ep.port},user={ep.username},key_file={ep.key},"
                  f"known_hosts_file={ep.known_hosts},shell_type=none,disable_hashcheck=true:{ep.remote_dir}")
        cmd = ["rclone", verb, str(staged), remote, "-q"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=self.rclone_env, timeout=3600)
        seconds = time.perf_counter() - start
        if len(self.remote_files()) != expected:
            raise RuntimeError(f"rclone: {len(self.remote_files())} remote files, expected {expected}")
        shutil.rmtree(staged)
        return seconds

    # ---- alternating rounds

    def compare(self, result: Result, rounds: int, tools: dict[str, Callable[[], float]]) -> None:
        names = list(tools)
        for round_no in range(rounds):
            order = names[round_no % len(names):] + names[:round_no % len(names)]
            for name in order:
                self.clear_remote()
                seconds = tools[name]()
                result.add(name, seconds)
                print(f"  round {round_no + 1}: {name:<12} {seconds:8.3f} s", flush=True)
        self.clear_remote()


# ----------------------------------------------------------------------------- scenarios


def transfer_tools(bench: Bench, sources: Path, ep: Endpoint, rclone_verb: str,
                   rss: list[float]) -> dict[str, Callable[[], float]]:
    def agent() -> float:
        seconds, peak = bench.agent_once(sources, ep)
        rss.append(peak)
        return seconds

    tools: dict[str, Callable[[], float]] = {"agent": agent}
    if "sftp" in bench.refs:
        tools["sftp -b"] = lambda: bench.sftp_put(sources, ep)
    if "rclone" in bench.refs:
        tools[f"rclone {rclone_verb}"] = lambda: bench.rclone(rclone_verb, sources, ep)
    return tools


def run_burst(bench: Bench, sizes: Sizes, ep: Endpoint | None = None, name: str = "burst",
              files: int | None = None) -> Result:
    count = files if files is not None else sizes.burst_files
    result = Result(name, extra={"files": count})
    sources = make_small_files(bench.work / f"in-{name.replace(' ', '-')}", count, "b")
    rss: list[float] = []
    bench.compare(result, sizes.rounds, transfer_tools(bench, sources, ep or bench.direct, "move", rss))
    result.extra["agent peak RSS MiB"] = round(max(rss), 1)
    return result


def run_large(bench: Bench, sizes: Sizes, ep: Endpoint | None = None, name: str = "large",
              megabytes: float | None = None) -> Result:
    mb = megabytes if megabytes is not None else sizes.large_mb
    result = Result(name, extra={"MB": mb})
    sources = bench.work / f"in-{name.replace(' ', '-')}"
    make_large_file(sources, mb)
    rss: list[float] = []
    bench.compare(result, sizes.rounds, transfer_tools(bench, sources, ep or bench.direct, "copy", rss))
    result.extra["agent peak RSS MiB"] = round(max(rss), 1)
    return result


class Daemon:
    """`saasquatch-agent run` in the background, with settle_seconds = 0."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.base = bench.agent_dirs()
        self.config = bench.agent_config(self.base, bench.direct, settle=0.0)
        self.drop = self.base / "drop"
        self.drop.mkdir()
        self.log = (self.base / "agent.log").open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(self.config)],
                                     cwd=bench.agent_root, stdout=self.log, stderr=self.log)

    def drop_and_wait(self, name: str, text: str, timeout: float = 30.0) -> float:
        """Write under a hidden name, rename into drop/, return seconds until the remote final name."""
        before = len(self.bench.remote_files())
        hidden = self.drop / f".{name}.tmp"
        hidden.write_text(text)
        start = time.perf_counter()
        os.rename(hidden, self.drop / name)
        deadline = start + timeout
        while len(self.bench.remote_files()) == before:
            if time.perf_counter() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{name} did not appear remotely; log {self.base / 'agent.log'}")
            time.sleep(0.002)
        return time.perf_counter() - start

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()
        shutil.rmtree(self.base, ignore_errors=True)
        self.bench.clear_remote()


def run_latency(bench: Bench, sizes: Sizes) -> Result:
    result = Result("latency", extra={"files": sizes.latency_files})
    daemon = Daemon(bench)
    try:
        daemon.drop_and_wait("users_warmup.csv", small_csv(0), timeout=60)  # connects once
        for i in range(sizes.latency_files):
            result.add("agent", daemon.drop_and_wait(f"users_lat{i:05d}.csv", small_csv(i + 1)))
            time.sleep(0.05)  # one at a time: let the previous file be archived
    finally:
        daemon.close()
    samples = sorted(result.rows["agent"])
    result.extra["p50 ms"] = round(1000 * statistics.median(samples), 1)
    result.extra["p95 ms"] = round(1000 * samples[max(0, int(len(samples) * 0.95) - 1)], 1)
    result.extra["max ms"] = round(1000 * samples[-1], 1)
    return result


def run_backlog(bench: Bench, sizes: Sizes) -> Result:
    result = Result("backlog")
    for count in sizes.backlog_counts:
        sources = make_small_files(bench.work / f"in-backlog-{count}", count, "k")
        bench.clear_remote()
        seconds, peak = bench.agent_once(sources, bench.direct)
        bench.clear_remote()
        shutil.rmtree(sources)
        result.add(f"agent {count}", seconds)
        result.extra[f"ms/file at {count}"] = round(1000 * seconds / count, 2)
        result.extra[f"peak RSS MiB at {count}"] = round(peak, 1)
        print(f"  {count} files: {seconds:.2f} s, {1000 * seconds / count:.2f} ms/file,"
              f" peak RSS {peak:.1f} MiB", flush=True)
    low, high = sizes.backlog_counts[0], sizes.backlog_counts[-1]
    per_low, per_high = (float(result.extra[f"ms/file at {n}"]) for n in (low, high))
    result.extra["time/file ratio"] = round(per_high / per_low, 2)
    return result


def run_idle(bench: Bench, sizes: Sizes) -> Result:
    result = Result("idle", extra={"seconds": sizes.idle_seconds})
    daemon = Daemon(bench)
    try:
        daemon.drop_and_wait("users_warmup.csv", small_csv(0), timeout=60)
        time.sleep(1.0)  # let the warm-up file be archived
        cpu_before = daemon.cpu_seconds()
        time.sleep(sizes.idle_seconds)
        cpu = daemon.cpu_seconds() - cpu_before
        result.extra["CPU s per minute"] = round(cpu * 60 / sizes.idle_seconds, 3)
        result.extra["RSS MiB"] = round(daemon.rss_mib(), 1)
    finally:
        daemon.close()
    return result


def run_slow(bench: Bench, sizes: Sizes, delay_ms: float = 20.0) -> list[Result]:
    server = bench.server
    with TcpProxy(server.host, server.port, delay_ms=delay_ms) as proxy:
        known = server.write_known_hosts(bench.work / "known_hosts_proxy", port=proxy.port)
        ep = replace(bench.direct, port=proxy.port, known_hosts=known)
        return [run_burst(bench, sizes, ep, "slow burst", sizes.slow_burst_files),
                run_large(bench, sizes, ep, "slow large", sizes.slow_large_mb)]


# ----------------------------------------------------------------------------- report

TARGETS = {
    "burst": [("rclone move", 1.0), ("sftp -b", 1.5)],
    "large": [("sftp -b", 1.1)],
    "slow burst": [("sftp -b", None)],
    "slow large": [("sftp -b", None)],
}


def report(results: list[Result]) -> None:
    print("\n=== results (median seconds; ratio = agent / reference, lower is better) ===")
    for res in results:
        extra = ", ".join(f"{k} {v}" for k, v in res.extra.items())
        print(f"\n[{res.scenario}] {extra}")
        if res.scenario in ("latency", "backlog", "idle"):
            continue
        agent = statistics.median(res.rows["agent"])
        print(f"  {'agent':<14} {agent:8.3f} s")
        for tool, samples in res.rows.items():
            if tool == "agent":
                continue
            median = statistics.median(samples)
            target = dict(TARGETS.get(res.scenario, [])).get(tool)
            goal = f"  (target <= {target})" if target else ""
            print(f"  {tool:<14} {median:8.3f} s   ratio {agent / median:5.2f}{goal}")
    print("\nother targets: latency p95 < 250 ms; backlog time/file ratio ~1 and flat RSS;"
          " idle < 0.5 CPU s/min and < 60 MiB RSS; < 100 MiB RSS while uploading the large file")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the agent against sftp -b and rclone.")
    parser.add_argument("--quick", action="store_true", help="smaller inputs and 2 rounds (about 2 min)")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS,
                        help="run only this scenario (repeatable); default all")
    parser.add_argument("--refs", default="sftp,rclone", help="references to run (comma list)")
    parser.add_argument("--rounds", type=int, help="rounds per scenario")
    parser.add_argument("--burst-files", type=int)
    parser.add_argument("--large-mb", type=float)
    parser.add_argument("--latency-files", type=int)
    parser.add_argument("--idle-seconds", type=float)
    parser.add_argument("--backlog", type=str, help="comma list of backlog sizes, e.g. 1000,10000")
    parser.add_argument("--concurrency", type=int,
                        help="set upload.concurrency (upload threads) in the agent's config; default: the"
                             " agent's own default")
    parser.add_argument("--agent-root", type=Path, default=REPO,
                        help="run the `agent` package found in this folder (e.g. a copy of an older tree)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--server-disk", choices=("tmpfs", "shared"), default="tmpfs",
                        help="where sshd stores uploads: its own tmpfs (default; a real server's disk is"
                             " not the agent's), or the agent's own disk (see bench/RESULTS.md)")
    args = parser.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    overrides = {"rounds": args.rounds, "burst_files": args.burst_files, "large_mb": args.large_mb,
                 "latency_files": args.latency_files, "idle_seconds": args.idle_seconds,
                 "backlog_counts": tuple(int(n) for n in args.backlog.split(",")) if args.backlog else None}
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    refs = [ref.strip() for ref in args.refs.split(",") if ref.strip()]
    if "sftp" in refs and not shutil.which("sftp"):
        print(SFTP_MISSING, file=sys.stderr)
        return 2
    if "rclone" in refs and not shutil.which("rclone"):
        print(f"{RCLONE_MISSING}; running without the rclone reference", file=sys.stderr)
        refs.remove("rclone")
    scenarios = args.scenario or list(SCENARIOS)
    print(f"bench: {', '.join(scenarios)}; references {', '.join(refs) or 'none'}; {sizes}", flush=True)

    # An installed agent is byte-compiled (pip does it); a checkout run with PYTHONDONTWRITEBYTECODE
    # (set on some machines) would compile every module at each start: about 0.08 s per run here.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(args.agent_root.resolve() / "agent")],
                   check=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})
    results: list[Result] = []
    with (tempfile.TemporaryDirectory(prefix="saasquatch-bench-") as tmp,
          SshdServer(log_level="ERROR") as server, server_storage(server, args.server_disk)):
        bench = Bench(server, Path(tmp), refs, args.concurrency, args.agent_root.resolve())
        runners: dict[str, Callable[[], list[Result]]] = {
            "burst": lambda: [run_burst(bench, sizes)],
            "large": lambda: [run_large(bench, sizes)],
            "latency": lambda: [run_latency(bench, sizes)],
            "backlog": lambda: [run_backlog(bench, sizes)],
            "idle": lambda: [run_idle(bench, sizes)],
            "slow": lambda: run_slow(bench, sizes),
        }
        for name in scenarios:
            print(f"\n--- {name} ---", flush=True)
            results.extend(runners[name]())
    report(results)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
