"""Persisted state: pins and last known good variants survive a restart, the file is
replaced atomically, and pin/unpin work over the control topic."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.broker import MosquittoBroker
from agent.service import Agent
from agent.state import STATE_FILE, StateStore
from tests import onnx_models
from tests.conftest import Probe, RunningAgent, body
from tests.service.conftest import wait_subscribed

LADDER_SPEC = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}


@pytest.fixture
def ladder_dir(tmp_path: Path) -> Path:
    """A model directory with one model, `lad`, whose two variants answer differently."""
    directory = tmp_path / "ladder-models"
    big = onnx_models.scale_model(tmp_path / "build" / "big.onnx", factor=2.0)
    small = onnx_models.scale_model(tmp_path / "build" / "small.onnx", factor=3.0)
    onnx_models.ladder_folder(directory / "lad", [("big", big), ("small", small)], **LADDER_SPEC)
    return directory


def started(probe: Probe, agent: RunningAgent) -> RunningAgent:
    wait_subscribed(probe, agent.topic)
    return agent


def control(probe: Probe, agent: RunningAgent | Agent, command: str, **payload: str) -> dict:
    topic = f"{agent.config.mqtt.device_topic}/control/{command}"
    return body(probe.request(topic, json.dumps(payload)))


def answering_variant(probe: Probe, agent: RunningAgent) -> str:
    request = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0] * 4}]}
    reply = body(probe.request(f"{agent.topic}/infer/lad", json.dumps(request)))
    version: str = reply["model_version"]
    return version


def test_state_round_trips_through_a_new_store(tmp_path: Path) -> None:
    """Pins and last known good variants written by one store are read by the next."""
    store = StateStore(tmp_path)
    store.load()
    store.pin("lad", "small")
    store.record_good("lad", "small")
    store.record_good("other", "int8")
    again = StateStore(tmp_path)
    again.load()
    assert again.pinned("lad") == "small"
    assert again.preferred("other") == "int8"
    assert again.unpin("lad")
    assert not again.unpin("lad")
    third = StateStore(tmp_path)
    third.load()
    assert third.pinned("lad") is None
    assert third.last_good("lad") == "small"
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]


def test_a_failed_write_leaves_the_previous_state_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the rename never happens (a crash, a full disk), the old file is still whole."""
    store = StateStore(tmp_path)
    store.pin("lad", "big")
    before = (tmp_path / STATE_FILE).read_text()

    def crash(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    store.pin("lad", "small")  # logged, not raised: serving goes on
    monkeypatch.undo()
    assert (tmp_path / STATE_FILE).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]


def test_a_corrupt_state_file_is_kept_aside_and_the_agent_starts_afresh(tmp_path: Path) -> None:
    """An unreadable state file does not stop the agent; it is renamed for a human to read."""
    (tmp_path / STATE_FILE).write_text('{"format": 1, "models": {"lad": {"pinned": 5')
    store = StateStore(tmp_path)
    store.load()
    assert store.pinned("lad") is None
    assert (tmp_path / f"{STATE_FILE}.corrupt").exists()


def test_a_pin_over_mqtt_switches_the_variant_and_survives_a_restart(
    start_agent: Callable[..., RunningAgent], probe: Probe, ladder_dir: Path, tmp_path: Path
) -> None:
    """`control/pin` switches the served variant at once; a new agent on the same state
    directory starts on the pinned variant."""
    state_dir = tmp_path / "state"
    first = started(probe, start_agent(ladder_dir, state={"dir": state_dir}))
    assert answering_variant(probe, first) == "big"
    reply = control(probe, first, "pin", model="lad", variant="small")
    assert reply == {"model": "lad", "pinned": "small", "active": "small"}
    assert answering_variant(probe, first) == "small"
    saved = json.loads((state_dir / STATE_FILE).read_text())
    assert saved["models"]["lad"] == {"pinned": "small", "last_good": "small"}
    first.stop()

    second = started(probe, start_agent(ladder_dir, state={"dir": state_dir}))
    assert second.agent.manager.get("lad").active.name == "small"
    assert answering_variant(probe, second) == "small"


def test_the_last_known_good_variant_is_where_a_restart_begins(
    start_agent: Callable[..., RunningAgent], probe: Probe, ladder_dir: Path, tmp_path: Path
) -> None:
    """After an unpin the variant in use is remembered as last known good and restored."""
    state_dir = tmp_path / "state"
    first = started(probe, start_agent(ladder_dir, state={"dir": state_dir}))
    control(probe, first, "pin", model="lad", variant="small")
    reply = control(probe, first, "unpin", model="lad")
    assert reply == {"model": "lad", "pinned": None, "was_pinned": True, "active": "small"}
    first.stop()
    second = started(probe, start_agent(ladder_dir, state={"dir": state_dir}))
    assert second.agent.state.pinned("lad") is None
    assert answering_variant(probe, second) == "small"


def test_pins_of_unknown_models_or_variants_are_refused(
    start_agent: Callable[..., RunningAgent], probe: Probe, ladder_dir: Path
) -> None:
    """A pin naming no loaded model (404) or no variant of it (400) changes nothing."""
    agent = started(probe, start_agent(ladder_dir))
    assert control(probe, agent, "pin", model="nope", variant="small")["code"] == 404
    bad = control(probe, agent, "pin", model="lad", variant="tiny")
    assert bad["code"] == 400
    assert "no variant 'tiny'" in bad["error"]
    assert control(probe, agent, "pin", model="lad")["code"] == 400
    assert agent.agent.manager.get("lad").active.name == "big"
    assert agent.agent.state.pinned("lad") is None


def test_the_agent_uses_systemds_state_directory_when_none_is_configured(
    broker: MosquittoBroker,
    ladder_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make_agent: Callable[..., Agent],
) -> None:
    """$STATE_DIRECTORY (StateDirectory= in the unit) is where state goes by default."""
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "systemd-state"))
    agent = make_agent(broker.port, models=ladder_dir)
    assert agent.state.path == tmp_path / "systemd-state" / STATE_FILE
    assert json.loads(agent.state.path.read_text())["models"]["lad"]["last_good"] == "big"
