"""`edge-agent run` as systemd runs it, in a real subprocess: READY, SIGHUP reload, and
SIGTERM that lets in-flight requests finish, within service.stop_timeout_s."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.broker import MosquittoBroker
from tests.conftest import Probe
from tests.service.busy_model import busy_model, busy_request
from tests.service.conftest import NotifySocket, wait_subscribed
from tests.stuck_model import ENDLESS, loop_model

# About half a second of work per request on this kind of machine.
HALF_SECOND = 500_000


@dataclass
class AgentProcess:
    """A running `edge-agent run` and where it reports."""

    process: subprocess.Popen[bytes]
    device_topic: str
    log: Path

    def exit_code(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent still running; log:\n{self.log.read_text()}") from None


@pytest.fixture
def run_agent(
    broker: MosquittoBroker, notify_socket: NotifySocket, tmp_path: Path
) -> Iterator[Callable[..., AgentProcess]]:
    """Start `edge-agent run` on the session broker with a busy model; killed at the end."""
    started: list[AgentProcess] = []

    def start(preexec: Callable[[], None] | None = None, **env: str) -> AgentProcess:
        models = tmp_path / "models"
        busy_model(models / "busy.onnx")
        device = f"proc-{uuid.uuid4().hex[:8]}"
        log = tmp_path / f"{device}.log"
        environment = {
            **os.environ,
            "NOTIFY_SOCKET": notify_socket.address,
            "EDGE_AGENT_MODELS__THREADS": "1",
            "EDGE_AGENT_MODELS__MAX_BATCH_SIZE": "1",  # one request per run: a clear queue
            "EDGE_AGENT_METRICS__INTERVAL_S": "0",
            "EDGE_AGENT_LOG__FORMAT": "json",
            **env,
        }
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [
                    f"{sys.prefix}/bin/edge-agent",
                    "run",
                    "--models-dir",
                    str(models),
                    "--mqtt-port",
                    str(broker.port),
                    "--device-id",
                    device,
                ],
                env=environment,
                preexec_fn=preexec,  # noqa: PLW1509  (only calls prctl)
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        running = AgentProcess(process, f"edge/{device}", log)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()


def send_busy(probe: Probe, agent: AgentProcess, count: int, steps: int) -> None:
    for index in range(count):
        body = {**busy_request(steps, f"r{index}"), "reply_to": probe.reply_topic}
        probe.publish(f"{agent.device_topic}/infer/busy", json.dumps(body))


def held_all(probe: Probe, agent: AgentProcess) -> list[dict[str, Any]]:
    """Wait until the agent holds every request sent so far: messages from one client
    arrive in order, so once a control request sent after them is answered, it has them
    all (on a loaded machine that can take longer than any sleep). Returns the replies to
    them that came first."""
    ack = f"{probe.reply_topic}/ack"
    probe.subscribe(ack)
    properties = Properties(PacketTypes.PUBLISH)
    properties.ResponseTopic = ack
    probe.publish(f"{agent.device_topic}/control/models", "{}", properties)
    early: list[dict[str, Any]] = []
    while (msg := probe.expect(timeout=15)).topic != ack:
        if msg.topic == probe.reply_topic:
            early.append(json.loads(msg.payload))
    return early


def replies(probe: Probe, within: float, count: int | None = None) -> list[dict[str, Any]]:
    """The replies that arrive within `within` seconds (or until `count` have)."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and (count is None or len(got) < count):
        try:
            msg = probe.expect(probe.reply_topic, timeout=max(0.05, deadline - time.monotonic()))
        except AssertionError:
            break
        got.append(json.loads(msg.payload))
    return got


def test_a_storm_of_stop_signals_still_stops_the_agent_cleanly(
    run_agent: Callable[..., AgentProcess],
    notify_socket: NotifySocket,
) -> None:
    """SIGINT and SIGTERM in quick succession, as Ctrl-C in a script that then sends
    SIGTERM does: a handler that logged or set an Event could run while the main thread
    held the same lock (structlog's print lock) and wait for itself for ever."""
    agent = run_agent()
    notify_socket.wait_for("READY", "1", timeout=30)
    # For a third of a second, so that some signal lands while a handler runs. Until the
    # process is reaped (exit_code) its PID stays ours, even once it has exited.
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        os.kill(agent.process.pid, signal.SIGINT)
        os.kill(agent.process.pid, signal.SIGTERM)
    assert agent.exit_code(timeout=20) == 0


