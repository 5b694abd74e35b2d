"""The adapting agent end to end over a real broker: scripted resource figures (a fake
source, so the policy is driven deterministically) move a real ladder down and back up,
and every step is an event, in the retained status and in control/adapt."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.adapt.loop import Adapter
from agent.adapt.monitor import FakeSource, calm_snapshot
from agent.adapt.snapshot import ResourceSnapshot
from agent.broker import MosquittoBroker
from agent.config import AdaptConfig, AgentConfig, ModelsConfig
from agent.control import ControlCommands
from agent.models import ModelManager
from agent.service import Agent
from agent.session import SessionSettings
from tests import onnx_models
from tests.conftest import Probe, agent_config

SIGNATURE = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}
# name, factor, accuracy, latency_ms, peak_rss_mb: a ladder that differs in memory.
RUNGS = [
    ("big", 2.0, 0.98, 0.05, 100.0),
    ("mid", 3.0, 0.97, 0.04, 50.0),
    ("small", 5.0, 0.90, 0.03, 10.0),
]
FAST = {
    "interval_s": 0.1,
    "down_after_s": 0.4,
    "up_after_s": 1.0,
    "cooldown_s": 0.3,
    "memory_low_mb": 64.0,
    "memory_calm_mb": 128.0,
    "probe_interval_s": 0.2,
    # Memory is what these tests drive: a loaded test machine must not look like latency
    # pressure (the fleet test sets its own, impossible, objective).
    "objectives": {"lad": {"slo_p95_ms": 10_000.0}},
}


def ladder(models: Path, name: str = "lad") -> Path:
    build = models.parent / "build"
    variants = [
        (rung, onnx_models.scale_model(build / f"{rung}.onnx", factor=factor))
        for rung, factor, *_ in RUNGS
    ]
    folder = onnx_models.ladder_folder(models / name, variants, **SIGNATURE)
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry, (_, _, accuracy, latency, memory) in zip(manifest["variants"], RUNGS, strict=True):
        entry["metrics"] = {"accuracy": accuracy, "latency_ms": latency, "peak_rss_mb": memory}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


class Board:
    """Memory headroom the test sets; every other figure calm."""

    def __init__(self) -> None:
        self.headroom = 4000.0

    def __call__(self, now: float) -> ResourceSnapshot:
        return calm_snapshot(now, memory_available_mb=self.headroom)


@pytest.fixture
def adapting(broker: MosquittoBroker, tmp_path: Path) -> Iterator[tuple[Agent, Board]]:
    models = tmp_path / "models"
    models.mkdir()
    ladder(models)
    board = Board()
    config = agent_config(broker.port, models, adapt=FAST)
    agent = Agent(config, resources=FakeSource(board))
    agent.start()
    assert agent.frontend is not None and agent.frontend.wait_connected(10)
    yield agent, board
    agent.request_stop()
    agent.stop(drain_timeout=10)


def swaps(probe: Probe, until: float) -> list[dict[str, Any]]:
    """variant_swapped events until the monotonic time `until`."""
    seen = []
    while time.monotonic() < until:
        try:
            msg = probe.expect(timeout=max(0.05, until - time.monotonic()))
        except AssertionError:
            break
        if msg.topic.endswith("/events"):
            event = json.loads(msg.payload)
            if event["event"] == "variant_swapped":
                seen.append(event)
    return seen


def wait_for_swap(probe: Probe, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = probe.expect(timeout=deadline - time.monotonic())
        if msg.topic.endswith("/events"):
            event = json.loads(msg.payload)
            if event["event"] == "variant_swapped":
                return event
    raise AssertionError("no variant_swapped event")


def control(probe: Probe, topic: str, command: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = probe.request(f"{topic}/control/{command}", json.dumps(body))
    result: dict[str, Any] = json.loads(reply.payload)
    return result


def infer(probe: Probe, topic: str) -> dict[str, Any]:
    payload = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
    reply = probe.request(f"{topic}/infer/lad", json.dumps(payload))
    result: dict[str, Any] = json.loads(reply.payload)
    return result


def test_memory_pressure_steps_down_by_measured_memory_and_calm_climbs_back(
    adapting: tuple[Agent, Board], probe: Probe, broker: MosquittoBroker
) -> None:
    """Headroom falls to 20 MB: the model steps down to the variant that frees enough
    (event, status and control/adapt say why); back at 4 GB it climbs one rung at a time
    to the richest, and requests are answered by whichever variant is active."""
    agent, board = adapting
    topic = agent.config.mqtt.device_topic
    probe.subscribe(f"{topic}/events")
    assert infer(probe, topic)["model_version"] == "big"

    board.headroom = 20.0
    down = wait_for_swap(probe)
    assert down["from"] == "big" and down["to"] == "small" and down["reason"] == "memory"
    assert "headroom" in down["figures"]["explanation"]
    assert down["figures"]["memory_headroom_mb"] == 20.0
    assert infer(probe, topic)["model_version"] == "small"

    view = control(probe, topic, "adapt", {"model": "lad"})
    assert view["board"]["memory_short"] is True
    lad = view["models"]["lad"]
    assert lad["active"] == "small" and lad["reason"] in ("memory", "hold")
    assert [v["name"] for v in lad["variants"]] == ["big", "mid", "small"]

    # Status publications are coalesced: the one after the swap follows within moments.
    deadline = time.monotonic() + 10
    status = json.loads(retained_status(broker, topic))
    while status["models"]["lad"]["active"] != "small" and time.monotonic() < deadline:
        time.sleep(0.2)
        status = json.loads(retained_status(broker, topic))
    assert status["models"]["lad"]["active"] == "small"
    assert status["models"]["lad"]["reason"] == "memory"

    board.headroom = 4000.0
    ups = [wait_for_swap(probe), wait_for_swap(probe)]
    assert [(u["from"], u["to"], u["reason"]) for u in ups] == [
        ("small", "mid", "calm"),
        ("mid", "big", "calm"),
    ]
    assert infer(probe, topic)["model_version"] == "big"
    assert swaps(probe, time.monotonic() + 1.5) == [], "no further swap once calm at the top"


def retained_status(broker: MosquittoBroker, topic: str) -> bytes:
    """The retained status, read by a fresh subscription."""
    reader = Probe(broker.port)
    try:
        reader.subscribe(f"{topic}/status")
        return bytes(reader.expect(f"{topic}/status").payload)
    finally:
        reader.close()


def test_a_pin_beats_the_policy_and_unpin_hands_back(
    adapting: tuple[Agent, Board], probe: Probe
) -> None:
    """Pinned to big, the model stays there under memory pressure; after unpin the policy
    steps it down."""
    agent, board = adapting
    topic = agent.config.mqtt.device_topic
    probe.subscribe(f"{topic}/events")
    assert control(probe, topic, "pin", {"model": "lad", "variant": "big"})["active"] == "big"
    board.headroom = 20.0
    assert swaps(probe, time.monotonic() + 1.5) == []
    view = control(probe, topic, "adapt", {})
    assert view["models"]["lad"]["reason"] == "pinned"
    control(probe, topic, "unpin", {"model": "lad"})
    assert wait_for_swap(probe)["reason"] == "memory"


def test_with_adapt_disabled_nothing_moves(
    broker: MosquittoBroker, tmp_path: Path, probe: Probe
) -> None:
    """adapt.enabled = false gives the agent of old: no policy, control/adapt says so."""
    models = tmp_path / "models"
    models.mkdir()
    ladder(models)
    board = Board()
    board.headroom = 5.0
    config = agent_config(broker.port, models, adapt={**FAST, "enabled": False})
    agent = Agent(config, resources=FakeSource(board))
    agent.start()
    try:
        assert agent.frontend is not None and agent.frontend.wait_connected(10)
        topic = config.mqtt.device_topic
        probe.subscribe(f"{topic}/events")
        assert swaps(probe, time.monotonic() + 1.5) == []
        assert control(probe, topic, "adapt", {}) == {"enabled": False, "models": {}}
    finally:
        agent.request_stop()
        agent.stop(drain_timeout=10)


def test_control_adapt_waits_for_an_adapter_the_agent_is_still_starting(tmp_path: Path) -> None:
    """Asked while the agent already serves but has not yet started its adapter (it does so
    once the front end connects), control/adapt waits for it and answers with the
    policy's view, not that adapting is off."""
    manager = ModelManager(
        ModelsConfig(dir=tmp_path), SessionSettings(threads=1), lambda *_a, **_k: None
    )
    control = ControlCommands(manager)
    control.expect_adapter()
    adapter = Adapter(
        manager, AdaptConfig(), lambda: (), pinned=lambda _name: None, emit=lambda *_a, **_k: None
    )
    starting = threading.Timer(0.2, lambda: setattr(control, "adapter", adapter))
    starting.start()
    try:
        view = control.adapt({})
    finally:
        starting.join()
    assert view["enabled"] is True and "board" in view, view
    assert ControlCommands(manager).adapt({}) == {"enabled": False, "models": {}}


