"""The swap policy as a pure function, driven by synthetic histories and a simulated board:
each test states one rule of DESIGN.md "Adapting to the device"."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pytest

from agent.adapt.loop import arrival_estimate
from agent.adapt.policy import (
    Decision,
    ModelState,
    ModelView,
    PolicyState,
    RungView,
    board_signals,
    decide,
    objective,
    predict,
)
from agent.adapt.snapshot import ResourceSnapshot
from agent.config import AdaptConfig
from agent.metrics import ModelStats

CFG = AdaptConfig(down_after_s=3.0, up_after_s=20.0, cooldown_s=10.0, interval_s=1.0)

# A CNN-like ladder, quality order; fp16 is slower than fp32 (the committed demo's defect f).
LADDER = (
    RungView("fp32", 0.98, 4.0, 40.0),
    RungView("fp16", 0.98, 4.6, 30.0),
    RungView("int8", 0.97, 2.0, 20.0),
    RungView("pruned-int8", 0.95, 1.0, 12.0),
    RungView("tiny", 0.90, 0.5, 6.0),
)


def snap(
    t: float, *, others_cpu: float = 5.0, headroom: float = 4000.0, **extra: float
) -> ResourceSnapshot:
    """A board at time t: CPU taken by others and memory headroom as given."""
    return ResourceSnapshot(
        monotonic=t,
        system_cpu_percent=others_cpu,
        process_cpu_percent=0.0,
        cpu_count=2,
        memory_available_mb=headroom,
        memory_total_mb=8000.0,
        process_rss_mb=100.0,
        **extra,  # type: ignore[arg-type]
    )


@dataclass
class Board:
    """A simulated device: applies each decision and reports what the model would observe."""

    slowdown: Callable[[float], float]  # time -> how much slower than measured
    others_cpu: Callable[[float], float] = lambda _t: 5.0
    headroom: Callable[[float], float] = lambda _t: 4000.0
    ladder: tuple[RungView, ...] = LADDER
    active: str = "fp32"
    pinned: str | None = None
    slo: float | None = 12.0
    fleet: bool = False
    last_swap: float | None = None
    history: list[ResourceSnapshot] = field(default_factory=list)
    state: PolicyState = field(default_factory=PolicyState)
    swaps: list[tuple[float, str, str, str]] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    arrivals: Callable[[float], float] | None = None
    """Requests per second at time t, served by one worker: a queue forms when they come
    faster than the active variant answers. None: no queue is modelled."""
    queue: float = 0.0
    queue_log: list[float] = field(default_factory=list)

    def service_ms(self, t: float) -> float:
        rung = next(r for r in self.ladder if r.name == self.active)
        assert rung.latency_ms is not None
        return rung.latency_ms * self.slowdown(t)

    def view(self, t: float) -> ModelView:
        service = self.service_ms(t)
        wait = self.queue * service
        return ModelView(
            name="m",
            rungs=self.ladder,
            active=self.active,
            slo_p95_ms=self.slo,
            observed_p95_ms=service + wait,
            observed_infer_p95_ms=service,
            observed_queue_p95_ms=wait,
            observed_count=50,
            queued=int(self.queue),
            service_ms=service if self.arrivals is not None else None,
            arrival_per_s=self.arrivals(t) if self.arrivals is not None else None,
            pinned=self.pinned,
            fleet=self.fleet,
            last_swap_at=self.last_swap,
        )

    def run(self, start: float, end: float, cfg: AdaptConfig = CFG) -> None:
        t = start
        while t < end:
            self.history.append(snap(t, others_cpu=self.others_cpu(t), headroom=self.headroom(t)))
            decisions, self.state = decide(self.history[-300:], [self.view(t)], cfg, self.state, t)
            decision = decisions["m"]
            self.decisions.append(decision)
            if decision.swap and decision.desired is not None:
                self.swaps.append((t, self.active, decision.desired, decision.reason))
                self.active, self.last_swap = decision.desired, t
            if self.arrivals is not None:
                served = 1000.0 / self.service_ms(t) * cfg.interval_s
                self.queue = max(0.0, self.queue + self.arrivals(t) * cfg.interval_s - served)
                self.queue_log.append(self.queue)
            t += cfg.interval_s


def decide_over(view: ModelView, over_for: float) -> Decision:
    """The decision on `view` at t=59 of a calm minute, its p95 over the objective for the
    last `over_for` seconds."""
    history = [snap(float(t)) for t in range(60)]
    now = 59.0
    state = PolicyState({"m": ModelState(over_since=now - over_for)})
    return decide(history, [view], CFG, state, now)[0]["m"]


def test_sustained_pressure_steps_down_soon_and_a_spike_does_not() -> None:
    """p95 over the objective for a second does nothing; held for down_after_s, it steps
    down within a few seconds."""
    spike = Board(slowdown=lambda t: 5.0 if 30 <= t < 31 else 1.0)
    spike.run(0, 60)
    assert spike.swaps == []

    held = Board(slowdown=lambda t: 4.0 if t >= 30 else 1.0)
    held.run(0, 40)
    assert held.swaps, "no step down under held pressure"
    when, old, _new, _reason = held.swaps[0]
    assert old == "fp32"
    assert 30 + CFG.down_after_s <= when <= 30 + CFG.down_after_s + 2


def test_a_burst_that_swamps_the_queue_steps_down_at_once_to_a_rung_that_keeps_up() -> None:
    """A burst at 3x what fp32 answers (250/s): the queue alone soon holds more work than
    the objective, so the policy does not wait down_after_s. It skips int8, which at 2 ms
    would still fall behind 750/s, for the most accurate rung that keeps up, in one swap;
    and the queue drains."""
    board = Board(slowdown=lambda _t: 1.0, arrivals=lambda t: 750.0 if t >= 30 else 150.0)
    board.run(0, 45)
    assert [(s[1], s[2]) for s in board.swaps] == [("fp32", "pruned-int8")]
    when = board.swaps[0][0]
    assert 30 <= when < 30 + CFG.down_after_s
    assert "queued" in board.decisions[int(when)].explanation
    assert board.decisions[int(when)].predicted_p95_ms["int8"] == math.inf
    assert board.decisions[int(when)].as_dict()["predicted_p95_ms"]["int8"] is None  # JSON
    assert board.queue_log[-1] == 0.0

    # While the burst lasts no richer rung is tried (each would be swamped again: int8 at
    # 2 ms is 1.5x busy at 750/s); once it ends, the model climbs back.
    long = Board(slowdown=lambda _t: 1.0, arrivals=lambda t: 750.0 if 30 <= t < 90 else 150.0)
    long.run(0, 150)
    assert [s[0] for s in long.swaps if s[0] < 90] == [long.swaps[0][0]]
    assert "swamped" in long.decisions[80].explanation
    ups = [s for s in long.swaps if s[3] == "calm"]
    assert ups and ups[0][0] >= 90

    # The same p95 without a queue behind it (a slow spell of the model itself) waits.
    slow = Board(slowdown=lambda t: 4.0 if t >= 30 else 1.0, arrivals=lambda _t: 50.0)
    slow.run(0, 45)
    assert slow.swaps and slow.swaps[0][0] >= 30 + CFG.down_after_s


def test_a_step_down_skips_rungs_when_the_prediction_says_so() -> None:
    """At 4x slowdown fp32 is 16 ms against 12: int8 (8 ms) meets 0.9 of it, so the policy
    goes straight there instead of trying each rung."""
    board = Board(slowdown=lambda t: 4.0 if t >= 10 else 1.0)
    board.run(0, 30)
    assert [s[2] for s in board.swaps] == ["int8"]
    assert board.decisions[-1].reason in ("cpu", "latency", "hold", "calm")


def test_the_slower_fp16_rung_is_never_chosen_for_cpu_relief() -> None:
    """A 1.3x slowdown (fp32 5.2 ms) against a 5 ms objective: fp16 sits next in the ladder
    but is slower, so the policy skips it for the faster int8."""
    board = Board(slowdown=lambda t: 1.3 if t >= 5 else 1.0, slo=5.0)
    board.run(0, 30)
    chosen = [s[2] for s in board.swaps]
    assert chosen and "fp16" not in chosen
    assert chosen[0] == "int8"


def test_calm_steps_back_up_one_rung_at_a_time_after_up_after_s() -> None:
    """Once the pressure is gone, the policy waits up_after_s of calm, then climbs one rung
    per step, never straight to the top."""
    board = Board(slowdown=lambda t: 8.0 if 10 <= t < 40 else 1.0)
    board.run(0, 200)
    downs = [s for s in board.swaps if s[3] in ("cpu", "latency")]
    ups = [s for s in board.swaps if s[3] == "calm"]
    assert downs and ups
    first_up = ups[0][0]
    assert first_up >= 40 + CFG.up_after_s
    # One point of the quality/latency front at a time: the cheapest more accurate rung.
    # fp16 (as accurate as fp32, slower) is never a step.
    rungs = {r.name: r for r in LADDER}
    for _t, old, new, _r in ups:
        above = [r for r in LADDER if r.quality > rungs[old].quality]
        assert new == min(above, key=lambda r: r.latency_ms or 0.0).name, (old, new)
    assert "fp16" not in [s[2] for s in board.swaps]
    assert len(ups) >= 2
    assert board.active == "fp32"
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(ups)]
    assert all(g >= CFG.cooldown_s for g in gaps)


def test_an_oscillating_signal_does_not_flap() -> None:
    """Latency that crosses the objective every other second never holds: no swap at all;
    one that swings over and back every 8 s makes at most one step down."""
    fast = Board(slowdown=lambda t: 4.0 if int(t) % 2 else 1.0)
    fast.run(0, 120)
    assert fast.swaps == []

    slow = Board(slowdown=lambda t: 4.0 if int(t) // 8 % 2 else 1.0)
    slow.run(0, 120)
    assert len(slow.swaps) <= 1


def test_a_pin_always_wins() -> None:
    """A pinned variant is desired whatever the pressure, with the reason 'pinned'."""
    board = Board(slowdown=lambda _t: 10.0, pinned="fp32")
    board.run(0, 30)
    assert board.swaps == []
    assert {d.reason for d in board.decisions} == {"pinned"}


def test_a_variant_that_failed_to_load_waits_out_its_backoff() -> None:
    """int8 failed to load a moment ago: under pressure the policy takes the next best
    candidate instead of retrying it; after retry_after_s it is a candidate again."""
    failed = replace(LADDER[2], failures=1, failed_at=0.0)
    ladder = (*LADDER[:2], failed, *LADDER[3:])
    cfg = replace_cfg(retry_after_s=60.0)
    board = Board(slowdown=lambda _t: 4.0, ladder=ladder)
    board.run(0, 10, cfg)
    assert board.swaps and board.swaps[0][2] == "pruned-int8"

    later = Board(slowdown=lambda _t: 4.0, ladder=ladder)
    later.run(100, 110, cfg)
    assert later.swaps and later.swaps[0][2] == "int8"


def test_no_variant_meets_the_objective_lightest_only_if_it_helps_and_fleet_is_shed() -> None:
    """A slowdown no variant survives: the policy takes the lightest when it cuts p95 and
    leaves the fleet; when the time is not in the model, it holds and still sheds."""
    board = Board(slowdown=lambda _t: 100.0, fleet=True)
    board.run(0, 10)
    assert board.swaps and board.swaps[0][2] == "tiny"
    assert board.decisions[-1].shed_fleet

    # All of the p95 is overhead (queueing), none compute: no lighter variant helps.
    view = ModelView(
        "m",
        LADDER,
        "fp32",
        12.0,
        observed_p95_ms=50.0,
        observed_infer_p95_ms=0.1,
        observed_count=50,
        fleet=True,
    )
    history = [snap(t) for t in range(10)]
    state = PolicyState()
    for t in range(10):
        decisions, state = decide(history[: t + 1], [view], CFG, state, float(t))
    assert decisions["m"].desired == "fp32"
    assert decisions["m"].shed_fleet


def test_the_fleet_is_rejoined_after_calm() -> None:
    """Once even the lightest was shed and the pressure goes, the fleet is rejoined after
    up_after_s of calm."""
    board = Board(slowdown=lambda t: 100.0 if t < 20 else 1.0, fleet=True)
    board.run(0, 80)
    shed = [d.shed_fleet for d in board.decisions]
    assert any(shed[:20])
    assert not shed[-1]


def test_memory_pressure_takes_the_cheapest_accuracy_per_mb_first_across_two_models() -> None:
    """Headroom 60 MB against a calm level of 128: model a loses 0.01 for 80 MB, model b
    0.05 for 80 MB; a gives way first, and b only when a's move is not enough."""
    a = ModelView(
        "a",
        (RungView("big", 0.96, 1.0, 100.0), RungView("small", 0.95, 0.9, 20.0)),
        "big",
        None,
    )
    b = ModelView(
        "b",
        (RungView("big", 0.96, 1.0, 100.0), RungView("small", 0.91, 0.9, 20.0)),
        "big",
        None,
    )
    history = [snap(t, headroom=60.0) for t in range(10)]  # needs 68 MB: a alone
    state = PolicyState()
    decisions: dict[str, Decision] = {}
    for t in range(10):
        decisions, state = decide(history[: t + 1], [a, b], CFG, state, float(t))
    assert decisions["a"].desired == "small" and decisions["a"].reason == "memory"
    assert decisions["b"].desired == "big"

    tight = [snap(t, headroom=20.0) for t in range(10)]  # needs 108 MB: both
    state = PolicyState()
    for t in range(10):
        decisions, state = decide(tight[: t + 1], [a, b], CFG, state, float(t))
    assert decisions["a"].desired == "small" and decisions["b"].desired == "small"