def test_sigterm_lets_in_flight_requests_finish_before_exit(
    run_agent: Callable[..., AgentProcess],
    notify_socket: NotifySocket,
    probe: Probe,
) -> None:
    """READY once serving; SIGHUP is RELOADING then READY; SIGTERM while four half-second
    requests are queued or running: STOPPING, all four answered, then a clean exit."""
    agent = run_agent()
    ready = notify_socket.wait_for("READY", "1", timeout=30)
    assert "busy=default" in ready.fields["STATUS"]
    wait_subscribed(probe, agent.device_topic)

    agent.process.send_signal(signal.SIGHUP)
    reloading = notify_socket.wait_for("RELOADING", "1", after=ready.at)
    notify_socket.wait_for("READY", "1", after=reloading.at)

    probe.subscribe(f"{agent.device_topic}/status")
    send_busy(probe, agent, count=4, steps=HALF_SECOND)
    time.sleep(0.3)  # the first is running, three are queued
    agent.process.send_signal(signal.SIGTERM)
    stopping = notify_socket.wait_for("STOPPING", "1")
    assert "finishing" in stopping.fields["STATUS"]
    assert agent.exit_code(timeout=20) == 0
    answered = replies(probe, within=2)
    assert sorted(str(r["id"]) for r in answered) == ["r0", "r1", "r2", "r3"]
    assert [r["outputs"] for r in answered] == [
        [{"name": "y", "datatype": "FP32", "shape": [1, 1], "data": [float(HALF_SECOND)]}]
    ] * 4


def test_sigterm_waits_no_longer_than_the_stop_timeout(
    run_agent: Callable[..., AgentProcess],
    notify_socket: NotifySocket,
    probe: Probe,
) -> None:
    """With service.stop_timeout_s = 1 and ten seconds of queued work, the agent exits
    about a second after SIGTERM, having answered what it could and told every other
    request it is stopping (503): none goes unanswered."""
    agent = run_agent(EDGE_AGENT_SERVICE__STOP_TIMEOUT_S="1")
    notify_socket.wait_for("READY", "1", timeout=30)
    wait_subscribed(probe, agent.device_topic)
    send_busy(probe, agent, count=20, steps=HALF_SECOND)
    early = held_all(probe, agent)
    signalled = time.monotonic()
    agent.process.send_signal(signal.SIGTERM)
    assert agent.exit_code(timeout=15) == 0
    took = time.monotonic() - signalled
    assert took < 5.0, took
    # Published before the exit; on a loaded machine the broker may take a moment more.
    answered = early + replies(probe, within=10, count=20 - len(early))
    assert len(answered) == 20
    stopping = [r for r in answered if r.get("code") == 503 and "stopping" in r["error"]]
    assert 0 < len(stopping) < 20


PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1


def _refuse_write_execute() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def _kernel_has_mdwe() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0)


@pytest.mark.skipif(not _kernel_has_mdwe(), reason="the kernel has no PR_SET_MDWE (Linux < 6.3)")
def test_the_agent_serves_with_write_xor_execute_memory_enforced(
    run_agent: Callable[..., AgentProcess], notify_socket: NotifySocket, probe: Probe
) -> None:
    """With the kernel refusing writable-and-executable memory, as MemoryDenyWriteExecute=
    asks, the agent loads onnxruntime, numpy and paho and answers a request."""
    wx_map = (
        "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    )
    # First show that the restriction bites: a writable and executable mapping is refused.
    refused = subprocess.run(
        [sys.executable, "-c", wx_map],
        check=False,
        capture_output=True,
        preexec_fn=_refuse_write_execute,
    )
    assert refused.returncode != 0 and b"PermissionError" in refused.stderr
    agent = run_agent(preexec=_refuse_write_execute)
    notify_socket.wait_for("READY", "1", timeout=30)
    wait_subscribed(probe, agent.device_topic)
    send_busy(probe, agent, count=1, steps=10)
    (reply,) = replies(probe, within=5)
    assert reply["outputs"][0]["data"] == [10.0]
    agent.process.send_signal(signal.SIGTERM)
    assert agent.exit_code(timeout=10) == 0


def test_sigterm_while_a_load_is_stuck_exits_cleanly(
    run_agent: Callable[..., AgentProcess],
    notify_socket: NotifySocket,
    probe: Probe,
    tmp_path: Path,
) -> None:
    """A model whose warm-up never ends, present at start, is abandoned after
    models.load_timeout_s: the agent comes online and serves its other model, the health
    check names the stuck load, and SIGTERM still ends the process with exit code 0."""
    loop_model(tmp_path / "models" / "endless.onnx", ENDLESS)
    agent = run_agent(EDGE_AGENT_MODELS__LOAD_TIMEOUT_S="1")
    wait_subscribed(probe, agent.device_topic, timeout=30)
    send_busy(probe, agent, count=1, steps=10)
    (reply,) = replies(probe, within=5)
    assert reply["outputs"][0]["data"] == [10.0]
    deadline = time.monotonic() + 10
    while not any("endless: load stuck" in s for s in notify_socket.statuses()):
        assert time.monotonic() < deadline, notify_socket.statuses()
        time.sleep(0.05)
    agent.process.send_signal(signal.SIGTERM)
    assert agent.exit_code(timeout=20) == 0
    events = [json.loads(line) for line in agent.log.read_text().splitlines() if line[:1] == "{"]
    stuck = [e for e in events if e.get("event") == "model_load_stuck"]
    assert [e["model"] for e in stuck] == ["endless"]
