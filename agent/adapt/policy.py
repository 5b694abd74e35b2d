"""The swap policy: a pure function from what was measured to the variant each model should
serve, with the reasons.

    decide(history, models, config, state, now) -> (decisions, new state)

It chooses by measured figures, never by position in the ladder:
- latency (or CPU) pressure: the most accurate variant predicted to meet the model's
  objective, the prediction scaling the active variant's observed p95 by each variant's
  measured latency; only variants measured cheaper in latency are candidates;
- memory pressure: across all models, the moves that lose the least accuracy per MB freed,
  until the headroom is back; only variants measured lighter in memory are candidates;
- thermal pressure: one step to a variant measured cheaper in latency.
Down fast (pressure held `down_after_s`: the latency over the objective, or the CPU short
while it is over; or at once when the queue alone holds more work than the objective
allows; skipping rungs when the prediction says so), up slow (calm held `up_after_s`, one
rung at a time, `cooldown_s` after any swap). Pins always win;
a variant that failed to load waits out a backoff.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from agent.adapt.snapshot import ResourceSnapshot
from agent.config import AdaptConfig

Predicate = Callable[[ResourceSnapshot], bool]

DEFAULT_TRIP_C = 80.0
MAX_BACKOFF_DOUBLINGS = 6
NEAR_LIGHTEST = 0.05
"""When no rung meets the objective: one predicted within this share of the lightest's p95
is as good a step, and the most accurate of them is taken."""


@dataclass(frozen=True)
class RungView:
    """One variant of a ladder as the policy sees it: what it is worth and what it costs."""

    name: str
    quality: float
    """Accuracy on labels, else fidelity, else minus its ladder position."""
    latency_ms: float | None
    """Measured latency at batch 1 (the manifest's); None: not a candidate for CPU relief."""
    memory_mb: float | None
    """Resident memory it adds (measured by the agent, else the manifest's); None: not a
    candidate for memory relief."""
    failures: int = 0
    failed_at: float | None = None


@dataclass(frozen=True)
class ModelView:
    """One served model at decision time."""

    name: str
    rungs: tuple[RungView, ...]  # quality order, richest first
    active: str | None
    slo_p95_ms: float | None
    observed_p95_ms: float | None = None
    """The active variant's p95 in the agent over the latency window."""
    observed_infer_p95_ms: float | None = None
    observed_queue_p95_ms: float | None = None
    observed_count: int = 0
    queued: int = 0
    """Requests waiting in the model's queue right now."""
    service_ms: float | None = None
    """The active variant's observed time per request, shared by the workers: its p50
    inference time per row divided by the workers. None: not measured."""
    arrival_per_s: float | None = None
    """Requests accepted per second, lately."""
    pinned: str | None = None
    fleet: bool = False
    last_swap_at: float | None = None
    samples: np.ndarray | None = None
    """The active variant's requests over the latency window, a row each: the rest of
    its time (neither inference nor queue wait), its inference and its queue wait, in ms,
    and how many requests were ahead of it (`ModelStats.variant_samples`). None: only the
    p95 figures above are known."""
    transport_ms: float = 0.0
    """What the broker adds to a client's round trip now (the agent's echo through it,
    `agent.mqtt.echo`), when only a figure is known: added to every observed and
    predicted p95, since the objective is the round trip its clients see. 0: not
    measured, or not counted."""
    trips: np.ndarray | None = None
    """The echoes' round trips over the latency window (ms): with `samples`, a request's
    two trips through the broker (there and back) are added as distributions, not as
    p95s (`with_trips_p95`), and `transport_ms` is not used."""

    @cached_property
    def seen_p95_ms(self) -> float | None:
        """The p95 a client sees: the agent's, with the broker's share."""
        if self.observed_p95_ms is None:
            return None
        if self.samples is not None and len(self.samples) and self.trips is not None:
            return with_trips_p95(self.samples[:, :3].sum(axis=1), self.both_trips)
        return self.observed_p95_ms + self.transport_ms

    @cached_property
    def both_trips(self) -> np.ndarray:
        """`two_trips` of `trips`, once per view."""
        assert self.trips is not None
        return two_trips(self.trips)

    @property
    def broker_share_ms(self) -> float:
        """How much of the client's p95 is the broker's, for the explanations."""
        seen = self.seen_p95_ms
        if seen is None or self.observed_p95_ms is None:
            return self.transport_ms
        return max(0.0, seen - self.observed_p95_ms)

    def rung(self, name: str | None) -> RungView | None:
        return next((r for r in self.rungs if r.name == name), None)

    @property
    def backlog_ms(self) -> float | None:
        """The work queued for the active variant: how long its queue takes to drain."""
        return None if self.service_ms is None else self.queued * self.service_ms

    @property
    def utilization(self) -> float | None:
        """The share of the workers' time that today's arrivals take on the active variant:
        at 1 or more its queue grows without bound."""
        if self.service_ms is None or self.arrival_per_s is None:
            return None
        return self.arrival_per_s * self.service_ms / 1000.0


@dataclass(frozen=True)
class ModelState:
    """What the policy remembers of one model between decisions."""

    over_since: float | None = None
    """Since when the observed p95 has been over the objective (continuously)."""
    calm_since: float | None = None
    """Since when the model has been within its objective with margin."""
    shedding: bool = False
    swamped_rate: float | None = None
    """The arrival rate (requests/s) when a queue last swamped the model: evidence that its
    clients do not wait for replies, so that a richer rung's utilization can be read off
    today's arrivals. Forgotten once they fall below half of it."""


@dataclass(frozen=True)
class PolicyState:
    models: Mapping[str, ModelState] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """What the policy wants for one model, and why."""

    model: str
    active: str | None
    desired: str | None
    reason: str
    """One word: pinned, latency, cpu, memory, thermal, calm, hold, disabled, unknown."""
    explanation: str
    figures: dict[str, Any]
    predicted_p95_ms: dict[str, float | None]
    shed_fleet: bool = False

    @property
    def swap(self) -> bool:
        return self.desired is not None and self.desired != self.active

    def as_dict(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "desired": self.desired,
            "reason": self.reason,
            "explanation": self.explanation,
            "figures": self.figures,
            "predicted_p95_ms": {k: _r(v) for k, v in self.predicted_p95_ms.items()},
            "shed_fleet": self.shed_fleet,
        }


@dataclass(frozen=True)
class BoardSignals:
    """The board's state over the recent history, as the rules read it."""

    cpu_contended: bool
    cpu_calm: bool
    memory_short: bool
    memory_calm: bool
    thermal: bool
    thermal_calm: bool
    headroom_mb: float | None
    figures: dict[str, Any]


def objective(
    view_rungs: Sequence[RungView],
    declared: float | None,
    cfg: AdaptConfig,
    richest_here_ms: float | None = None,
) -> float | None:
    """The model's p95 objective: declared, else `slo_factor` times its richest rung's
    latency — the manifest's, or what this device measured when that is lower (a manifest
    timed on a slower or busier machine must not make the objective loose)."""
    if declared is not None:
        return declared
    richest = view_rungs[0].latency_ms if view_rungs else None
    if richest_here_ms is not None:
        richest = richest_here_ms if richest is None else min(richest, richest_here_ms)
    if richest is None:
        return None
    return max(cfg.slo_min_ms, cfg.slo_factor * richest)


def board_signals(
    history: Sequence[ResourceSnapshot], cfg: AdaptConfig, now: float
) -> BoardSignals:
    """Read the pressure signals from the history: held ones for going down, calm over a
    whole window for going up."""
    if not history:
        return BoardSignals(False, True, False, True, False, True, None, {})
    latest = history[-1]
    trip = cfg.temperature_c
    if trip is None:
        trip = (
            latest.cpu_temperature_max_c - 5.0
            if latest.cpu_temperature_max_c is not None
            else DEFAULT_TRIP_C
        )

    def contended(s: ResourceSnapshot) -> bool:
        return cpu_contended(s, cfg)

    def short(s: ResourceSnapshot) -> bool:
        return _memory_short(s, cfg)

    def hot(s: ResourceSnapshot) -> bool:
        return s.cpu_temperature_c is not None and s.cpu_temperature_c >= trip

    def roomy(s: ResourceSnapshot) -> bool:
        return s.memory_headroom_mb >= cfg.memory_calm_mb and not short(s)

    down = cfg.down_after_s
    up = cfg.up_after_s
    figures: dict[str, Any] = {
        "system_cpu_percent": round(latest.system_cpu_percent, 1),
        "others_cpu_percent": round(_others_cpu(latest), 1),
        "memory_headroom_mb": round(latest.memory_headroom_mb, 1),
    }
    for name in (
        "psi_cpu_some_avg10",
        "psi_memory_some_avg10",
        "cgroup_cpu_throttled_ratio",
        "cgroup_memory_events",
        "cpu_temperature_c",
        "cpu_freq_mhz",
    ):
        value = getattr(latest, name)
        if value is not None:
            figures[name] = round(value, 3) if isinstance(value, float) else value
    return BoardSignals(
        cpu_contended=held(history, contended, down, now),
        cpu_calm=throughout(history, lambda s: not contended(s), up, now),
        memory_short=held(history, short, down, now),
        memory_calm=throughout(history, roomy, up, now),
        thermal=held(history, hot, down, now),
        thermal_calm=throughout(history, lambda s: not hot(s), up, now),
        headroom_mb=latest.memory_headroom_mb,
        figures=figures,
    )


def held(history: Sequence[ResourceSnapshot], pred: Predicate, window: float, now: float) -> bool:
    """`pred` true for the latest sample and for at least 80% of those in the last
    `window` seconds, the history covering that window: a spike or a signal oscillating
    around its threshold does not count as held."""
    if not history or not pred(history[-1]):
        return False
    recent = [s for s in history if now - s.monotonic <= window]
    if window > 0 and now - history[0].monotonic < window:
        return False  # not watched for long enough yet
    if not recent:
        return True
    return sum(1 for s in recent if pred(s)) >= 0.8 * len(recent)


def throughout(
    history: Sequence[ResourceSnapshot], pred: Predicate, window: float, now: float
) -> bool:
    """`pred` true for every sample of the last `window` seconds, the history covering it."""
    if not history:
        return True
    if now - history[0].monotonic < window:
        return False
    return all(pred(s) for s in history if now - s.monotonic <= window)


def _others_cpu(s: ResourceSnapshot) -> float:
    """CPU taken by everything but the agent, in percent of all cores."""
    own = s.process_cpu_percent / max(1, s.cpu_count)
    return max(0.0, s.system_cpu_percent - own)


def cpu_contended(s: ResourceSnapshot, cfg: AdaptConfig) -> bool:
    """One sample says the CPU is short: throttled, under pressure, or taken by others."""
    if (
        s.cgroup_cpu_throttled_ratio is not None
        and s.cgroup_cpu_throttled_ratio >= cfg.throttled_ratio
    ):
        return True
    if s.psi_cpu_some_avg10 is not None and s.psi_cpu_some_avg10 >= cfg.psi_cpu_some:
        return True
    # Above the figure, as configured: 100 then turns this signal off, where at or above it
    # would still fire on a board that others keep saturated whenever the agent was idle.
    return _others_cpu(s) > cfg.cpu_busy_percent


def _memory_short(s: ResourceSnapshot, cfg: AdaptConfig) -> bool:
    if s.memory_headroom_mb < cfg.memory_low_mb:
        return True
    if s.cgroup_memory_events:
        return True
    return s.psi_memory_some_avg10 is not None and s.psi_memory_some_avg10 >= cfg.psi_memory_some


def in_backoff(rung: RungView, cfg: AdaptConfig, now: float) -> bool:
    """A variant that failed to load waits `retry_after_s`, doubled for each failure."""
    if rung.failed_at is None or rung.failures <= 0:
        return False
    wait = cfg.retry_after_s * float(2 ** min(rung.failures - 1, MAX_BACKOFF_DOUBLINGS))
    return now - rung.failed_at < wait


def predict(view: ModelView) -> dict[str, float | None]:
    """Each rung's p95 under today's conditions, from the active variant's requests: each
    request's time computing and waiting in the queue scales with the rung's measured
    latency (a faster variant drains the queue faster too) — but of the queue wait only
    its backlog, the requests ahead of it (`_split_wait`); the rest of it (a worker's
    wake-up, the agent's own work) stays as it is; the p95 is taken over the requests
    so scaled, and the broker's share (`transport_ms`) added. Where the arrival rate is
    known, a lighter rung's queue is judged by it too: one that could not keep up (its
    utilization, scaled the same way, at 1 or more) is predicted at infinity, its queue
    growing without bound; one that keeps up waits no longer than a queue at its
    utilization settles to once the backlog has drained. Without the requests (`samples`),
    the observed p95 is split into the same parts by their own p95s. None where a figure
    is missing."""
    active = view.rung(view.active)
    out: dict[str, float | None] = {r.name: None for r in view.rungs}
    if (
        active is None
        or active.latency_ms is None
        or active.latency_ms <= 0
        or view.observed_p95_ms is None
    ):
        return out
    samples = view.samples if view.samples is not None and len(view.samples) else None
    total = view.observed_p95_ms
    compute = view.observed_infer_p95_ms
    if compute is None or compute > total:
        compute = total
    queued = min(view.observed_queue_p95_ms or 0.0, total - compute)
    fixed = total - compute - queued
    load, service = view.utilization, view.service_ms
    parts = _split_wait(samples, service) if samples is not None else None
    for rung in view.rungs:
        if rung.latency_ms is None:
            continue
        ratio = rung.latency_ms / active.latency_ms
        settled = math.inf
        # Today's arrivals are taken as given only for a lighter rung: clients that wait
        # for each reply send less to a slower variant, so a richer rung's utilization
        # cannot be read off today's, unless a swamped queue showed that they do not wait
        # (ModelState.swamped_rate, judged in the step up).
        if load is not None and service is not None and ratio < 1.0:
            if load * ratio >= 1.0:
                out[rung.name] = math.inf
                continue
            # It drains today's backlog, then sees only its own steady queue.
            settled = _settled_wait_ms(service * ratio, load * ratio)
        if parts is not None:
            rest, infer, wake, backlog = parts
            scaled = rest + infer * ratio + wake + np.minimum(backlog * ratio, settled)
            if view.trips is not None:
                out[rung.name] = with_trips_p95(scaled, view.both_trips)
                continue
            p95 = float(np.percentile(scaled, 95))
        else:
            p95 = fixed + compute * ratio + min(queued * ratio, settled)
        out[rung.name] = p95 + view.transport_ms
    return out


QUANTILES = np.linspace(0.5, 99.5, 100)


def two_trips(trips: np.ndarray) -> np.ndarray:
    """The quantile grid (100) of two trips through the broker, each drawn from the
    echoes' round trips independently: there and back. One per tick, shared by every
    prediction (`with_trips_p95`)."""
    trip = np.percentile(trips, QUANTILES)
    return np.asarray(np.percentile(np.add.outer(trip, trip).ravel(), QUANTILES))


def with_trips_p95(in_agent: np.ndarray, both: np.ndarray) -> float:
    """The p95 of a request's time in the agent plus two trips through the broker
    (`two_trips`): the distributions are added over their grids of 100 quantiles (10,000
    pairs, well under a millisecond), not their p95s, which would make every request as
    unlucky as the worst of each."""
    agent = np.percentile(in_agent, QUANTILES)
    return float(np.percentile(np.add.outer(agent, both).ravel(), 95))


def _split_wait(
    samples: np.ndarray, service_ms: float | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rest, inference, wake-up, backlog) of each request: of its queue wait, the requests
    ahead of it times the active variant's time per request is backlog, which a faster
    rung drains faster; what is left is the time a worker took to take it up (scheduling:
    under contention, milliseconds at no load at all), which no rung changes. Without the
    count ahead or the time per request, the whole wait counts as backlog."""
    rest, infer, waited = samples[:, 0], samples[:, 1], samples[:, 2]
    if samples.shape[1] < 4 or service_ms is None:
        return rest, infer, np.zeros_like(waited), waited
    backlog = np.minimum(waited, samples[:, 3] * service_ms)
    return rest, infer, waited - backlog, backlog


def _settled_wait_ms(service_ms: float, utilization: float) -> float:
    """The time a request waits in a queue that keeps up, once any backlog has drained: the
    M/M/1 mean wait, S*u/(1-u) for service time S and utilization u — pessimistic for the
    steady arrivals of a camera, fair for bursty ones."""
    return service_ms * utilization / (1.0 - utilization)


def decide(
    history: Sequence[ResourceSnapshot],
    models: Sequence[ModelView],
    cfg: AdaptConfig,
    state: PolicyState,
    now: float,
) -> tuple[dict[str, Decision], PolicyState]:
    """The desired variant of every model, with reasons, and the policy's new state."""
    board = board_signals(history, cfg, now)
    decisions: dict[str, Decision] = {}
    states: dict[str, ModelState] = {}
    for view in models:
        previous = state.models.get(view.name, ModelState())
        decision, states[view.name] = _decide_model(view, board, cfg, previous, now)
        decisions[view.name] = decision
    if board.memory_short:
        decisions = _relieve_memory(models, decisions, board, cfg, now)
    return decisions, PolicyState(states)


@dataclass
class _Context:
    """Everything one model's rules read, gathered once."""

    view: ModelView
    board: BoardSignals
    cfg: AdaptConfig
    now: float
    active: RungView
    usable: list[RungView]
    predicted: dict[str, float | None]
    figures: dict[str, Any]
    observed: float | None
    since_swap: float

    def decision(self, desired: str | None, reason: str, why: str, shed: bool = False) -> Decision:
        view = self.view
        return Decision(
            view.name, view.active, desired, reason, why, self.figures, self.predicted, shed
        )

    def cheaper_in_latency(self) -> list[RungView]:
        base = self.active.latency_ms
        if base is None:
            return []
        return [r for r in self.usable if r.latency_ms is not None and r.latency_ms < base]


def _track(view: ModelView, cfg: AdaptConfig, previous: ModelState, now: float) -> ModelState:
    """Update since when the model has been over its objective, or calm."""
    slo = view.slo_p95_ms
    observed = view.seen_p95_ms if view.observed_count >= cfg.min_samples else None
    over = observed is not None and slo is not None and observed > slo
    calm_now = observed is None or slo is None or observed <= slo * cfg.up_margin
    # A swap starts the variant's observations afresh: so does the policy's memory of them.
    swapped_since = (
        view.last_swap_at is not None
        and previous.over_since is not None
        and view.last_swap_at > previous.over_since
    )
    over_since = None
    if over:
        over_since = previous.over_since if not swapped_since else None
        over_since = now if over_since is None else over_since
    calm_since = (previous.calm_since or now) if calm_now and not over else None
    if view.last_swap_at is not None and calm_since is not None:
        calm_since = max(calm_since, view.last_swap_at)
    rate = view.arrival_per_s
    swamped_rate = previous.swamped_rate
    if _swamped(view) and rate is not None:
        swamped_rate = rate
    elif swamped_rate is not None and (rate is None or rate < 0.5 * swamped_rate):
        swamped_rate = None
    return ModelState(over_since, calm_since, previous.shedding, swamped_rate)


def _decide_model(
    view: ModelView, board: BoardSignals, cfg: AdaptConfig, previous: ModelState, now: float
) -> tuple[Decision, ModelState]:
    predicted = predict(view)
    observed = view.seen_p95_ms if view.observed_count >= cfg.min_samples else None
    since_swap = now - view.last_swap_at if view.last_swap_at is not None else math.inf
    figures: dict[str, Any] = {
        **board.figures,
        "slo_p95_ms": _r(view.slo_p95_ms),
        "observed_p95_ms": _r(view.observed_p95_ms),
        "observed_infer_p95_ms": _r(view.observed_infer_p95_ms),
        "transport_ms": _r(view.broker_share_ms),
        "observed_count": view.observed_count,
        "queued": view.queued,
        "backlog_ms": _r(view.backlog_ms),
        "utilization": _r(view.utilization),
        "since_swap_s": None if math.isinf(since_swap) else round(since_swap, 1),
    }
    state = _track(view, cfg, previous, now)
    if view.pinned is not None:
        why = f"pinned to {view.pinned} over the control topic"
        pinned = Decision(view.name, view.active, view.pinned, "pinned", why, figures, predicted)
        return pinned, replace(state, shedding=False)
    active = view.rung(view.active)
    if active is None:
        why = "the active variant is not in the ladder"
        return Decision(
            view.name, view.active, view.active, "unknown", why, figures, predicted
        ), state
    usable = [r for r in view.rungs if not in_backoff(r, cfg, now)]
    if board.memory_short and active.memory_mb is not None:
        # Memory is short too: relieving the CPU must not take more of it.
        limit = active.memory_mb
        usable = [r for r in usable if r.memory_mb is not None and r.memory_mb <= limit]
    ctx = _Context(view, board, cfg, now, active, usable, predicted, figures, observed, since_swap)
    # Over the objective while the CPU has been short for a whole hold already: that
    # pressure has held, and waiting out a second hold for the latency it causes would
    # only add late answers.
    if state.over_since is not None and (
        now - state.over_since >= cfg.down_after_s
        or board.cpu_contended
        or _falling_behind(view)
    ):
        return _step_down(ctx, state, state.over_since)
    if board.thermal:
        return _cool_down(ctx), state
    if state.over_since is not None:
        assert observed is not None and view.slo_p95_ms is not None
        why = (
            f"p95 {_seen(view, observed)} over the objective {view.slo_p95_ms:.2f} ms; "
            "waiting for it to hold"
        )
        return ctx.decision(view.active, "hold", why, state.shedding), state
    return _step_up(ctx, state)


def _falling_behind(view: ModelView) -> bool:
    """The queue alone already holds more work than the objective allows, and at today's
    arrival rate the active variant would miss the objective even once that backlog had
    drained (its settled wait, `_settled_wait_ms`, plus its own time, over the objective;
    infinite when it cannot keep up at all, `_swamped`): no hold can help, so the step
    down is taken at once. A queue that keeps up comfortably is draining its backlog
    already; and without an arrival rate, a queue that deep is judged swamped."""
    if _swamped(view):
        return True
    backlog, load, service = view.backlog_ms, view.utilization, view.service_ms
    if backlog is None or load is None or service is None or view.slo_p95_ms is None:
        return False
    return backlog > view.slo_p95_ms and _settled_wait_ms(service, load) + service > view.slo_p95_ms


def _swamped(view: ModelView) -> bool:
    """The queue alone already holds more work than the objective allows, and requests
    arrive at least as fast as the active variant answers them: every one that joins the
    queue now will be late. Nothing to wait for: that is no spike (a spike that has passed
    leaves no queue behind), and each second of waiting costs a second of late answers. A
    variant that keeps up (utilization under 1) is draining its backlog already."""
    backlog, load = view.backlog_ms, view.utilization
    return (
        backlog is not None
        and view.slo_p95_ms is not None
        and backlog > view.slo_p95_ms
        and (load is None or load >= 1.0)
    )


def _step_down(ctx: _Context, state: ModelState, over_since: float) -> tuple[Decision, ModelState]:
    """Over the objective long enough: the most accurate variant predicted to meet it."""
    view, cfg, predicted = ctx.view, ctx.cfg, ctx.predicted
    slo, observed = view.slo_p95_ms, ctx.observed
    assert slo is not None and observed is not None
    cause = "cpu" if ctx.board.cpu_contended else "latency"
    over_for = ctx.now - over_since
    cheaper = ctx.cheaper_in_latency()
    swamped = _swamped(view)
    held_for = f"for {over_for:.0f} s"
    if over_for < cfg.down_after_s and _falling_behind(view):
        held_for = f"with {view.backlog_ms or 0.0:.0f} ms of work queued"
    elif over_for < cfg.down_after_s:
        held_for = f"with the CPU short for {cfg.down_after_s:g} s or more"
    meets = [
        r
        for r in cheaper
        if (p := predicted.get(r.name)) is not None and p <= slo * cfg.down_margin
    ]
    if meets:
        best = max(meets, key=lambda r: r.quality)
        why = (
            f"p95 {_seen(view, observed)} over the objective {slo:.2f} ms {held_for}; "
            f"{best.name} is predicted at {predicted[best.name]:.2f} ms"
        )
        return ctx.decision(best.name, cause, why), replace(state, shedding=False)
    # Nothing meets it: the lightest, if it helps enough; and give fleet traffic away.
    shed = view.fleet and cfg.fleet_shed
    lightest = min(cheaper, key=lambda r: r.latency_ms or math.inf, default=None)
    if lightest is not None:
        p = predicted.get(lightest.name)
        faster = (lightest.latency_ms or math.inf) <= (ctx.active.latency_ms or 0.0) * (
            1.0 - cfg.min_gain
        )
        # Of the rungs predicted about as fast as the lightest (what no rung changes — the
        # broker, a busy network thread — can dominate every prediction), the most accurate.
        near = _near_the_lightest(cheaper, predicted, p)
        if near is not None and near is not lightest:
            pn = predicted[near.name]
            assert pn is not None
            if pn <= observed * (1.0 - cfg.min_gain):
                why = (
                    f"p95 {_seen(view, observed)} over the objective {slo:.2f} ms; no variant "
                    f"is predicted to meet it; {near.name} comes within {100 * NEAR_LIGHTEST:g}% "
                    f"of the lightest ({pn:.2f} ms against {p:.2f} ms) and is more accurate"
                )
                return ctx.decision(near.name, cause, why, shed), replace(state, shedding=shed)
        # Swamped, every rung short of keeping up: the lightest still drains fastest.
        if p is not None and (p <= observed * (1.0 - cfg.min_gain) or (swamped and faster)):
            closest = f"{p:.2f} ms" if math.isfinite(p) else "it too falls behind the arrivals"
            why = (
                f"p95 {_seen(view, observed)} over the objective {slo:.2f} ms; no variant is "
                f"predicted to meet it, the lightest {lightest.name} comes closest ({closest})"
            )
            return ctx.decision(lightest.name, cause, why, shed), replace(state, shedding=shed)
    why = (
        f"p95 {_seen(view, observed)} over the objective {slo:.2f} ms and no lighter variant "
        "is predicted to help" + ("; leaving the fleet subscription" if shed else "")
    )
    return ctx.decision(view.active, cause, why, shed), replace(state, shedding=shed)


def _near_the_lightest(
    cheaper: Sequence[RungView], predicted: Mapping[str, float | None], lightest_p: float | None
) -> RungView | None:
    """The most accurate rung predicted within NEAR_LIGHTEST of the lightest's p95 (a
    finite one); None when the lightest's is unknown or infinite."""
    if lightest_p is None or not math.isfinite(lightest_p):
        return None
    near = [
        r
        for r in cheaper
        if (q := predicted.get(r.name)) is not None and q <= lightest_p * (1.0 + NEAR_LIGHTEST)
    ]
    return max(near, key=lambda r: r.quality, default=None)


def _cool_down(ctx: _Context) -> Decision:
    """Thermal pressure: one step to the most accurate variant cheaper in compute."""
    cheaper = sorted(ctx.cheaper_in_latency(), key=lambda r: -r.quality)
    if cheaper and ctx.since_swap >= ctx.cfg.down_after_s:
        why = f"CPU at {ctx.board.figures.get('cpu_temperature_c')} °C: one step cheaper"
        return ctx.decision(cheaper[0].name, "thermal", why)
    return ctx.decision(ctx.view.active, "thermal", "hot; nothing cheaper to step to yet")


def _richer(view: ModelView, active: RungView) -> list[RungView]:
    """Rungs measured more accurate than the active one, cheapest in latency first: one step
    up is the next point of the ladder's quality/latency front, not the next ladder position
    (a slower rung that is no more accurate, or more accurate than a cheaper one that is
    more accurate still, is never worth the step). Rungs without a latency come last, in
    quality order; on a tie in quality nothing is gained, so a tie is no step up."""
    richer = [r for r in view.rungs if r.quality > active.quality]
    return sorted(
        richer,
        key=lambda r: (r.latency_ms if r.latency_ms is not None else math.inf, r.quality),
    )


def _step_up(ctx: _Context, state: ModelState) -> tuple[Decision, ModelState]:
    """Calm long enough, cooled down: one rung richer, if predicted to fit.

    The CPU need not be idle: a board that others keep busy still takes a richer variant
    when this model's own figures predict it within `up_margin` of its objective."""
    view, cfg, board, now = ctx.view, ctx.cfg, ctx.board, ctx.now
    calm_for = now - state.calm_since if state.calm_since is not None else 0.0
    quiet = board.thermal_calm and not board.memory_short
    shedding = state.shedding
    if shedding and calm_for >= cfg.up_after_s and quiet:
        shedding = False
        state = replace(state, shedding=False)
    richer = [r for r in _richer(view, ctx.active) if not in_backoff(r, cfg, now)]
    candidate = next((r for r in richer if not _would_swamp(r, view, state)), None)
    if candidate is None and richer:
        why = (
            f"{richer[0].name} would not keep up with {view.arrival_per_s or 0:.0f} "
            "requests/s, the rate of a burst that swamped the queue"
        )
        return ctx.decision(view.active, "hold", why, shedding), state
    if candidate is None:
        why = "serving the richest usable variant"
        return ctx.decision(view.active, "calm", why, shedding), state
    since = 0.0 if math.isinf(ctx.since_swap) else ctx.since_swap
    p = ctx.predicted.get(candidate.name)
    if p is not None and view.slo_p95_ms is not None and p > view.slo_p95_ms * cfg.up_margin:
        # Calm is the richer rung predicted to fit, all along: a load that comes and goes
        # (fits now, not a few seconds later) must not take it up to fall back down.
        why = (
            f"{candidate.name} is predicted at {p:.2f} ms, over {cfg.up_margin:g} of the objective"
        )
        state = replace(state, calm_since=None)
    elif not quiet or (p is None and not board.cpu_calm):
        why = "the board is not calm yet"
    elif calm_for < cfg.up_after_s or ctx.since_swap < cfg.cooldown_s:
        why = f"calm for {calm_for:.0f} s of {cfg.up_after_s:g}; {since:.0f} s since the last swap"
    elif not _fits(candidate, ctx.active, board, cfg):
        why = f"{candidate.name} would not leave {cfg.memory_calm_mb:g} MB of headroom"
    else:
        why = f"calm for {calm_for:.0f} s: one step up to {candidate.name}"
        return ctx.decision(candidate.name, "calm", why, shedding), replace(state, calm_since=None)
    return ctx.decision(view.active, "hold", why, shedding), state


def _would_swamp(candidate: RungView, view: ModelView, state: ModelState) -> bool:
    """Since a queue swamped the model, its clients are known not to wait for replies: a
    richer rung that today's arrivals would keep over 90% busy (scaled from the active
    variant's time per request) would be swamped again as soon as it took over."""
    active = view.rung(view.active)
    load = view.utilization
    if (
        state.swamped_rate is None
        or load is None
        or active is None
        or not active.latency_ms
        or candidate.latency_ms is None
    ):
        return False
    return load * candidate.latency_ms / active.latency_ms >= 0.9


def _fits(candidate: RungView, active: RungView, board: BoardSignals, cfg: AdaptConfig) -> bool:
    if board.headroom_mb is None or candidate.memory_mb is None or active.memory_mb is None:
        return True
    extra = max(0.0, candidate.memory_mb - active.memory_mb)
    return board.headroom_mb - extra * 1.25 >= cfg.memory_calm_mb


def _memory_moves(
    models: Sequence[ModelView], decisions: Mapping[str, Decision], cfg: AdaptConfig, now: float
) -> list[tuple[float, str, RungView, float]]:
    """Every swap that frees memory: (quality lost per MB freed, model, rung, MB freed)."""
    moves: list[tuple[float, str, RungView, float]] = []
    for view in models:
        if view.pinned is not None:
            continue
        if view.last_swap_at is not None and now - view.last_swap_at < cfg.down_after_s:
            continue  # what the last swap freed may not show in the figures yet
        current = view.rung(decisions[view.name].desired) or view.rung(view.active)
        active = view.rung(view.active)
        if current is None or active is None or active.memory_mb is None:
            continue
        for rung in view.rungs:
            if rung.memory_mb is None or in_backoff(rung, cfg, now):
                continue
            freed = active.memory_mb - rung.memory_mb
            # Only lighter in memory; and never heavier than a CPU decision already taken.
            if freed <= 0 or (current.memory_mb is not None and rung.memory_mb > current.memory_mb):
                continue
            loss = max(0.0, active.quality - rung.quality)
            moves.append((loss / freed, view.name, rung, freed))
    return moves


def _relieve_memory(
    models: Sequence[ModelView],
    decisions: dict[str, Decision],
    board: BoardSignals,
    cfg: AdaptConfig,
    now: float,
) -> dict[str, Decision]:
    """Free memory across models: the moves losing the least quality per MB freed first,
    until the headroom is back above memory_calm_mb."""
    headroom = board.headroom_mb or 0.0
    needed = cfg.memory_calm_mb - headroom
    moves = _memory_moves(models, decisions, cfg, now)
    moves.sort(key=lambda m: (m[0], -m[3]))
    chosen: dict[str, tuple[RungView, float]] = {}
    freed_total = 0.0
    for _ratio, name, rung, freed in moves:
        if freed_total >= needed:
            break
        had = chosen.get(name)
        if had is not None:
            if freed <= had[1]:
                continue
            freed_total -= had[1]
        chosen[name] = (rung, freed)
        freed_total += freed
    out = dict(decisions)
    for name, (rung, freed) in chosen.items():
        before = decisions[name]
        why = (
            f"memory headroom {headroom:.0f} MB below {cfg.memory_low_mb:g} MB; "
            f"{rung.name} frees about {freed:.0f} MB"
        )
        out[name] = replace(
            before,
            desired=rung.name,
            reason="memory",
            explanation=why,
            figures={**before.figures, "needed_mb": round(needed, 1), "freed_mb": round(freed, 1)},
        )
    return out


def _seen(view: ModelView, observed: float) -> str:
    """The p95 a client sees, and how much of it was the broker's, for an explanation."""
    share = view.broker_share_ms
    if share <= 0.0:
        return f"{observed:.2f} ms"
    return f"{observed:.2f} ms ({share:.2f} of it the broker's)"


def _r(value: float | None) -> float | None:
    """Rounded for a report; a prediction of infinity (cannot keep up) is reported as None,
    JSON having no infinity."""
    return None if value is None or math.isinf(value) else round(value, 3)
