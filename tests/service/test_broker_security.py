"""The broker link under TLS with passwords and the shipped ACL: the agent connects with
the right credentials (from a systemd credential), is refused with wrong ones without
crashing, and a client without rights cannot pin a variant."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.broker import MosquittoBroker, free_port
from agent.service import Agent
from tests import onnx_models
from tests.conftest import agent_config
from tests.service.pki import Pki, make_pki

REPO = Path(__file__).resolve().parents[2]
ACL_EXAMPLE = REPO / "systemd" / "mosquitto-acl.example"
DEVICE = "edge-device-1"  # the device user of the ACL example
PASSWORDS = {
    DEVICE: "device-secret-7f3a",
    "operator": "operator-pw",
    "app1": "app1-pw",
    "app2": "app2-pw",  # no block of its own in the ACL: it may only read its replies
}
LADDER_SPEC = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}


@dataclass(frozen=True)
class SecureBroker:
    """mosquitto with mutual TLS, a password file and the shipped ACL example."""

    port: int
    pki: Pki
    log: Path


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    """One TLS broker for the module; certificates and passwords made here."""
    directory = tmp_path_factory.mktemp("secure-broker")
    pki = make_pki(directory / "pki")
    passwd = directory / "passwd"
    passwd.touch()
    for user, password in PASSWORDS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True)
    instance = MosquittoBroker(
        free_port(),
        extra_config=(
            "allow_anonymous false\n"
            f"password_file {passwd}\n"
            f"acl_file {ACL_EXAMPLE}\n"
            f"cafile {pki.ca_cert}\n"
            f"certfile {pki.server_cert}\n"
            f"keyfile {pki.server_key}\n"
            "require_certificate true\n"
            "log_type all\n"  # denied publications are logged at debug level
        ),
    )
    instance.start()
    yield SecureBroker(instance.port, pki, instance.config_dir / "mosquitto.log")
    instance.stop()


class SecureClient:
    """An MQTT client with a certificate and a user name, as an app or operator has."""

    def __init__(self, broker: SecureBroker, user: str, protocol: int = mqtt.MQTTv5) -> None:
        self.user = user
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.acks: queue.Queue[tuple[int, str]] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{user}-{uuid.uuid4().hex[:6]}",
            protocol=protocol,
        )
        pki = broker.pki
        self.client.tls_set(str(pki.ca_cert), str(pki.client_cert), str(pki.client_key))
        self.client.username_pw_set(user, PASSWORDS[user])
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_publish = lambda _c, _u, mid, reason, _p: self.acks.put((mid, str(reason)))
        connected = threading.Event()
        self.client.on_connect = lambda *_args: connected.set()
        self.client.connect("localhost", broker.port)
        self.client.loop_start()
        assert connected.wait(5), f"{user} could not connect"
        self.reply_topic = f"edge/reply/{user}/{uuid.uuid4().hex[:6]}"
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_args: subscribed.set()
        self.client.subscribe(self.reply_topic, qos=1)
        assert subscribed.wait(5)

    def send(self, topic: str, body: dict[str, Any], reply_topic: str | None = None) -> str:
        """Publish at QoS 1 with a reply address; the PUBACK's reason (MQTT 5) or 'Success'."""
        props = None
        if self.client.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_topic or self.reply_topic
            props.CorrelationData = b"c"
        else:
            body = {**body, "reply_to": reply_topic or self.reply_topic}
        info = self.client.publish(topic, json.dumps(body), qos=1, properties=props)
        info.wait_for_publish(5)
        mid, reason = self.acks.get(timeout=5)
        assert mid == info.mid
        return reason

    def reply(self, timeout: float = 5.0) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.messages.get(timeout=timeout).payload)
        return loaded

    def no_reply(self, within: float) -> bool:
        try:
            self.messages.get(timeout=within)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients(secure_broker: SecureBroker) -> Iterator[list[SecureClient]]:
    """Clients made by a test, closed after it."""
    made: list[SecureClient] = []
    yield made
    for client in made:
        client.close()


@pytest.fixture
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A $CREDENTIALS_DIRECTORY as systemd's LoadCredential= makes it."""
    directory = tmp_path / "credentials"
    directory.mkdir(mode=0o700)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(directory))
    return directory


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    """Agents made by a test, stopped after it."""
    made: list[Agent] = []
    yield made
    for agent in made:
        agent.request_stop()
        agent.stop(drain_timeout=5)


def secure_agent(
    broker: SecureBroker, models: Path, password_credential: str, **sections: dict[str, Any]
) -> Agent:
    pki = broker.pki
    mqtt_section = {
        "host": "localhost",
        "device_id": DEVICE,
        "username": DEVICE,
        "password_credential": password_credential,
        "reconnect_min_s": 1,
        "reconnect_max_s": 4,
        "reply_prefix": "edge/reply",  # what the shipped ACL asks of the agent
        "tls": {
            "enabled": True,
            "ca_file": pki.ca_cert,
            "cert_file": pki.client_cert,
            "key_file": pki.client_key,
        },
        **sections.pop("mqtt", {}),
    }
    return Agent(agent_config(broker.port, models, mqtt=mqtt_section, **sections))


