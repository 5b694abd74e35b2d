"""Measuring variants against the original: quality, latency, size and peak memory.

Quality is accuracy on labels when the set has them, otherwise fidelity to the original's
outputs; `Budget` turns either into the single keep-or-drop question the ladder asks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np
import structlog

from compressor.data import Dataset
from compressor.errors import DataError, UnsupportedModelError
from compressor.latency import Latency, LatencySettings, measure_latencies
from compressor.memprobe import probe_peak_rss_mb
from compressor.metrics import Fidelity, accuracy, fidelity
from compressor.session import agent_batch_size, open_session, run_dataset

log = structlog.get_logger(__name__)


class Metric(StrEnum):
    """What quality means for the model, and so what the budget is spent on."""

    AUTO = "auto"  # accuracy with labels, else cosine to the original
    ACCURACY = "accuracy"  # top-1 accuracy on the labels
    COSINE = "cosine"  # mean cosine of the outputs to the original's
    TOP1 = "top1"  # share of rows whose arg-max class agrees with the original's
    IOU = "iou"  # IoU of the probability maps thresholded at 0.5, against the original's
    BOX_IOU = "box-iou"  # mean IoU of a YOLO-style head's boxes after NMS, against the original's


@dataclass(frozen=True)
class Budget:
    """The quality a variant may lose, in the chosen metric: accuracy points, or 1 - the
    fidelity figure (cosine, top-1 agreement, map IoU)."""

    loss: float = 0.01
    metric: Metric = Metric.AUTO

    @property
    def min_cosine(self) -> float:
        """The lowest fidelity figure (cosine by default) a variant may have."""
        return 1.0 - self.loss


@dataclass(frozen=True)
class EvalSettings:
    """How variants are measured; the defaults are what the ladder uses."""

    threads: int
    batch_size: int = field(default_factory=agent_batch_size)
    rounds: int = 5
    seconds_per_round: float = 0.15
    measure_memory: bool = True

    @property
    def latency(self) -> LatencySettings:
        """The latency part of these settings."""
        return LatencySettings(
            threads=self.threads,
            batch_size=self.batch_size,
            rounds=self.rounds,
            seconds_per_round=self.seconds_per_round,
        )


@dataclass(frozen=True)
class Quality:
    """How close a variant's outputs are to the original's (and to the labels, if any)."""

    accuracy: float | None
    reference_accuracy: float | None
    fidelity: Fidelity

    @property
    def quality(self) -> float:
        """Accuracy when labels were given, otherwise mean cosine to the original."""
        return self.accuracy if self.accuracy is not None else self.fidelity.cosine

    def measure(self, metric: Metric) -> float:
        """The variant's figure in `metric` (DataError when it cannot be had)."""
        if metric is Metric.AUTO:
            return self.quality
        if metric is Metric.ACCURACY:
            if self.accuracy is None:
                raise DataError("--metric accuracy needs labels in the evaluation set")
            return self.accuracy
        if metric is Metric.COSINE:
            return self.fidelity.cosine
        value, what = {
            Metric.TOP1: (self.fidelity.top1_agreement, "a [rows, classes] output"),
            Metric.IOU: (self.fidelity.map_iou, "a map output in [0, 1]"),
            Metric.BOX_IOU: (
                self.fidelity.box_iou,
                "a YOLO-style [rows, 4 + classes, boxes] output with boxes over the threshold",
            ),
        }[metric]
        if value is None:
            raise DataError(f"--metric {metric} needs {what}")
        return value

    def within(self, budget: Budget) -> bool:
        """Whether the variant loses no more than the budget allows."""
        # A hair of float slack: the original itself must never fall out of budget.
        labelled = self.accuracy is not None and self.reference_accuracy is not None
        if budget.metric is Metric.ACCURACY or (budget.metric is Metric.AUTO and labelled):
            if self.reference_accuracy is None:
                raise DataError("--metric accuracy needs labels in the evaluation set")
            return self.reference_accuracy - self.measure(Metric.ACCURACY) <= budget.loss + 1e-9
        metric = Metric.COSINE if budget.metric is Metric.AUTO else budget.metric
        return self.measure(metric) >= budget.min_cosine - 1e-9


@dataclass(frozen=True)
class Evaluation(Quality):
    """Everything measured about one variant: quality, size, latency and peak memory."""

    name: str
    path: Path
    size_bytes: int
    latency: Latency
    peak_rss_mb: float | None


def score(
    reference: Path, variants: Mapping[str, Path], data: Dataset, threads: int
) -> dict[str, Quality]:
    """Accuracy (with labels) and fidelity to `reference` of each variant on `data`."""
    ref_outputs = run_dataset(open_session(reference, threads), data)
    ref_accuracy = accuracy(ref_outputs, data.labels) if data.labels is not None else None
    scores: dict[str, Quality] = {}
    for name, path in variants.items():
        outputs = run_dataset(open_session(path, threads), data)
        _check_same_outputs(name, ref_outputs, outputs)
        acc = accuracy(outputs, data.labels) if data.labels is not None else None
        scores[name] = Quality(acc, ref_accuracy, fidelity(ref_outputs, outputs))
        log.info("variant_scored", variant=name, accuracy=acc, cosine=scores[name].fidelity.cosine)
    return scores


def evaluate(
    reference: Path,
    variants: Mapping[str, Path],
    data: Dataset,
    settings: EvalSettings,
    scores: Mapping[str, Quality] | None = None,
) -> dict[str, Evaluation]:
    """Measure each variant against `reference` on `data` (the reference may be among them).

    Latency is measured for all variants together, interleaved; `scores` skips re-scoring
    variants whose quality is already known.
    """
    known = dict(scores or {})
    missing = {n: p for n, p in variants.items() if n not in known}
    known.update(score(reference, missing, data, settings.threads) if missing else {})
    latencies = measure_latencies(list(variants.values()), data, settings.latency)
    results: dict[str, Evaluation] = {}
    for (name, path), latency in zip(variants.items(), latencies, strict=True):
        rss = (
            probe_peak_rss_mb(path, _memory_feed(data, latency), settings.threads)
            if settings.measure_memory
            else None
        )
        quality = known[name]
        results[name] = Evaluation(
            accuracy=quality.accuracy,
            reference_accuracy=quality.reference_accuracy,
            fidelity=quality.fidelity,
            name=name,
            path=path,
            size_bytes=path.stat().st_size,
            latency=latency,
            peak_rss_mb=rss,
        )
        log.info(
            "variant_measured",
            variant=name,
            latency_ms=round(latency.batch1_ms, 4),
            batch_latency_ms=None if latency.batch_ms is None else round(latency.batch_ms, 4),
            size_bytes=results[name].size_bytes,
            peak_rss_mb=None if rss is None else round(rss, 2),
        )
    return results


def _memory_feed(data: Dataset, latency: Latency) -> dict[str, np.ndarray]:
    """A batch of the size the agent serves (one row for a model that takes no batch)."""
    if latency.batch_ms is None:
        return data.head(1).inputs
    index = np.arange(latency.batch_size) % data.size
    return data.rows(index).inputs


def _check_same_outputs(
    name: str, reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
) -> None:
    if list(reference) != list(outputs):
        raise UnsupportedModelError(
            f"variant {name!r} has outputs {list(outputs)}, the original {list(reference)}"
        )
    for key, ref in reference.items():
        if ref.shape != outputs[key].shape:
            raise UnsupportedModelError(
                f"variant {name!r}: output {key!r} has shape {list(outputs[key].shape)}, "
                f"the original {list(ref.shape)}"
            )
