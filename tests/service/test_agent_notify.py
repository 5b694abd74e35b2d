"""What the agent tells systemd: READY once serving, STATUS, WATCHDOG driven by the health
check, RELOADING/READY around a reload, STOPPING on shutdown."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import supervisor
from agent.broker import MosquittoBroker, free_port
from agent.errors import ConfigError
from agent.service import Agent
from agent.session import LoadedVariant
from tests import onnx_models
from tests.conftest import Probe, agent_config
from tests.service.conftest import NotifySocket, wait_subscribed
from tests.stuck_model import loop_model, trips_for_seconds


class BlockingVariant:
    """A loaded variant whose runs wait for `release`: a model worker that hangs."""

    def __init__(self, inner: LoadedVariant, release: threading.Event) -> None:
        self._inner = inner
        self._release = release
        self.name = inner.name
        self.inputs = inner.inputs
        self.outputs = inner.outputs
        self.output_names = inner.output_names

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        output_names: Sequence[str] | None = None,
        control: object = None,
    ) -> list[np.ndarray]:
        self._release.wait(30)
        return self._inner.run(feeds, output_names)

    def close(self) -> None:
        self._inner.close()


@pytest.fixture
def watchdog_1s(monkeypatch: pytest.MonkeyPatch, notify_socket: NotifySocket) -> NotifySocket:
    """A systemd watchdog of one second (pings expected every half second)."""
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    return notify_socket


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """An event that unblocks whatever the test made hang, set again at teardown."""
    event = threading.Event()
    yield event
    event.set()


def scale_request(reply_to: str) -> str:
    return json.dumps(
        {
            "id": "r",
            "reply_to": reply_to,
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
        }
    )


def pings_after(sock: NotifySocket, moment: float) -> int:
    return sum(1 for n in sock.with_key("WATCHDOG", "1") if n.at > moment)


def test_a_stuck_load_degrades_the_agent_but_keeps_the_watchdog_fed(
    watchdog_1s: NotifySocket,
    make_agent: Callable[..., Agent],
    broker: MosquittoBroker,
    tmp_path: Path,
) -> None:
    """A model whose load sticks would stick again after a restart: the agent says
    `degraded` in STATUS, serves the rest and goes on pinging the watchdog. (A warm-up of
    about three seconds, so that the test's process can end: one that never ends is
    tests/service/test_process.py's, in a process of its own.)"""
    models = tmp_path / "models"
    onnx_models.scale_model(models / "scale.onnx")
    loop_model(models / "endless.onnx", trips_for_seconds(tmp_path / "calibrate", 3.0))
    agent = make_agent(broker.port, models, models_section={"load_timeout_s": 1.0})
    watchdog_1s.wait_for("READY", "1", timeout=30)
    deadline = time.monotonic() + 10
    while not any(
        s.startswith("degraded: model endless: load stuck") for s in watchdog_1s.statuses()
    ):
        assert time.monotonic() < deadline, watchdog_1s.statuses()
        time.sleep(0.05)
    degraded_at = time.monotonic()
    time.sleep(1.5)  # three ping intervals
    assert pings_after(watchdog_1s, degraded_at) >= 2
    assert not any(s.startswith("unhealthy") for s in watchdog_1s.statuses())
    assert agent.manager.get("scale").active_name is not None
    # Once the load ends, the model serves and the agent is no longer degraded.
    deadline = time.monotonic() + 60
    while "endless" not in agent.manager.names() or agent.degradations():
        assert time.monotonic() < deadline, agent.degradations()
        time.sleep(0.05)


def test_ready_waits_a_moment_for_the_broker_then_comes_saying_it_waits(
    notify_socket: NotifySocket, make_agent: Callable[..., Agent], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no broker the agent waits a moment (extending the start timeout), then sends
    READY anyway with a STATUS saying it waits for the broker, so `systemctl start` returns;
    once the broker is there STATUS names every model and its active variant."""
    monkeypatch.setattr(supervisor, "BROKER_WAIT_S", 1.0)
    port = free_port()
    agent = make_agent(port)
    extended = notify_socket.wait_for("EXTEND_TIMEOUT_USEC")
    ready = notify_socket.wait_for("READY", "1", timeout=10)
    assert extended.at < ready.at
    assert not agent.ready
    waiting = ready.fields["STATUS"]
    assert "waiting for the broker" in waiting
    assert "digits=fp32" in waiting
    # mosquitto speaks sd_notify too: it must not inherit our socket and say READY itself.
    monkeypatch.delenv("NOTIFY_SOCKET")
    broker = MosquittoBroker(port)
    broker.start()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            s.startswith("serving") for s in notify_socket.statuses()
        ):
            time.sleep(0.05)
    finally:
        broker.stop()
    status = next(s for s in notify_socket.statuses() if s.startswith("serving"))
    assert status.startswith("serving 4 model(s)")
    for model in ("digits=fp32", "scale=default", "picky=default", "pair=default"):
        assert model in status
    assert f"127.0.0.1:{port} connected" in status
    assert len(notify_socket.with_key("READY", "1")) == 1


def test_ready_follows_the_broker_when_it_answers(
    notify_socket: NotifySocket, make_agent: Callable[..., Agent], broker: MosquittoBroker
) -> None:
    """With a broker, READY=1 comes once it has accepted the agent: READY means serving."""
    agent = make_agent(broker.port)
    ready = notify_socket.wait_for("READY", "1")
    assert ready.fields["STATUS"].startswith("serving 4 model(s)")
    assert agent.ready


def test_watchdog_pings_stop_while_a_model_worker_hangs(
    watchdog_1s: NotifySocket,
    make_agent: Callable[..., Agent],
    broker: MosquittoBroker,
    probe: Probe,
    release: threading.Event,
) -> None:
    """A worker stuck on one batch past service.worker_stall_s stops the pings (systemd
    would restart the agent); they resume once it answers again."""
    agent = make_agent(broker.port, service={"worker_stall_s": 0.5})
    watchdog_1s.wait_for("READY", "1")
    watchdog_1s.wait_for("WATCHDOG", "1", after=time.monotonic())
    served = agent.manager.get("scale")
    # A stand-in with the same duck type; mypy does not check tests, this says so anyway.
    assert served.active is not None
    served.active.runtime = BlockingVariant(served.active.runtime, release)  # type: ignore[assignment]
    wait_subscribed(probe, agent.config.mqtt.device_topic)
    probe.publish(f"{agent.config.mqtt.device_topic}/infer/scale", scale_request(probe.reply_topic))

    unhealthy = watchdog_1s.wait_for("STATUS", timeout=5)
    deadline = time.monotonic() + 5
    while "unhealthy" not in unhealthy.fields["STATUS"] and time.monotonic() < deadline:
        unhealthy = watchdog_1s.wait_for("STATUS", after=unhealthy.at)
    assert (
        "model scale: worker model-scale-0 has been running one batch"
        in (unhealthy.fields["STATUS"])
    )
    time.sleep(1.5)  # three ping intervals
    assert pings_after(watchdog_1s, unhealthy.at) == 0

    released = time.monotonic()
    release.set()
    assert json.loads(probe.expect(probe.reply_topic).payload)["outputs"][0]["data"] == [
        3.0,
        5.0,
        7.0,
        9.0,
    ]
    watchdog_1s.wait_for("WATCHDOG", "1", after=released, timeout=3)


def test_watchdog_pings_stop_while_the_mqtt_loop_hangs(
    watchdog_1s: NotifySocket,
    make_agent: Callable[..., Agent],
    broker: MosquittoBroker,
    probe: Probe,
    release: threading.Event,
) -> None:
    """A network thread stuck in a callback stops the pings: the loop is checked, not just
    the connection flag."""
    agent = make_agent(broker.port)
    watchdog_1s.wait_for("READY", "1")
    assert agent.frontend is not None
    client = agent.frontend._client
    client.on_message = lambda *_args: release.wait(30)
    wait_subscribed(probe, agent.config.mqtt.device_topic)
    probe.publish(f"{agent.config.mqtt.device_topic}/infer/scale", scale_request(probe.reply_topic))
    stuck = watchdog_1s.wait_for("STATUS", timeout=5)
    deadline = time.monotonic() + 5
    while "silent" not in stuck.fields["STATUS"] and time.monotonic() < deadline:
        stuck = watchdog_1s.wait_for("STATUS", after=stuck.at)
    assert "the MQTT network loop has been silent" in stuck.fields["STATUS"]
    time.sleep(1.5)
    assert pings_after(watchdog_1s, stuck.at) == 0


def test_reload_is_framed_by_reloading_and_ready_and_picks_up_new_models(
    notify_socket: NotifySocket,
    make_agent: Callable[..., Agent],
    broker: MosquittoBroker,
    models_dir: Path,
) -> None:
    """A reload re-reads the configuration, loads a model added meanwhile, applies the live
    sections, and is announced as RELOADING=1 then READY=1."""
    holder: dict[str, Any] = {}

    def reread() -> Any:
        return agent_config(
            broker.port,
            models_dir,
            mqtt={"device_id": holder["device"], "reconnect_min_s": 1, "reconnect_max_s": 2},
            service={"worker_stall_s": 42},
        )

    agent = make_agent(broker.port, reload_config=reread)
    holder["device"] = agent.config.mqtt.device_id
    notify_socket.wait_for("READY", "1")
    onnx_models.scale_model(models_dir / "extra.onnx", factor=3.0)
    before = time.monotonic()
    agent.request_reload()
    reloading = notify_socket.wait_for("RELOADING", "1", after=before)
    ready = notify_socket.wait_for("READY", "1", after=reloading.at)
    assert "extra=default" in ready.fields["STATUS"]
    assert "extra" in agent.manager.names()
    assert agent.config.service.worker_stall_s == 42


def test_a_failed_reload_keeps_serving_and_says_why(
    notify_socket: NotifySocket, make_agent: Callable[..., Agent], broker: MosquittoBroker
) -> None:
    """An invalid configuration at reload is refused: READY=1 again, STATUS says why."""

    def reread() -> Any:
        raise ConfigError("invalid configuration:\n  mqtt.port = 70000: too big")

    agent = make_agent(broker.port, reload_config=reread)
    notify_socket.wait_for("READY", "1")
    before = time.monotonic()
    agent.request_reload()
    ready = notify_socket.wait_for("READY", "1", after=before)
    assert ready.fields["STATUS"].startswith("reload failed")
    assert "mqtt.port = 70000" in ready.fields["STATUS"]
    assert agent.ready
    # The health check's next lines keep saying so (they used to replace it at once).
    assert agent.supervisor is not None
    agent.supervisor.request_reload()  # only to wake the supervisor: it fails again
    second = notify_socket.wait_for("READY", "1", after=ready.at)
    later = [
        n.fields["STATUS"]
        for n in notify_socket.with_key("STATUS")
        if n.at >= ready.at and "RELOADING" not in n.fields
    ]
    assert later
    assert all(line.startswith("reload failed") for line in later), later
    assert "serving 4 model(s)" in later[-1]
    assert second.fields["STATUS"].startswith("reload failed")


def test_stop_announces_stopping(
    notify_socket: NotifySocket, make_agent: Callable[..., Agent], broker: MosquittoBroker
) -> None:
    """Shutdown begins with STOPPING=1 and a STATUS saying what it waits for."""
    agent = make_agent(broker.port)
    notify_socket.wait_for("READY", "1")
    agent.request_stop()
    agent.stop(drain_timeout=2)
    stopping = notify_socket.wait_for("STOPPING", "1")
    assert stopping.fields["STATUS"].startswith("stopping: finishing 0 request(s), at most 2 s")


def test_the_watchdog_keeps_being_fed_during_a_slow_reload(
    watchdog_1s: NotifySocket, make_agent: Callable[..., Agent], broker: MosquittoBroker
) -> None:
    """A reload that takes longer than the watchdog timeout (big models to load) does not
    get the agent killed: it runs beside the health check, whose pings go on."""
    holder: dict[str, Agent] = {}

    def slow_reread() -> Any:
        time.sleep(1.5)
        return holder["agent"].config

    agent = make_agent(broker.port, reload_config=slow_reread)
    holder["agent"] = agent
    watchdog_1s.wait_for("READY", "1")
    before = time.monotonic()
    agent.request_reload()
    reloading = watchdog_1s.wait_for("RELOADING", "1", after=before)
    ready = watchdog_1s.wait_for("READY", "1", after=reloading.at, timeout=5)
    assert ready.at - reloading.at > 1.4
    assert pings_after(watchdog_1s, reloading.at) - pings_after(watchdog_1s, ready.at) >= 2