def test_memory_relief_never_picks_a_variant_that_is_not_lighter_in_memory() -> None:
    """fp16 is lighter than fp32 here but int8 lighter still; under memory pressure with
    fp32 active, no choice may be heavier than fp32, and a heavier richer rung is never
    stepped up to while memory is short."""
    board = Board(slowdown=lambda _t: 1.0, headroom=lambda _t: 10.0)
    board.run(0, 30)
    assert board.swaps
    memory = {r.name: r.memory_mb for r in LADDER}
    for _t, old, new, reason in board.swaps:
        assert reason == "memory"
        assert memory[new] is not None and memory[old] is not None
        assert memory[new] < memory[old]


def test_a_step_up_waits_for_memory_headroom() -> None:
    """After a memory step down, the policy climbs back only when the richer variant would
    still leave memory_calm_mb of headroom."""
    board = Board(slowdown=lambda _t: 1.0, headroom=lambda t: 10.0 if t < 10 else 130.0)
    board.run(0, 120)
    assert board.swaps[0][3] == "memory"
    assert board.swaps[0][2] == "tiny"
    assert all(s[3] != "calm" for s in board.swaps), "130 MB cannot take 6 MB more at 128"

    roomy = Board(slowdown=lambda _t: 1.0, headroom=lambda t: 10.0 if t < 10 else 400.0)
    roomy.run(0, 200)
    assert next(s[3] for s in roomy.swaps) == "memory"
    assert roomy.active == "fp32", roomy.swaps


