"""Benchmarks: the agent against OpenSSH `sftp -b` and `rclone`, on a real sshd on loopback.

Run (as root, like the tests, so sshd can chroot):  python bench/run.py [--quick] [--scenario NAME ...]

Every scenario runs the agent and each reference in the same run, alternating their order round by
round, and prints medians and the ratio agent / reference (lower is better for the agent). It is not a
test: nothing here asserts a timing; the targets are printed beside the measured numbers.

`run --once` scenarios (start-up included): burst (many small files), large (one big file), backlog
(many files waiting at start-up: time per file and peak RSS), slow (burst and large through a 20 ms
each way proxy). Daemon scenarios: latency (rename into a running daemon -> final remote name), idle
(daemon CPU and RSS when nothing happens).

Service scenarios (`svc-*`, issue 17): the daemon as it runs in production, already started, connected
and idle; files are moved into drop/ and timed until archived, on loopback and through the link
emulator in bench/link.py (delay each way + bandwidth cap). Each row gives wall seconds, the CPU
seconds of the agent or the reference client, and the CPU seconds sshd spent serving it:
svc-loopback, svc-lan (20 ms each way, 100 Mbit/s), svc-far-cut (80 ms, 20 Mbit/s, the connection cut
at half the file), svc-fat (75 ms each way = 150 ms round trip, 500 Mbit/s), svc-backlog (a daemon
started with many files waiting). `startup` times `status` and `validate` as whole processes against
`python -c pass`.

Switches for finding where the daemon's time goes (each slows it; not for the timed comparison):
BENCH_THREADS=1 (CPU seconds and context switches of each daemon thread per delivery),
BENCH_PYSPY=DIR (+ BENCH_PYSPY_ARGS=--gil), BENCH_STRACE=PREFIX (+ BENCH_STRACE_ARGS, e.g.
`--seccomp-bpf -e trace=fsync`), BENCH_PERF=PREFIX (`perf stat` of the daemon; BENCH_PERF_EVENTS, e.g.
`context-switches,syscalls:sys_enter_futex`), BENCH_KEEP_LOG=PATH, BENCH_EXTRA_CONFIG (TOML appended).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.link import Link  # noqa: E402
from tests.helpers.sshd import SshdServer  # noqa: E402
from tests.helpers.tcp_proxy import TcpProxy  # noqa: E402

RCLONE_MISSING = "rclone not found: install it with `apt-get install -y rclone` (Debian package)"
SFTP_MISSING = "OpenSSH sftp not found: install it with `apt-get install -y openssh-client`"
SCENARIOS = ("burst", "large", "latency", "backlog", "idle", "slow", "svc-loopback", "svc-lan", "svc-far-cut",
             "svc-fat", "svc-backlog", "startup")
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
    link_burst_files: tuple[int, ...]  # svc-lan bursts
    link_large_mb: float  # svc-lan, svc-far-cut, svc-fat large file
    single_files: int  # single-file rounds in the svc-* scenarios
    svc_backlog: int
    svc_cases: tuple[str, ...] = ("single", "burst", "large")  # svc-loopback's cases


FULL = Sizes(rounds=3, burst_files=1000, large_mb=100, latency_files=200, backlog_counts=(1000, 10000),
             idle_seconds=60, slow_burst_files=100, slow_large_mb=20, link_burst_files=(100, 1000),
             link_large_mb=100, single_files=5, svc_backlog=10000)
QUICK = Sizes(rounds=2, burst_files=200, large_mb=20, latency_files=40, backlog_counts=(200, 1000),
              idle_seconds=10, slow_burst_files=40, slow_large_mb=5, link_burst_files=(20, 100),
              link_large_mb=10, single_files=3, svc_backlog=1000)


@dataclass
class Result:
    scenario: str
    rows: dict[str, list[float]] = field(default_factory=dict)  # tool -> seconds per round
    extra: dict[str, float | str] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)  # tool -> its own CPU seconds per round
    server_cpu: dict[str, list[float]] = field(default_factory=dict)  # tool -> sshd's CPU seconds

    def add(self, tool: str, seconds: float, cpu: float | None = None,
            server_cpu: float | None = None) -> None:
        self.rows.setdefault(tool, []).append(seconds)
        if cpu is not None:
            self.cpu.setdefault(tool, []).append(cpu)
        if server_cpu is not None:
            self.server_cpu.setdefault(tool, []).append(server_cpu)


@dataclass(frozen=True)
class Measure:
    """One timed run: wall seconds, CPU seconds of the tool itself, CPU seconds of sshd serving it."""

    seconds: float
    cpu: float | None = None
    server_cpu: float | None = None


def proc_cpu(pid: int) -> float:
    """CPU seconds of a process and its reaped children (utime + stime + cutime + cstime); 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    for _ in range(100_000):  # bounded: a process tree
        if not todo:
            break
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def own_cpu(pid: int) -> float | None:
    """CPU seconds of one process itself (utime + stime); None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class ServerCpu:
    """CPU seconds sshd spends while this is running: every process under the listener is sampled
    every 20 ms (its own CPU, the last value seen counts). Reaped CPU cannot be used: OpenSSH's
    session processes are not all reaped by the listener, so their CPU never reaches its cutime."""

    def __init__(self, listener: int | None) -> None:
        self.listener = listener
        self.seen: dict[int, float] = {}
        self.start: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sshd-cpu")

    def _sample(self) -> None:
        if self.listener is None:
            return
        for pid in descendants(self.listener):
            cpu = own_cpu(pid)
            if cpu is not None:
                self.seen[pid] = cpu

    def _run(self) -> None:
        for _ in range(10_000_000):  # bounded; stopped by `stop`
            if self._stop.wait(0.02):
                return
            self._sample()

    def __enter__(self) -> ServerCpu:
        self._sample()
        self.start = dict(self.seen)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()

    @property
    def seconds(self) -> float | None:
        if self.listener is None:
            return None
        return sum(cpu - self.start.get(pid, 0.0) for pid, cpu in self.seen.items())


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
        self.compare_root: Path | None = None  # --compare-root: a second tree, "agent B" (svc-* cases)
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

    def agent_config(self, base: Path, ep: Endpoint, settle: float = 2.0, extra: str = "") -> Path:
        config = base / "agent.toml"
        upload = f"\n[upload]\nconcurrency = {self.concurrency}\n" if self.concurrency else ""
        config.write_text(
            f'[sftp]\nhost = "{ep.host}"\nport = {ep.port}\nusername = "{ep.username}"\n'
            f'private_key = "{ep.key}"\nknown_hosts = "{ep.known_hosts}"\nremote_dir = "{ep.remote_dir}"\n'
            f'\n[paths]\ndrop = "{base / "drop"}"\nstate_dir = "{base / "state"}"\n'
            f'archive = "{base / "archive"}"\nfailed = "{base / "failed"}"\n'
            f"\n[watch]\nsettle_seconds = {settle}\nrescan_seconds = 3600\n{upload}{extra}"
        )
        return config

    def agent_once(self, sources: Path, ep: Endpoint) -> tuple[float, float]:
        """`run --once` over a drop/ holding `sources`; (seconds, peak RSS in MiB)."""
        measure, peak = self.agent_once_measure(sources, ep)
        return measure.seconds, peak

    def agent_once_measure(self, sources: Path, ep: Endpoint) -> tuple[Measure, float]:
        """`run --once` over a drop/ holding `sources`; its Measure and peak RSS in MiB."""
        base = self.agent_dirs()
        config = self.agent_config(base, ep)
        expected = stage(sources, base / "drop")
        log = (base / "agent.log").open("wb")
        with ServerCpu(self.server.sshd_pid) as server:
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
        return Measure(seconds, usage.ru_utime + usage.ru_stime, server.seconds), usage.ru_maxrss / 1024

    # ---- references

    def sftp_put(self, sources: Path, ep: Endpoint) -> float:
        return self.sftp_measure(sources, ep).seconds

    def sftp_measure(self, sources: Path, ep: Endpoint) -> Measure:
        """OpenSSH `sftp -b` putting every file of `sources` (one connection, files one after another)."""
        expected = len(os.listdir(sources))
        batch = self.work / "sftp.batch"
        batch.write_text(f"lcd {sources}\ncd {ep.remote_dir}\nput *\n")
        cmd = ["sftp", "-q", "-b", str(batch), "-F", "/dev/null", "-i", str(ep.key), "-P", str(ep.port),
               "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
               "-o", f"UserKnownHostsFile={ep.known_hosts}", f"{ep.username}@{ep.host}"]
        measure = self.client_run(cmd, os.environ)
        if len(self.remote_files()) != expected:
            raise RuntimeError(f"sftp: {len(self.remote_files())} remote files, expected {expected}")
        return measure

    def rclone(self, verb: str, sources: Path, ep: Endpoint) -> float:
        return self.rclone_measure(verb, sources, ep).seconds

    def rclone_measure(self, verb: str, sources: Path, ep: Endpoint) -> Measure:
        """`rclone move` (burst: deletes the local copies, like the agent's archiving) or `copy`."""
        staged = self.work / "rclone-src"
        shutil.rmtree(staged, ignore_errors=True)
        expected = stage(sources, staged)
        remote = (f":sftp,host={ep.host},port={ep.port},user={ep.username},key_file={ep.key},"
                  f"known_hosts_file={ep.known_hosts},shell_type=none,disable_hashcheck=true:{ep.remote_dir}")
        measure = self.client_run(["rclone", verb, str(staged), remote, "-q"], self.rclone_env)
        if len(self.remote_files()) != expected:
            raise RuntimeError(f"rclone: {len(self.remote_files())} remote files, expected {expected}")
        shutil.rmtree(staged)
        return measure

    def client_run(self, cmd: list[str], env: dict[str, str] | os._Environ[str]) -> Measure:
        """Run a reference client; its wall and CPU seconds, and sshd's CPU for its sessions (read
        once those sessions have ended, so the listener has reaped them)."""
        with ServerCpu(self.server.sshd_pid) as server:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
            _pid, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{cmd[0]} exited {os.waitstatus_to_exitcode(status)}")
        return Measure(seconds, usage.ru_utime + usage.ru_stime, server.seconds)

    # ---- alternating rounds

    def compare(self, result: Result, rounds: int, tools: dict[str, Callable[[], Measure]]) -> None:
        names = list(tools)
        for round_no in range(rounds):
            order = names[round_no % len(names):] + names[:round_no % len(names)]
            for name in order:
                self.clear_remote()
                got = tools[name]()
                result.add(name, got.seconds, got.cpu, got.server_cpu)
                cpu = f"  cpu {got.cpu:7.3f} s" if got.cpu is not None else ""
                server = f"  sshd cpu {got.server_cpu:7.3f} s" if got.server_cpu is not None else ""
                print(f"  round {round_no + 1}: {name:<14} {got.seconds:8.3f} s{cpu}{server}", flush=True)
        self.clear_remote()


# ----------------------------------------------------------------------------- scenarios


def transfer_tools(bench: Bench, sources: Path, ep: Endpoint, rclone_verb: str,
                   rss: list[float]) -> dict[str, Callable[[], Measure]]:
    def agent() -> Measure:
        measure, peak = bench.agent_once_measure(sources, ep)
        rss.append(peak)
        return measure

    tools: dict[str, Callable[[], Measure]] = {"agent": agent}
    tools.update(reference_tools(bench, sources, ep, rclone_verb))
    return tools


def reference_tools(bench: Bench, sources: Path, ep: Endpoint, rclone_verb: str = "copy",
                    sftp_name: str = "sftp -b") -> dict[str, Callable[[], Measure]]:
    tools: dict[str, Callable[[], Measure]] = {}
    if "sftp" in bench.refs:
        tools[sftp_name] = lambda: bench.sftp_measure(sources, ep)
    if "rclone" in bench.refs:
        tools[f"rclone {rclone_verb}"] = lambda: bench.rclone_measure(rclone_verb, sources, ep)
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
        """The daemon's CPU seconds, with its reaped children: the worker processes that check a
        large file while it is sent (agent/intake/check_process.py) are the agent's work too."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime

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


# ----------------------------------------------------------------------------- the service as it runs

SERVICE_EXTRA = "\n[imports]\nduplicate_window_days = 0\n"  # the same inputs go again every round
SERVICE_EXTRA += os.environ.get("BENCH_EXTRA_CONFIG", "").replace("\\n", "\n")  # e.g. "[log]\nlevel = ..."
LINKS = {  # name: (one-way delay ms, Mbit/s)
    "lan": (20.0, 100.0),
    "far": (80.0, 20.0),
    "fat": (75.0, 500.0),
}


def count_files(folder: Path) -> int:
    return sum(len(files) for _root, _dirs, files in os.walk(folder))


class Service:
    """`saasquatch-agent run` as in production (settle_seconds = 0, so a file moved in is taken at
    once): started, then `warm_up` sends a first file so its connection is open, as a service that
    has been running is. `deliver` moves files into drop/ (renames from a staging folder on the same
    filesystem, as `mv` does) and times them until every one is archived."""

    def __init__(self, bench: Bench, ep: Endpoint, backlog: Path | None = None,
                 agent_root: Path | None = None) -> None:
        self.bench = bench
        self.base = bench.agent_dirs()
        self.config = bench.agent_config(self.base, ep, settle=0.0, extra=SERVICE_EXTRA)
        self.drop = self.base / "drop"
        self.archive = self.base / "archive"
        self.staging = self.base / "staging"
        self._journal: sqlite3.Connection | None = None
        self.drop.mkdir()
        self.expected_backlog = stage(backlog, self.drop) if backlog is not None else 0
        self.log = (self.base / "agent.log").open("wb")
        self.backlog_server = ServerCpu(bench.server.sshd_pid).__enter__() if backlog is not None else None
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(self.config)],
                                     cwd=agent_root or bench.agent_root, stdout=self.log, stderr=self.log)

    def archived(self) -> int:
        """Files the daemon has archived: its journal's count (one indexed query; a row is `archived`
        only once its file is in archive/). Walking archive/ every 5 ms instead cost ~1.4 ms of CPU a
        look with 3,000 files there, taken from the two cores the agent and sshd share (round 5)."""
        try:
            if self._journal is None:
                self._journal = sqlite3.connect(f"file:{self.base / 'state' / 'journal.sqlite3'}?mode=ro",
                                                uri=True, timeout=5)
            row = self._journal.execute("SELECT COUNT(*) FROM files WHERE state = 'archived'").fetchone()
            return int(row[0])
        except sqlite3.Error:  # not created yet
            return count_files(self.archive)

    def wait_archived(self, expected: int, timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        interval = 0.005 if expected < 200 else 0.05
        for _ in range(int(timeout / interval) + 2):  # bounded
            if self.archived() >= expected:
                return
            if self.proc.poll() is not None or time.perf_counter() > deadline or any(
                    (self.base / "failed").glob("*.reason.txt")):
                break
            time.sleep(interval)
        log = self.base / "agent.log"
        raise RuntimeError(f"{count_files(self.archive)} of {expected} archived; log {log}:\n"
                           f"{log.read_text()[-3000:]}")

    def backlog_done(self, timeout: float = 3600) -> Measure:
        """The daemon was started with a backlog in drop/: start to the last file archived."""
        self.wait_archived(self.expected_backlog, timeout)
        seconds = time.perf_counter() - self.started
        assert self.backlog_server is not None
        self.backlog_server.__exit__()
        return Measure(seconds, proc_cpu(self.proc.pid), self.backlog_server.seconds)

    def warm_up(self) -> None:
        self.deliver_text("users_warmup.csv", small_csv(0))

    def deliver_text(self, name: str, text: str) -> None:
        staged = self.staging / "single"
        staged.mkdir(parents=True, exist_ok=True)
        (staged / name).write_text(text)
        self.deliver(staged, clear=False)

    def deliver(self, sources: Path, timeout: float = 3600, clear: bool = True,
                before_move: Callable[[], object] | None = None) -> Measure:
        staged = self.staging / "round"
        shutil.rmtree(staged, ignore_errors=True)
        count = stage(sources, staged)
        names = sorted(os.listdir(staged))
        expected = self.archived() + count
        cpu_before = proc_cpu(self.proc.pid)
        if before_move is not None:
            before_move()
        profiler = self.profile()
        threads_before = self.thread_cpu() if os.environ.get("BENCH_THREADS") else None
        switches_before = self.thread_switches() if threads_before is not None else {}
        with ServerCpu(self.bench.server.sshd_pid) as server:
            start = time.perf_counter()
            for name in names:
                os.rename(staged / name, self.drop / name)
            self.wait_archived(expected, timeout)
            seconds = time.perf_counter() - start
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=60)
        if threads_before is not None:
            after = self.thread_cpu()
            names = self.thread_names()
            names[-1] = "(system time of all)"
            spent = sorted(((after[tid] - threads_before.get(tid, 0.0), names.get(tid, str(tid)), tid)
                            for tid in after), reverse=True)
            switches = {tid: count - switches_before.get(tid, 0)
                        for tid, count in self.thread_switches().items()}
            print("    threads (CPU s, context switches): " + ", ".join(
                f"{name} {cpu:.2f} {switches.get(tid, '')}" for cpu, name, tid in spent if cpu >= 0.005),
                  flush=True)
        measure = Measure(seconds, proc_cpu(self.proc.pid) - cpu_before, server.seconds)
        if clear:
            got = len(self.bench.remote_files())
            if got != count:
                raise RuntimeError(f"agent: {got} remote files, expected {count}")
        return measure

    def thread_cpu(self) -> dict[int, float]:
        """CPU seconds (user + system) of each of the daemon's threads (BENCH_THREADS=1); under -1 the
        whole process's system seconds (so the line shows them)."""
        ticks = os.sysconf("SC_CLK_TCK")
        out = {}
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{self.proc.pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
                out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        out[-1] = int(fields[12]) / ticks
        return out

    def thread_switches(self) -> dict[int, int]:
        """Context switches (voluntary + involuntary) of each of the daemon's threads (BENCH_THREADS=1)."""
        out = {}
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            with contextlib.suppress(OSError):
                lines = Path(f"/proc/{self.proc.pid}/task/{tid}/status").read_text().splitlines()
                out[int(tid)] = sum(int(line.split()[1]) for line in lines if "ctxt_switches" in line)
        return out

    def thread_names(self) -> dict[int, str]:
        """Python thread names by native id (py-spy dump)."""
        path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        dump = subprocess.run(["py-spy", "dump", "--pid", str(self.proc.pid)], capture_output=True, text=True,
                              env={**os.environ, "PATH": path})
        names = {}
        for line in dump.stdout.splitlines():
            if line.startswith("Thread "):  # Thread 1234 (idle): "name"
                parts = line.split()
                with contextlib.suppress(ValueError):
                    names[int(parts[1], 0)] = line.split('"')[1] if '"' in line else parts[1]
        return names

    def profile(self) -> subprocess.Popen[bytes] | None:
        """With BENCH_PYSPY=DIR: py-spy samples the daemon during each delivery (raw collapsed stacks
        in DIR; for finding where the time goes, not for the timed rounds: sampling slows it)."""
        if os.environ.get("BENCH_STRACE"):  # syscall counts of the daemon during each delivery
            out = f"{os.environ['BENCH_STRACE']}-{time.time_ns()}"
            extra = os.environ.get("BENCH_STRACE_ARGS", "").split()  # e.g. --seccomp-bpf -e trace=fsync
            tracer = subprocess.Popen(["strace", "-c", "-f", *extra, "-o", out, "-p", str(self.proc.pid)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached
            return tracer
        if os.environ.get("BENCH_PERF"):  # context switches and CPU of the daemon during each delivery
            out = f"{os.environ['BENCH_PERF']}-{time.time_ns()}"
            events = os.environ.get("BENCH_PERF_EVENTS", "task-clock,context-switches,cpu-migrations")
            counter = subprocess.Popen(["perf", "stat", "-e", events, "-p", str(self.proc.pid), "-o", out],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached
            return counter
        folder = os.environ.get("BENCH_PYSPY")
        if not folder:
            return None
        Path(folder).mkdir(parents=True, exist_ok=True)
        out = Path(folder) / f"deliver-{self.proc.pid}-{time.time_ns()}.txt"
        extra = os.environ.get("BENCH_PYSPY_ARGS", "").split()  # e.g. --gil
        command = ["py-spy", "record", "--pid", str(self.proc.pid), "--format", "raw", "--rate", "500",
                   "--nonblocking", *extra, "-o", str(out)]
        path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        profiler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env={**os.environ, "PATH": path})
        time.sleep(1.0)  # attached
        return profiler

    def rss_mib(self, field: str = "VmRSS") -> float:
        """The daemon's resident memory now (VmHWM: the peak so far)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()
        if os.environ.get("BENCH_KEEP_LOG"):  # a copy of the daemon's log, for reading
            shutil.copy(self.base / "agent.log", os.environ["BENCH_KEEP_LOG"])
        shutil.rmtree(self.base, ignore_errors=True)
        self.bench.clear_remote()


@contextlib.contextmanager
def endpoint(bench: Bench, link: str | None) -> Iterator[tuple[Endpoint, Link | None]]:
    """The sshd directly (link None), or through the link emulator with that profile."""
    if link is None:
        yield bench.direct, None
        return
    delay, mbit = LINKS[link]
    with Link(bench.server.host, bench.server.port, delay_ms=delay, mbit=mbit) as emulator:
        known = bench.server.write_known_hosts(bench.work / f"known_hosts_{link}", port=emulator.port)
        yield replace(bench.direct, port=emulator.port, known_hosts=known), emulator


def service_cases(bench: Bench, label: str, ep: Endpoint, rounds: int,
                  cases: list[tuple[str, Path, str, int]]) -> list[Result]:
    """For each (name, inputs, sftp row name, rounds) case: the running service against the references."""
    results = []
    service = Service(bench, ep)
    # --compare-root: a second daemon running another tree, alternated with the first ("agent B")
    other = Service(bench, ep, agent_root=bench.compare_root) if bench.compare_root else None
    try:
        service.warm_up()
        if other is not None:
            other.warm_up()
        bench.clear_remote()
        for name, sources, sftp_name, case_rounds in cases:
            print(f"  [{label} {name}]", flush=True)
            result = Result(f"{label} {name}", extra={"files": len(os.listdir(sources))})
            tools: dict[str, Callable[[], Measure]] = {"agent": lambda s=sources: service.deliver(s)}
            if other is not None:
                tools["agent B"] = lambda s=sources: other.deliver(s)
            tools.update(reference_tools(bench, sources, ep, "copy", sftp_name))
            bench.compare(result, case_rounds or rounds, tools)
            result.extra["agent RSS MiB after"] = round(service.rss_mib(), 1)
            result.extra["agent peak RSS MiB so far"] = round(service.rss_mib("VmHWM"), 1)
            results.append(result)
    finally:
        service.close()
        if other is not None:
            other.close()
    return results


def single_input(bench: Bench) -> Path:
    folder = bench.work / "in-single"
    if not folder.exists():
        folder.mkdir()
        (folder / "users_single.csv").write_text(small_csv(7))
        backdate(folder)
    return folder


def large_input(bench: Bench, megabytes: float) -> Path:
    folder = bench.work / f"in-large-{megabytes:g}"
    if not folder.exists():
        make_large_file(folder, megabytes)
    return folder


def burst_input(bench: Bench, files: int) -> Path:
    folder = bench.work / f"in-burst-{files}"
    if not folder.exists():
        make_small_files(folder, files, "s")
    return folder


def run_svc_loopback(bench: Bench, sizes: Sizes) -> list[Result]:
    cases = {
        "single": lambda: ("single file", single_input(bench), "sftp -b", sizes.single_files),
        "burst": lambda: (f"burst {sizes.burst_files}", burst_input(bench, sizes.burst_files), "sftp -b", 0),
        "large": lambda: (f"large {sizes.large_mb:g} MB", large_input(bench, sizes.large_mb), "sftp put", 0),
    }
    return service_cases(bench, "svc-loopback", bench.direct, sizes.rounds,
                         [make() for name, make in cases.items() if name in sizes.svc_cases])


def run_svc_link(bench: Bench, sizes: Sizes, link: str) -> list[Result]:
    delay, mbit = LINKS[link]
    label = f"svc-{link} ({delay:g} ms each way, {mbit:g} Mbit/s)"
    with endpoint(bench, link) as (ep, _emulator):
        cases = [("single file", single_input(bench), "sftp -b", sizes.single_files)]
        if link == "lan":
            cases += [(f"burst {n}", burst_input(bench, n), "sftp -b", 0) for n in sizes.link_burst_files]
        large = large_input(bench, sizes.link_large_mb)
        cases.append((f"large {sizes.link_large_mb:g} MB", large, "sftp put", 0))
        return service_cases(bench, label, ep, sizes.rounds, cases)


def run_svc_far_cut(bench: Bench, sizes: Sizes) -> list[Result]:
    """80 ms / 20 Mbit/s, the large file: the agent's connection is cut when half of the file has gone
    towards the server (it reconnects after its retry delay and resumes), against an uncut `sftp put`."""
    delay, mbit = LINKS["far"]
    sources = large_input(bench, sizes.link_large_mb)
    size = sum(entry.stat().st_size for entry in os.scandir(sources))
    result = Result(f"svc-far-cut ({delay:g} ms each way, {mbit:g} Mbit/s) large {sizes.link_large_mb:g} MB"
                    " cut at 50%", extra={"MB": sizes.link_large_mb})
    with endpoint(bench, "far") as (ep, emulator):
        assert emulator is not None
        service = Service(bench, ep)
        try:
            service.warm_up()
            bench.clear_remote()
            cuts_before = [emulator.cuts]

            def cut() -> Measure:
                cuts_before[0] = emulator.cuts
                measure = service.deliver(sources, before_move=lambda: emulator.cut_after(size // 2))
                if emulator.cuts == cuts_before[0]:
                    raise RuntimeError("the connection was not cut")
                return measure

            tools: dict[str, Callable[[], Measure]] = {"agent": cut,
                                                       "agent uncut": lambda: service.deliver(sources)}
            tools.update(reference_tools(bench, sources, ep, "copy", "sftp put"))
            bench.compare(result, sizes.rounds, tools)
            resumed = (service.base / "agent.log").read_text().count("resumes at byte")
            result.extra["resumed uploads"] = resumed
        finally:
            service.close()
    return [result]


def run_svc_backlog(bench: Bench, sizes: Sizes) -> list[Result]:
    """A daemon started with a backlog in drop/: start-up to the last file archived."""
    count = sizes.svc_backlog
    sources = burst_input(bench, count)
    result = Result(f"svc-backlog {count} files", extra={"files": count})

    def agent() -> Measure:
        service = Service(bench, bench.direct, backlog=sources)
        try:
            return service.backlog_done()
        finally:
            service.close()

    tools: dict[str, Callable[[], Measure]] = {"agent": agent}
    tools.update(reference_tools(bench, sources, bench.direct, "copy", "sftp -b"))
    bench.compare(result, max(1, sizes.rounds - 1), tools)
    return [result]


def run_startup(bench: Bench, sizes: Sizes) -> list[Result]:
    """`status` (a journal of a few rows) and `validate` (a small file), whole processes, against
    `python -c pass` in alternating rounds."""
    base = bench.agent_dirs()
    config = bench.agent_config(base, bench.direct)
    stage(burst_input(bench, 5), base / "drop")
    subprocess.run([sys.executable, "-m", "agent", "run", "--once", "--config", str(config)],
                   cwd=bench.agent_root, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bench.clear_remote()
    small = next(iter(sorted(burst_input(bench, 5).iterdir())))
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "status": [sys.executable, "-m", "agent", "status", "--config", str(config)],
        "validate": [sys.executable, "-m", "agent", "validate", str(small)],
    }
    result = Result("startup", extra={"python": sys.version.split()[0]})
    for _round in range(10 * sizes.rounds):
        for name, cmd in commands.items():
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=bench.agent_root, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            _pid, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError(f"{name} exited {os.waitstatus_to_exitcode(status)}")
            result.add(name, time.perf_counter() - start, usage.ru_utime + usage.ru_stime)
    shutil.rmtree(base)
    for name in ("status", "validate"):
        result.extra[f"{name} min CPU ms"] = round(1000 * min(result.cpu[name]), 1)
    result.extra["pass min CPU ms"] = round(1000 * min(result.cpu["python -c pass"]), 1)
    return [result]


# ----------------------------------------------------------------------------- report

TARGETS = {
    "burst": [("rclone move", 1.0), ("sftp -b", 1.5)],
    "large": [("sftp -b", 1.1)],
    "slow burst": [("sftp -b", None)],
    "slow large": [("sftp -b", None)],
}
# issue 17: (scenario prefix, case suffix) -> [(reference, wall ratio target)]
SERVICE_TARGETS = [
    ("svc-lan", "large", [("sftp put", 1.0), ("rclone copy", 1.0)]),
    ("svc-lan", "burst", [("sftp -b", 0.2)]),
    ("svc-far-cut", "cut at 50%", [("sftp put", 1.3)]),
    ("svc-fat", "large", [("sftp put", 0.5)]),
    ("svc-loopback", "burst", [("sftp -b", 1.5)]),
    ("svc-loopback", "large", [("sftp put", 1.5)]),
]


def target_for(scenario: str, tool: str) -> float | None:
    for prefix, suffix, targets in SERVICE_TARGETS:
        if scenario.startswith(prefix) and suffix in scenario:
            return dict(targets).get(tool)
    return dict(TARGETS.get(scenario, [])).get(tool)


def report(results: list[Result]) -> None:
    print("\n=== results (median seconds; ratio = agent / reference, lower is better) ===")
    for res in results:
        extra = ", ".join(f"{k} {v}" for k, v in res.extra.items())
        print(f"\n[{res.scenario}] {extra}")
        if res.scenario in ("latency", "backlog", "idle"):
            continue
        if res.scenario == "startup":
            base = statistics.median(res.cpu["python -c pass"])
            for tool in res.rows:
                wall, cpu = statistics.median(res.rows[tool]), statistics.median(res.cpu[tool])
                print(f"  {tool:<14} wall {wall * 1000:6.0f} ms  cpu {cpu * 1000:6.0f} ms  cpu / pass"
                      f" {cpu / base:4.1f}  (target: wall <= 250 ms, cpu <= 5x pass)")
            continue
        agent = statistics.median(res.rows["agent"])
        agent_cpu = statistics.median(res.cpu["agent"]) if res.cpu.get("agent") else None
        for tool, samples in res.rows.items():
            median = statistics.median(samples)
            cpu = statistics.median(res.cpu[tool]) if res.cpu.get(tool) else None
            server = statistics.median(res.server_cpu[tool]) if res.server_cpu.get(tool) else None
            line = f"  {tool:<14} {median:8.3f} s"
            line += f"   cpu {cpu:6.2f} s" if cpu is not None else ""
            line += f"   sshd {server:6.2f} s" if server is not None else ""
            if tool != "agent":
                target = target_for(res.scenario, tool)
                line += f"   wall ratio {agent / median:5.2f}" + (f" (target <= {target})" if target else "")
                if agent_cpu is not None and cpu:
                    line += f"   agent cpu / its cpu {agent_cpu / cpu:5.2f}"
                    if server is not None:
                        line += f", / its cpu + sshd {agent_cpu / (cpu + server):5.2f}"
            print(line)
    print("\nother targets: latency p95 < 250 ms; backlog time/file ratio ~1 and flat RSS;"
          " idle < 0.5 CPU s/min and < 60 MiB RSS; < 100 MiB RSS while uploading the large file")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the agent against sftp -b and rclone.")
    parser.add_argument("--quick", action="store_true", help="smaller inputs and 2 rounds (about 2 min)")
    parser.add_argument("--scenario", action="append", choices=(*SCENARIOS, "svc", "all"),
                        help="run only this scenario (repeatable); `svc`: the svc-* scenarios and startup;"
                             " default all")
    parser.add_argument("--refs", default="sftp,rclone", help="references to run (comma list)")
    parser.add_argument("--rounds", type=int, help="rounds per scenario")
    parser.add_argument("--burst-files", type=int)
    parser.add_argument("--large-mb", type=float)
    parser.add_argument("--latency-files", type=int)
    parser.add_argument("--idle-seconds", type=float)
    parser.add_argument("--backlog", type=str, help="comma list of backlog sizes, e.g. 1000,10000")
    parser.add_argument("--link-large-mb", type=float, help="large file through the emulated links (svc-*)")
    parser.add_argument("--link-bursts", type=str, help="comma list of svc-lan burst sizes, e.g. 100,1000")
    parser.add_argument("--svc-backlog", type=int, help="files waiting when svc-backlog starts the daemon")
    parser.add_argument("--svc-cases", type=str,
                        help="comma list of svc-loopback cases to run (single,burst,large); default all")
    parser.add_argument("--concurrency", type=int,
                        help="set upload.concurrency (upload threads) in the agent's config; default: the"
                             " agent's own default")
    parser.add_argument("--agent-root", type=Path, default=REPO,
                        help="run the `agent` package found in this folder (e.g. a copy of an older tree)")
    parser.add_argument("--compare-root", type=Path,
                        help="svc-* cases: also run a daemon from this folder's `agent` package as"
                             " \"agent B\", alternated with the first (A/B of two trees)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--server-disk", choices=("tmpfs", "shared"), default="tmpfs",
                        help="where sshd stores uploads: its own tmpfs (default; a real server's disk is"
                             " not the agent's), or the agent's own disk (see bench/RESULTS.md)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: the daemons and sshd are closed

    sizes = QUICK if args.quick else FULL
    overrides = {"rounds": args.rounds, "burst_files": args.burst_files, "large_mb": args.large_mb,
                 "latency_files": args.latency_files, "idle_seconds": args.idle_seconds,
                 "backlog_counts": tuple(int(n) for n in args.backlog.split(",")) if args.backlog else None,
                 "link_large_mb": args.link_large_mb, "svc_backlog": args.svc_backlog,
                 "svc_cases": tuple(c.strip() for c in args.svc_cases.split(",")) if args.svc_cases else None,
                 "link_burst_files": (tuple(int(n) for n in args.link_bursts.split(","))
                                      if args.link_bursts else None)}
    sizes = replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    refs = [ref.strip() for ref in args.refs.split(",") if ref.strip()]
    if "sftp" in refs and not shutil.which("sftp"):
        print(SFTP_MISSING, file=sys.stderr)
        return 2
    if "rclone" in refs and not shutil.which("rclone"):
        print(f"{RCLONE_MISSING}; running without the rclone reference", file=sys.stderr)
        refs.remove("rclone")
    chosen = args.scenario or ["all"]
    service = ("svc" in chosen and name.startswith(("svc-", "startup")) for name in SCENARIOS)
    scenarios = [name for name, svc in zip(SCENARIOS, service, strict=True)
                 if svc or name in chosen or "all" in chosen]
    print(f"bench: {', '.join(scenarios)}; references {', '.join(refs) or 'none'}; {sizes}", flush=True)

    # An installed agent is byte-compiled (pip does it); a checkout run with PYTHONDONTWRITEBYTECODE
    # (set on some machines) would compile every module at each start: about 0.08 s per run here.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(args.agent_root.resolve() / "agent")],
                   check=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})
    results: list[Result] = []
    with (tempfile.TemporaryDirectory(prefix="saasquatch-bench-") as tmp,
          SshdServer(log_level="ERROR") as server, server_storage(server, args.server_disk)):
        bench = Bench(server, Path(tmp), refs, args.concurrency, args.agent_root.resolve())
        if args.compare_root:
            bench.compare_root = args.compare_root.resolve()
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(bench.compare_root / "agent")],
                           check=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""})
        runners: dict[str, Callable[[], list[Result]]] = {
            "burst": lambda: [run_burst(bench, sizes)],
            "large": lambda: [run_large(bench, sizes)],
            "latency": lambda: [run_latency(bench, sizes)],
            "backlog": lambda: [run_backlog(bench, sizes)],
            "idle": lambda: [run_idle(bench, sizes)],
            "slow": lambda: run_slow(bench, sizes),
            "svc-loopback": lambda: run_svc_loopback(bench, sizes),
            "svc-lan": lambda: run_svc_link(bench, sizes, "lan"),
            "svc-far-cut": lambda: run_svc_far_cut(bench, sizes),
            "svc-fat": lambda: run_svc_link(bench, sizes, "fat"),
            "svc-backlog": lambda: run_svc_backlog(bench, sizes),
            "startup": lambda: run_startup(bench, sizes),
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
