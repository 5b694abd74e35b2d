"""Choosing the ladder from measured variants: only real choices for an adapting agent.

A pure function of the measurements, so the rules can be tested on made-up figures. The
original is always the first rung. The others are taken in quality order (capped at the
original's: beating it on a small evaluation set is noise, not a reason to outrank it) and
a variant keeps a place only if it relieves a cost: it is on the Pareto front of quality
against that cost and at least `min_step` cheaper in it than every richer rung. The costs
are the ones the agent's policy steps down for: latency at batch 1, latency at the batch
size the agent serves, and peak memory. File size alone earns no rung (an fp16 copy that
is smaller but slower would make a policy that steps down for CPU do worse).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from compressor.evaluate import Budget, Evaluation, Quality

DEFAULT_MIN_STEP = 0.15
DEFAULT_MAX_RUNGS = 6


class Cost(StrEnum):
    """A resource a lighter rung can relieve."""

    LATENCY = "latency"  # p50 at batch 1
    BATCH_LATENCY = "batch_latency"  # p50 at the agent's batch size
    MEMORY = "memory"  # peak RSS of load + one run at that batch size


_COSTS: dict[Cost, Callable[[Evaluation], float | None]] = {
    Cost.LATENCY: lambda e: e.latency.batch1_ms,
    Cost.BATCH_LATENCY: lambda e: e.latency.batch_ms,
    Cost.MEMORY: lambda e: e.peak_rss_mb,
}


@dataclass(frozen=True)
class Rules:
    """How much cheaper a rung must be, and how many rungs a ladder may have."""

    min_step: float = DEFAULT_MIN_STEP  # relative, in the cost the rung relieves
    max_rungs: int = DEFAULT_MAX_RUNGS
    memory_mb: float = 1.0  # a memory step must also be this large: RSS is noisy in MiB

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_step < 1.0:
            raise ValueError(f"min_step must be in [0, 1), got {self.min_step}")
        if self.max_rungs < 1:
            raise ValueError(f"max_rungs must be at least 1, got {self.max_rungs}")


@dataclass(frozen=True)
class Decision:
    """Whether a variant made the ladder, and why."""

    name: str
    kept: bool
    reason: str


def cost_of(evaluation: Evaluation, cost: Cost) -> float | None:
    """The measured figure of one cost (None when it was not measured)."""
    return _COSTS[cost](evaluation)


def select_ladder(
    reference: str,
    evaluations: Mapping[str, Evaluation],
    budget: Budget,
    rules: Rules = Rules(),
) -> tuple[list[str], list[Decision]]:
    """The kept variants, richest first, and a decision for every variant measured.

    When more than `rules.max_rungs` qualify, the inner rung with the smallest step is cut,
    one at a time: the ladder keeps its original, its lightest rung and its biggest steps.
    """
    ladder, decisions = _select(reference, evaluations, budget, rules)
    cut: dict[str, str] = {}
    while len(ladder) > max(rules.max_rungs, 2):
        steps = {
            name: _best_step(evaluations[name], [evaluations[r] for r in ladder[:i]], rules)
            for i, name in enumerate(ladder[1:-1], start=1)
        }
        smallest = max(steps, key=lambda n: (steps[n], n))
        ladder.remove(smallest)
        cut[smallest] = (
            f"cut: its step ({steps[smallest]:.2f}x) was the smallest of a ladder longer "
            f"than {rules.max_rungs} rungs"
        )
    if len(ladder) > rules.max_rungs:  # max_rungs 1: the original alone
        cut |= {n: f"cut: at most {rules.max_rungs} rung" for n in ladder[rules.max_rungs :]}
        ladder = ladder[: rules.max_rungs]
    decisions = [Decision(d.name, False, cut[d.name]) if d.name in cut else d for d in decisions]
    return ladder, decisions


def _best_step(candidate: Evaluation, richer: Sequence[Evaluation], rules: Rules) -> float:
    ratios = [r for cost in Cost if (r := _step_ratio(candidate, richer, cost, rules)) is not None]
    return min(ratios, default=1.0)


def _select(
    reference: str,
    evaluations: Mapping[str, Evaluation],
    budget: Budget,
    rules: Rules,
) -> tuple[list[str], list[Decision]]:
    ref = evaluations[reference]
    decisions: list[Decision] = [Decision(reference, True, "the original")]
    ladder = [reference]
    within = [e for n, e in evaluations.items() if n != reference and e.within(budget)]
    for name, e in evaluations.items():
        if name != reference and not e.within(budget):
            decisions.append(Decision(name, False, over_budget_reason(e, budget)))
    for candidate in sorted(within, key=lambda e: _rank(e, ref)):
        relieved = {
            cost: ratio
            for cost in Cost
            if (ratio := _step_ratio(candidate, [evaluations[r] for r in ladder], cost, rules))
            is not None
            and ratio <= 1.0 - rules.min_step
            and not _dominated(candidate, within, ref, cost)
        }
        if not relieved:
            decisions.append(
                Decision(
                    candidate.name, False, _no_step(candidate, ladder, evaluations, rules.min_step)
                )
            )
            continue
        ladder.append(candidate.name)
        decisions.append(Decision(candidate.name, True, _advantage(candidate, ref, relieved)))
    return ladder, decisions


def _rank(e: Evaluation, ref: Evaluation) -> tuple[float, float, str]:
    quality, cosine = _standing(e, ref)
    return (-quality, -cosine, e.name)


def _step_ratio(
    candidate: Evaluation, richer: Sequence[Evaluation], cost: Cost, rules: Rules
) -> float | None:
    """The candidate's cost over the cheapest richer rung's, or None if not comparable."""
    mine = cost_of(candidate, cost)
    theirs = [c for r in richer if (c := cost_of(r, cost)) is not None]
    if mine is None or not theirs or min(theirs) <= 0:
        return None
    cheapest = min(theirs)
    if cost is Cost.MEMORY and cheapest - mine < rules.memory_mb:
        return None
    return mine / cheapest


def _dominated(
    candidate: Evaluation, others: Sequence[Evaluation], ref: Evaluation, cost: Cost
) -> bool:
    """Whether another variant stands at least as high and is strictly cheaper in `cost`.

    Only exact ties in standing matter here: a better-and-cheaper variant comes first in
    quality order and already takes the step away.
    """
    mine = cost_of(candidate, cost)
    assert mine is not None
    for other in others:
        theirs = cost_of(other, cost)
        if other.name == candidate.name or theirs is None:
            continue
        if _standing(other, ref) >= _standing(candidate, ref) and theirs < mine:
            return True
    return False


def _standing(e: Evaluation, ref: Evaluation) -> tuple[float, float]:
    """Quality capped at the original's, then fidelity: variants that tie on accuracy (a
    small evaluation set gives ties and noise) rank by how closely they follow the original."""
    return (min(e.quality, ref.quality), e.fidelity.cosine)


def over_budget_reason(candidate: Quality, budget: Budget) -> str:
    """Why a variant is out: what it scored against what the budget allows."""
    if candidate.accuracy is not None and candidate.reference_accuracy is not None:
        return (
            f"over budget: accuracy {candidate.accuracy:.4f} vs {candidate.reference_accuracy:.4f}"
            f" (may lose {budget.loss:.4f})"
        )
    return f"over budget: cosine {candidate.fidelity.cosine:.4f} < {budget.min_cosine:.4f}"


def _no_step(
    candidate: Evaluation,
    ladder: Sequence[str],
    evaluations: Mapping[str, Evaluation],
    step: float,
) -> str:
    parts = []
    for cost in Cost:
        mine = cost_of(candidate, cost)
        theirs = [c for r in ladder if (c := cost_of(evaluations[r], cost)) is not None]
        if mine is not None and theirs:
            parts.append(f"{cost} {mine / min(theirs):.2f}x")
    where = ", ".join(parts) or "no cost measured"
    return f"no step: not {step:.0%} cheaper than every richer rung in any cost ({where})"


def _advantage(candidate: Evaluation, ref: Evaluation, relieved: Mapping[Cost, float]) -> str:
    steps = ", ".join(f"{cost} {ratio:.2f}x" for cost, ratio in relieved.items())
    parts = [f"latency {candidate.latency.batch1_ms / ref.latency.batch1_ms:.2f}x"]
    if candidate.latency.batch_ms is not None and ref.latency.batch_ms is not None:
        parts.append(
            f"batch {candidate.latency.batch_size} "
            f"{candidate.latency.batch_ms / ref.latency.batch_ms:.2f}x"
        )
    if candidate.peak_rss_mb is not None and ref.peak_rss_mb:
        parts.append(f"memory {candidate.peak_rss_mb / ref.peak_rss_mb:.2f}x")
    return f"kept: relieves {steps} (vs the next richer rung); " + ", ".join(parts) + " of original"
