"""Choosing the ladder from measured variants: drop what misses the budget or earns no place.

A pure function of the measurements, so the rules can be tested on made-up figures. The
original is always the first rung. The others are ordered by quality (capped at the
original's: beating it on a small evaluation set is noise, not a reason to outrank it),
and each keeps its place only if it is faster, smaller or lighter in memory than every
rung above it, by a margin larger than measurement noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from compressor.evaluate import Budget, Evaluation, Quality


@dataclass(frozen=True)
class Margins:
    """How much better a rung must be to count as faster, smaller or lighter."""

    latency: float = 0.10  # relative: timing noise on a shared machine is several percent
    size: float = 0.05  # relative: file sizes are exact, but 5% is not worth a rung
    memory: float = 0.10  # relative, and at least `memory_mb`
    memory_mb: float = 1.0


@dataclass(frozen=True)
class Decision:
    """Whether a variant made the ladder, and why."""

    name: str
    kept: bool
    reason: str


def select_ladder(
    reference: str,
    evaluations: Mapping[str, Evaluation],
    budget: Budget,
    margins: Margins = Margins(),
) -> tuple[list[str], list[Decision]]:
    """The kept variants, richest first, and a decision for every variant measured."""
    ref = evaluations[reference]
    decisions: list[Decision] = [Decision(reference, True, "the original")]
    ladder = [reference]
    others = sorted(
        (e for name, e in evaluations.items() if name != reference),
        key=lambda e: (-min(e.quality, ref.quality), -e.fidelity.cosine, e.name),
    )
    for candidate in others:
        if not candidate.within(budget):
            decisions.append(Decision(candidate.name, False, over_budget_reason(candidate, budget)))
            continue
        blocker = next(
            (evaluations[r] for r in ladder if not _cheaper(candidate, evaluations[r], margins)),
            None,
        )
        if blocker is not None:
            decisions.append(
                Decision(
                    candidate.name,
                    False,
                    f"dominated by {blocker.name}: not faster, smaller or lighter",
                )
            )
            continue
        ladder.append(candidate.name)
        decisions.append(Decision(candidate.name, True, _advantage(candidate, ref)))
    return ladder, decisions


def _cheaper(candidate: Evaluation, richer: Evaluation, margins: Margins) -> bool:
    """Whether `candidate` beats `richer` on latency, file size or peak memory."""
    a, b = candidate.latency, richer.latency
    faster = a.batch1_ms < b.batch1_ms * (1 - margins.latency) or (
        a.batch_ms is not None
        and b.batch_ms is not None
        and a.batch_ms < b.batch_ms * (1 - margins.latency)
    )
    smaller = candidate.size_bytes < richer.size_bytes * (1 - margins.size)
    lighter = (
        candidate.peak_rss_mb is not None
        and richer.peak_rss_mb is not None
        and candidate.peak_rss_mb < richer.peak_rss_mb * (1 - margins.memory)
        and richer.peak_rss_mb - candidate.peak_rss_mb >= margins.memory_mb
    )
    return faster or smaller or lighter


def over_budget_reason(candidate: Quality, budget: Budget) -> str:
    """Why a variant is out: what it scored against what the budget allows."""
    if candidate.accuracy is not None and candidate.reference_accuracy is not None:
        return (
            f"over budget: accuracy {candidate.accuracy:.4f} vs {candidate.reference_accuracy:.4f}"
            f" (may lose {budget.loss:.4f})"
        )
    return f"over budget: cosine {candidate.fidelity.cosine:.4f} < {budget.min_cosine:.4f}"


def _advantage(candidate: Evaluation, ref: Evaluation) -> str:
    parts = [f"size {candidate.size_bytes / max(ref.size_bytes, 1):.2f}x"]
    parts.append(f"latency {candidate.latency.batch1_ms / ref.latency.batch1_ms:.2f}x")
    if candidate.latency.batch_ms is not None and ref.latency.batch_ms is not None:
        parts.append(
            f"batch {candidate.latency.batch_size} "
            f"{candidate.latency.batch_ms / ref.latency.batch_ms:.2f}x"
        )
    return "kept: " + ", ".join(parts)