def test_without_latency_figures_the_objective_is_derived_and_predictions_scale() -> None:
    """The default objective is slo_factor x the richest rung's latency, the manifest's or
    this device's when lower (at least slo_min_ms); predictions scale the observed compute
    by each rung's latency."""
    assert objective(LADDER, None, CFG) == max(CFG.slo_min_ms, CFG.slo_factor * 4.0)
    assert objective(LADDER, 7.0, CFG) == 7.0
    # Measured faster on this device than in the manifest: the objective follows the device.
    assert objective(LADDER, None, CFG, richest_here_ms=3.0) == max(
        CFG.slo_min_ms, CFG.slo_factor * 3.0
    )
    assert objective(LADDER, None, CFG, richest_here_ms=9.0) == max(
        CFG.slo_min_ms, CFG.slo_factor * 4.0
    )
    view = ModelView(
        "m",
        LADDER,
        "fp32",
        12.0,
        observed_p95_ms=10.0,
        observed_infer_p95_ms=8.0,
        observed_count=50,
    )
    predicted = predict(view)
    assert predicted["int8"] == 2.0 + 8.0 * 2.0 / 4.0


def test_thermal_pressure_steps_one_rung_cheaper_in_compute() -> None:
    """A CPU over its trip point moves one step to a variant measured cheaper in latency."""
    history = [snap(t, cpu_temperature_c=90.0, cpu_temperature_max_c=85.0) for t in range(10)]
    view = ModelView("m", LADDER, "fp32", 12.0, observed_p95_ms=4.0, observed_count=50)
    state = PolicyState()
    decisions: dict[str, Decision] = {}
    for t in range(10):
        decisions, state = decide(history[: t + 1], [view], CFG, state, float(t))
    assert decisions["m"].desired == "int8"
    assert decisions["m"].reason == "thermal"


