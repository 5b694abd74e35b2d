"""The broker's round trip as the agent's requests see it now, measured on its own connection.

A request's client sees more than the time the agent spends on it: the broker forwards the
request and the reply, and each of the agent's, the broker's and the client's threads must
be scheduled to move them. On a calm board that is a fraction of a millisecond; under CPU
contention it grows by milliseconds, which a latency objective must count. So now and then
the agent publishes a small message to a topic only it reads, and times its return through
the broker and its own network thread: the same hops, under the same load, as its replies.

An echo carries its own send time, so nothing is kept per echo; one that comes back late,
twice or from someone else is ignored.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable

STALE_S = 30.0
"""An echo older than this when it returns is not counted (a reconnect's resend)."""
KEEP = 256


class BrokerEcho:
    """Sends echoes on request and keeps the round trips of those that came back."""

    def __init__(self, topic: str, publish: Callable[[str, bytes], object]) -> None:
        self.topic = topic
        self._publish = publish
        self._token = uuid.uuid4().hex[:12]
        self._lock = threading.Lock()
        self._trips: deque[tuple[float, float]] = deque(maxlen=KEEP)  # (returned, ms)

    def send(self, now: float | None = None) -> None:
        """Publish one echo (QoS 0: the broker forwards it at once, and no ack is waited for)."""
        sent = time.monotonic() if now is None else now
        self._publish(self.topic, f"{self._token} {sent!r}".encode())

    def returned(self, payload: bytes | bytearray, now: float | None = None) -> None:
        """An echo came back (called on the network thread)."""
        now = time.monotonic() if now is None else now
        token, _, sent_text = payload.decode("ascii", "replace").partition(" ")
        if token != self._token:
            return
        try:
            sent = float(sent_text)
        except ValueError:
            return
        if not 0.0 <= now - sent <= STALE_S:
            return
        with self._lock:
            self._trips.append((now, (now - sent) * 1000.0))

    def trips(self, window_s: float, now: float | None = None) -> list[float]:
        """The round trips (ms) of the echoes that returned in the last `window_s` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return [ms for at, ms in self._trips if now - at <= window_s]


__all__ = ["BrokerEcho"]
