"""systemd's notify protocol (sd_notify) in a few lines, without a dependency.

systemd passes a unix datagram socket in $NOTIFY_SOCKET (a path, or an abstract name starting with
'@'); the service writes newline-separated KEY=VALUE assignments to it: READY=1 once it can work,
WATCHDOG=1 at least every WatchdogSec, STATUS=... for `systemctl status`, RELOADING=1 / STOPPING=1.

Example:
    notifier = Notifier.from_environment()
    notifier.ready(status="models loaded")
    every = notifier.watchdog_interval_s()   # None when the unit has no WatchdogSec
    notifier.watchdog()
Outside systemd (no NOTIFY_SOCKET) every call is a cheap no-op that returns False.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages to one socket; never raises (the service must not die of a notify)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = address or None
        self._watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_environment(cls) -> "Notifier":
        """Read NOTIFY_SOCKET and WATCHDOG_USEC (honouring WATCHDOG_PID) the way libsystemd does."""
        usec: int | None = None
        raw = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if raw and (not pid or pid == str(os.getpid())):
            try:
                usec = int(raw) if int(raw) > 0 else None
            except ValueError:
                usec = None
        return cls(os.environ.get("NOTIFY_SOCKET"), usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send KEY=VALUE lines as one datagram; True when it was delivered to the socket."""
        if not self.address:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.sendto(message, target)
                return True
            except OSError as exc:
                if not self._warned:
                    log.warning("sd_notify to %s failed: %s (further failures are not logged)", self.address, exc)
                    self._warned = True
                return False

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"] + ([f"STATUS={_one_line(status)}"] if status else [])
        return self.send(*lines)

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        """Tell systemd a reload started; READY=1 (ready()) tells it the reload finished."""
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half of WatchdogSec (systemd's advice), None without a watchdog."""
        if not self.enabled or not self._watchdog_usec:
            return None
        return self._watchdog_usec / 1e6 / 2

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None


def _one_line(text: str) -> str:
    return " ".join(text.split())
