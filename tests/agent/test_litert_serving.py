"""LiteRT variants served like ONNX ones: a bare .tflite over MQTT, and a ladder mixing an
ONNX and a TFLite rung swapped under load (the rest of the agent never knows which runtime
answers)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.batching import Completed, Outcome
from agent.config import ModelsConfig
from agent.errors import EdgeAgentError
from agent.models import ModelManager
from agent.protocol import InferenceRequest
from agent.repository import scan
from agent.session import SessionSettings
from tests import onnx_models
from tests.conftest import Probe, RunningAgent, body

pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed")
from tests.tflite_models import scale_tflite

REQUEST = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
)


def test_a_bare_tflite_file_is_served_over_mqtt(
    start_agent: Callable[..., RunningAgent], tmp_path: Path, probe: Probe
) -> None:
    """A `name.tflite` in the model directory is a one-variant model answered over MQTT 5
    with the same protocol as an ONNX one."""
    models = tmp_path / "lite-models"
    models.mkdir()
    scale_tflite(models / "lite.tflite", factor=3.0)
    agent = start_agent(models)
    reply = body(probe.request(f"{agent.topic}/infer/lite", REQUEST))
    assert reply["model_name"] == "lite" and reply["model_version"] == "default"
    assert reply["outputs"][0]["data"] == [4.0, 7.0, 10.0, 13.0]


def test_a_ladder_of_an_onnx_and_a_tflite_rung_swaps_under_load(tmp_path: Path) -> None:
    """30 swaps between an fp32 ONNX rung and a TFLite rung while requests flow: every
    request answered once, by the variant it names, with that variant's output."""
    build = tmp_path / "build"
    onnx = onnx_models.scale_model(build / "onnx.onnx", factor=2.0)
    folder = onnx_models.ladder_folder(
        tmp_path / "models" / "mix",
        [("fp32", onnx)],
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
    )
    lite = scale_tflite(folder / "lite.tflite", factor=3.0)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["variants"].append(
        {
            "name": "lite",
            "file": lite.name,
            "sha256": onnx_models.sha256(lite),
            "size_bytes": lite.stat().st_size,
        }
    )
    (folder / "manifest.json").write_text(json.dumps(manifest))
    manager = ModelManager(
        ModelsConfig(dir=tmp_path / "models", inline_max_ms=0.0),
        SessionSettings(threads=1),
        lambda *_a, **_k: None,
    )
    sources, rejected = scan(tmp_path / "models")
    assert not rejected
    manager.load_all(sources)
    factors = {"fp32": 2.0, "lite": 3.0}
    results: list[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()
    sent = [0]

    def done(outcome: Outcome) -> None:
        with lock:
            results.append(outcome)

    def client() -> None:
        x = np.ones((1, 4), np.float32)
        while not stop.is_set():
            try:
                manager.submit("mix", InferenceRequest(None, {"x": x}, {"x": "FP32"}), done)
            except EdgeAgentError:  # a full queue: retry a little later
                time.sleep(0.001)
                continue
            sent[0] += 1
            time.sleep(0.0002)

    thread = threading.Thread(target=client)
    thread.start()
    for i in range(30):
        manager.switch("mix", ["lite", "fp32"][i % 2], reason="test")
    stop.set()
    thread.join(10)
    manager.close(10)
    assert len(results) == sent[0] > 0
    for outcome in results:
        assert isinstance(outcome, Completed), outcome
        assert np.all(outcome.outputs["y"] == factors[outcome.variant] + 1.0)
    assert {o.variant for o in results if isinstance(o, Completed)} == {"fp32", "lite"}
