"""The error family (agent/errors.py): each error's exit code and retry, the upload path's one
classifier, and the CLI's one place that turns an error into its line and exit code."""

from __future__ import annotations

from pathlib import Path

import paramiko
import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.config import ConfigError
from agent.errors import EXIT_RUNTIME, EXIT_USAGE, AgentError, CommandError, Fault, UsageError, classify
from agent.imports.split import SplitError
from agent.ops.keys import KeygenError, write_new_keypair
from agent.ops.trust import TrustError
from agent.ops.views import OpsError
from agent.pipeline.upload import PermanentUploadError, TransientUploadError
from agent.service import AlreadyRunning, StartError
from agent.store.journal import JournalError
from agent.transport.sftp import ConnectError, PrivateKeyError


@pytest.mark.parametrize(("error", "exit_code", "retryable"), [
    (ConfigError, EXIT_USAGE, False),
    (UsageError, EXIT_USAGE, False),
    (JournalError, EXIT_RUNTIME, False),
    (AlreadyRunning, EXIT_RUNTIME, False),
    (StartError, EXIT_RUNTIME, False),
    (CommandError, EXIT_RUNTIME, False),
    (OpsError, EXIT_RUNTIME, False),
    (TrustError, EXIT_RUNTIME, False),
    (KeygenError, EXIT_RUNTIME, False),
    (SplitError, EXIT_RUNTIME, False),
    (PermanentUploadError, EXIT_RUNTIME, False),
    (TransientUploadError, EXIT_RUNTIME, True),
    (ConnectError, EXIT_RUNTIME, True),
    (PrivateKeyError, EXIT_RUNTIME, True),
])
def test_every_error_is_of_the_family(error: type[AgentError], exit_code: int, retryable: bool) -> None:
    assert issubclass(error, AgentError)
    assert (error.exit_code, error.retryable) == (exit_code, retryable)


@pytest.mark.parametrize(("exc", "fault"), [
    (PermanentUploadError("the server refused the name"), Fault.REFUSE),
    (TransientUploadError("the server refused to write"), Fault.RETRY),
    (ConnectError("cannot connect", dropped=True), Fault.CONNECTION),
    (PrivateKeyError("private key is readable by group"), Fault.CONNECTION),
    (InterruptedError("stopping"), Fault.STOPPING),
    (ConnectionResetError(104, "Connection reset by peer"), Fault.RESET),
    (TimeoutError("timed out"), Fault.RESET),
    (EOFError(), Fault.RESET),
    (paramiko.SSHException("channel closed"), Fault.RESET),
    (OSError("Failure"), Fault.RESET),
])
def test_classify(exc: BaseException, fault: Fault) -> None:
    assert classify(exc) is fault


def test_one_handler_gives_the_line_and_the_exit_code(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = tmp_path / "nowhere.toml"
    result = runner.invoke(main, ["status", "--config", str(missing)])
    assert result.exit_code == EXIT_USAGE
    assert result.stderr.startswith(f"saasquatch-agent: {missing}: configuration file not found")
    key = tmp_path / "id_ed25519"
    write_new_keypair(key)
    again = runner.invoke(main, ["keygen", str(key)])
    assert again.exit_code == EXIT_RUNTIME
    assert again.stderr == f"saasquatch-agent: {key} already exists; not overwriting a key\n"


def test_a_command_that_raises_a_family_error_gets_its_exit() -> None:
    @main.command("raise-for-test", hidden=True)
    def raise_for_test() -> None:
        raise UsageError("called the wrong way")

    try:
        result = CliRunner().invoke(main, ["raise-for-test"])
    finally:
        main.commands.pop("raise-for-test")
    assert (result.exit_code, result.stderr) == (EXIT_USAGE, "saasquatch-agent: called the wrong way\n")
