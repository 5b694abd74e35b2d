"""Time a written ladder again, on the device that will serve it.

The latencies in a manifest are what the compressor measured on the machine it ran on, at
the load that machine had. The agent's policy reads them as the variants' relative costs
(it scales them by the slowdown it observes), and derives a model's default objective from
the richest one: a ladder built on a workstation, or on a busy build machine, should be
timed again where it runs. `retime` measures every ONNX variant of a model folder side by
side (compressor.latency: interleaved rounds, the quietest round's median) and rewrites
the latency figures of its manifest, atomically, leaving everything else as it was.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from agent.datatypes import NUMPY_DTYPES
from agent.manifest import (
    MANIFEST_FILE,
    Manifest,
    TensorSpec,
    Variant,
    read_manifest,
    write_manifest,
)
from compressor.data import Dataset
from compressor.errors import DataError
from compressor.latency import LatencySettings, measure_latencies

log = structlog.get_logger(__name__)

BUSY_LOAD_PER_CPU = 0.5
"""A load average above this share of the CPUs makes the figures suspect (said, not refused:
on a board that always runs other work, that work is part of the cost)."""


@dataclass(frozen=True)
class Retimed:
    """One variant's batch-1 latency before and after (None: not timed, e.g. a .tflite)."""

    name: str
    before_ms: float | None
    after_ms: float | None


def zeros_for(inputs: Sequence[TensorSpec], rows: int = 1) -> Dataset:
    """`rows` rows of zeros for every input, free dimensions taken as 1 (a dense net costs
    the same on zeros as on data; pass a sample where it does not)."""
    arrays: dict[str, np.ndarray] = {}
    for spec in inputs:
        shape = [rows] + [d if d > 0 else 1 for d in spec.shape[1:]]
        arrays[spec.name] = np.zeros(shape, dtype=NUMPY_DTYPES[spec.datatype])
    return Dataset(arrays)


def busy_load() -> float | None:
    """The 1-minute load average per CPU, when it is high enough to distort timings."""
    per_cpu = os.getloadavg()[0] / max(1, os.cpu_count() or 1)
    return per_cpu if per_cpu > BUSY_LOAD_PER_CPU else None


def retime(folder: Path, settings: LatencySettings, sample: Dataset | None = None) -> list[Retimed]:
    """Measure every ONNX variant of `folder` again and rewrite its manifest's latency
    figures (`latency_ms`, `batch_latency_ms` and their ratios to the first variant)."""
    manifest = read_manifest(folder / MANIFEST_FILE)
    timed = [v for v in manifest.variants if v.file.endswith(".onnx")]
    if not timed:
        raise DataError(f"{folder}: no ONNX variant to time")
    data = sample if sample is not None else zeros_for(manifest.inputs)
    load = busy_load()
    if load is not None:
        log.warning("machine_busy", load_per_cpu=round(load, 2), note="timings may be high")
    latencies = dict(
        zip(
            (v.name for v in timed),
            measure_latencies([folder / v.file for v in timed], data, settings),
            strict=True,
        )
    )
    reference = latencies.get(manifest.variants[0].name)
    variants: list[Variant] = []
    report: list[Retimed] = []
    for variant in manifest.variants:
        latency = latencies.get(variant.name)
        report.append(
            Retimed(
                variant.name,
                variant.metrics.latency_ms,
                latency.batch1_ms if latency is not None else None,
            )
        )
        if latency is None:
            variants.append(variant)
            continue
        figures = variant.metrics.model_dump()
        figures["latency_ms"] = latency.batch1_ms
        if reference is not None:
            figures["latency_ratio"] = latency.batch1_ms / reference.batch1_ms
        if latency.batch_ms is not None:
            figures["batch_latency_ms"] = latency.batch_ms
            figures["batch_size"] = float(latency.batch_size)
            if reference is not None and reference.batch_ms is not None:
                figures["batch_latency_ratio"] = latency.batch_ms / reference.batch_ms
        metrics = type(variant.metrics).model_validate(figures)
        variants.append(variant.model_copy(update={"metrics": metrics}))
    updated: Manifest = manifest.model_copy(update={"variants": variants})
    write_manifest(Manifest.model_validate(updated.model_dump()), folder / MANIFEST_FILE)
    log.info("ladder_retimed", folder=str(folder), variants=len(timed))
    return report
