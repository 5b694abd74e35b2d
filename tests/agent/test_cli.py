"""The edge-agent command as people type it: infer, status, the embedded broker, the
quick start."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.broker import MosquittoBroker, free_port
from tests.conftest import RunningAgent, spawn_agent

REPO = Path(__file__).resolve().parents[2]
DIGITS_JSON = REPO / "tools" / "requests" / "digits.json"
DIGITS_NPZ = REPO / "tools" / "requests" / "digits.npz"


def edge_agent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def where(agent: RunningAgent) -> list[str]:
    return ["--mqtt-port", str(agent.config.mqtt.port), "--device-id", agent.config.mqtt.device_id]


def test_infer_prints_a_readable_answer(agent: RunningAgent) -> None:
    """`edge-agent infer digits FILE.json` shows the variant and the top classes."""
    result = edge_agent("infer", "digits", str(DIGITS_JSON), *where(agent))
    assert result.returncode == 0, result.stderr
    assert "answered by variant fp32" in result.stdout
    assert "row 0: top 7 (0.9" in result.stdout


def test_infer_npz_sends_binary_and_json_flag_prints_raw(agent: RunningAgent) -> None:
    """An .npz is sent as binary tensors; --json prints the reply as received."""
    result = edge_agent("infer", "digits", str(DIGITS_NPZ), *where(agent), "--json")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["outputs"][0]["shape"] == [8, 10]
    readable = edge_agent("infer", "digits", str(DIGITS_NPZ), *where(agent))
    assert readable.stdout.count("row ") == 8


def test_infer_fleet_topic(agent: RunningAgent) -> None:
    """--fleet sends to the shared fleet topic, where any agent of the group answers."""
    result = edge_agent(
        "infer",
        "scale",
        str(_scale_json(agent)),
        "--fleet",
        "--mqtt-port",
        str(agent.config.mqtt.port),
    )
    assert result.returncode == 0, result.stderr
    assert "answered by variant default" in result.stdout


def _scale_json(agent: RunningAgent) -> Path:
    path = Path(agent.config.models.dir).parent / "scale.json"
    path.write_text(
        json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        )
    )
    return path


def test_infer_exit_codes(agent: RunningAgent, tmp_path: Path) -> None:
    """Error reply: 1; unreadable input file: 2; no broker: 3 — each with a message."""
    wrong = edge_agent("infer", "nope", str(DIGITS_JSON), *where(agent))
    assert wrong.returncode == 1
    assert "error 404: model 'nope' is not loaded" in wrong.stderr
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2")
    unreadable = edge_agent("infer", "digits", str(junk), *where(agent))
    assert unreadable.returncode == 2
    assert "junk.json" in unreadable.stderr
    missing = edge_agent(
        "infer", "digits", str(DIGITS_JSON), "--mqtt-port", str(free_port()), "--timeout", "2"
    )
    assert missing.returncode == 3
    assert "cannot connect" in missing.stderr


def test_status_shows_the_device(agent: RunningAgent) -> None:
    """`edge-agent status` prints the device's state and each model's active variant."""
    result = edge_agent("status", *where(agent))
    assert result.returncode == 0, result.stderr
    assert f"device {agent.config.mqtt.device_id}: online" in result.stdout
    assert "digits  fp32" in result.stdout
    raw = json.loads(edge_agent("status", *where(agent), "--json").stdout)
    assert raw["models"]["digits"]["active"] == "fp32"
    absent = edge_agent(
        "status",
        "--mqtt-port",
        str(agent.config.mqtt.port),
        "--device-id",
        "ghost",
        "--wait",
        "0.3",
    )
    assert absent.returncode == 1
    assert "no status retained" in absent.stderr


@pytest.fixture
def embedded_amqtt(models_dir: Path) -> Iterator[tuple[int, str]]:
    """`edge-agent run --embedded-broker amqtt` as a subprocess (MQTT 3.1.1 end to end)."""
    port, device = free_port(), f"emb-{uuid.uuid4().hex[:6]}"
    process = spawn_agent(port, device, models_dir, "--embedded-broker", "amqtt")
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    for line in process.stderr:
        if '"broker_connected"' in line or time.monotonic() > deadline:
            break
    yield port, device
    process.terminate()
    assert process.wait(30) == 0
    process.stderr.close()


def test_embedded_amqtt_broker_serves_mqtt311_end_to_end(embedded_amqtt: tuple[int, str]) -> None:
    """With the in-process amqtt broker, infer falls back to MQTT 3.1.1 and gets its answer."""
    port, device = embedded_amqtt
    result = edge_agent(
        "infer", "digits", str(DIGITS_NPZ), "--mqtt-port", str(port), "--device-id", device
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("row ") == 8
    status = edge_agent("status", "--mqtt-port", str(port), "--device-id", device)
    assert "online" in status.stdout, status.stderr


def test_embedded_broker_refuses_a_busy_port(broker: MosquittoBroker) -> None:
    """--embedded-broker on a port already taken exits 1 and says so."""
    result = edge_agent(
        "run",
        "--embedded-broker",
        "mosquitto",
        "--mqtt-port",
        str(broker.port),
        "--log-format",
        "json",
    )
    assert result.returncode == 1
    assert "already in use" in result.stderr


def test_quickstart_answers() -> None:
    """The README's first command starts the agent and shows its answer to a request."""
    result = subprocess.run(
        ["bash", str(REPO / "tools" / "quickstart.sh"), "--once"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "answered by variant fp32" in result.stdout
    assert "row 0: top 7" in result.stdout


def test_bench_runs_and_prints_its_ratios() -> None:
    """`edge-agent bench` (tiny run) measures onnxruntime, the echo and the agent and
    reports the two ratios the core issue sets targets for; no timing is asserted."""
    result = edge_agent(
        "bench",
        "--model-dir",
        str(REPO / "models" / "digits"),
        "--requests",
        "50",
        "--duration",
        "0.5",
        "--rounds",
        "2",
        "--concurrency",
        "8",
        "--json",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for target in ("onnxruntime", "echo_seq", "agent_seq", "echo_conc", "agent_conc"):
        assert report[target]["count"] > 0
    assert report["ratios"]["agent_p50_over_echo_p50"] > 0
    assert report["ratios"]["agent_rps_over_echo_rps_in_flight"] > 0
