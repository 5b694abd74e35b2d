"""Bad input over MQTT: every kind gets an error reply, and the next request is served."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.broker import MosquittoBroker
from agent.protocol import encode_request
from tests import onnx_models
from tests.conftest import Probe, RunningAgent, body

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