def ladder_models(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    big = onnx_models.scale_model(tmp_path / "build" / "big.onnx", factor=2.0)
    small = onnx_models.scale_model(tmp_path / "build" / "small.onnx", factor=3.0)
    onnx_models.ladder_folder(directory / "lad", [("big", big), ("small", small)], **LADDER_SPEC)
    return directory


def wait_online(client: SecureClient) -> None:
    """Wait until the device's subscriptions are in place (its `online` status follows them)."""
    topic = f"edge/{DEVICE}/status"
    client.client.subscribe(topic, qos=1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = client.messages.get(timeout=10)
        if msg.topic == topic and b'"state":"online"' in msg.payload:
            client.client.unsubscribe(topic)
            return
    raise AssertionError("device never came online")


def test_the_agent_serves_over_tls_with_its_password_from_a_systemd_credential(
    secure_broker: SecureBroker,
    credentials: Path,
    tmp_path: Path,
    agents: list[Agent],
    clients: list[SecureClient],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Mutual TLS with hostname verification plus the password from $CREDENTIALS_DIRECTORY:
    the agent connects, answers an app, and the password never appears in its logs."""
    (credentials / "mqtt-password").write_text(PASSWORDS[DEVICE] + "\n")
    agent = secure_agent(secure_broker, ladder_models(tmp_path), "mqtt-password")
    agents.append(agent)
    agent.start()
    assert agent.frontend is not None and agent.frontend.wait_connected(10)
    app = SecureClient(secure_broker, "app1")
    clients.append(app)
    wait_online(app)
    request = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
    assert app.send(f"edge/{DEVICE}/infer/lad/app1", request) == "Success"
    reply = app.reply()
    assert reply["model_version"] == "big"
    assert reply["outputs"][0]["data"] == [3.0] * 4
    agent.request_stop()
    agent.stop(drain_timeout=2)
    logs = capsys.readouterr()
    assert "broker_connected" in logs.out
    assert PASSWORDS[DEVICE] not in logs.out + logs.err


def test_wrong_credentials_are_refused_clearly_and_retried_with_backoff(
    secure_broker: SecureBroker,
    credentials: Path,
    tmp_path: Path,
    agents: list[Agent],
) -> None:
    """A wrong password: each refusal is an event with the broker's reason and a hint, the
    retries back off (1 s, then 2 s, ...), and the agent keeps running, not ready."""
    (credentials / "mqtt-password").write_text("not-the-password")
    agent = secure_agent(secure_broker, ladder_models(tmp_path), "mqtt-password")
    agents.append(agent)
    refusals: list[tuple[float, dict[str, Any]]] = []
    emit = agent.events.emit

    def record(event: str, **fields: Any) -> None:
        if event == "broker_refused":
            refusals.append((time.monotonic(), fields))
        emit(event, **fields)

    agent.events.emit = record  # type: ignore[method-assign]  # observe what is emitted
    agent.start()
    time.sleep(3.5)
    assert len(refusals) >= 3, refusals
    first, second, third = (at for at, _fields in refusals[:3])
    assert 0.7 < second - first < 1.6
    assert 1.7 < third - second < 2.6
    fields = refusals[0][1]
    assert fields["reason"] == "Not authorized"
    assert fields["username"] == DEVICE
    assert "password" in fields["hint"]
    assert not agent.ready
    assert "refused by the broker: Not authorized" in agent.status_line()
    assert agent.supervisor is not None and agent.health_problems(10.0) == []


# paho drops the socket of a failed TLS handshake without closing it; the garbage collector
# closes it, with a ResourceWarning that is paho's, not ours.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_broker_certificate_from_another_ca_is_not_trusted(
    secure_broker: SecureBroker,
    credentials: Path,
    tmp_path: Path,
    agents: list[Agent],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With the wrong CA configured, the TLS handshake fails and the agent never connects."""
    (credentials / "mqtt-password").write_text(PASSWORDS[DEVICE])
    agent = secure_agent(
        secure_broker,
        ladder_models(tmp_path),
        "mqtt-password",
        mqtt={
            "tls": {
                "enabled": True,
                "ca_file": secure_broker.pki.other_ca_cert,
                "cert_file": secure_broker.pki.client_cert,
                "key_file": secure_broker.pki.client_key,
            }
        },
    )
    agents.append(agent)
    agent.start()
    assert agent.frontend is not None
    assert not agent.frontend.wait_connected(2)
    assert "broker_unreachable" in capsys.readouterr().out


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["mqtt5", "mqtt311"])
def test_a_client_without_rights_cannot_pin_a_variant(
    secure_broker: SecureBroker,
    credentials: Path,
    tmp_path: Path,
    agents: list[Agent],
    clients: list[SecureClient],
    protocol: int,
) -> None:
    """An app's pin is stopped at the broker (MQTT 5: PUBACK "Not authorized"; 3.1.1:
    dropped silently) and the agent does not act; the operator's pin works."""
    (credentials / "mqtt-password").write_text(PASSWORDS[DEVICE])
    agent = secure_agent(
        secure_broker, ladder_models(tmp_path), "mqtt-password", state={"dir": tmp_path / "st"}
    )
    agents.append(agent)
    agent.start()
    assert agent.frontend is not None and agent.frontend.wait_connected(10)
    operator = SecureClient(secure_broker, "operator")
    clients.append(operator)
    wait_online(operator)
    app = SecureClient(secure_broker, "app1", protocol)
    clients.append(app)

    pin = {"model": "lad", "variant": "small"}
    denied_before = secure_broker.log.read_text().count("Denied PUBLISH")
    reason = app.send(f"edge/{DEVICE}/control/pin/app1", pin)
    assert reason == ("Not authorized" if protocol == mqtt.MQTTv5 else "Success")
    assert app.no_reply(within=1.0)
    assert agent.manager.get("lad").active.name == "big"
    assert agent.state.pinned("lad") is None
    assert secure_broker.log.read_text().count("Denied PUBLISH") == denied_before + 1

    assert operator.send(f"edge/{DEVICE}/control/pin/operator", pin) == "Success"
    assert operator.reply() == {"model": "lad", "pinned": "small", "active": "small"}
    assert agent.state.pinned("lad") == "small"


REQUEST = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}


@pytest.fixture
def serving_device(
    secure_broker: SecureBroker, credentials: Path, tmp_path: Path, agents: list[Agent]
) -> Agent:
    """The device agent, configured as the README says, serving the ladder model."""
    (credentials / "mqtt-password").write_text(PASSWORDS[DEVICE])
    agent = secure_agent(secure_broker, ladder_models(tmp_path), "mqtt-password")
    agents.append(agent)
    agent.start()
    assert agent.frontend is not None and agent.frontend.wait_connected(10)
    return agent


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["mqtt5", "mqtt311"])
def test_a_client_cannot_have_replies_delivered_to_another(
    secure_broker: SecureBroker,
    serving_device: Agent,
    clients: list[SecureClient],
    protocol: int,
) -> None:
    """app1 naming app2's reply topic, or the device's own status and events topics, gets
    nothing published there; its own reply topic works."""
    app2 = SecureClient(secure_broker, "app2")
    clients.append(app2)
    app1 = SecureClient(secure_broker, "app1", protocol)
    clients.append(app1)
    wait_online(app1)
    app1.client.subscribe(f"edge/{DEVICE}/#", qos=1)  # the ACL lets it read the status
    time.sleep(0.3)
    while not app1.messages.empty():  # the retained status
        app1.messages.get()
    topic = f"edge/{DEVICE}/infer/lad/app1"
    for target in (app2.reply_topic, f"edge/{DEVICE}/status", f"edge/{DEVICE}/events"):
        assert app1.send(topic, REQUEST, reply_topic=target) == "Success"
    assert app2.no_reply(within=1.0)
    assert app1.no_reply(within=0.5)
    assert app1.send(topic, REQUEST) == "Success"
    assert app1.reply()["outputs"][0]["data"] == [3.0] * 4