def test_policy_swaps_are_not_the_next_boots_starting_variant(
    broker: MosquittoBroker, tmp_path: Path, probe: Probe
) -> None:
    """A step down by the policy is not recorded as last known good: after a restart the
    model starts on its richest variant again (a pin would be kept)."""
    models = tmp_path / "models"
    models.mkdir()
    ladder(models)
    state = tmp_path / "state"
    board = Board()
    config = agent_config(broker.port, models, adapt=FAST, state={"dir": state})
    agent = Agent(config, resources=FakeSource(board))
    agent.start()
    try:
        assert agent.frontend is not None and agent.frontend.wait_connected(10)
        probe.subscribe(f"{config.mqtt.device_topic}/events")
        board.headroom = 20.0
        assert wait_for_swap(probe)["to"] == "small"
    finally:
        agent.request_stop()
        agent.stop(drain_timeout=10)
    saved = json.loads((state / "state.json").read_text())
    assert saved["models"]["lad"]["last_good"] == "big"
    again = Agent(config, resources=FakeSource(Board()))
    again.start()
    try:
        assert again.manager.get("lad").active_name == "big"
    finally:
        again.request_stop()
        again.stop(drain_timeout=10)


def test_metrics_carry_per_variant_figures(adapting: tuple[Agent, Board], probe: Probe) -> None:
    """The metrics body lists, per model, each variant's recent p50/p95, queue wait and
    request count, recorded before the reply (read right after it, no waiting)."""
    agent, _board = adapting
    topic = agent.config.mqtt.device_topic
    for _ in range(5):
        infer(probe, topic)
    figures = agent.metrics()["models"]["lad"]
    big = figures["variants"]["big"]
    assert big["count"] - big["probes"] >= 5
    assert big["p95_ms"] is not None and big["queue_p95_ms"] is not None
    assert figures["requests"] >= 5
    assert "memory_headroom_mb" in agent.metrics()["resources"]


