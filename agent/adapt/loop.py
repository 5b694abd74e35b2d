"""The adaptation loop: every interval, gather what was measured, ask the policy, and apply
its decisions through the model manager (the one owner of variant changes).

It runs on its own thread, so that a swap that takes a while (loading, warming, draining)
never delays the sampler or the requests. Models without traffic are timed now and then
on zeros (a probe), so that their latency under today's load is measured, not guessed.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import structlog

from agent.adapt.policy import (
    DEFAULT_TRIP_C,
    Decision,
    ModelView,
    PolicyState,
    RungView,
    board_signals,
    cpu_contended,
    decide,
    in_backoff,
    objective,
)
from agent.adapt.snapshot import ResourceSnapshot
from agent.config import AdaptConfig
from agent.errors import EdgeAgentError
from agent.manifest import quality
from agent.metrics import ModelStats
from agent.models import ModelManager, ServedModel

log = structlog.get_logger(__name__)

History = Callable[[], Sequence[ResourceSnapshot]]
FleetHook = Callable[[str, bool], None]
"""`hook(model, joined)`: leave (False) or rejoin (True) the model's fleet subscription."""
RoundTrip = Callable[[float], Sequence[float]]
"""`round_trip(window_s)`: the round trips (ms) of the broker echoes of the last `window_s`
seconds, sending the next one (`MqttFrontend.broker_round_trip`)."""

PROBES_PER_TICK = 4
RATE_WINDOW_S = 1.0
"""The shortest window an arrival rate is read over (a tick can come sooner: alarms)."""
ALARM_GAP_S = 0.1
"""The least time between two ticks that a swamping queue's alarm brings forward; doubled
after each such tick that changed nothing, up to the interval."""
CALM_PROBE_FACTOR = 5.0
BASELINE_WINDOW_S = 60.0
MIN_ECHOES = 3
ECHO_INTERVAL_S = 0.25
"""Between ticks, an echo through the broker this often: enough round trips in the
latency window for a p95 that is not just its slowest one."""


def _hot(snapshot: ResourceSnapshot, cfg: AdaptConfig) -> bool:
    trip = cfg.temperature_c if cfg.temperature_c is not None else DEFAULT_TRIP_C
    return snapshot.cpu_temperature_c is not None and snapshot.cpu_temperature_c >= trip


