"""Request counters and latency percentiles per model, cheap enough for the hot path.

Workers record into a `ModelStats`; the metrics publisher (and later the policy) read
`snapshot()`. Percentiles come from the latest `window` latencies.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StatsSnapshot:
    """Counters since start and percentiles over the recent window, in milliseconds."""

    requests: int
    errors: int
    rejected: int
    expired: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "rejected": self.rejected,
            "expired": self.expired,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
        }


class ModelStats:
    """Thread-safe counters and a sliding window of latencies for one model."""

    def __init__(self, window: int = 2048) -> None:
        self._lock = threading.Lock()
        self._latencies: deque[float] = deque(maxlen=window)
        self._requests = 0
        self._errors = 0
        self._rejected = 0
        self._expired = 0

    def record(self, latency_ms: float, *, ok: bool) -> None:
        """A request ran (or failed in the model) after `latency_ms` in the agent."""
        with self._lock:
            self._requests += 1
            if ok:
                self._latencies.append(latency_ms)
            else:
                self._errors += 1

    def record_rejected(self) -> None:
        """A request was refused because the queue was full."""
        with self._lock:
            self._requests += 1
            self._rejected += 1

    def record_expired(self) -> None:
        """A request's client gave up before it ran."""
        with self._lock:
            self._requests += 1
            self._expired += 1

    def record_error(self) -> None:
        """A request addressed to this model was invalid."""
        with self._lock:
            self._requests += 1
            self._errors += 1

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            latencies = np.fromiter(self._latencies, dtype=np.float64)
            counts = (self._requests, self._errors, self._rejected, self._expired)
        if not latencies.size:
            return StatsSnapshot(*counts, p50_ms=None, p95_ms=None, p99_ms=None)
        p50, p95, p99 = (float(v) for v in np.percentile(latencies, [50, 95, 99]))
        return StatsSnapshot(*counts, p50_ms=p50, p95_ms=p95, p99_ms=p99)
