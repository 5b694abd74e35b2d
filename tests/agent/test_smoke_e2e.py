"""End to end over a real mosquitto: the first behaviours a newcomer relies on."""

from __future__ import annotations

import json

import numpy as np

from tests import onnx_models
from tests.conftest import Probe, RunningAgent, body


def test_digits_request_is_answered_by_the_richest_variant(
    agent: RunningAgent, probe: Probe
) -> None:
    """An MQTT 5 request on the device topic gets a reply naming the variant that answered."""
    images, labels = onnx_models.digits_samples(4)
    request = {
        "id": "r1",
        "inputs": [
            {
                "name": "input",
                "shape": [4, 64],
                "datatype": "FP32",
                "data": images.reshape(-1).tolist(),
            }
        ],
    }
    reply = body(probe.request(f"{agent.topic}/infer/digits", json.dumps(request)))
    assert reply["model_name"] == "digits"
    assert reply["model_version"] == "fp32"
    assert reply["id"] == "r1"
    (output,) = reply["outputs"]
    probabilities = np.array(output["data"], dtype=np.float32).reshape(output["shape"])
    assert output["shape"] == [4, 10]
    assert (probabilities.argmax(axis=1) == labels).all()
    assert {"queue_ms", "inference_ms", "total_ms"} <= set(reply["parameters"])
