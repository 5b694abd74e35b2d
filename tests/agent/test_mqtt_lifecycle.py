"""What the agent says about itself over MQTT: status, last will, events, metrics, control;
and how it survives the broker going away."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.broker import MosquittoBroker, free_port
from tests.conftest import Probe, RunningAgent, agent_config, body, spawn_agent

VALID = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
)


def test_status_is_retained_with_models_and_signatures(agent: RunningAgent, probe: Probe) -> None:
    """A client that subscribes later still gets the status: online, models, active variants."""
    probe.subscribe(f"{agent.topic}/status")
    status = body(probe.expect(f"{agent.topic}/status"))
    assert status["state"] == "online"
    assert status["device"] == agent.config.mqtt.device_id
    digits = status["models"]["digits"]
    assert digits["active"] == "fp32"
    assert digits["variants"][0]["name"] == "fp32"
    assert digits["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert sorted(status["models"]) == ["digits", "pair", "picky", "scale"]


def test_clean_stop_publishes_stopped(
    start_agent: Callable[..., RunningAgent], probe: Probe
) -> None:
    """On a clean stop the retained status becomes `stopped` (not the `offline` last will)."""
    agent = start_agent()
    agent.stop()
    probe.subscribe(f"{agent.topic}/status")
    assert body(probe.expect(f"{agent.topic}/status"))["state"] == "stopped"


@pytest.fixture
def agent_process(
    broker: MosquittoBroker, models_dir: Path
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    device = f"proc-{uuid.uuid4().hex[:6]}"
    process = spawn_agent(broker.port, device, models_dir)
    yield process, device
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=10)


def wait_online(probe: Probe, device: str) -> None:
    probe.subscribe(f"edge/{device}/status")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if body(probe.expect(f"edge/{device}/status", timeout=30))["state"] == "online":
            return
    raise AssertionError("agent never came online")


def test_a_crash_leaves_the_offline_last_will(
    agent_process: tuple[subprocess.Popen[str], str], probe: Probe
) -> None:
    """When the agent dies without saying goodbye, the broker publishes `offline` for it."""
    process, device = agent_process
    wait_online(probe, device)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    assert body(probe.expect(f"edge/{device}/status", timeout=10))["state"] == "offline"


def test_sigterm_stops_cleanly_with_exit_0(
    agent_process: tuple[subprocess.Popen[str], str], probe: Probe
) -> None:
    """SIGTERM: the agent finishes, publishes `stopped`, logs agent_stopped and exits 0."""
    process, device = agent_process
    wait_online(probe, device)
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)  # the agent dumps its threads' stacks
        time.sleep(1)
        process.kill()
        _, stderr = process.communicate()
        raise AssertionError(f"no exit within 30 s of SIGTERM:\n{stderr[-6000:]}") from None
    assert process.returncode == 0
    assert body(probe.expect(f"edge/{device}/status", timeout=10))["state"] == "stopped"
    events = [json.loads(line)["event"] for line in stderr.splitlines() if line.startswith("{")]
    assert events[-1] == "agent_stopped"
    assert "model_loaded" in events


def test_events_emitted_before_connecting_are_published(
    start_agent: Callable[..., RunningAgent],
    probe: Probe,
    broker: MosquittoBroker,
    models_dir: Path,
) -> None:
    """Model loads happen before the broker link; their events are published once connected."""
    (models_dir / "junk.onnx").write_bytes(b"junk")
    probe.subscribe("edge/+/events")
    agent = start_agent()
    seen: list[dict[str, object]] = []
    while not any(e["event"] == "broker_connected" for e in seen):
        seen.append(body(probe.expect(f"{agent.topic}/events")))
    names = [e["event"] for e in seen]
    assert names.count("model_loaded") == 4
    rejected = [e for e in seen if e["event"] == "variant_rejected"]
    assert rejected[0]["model"] == "junk"
    assert "not a readable ONNX file" in str(rejected[0]["reason"])
    assert names.index("model_rejected") < names.index("broker_connected")


def test_metrics_report_requests_and_latency(
    start_agent: Callable[..., RunningAgent], probe: Probe
) -> None:
    """Periodic metrics carry per-model counts, percentiles and the process's resources."""
    agent = start_agent(metrics={"interval_s": 0.2})
    for _ in range(5):
        probe.request(f"{agent.topic}/infer/scale", VALID)
    probe.request(f"{agent.topic}/infer/scale", b"{bad")
    probe.subscribe(f"{agent.topic}/metrics")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = body(probe.expect(f"{agent.topic}/metrics"))
        scale = metrics["models"]["scale"]
        if scale["requests"] >= 5:
            break
    assert scale["requests"] == 5  # the malformed one never reached the model
    assert scale["errors"] == 0
    assert 0 < scale["p50_ms"] <= scale["p95_ms"] <= scale["p99_ms"]
    assert scale["queue_depth"] == 0
    assert metrics["resources"]["process_rss_mb"] > 10


