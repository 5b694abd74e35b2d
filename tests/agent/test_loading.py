"""Loads run on the loader thread, each bounded by models.load_timeout_s: a model whose load
(here its warm-up) takes too long is abandoned, reported and shown by the health check,
while other models go on loading; the retained status is republished coalesced.
Real agent, real watched directory, real onnxruntime warm-ups."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.broker import MosquittoBroker
from tests import onnx_models
from tests.agent.test_watcher import REQUEST, events_named, recording, serves, wait_until
from tests.conftest import Probe, RunningAgent, body
from tests.stuck_model import loop_model, trips_for_seconds

# Far above a normal load even on a busy machine, far below the four-second warm-ups.
BOUND = {"settle_s": 0.1, "load_timeout_s": 1.0}
LOOP_REQUEST = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [0.0]}]}
)


@pytest.fixture(scope="module")
def four_seconds(tmp_path_factory: pytest.TempPathFactory) -> int:
    """Loop trips that keep one warm-up busy for about four seconds on this machine."""
    return trips_for_seconds(tmp_path_factory.mktemp("calibrate"), 4.0)


def test_a_load_past_its_bound_is_abandoned_while_other_pushes_load(
    start_agent: Callable[..., RunningAgent], tmp_path: Path, probe: Probe, four_seconds: int
) -> None:
    """A push whose warm-up outlasts load_timeout_s is reported as stuck and by the health
    check; a push after it loads and serves meanwhile; once the slow load ends, the model
    serves and the health check is clean again."""
    directory = tmp_path / "watched"
    directory.mkdir()
    agent = recording(start_agent(directory, models=BOUND))
    loop_model(directory / "slow.onnx", four_seconds)
    wait_until(lambda: bool(events_named(agent, "model_load_stuck")))
    (stuck,) = events_named(agent, "model_load_stuck")
    assert stuck["model"] == "slow"
    assert any("slow: load stuck" in p for p in agent.agent.degradations())
    assert agent.agent.health_problems(60.0) == []  # the watchdog is still fed

    onnx_models.scale_model(directory / "quick.onnx")
    wait_until(lambda: serves(agent, "quick"))
    assert [name for name, _ in agent.agent.loader.stuck()] == ["slow"]  # still warming up
    reply = body(probe.request(f"{agent.topic}/infer/quick", REQUEST))
    assert reply["outputs"][0]["data"] == [3.0] * 4

    wait_until(lambda: serves(agent, "slow"), timeout=60)
    wait_until(lambda: bool(events_named(agent, "model_load_ended")))
    assert events_named(agent, "model_load_ended")[0]["loaded"] is True
    assert agent.agent.degradations() == []
    reply = body(probe.request(f"{agent.topic}/infer/slow", LOOP_REQUEST, timeout=30))
    assert reply["outputs"][0]["data"] == [float(four_seconds)]
    assert len(events_named(agent, "model_load_stuck")) == 1


def test_a_newer_push_of_a_model_stuck_loading_loads_meanwhile(
    start_agent: Callable[..., RunningAgent], tmp_path: Path, probe: Probe, four_seconds: int
) -> None:
    """While a model's load is stuck, a fixed version pushed in its place loads and serves;
    when the stale load ends, the newer files are what the model serves."""
    directory = tmp_path / "watched"
    directory.mkdir()
    agent = recording(start_agent(directory, models=BOUND))
    loop_model(directory / "m.onnx", four_seconds)
    wait_until(lambda: bool(events_named(agent, "model_load_stuck")))
    fixed = onnx_models.scale_model(directory / ".fixed.onnx")
    os.replace(fixed, directory / "m.onnx")
    wait_until(lambda: serves(agent, "m"))
    assert [name for name, _ in agent.agent.loader.stuck()] == ["m"]  # the stale one
    assert body(probe.request(f"{agent.topic}/infer/m", REQUEST))["outputs"][0]["data"] == [3.0] * 4
    wait_until(lambda: bool(events_named(agent, "model_load_ended")), timeout=60)
    wait_until(lambda: agent.agent.manager.get("m").inputs[0].shape == (-1, 4))
    assert body(probe.request(f"{agent.topic}/infer/m", REQUEST))["outputs"][0]["data"] == [3.0] * 4


def test_a_model_slow_to_load_at_start_does_not_hold_the_agent_back(
    start_agent: Callable[..., RunningAgent], tmp_path: Path, probe: Probe, four_seconds: int
) -> None:
    """At start-up each load has the same bound: the agent connects and serves its other
    models while the slow one is still warming up."""
    directory = tmp_path / "at-start"
    directory.mkdir()
    loop_model(directory / "slow.onnx", four_seconds)
    onnx_models.scale_model(directory / "scale.onnx")
    agent = start_agent(directory, models=BOUND)
    assert agent.agent.frontend is not None and agent.agent.frontend.connected
    assert [name for name, _ in agent.agent.loader.stuck()] == ["slow"]
    assert agent.agent.manager.names() == ["scale"]
    reply = body(probe.request(f"{agent.topic}/infer/scale", REQUEST))
    assert reply["outputs"][0]["data"] == [3.0] * 4
    wait_until(lambda: serves(agent, "slow"), timeout=60)


def test_status_is_republished_coalesced_when_many_models_load(
    start_agent: Callable[..., RunningAgent], tmp_path: Path, broker: MosquittoBroker
) -> None:
    """Forty models pushed at once give far fewer than forty status publications, and the
    last one lists every model."""
    directory = tmp_path / "watched"
    directory.mkdir()
    agent = start_agent(directory, models={"settle_s": 0.2})
    status = Probe(broker.port)
    try:
        status.subscribe(f"{agent.topic}/status")
        status.expect(f"{agent.topic}/status")  # the retained one
        staging = directory / ".staging"
        names = [f"m{index:02d}" for index in range(40)]
        for name in names:
            onnx_models.scale_model(staging / f"{name}.onnx")
        for name in names:
            os.rename(staging / f"{name}.onnx", directory / f"{name}.onnx")
        wait_until(lambda: agent.agent.manager.names() == names, timeout=60)
        published = []
        while True:
            try:
                published.append(json.loads(status.expect(f"{agent.topic}/status", 2.0).payload))
            except AssertionError:
                break
        assert published, "no status after the loads"
        assert sorted(published[-1]["models"]) == names
        assert len(published) < len(names) // 2
    finally:
        status.close()
