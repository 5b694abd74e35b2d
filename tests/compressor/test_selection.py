"""Ladder selection on made-up measurements: budget, dominance and order."""

from __future__ import annotations

from pathlib import Path

from compressor.evaluate import Budget, Evaluation
from compressor.latency import Latency
from compressor.metrics import Fidelity
from compressor.selection import select_ladder


def _e(
    name: str,
    acc: float,
    size: int,
    latency: float,
    batch: float | None = None,
    rss: float | None = None,
    cosine: float = 0.999,
) -> Evaluation:
    return Evaluation(
        accuracy=acc,
        reference_accuracy=0.95,
        fidelity=Fidelity(cosine, cosine, 0.1, 1.0),
        name=name,
        path=Path(f"{name}.onnx"),
        size_bytes=size,
        latency=Latency(latency, batch if batch is not None else latency * 10, 64),
        peak_rss_mb=rss,
    )


def test_over_budget_variant_is_dropped() -> None:
    """A variant losing more accuracy than the budget is left out, whatever it saves."""
    evals = {"fp32": _e("fp32", 0.95, 1000, 1.0, cosine=1.0), "tiny": _e("tiny", 0.90, 10, 0.1)}
    kept, decisions = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32"]
    assert "over budget" in next(d.reason for d in decisions if d.name == "tiny")


def test_dominated_variant_is_dropped() -> None:
    """A less accurate variant that is neither faster, smaller nor lighter is left out."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, cosine=1.0),
        "int8": _e("int8", 0.95, 300, 0.5),
        "worse": _e("worse", 0.945, 310, 0.52),
    }
    kept, decisions = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32", "int8"]
    assert next(d.reason for d in decisions if d.name == "worse").startswith("dominated by int8")


def test_ladder_is_ordered_richest_first() -> None:
    """Rungs follow quality downwards, each cheaper than those above in some respect."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, cosine=1.0),
        "small": _e("small", 0.942, 200, 0.9),
        "fast": _e("fast", 0.948, 900, 0.4),
    }
    kept, _ = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32", "fast", "small"]


def test_original_stays_first_even_when_beaten() -> None:
    """A variant scoring above the original on a small set does not displace it."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, cosine=1.0),
        "lucky": _e("lucky", 0.96, 500, 0.5),
    }
    kept, _ = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32", "lucky"]


def test_noise_sized_speedup_does_not_earn_a_rung() -> None:
    """A 3% faster variant of the same size and memory is dominated (within the margin)."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, cosine=1.0),
        "same": _e("same", 0.95, 1000, 0.97, cosine=0.9999),
    }
    kept, _ = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32"]


def test_lighter_in_memory_earns_a_rung() -> None:
    """A variant no faster and no smaller on disk but using far less memory is kept."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, rss=100.0, cosine=1.0),
        "lean": _e("lean", 0.95, 1000, 1.0, rss=40.0),
    }
    kept, _ = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32", "lean"]


def test_faster_only_at_batch_earns_a_rung() -> None:
    """Being faster at the larger batch alone counts as faster."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, batch=10.0, cosine=1.0),
        "batchy": _e("batchy", 0.95, 1000, 1.0, batch=5.0),
    }
    kept, _ = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32", "batchy"]
