"""Whether stacking requests into one run pays, measured on each variant as it serves.

Stacking saves the per-run overhead of a small model many times over, and costs a CNN
that already keeps the cores busy on one row its concatenation and a longer wait for the
first request in the batch. Which one a model is shows only in its run times: a profile
keeps the time per row of the runs it has seen, by batch size (rounded down to a power of
two), and stacks only where that time beats running the requests one by one. It learns
online, from the batches that really form: no start-up cost, and figures taken under the
same load as the traffic they decide for.
"""

from __future__ import annotations

from dataclasses import dataclass

GAIN_MARGIN = 0.10
"""Stacked rows must cost this much less than single runs before requests wait for a batch:
a gain within the noise of a shared machine is no gain."""
MIN_SAMPLES = 3
"""Runs of a size measured before the profile trusts its figure (until then it tries it)."""
RECHECK_EVERY = 64
"""Decisions between two runs of the option not chosen, so that a change of load or of the
model's cost (a swap keeps its own profile) is noticed."""
SMOOTHING = 0.25
"""Weight of the newest run in the moving average of a size's cost per row."""


def size_class(rows: int) -> int:
    """The power of two at or below `rows` (1 for 0 or 1): the profile's granularity."""
    return 1 << max(0, rows.bit_length() - 1)


@dataclass(slots=True)
class _Cost:
    per_row_ms: float
    runs: int


class StackingProfile:
    """One variant's measured cost per row by batch size, and the decision to stack."""

    def __init__(self) -> None:
        self._costs: dict[int, _Cost] = {}
        self._decisions = 0

    def observe(self, rows: int, ms: float) -> None:
        """A run of `rows` rows took `ms` (for a stacked run: concatenation and split too)."""
        if rows < 1:
            return
        per_row = ms / rows
        key = size_class(rows)
        cost = self._costs.get(key)
        if cost is None:
            self._costs[key] = _Cost(per_row, 1)
        else:
            cost.per_row_ms += SMOOTHING * (per_row - cost.per_row_ms)
            cost.runs += 1

    def per_row_ms(self, rows: int) -> float | None:
        """The measured cost per row of a run of about `rows` rows, None until measured."""
        cost = self._costs.get(size_class(rows))
        return cost.per_row_ms if cost is not None and cost.runs >= MIN_SAMPLES else None

    def choose(self, single_rows: int, stacked_rows: int) -> bool:
        """Stack (True) requests of about `single_rows` rows into one run of `stacked_rows`,
        or run them one by one (False)?

        A size not yet measured is tried; once both are known, stacking must save
        GAIN_MARGIN of the time per row; every RECHECK_EVERY decisions the other option runs
        once, to keep its figure fresh.
        """
        if size_class(stacked_rows) == size_class(single_rows):
            return False  # nothing to compare: the same size class either way
        single, stacked = self.per_row_ms(single_rows), self.per_row_ms(stacked_rows)
        if stacked is None:
            return True
        if single is None:
            return False
        pays = stacked * (1.0 + GAIN_MARGIN) < single
        self._decisions += 1
        if self._decisions % RECHECK_EVERY == 0:
            return not pays
        return pays

    def pays_somewhere(self) -> bool:
        """Has stacking measurably paid at some size? (Only then may a worker wait for a
        batch to fill: waiting for no gain would be pure latency.)"""
        single = self.per_row_ms(1)
        if single is None:
            return False
        return any(
            cost.runs >= MIN_SAMPLES and cost.per_row_ms * (1.0 + GAIN_MARGIN) < single
            for size, cost in self._costs.items()
            if size > 1
        )

    def figures(self) -> dict[int, float]:
        """Measured ms per row by size class (for status and the benchmark)."""
        return {
            size: round(cost.per_row_ms, 4)
            for size, cost in sorted(self._costs.items())
            if cost.runs >= MIN_SAMPLES
        }
