"""Whether stacking requests into one run pays, measured on each variant as it serves.

Stacking saves the per-run overhead of a small model many times over, and costs a CNN
that already keeps the cores busy on one row its concatenation and a longer wait for the
first request in the batch. Which one a model is shows only in its run times: a profile
keeps the cost per row of the recent runs it has seen, by batch size (rounded down to a
power of two), and stacks only where their median beats running the requests one by one.
The cost is the run's wall time (what the waiting clients see), and a median: a run that
another process preempted must not flip the decision. It learns
online, from the batches that really form: no start-up cost, and figures taken under the
same load as the traffic they decide for.
"""

from __future__ import annotations

import statistics
from collections import deque

GAIN_MARGIN = 0.15
"""Stacked rows must cost this much less than single runs before requests are stacked:
a gain within the noise of a shared machine is no gain."""
MIN_SAMPLES = 3
"""Runs of a size measured before the profile trusts its figure (until then it tries it)."""
RECHECK_EVERY = 32
"""Decisions between two runs of the option not chosen, so that a change of load or of the
model's cost (a swap keeps its own profile) is noticed."""
RECENT_RUNS = 7
"""Runs per size whose median is the size's cost per row."""


def size_class(rows: int) -> int:
    """The power of two at or below `rows` (1 for 0 or 1): the profile's granularity."""
    return 1 << max(0, rows.bit_length() - 1)


class StackingProfile:
    """One variant's measured cost per row by batch size, and the decision to stack."""

    def __init__(self) -> None:
        self._costs: dict[int, deque[float]] = {}  # size class -> recent ms per row
        self._decisions = 0

    def observe(self, rows: int, ms: float) -> None:
        """A run of `rows` rows cost `ms` (a stacked run: its concatenation and split too)."""
        if rows >= 1:
            key = size_class(rows)
            runs = self._costs.get(key)
            if runs is None:
                runs = self._costs.setdefault(key, deque(maxlen=RECENT_RUNS))
            runs.append(ms / rows)

    def per_row_ms(self, rows: int) -> float | None:
        """The measured cost per row of a run of about `rows` rows, None until measured."""
        runs = tuple(self._costs.get(size_class(rows), ()))  # a copy: workers append
        return statistics.median(runs) if len(runs) >= MIN_SAMPLES else None

    def choose(self, single_rows: int, stacked_rows: int) -> bool:
        """Stack (True) requests of about `single_rows` rows into one run of `stacked_rows`,
        or run them one by one (False)?

        A size not yet measured is tried, unless stacking did not pay at a larger size
        (the saving per row grows with the size: it would not pay here either); once both
        are known, stacking must save GAIN_MARGIN of the time per row; every RECHECK_EVERY
        decisions the other option runs once, to keep its figure fresh.
        """
        if size_class(stacked_rows) == size_class(single_rows):
            return False  # nothing to compare: the same size class either way
        if self.per_row_ms(stacked_rows) is None:
            larger = [size for size in list(self._costs) if size > size_class(stacked_rows)]
            return not any(self.pays(single_rows, size) is False for size in larger)
        pays = self.pays(single_rows, stacked_rows)
        if pays is None:
            return False
        self._decisions += 1
        if self._decisions % RECHECK_EVERY == 0:
            return not pays
        return pays

    def pays(self, single_rows: int, stacked_rows: int) -> bool | None:
        """Does a run of `stacked_rows` rows cost GAIN_MARGIN less per row than runs of
        `single_rows`? None while either is unmeasured."""
        single, stacked = self.per_row_ms(single_rows), self.per_row_ms(stacked_rows)
        if single is None or stacked is None:
            return None
        return stacked * (1.0 + GAIN_MARGIN) < single

    def pays_somewhere(self) -> bool:
        """Has stacking measurably paid at some size? (Only then may a worker wait for a
        batch to fill: waiting for no gain would be pure latency.)"""
        return any(self.pays(1, size) for size in list(self._costs) if size > 1)

    def figures(self) -> dict[int, float]:
        """Measured ms per row by size class (for status and the benchmark)."""
        costs = {size: self.per_row_ms(size) for size in sorted(self._costs)}
        return {size: round(cost, 4) for size, cost in costs.items() if cost is not None}