def test_the_policy_counts_the_broker_round_trip_it_measures_through_the_real_broker(
    adapting: tuple[Agent, Board], probe: Probe
) -> None:
    """The agent's echoes come back through mosquitto: control/adapt shows what the broker
    adds (two trips: the request's and the reply's), counted in each predicted p95."""
    agent, _board = adapting
    topic = agent.config.mqtt.device_topic
    for _ in range(6):
        infer(probe, topic)
    deadline = time.monotonic() + 10.0
    transport = 0.0
    body: dict[str, object] = {}
    while time.monotonic() < deadline and not transport:
        body = control(probe, topic, "adapt", {"model": "lad"})["models"]["lad"]
        transport = body["figures"]["transport_ms"] or 0.0  # type: ignore[index]
        time.sleep(0.1)
    assert 0.0 < transport < 1000.0, json.dumps(body)
    predicted = body["predicted_p95_ms"]
    assert all(p is None or p >= transport for p in predicted.values()), predicted  # type: ignore[union-attr]


def test_a_fleet_member_leaves_the_shared_subscription_while_it_cannot_keep_up(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """When even the lightest variant misses the objective, the model's fleet subscription
    is left (fleet requests go to the other agent of the group) and device requests are
    still served; after calm it rejoins."""
    models = tmp_path / "models"
    models.mkdir()
    ladder(models)
    group = f"g{uuid.uuid4().hex[:6]}"

    def figures(now: float) -> ResourceSnapshot:
        return calm_snapshot(now)

    adapt = {**FAST, "objectives": {"lad": {"slo_p95_ms": 0.000001}}}
    config = agent_config(broker.port, models, adapt=adapt, mqtt={"fleet_group": group})
    agent = Agent(config, resources=FakeSource(figures))
    agent.start()
    try:
        assert agent.frontend is not None and agent.frontend.wait_connected(10)
        probe = Probe(broker.port)
        probe.subscribe(f"{config.mqtt.device_topic}/events")
        deadline = time.monotonic() + 15
        left = None
        while time.monotonic() < deadline and left is None:
            msg = probe.expect(timeout=deadline - time.monotonic())
            event = json.loads(msg.payload)
            if event["event"] == "fleet_left":
                left = event
        assert left is not None and left["model"] == "lad"
        fleet_topic = f"$share/{group}/edge/fleet/infer/lad"
        assert fleet_topic not in agent.frontend.subscriptions
        assert infer(probe, config.mqtt.device_topic)["model_name"] == "lad"
        probe.close()
    finally:
        agent.request_stop()
        agent.stop(drain_timeout=10)


BURST = 240
WIDE = 1024  # MatMul width: 330 of them take 10-60 ms at batch 1 on one thread here


def slow_ladder(models: Path) -> None:
    """`slow`: a 20 ms rung (MatMul chain) and a light one, accuracy 0.98 and 0.90."""
    build = models.parent / "build"
    big = onnx_models.slow_model(build / "big.onnx", width=WIDE, layers=330)
    small = onnx_models.slow_model(build / "small.onnx", width=WIDE, layers=12)
    folder = onnx_models.ladder_folder(
        models / "slow",
        [("big", big), ("small", small)],
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, WIDE]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, WIDE]}],
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry, (accuracy, latency) in zip(
        manifest["variants"], ((0.98, 20.0), (0.90, 1.0)), strict=True
    ):
        entry["metrics"] = {"accuracy": accuracy, "latency_ms": latency}
    manifest["batching"] = False  # one request per run: a queue's work is its depth
    (folder / "manifest.json").write_text(json.dumps(manifest))


