"""Bad input over MQTT: every kind gets an error reply, and the next request is served."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.broker import MosquittoBroker, free_port
from agent.protocol import encode_request
from tests import onnx_models
from tests.conftest import Probe, RunningAgent, body
from tests.fuzzing import ResubscribingClient

VALID = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
)


def scale_request(**tensor: object) -> str:
    base: dict[str, object] = {
        "name": "x",
        "shape": [1, 4],
        "datatype": "FP32",
        "data": [1, 2, 3, 4],
    }
    base.update(tensor)
    return json.dumps({"id": "bad", "inputs": [base]})


def assert_still_serving(agent: RunningAgent, probe: Probe) -> None:
    reply = body(probe.request(f"{agent.topic}/infer/scale", VALID))
    assert reply["outputs"][0]["data"] == [3.0, 5.0, 7.0, 9.0]


@pytest.mark.parametrize(
    ("model", "payload", "code", "message"),
    [
        ("scale", b"{oops", 400, "malformed JSON"),
        ("scale", b"\x80\x81\xfe\xff binary junk", 400, "neither JSON nor a JSON header"),
        ("nope", VALID.encode(), 404, "model 'nope' is not loaded"),
        (
            "scale",
            json.dumps(
                {
                    "inputs": [
                        {"name": "z", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
                    ]
                }
            ).encode(),
            400,
            "missing input(s) ['x']",
        ),
        (
            "pair",
            json.dumps(
                {
                    "inputs": [
                        {"name": "a", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]},
                        {"name": "b", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
                        {"name": "c", "shape": [1], "datatype": "FP32", "data": [1]},
                    ]
                }
            ).encode(),
            400,
            "unknown input(s) ['c']",
        ),
        ("scale", scale_request(datatype="FP64").encode(), 400, "is FP32, got FP64"),
        ("scale", scale_request(shape=[4], data=[1, 2, 3, 4]).encode(), 400, "got [4]"),
        ("scale", scale_request(shape=[1, 5], data=[1, 2, 3, 4, 5]).encode(), 400, "got [1, 5]"),
        (
            "scale",
            scale_request(data=[1, 2, 3]).encode(),
            400,
            "3 data elements, shape [1, 4] needs 4",
        ),
        (
            "picky",
            json.dumps(
                {
                    "inputs": [
                        {"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}
                    ]
                }
            ).encode(),
            500,
            "picky/default",
        ),
    ],
)
def test_bad_requests_get_error_replies(
    agent: RunningAgent, probe: Probe, model: str, payload: bytes, code: int, message: str
) -> None:
    """Each bad request is answered with its code and reason; the agent keeps serving."""
    reply = body(probe.request(f"{agent.topic}/infer/{model}", payload))
    assert reply["code"] == code
    assert message in reply["error"]
    assert reply["model_name"] == model
    assert_still_serving(agent, probe)


def test_binary_header_length_beyond_the_payload(agent: RunningAgent, probe: Probe) -> None:
    """An Inference-Header-Content-Length past the payload's end is a 400, not a crash."""
    payload, _ = encode_request({"x": np.ones((1, 4), np.float32)})
    reply = body(
        probe.request(f"{agent.topic}/infer/scale", payload, header_length=len(payload) + 100)
    )
    assert reply["code"] == 400
    assert "beyond the payload" in reply["error"]
    props = _props(probe, b"nan", None)
    props.UserProperty = [("Inference-Header-Content-Length", "twelve")]  # type: ignore[attr-defined]
    probe.publish(f"{agent.topic}/infer/scale", payload, props)  # type: ignore[arg-type]
    reply = body(probe.expect(probe.reply_topic))
    assert (reply["code"], reply["error"]) == (
        400,
        "Inference-Header-Content-Length 'twelve' is not an integer",
    )
    assert_still_serving(agent, probe)


def test_oversized_payload_is_refused(
    start_agent: Callable[..., RunningAgent], probe: Probe
) -> None:
    """A request above mqtt.max_payload_bytes is answered 413 without being decoded."""
    agent = start_agent(mqtt={"max_payload_bytes": 4096})
    big = json.dumps(
        {"inputs": [{"name": "x", "shape": [1000, 4], "datatype": "FP32", "data": [0.5] * 4000}]}
    )
    reply = body(probe.request(f"{agent.topic}/infer/scale", big))
    assert reply["code"] == 413
    assert "exceeds the limit of 4096" in reply["error"]
    assert_still_serving(agent, probe)


