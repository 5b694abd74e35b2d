"""`edge-agent infer --rate R`: a steady stream of one request, and a line a second saying
how it was answered — which variant served it, and how fast the round trips were.

The stream is open-loop: requests go out on schedule whatever comes back, as from a camera,
so a slow agent shows as a growing p95, not as a slower stream. It is what the quick start's
worked example (README, "How the agent adapts") watches while busy loops squeeze the board.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from agent.mqtt.requester import Reply, Requester

MAX_IN_FLIGHT = 10_000
"""Requests unanswered at once before the stream waits (an agent that stopped answering)."""


@dataclass
class _Second:
    """What came back for the requests sent in one second."""

    sent: int = 0
    trips_ms: list[float] = field(default_factory=list)
    variants: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


class _Tally:
    """Replies by the second their request was sent in; thread-safe (paho's thread adds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: list[_Second] = []
        self.in_flight = 0

    def sent(self, second: int) -> None:
        with self._lock:
            while len(self.seconds) <= second:
                self.seconds.append(_Second())
            self.seconds[second].sent += 1
            self.in_flight += 1

    def answered(self, second: int, trip_ms: float, variant: str | None, error: str | None) -> None:
        with self._lock:
            entry = self.seconds[second]
            self.in_flight -= 1
            if error is not None:
                entry.errors[error] += 1
                return
            entry.trips_ms.append(trip_ms)
            entry.variants[variant or "?"] += 1


def _outcome(reply: Reply) -> tuple[str | None, str | None]:
    """(variant, error) of a reply, from its JSON header."""
    raw = reply.payload[: reply.header_length] if reply.header_length else reply.payload
    try:
        header = json.loads(raw)
    except ValueError:
        return None, "unreadable reply"
    if not isinstance(header, dict):
        return None, "unreadable reply"
    if "error" in header:
        return None, f"error {header.get('code')}"
    version = header.get("model_version")
    return (str(version) if version is not None else None), None


def describe(number: int, entry: _Second) -> str:
    """One second's line."""
    answered = len(entry.trips_ms)
    parts = [f"{number + 1:4d} s", f"sent {entry.sent:4d}", f"answered {answered:4d}"]
    if entry.trips_ms:
        p50, p95 = np.percentile(entry.trips_ms, [50, 95])
        parts.append(f"p50 {p50:6.2f} ms  p95 {p95:6.2f} ms")
    served = ", ".join(f"{name} {count}" for name, count in entry.variants.most_common())
    if served:
        parts.append(f"served by {served}")
    if entry.errors:
        parts.append("; ".join(f"{count} {kind}" for kind, count in entry.errors.items()))
    return "  ".join(parts)


def stream(
    requester: Requester,
    topic: str,
    payload: bytes,
    header_length: int | None,
    *,
    rate: float,
    seconds: float,
    timeout: float,
    out: Callable[[str], None] = print,
    stop: threading.Event | None = None,
) -> int:
    """Send `payload` to `topic` `rate` times a second for `seconds` (0: until `stop`),
    printing each second's answers once they are in (or `timeout` has passed); returns
    how many requests got no answer or an error."""
    tally = _Tally()
    stop = stop or threading.Event()
    interval = 1.0 / rate
    start = time.monotonic()
    printed = 0

    def sent_at(second: int, at: float) -> Callable[[Future[Reply]], None]:
        def done(future: Future[Reply]) -> None:
            took = (time.monotonic() - at) * 1000.0
            if future.cancelled() or future.exception() is not None:
                tally.answered(second, took, None, "not sent")
                return
            variant, error = _outcome(future.result())
            tally.answered(second, took, variant, error)

        return done

    def flush(now: float, final: bool = False) -> None:
        nonlocal printed
        # A second is printed once it is over and all its requests are back, or its last
        # one is `timeout` old, or at the end.
        while printed < len(tally.seconds):
            entry, ended = tally.seconds[printed], start + printed + 1
            back = len(entry.trips_ms) + sum(entry.errors.values()) >= entry.sent
            if not (final or (now >= ended and back) or now >= ended + timeout):
                break
            out(describe(printed, entry))
            printed += 1

    index = 0
    try:
        while not stop.is_set():
            due = start + index * interval
            if seconds and due - start >= seconds:
                break
            now = time.monotonic()
            if due > now:
                stop.wait(min(due - now, 0.25))
                flush(time.monotonic())
                continue
            if tally.in_flight >= MAX_IN_FLIGHT:
                stop.wait(0.01)
                continue
            second = int(due - start)
            tally.sent(second)
            future = requester.send(topic, payload, header_length)
            future.add_done_callback(sent_at(second, time.monotonic()))
            index += 1
            flush(now)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends the stream: what was sent still gets its summary
    # What is still unanswered gets `timeout` to come back.
    deadline = time.monotonic() + timeout
    while tally.in_flight > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    flush(time.monotonic(), final=True)
    missing, summary = summarize(tally.seconds)
    out(summary)
    return missing


def summarize(seconds: list[_Second]) -> tuple[int, str]:
    """(requests without an answer or with an error, the closing line)."""
    total = sum(entry.sent for entry in seconds)
    trips = [ms for entry in seconds for ms in entry.trips_ms]
    missing = total - len(trips)
    served = Counter[str]()
    for entry in seconds:
        served.update(entry.variants)
    summary = f"{total} sent, {len(trips)} answered"
    if trips:
        p50, p95 = np.percentile(trips, [50, 95])
        summary += f", p50 {p50:.2f} ms, p95 {p95:.2f} ms"
    if served:
        summary += "; served by " + ", ".join(f"{n} {c}" for n, c in served.most_common())
    if missing:
        summary += f"; {missing} without an answer or with an error"
    return missing, summary