class Adapter:
    """Runs the policy on the latest figures and carries out what it decides."""

    def __init__(
        self,
        manager: ModelManager,
        config: AdaptConfig,
        history: History,
        *,
        pinned: Callable[[str], str | None],
        emit: Callable[..., None],
        fleet: FleetHook | None = None,
        round_trip: RoundTrip | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._manager = manager
        self._config = config
        self._history = history
        self._pinned = pinned
        self._emit = emit
        self._fleet = fleet
        self._round_trip = round_trip
        self._trips: np.ndarray | None = None  # as of the last tick: see _transport
        self._clock = clock
        self._state = PolicyState()
        self._decisions: dict[str, Decision] = {}
        self._views: dict[str, ModelView] = {}
        self._shed: set[str] = set()
        self._last_probe: dict[str, float] = {}
        self._fastest: dict[str, float] = {}  # the richest rung's best p50 on this device
        self._probe_cursor = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # a queue's depth alarm: tick now
        self._alarm_gap = ALARM_GAP_S  # the least time from one tick to an alarm's
        self._thread: threading.Thread | None = None
        self.ticks = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="adapt", daemon=True)
        self._thread.start()
        log.info("adapt_started", interval_s=self._config.interval_s)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        """A tick every `interval_s`, and sooner when a queue's depth alarm rings (at most
        one per ALARM_GAP_S): a burst that swamps a model is acted on within a fraction of
        a second, not at the next tick. The first tick comes at once: it arms the alarms.
        Between ticks it sends an echo through the broker every ECHO_INTERVAL_S. Scheduled
        on the real clock, whatever `clock`."""
        last = time.monotonic() - self._config.interval_s
        echo_due = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            until = last + self._config.interval_s
            if self._round_trip is not None and self._config.count_transport:
                if now >= echo_due and now < until:
                    self._round_trip(self._config.latency_window_s)  # one more echo
                    echo_due = now + ECHO_INTERVAL_S
                until = min(until, echo_due)
            if self._wake.wait(max(0.0, until - now)):
                self._wake.clear()
                if self._stop.wait(max(0.0, last + self._alarm_gap - time.monotonic())):
                    break
            elif time.monotonic() < last + self._config.interval_s:
                continue  # an echo is due, not a tick
            if self._stop.is_set():
                break
            last = time.monotonic()
            try:
                self.tick()
            except Exception:  # the loop must outlive any bug in one decision
                log.exception("adapt_tick_failed")

    # --- One decision round ---

    def tick(self) -> dict[str, Decision]:
        """Probe idle models, decide, apply; returns the decisions taken."""
        now = self._clock()
        self._probe_idle(now)
        history = self._history()
        served = self._manager.served()
        views = [self._view(model, self._trips) for model in served]
        deep = False
        for model, view in zip(served, views, strict=True):
            # A pinned model moves for nobody: its queue need not ring.
            depth = alarm_depth(view, model.queue.workers) if view.pinned is None else 0
            model.queue.watch_depth(depth, self._wake.set)
            deep = deep or (depth > 0 and model.queue.depth >= depth)
        decisions, state = decide(history, views, self._config, self._state, self._clock())
        with self._lock:
            self._state = state
            self._decisions = decisions
            self._views = {v.name: v for v in views}
        for decision in decisions.values():
            self._apply(decision)
        # Still swamping: look again soon, whether or not more requests come; but each
        # look that changes nothing doubles the wait for the next (a tick holds the
        # interpreter for milliseconds, which the threads serving the burst need).
        swapped = any(d.swap for d in decisions.values())
        if deep and not swapped:
            self._alarm_gap = min(2.0 * self._alarm_gap, self._config.interval_s)
        else:
            self._alarm_gap = ALARM_GAP_S
        if deep:
            self._wake.set()
        # Last, with nothing left to do: this thread would otherwise hold the interpreter
        # while the echo comes back, and time itself, not the broker (5 ms switch interval).
        self._trips = self._transport()
        self.ticks += 1
        return decisions

    def _transport(self) -> np.ndarray | None:
        """The round trips of the agent's echoes through the broker over the latency
        window, ms (the policy adds two of them to each request: there and back); None
        when too few came back, or when not counted (`adapt.count_transport`)."""
        if self._round_trip is None or not self._config.count_transport:
            return None
        trips = self._round_trip(self._config.latency_window_s)
        if len(trips) < MIN_ECHOES:
            return None
        return np.asarray(trips, dtype=np.float64)

    def _view(self, model: ServedModel, trips: np.ndarray | None = None) -> ModelView:
        cfg = self._config
        failures = self._manager.failures
        rungs: list[RungView] = []
        for index, variant in enumerate(model.ladder):
            failure = failures.get((model.name, variant.name))
            rungs.append(
                RungView(
                    name=variant.name,
                    quality=quality(variant, index),
                    latency_ms=variant.metrics.latency_ms or None,
                    memory_mb=self._manager.predicted_mb(model.name, variant),
                    failures=failure.count if failure is not None else 0,
                    failed_at=failure.last if failure is not None else None,
                )
            )
        declared = cfg.objectives.get(model.name)
        manifest = model.source.manifest
        active = model.active_name
        figures, samples = (
            model.stats.variant_window(active, cfg.latency_window_s)
            if active is not None
            else (None, None)
        )
        if active is not None and active == model.ladder[0].name:
            # The richest rung's speed on this device, from a longer window than the
            # policy's: on a calm board it is probed only every few seconds.
            base = model.stats.variant_figures(active, BASELINE_WINDOW_S)
            if base.count >= cfg.min_samples and base.infer_p50_ms is not None:
                best = self._fastest.get(model.name, math.inf)
                self._fastest[model.name] = min(base.infer_p50_ms, best)
        slo = objective(
            rungs,
            declared.slo_p95_ms
            if declared is not None
            else (manifest.slo_p95_ms if manifest is not None else None),
            cfg,
            self._fastest.get(model.name),
        )
        swap = model.last_swap
        service_ms = None
        if figures is not None and figures.infer_p50_ms is not None and figures.mean_rows:
            service_ms = figures.infer_p50_ms / figures.mean_rows / model.queue.workers
        return ModelView(
            name=model.name,
            rungs=tuple(rungs),
            active=active,
            slo_p95_ms=slo,
            observed_p95_ms=figures.p95_ms if figures is not None else None,
            observed_infer_p95_ms=figures.infer_p95_ms if figures is not None else None,
            observed_queue_p95_ms=figures.queue_p95_ms if figures is not None else None,
            observed_count=figures.count if figures is not None else 0,
            queued=model.queue.depth,
            service_ms=service_ms,
            arrival_per_s=arrival_estimate(model.stats, cfg),
            pinned=self._pinned(model.name),
            fleet=self._fleet is not None,
            last_swap_at=swap.at if swap is not None else None,
            samples=samples,
            transport_ms=_two_trips_ms(trips),
            trips=trips,
        )

    def _probe_idle(self, now: float) -> None:
        """Time a few models that have had too little traffic to judge them by."""
        cfg = self._config
        served = [m for m in self._manager.served() if len(m.ladder) > 1]
        if not served:
            return
        # Often while the board is contended (what the policy needs measured now), rarely
        # when it is calm (enough to notice a model slower here than its manifest says).
        history = self._history()
        latest = history[-1] if history else None
        pressed = latest is not None and (cpu_contended(latest, cfg) or _hot(latest, cfg))
        every = cfg.probe_interval_s if pressed else CALM_PROBE_FACTOR * cfg.probe_interval_s
        probed = 0
        for offset in range(len(served)):
            model = served[(self._probe_cursor + offset) % len(served)]
            if probed >= PROBES_PER_TICK:
                break
            active = model.active_name
            if active is None or now - self._last_probe.get(model.name, -1e9) < every:
                continue
            count, probes = model.stats.variant_counts(active, cfg.latency_window_s, now)
            if count - probes >= cfg.min_samples:
                continue  # real traffic says enough
            self._last_probe[model.name] = now
            self._manager.probe(model.name)
            probed += 1
        self._probe_cursor += 1

    def _apply(self, decision: Decision) -> None:
        self._fleet_membership(decision)
        if not decision.swap or decision.desired is None:
            return
        try:
            model = self._manager.get(decision.model)
        except EdgeAgentError:
            return  # unloaded meanwhile
        target = next((v for v in model.ladder if v.name == decision.desired), None)
        failure = self._manager.failures.get((decision.model, decision.desired))
        if target is None:
            return
        if failure is not None:
            rung = RungView(target.name, 0.0, None, None, failure.count, failure.last)
            if in_backoff(rung, self._config, self._clock()):
                return
        figures = {
            "explanation": decision.explanation,
            **decision.figures,
            "predicted_p95_ms": decision.as_dict()["predicted_p95_ms"],
        }
        try:
            self._manager.switch(decision.model, decision.desired, decision.reason, figures)
        except EdgeAgentError as exc:
            log.warning(
                "adapt_swap_failed", model=decision.model, to=decision.desired, error=str(exc)
            )

    def _fleet_membership(self, decision: Decision) -> None:
        if self._fleet is None:
            return
        name = decision.model
        if decision.shed_fleet and name not in self._shed:
            self._shed.add(name)
            self._fleet(name, False)
            self._emit(
                "fleet_left",
                model=name,
                reason=decision.explanation,
                figures=decision.figures,
            )
        elif not decision.shed_fleet and name in self._shed:
            self._shed.discard(name)
            self._fleet(name, True)
            self._emit("fleet_rejoined", model=name, reason=decision.explanation)

    # --- What the control topic and the metrics show ---

    def view(self) -> dict[str, Any]:
        """The policy's view per model: active and desired variant, why, the figures, the
        time since the last swap and each variant's predicted p95."""
        with self._lock:
            decisions = dict(self._decisions)
            views = dict(self._views)
        history = self._history()
        board = board_signals(history, self._config, self._clock())
        models: dict[str, Any] = {}
        now = self._clock()
        for name, decision in sorted(decisions.items()):
            view = views.get(name)
            body = decision.as_dict()
            try:  # live, not as of the last decision: a swap may have followed it
                body["active"] = self._manager.get(name).active_name
            except EdgeAgentError:
                continue  # unloaded since
            if view is not None:
                body["slo_p95_ms"] = view.slo_p95_ms
                body["pinned"] = view.pinned
                body["since_swap_s"] = (
                    round(now - view.last_swap_at, 1) if view.last_swap_at is not None else None
                )
                body["variants"] = [
                    {
                        "name": r.name,
                        "quality": r.quality,
                        "latency_ms": r.latency_ms,
                        "memory_mb": None if r.memory_mb is None else round(r.memory_mb, 1),
                        "predicted_p95_ms": body["predicted_p95_ms"].get(r.name),
                        "in_backoff": in_backoff(r, self._config, now),
                    }
                    for r in view.rungs
                ]
            body["fleet_shed"] = name in self._shed
            models[name] = body
        return {
            "enabled": True,
            "ticks": self.ticks,
            "board": {
                "cpu_contended": board.cpu_contended,
                "memory_short": board.memory_short,
                "thermal": board.thermal,
                **board.figures,
            },
            "models": models,
        }

    def reason(self, model: str) -> str | None:
        with self._lock:
            decision = self._decisions.get(model)
        return decision.explanation if decision is not None else None