def test_mqtt311_errors_reach_reply_to(agent: RunningAgent, broker: MosquittoBroker) -> None:
    """A 3.1.1 client's bad request is still answered on its reply_to topic, with its id."""
    client = Probe(broker.port, protocol=mqtt.MQTTv311)
    try:
        client.publish(
            f"{agent.topic}/infer/scale",
            json.dumps({"id": "e1", "reply_to": client.reply_topic, "inputs": "not a list"}),
        )
        reply = body(client.expect(client.reply_topic))
    finally:
        client.close()
    assert reply == {
        "error": "'inputs' must be a non-empty list",
        "code": 400,
        "id": "e1",
        "model_name": "scale",
    }


def test_requests_without_a_reply_address_are_logged_and_skipped(
    agent: RunningAgent, probe: Probe
) -> None:
    """A request nobody can be answered for is not computed, and does not disturb others."""
    probe.publish(f"{agent.topic}/infer/scale", VALID)
    probe.publish(
        f"{agent.topic}/infer/scale",
        json.dumps({"reply_to": "bad/+/topic", "inputs": json.loads(VALID)["inputs"]}),
    )
    assert_still_serving(agent, probe)
    assert agent.agent.manager.get("scale").stats.snapshot().requests == 1


def test_full_queue_answers_overloaded(
    start_agent: Callable[..., RunningAgent], probe: Probe, tmp_path: Path
) -> None:
    """With the queue full, further requests get 503 at once; every request gets a reply."""
    models = tmp_path / "slow-models"
    path = onnx_models.slow_model(models / "slow.onnx")
    rows = onnx_models.rows_for_seconds(path, 0.3)
    agent = start_agent(models, models={"max_queue": 1, "workers": 1})
    payload, header_length = encode_request(
        {"x": np.ones((rows, 512), np.float32)}, binary_outputs=True
    )
    topic = f"{agent.topic}/infer/slow"
    futures = []
    for n in range(6):
        probe.publish(topic, payload, _props(probe, f"c{n}".encode(), header_length))
        futures.append(n)
    replies = [probe.expect(probe.reply_topic, timeout=30) for _ in futures]
    codes = []
    for reply in replies:
        header = reply.payload[: _header_length(reply) or len(reply.payload)]
        codes.append(json.loads(header).get("code", 200))
    assert sorted(codes).count(503) >= 3, codes
    assert codes.count(200) >= 1, codes
    assert agent.agent.manager.get("slow").stats.snapshot().rejected == codes.count(503)


def test_expired_requests_are_not_answered(
    start_agent: Callable[..., RunningAgent], probe: Probe, tmp_path: Path
) -> None:
    """A request whose MQTT 5 message expiry passes in the queue is dropped, not computed."""
    models = tmp_path / "slow-models"
    path = onnx_models.slow_model(models / "slow.onnx")
    rows = onnx_models.rows_for_seconds(path, 3.0)
    agent = start_agent(models, models={"workers": 1, "threads": 1, "max_batch_size": 1})
    payload, header_length = encode_request({"x": np.ones((rows, 512), np.float32)})
    small, small_length = encode_request({"x": np.ones((1, 512), np.float32)})
    topic = f"{agent.topic}/infer/slow"
    probe.publish(topic, payload, _props(probe, b"long", header_length))
    # The long request is decoded off the network thread (it is large): wait until it runs,
    # so that the small one queues behind it rather than overtaking it.
    queue = agent.agent.manager.get("slow").queue
    deadline = time.monotonic() + 30
    while not queue.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    probe.publish(topic, small, _props(probe, b"expires", small_length, expiry=1))
    first = probe.expect(probe.reply_topic, timeout=60)
    assert first.properties.CorrelationData == b"long"
    assert probe.nothing(probe.reply_topic, within=1.0)
    assert agent.agent.manager.get("slow").stats.snapshot().expired == 1


def _props(
    probe: Probe, correlation: bytes, header_length: int | None, expiry: int | None = None
) -> object:

    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = probe.reply_topic
    props.CorrelationData = correlation
    if header_length is not None:
        props.UserProperty = [("Inference-Header-Content-Length", str(header_length))]
    if expiry is not None:
        props.MessageExpiryInterval = expiry
    return props


def _header_length(msg: mqtt.MQTTMessage) -> int | None:
    for key, value in getattr(msg.properties, "UserProperty", []):
        if key == "Inference-Header-Content-Length":
            return int(value)
    return None