def replace_cfg(**changes: float) -> AdaptConfig:
    return CFG.model_copy(update=changes)


def test_cpu_taken_by_others_counts_only_above_cpu_busy_percent() -> None:
    """Others taking all the CPU is contention under the default threshold, but not with
    cpu_busy_percent at 100 (the signal turned off)."""
    history = [snap(float(t), others_cpu=100.0) for t in range(30)]
    assert board_signals(history, CFG, 29.0).cpu_contended
    off = CFG.model_copy(update={"cpu_busy_percent": 100.0})
    assert not board_signals(history, off, 29.0).cpu_contended


def test_a_busy_board_does_not_keep_a_model_down_when_its_own_figures_say_it_fits() -> None:
    """Others keep the CPU saturated, but this model's observed latency predicts the richer
    rung well within its objective: it steps back up, one step at a time, by its figures."""
    saturated = Board(slowdown=lambda _t: 1.0, others_cpu=lambda _t: 100.0, active="int8")
    saturated.run(0, 60)
    assert saturated.swaps and saturated.swaps[0][1:] == ("int8", "fp32", "calm")


def test_a_step_up_follows_measured_quality_not_ladder_position() -> None:
    """A rung later in the ladder but measured more accurate than the active one is a step
    up: the policy climbs to the cheapest more accurate rung, here straight to pruned-int8
    (int8 is more accurate than fp32 too, but slower and less accurate than pruned-int8);
    a rung only as accurate as the active one (tie) is no step."""
    ladder = (
        RungView("fp32", 0.983, 4.0, 40.0),
        RungView("int8", 0.986, 1.5, 20.0),
        RungView("pruned-int8", 0.989, 0.5, 10.0),
        RungView("tiny", 0.90, 0.3, 6.0),
    )
    board = Board(slowdown=lambda _t: 1.0, ladder=ladder)
    board.run(0, 100)
    assert [s[2] for s in board.swaps] == ["pruned-int8"]
    assert board.decisions[-1].explanation == "serving the richest usable variant"

    tie = (RungView("pruned", 0.975, 0.46, 10.0), RungView("pruned-int8", 0.975, 0.30, 8.0))
    flat = Board(slowdown=lambda _t: 1.0, ladder=tie, active="pruned-int8")
    flat.run(0, 100)
    assert flat.swaps == []


