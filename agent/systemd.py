"""systemd integration: the sd_notify protocol (READY, RELOADING, STOPPING, WATCHDOG, STATUS), credentials.

The protocol is one datagram per notification to the AF_UNIX socket named by $NOTIFY_SOCKET (a path,
or an abstract name written with a leading '@'). It is small enough for the standard library; the
pure-Python packages for it are unmaintained and systemd-python needs libsystemd headers to build.
Outside systemd (no $NOTIFY_SOCKET) every call is a cheap no-op.

Watchdog: when the unit sets `WatchdogSec=`, systemd passes $WATCHDOG_USEC (and $WATCHDOG_PID). The
upload thread calls `Notifier.heartbeat()` from its loop and for every chunk it sends, and wakes at
least every `watchdog_interval` seconds (half the watchdog period) even when idle, so a hung upload
thread stops the pings and systemd restarts the agent.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from loguru import logger

CREDENTIAL_KEY_NAME = "sftp-key"  # LoadCredential=sftp-key:/etc/saasquatch-agent/keys/id_ed25519


def credential_path(name: str, env: Mapping[str, str] | None = None) -> Path | None:
    """`$CREDENTIALS_DIRECTORY/name` when systemd passed that credential, else None."""
    env = os.environ if env is None else env
    folder = env.get("CREDENTIALS_DIRECTORY")
    if not folder:
        return None
    path = Path(folder) / name
    return path if os.path.lexists(path) else None


def _socket_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends sd_notify messages; every method is safe to call when not run by systemd."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if self._address and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1_000_000 / 2
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` lines in one datagram; False when not under systemd or the send failed."""
        if self._address is None:
            return False
        data = "\n".join(assignments).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self._address)
            except OSError as exc:
                logger.warning("cannot notify systemd at $NOTIFY_SOCKET: {}", exc.strerror or exc)
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS={_one_line(status)}")

    def reloading(self, status: str = "reloading configuration") -> bool:
        """RELOADING=1 (`systemctl reload` waits for the READY=1 that follows)."""
        return self.notify("RELOADING=1", f"STATUS={_one_line(status)}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def heartbeat(self) -> None:
        """Watchdog ping, at most one per quarter period however often it is called."""
        if self.watchdog_interval is None:
            return
        now = time.monotonic()
        if now - self._last_ping < self.watchdog_interval / 2:
            return
        self._last_ping = now
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())
