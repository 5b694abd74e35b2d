"""The systemd notification protocol (sd_notify(3)), without libsystemd.

A notification is one datagram of newline-separated `KEY=value` assignments sent to the
AF_UNIX socket that systemd names in $NOTIFY_SOCKET (a leading '@' means the abstract
namespace). Outside systemd the variable is unset and every call here does nothing.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)

# STATUS= is shown by `systemctl status` on one line; systemd truncates long ones anyway.
_STATUS_MAX = 1024


class Notifier:
    """Sends notifications to the service manager; a no-op when there is none."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier for $NOTIFY_SOCKET (a no-op one when it is unset)."""
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` assignments as one datagram; False when it could not be sent.

        Never raises: a service manager that went away must not take the agent down.
        """
        if self.address is None or not assignments:
            return False
        message = "\n".join(assignments).encode()
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                self._socket.sendto(message, target)
            except OSError as exc:
                if not self._failed:  # once: a dead socket would otherwise flood the journal
                    log.warning("sd_notify_failed", socket=self.address, error=str(exc))
                self._failed = True
                return False
        self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up (or a reload) is complete."""
        return self.notify("READY=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with the monotonic timestamp that systemd 253+ expects beside it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status(status))

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.notify("STOPPING=1", *_status(status))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the service is alive; systemd restarts it if these stop coming."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """STATUS=: one line saying what the service is doing."""
        return self.notify(*_status(text))

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC=: still starting (or stopping) and making progress."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd set for this process (WatchdogSec=), in seconds.

    None when there is no watchdog, or when $WATCHDOG_PID names another process (the
    variables were inherited from a parent that systemd watches, not from systemd).
    """
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    return usec / 1_000_000 if usec > 0 else None


def _status(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    line = " ".join(text.split())  # a newline would start a new assignment
    return (f"STATUS={line[:_STATUS_MAX]}",)