@pytest.mark.parametrize("bad", ["\x00", "\x01", "\uffff", "\ud800", "\U0001fffe"])
def test_mqtt311_reply_to_that_mqtt_forbids_is_refused_and_serving_goes_on(
    agent: RunningAgent, broker: MosquittoBroker, bad: str
) -> None:
    """A 3.1.1 reply_to with U+0000, a control, a non-character or a lone surrogate is
    refused before publishing, so the broker never drops the agent and later requests
    are answered."""
    client = Probe(broker.port, protocol=mqtt.MQTTv311)
    try:
        request = json.loads(VALID)
        # json.dumps escapes a lone surrogate as \\ud800: valid JSON text, invalid topic.
        client.publish(
            f"{agent.topic}/infer/scale",
            json.dumps({"id": "poison", "reply_to": f"r/{bad}/x", **request}),
        )
        for n in range(5):
            client.publish(
                f"{agent.topic}/infer/scale",
                json.dumps({"id": f"ok{n}", "reply_to": client.reply_topic, **request}),
            )
            reply = body(client.expect(client.reply_topic, timeout=5))
            assert (reply["id"], reply["outputs"][0]["data"]) == (f"ok{n}", [3.0, 5.0, 7.0, 9.0])
    finally:
        client.close()
    assert agent.agent.frontend is not None and agent.agent.frontend.connected


@pytest.fixture
def small_packet_broker() -> Iterator[MosquittoBroker]:
    """A mosquitto of its own that refuses packets over 64 KiB."""
    instance = MosquittoBroker(free_port(), max_packet_size=65536)
    instance.start()
    yield instance
    instance.stop()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_reply_over_the_brokers_packet_size_becomes_an_error_reply(
    start_agent: Callable[..., RunningAgent], small_packet_broker: MosquittoBroker, protocol: str
) -> None:
    """A reply too large for the broker (MQTT 5: its CONNACK limit; 3.1.1: the configured
    mqtt.max_packet_bytes) is answered with a 413, and the next requests still are."""
    agent = start_agent(
        port=small_packet_broker.port,
        mqtt={
            "protocol": protocol,
            "max_packet_bytes": 65536 if protocol == "3.1.1" else 2**28 - 1,
        },
    )
    v5 = protocol == "5"
    probe = Probe(small_packet_broker.port, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
    topic = f"{agent.topic}/infer/scale"

    def ask(payload: bytes, header_length: int | None) -> dict[str, object]:
        if v5:
            return body(probe.request(topic, payload, header_length=header_length))
        probe.publish(topic, payload)  # reply_to travels in the JSON header
        return body(probe.expect(probe.reply_topic))

    try:
        # 48 KB of binary input fits the limit; the same values printed as JSON do not.
        rows = np.random.default_rng(0).random((3000, 4), dtype=np.float32)
        reply_to = None if v5 else probe.reply_topic
        payload, header_length = encode_request(
            {"x": rows}, "big", binary_outputs=False, reply_to=reply_to
        )
        assert len(payload) < 65536
        reply = ask(payload, header_length)
        assert reply["code"] == 413, reply
        assert "exceeds the" in str(reply["error"]) and "binary outputs" in str(reply["error"])
        small, small_length = encode_request(
            {"x": np.ones((1, 4), np.float32)}, "small", binary_outputs=False, reply_to=reply_to
        )
        for _ in range(3):
            assert ask(small, small_length)["outputs"] == [
                {"name": "y", "datatype": "FP32", "shape": [1, 4], "data": [3.0, 3.0, 3.0, 3.0]}
            ]
    finally:
        probe.close()


HOSTILE = [
    scale_request(datatype=["FP32"]).encode(),
    scale_request(datatype={"x": 1}).encode(),
    b'{"id": "deep", "inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    scale_request(shape=[1] * 65, data=[1]).encode(),
    scale_request(shape=[0, 2**70], data=[]).encode(),
    b'{"id": ' + b"1" * 5000 + b', "inputs": []}',
    scale_request(shape=[1, int("9" * 4299)]).encode(),
    json.dumps({"id": "bad", "inputs": [{"name": "x", "shape": [2**62] * 100_000}]}).encode(),
    scale_request(data=["1.5", "2", "3", "4"]).encode(),
    scale_request(data=[None, 2, 3, 4]).encode(),
    scale_request(datatype="FP32", name="x" * 10_000_000).encode(),
]


@pytest.mark.parametrize("payload", HOSTILE, ids=lambda p: p[:40].decode(errors="replace"))
def test_hostile_payloads_get_a_bounded_error_reply(
    agent: RunningAgent, probe: Probe, payload: bytes
) -> None:
    """Every hostile payload kind of the fuzzing report gets a 400 within a bounded size,
    and the agent keeps serving."""
    msg = probe.request(f"{agent.topic}/infer/scale", payload, timeout=10)
    assert len(msg.payload) < 1500
    assert body(msg)["code"] == 400
    assert_still_serving(agent, probe)


@pytest.mark.parametrize(
    "payload",
    [b"[" * 5000 + b"]" * 5000, b'{"model": ' + b"[" * 1000 + b"]" * 1000 + b"}", b"\xff\xfe"],
)
def test_hostile_control_bodies_get_an_error_reply(
    agent: RunningAgent, probe: Probe, payload: bytes
) -> None:
    """A control body nested thousands deep or not UTF-8 is answered with a 400."""
    reply = body(probe.request(f"{agent.topic}/control/models", payload))
    assert reply["code"] == 400
    assert "models" in body(probe.request(f"{agent.topic}/control/models", b"{}"))


def test_runtime_errors_do_not_show_onnxruntime_source_paths(
    agent: RunningAgent, probe: Probe
) -> None:
    """A model that raises answers 500 with onnxruntime's reason, without its file paths."""
    payload = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 5], "datatype": "FP32", "data": [1, 2, 3, 4, 5]}]}
    )
    reply = body(probe.request(f"{agent.topic}/infer/picky", payload))
    assert reply["code"] == 500
    assert "MatMul dimension mismatch" in reply["error"]
    assert ".h:" not in reply["error"] and "onnxruntime_src" not in reply["error"], reply


