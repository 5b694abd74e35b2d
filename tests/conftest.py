"""Shared fixtures: a real mosquitto on a free loopback port, model folders built on the
spot, an agent running in this process, and a plain paho client to talk to it."""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.broker import MosquittoBroker, free_port
from agent.config import AgentConfig, load_config
from agent.service import Agent
from tests import onnx_models

HEADER = "Inference-Header-Content-Length"

# Hermetic even under a bare `pytest`: nothing of an installed service's environment
# (its state directory, notify socket, credentials, configuration) reaches the agents the
# tests start. tools/test.sh clears these too.
for _name in [n for n in os.environ if n.startswith("EDGE_AGENT_")] + [
    "STATE_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "CREDENTIALS_DIRECTORY",
]:
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def broker() -> Iterator[MosquittoBroker]:
    """One mosquitto (MQTT 5, set_tcp_nodelay) for the whole session, on a free port."""
    instance = MosquittoBroker(free_port())
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A model directory with the demo model and a few single-file test models."""
    directory = tmp_path / "models"
    directory.mkdir()
    onnx_models.copy_demo(directory)
    onnx_models.scale_model(directory / "scale.onnx")
    onnx_models.picky_model(directory / "picky.onnx")
    onnx_models.two_input_model(directory / "pair.onnx")
    return directory


def agent_config(port: int, models_dir: Path, **sections: dict[str, Any]) -> AgentConfig:
    """A config for an agent on the test broker, with a device id unique to the test."""
    overrides: dict[str, Any] = {
        "mqtt.port": port,
        "mqtt.device_id": f"dev-{uuid.uuid4().hex[:8]}",
        "models.dir": models_dir,
        "models.threads": 1,
        "metrics.interval_s": 0,
    }
    for section, values in sections.items():
        for key, value in values.items():
            overrides[f"{section}.{key}"] = value
    return load_config(None, env={}, overrides=overrides)


def spawn_agent(port: int, device: str, models: Path, *extra: str) -> subprocess.Popen[str]:
    """`edge-agent run` as a real process, JSON logs on a pipe, metrics off."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent",
            "run",
            "--mqtt-port",
            str(port),
            "--device-id",
            device,
            "--models-dir",
            str(models),
            "--log-format",
            "json",
            *extra,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "EDGE_AGENT_METRICS__INTERVAL_S": "0"},
    )


class RunningAgent:
    """An agent started in this process, stopped by the fixture."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.agent = Agent(config)
        self._loop: threading.Thread | None = None

    @property
    def topic(self) -> str:
        return self.config.mqtt.device_topic

    def start(self) -> RunningAgent:
        self.agent.start()
        assert self.agent.frontend is not None
        assert self.agent.frontend.wait_connected(10), "agent did not connect to the broker"
        self._loop = threading.Thread(target=self.agent.run_until_stopped, daemon=True)
        self._loop.start()
        return self

    def stop(self) -> None:
        self.agent.request_stop()
        self.agent.stop(drain_timeout=10)


@pytest.fixture
def start_agent(broker: MosquittoBroker, models_dir: Path) -> Iterator[Callable[..., RunningAgent]]:
    """Start agents on the session broker; each is stopped at the end of the test."""
    started: list[RunningAgent] = []

    def start(
        directory: Path | None = None, port: int | None = None, **sections: dict[str, Any]
    ) -> RunningAgent:
        config = agent_config(port or broker.port, directory or models_dir, **sections)
        running = RunningAgent(config).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def agent(start_agent: Callable[..., RunningAgent]) -> RunningAgent:
    """One agent serving `models_dir` on the session broker."""
    return start_agent()


class Probe:
    """A plain paho client, as an application would write it, that records what it gets."""

    def __init__(self, port: int, protocol: int = mqtt.MQTTv5) -> None:
        self.protocol = protocol
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"probe-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
        )
        self.client.on_socket_open = lambda _c, _u, sock: sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        connected = threading.Event()
        self.client.on_connect = lambda *_args: connected.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert connected.wait(5), "probe could not connect"
        self.reply_topic = f"test/replies/{uuid.uuid4().hex[:8]}"
        self.subscribe(self.reply_topic)

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_args: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(5), f"no SUBACK for {topic}"

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        properties: Properties | None = None,
        qos: int = 1,
        retain: bool = False,
    ) -> None:
        self.client.publish(
            topic, payload, qos=qos, properties=properties, retain=retain
        ).wait_for_publish(5)

    def expect(self, topic: str | None = None, timeout: float = 5.0) -> mqtt.MQTTMessage:
        """The next message (on `topic`, when given), or fail after `timeout` seconds."""
        deadline = threading.Event()
        timer = threading.Timer(timeout, deadline.set)
        timer.start()
        try:
            while not deadline.is_set():
                try:
                    msg = self.messages.get(timeout=0.05)
                except queue.Empty:
                    continue
                if topic is None or msg.topic == topic:
                    return msg
        finally:
            timer.cancel()
        raise AssertionError(f"no message on {topic or 'any topic'} within {timeout} s")

    def nothing(self, topic: str, within: float) -> bool:
        """True when no message arrives on `topic` for `within` seconds."""
        try:
            self.expect(topic, within)
        except AssertionError:
            return True
        return False

    def request(
        self,
        topic: str,
        payload: bytes | str,
        *,
        header_length: int | None = None,
        correlation: bytes | None = None,
        expiry: int | None = None,
        timeout: float = 5.0,
    ) -> mqtt.MQTTMessage:
        """MQTT 5 request/response: Response Topic + Correlation Data, as mosquitto_rr does."""
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = correlation or uuid.uuid4().bytes
        if header_length is not None:
            props.UserProperty = [(HEADER, str(header_length))]
        if expiry is not None:
            props.MessageExpiryInterval = expiry
        self.publish(topic, payload, props)
        reply = self.expect(self.reply_topic, timeout)
        assert reply.properties.CorrelationData == props.CorrelationData
        return reply

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def probe(broker: MosquittoBroker) -> Iterator[Probe]:
    """An MQTT 5 client on the session broker."""
    client = Probe(broker.port)
    yield client
    client.close()


def body(msg: mqtt.MQTTMessage) -> dict[str, Any]:
    """The JSON of a reply without binary data."""
    loaded: dict[str, Any] = json.loads(msg.payload)
    return loaded
