"""Request counters and latency figures per model and per variant, cheap enough for the hot
path.

Workers record every finished request *before* its reply is sent, so that anyone who has
the reply can read its figures. Each record carries its monotonic time: the policy and the
metrics ask for figures over the last N seconds, not the last N requests. A model's stats
belong to its name, not to one load of it: they survive reloads and variant swaps.
"""

from __future__ import annotations

import threading
import time
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


@dataclass(frozen=True)
class VariantFigures:
    """One variant's requests over a recent time window (milliseconds, requests/s)."""

    variant: str
    window_s: float
    count: int
    p50_ms: float | None
    p95_ms: float | None
    infer_p50_ms: float | None
    infer_p95_ms: float | None
    queue_p95_ms: float | None
    mean_rows: float | None
    probes: int
    """How many of `count` were the agent's own probe runs (no client waiting)."""

    def as_dict(self) -> dict[str, float | int | str | None]:
        return {
            "count": self.count,
            "probes": self.probes,
            "p50_ms": _round(self.p50_ms),
            "p95_ms": _round(self.p95_ms),
            "infer_p50_ms": _round(self.infer_p50_ms),
            "infer_p95_ms": _round(self.infer_p95_ms),
            "queue_p95_ms": _round(self.queue_p95_ms),
            "mean_rows": _round(self.mean_rows),
        }


# One record: (monotonic end, total ms, inference ms, queue ms, rows, probe?, requests ahead)
_Record = tuple[float, float, float, float, int, bool, int]


class ModelStats:
    """Thread-safe counters and timestamped latencies of one model, per variant."""

    def __init__(self, window: int = 2048) -> None:
        self._lock = threading.Lock()
        self._window = window
        self._latencies: deque[float] = deque(maxlen=window)
        self._by_variant: dict[str, deque[_Record]] = {}
        self._arrivals: deque[float] = deque(maxlen=window)
        self._requests = 0
        self._errors = 0
        self._rejected = 0
        self._expired = 0

    def arrived(self, now: float | None = None) -> None:
        """A request for this model was accepted into its queue (for the arrival rate)."""
        # No lock: one per request is enough (record's). A deque's append and its copy
        # into a tuple are each one step under the GIL, so readers copy it before reading.
        self._arrivals.append(time.monotonic() if now is None else now)

    def record(
        self,
        latency_ms: float,
        *,
        ok: bool,
        variant: str | None = None,
        infer_ms: float = 0.0,
        queue_ms: float = 0.0,
        rows: int = 1,
        ahead: int = 0,
    ) -> None:
        """A request ran (or failed in the model) after `latency_ms` in the agent, `ahead`
        others having had to finish before it could start."""
        now = time.monotonic()
        with self._lock:
            self._requests += 1
            if not ok:
                self._errors += 1
                return
            self._latencies.append(latency_ms)
            if variant is not None:
                self._log(variant).append(
                    (now, latency_ms, infer_ms, queue_ms, rows, False, ahead)
                )

    def record_probe(self, variant: str, infer_ms: float, rows: int = 1) -> None:
        """The agent ran `variant` itself to measure it (no client, not counted as a request)."""
        now = time.monotonic()
        with self._lock:
            self._log(variant).append((now, infer_ms, infer_ms, 0.0, rows, True, 0))

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

    def arrival_rate(self, window_s: float, now: float | None = None) -> float:
        """Requests accepted per second over the last `window_s` seconds."""
        now = time.monotonic() if now is None else now
        recent = sum(1 for t in tuple(self._arrivals) if now - t <= window_s)
        return recent / window_s if window_s > 0 else 0.0

    def variant_figures(
        self, variant: str, window_s: float, now: float | None = None
    ) -> VariantFigures:
        """`variant`'s latencies over the last `window_s` seconds."""
        return self.variant_window(variant, window_s, now)[0]

    def variant_samples(
        self, variant: str, window_s: float, now: float | None = None
    ) -> np.ndarray:
        """`variant`'s requests over the last `window_s` seconds, one row each, in ms: the
        time that was neither inference nor queue wait (handing over, recording), the
        inference, the queue wait, and the requests that were ahead of it in the queue.
        Shape (n, 4)."""
        return self.variant_window(variant, window_s, now)[1]

    def variant_window(
        self, variant: str, window_s: float, now: float | None = None
    ) -> tuple[VariantFigures, np.ndarray]:
        """Both of the above from one pass over the records: the adapter reads them on
        every tick, and under load that is 2048 records, a copy of which holds the
        interpreter from the threads that serve."""
        now = time.monotonic() if now is None else now
        with self._lock:
            log = self._by_variant.get(variant)
            records = list(log) if log else []
        # Records are in time order: the window is a tail.
        first = len(records)
        while first > 0 and now - records[first - 1][0] <= window_s:
            first -= 1
        records = records[first:]
        if not records:
            empty = VariantFigures(variant, window_s, 0, None, None, None, None, None, None, 0)
            return empty, np.empty((0, 4), dtype=np.float64)
        data = np.array(records, dtype=np.float64)
        total, infer, queued, rows, probes, ahead = (data[:, i] for i in range(1, 7))
        p50, p95 = (float(v) for v in np.percentile(total, [50, 95]))
        i50, i95 = (float(v) for v in np.percentile(infer, [50, 95]))
        figures = VariantFigures(
            variant,
            window_s,
            len(records),
            p50,
            p95,
            i50,
            i95,
            float(np.percentile(queued, 95)),
            float(rows.mean()),
            int(probes.sum()),
        )
        rest = np.maximum(0.0, total - infer - queued)
        return figures, np.column_stack((rest, infer, queued, ahead))

    def variant_counts(
        self, variant: str, window_s: float, now: float | None = None
    ) -> tuple[int, int]:
        """(requests, of which probes) of `variant` over the last `window_s` seconds,
        without building arrays: what the adapter needs to know whether to probe."""
        now = time.monotonic() if now is None else now
        with self._lock:
            log = self._by_variant.get(variant)
            records = list(log) if log else []
        count = probes = 0
        for record in reversed(records):
            if now - record[0] > window_s:
                break
            count += 1
            probes += record[5]
        return count, probes

    def variants_seen(self) -> list[str]:
        with self._lock:
            return sorted(self._by_variant)

    def _log(self, variant: str) -> deque[_Record]:
        log = self._by_variant.get(variant)
        if log is None:
            log = self._by_variant[variant] = deque(maxlen=self._window)
        return log


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
