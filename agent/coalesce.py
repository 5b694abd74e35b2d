"""Runs an action at most once per interval, always after the latest request for it.

The retained status is rebuilt and republished after loads, unloads and swaps; a thousand
models pushed at once would otherwise publish it a thousand times, each copy larger than
the last. Requests within the interval fold into one run at its end, which sees the
latest state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

_IDLE_POLL_S = 1.0


class Coalescer:
    """Calls `action` on its own thread: at once when idle, else once the interval is up."""

    def __init__(
        self,
        action: Callable[[], None],
        interval_s: float,
        name: str,
        stopping: threading.Event | None = None,
    ) -> None:
        self._action = action
        # Set from a signal handler, which must not take the lock to wake us: looked at
        # once a second while idle, and before each run.
        self._stopping = stopping or threading.Event()
        self._interval_s = interval_s
        self._cond = threading.Condition()
        self._wanted = False
        self._closed = False
        self._last = -float("inf")  # monotonic time of the last run
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request(self) -> None:
        """Have the action run soon; never blocks on the action itself."""
        with self._cond:
            self._wanted = True
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop (as setting `stopping` does); a pending request is dropped."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._closed and not self._stopping.is_set():
                    self._cond.wait(_IDLE_POLL_S)
                if self._closed or self._stopping.is_set():
                    return
                delay = self._last + self._interval_s - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                self._wanted = False
            try:
                self._action()
            except Exception:  # the next request must still be served
                log.exception("coalesced_action_failed", thread=self._thread.name)
            self._last = time.monotonic()
