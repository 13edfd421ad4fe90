"""systemd: the unit files (verify, security rating), the sd_notify protocol of a real agent process,
the watchdog cadence, LoadCredential keys, and MemoryDenyWriteExecute under the kernel's same rule."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.systemd import CREDENTIAL_KEY_NAME, Notifier, credential_path
from tests.helpers.agent_env import REPO, AgentEnv, wait_until
from tests.helpers.sshd import SshdServer

pytestmark = pytest.mark.timeout(90)

UNITS = ("saasquatch-agent.service", "saasquatch-agent@.service")
MAX_EXPOSURE = 1.5
SYSTEMD_ANALYZE_MISSING = "systemd-analyze not found: install it with `apt-get install -y systemd`"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, SYSTEMD_ANALYZE_MISSING
    return found


def unit_copy(tmp_path: Path, unit: str) -> Path:
    """The unit with ExecStart pointing at an executable that exists here (verify checks it)."""
    text = (REPO / "systemd" / unit).read_text()
    text = text.replace("/usr/local/bin/saasquatch-agent", sys.executable)
    name = unit.replace("@.", "@live.")  # verify and security want an instance of the template
    out = tmp_path / name
    out.write_text(text)
    return out


@pytest.mark.parametrize("unit", UNITS)
def test_unit_verifies(tmp_path: Path, unit: str) -> None:
    result = subprocess.run([systemd_analyze(), "verify", str(unit_copy(tmp_path, unit))],
                            capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_unit_security_rating(tmp_path: Path, unit: str) -> None:
    text = (REPO / "systemd" / unit).read_text()
    for option in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=saasquatch-agent",
                   "StateDirectory=", "ConfigurationDirectory=", f"LoadCredential={CREDENTIAL_KEY_NAME}:",
                   "MemoryDenyWriteExecute=yes", "SystemCallFilter=@system-service"):
        assert option in text, option
    result = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager",
                             str(unit_copy(tmp_path, unit))],
                            capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    exposure = float(found.group(1))
    print(f"{unit}: systemd-analyze security --offline=true exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, result.stdout


# ----------------------------------------------------------------- the notify protocol


def test_notifier_is_a_no_op_outside_systemd() -> None:
    notifier = Notifier(env={})
    assert not notifier.enabled and notifier.watchdog_interval is None
    assert notifier.ready("x") is False
    notifier.heartbeat()


def test_notifier_abstract_socket_and_rate_limited_heartbeat() -> None:
    name = f"saasquatch-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(5)
        notifier = Notifier(env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "60000000",
                                 "WATCHDOG_PID": str(os.getpid())})
        assert notifier.watchdog_interval == 30.0
        assert notifier.ready("two\nlines")
        assert listener.recv(4096).decode().split("\n") == ["READY=1", f"MAINPID={os.getpid()}",
                                                            "STATUS=two lines"]
        for _ in range(1000):
            notifier.heartbeat()  # one ping; the rest fall inside the same quarter period
        notifier.stopping()
        assert listener.recv(4096) == b"WATCHDOG=1"
        assert listener.recv(4096).startswith(b"STOPPING=1")
        notifier.close()
    other = Notifier(env={"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # the watchdog is meant for another process


def _messages(listener: socket.socket, until: str, limit: int = 500) -> list[str]:
    """Datagrams until one contains `until` (bounded in count and by the socket timeout)."""
    seen = []
    for _ in range(limit):
        text = listener.recv(4096).decode()
        seen.append(text)
        if until in text:
            return seen
    raise AssertionError(f"no {until!r} in {limit} messages")


def test_real_agent_notifies_ready_watchdog_and_stopping(sshd_server: SshdServer, tmp_path: Path) -> None:
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server)
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(20)
        child_env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": address,
                     "WATCHDOG_USEC": "400000"}  # ping at least every 0.2 s
        with open(env.log_path, "wb") as log:
            env.process = subprocess.Popen(env.command("run", "--config", str(env.config_path)), cwd=REPO,
                                           env=child_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            ready = _messages(listener, "READY=1")[-1].split("\n")
            assert f"MAINPID={env.process.pid}" in ready
            assert any(line.startswith("STATUS=watching ") for line in ready)
            assert "watching" in env.log()  # READY comes after recovery and start-up

            # idle: the upload thread wakes by itself and pings; never a flood (no busy loop)
            pings = [m for m in _messages(listener, "WATCHDOG=1") + _messages(listener, "WATCHDOG=1")
                     + _messages(listener, "WATCHDOG=1") if m == "WATCHDOG=1"]
            assert len(pings) == 3

            payload = b"accountId,id\nacct-1,user-1\n"
            env.drop_atomically("users_watchdog.csv", payload)
            assert wait_until(lambda: env.states().get("users_watchdog.csv") == "archived", 30), env.log()
            uploaded = list(sshd_server.local_remote_dir.iterdir())
            assert [p.read_bytes() for p in uploaded] == [payload]
            assert _messages(listener, "WATCHDOG=1")[-1] == "WATCHDOG=1"  # still alive after work

            env.process.send_signal(signal.SIGTERM)
            assert any("STOPPING=1" in m for m in _messages(listener, "STOPPING=1"))
            assert env.process.wait(20) == 0
        finally:
            env.kill()


# ---------------------------------------------------------------- credentials and W^X


def test_credential_path() -> None:
    assert credential_path("sftp-key", env={}) is None
    assert credential_path("sftp-key", env={"CREDENTIALS_DIRECTORY": "/nonexistent"}) is None


def test_key_from_credentials_directory(sshd_server: SshdServer, tmp_path: Path) -> None:
    """LoadCredential=sftp-key:...: the key comes from $CREDENTIALS_DIRECTORY, not sftp.private_key."""
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    shutil.copy(sshd_server.user_key_path, creds / CREDENTIAL_KEY_NAME)
    os.chmod(creds / CREDENTIAL_KEY_NAME, 0o400)  # as systemd hands it over
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0)
    env.write_config(settle_seconds=0, private_key=tmp_path / "no-such-key")
    env.drop_atomically("users_cred.csv", b"accountId,id\na,b\n")
    result = subprocess.run(env.command("run", "--once", "--config", str(env.config_path)), cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "CREDENTIALS_DIRECTORY": str(creds)},
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert [p.name.endswith(".csv") for p in sshd_server.local_remote_dir.iterdir()] == [True]
    without = env.run_once()  # and without the credential the missing configured key is refused
    assert without.returncode == 1
    assert "no-such-key does not exist" in without.stderr


PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def _deny_write_execute() -> None:  # runs in the child before exec; inherited across execve
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE) failed (needs Linux 6.3 or newer)")


@pytest.fixture
def mdwe_probe() -> Iterator[None]:
    probe = subprocess.run([sys.executable, "-c", "import mmap; mmap.mmap(-1, 4096, prot=7)"],
                           preexec_fn=_deny_write_execute, capture_output=True, text=True, timeout=30,
                           check=False)
    assert probe.returncode != 0, "PR_SET_MDWE did not refuse a W+X mapping; the rule is not in force"
    yield


def test_agent_runs_with_memory_deny_write_execute(mdwe_probe: None, sshd_server: SshdServer,
                                                   tmp_path: Path) -> None:
    """MemoryDenyWriteExecute=yes: paramiko, cryptography (cffi) and CPython need no W+X memory."""
    env = AgentEnv.for_sshd(tmp_path / "agent", sshd_server, settle_seconds=0)
    payload = b'{"accountId": "a", "userId": "u", "event": {"key": "purchase"}}\n'
    env.drop_atomically("userEvents_mdwe.jsonl", payload)
    result = subprocess.run(env.command("run", "--once", "--config", str(env.config_path)), cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=_deny_write_execute,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert [p.read_bytes() for p in sshd_server.local_remote_dir.iterdir()] == [payload]


# ---------------------------------------------------------------- journald


_JOURNALD_CHILD = """
import os, sys
from loguru import logger
from agent.logs import setup_logging
if sys.argv[1] == "journald":
    status = os.fstat(2)
    os.environ["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino}"
setup_logging()
logger.info("hello")
logger.warning("careful")
try:
    raise ValueError("boom")
except ValueError:
    logger.exception("failed")
"""


@pytest.mark.parametrize("mode", ["journald", "terminal"])
def test_log_lines_under_journald_carry_priority_and_no_timestamp(tmp_path: Path, mode: str) -> None:
    """$JOURNAL_STREAM naming stderr: `<N>` syslog priority on every line (tracebacks too), no time."""
    with open(tmp_path / "stderr", "w+") as stderr:
        subprocess.run([sys.executable, "-c", _JOURNALD_CHILD, mode], cwd=REPO, stderr=stderr, timeout=60,
                       check=True, env={**os.environ, "PYTHONPATH": str(REPO), "JOURNAL_STREAM": "1:2"})
    lines = (tmp_path / "stderr").read_text().splitlines()
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")  # UTC with a zone marker
    if mode == "terminal":  # a stale $JOURNAL_STREAM (another file) is ignored: plain lines
        assert all(not line.startswith("<") for line in lines), lines
        assert stamp.match(lines[0]) and lines[0].endswith("INFO    hello"), lines
        return
    assert lines[0] == "<6>INFO    hello", lines
    assert lines[1] == "<4>WARNING careful", lines
    assert lines[2] == "<3>ERROR   failed", lines
    assert len(lines) > 4 and all(line.startswith("<3>") for line in lines[2:]), lines  # the traceback
    assert any("ValueError: boom" in line for line in lines)
    assert not any(stamp.search(line) for line in lines), lines