def send_burst(probe: Probe, topic: str, reply_to: str, count: int, seconds: float) -> None:
    """`count` requests at an even pace over `seconds`, none waiting for its reply; each
    request's correlation data is its number."""
    payload = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, WIDE], "datatype": "FP32", "data": [0.0] * WIDE}]}
    )
    for n in range(count):
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = reply_to
        properties.CorrelationData = str(n).encode()
        probe.publish(topic, payload, properties)
        time.sleep(seconds / count)


def ticking_agent(config: AgentConfig) -> Agent:
    """An agent on a calm fake board, connected, its adapter started and past its first
    tick (which arms the queues' alarms)."""
    agent = Agent(config, resources=FakeSource(calm_snapshot))
    agent.start()
    assert agent.frontend is not None and agent.frontend.wait_connected(10)
    deadline = time.monotonic() + 10
    while (agent.adapter is None or agent.adapter.ticks < 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.adapter is not None
    return agent


def test_a_burst_that_swamps_the_queue_is_acted_on_at_once_not_at_the_next_tick(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """Ticks 60 s apart and a 60 s hold: only the queue's depth alarm can bring the step
    down forward. 240 requests in half a second pile up behind a slow rung (declared 20 ms)
    against a 60 ms objective; the model steps down to the light rung within seconds, for
    the swamped queue, and every request is answered once."""
    models = tmp_path / "models"
    slow_ladder(models)
    adapt = {
        "interval_s": 60.0,
        "down_after_s": 60.0,
        "objectives": {"slow": {"slo_p95_ms": 60.0}},
    }
    config = agent_config(broker.port, models, adapt=adapt, models={"inline_max_ms": 0.0})
    # The adapter starts once the front end serves, and ticks at once: that arms the alarm.
    agent = ticking_agent(config)
    probe = Probe(broker.port)
    try:
        assert agent.adapter is not None and agent.adapter.ticks == 1
        topic = config.mqtt.device_topic
        probe.subscribe(f"{topic}/events")
        reply_to = f"test/replies/{uuid.uuid4().hex[:8]}"
        probe.subscribe(reply_to)
        started = time.monotonic()
        send_burst(probe, f"{topic}/infer/slow", reply_to, BURST, seconds=0.5)
        swap: dict[str, Any] | None = None
        answered: Counter[bytes] = Counter()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (swap is None or sum(answered.values()) < BURST):
            try:
                msg = probe.expect(timeout=max(0.05, deadline - time.monotonic()))
            except AssertionError:
                break
            if msg.topic == reply_to:
                answered[msg.properties.CorrelationData] += 1
                assert "error" not in json.loads(msg.payload), msg.payload
            elif json.loads(msg.payload)["event"] == "variant_swapped":
                swap = json.loads(msg.payload)
                took = time.monotonic() - started
        assert swap is not None, f"no step down in {agent.adapter.ticks} ticks"
        assert (swap["from"], swap["to"]) == ("big", "small")
        assert "queued" in swap["figures"]["explanation"], swap
        assert took < 20.0, f"stepped down after {took:.1f} s: that was a regular tick"
        assert agent.adapter.ticks >= 2
        assert len(answered) == BURST and set(answered.values()) == {1}
    finally:
        probe.close()
        agent.request_stop()
        agent.stop(drain_timeout=10)


def test_a_queue_that_stays_deep_with_nothing_to_change_is_looked_at_less_and_less(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """The slow rung alone (nothing lighter to go to) under the same burst: its queue stays
    deep for seconds and every look changes nothing, so each waits twice as long as the
    one before (0.1, 0.2, 0.4 s ...): a handful of looks, where a look every 0.1 s would
    have been dozens, each holding the interpreter from the workers. Pinned, the queue
    rings no alarm at all."""
    models = tmp_path / "models"
    slow_ladder(models)
    manifest_path = models / "slow" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["variants"] = manifest["variants"][:1]
    manifest_path.write_text(json.dumps(manifest))
    adapt = {"interval_s": 60.0, "objectives": {"slow": {"slo_p95_ms": 60.0}}}
    config = agent_config(broker.port, models, adapt=adapt, models={"inline_max_ms": 0.0})
    agent = ticking_agent(config)
    probe = Probe(broker.port)
    try:
        assert agent.adapter is not None
        topic = config.mqtt.device_topic
        reply_to = f"test/replies/{uuid.uuid4().hex[:8]}"
        probe.subscribe(reply_to)
        before = agent.adapter.ticks
        send_burst(probe, f"{topic}/infer/slow", reply_to, BURST, seconds=0.5)
        answered = 0
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and answered < BURST:
            if probe.expect(reply_to, timeout=max(0.05, deadline - time.monotonic())):
                answered += 1
        assert answered == BURST
        looks = agent.adapter.ticks - before
        assert 2 <= looks <= 10, f"{looks} looks while the queue drained"
        # The look the drained queue still had due (its wait doubled by then) comes first.
        settle = time.monotonic() + 20
        seen = agent.adapter.ticks
        quiet_since = time.monotonic()
        while time.monotonic() < settle and time.monotonic() - quiet_since < 4.0:
            time.sleep(0.1)
            if agent.adapter.ticks != seen:
                seen, quiet_since = agent.adapter.ticks, time.monotonic()
        pinned = control(probe, topic, "pin", {"model": "slow", "variant": "big"})
        assert pinned["pinned"] == "big", pinned
        agent.adapter.tick()  # the look after the pin: it sets the alarms
        before = agent.adapter.ticks
        send_burst(probe, f"{topic}/infer/slow", reply_to, BURST // 2, seconds=0.25)
        for _ in range(BURST // 2):
            probe.expect(reply_to, timeout=40)
        assert agent.adapter.ticks == before, "a pinned model's queue rang the adapter"
    finally:
        probe.close()
        agent.request_stop()
        agent.stop(drain_timeout=10)
