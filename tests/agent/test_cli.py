"""The edge-agent command as people type it: infer, status, the embedded broker, the
quick start."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.bench import render
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


def test_infer_rate_streams_and_prints_a_line_a_second(agent: RunningAgent) -> None:
    """`--rate 40 --seconds 2`: 80 requests open-loop, a line for each second with the
    round trips and the variant that answered, then a summary; every one answered."""
    result = edge_agent(
        "infer", "digits", str(DIGITS_JSON), *where(agent), "--rate", "40", "--seconds", "2"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    seconds = [line for line in lines if " s  sent " in line]
    assert len(seconds) == 2, result.stdout
    for line in seconds:
        assert "sent   40" in line and "answered   40" in line and "served by fp32 40" in line
        assert "p95" in line
    assert lines[-1].startswith("80 sent, 80 answered, p50 "), result.stdout
    assert lines[-1].endswith("served by fp32 80"), result.stdout


def test_infer_rate_counts_error_replies_and_refuses_a_rate_it_cannot_keep(
    agent: RunningAgent,
) -> None:
    """Error replies are counted apart, and make the exit status 1; a rate out of range
    is refused before anything is sent (2)."""
    wrong = edge_agent(
        "infer", "nope", str(DIGITS_JSON), *where(agent), "--rate", "20", "--seconds", "1"
    )
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert "20 error 404" in wrong.stdout
    last = wrong.stdout.splitlines()[-1]
    assert last == "20 sent, 0 answered; 20 without an answer or with an error"
    for rate in ("0", "-3", "20000"):
        refused = edge_agent("infer", "digits", str(DIGITS_JSON), *where(agent), "--rate", rate)
        assert refused.returncode == 2 and "--rate must be" in refused.stderr


def test_status_shows_the_device(agent: RunningAgent) -> None:
    """`edge-agent status` prints the device's state, each model's active variant and why."""
    result = edge_agent("status", *where(agent))
    assert result.returncode == 0, result.stderr
    assert f"device {agent.config.mqtt.device_id}: online" in result.stdout
    assert "digits  fp32" in result.stdout
    assert "why: start" in result.stdout
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
def embedded_amqtt(models_dir: Path) -> Iterator[tuple[int, str, subprocess.Popen[str]]]:
    """`edge-agent run --embedded-broker amqtt` as a subprocess (MQTT 3.1.1 end to end)."""
    port, device = free_port(), f"emb-{uuid.uuid4().hex[:6]}"
    process = spawn_agent(port, device, models_dir, "--embedded-broker", "amqtt")
    assert process.stderr is not None
    deadline = time.monotonic() + 60
    for line in process.stderr:
        if '"broker_connected"' in line or time.monotonic() > deadline:
            break
    yield port, device, process
    if process.poll() is None:
        process.terminate()
        process.wait(30)
    process.stderr.close()


def test_embedded_amqtt_broker_serves_mqtt311_end_to_end(
    embedded_amqtt: tuple[int, str, subprocess.Popen[str]],
) -> None:
    """With the in-process amqtt broker, infer and status fall back to MQTT 3.1.1 and get
    their answers, and the agent's log shows nothing of their refused MQTT 5 tries."""
    port, device, process = embedded_amqtt
    result = edge_agent(
        "infer", "digits", str(DIGITS_NPZ), "--mqtt-port", str(port), "--device-id", device
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("row ") == 8
    status = edge_agent("status", "--mqtt-port", str(port), "--device-id", device)
    assert "online" in status.stdout, status.stderr
    process.terminate()
    assert process.wait(30) == 0
    assert process.stderr is not None
    rest = process.stderr.read()
    assert '"agent_stopped"' in rest
    assert "Invalid" not in rest, rest
    assert "Failed to initialize" not in rest, rest


def test_the_agent_writes_only_json_lines_where_onnxruntime_cannot_cache(
    broker: MosquittoBroker, models_dir: Path
) -> None:
    """With JSON logs every line the agent writes is JSON, also where onnxruntime could not
    persist a telemetry id (no writable cache, as under the unit): journald gets ours only."""
    env = {
        **os.environ,
        "XDG_CACHE_HOME": "/dev/null/cache",  # cannot be created, even by root
        "EDGE_AGENT_METRICS__INTERVAL_S": "0",
    }
    env.pop("ORT_DISABLE_TELEMETRY", None)
    device = f"json-{uuid.uuid4().hex[:6]}"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "agent", "run", "--mqtt-port", str(broker.port)),
            *("--device-id", device, "--models-dir", str(models_dir), "--log-format", "json"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    for line in process.stderr:
        lines.append(line)
        if '"service_ready"' in line or time.monotonic() > deadline:
            break
    process.terminate()
    assert process.wait(30) == 0
    lines += process.stderr.readlines()
    process.stderr.close()
    assert any('"agent_stopped"' in line for line in lines), lines
    for line in lines:
        json.loads(line)


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


def readme_try_lines() -> list[str]:
    """The lines the README's quick start tells a newcomer to try from another terminal."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"keeps serving while it\s.*?```sh\n(.*?)```", readme, re.S)
    assert block is not None, "README: no block of lines to try after the quick start"
    return [line for line in block.group(1).splitlines() if line.strip()]


class _Output:
    """Lines of a process's output, read on a thread so that waiting for one is bounded."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert process.stdout is not None
        stream = process.stdout
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def until(self, text: str, timeout: float) -> bool:
        """Collect lines until one contains `text` (True) or the output ends (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                return False
            self.lines.append(line)
            if text in line:
                return True
        return False

    @property
    def text(self) -> str:
        return "".join(self.lines)


def test_ctrl_c_stops_the_quick_start_cleanly_after_the_readme_lines_work() -> None:
    """While the quick start serves, the README's lines to try all succeed (whatever runs
    on 1883); then Ctrl-C, a SIGINT to the whole process group as a terminal sends it,
    stops the agent cleanly (agent_stopping, agent_stopped) and the script exits 0."""
    process = subprocess.Popen(
        ["bash", str(REPO / "tools" / "quickstart.sh")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    output = _Output(process)
    try:
        assert output.until("Ctrl-C stops it.", 600), output.text
        for line in readme_try_lines():
            tried = subprocess.run(
                ["bash", "-c", line],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert tried.returncode == 0, (line, tried.stdout, tried.stderr, output.text)
            assert "digits" in tried.stdout or '"model_name"' in tried.stdout, tried.stdout
        os.killpg(process.pid, signal.SIGINT)
        output.until("no such line: read to the end", 60)
        assert process.wait(60) == 0, output.text
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
        if process.stdout is not None:
            process.stdout.close()
    assert "agent_stopping" in output.text
    assert "reason=SIGINT" in output.text
    assert "agent_stopped" in output.text


BENCH_TINY = ("--requests", "50", "--duration", "0.5", "--rounds", "2", "--concurrency", "8")


def test_bench_runs_and_prints_its_ratios() -> None:
    """`edge-agent bench` (tiny run) measures onnxruntime, the echo and the agent, each
    server's CPU per request, and each server's start to first answer and idle memory, and
    reports the ratios the issues set targets for; its readable report puts each figure
    beside its floor. No timing is asserted."""
    result = edge_agent(
        "bench",
        *("--model-dir", str(REPO / "models" / "digits"), *BENCH_TINY),
        *("--start-rounds", "1", "--json"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for target in ("onnxruntime", "echo_seq", "agent_seq", "echo_conc", "agent_conc"):
        assert report[target]["count"] > 0
    for server in ("echo_seq", "agent_seq", "echo_conc", "agent_conc"):
        assert report[server]["cpu_ms_per_request"] > 0
    for server in ("echo", "onnxruntime_server", "agent"):
        start = report["start"][server]
        assert start["first_answer_s"] > 0 and start["cpu_s"] > 0
        assert 0 < start["memory"]["anon_mb"] <= start["memory"]["rss_mb"]
    ratios = report["ratios"]
    for ratio in (
        "agent_p50_over_echo_p50",
        "agent_rps_over_echo_rps_in_flight",
        "agent_cpu_over_echo_cpu_in_flight",
        "agent_start_over_onnxruntime_server_start",
        "agent_rss_over_onnxruntime_server_rss",
    ):
        assert ratios[ratio] > 0
    assert set(report["targets"]) >= {"agent_start_s", "agent_idle_rss_mb"}
    text = render(report)
    assert "CPU ms/req" in text and "agent CPU per request / echo's" in text
    for row in ("bare MQTT echo ", "bare onnxruntime server (floor)", "edge-agent "):
        assert re.search(rf"^{re.escape(row)}.*\d", text, re.MULTILINE), text
    assert re.search(r"agent start: [\d.]+ s, [\d.]+x the bare server's", text), text
    assert re.search(r"agent idle RSS: [\d.]+ MiB, [\d.]+x the bare server's", text), text


def test_bench_shm_times_shared_memory_beside_onnxruntime() -> None:
    """`edge-agent bench --shm` (tiny run) also times requests through shared memory, with
    the inputs in place and written by the client, beside raw onnxruntime on the same inputs
    and the echo of the request, and prints each as a ratio to onnxruntime. No timing is
    asserted."""
    result = edge_agent(
        "bench",
        *("--model-dir", str(REPO / "models" / "digits"), *BENCH_TINY),
        *("--start-rounds", "1", "--shm", "--shm-requests", "10", "--json"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    shm = json.loads(result.stdout)["shm"]
    for target in ("onnxruntime", "echo", "shm_in_place", "shm_writes_inputs"):
        assert shm[target]["count"] == 10
    for server in ("echo", "shm_in_place", "shm_writes_inputs"):  # CPU time counts in ticks
        assert shm[server]["cpu_ms_per_request"] >= 0
    for path in ("shm_in_place", "shm_writes_inputs"):
        assert shm["ratios"][f"{path}_over_onnxruntime"] > 0
        assert shm["targets"][f"{path}_over_onnxruntime"]["max"] == 1.05
    text = render(json.loads(result.stdout))
    assert re.search(r"^edge-agent, shm, inputs in place +[\d.]+ +[\d.]+ +[\d.]+x", text, re.M)
    assert re.search(r"^agent through shm, inputs in place: [\d.]+x onnxruntime", text, re.M)
