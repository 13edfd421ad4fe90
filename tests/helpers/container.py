"""A Debian root filesystem booted with systemd-nspawn: a real systemd as PID 1 for service tests.

`rootfs()` builds (once, cached under CACHE keyed by the suite and package list) a bookworm minbase
root with debootstrap from the mirror apt already uses (read from /etc/apt at run time, never written
into the project). `Container` boots an ephemeral copy of it (`systemd-nspawn -x -b`, loopback-only
network, the checkout and a wheelhouse bound read-only), waits until `systemctl is-system-running`
says running or degraded, runs commands inside with nsenter into its PID 1, and powers it off (killed
when that takes too long). Every wait is bounded. Missing tools fail with the apt-get line to run.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tests.helpers.agent_env import REPO

SUITE = "bookworm"
PACKAGES = ("dbus", "openssh-server", "python3", "python3-venv", "systemd", "systemd-sysv")
CACHE = Path(os.environ.get("SAASQUATCH_TEST_CACHE", "/var/cache/saasquatch-agent-tests"))
TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container", "nsenter": "util-linux"}
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SRC = "/mnt/src"  # the checkout, read-only, inside the container
WHEELS = "/mnt/wheels"  # the wheelhouse, read-only, inside the container


def require_tools() -> None:
    """Fail (never skip) when a tool is missing, with the command that installs it."""
    tools = sorted(tool for tool in TOOLS if shutil.which(tool) is None)
    packages = sorted({TOOLS[tool] for tool in tools})
    assert not tools, f"container tests need {', '.join(tools)}: apt-get install -y {' '.join(packages)}"
    assert os.geteuid() == 0, "container tests boot systemd-nspawn and must run as root"


def apt_mirror(etc: Path = Path("/etc/apt")) -> str:
    """The Debian archive address apt already uses (deb822 .sources first, then sources.list)."""
    for sources in sorted((etc / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", sources.read_text()):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, flags=re.MULTILINE))
            suites = fields.get("Suites", "").split()
            if "deb" in fields.get("Types", "").split() and SUITE in suites and fields.get("URIs"):
                return fields["URIs"].split()[0]
    lists = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for listing in lists:
        if not listing.exists():
            continue
        for line in listing.read_text().splitlines():
            found = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
            if found and found.group(2) == SUITE:
                return found.group(1)
    raise AssertionError(f"no apt source for {SUITE} in {etc}: cannot build the container's root")


def rootfs_key() -> str:
    return hashlib.sha256(f"{SUITE} minbase {','.join(sorted(PACKAGES))}".encode()).hexdigest()[:12]


def rootfs(timeout: float = 900) -> Path:
    """The cached root filesystem, built with debootstrap when missing (one builder at a time)."""
    require_tools()
    CACHE.mkdir(parents=True, exist_ok=True)
    root = CACHE / f"rootfs-{rootfs_key()}"
    with open(CACHE / f"rootfs-{rootfs_key()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent builder finishes first; we then reuse its work
        if (root / ".complete").exists():
            return root
        building = CACHE / f"rootfs-{rootfs_key()}.building"
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(building),
             apt_mirror()], capture_output=True, text=True, timeout=timeout, check=False)
        assert result.returncode == 0, (f"debootstrap failed:\n{result.stdout[-3000:]}\n"
                                        f"{result.stderr[-3000:]}")
        (building / ".complete").write_text(f"{SUITE} {' '.join(PACKAGES)}\n")
        building.rename(root)
        return root


def build_wheelhouse(target: Path, timeout: float = 600) -> Path:
    """The project and its dependencies as wheels, built outside (the container has no network)."""
    pip = REPO / ".venv" / "bin" / "pip"
    assert pip.exists(), f"{pip} missing: run scripts/setup-dev.sh"
    target.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([str(pip), "wheel", "--quiet", "-w", str(target), str(REPO)],
                            capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO)
    assert result.returncode == 0, f"pip wheel failed:\n{result.stderr[-3000:]}"
    return target


class Container:
    """One booted, ephemeral container; use as a context manager."""

    def __init__(self, root: Path, wheelhouse: Path, log_path: Path, *, boot_timeout: float = 90) -> None:
        self.root = root
        self.wheelhouse = wheelhouse
        self.log_path = log_path
        self.boot_timeout = boot_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.name = f"sqa-test-{os.getpid()}"

    def __enter__(self) -> Container:
        self.boot()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.poweroff()

    def boot(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "--ephemeral", "--boot", "--register=no",
                 "--keep-unit", "--private-network", "--console=read-only", f"--machine={self.name}",
                 f"--bind-ro={REPO}:{SRC}", f"--bind-ro={self.wheelhouse}:{WHEELS}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.boot_timeout
        state = ""
        for _ in range(int(self.boot_timeout / 0.2) + 1):
            assert self.process.poll() is None, f"systemd-nspawn exited:\n{self.console()[-3000:]}"
            if not self.leader:
                self.leader = self._find_leader()
            if self.leader:
                state = self.run("systemctl is-system-running", check=False, timeout=10).stdout.strip()
                if state in ("running", "degraded"):
                    return
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.poweroff()
        raise AssertionError(f"container did not boot in {self.boot_timeout} s (state {state!r}):\n"
                             f"{self.console()[-3000:]}")

    def _find_leader(self) -> int:
        """The container's PID 1 as the host sees it: the descendant of nspawn whose comm is systemd."""
        assert self.process is not None
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        todo = list(children.get(self.process.pid, []))
        for _ in range(64):  # nspawn's own children, then theirs; the tree is shallow
            if not todo:
                break
            pid = todo.pop(0)
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return pid
            except OSError:
                continue
            todo.extend(children.get(pid, []))
        return 0

    def run(self, command: str, *, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """`sh -c command` inside the container as root, with a clean environment."""
        assert self.leader, "container not booted"
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "--", "env", "-i", f"PATH={INSIDE_PATH}",
             "LANG=C.UTF-8", "HOME=/root", "TERM=dumb", "SYSTEMD_PAGER=", "/bin/sh", "-c", command],
            input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check:
            assert result.returncode == 0, (f"inside: {command}\nexit {result.returncode}\n"
                                            f"stdout: {result.stdout[-4000:]}\n"
                                            f"stderr: {result.stderr[-4000:]}")
        return result

    def wait_for(self, command: str, timeout: float, interval: float = 0.5) -> bool:
        """True once `command` exits 0 inside; bounded in time and count."""
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / interval) + 2):
            if self.run(command, check=False, timeout=30).returncode == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
        return False

    def console(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def poweroff(self, timeout: float = 30) -> None:
        """`systemctl poweroff` inside and wait for nspawn; SIGTERM then SIGKILL when it overruns."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None and self.leader:
            subprocess.run(["nsenter", "-t", str(self.leader), "-a", "--", "systemctl", "poweroff"],
                           capture_output=True, timeout=15, check=False)
        self.leader = 0
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                continue