def test_heavy_json_floods_are_shed_with_503_and_control_stays_prompt(
    start_agent: Callable[..., RunningAgent], probe: Probe
) -> None:
    """Multi-MB JSON requests faster than the agent decodes them each get an answer (a
    result or a 503), and a control command sent behind them is answered before they are."""
    agent = start_agent(mqtt={"decode_backlog_bytes": 8 * 2**20})
    rows = np.random.default_rng(0).random((80_000, 4)).round(6)
    heavy = json.dumps(
        {
            "parameters": {"binary_data_output": True},
            "inputs": [
                {"name": "x", "shape": [80_000, 4], "datatype": "FP32", "data": rows.tolist()}
            ],
        }
    ).encode()
    assert len(heavy) > 2 * 2**20
    count = 20
    for n in range(count):
        probe.publish(f"{agent.topic}/infer/scale", heavy, _props(probe, f"h{n}".encode(), None))
    probe.publish(f"{agent.topic}/control/models", b"{}", _props(probe, b"control", None))
    order: list[bytes] = []
    codes: dict[bytes, int] = {}
    for _ in range(count + 1):
        msg = probe.expect(probe.reply_topic, timeout=60)
        key = msg.properties.CorrelationData
        order.append(key)
        header = msg.payload[: _header_length(msg) or len(msg.payload)]
        codes[key] = json.loads(header).get("code", 200)
    assert sorted(order) == sorted([b"control", *(f"h{n}".encode() for n in range(count))])
    inference = [codes[f"h{n}".encode()] for n in range(count)]
    assert set(inference) <= {200, 503} and 503 in inference, inference
    assert codes[b"control"] == 200
    assert order.index(b"control") < count, "the control reply waited behind every request"
    assert_still_serving(agent, probe)


def test_control_commands_queue_within_a_bound_and_the_rest_get_503(
    start_agent: Callable[..., RunningAgent], probe: Probe
) -> None:
    """With mqtt.max_pending_commands waiting or running, further commands get a 503 at
    once; the queued ones are answered when the slow one ends."""
    agent = start_agent(mqtt={"max_pending_commands": 4})
    release = threading.Event()

    def blocked(_body: dict[str, object]) -> dict[str, object]:
        release.wait(30)
        return {"done": True}

    agent.agent.control._commands["blocked"] = blocked
    for n in range(10):
        probe.publish(
            f"{agent.topic}/control/blocked", b"{}", _props(probe, f"c{n}".encode(), None)
        )
    refused = [probe.expect(probe.reply_topic, timeout=5) for _ in range(6)]
    assert {body(m)["code"] for m in refused} == {503}
    assert {m.properties.CorrelationData for m in refused} == {
        f"c{n}".encode() for n in range(4, 10)
    }
    release.set()
    done = [probe.expect(probe.reply_topic, timeout=10) for _ in range(4)]
    assert [body(m) for m in done] == [{"done": True}] * 4
    assert "models" in body(probe.request(f"{agent.topic}/control/models", b"{}"))


