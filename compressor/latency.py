"""Latency of several variants, measured side by side so that they share the machine's noise.

Edge boards and workstations alike run other work: one variant timed after another can
look faster just because a neighbour went quiet. Rounds interleave the variants, each round
records a median, and the figure is the median over rounds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import structlog

from compressor.data import Dataset
from compressor.session import agent_batch_size, open_session

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LatencySettings:
    """How to time: thread count, the larger batch, rounds and time per measurement."""

    threads: int
    batch_size: int = field(default_factory=agent_batch_size)
    rounds: int = 5
    seconds_per_round: float = 0.15
    min_runs: int = 5


@dataclass(frozen=True)
class Latency:
    """p50 latency in milliseconds at batch 1 and at the larger batch (None if fixed-batch)."""

    batch1_ms: float
    batch_ms: float | None
    batch_size: int


def measure_latencies(
    models: Sequence[Path], sample: Dataset, settings: LatencySettings
) -> list[Latency]:
    """Time every model at batch 1 and at `settings.batch_size`, interleaved over rounds."""
    sessions = [open_session(path, settings.threads) for path in models]
    single = sample.head(1).inputs
    batched = _tiled(sample, settings.batch_size).inputs
    batchable = [_takes_any_batch(s) for s in sessions]
    samples: list[tuple[list[float], list[float]]] = [([], []) for _ in sessions]
    for session, can_batch in zip(sessions, batchable, strict=True):
        session.run(None, single)  # the first run allocates; keep it out of the figures
        if can_batch:
            session.run(None, batched)
    for round_no in range(settings.rounds):
        for index, session in enumerate(sessions):
            samples[index][0].append(_median_run(session, single, settings))
            if batchable[index]:
                samples[index][1].append(_median_run(session, batched, settings))
        log.info("latency_round", round=round_no + 1, rounds=settings.rounds, models=len(models))
    return [
        Latency(
            batch1_ms=float(np.median(one)) * 1000.0,
            batch_ms=float(np.median(many)) * 1000.0 if many else None,
            batch_size=settings.batch_size,
        )
        for one, many in samples
    ]


def _median_run(
    session: ort.InferenceSession, feed: dict[str, np.ndarray], settings: LatencySettings
) -> float:
    times: list[float] = []
    deadline = time.perf_counter() + settings.seconds_per_round
    while len(times) < settings.min_runs or time.perf_counter() < deadline:
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _tiled(sample: Dataset, rows: int) -> Dataset:
    # A small evaluation set still yields a full batch: repeat its rows.
    index = np.arange(rows) % sample.size
    return sample.rows(index)


def _takes_any_batch(session: ort.InferenceSession) -> bool:
    return all(
        arg.shape and not (isinstance(arg.shape[0], int) and arg.shape[0] > 0)
        for arg in session.get_inputs()
    )
