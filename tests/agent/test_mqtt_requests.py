"""Requests over a real mosquitto, as each kind of client sends them."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import tritonclient.http as oip

from agent.broker import MosquittoBroker, free_port
from agent.protocol import decode_response, encode_request
from tests import onnx_models
from tests.conftest import HEADER, Probe, RunningAgent, body
from tests.fuzzing import ResubscribingClient


def digits_request(count: int = 4, request_id: str = "r1") -> tuple[dict[str, object], np.ndarray]:
    images, labels = onnx_models.digits_samples(count)
    request = {
        "id": request_id,
        "inputs": [
            {
                "name": "input",
                "shape": [count, 64],
                "datatype": "FP32",
                "data": images.reshape(-1).tolist(),
            }
        ],
    }
    return request, labels


def test_mqtt5_request_is_answered_on_the_response_topic(agent: RunningAgent, probe: Probe) -> None:
    """An MQTT 5 request gets its reply on the Response Topic, naming the variant that answered."""
    request, labels = digits_request()
    reply = body(probe.request(f"{agent.topic}/infer/digits", json.dumps(request)))
    assert reply["model_name"] == "digits"
    assert reply["model_version"] == "fp32"
    assert reply["id"] == "r1"
    (output,) = reply["outputs"]
    assert output["shape"] == [4, 10]
    probabilities = np.array(output["data"], dtype=np.float32).reshape(output["shape"])
    assert (probabilities.argmax(axis=1) == labels).all()
    parameters = reply["parameters"]
    assert parameters["total_ms"] >= parameters["inference_ms"] > 0
    assert parameters["batch_size"] == 1


def test_mqtt311_client_uses_reply_to_and_id(agent: RunningAgent, broker: MosquittoBroker) -> None:
    """An MQTT 3.1.1 client names its reply topic in the JSON and matches replies by id."""
    client = Probe(broker.port, protocol=mqtt.MQTTv311)
    try:
        request, labels = digits_request(2, "v3-1")
        request["reply_to"] = client.reply_topic
        client.publish(f"{agent.topic}/infer/digits", json.dumps(request))
        reply = body(client.expect(client.reply_topic))
    finally:
        client.close()
    assert reply["id"] == "v3-1"
    data = np.array(reply["outputs"][0]["data"]).reshape(2, 10)
    assert (data.argmax(axis=1) == labels).all()


def test_binary_tensors_both_ways_with_triton_client(agent: RunningAgent, probe: Probe) -> None:
    """A request built by Triton's client (binary input and output) is answered in binary."""
    images, labels = onnx_models.digits_samples(8)
    tensor = oip.InferInput("input", [8, 64], "FP32")
    tensor.set_data_from_numpy(images.astype(np.float32), binary_data=True)
    payload, header_length = oip.InferenceServerClient.generate_request_body(
        [tensor],
        outputs=[oip.InferRequestedOutput("probabilities", binary_data=True)],
        request_id="bin-1",
    )
    reply = probe.request(f"{agent.topic}/infer/digits", payload, header_length=header_length)
    (reply_header_length,) = [int(v) for k, v in reply.properties.UserProperty if k == HEADER]
    assert reply_header_length < len(reply.payload)
    header = json.loads(reply.payload[:reply_header_length])
    assert "data" not in header["outputs"][0]
    result = oip.InferResult.from_response_body(reply.payload, header_length=reply_header_length)
    assert (result.as_numpy("probabilities").argmax(axis=1) == labels).all()
    assert result.get_response()["id"] == "bin-1"


def test_binary_tensors_over_mqtt311(agent: RunningAgent, broker: MosquittoBroker) -> None:
    """Without user properties, the first JSON value is the header and raw bytes follow it."""
    client = Probe(broker.port, protocol=mqtt.MQTTv311)
    try:
        images, labels = onnx_models.digits_samples(3)
        payload, _ = encode_request(
            {"input": images.astype(np.float32)}, "v3-bin", reply_to=client.reply_topic
        )
        client.publish(f"{agent.topic}/infer/digits", payload)
        reply = client.expect(client.reply_topic)
    finally:
        client.close()
    header, outputs = decode_response(reply.payload, None)
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 3 * 10 * 4
    assert (outputs["probabilities"].argmax(axis=1) == labels).all()


