"""Ladder selection on made-up measurements: budget, Pareto front, minimum step, order."""

from __future__ import annotations

import itertools
from pathlib import Path

from compressor.evaluate import Budget, Evaluation
from compressor.latency import Latency
from compressor.metrics import Fidelity
from compressor.selection import Rules, select_ladder


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
        latency=Latency(latency, batch if batch is not None else latency * 10, 32),
        peak_rss_mb=rss,
    )


def test_over_budget_variant_is_dropped() -> None:
    """A variant losing more accuracy than the budget is left out, whatever it saves."""
    evals = {"fp32": _e("fp32", 0.95, 1000, 1.0, cosine=1.0), "tiny": _e("tiny", 0.90, 10, 0.1)}
    kept, decisions = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32"]
    assert "over budget" in next(d.reason for d in decisions if d.name == "tiny")


def test_variant_not_a_step_cheaper_is_dropped() -> None:
    """A less accurate variant only 4% faster than the rung above it earns no place."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, cosine=1.0),
        "int8": _e("int8", 0.95, 300, 0.5),
        "worse": _e("worse", 0.945, 310, 0.48),
    }
    kept, decisions = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32", "int8"]
    assert next(d.reason for d in decisions if d.name == "worse").startswith("no step")


def test_smaller_but_slower_variant_earns_no_rung() -> None:
    """An fp16-like variant half the size but slower and heavier is not a rung."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, rss=20.0, cosine=1.0),
        "fp16": _e("fp16", 0.95, 500, 1.2, rss=22.0),
    }
    kept, _ = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32"]


def test_ladder_is_ordered_richest_first_each_a_step_cheaper() -> None:
    """Rungs follow quality downwards and each is 15% cheaper than all above in some cost."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, cosine=1.0),
        "a": _e("a", 0.949, 900, 0.8),
        "b": _e("b", 0.948, 900, 0.75),  # only 6% below a
        "c": _e("c", 0.946, 200, 0.5),
    }
    kept, _ = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32", "a", "c"]


def test_equal_quality_twin_that_costs_more_is_dropped() -> None:
    """Of two variants with the same accuracy and fidelity, the slower is off the front."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, cosine=1.0),
        "twin-slow": _e("twin-slow", 0.95, 900, 0.7),
        "twin-fast": _e("twin-fast", 0.95, 900, 0.4),
    }
    kept, _ = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32", "twin-fast"]


def test_accuracy_ties_rank_by_fidelity() -> None:
    """Two variants at the original's accuracy both stay, the closer one to it first."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, cosine=1.0),
        "close": _e("close", 0.96, 900, 0.5, cosine=0.9999),
        "far": _e("far", 0.97, 900, 0.1, cosine=0.999),
    }
    kept, _ = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32", "close", "far"]


def test_original_stays_first_even_when_beaten() -> None:
    """A variant scoring above the original on a small set does not displace it."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, cosine=1.0),
        "lucky": _e("lucky", 0.96, 500, 0.5),
    }
    kept, _ = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32", "lucky"]


def test_lighter_in_memory_earns_a_rung() -> None:
    """A variant no faster but using far less memory is kept, for memory pressure."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, rss=100.0, cosine=1.0),
        "lean": _e("lean", 0.95, 1000, 1.0, rss=40.0),
    }
    kept, decisions = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32", "lean"]
    assert "memory" in next(d.reason for d in decisions if d.name == "lean")


def test_memory_step_must_be_a_megabyte() -> None:
    """A 30% memory saving worth less than 1 MB is noise, not a rung."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, rss=2.0, cosine=1.0),
        "lean": _e("lean", 0.95, 1000, 1.0, rss=1.4),
    }
    kept, _ = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32"]


def test_faster_only_at_batch_earns_a_rung() -> None:
    """Being a step faster at the agent's batch size alone relieves that cost."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, batch=10.0, cosine=1.0),
        "batchy": _e("batchy", 0.95, 1000, 1.0, batch=5.0),
    }
    kept, _ = select_ladder("fp32", evals, Budget(0.01))
    assert kept == ["fp32", "batchy"]


def test_max_rungs_keeps_the_biggest_steps() -> None:
    """With more qualifying variants than allowed, the smallest inner steps are cut."""
    evals = {"fp32": _e("fp32", 0.95, 1000, 1.0, cosine=1.0)}
    for i in range(1, 9):
        evals[f"v{i}"] = _e(f"v{i}", 0.95 - i * 0.001, 1000, 0.8**i)
    kept, decisions = select_ladder("fp32", evals, Budget(0.01), Rules(max_rungs=4))
    assert len(kept) <= 4
    assert kept[0] == "fp32"
    assert kept[-1] == "v8"  # the lightest qualifying variant stays
    latencies = [evals[n].latency.batch1_ms for n in kept]
    assert all(b <= a * 0.85 for a, b in itertools.pairwise(latencies))
    assert sum(d.kept for d in decisions) == len(kept)


def test_min_step_is_configurable() -> None:
    """A 10% faster variant is a rung at min_step 0.05 and not at the default."""
    evals = {
        "fp32": _e("fp32", 0.95, 1000, 1.0, cosine=1.0),
        "bit": _e("bit", 0.95, 1000, 0.9),
    }
    assert select_ladder("fp32", evals, Budget(0.01))[0] == ["fp32"]
    assert select_ladder("fp32", evals, Budget(0.01), Rules(min_step=0.05))[0] == ["fp32", "bit"]