def _two_trips_ms(trips: np.ndarray | None) -> float:
    """A figure for the broker's share when only p95s are known: one trip's p95 and the
    other's median. 0 without echoes."""
    if trips is None or not len(trips):
        return 0.0
    p50, p95 = np.percentile(trips, [50, 95])
    return float(p50 + p95)


def arrival_estimate(stats: ModelStats, cfg: AdaptConfig, now: float | None = None) -> float:
    """The arrival rate the policy judges a queue by: the faster of the last second's and
    the rate over the hold a step down waits for. A burst shows in full at the next tick
    (averaged over the hold, its first second reads as a third of itself, and the policy
    would step to a rung that falls behind it a second later); it is forgotten only once
    both have calmed."""
    hold = max(cfg.down_after_s, RATE_WINDOW_S)
    return max(stats.arrival_rate(RATE_WINDOW_S, now), stats.arrival_rate(hold, now))


def alarm_depth(view: ModelView, workers: int) -> int:
    """The queue depth at which the requests waiting hold more work than the model's
    objective — the first half of a swamp (policy `_swamped`): the active variant's
    observed time per request, else its measured latency shared by the workers. 0 (no
    alarm) when either figure is missing."""
    service = view.service_ms
    active = view.rung(view.active)
    if service is None and active is not None and active.latency_ms:
        service = active.latency_ms / max(1, workers)
    if view.slo_p95_ms is None or not service or service <= 0:
        return 0
    return max(2, math.floor(view.slo_p95_ms / service) + 1)
