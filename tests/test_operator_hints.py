"""Small frictions of issue 15: `--version`, `trust-host` without a terminal, `demo` without its extra."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.ops.demo import install_line
from agent.ops.sandbox import SandboxServer
from tests.helpers.agent_env import REPO, sandbox_env

PY = "/opt/saasquatch-agent/bin/python"


def run(*args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=env, stdin=stdin, check=False)


def test_version() -> None:
    result = run("-m", "agent", "--version")
    assert result.returncode == 0
    assert re.fullmatch(r"saasquatch-agent, version \d+\.\d+\.\d+\n", result.stdout), result.stdout


@pytest.mark.timeout(60)
def test_trust_host_without_a_terminal_says_to_use_fingerprint(sandbox: tuple[SandboxServer, Path],
                                                               tmp_path: Path) -> None:
    server, key = sandbox
    env = sandbox_env(tmp_path, server, key)
    known_hosts = tmp_path / "keys" / "known_hosts"
    known_hosts.write_text("")
    result = run("-m", "agent", "trust-host", "--config", str(env.config_path))  # stdin: /dev/null
    assert result.returncode == 1, result.stdout + result.stderr
    fingerprint = re.search(r"fingerprint: (SHA256:\S+)", result.stdout)
    assert fingerprint, result.stdout
    assert "Aborted" not in result.stdout + result.stderr
    assert "no terminal to confirm the fingerprint on; nothing written" in result.stderr
    assert (f"saasquatch-agent trust-host --config {env.config_path} --fingerprint {fingerprint[1]}"
            in result.stderr), result.stderr
    assert known_hosts.read_text() == ""
    # the line it prints does the job
    done = run("-m", "agent", "trust-host", "--config", str(env.config_path), "--fingerprint", fingerprint[1])
    assert done.returncode == 0 and "trusted:" in done.stdout, done.stdout + done.stderr


def test_demo_without_its_extra_prints_the_pip_line_not_a_traceback() -> None:
    code = "import sys; sys.modules['asyncssh'] = None; from agent.cli import main; main(['demo'])"
    result = run("-c", code)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == ("saasquatch-agent: the demo needs the optional `demo` extra (the asyncssh package),"
                        " which is not installed. Install it with:"), result.stderr
    assert lines[1].startswith(f"  {sys.executable} -m pip install ") and "[demo]" in lines[1], result.stderr


@pytest.mark.parametrize("direct_url, installed, expected", [
    ({"url": "file:///opt/src/saasquatch-agent", "dir_info": {}}, True,
     f"{PY} -m pip install '/opt/src/saasquatch-agent[demo]'"),  # install.sh from a checkout
    ({"url": "file:///home/me/agent", "dir_info": {"editable": True}}, True,
     f"{PY} -m pip install -e '/home/me/agent[demo]'"),  # scripts/setup-dev.sh
    ({"url": "file:///tmp/w/saasquatch_agent-0.1.0-py3-none-any.whl", "archive_info": {}}, True,
     f"{PY} -m pip install '/tmp/w/saasquatch_agent-0.1.0-py3-none-any.whl[demo]'"),
    ({"url": "https://example.invalid/agent.git", "vcs_info": {"vcs": "git", "requested_revision": "v1"}},
     True,
     f"{PY} -m pip install 'saasquatch-agent[demo] @ git+https://example.invalid/agent.git@v1'"),
    (None, True, f"{PY} -m pip install 'saasquatch-agent[demo]'   (offline, as install.sh --wheels: add"
                 " --no-index --find-links WHEELHOUSE, with the extra's wheels in it:"
                 " pip wheel -w WHEELHOUSE '.[demo]')"),
])
def test_install_line_follows_how_the_agent_was_installed(direct_url: dict[str, object] | None,
                                                          installed: bool, expected: str) -> None:
    running_from = Path(str((direct_url or {}).get("url", "file:///x")).removeprefix("file://"))
    assert install_line("demo", direct_url, installed, python=PY, running_from=running_from) == expected


def test_install_line_for_a_checkout_that_is_not_the_installed_one() -> None:
    line = install_line("demo", {"url": "file:///elsewhere", "dir_info": {"editable": True}}, True,
                        python=PY, running_from=REPO)
    assert line == f"{PY} -m pip install -e '{REPO}[demo]'"
    assert install_line("demo", None, False, python=PY, running_from=REPO) == line