def test_control_models_lists_ladders_and_signatures(agent: RunningAgent, probe: Probe) -> None:
    """control/models answers with every model's variants, signature and active variant."""
    reply = body(probe.request(f"{agent.topic}/control/models", b""))
    assert sorted(reply["models"]) == ["digits", "pair", "picky", "scale"]
    one = body(probe.request(f"{agent.topic}/control/models", json.dumps({"model": "digits"})))
    assert list(one["models"]) == ["digits"]
    assert one["models"]["digits"]["batching"] is True


@pytest.mark.parametrize(
    ("command", "payload", "code", "message"),
    [
        ("launch", b"{}", 400, "unknown control command 'launch'"),
        ("models", b"{nope", 400, "malformed JSON"),
        ("models", b"[1]", 400, "must be a JSON object"),
        ("models", b'{"model": "ghost"}', 404, "model 'ghost' is not loaded"),
    ],
)
def test_control_errors_are_answered(
    agent: RunningAgent, probe: Probe, command: str, payload: bytes, code: int, message: str
) -> None:
    """Unknown commands and bad bodies get an error reply with a code."""
    reply = body(probe.request(f"{agent.topic}/control/{command}", payload))
    assert reply["code"] == code
    assert message in reply["error"]


def test_control_over_mqtt311(agent: RunningAgent, broker: MosquittoBroker) -> None:
    """A 3.1.1 client sends control commands with reply_to in the body."""
    client = Probe(broker.port, protocol=mqtt.MQTTv311)
    try:
        client.publish(
            f"{agent.topic}/control/models",
            json.dumps({"reply_to": client.reply_topic, "model": "scale"}),
        )
        reply = body(client.expect(client.reply_topic))
    finally:
        client.close()
    assert list(reply["models"]) == ["scale"]


def test_agent_reconnects_after_a_broker_restart(
    start_agent: Callable[..., RunningAgent], tmp_path: Path
) -> None:
    """When the broker goes away and comes back, the agent reconnects, resubscribes, serves."""
    port = free_port()
    own = MosquittoBroker(port)
    own.start()
    try:
        agent = start_agent(port=port, mqtt={"reconnect_min_s": 1, "reconnect_max_s": 2})
        client = Probe(port)
        assert body(client.request(f"{agent.topic}/infer/scale", VALID))["outputs"]
        client.close()
        own.stop()
        frontend = agent.agent.frontend
        assert frontend is not None
        deadline = time.monotonic() + 10
        while frontend.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not frontend.connected
        own = MosquittoBroker(port)
        own.start()
        assert frontend.wait_connected(15), "agent did not reconnect"
        client = Probe(port)
        reply = body(client.request(f"{agent.topic}/infer/scale", VALID, timeout=10))
        assert reply["outputs"][0]["data"] == [3.0, 5.0, 7.0, 9.0]
        client.subscribe(f"{agent.topic}/status")
        assert body(client.expect(f"{agent.topic}/status"))["state"] == "online"
        client.close()
    finally:
        own.stop()


def test_agent_waits_for_a_broker_that_is_not_there_yet(tmp_path: Path, models_dir: Path) -> None:
    """Started before its broker, the agent keeps retrying and serves once the broker is up."""
    port = free_port()
    config = agent_config(port, models_dir, mqtt={"reconnect_min_s": 1, "reconnect_max_s": 1})
    running = RunningAgent(config)
    running.agent.start()
    own = MosquittoBroker(port)
    try:
        time.sleep(1.5)
        assert running.agent.frontend is not None
        assert not running.agent.frontend.connected
        own.start()
        assert running.agent.frontend.wait_connected(15)
        client = Probe(port)
        assert body(client.request(f"{running.topic}/infer/scale", VALID))["outputs"]
        client.close()
    finally:
        running.stop()
        own.stop()


def test_a_slow_control_command_does_not_hold_up_inference(
    agent: RunningAgent, probe: Probe
) -> None:
    """Control commands run off the network thread: a request sent after a slow command
    (such as a pin that loads a big variant) is answered first."""
    started = threading.Event()

    def slow(_body: dict[str, object]) -> dict[str, object]:
        started.set()
        time.sleep(1.0)
        return {"slept": True}

    agent.agent.control._commands["slow"] = slow
    probe.publish(f"{agent.topic}/control/slow", b"{}", _reply_props(probe, b"slow"))
    assert started.wait(5)
    probe.publish(f"{agent.topic}/infer/scale", VALID, _reply_props(probe, b"infer"))
    first = probe.expect(probe.reply_topic)
    second = probe.expect(probe.reply_topic)
    assert first.properties.CorrelationData == b"infer"
    assert body(second) == {"slept": True}


def _reply_props(probe: Probe, correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = probe.reply_topic
    props.CorrelationData = correlation
    return props
