"""One error family: every error the agent raises to a caller is an `AgentError`.

Each class says how a command that meets it ends (`exit_code`: the contract's 1 runtime failure,
2 usage or configuration) and whether the agent tries again by itself (`retryable`). The CLI turns
an AgentError into its one line and its exit code in one place (agent.cli.AgentGroup); the upload
path asks `classify` what a fault means instead of testing exception types itself.

A leaf: nothing of the agent is imported here, so every room may use it (tests/test_walls.py).
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

EXIT_OK = 0
EXIT_RUNTIME = 1  # runtime failure, or invalid files for `validate`
EXIT_USAGE = 2  # usage or configuration error


class AgentError(Exception):
    """An error whose message is one line meant for the operator (what is wrong, what to do)."""

    exit_code: ClassVar[int] = EXIT_RUNTIME
    retryable: ClassVar[bool] = False  # the agent tries again by itself (backoff), the file stays queued
    # retrying waits for a connection: every file holds off together, the session is kept
    connection: ClassVar[bool] = False
    in_log: ClassVar[bool] = False  # said as a log line (the daemon's), not as a plain stderr line


class CommandError(AgentError):
    """A command cannot do what was asked; the message says why and what to do."""


class UsageError(CommandError):
    """A command called in a way it must refuse (e.g. as root on the service's state)."""

    exit_code = EXIT_USAGE


class Fault(StrEnum):
    """What the upload path does about a fault (`classify`)."""

    REFUSE = "refuse"  # retrying cannot fix it: the file goes to failed/ with the message
    RETRY = "retry"  # not this time (the server's words); the connection is sound: send again later
    CONNECTION = "connection"  # no usable connection (reach, login, key): every file holds off together
    RESET = "reset"  # a fault mid-operation (network, server, local I/O): drop the connection, retry
    STOPPING = "stopping"  # the agent is stopping: abandoned, sent again at the next start


def classify(exc: BaseException) -> Fault:
    """The one retry classifier of the upload path: an AgentError by what it says of itself, a
    stop request as such, anything else (OSError, EOFError, paramiko's errors) as a fault of the
    connection in mid-operation, which retrying with a fresh connection can fix."""
    if isinstance(exc, InterruptedError):
        return Fault.STOPPING
    if isinstance(exc, AgentError):
        if not exc.retryable:
            return Fault.REFUSE
        return Fault.CONNECTION if exc.connection else Fault.RETRY
    return Fault.RESET