def test_requests_must_name_their_sender(
    secure_broker: SecureBroker, serving_device: Agent, clients: list[SecureClient]
) -> None:
    """The broker refuses a request without the sender's user name as the last level, or
    with another user's name there: the agent can trust that level."""
    app1 = SecureClient(secure_broker, "app1")
    clients.append(app1)
    wait_online(app1)
    assert app1.send(f"edge/{DEVICE}/infer/lad", REQUEST) == "Not authorized"
    assert app1.send(f"edge/{DEVICE}/infer/lad/app2", REQUEST) == "Not authorized"
    assert app1.no_reply(within=0.5)


def test_edge_agent_infer_works_with_the_shipped_acl(
    secure_broker: SecureBroker, serving_device: Agent, tmp_path: Path
) -> None:
    """`edge-agent infer` as app1 sends on .../<model>/app1 and listens under
    edge/reply/app1/, so it gets its reply through the README's ACL."""
    pki = secure_broker.pki
    (tmp_path / "app1-password").write_text(PASSWORDS["app1"])
    config = tmp_path / "client.toml"
    config.write_text(
        "[mqtt]\n"
        f'host = "localhost"\nport = {secure_broker.port}\ndevice_id = "{DEVICE}"\n'
        f'username = "app1"\npassword_file = "{tmp_path / "app1-password"}"\n'
        "[mqtt.tls]\nenabled = true\n"
        f'ca_file = "{pki.ca_cert}"\ncert_file = "{pki.client_cert}"\n'
        f'key_file = "{pki.client_key}"\n'
    )
    request = tmp_path / "request.json"
    request.write_text(json.dumps(REQUEST))
    result = subprocess.run(
        [sys.executable, "-m", "agent", "infer", "lad", str(request), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "answered by variant big" in result.stdout