def test_a_queue_that_dominates_the_p95_is_predicted_to_drain_on_a_faster_rung() -> None:
    """Most of the p95 is queue wait: a rung four times faster is predicted to cut the
    queueing as well, so the policy steps down instead of finding no variant that helps."""
    view = ModelView(
        "m",
        LADDER,
        "fp32",
        12.0,
        observed_p95_ms=40.0,
        observed_infer_p95_ms=4.0,
        observed_queue_p95_ms=35.0,
        observed_count=50,
    )
    predicted = predict(view)
    assert predicted["pruned-int8"] == 1.0 + (4.0 + 35.0) * 1.0 / 4.0
    assert predicted["tiny"] is not None and predicted["tiny"] < 12.0 * CFG.down_margin


def test_the_arrival_rate_shows_a_burst_at_the_next_tick_and_keeps_it_for_the_hold() -> None:
    """60 requests/s for 10 s, then 450/s: one second into the burst the policy reads 450/s,
    not the hold's average (190/s), at which int8 would have looked as if it kept up; a
    second after the burst it still reads the hold's rate, and only after the whole hold
    the calm one."""
    stats = ModelStats()
    cfg = AdaptConfig(down_after_s=3.0, interval_s=1.0)
    t = 0.0

    def arrive(rate: float, seconds: float) -> None:
        nonlocal t
        for _ in range(round(rate * seconds)):
            t += 1.0 / rate
            stats.arrived(now=t)

    arrive(60.0, 10.0)
    assert arrival_estimate(stats, cfg, now=t) == pytest.approx(60.0, abs=2.0)
    arrive(450.0, 1.0)
    assert arrival_estimate(stats, cfg, now=t) == pytest.approx(450.0, abs=5.0)
    assert stats.arrival_rate(3.0, now=t) < 200.0  # what the hold alone would have said
    arrive(60.0, 1.0)
    assert arrival_estimate(stats, cfg, now=t) > 150.0
    arrive(60.0, 3.0)
    assert arrival_estimate(stats, cfg, now=t) == pytest.approx(60.0, abs=2.0)