def test_a_publication_the_broker_keeps_refusing_does_not_take_the_agent_offline(
    start_agent: Callable[..., RunningAgent], small_packet_broker: MosquittoBroker
) -> None:
    """With mqtt.max_packet_bytes set too high (3.1.1 cannot learn the broker's limit), a
    reply the broker refuses by disconnecting is resent by paho on each reconnect; after
    three short connections the agent drops it and serves again."""
    agent = start_agent(
        port=small_packet_broker.port,
        mqtt={"protocol": "3.1.1", "reconnect_min_s": 1, "reconnect_max_s": 1},
    )
    probe = Probe(small_packet_broker.port, protocol=mqtt.MQTTv311)
    topic = f"{agent.topic}/infer/scale"
    try:
        rows = np.random.default_rng(0).random((3000, 4), dtype=np.float32)
        payload, _ = encode_request(
            {"x": rows}, "big", binary_outputs=False, reply_to=probe.reply_topic
        )
        probe.publish(topic, payload)
        small, _ = encode_request(
            {"x": np.ones((1, 4), np.float32)},
            "small",
            binary_outputs=False,
            reply_to=probe.reply_topic,
        )
        answered = False
        for _ in range(30):  # the agent reconnects about once a second meanwhile
            probe.publish(topic, small)
            try:
                reply = body(probe.expect(probe.reply_topic, timeout=1.0))
            except AssertionError:
                continue
            if reply.get("id") == "small":
                answered = True
                break
        assert answered, "the agent never served again"
    finally:
        probe.close()


def test_broker_faults_lose_no_request_the_agent_received(
    start_agent: Callable[..., RunningAgent], tmp_path: Path
) -> None:
    """SIGSTOP of the broker, then kill -9 and a restart while a request is being computed:
    every request the agent received is answered, and it serves normally after each fault."""
    own = MosquittoBroker(free_port())
    own.start()
    restarted: MosquittoBroker | None = None
    models = tmp_path / "slow-models"
    path = onnx_models.slow_model(models / "slow.onnx")
    rows = onnx_models.rows_for_seconds(path, 2.0)
    onnx_models.scale_model(models / "scale.onnx")
    agent = start_agent(models, port=own.port, models={"workers": 1})
    client = ResubscribingClient(own.port)
    small, small_length = encode_request({"x": np.ones((1, 4), np.float32)})
    scale = f"{agent.topic}/infer/scale"
    try:
        process = own._process  # the test's own mosquitto: signalled by its PID only
        assert process is not None
        process.send_signal(signal.SIGSTOP)
        for n in range(10):
            client.send(scale, small, f"stopped{n}".encode(), small_length)
        time.sleep(3)
        process.send_signal(signal.SIGCONT)
        wanted = {f"stopped{n}".encode() for n in range(10)}
        assert client.replies(10, timeout=20) == wanted

        heavy, heavy_length = encode_request({"x": np.ones((rows, 512), np.float32)})
        client.send(f"{agent.topic}/infer/slow", heavy, b"in-flight", heavy_length)
        queue_of_slow = agent.agent.manager.get("slow").queue
        deadline = time.monotonic() + 10
        while queue_of_slow.busy == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert queue_of_slow.busy == 1, "the agent never started the request"
        process.kill()  # SIGKILL: no goodbye to anyone
        process.wait(5)
        restarted = MosquittoBroker(own.port)
        restarted.start()
        assert client.replies(1, timeout=30) == {b"in-flight"}
        assert agent.agent.frontend is not None and agent.agent.frontend.wait_connected(20)
        client.send(scale, small, b"after", small_length)
        assert client.replies(1, timeout=10) == {b"after"}
    finally:
        client.close()
        if restarted is not None:
            restarted.stop()
        own.stop()


def test_an_oversized_control_request_is_refused_unparsed(
    agent: RunningAgent, probe: Probe
) -> None:
    """A control body over 64 KiB gets a 413 without being parsed on the network thread."""
    huge = json.dumps({"model": "x" * 100_000}).encode()
    reply = body(probe.request(f"{agent.topic}/control/models", huge))
    assert reply["code"] == 413