def test_mosquitto_rr_gets_an_answer(
    agent: RunningAgent, broker: MosquittoBroker, tmp_path: Path
) -> None:
    """The standard mosquitto_rr client works out of the box (Response Topic + Correlation)."""
    request, labels = digits_request(1, "rr")
    result = subprocess.run(
        [
            "mosquitto_rr",
            "-h",
            "127.0.0.1",
            "-p",
            str(broker.port),
            "-q",
            "1",
            "-t",
            f"{agent.topic}/infer/digits",
            "-e",
            "test/rr/reply",
            "-W",
            "10",
            "-m",
            json.dumps(request),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    reply = json.loads(result.stdout)
    assert reply["id"] == "rr"
    assert int(np.argmax(reply["outputs"][0]["data"])) == labels[0]


def test_requested_outputs_only(agent: RunningAgent, probe: Probe) -> None:
    """Only the outputs a request names are computed and returned."""
    request = {
        "inputs": [
            {"name": "a", "shape": [1, 2], "datatype": "INT64", "data": [1, -3]},
            {"name": "b", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 1]},
        ],
        "outputs": [{"name": "flag"}],
    }
    reply = body(probe.request(f"{agent.topic}/infer/pair", json.dumps(request)))
    assert [(o["name"], o["datatype"], o["data"]) for o in reply["outputs"]] == [
        ("flag", "BOOL", [True, False])
    ]
    assert "id" not in reply


def test_fleet_requests_are_shared_between_agents(start_agent: object, probe: Probe) -> None:
    """Two agents in one fleet group split requests sent to the shared fleet topic."""
    first = start_agent()  # type: ignore[operator]
    second = start_agent()  # type: ignore[operator]
    request, _ = digits_request(1)
    payload = json.dumps(request)
    for _ in range(40):
        probe.request("edge/fleet/infer/digits", payload)
    counts = [a.agent.manager.get("digits").stats.snapshot().requests for a in (first, second)]
    assert sum(counts) == 40
    assert min(counts) > 0, f"one agent took everything: {counts}"


def test_concurrent_clients_each_get_their_own_answer(
    agent: RunningAgent, broker: MosquittoBroker
) -> None:
    """Many requests in flight from several clients: every reply matches its request."""
    errors: list[str] = []

    def client_run(index: int) -> None:
        client = Probe(broker.port)
        try:
            images, labels = onnx_models.digits_samples(8)
            for i in range(8):
                request = {
                    "id": f"{index}-{i}",
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [1, 64],
                            "datatype": "FP32",
                            "data": images[i].tolist(),
                        }
                    ],
                }
                reply = body(client.request(f"{agent.topic}/infer/digits", json.dumps(request)))
                if reply["id"] != f"{index}-{i}" or (
                    int(np.argmax(reply["outputs"][0]["data"])) != labels[i]
                ):
                    errors.append(f"wrong reply {reply['id']} for {index}-{i}")
        finally:
            client.close()

    threads = [threading.Thread(target=client_run, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


def lowercase_model(path: Path) -> Path:
    """text BYTES [-1] -> lower BYTES [-1] (StringNormalizer, LOWER): a real string model."""
    import onnx  # noqa: PLC0415  (the dev extra has it; only this test builds string models)
    from onnx import TensorProto, helper  # noqa: PLC0415

    graph = helper.make_graph(
        [
            helper.make_node(
                "StringNormalizer", ["text"], ["lower"], case_change_action="LOWER", locale="C"
            )
        ],
        "lowercase",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("lower", TensorProto.STRING, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def test_string_models_see_text_over_json_and_binary(
    start_agent: object, probe: Probe, tmp_path: Path
) -> None:
    """A string model receives the text itself (not b'...' reprs), from JSON and binary."""
    models = tmp_path / "string-models"
    lowercase_model(models / "lower.onnx")
    agent = start_agent(models)  # type: ignore[operator]
    topic = f"{agent.topic}/infer/lower"
    request = {
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["AB", "Cd"]}]
    }
    reply = body(probe.request(topic, json.dumps(request)))
    assert reply["outputs"][0]["data"] == ["ab", "cd"], reply
    texts = np.array([b"Hello", "WÖRLD".encode()], dtype=object)
    payload, header_length = encode_request({"text": texts}, "b1", binary_outputs=True)
    msg = probe.request(topic, payload, header_length=header_length)
    props = dict(msg.properties.UserProperty)
    _, outputs = decode_response(msg.payload, int(props[HEADER]))
    # The "C" locale lowers ASCII only; the Ö must come back as the same UTF-8 bytes.
    assert outputs["lower"].tolist() == [b"hello", "wÖrld".encode()]
    bad = np.array([b"\xff\xfe"], dtype=object)
    payload, header_length = encode_request({"text": bad}, "b2")
    error = body(probe.request(topic, payload, header_length=header_length))
    assert error["code"] == 400 and "not UTF-8" in error["error"]


def bridge_config(central_port: int) -> str:
    """A board's mosquitto bridged over MQTT 5 to a central broker: requests in, replies out.

    The README ("Fleets behind a bridge") explains each line.
    """
    return (
        "connection central\n"
        f"address 127.0.0.1:{central_port}\n"
        "bridge_protocol_version mqttv50\n"  # Response Topic, Correlation Data, user props
        "cleansession false\n"  # the central broker keeps the bridge's queue across a drop
        "restart_timeout 1 2\n"  # reconnect within 1-2 s, not mosquitto's default 5-30 s
        "try_private true\n"
        # Covers the fleet topics too (+ = fleet); a second, overlapping line for them would
        # make the central broker deliver each fleet request twice.
        "topic edge/+/infer/# in 1\n"
        "topic edge/+/control/# in 1\n"
        "topic test/replies/# out 1\n"
        "topic edge/+/status out 1\n"
    )


def test_requests_through_a_bridge_keep_response_topic_and_correlation(
    start_agent: object, tmp_path: Path
) -> None:
    """Requests on a central broker reach an agent behind its board's bridged mosquitto
    (device and fleet topics, JSON and binary) and come back with their Correlation Data
    and header-length property; a request in flight when the link drops is answered."""
    central = MosquittoBroker(free_port())
    central.start()
    local = MosquittoBroker(free_port(), extra_config=bridge_config(central.port))
    local.start()
    restarted: MosquittoBroker | None = None
    models = tmp_path / "bridged-models"
    onnx_models.scale_model(models / "scale.onnx")
    slow = onnx_models.slow_model(models / "slow.onnx")
    rows = onnx_models.rows_for_seconds(slow, 2.0)
    client: ResubscribingClient | None = None
    try:
        agent = start_agent(models, port=local.port, models={"workers": 1})  # type: ignore[operator]
        client = ResubscribingClient(central.port)
        time.sleep(1.5)  # the bridge's subscriptions on the central broker
        request = json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        ).encode()
        client.send(f"{agent.topic}/infer/scale", request, b"device", None)
        client.send("edge/fleet/infer/scale", request, b"fleet", None)
        payload, header_length = encode_request({"x": np.ones((2, 4), np.float32)})
        client.send(f"{agent.topic}/infer/scale", payload, b"binary", header_length)
        replies = client.messages_for(3, timeout=10)
        assert set(replies) == {b"device", b"fleet", b"binary"}
        assert body(replies[b"fleet"])["outputs"][0]["data"] == [3.0, 5.0, 7.0, 9.0]
        binary = replies[b"binary"]
        length = int(dict(binary.properties.UserProperty)[HEADER])
        assert decode_response(binary.payload, length)[1]["y"].tolist() == [[3.0] * 4] * 2

        heavy, heavy_length = encode_request({"x": np.ones((rows, 512), np.float32)})
        client.send(f"{agent.topic}/infer/slow", heavy, b"in-flight", heavy_length)
        slow_queue = agent.agent.manager.get("slow").queue
        deadline = time.monotonic() + 10
        while slow_queue.busy == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert slow_queue.busy == 1, "the request never reached the agent"
        process = central._process  # the test's own central broker, by its PID
        assert process is not None
        process.kill()
        process.wait(5)
        restarted = MosquittoBroker(central.port)
        restarted.start()
        assert set(client.messages_for(1, timeout=30)) == {b"in-flight"}
    finally:
        if client is not None:
            client.close()
        local.stop()
        if restarted is not None:
            restarted.stop()
        central.stop()