def test_a_queue_that_would_settle_over_the_objective_steps_down_without_waiting_out_the_hold() -> (
    None
):
    """int8 (2 ms) with 20 requests queued, 1 s over a 12 ms objective: at 425 requests/s it
    keeps up (85% busy) but would settle to a 11 ms wait, over the objective once its own
    2 ms are added, so the step down comes now; at 150 requests/s (30% busy) the same
    backlog drains and settles to under a millisecond, so the policy holds."""
    def decision(arrivals: float) -> Decision:
        view = ModelView(
            name="m",
            rungs=LADDER,
            active="int8",
            slo_p95_ms=12.0,
            observed_p95_ms=30.0,
            observed_infer_p95_ms=2.0,
            observed_queue_p95_ms=27.0,
            observed_count=50,
            queued=20,
            service_ms=2.0,
            arrival_per_s=arrivals,
        )
        return decide_over(view, 1.0)

    behind = decision(425.0)
    assert behind.swap and behind.desired in ("pruned-int8", "tiny"), behind
    assert "queued" in behind.explanation
    draining = decision(150.0)
    assert not draining.swap and draining.reason == "hold", draining


def test_each_request_keeps_its_own_rest_where_the_p95s_do_not_add_up() -> None:
    """Half the requests were slow outside the model (8 ms decoding behind a backlog), the
    other half queued 8 ms: the p95s of the parts (rest 0.5 by subtraction, queue 8) say a
    rung eight times faster answers in under 2 ms, but the requests that were slow
    outside the model stay slow on any rung. Scaled request by request, the prediction
    keeps them (8.25 ms); for the active rung it is the observed p95 itself."""
    rows = [(8.0, 2.0, 0.0)] * 50 + [(0.5, 2.0, 8.0)] * 50
    samples = np.array(rows, dtype=np.float64)
    total = samples.sum(axis=1)
    view = ModelView(
        "m",
        LADDER,
        "fp32",
        12.0,
        observed_p95_ms=float(np.percentile(total, 95)),
        observed_infer_p95_ms=2.0,
        observed_queue_p95_ms=8.0,
        observed_count=100,
    )
    by_p95s = predict(view)["tiny"]
    assert by_p95s is not None and by_p95s < 2.0
    predicted = predict(replace(view, samples=samples))
    assert predicted["tiny"] == pytest.approx(8.0 + 2.0 / 8.0)
    assert predicted["fp32"] == pytest.approx(view.observed_p95_ms)


def test_the_objective_counts_what_the_broker_adds_to_the_round_trip() -> None:
    """int8 answers within the 12 ms objective in the agent (9 ms p95), but its clients
    wait 4 ms more in the broker under today's load: 13 ms, over it. Held, that steps
    down to a rung predicted within the objective broker and all; counting nothing for
    the broker, the policy would see no reason to move."""

    def decision(transport: float) -> Decision:
        view = ModelView(
            name="m",
            rungs=LADDER,
            active="int8",
            slo_p95_ms=12.0,
            observed_p95_ms=9.0,
            observed_infer_p95_ms=8.0,
            observed_queue_p95_ms=0.5,
            observed_count=50,
            transport_ms=transport,
        )
        return decide_over(view, 4.0)

    counted = decision(4.0)
    assert counted.swap and counted.desired == "pruned-int8", counted
    assert "4.00 of it the broker's" in counted.explanation
    assert counted.predicted_p95_ms["pruned-int8"] == pytest.approx(0.5 + 4.25 + 4.0)
    assert counted.figures["transport_ms"] == 4.0
    uncounted = decision(0.0)
    assert not uncounted.swap, uncounted


