"""Agent events (loads, rejections, swaps, connection changes): logged and published.

The core emits events without knowing about MQTT; the MQTT front end attaches a publisher
once it is connected, and events emitted before that are sent then, oldest first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("agent.events")

Publisher = Callable[[dict[str, Any]], None]

# Events that mean something went wrong are logged as warnings.
_WARNINGS = frozenset(
    {
        "variant_rejected",
        "model_rejected",
        "broker_disconnected",
        "broker_refused",
        "subscription_refused",
        "model_load_stuck",
        "variant_swap_failed",
    }
)


class Events:
    """Fan-out of agent events to the log and, when attached, to a publisher."""

    def __init__(self, backlog: int = 256) -> None:
        self._lock = threading.Lock()
        self._publish: Publisher | None = None
        self._backlog: deque[dict[str, Any]] = deque(maxlen=backlog)

    def emit(self, event: str, **fields: Any) -> None:
        """Log `event` with its fields and publish it (or keep it until a publisher attaches)."""
        (log.warning if event in _WARNINGS else log.info)(event, **fields)
        payload = {"event": event, "ts": time.time(), **fields}
        with self._lock:
            publish = self._publish
            if publish is None:
                self._backlog.append(payload)
                return
        publish(payload)

    def attach(self, publish: Publisher | None) -> None:
        """Start (or, with None, stop) publishing; sends what was emitted meanwhile."""
        with self._lock:
            self._publish = publish
            pending = list(self._backlog) if publish is not None else []
            if publish is not None:
                self._backlog.clear()
        for payload in pending:
            publish(payload)  # type: ignore[misc]  # not None when pending is non-empty