def test_variant_samples_split_each_request_into_rest_inference_and_queue() -> None:
    """Rows as the workers record them: the rest is what neither inference nor the queue
    took (never below 0), a probe is all inference; another variant's rows stay out."""
    stats = ModelStats()
    stats.record(10.0, ok=True, variant="a", infer_ms=4.0, queue_ms=5.0, ahead=2)
    stats.record(3.0, ok=True, variant="a", infer_ms=2.0, queue_ms=1.5)  # clocks disagree
    stats.record(9.0, ok=True, variant="b", infer_ms=9.0)
    stats.record_probe("a", 6.0)
    rows = stats.variant_samples("a", 60.0).tolist()
    assert rows == [[1.0, 4.0, 5.0, 2.0], [0.0, 2.0, 1.5, 0.0], [0.0, 6.0, 0.0, 0.0]]
    assert stats.variant_samples("a", 60.0, now=time.monotonic() + 120.0).shape == (0, 4)


def test_a_wait_for_a_worker_to_wake_does_not_shrink_on_a_faster_rung() -> None:
    """int8 (2 ms) under contention: every request waited 6 ms in the queue with nobody
    ahead of it: that is the time a worker took to wake, which a rung four times faster
    does not change (tiny predicted at 6 + 0.5 ms, not 1.5 + 0.5). The same wait
    behind three others (3 x 2 ms of backlog) does drain four times faster."""
    def view(ahead: float) -> ModelView:
        samples = np.array([(0.0, 2.0, 6.0, ahead)] * 40, dtype=np.float64)
        return ModelView(
            "m",
            LADDER,
            "int8",
            12.0,
            observed_p95_ms=8.0,
            observed_infer_p95_ms=2.0,
            observed_queue_p95_ms=6.0,
            observed_count=40,
            service_ms=2.0,
            samples=samples,
        )

    assert predict(view(0.0))["tiny"] == pytest.approx(6.0 + 0.5)
    assert predict(view(3.0))["tiny"] == pytest.approx(1.5 + 0.5)
    assert predict(view(0.0))["int8"] == pytest.approx(8.0)


def test_nothing_meets_the_objective_the_most_accurate_rung_near_the_lightest_goes() -> None:
    """The demo's lower rungs: under a burst the broker's share (8 ms) dominates every
    prediction, and no rung meets 12 ms. pruned75 (0.951) is predicted at 12.0 ms, the
    lightest pruned88 (0.881) at 11.56: within 5%, so the step goes to pruned75 — seven
    points of accuracy for 4% of predicted p95 is no trade. Without the broker's share
    weighing on both, the lightest is far enough ahead to be taken."""
    ladder = (
        RungView("p50", 0.975, 0.54, 10.0),
        RungView("p75", 0.951, 0.27, 8.0),
        RungView("p88", 0.881, 0.23, 7.0),
    )

    def decision(transport: float, infer: float) -> Decision:
        view = ModelView(
            name="m",
            rungs=ladder,
            active="p50",
            slo_p95_ms=12.0,
            observed_p95_ms=1.0 + infer,
            observed_infer_p95_ms=infer,
            observed_queue_p95_ms=0.0,
            observed_count=50,
            transport_ms=transport,
        )
        return decide_over(view, 4.0)

    near = decision(8.0, 6.0)
    assert near.predicted_p95_ms["p75"] == pytest.approx(12.0)
    assert near.desired == "p75", near
    assert "within 5% of the lightest" in near.explanation
    far = decision(0.0, 40.0)  # p75 at 21 ms, p88 at 18: 17% apart
    assert far.desired == "p88", far
