"""LiteRT variants served like ONNX ones: a bare .tflite over MQTT, and a ladder mixing an
ONNX and a TFLite rung swapped under load (the rest of the agent never knows which runtime
answers)."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from agent.batching import Completed, Outcome
from agent.config import ModelsConfig
from agent.errors import EdgeAgentError
from agent.models import ModelManager
from agent.protocol import InferenceRequest
from agent.repository import scan
from agent.runtime import load_variant
from agent.session import SessionSettings
from tests import onnx_models, tflite_models
from tests.conftest import Probe, RunningAgent, body
from tests.swapping import swap_under_load
from tests.tflite_models import scale_tflite

SETTINGS = SessionSettings(threads=1)
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
    x = np.ones((1, 4), np.float32)

    def done(outcome: Outcome) -> None:
        with lock:
            results.append(outcome)

    def send(_n: int) -> None:
        manager.submit("mix", InferenceRequest(None, {"x": x}, {"x": "FP32"}), done)

    # EdgeAgentError on submit: a full queue, retried a little later.
    sent = swap_under_load(manager, "mix", ["lite", "fp32"], 30, send, 0.0002, EdgeAgentError)
    manager.close(10)
    assert len(results) == sent > 0
    for outcome in results:
        assert isinstance(outcome, Completed), outcome
        assert np.all(outcome.outputs["y"] == factors[outcome.variant] + 1.0)
    assert {o.variant for o in results if isinstance(o, Completed)} == {"fp32", "lite"}


def ladder(folder: Path, rungs: list[tuple[str, Path, dict[str, object]]]) -> Path:
    """A manifest over `rungs` (name, file in `folder`, runtime options), richest first,
    serving x FP32 [1, 4] -> y FP32 [1, 4]."""
    variants = []
    for name, path, runtime in rungs:
        entry = {"name": name, "file": path.name, "sha256": onnx_models.sha256(path),
                 "size_bytes": path.stat().st_size}
        variants.append({**entry, "runtime": runtime} if runtime else entry)
    manifest = {
        "name": folder.name,
        "format": 1,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 4]}],
        "variants": variants,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def served_outcome(manager: ModelManager, model: str, x: np.ndarray) -> Outcome:
    """The outcome of one request, waited for."""
    got: list[Outcome] = []
    arrived = threading.Event()

    def done(outcome: Outcome) -> None:
        got.append(outcome)
        arrived.set()

    manager.submit(model, InferenceRequest(None, {"x": x}, {"x": "FP32"}), done)
    assert arrived.wait(10)
    return got[0]


def test_a_rung_whose_delegate_cannot_load_falls_back_to_the_next(tmp_path: Path) -> None:
    """The README's ladder on a board without the accelerator: the Edge TPU rung (its model
    an edgetpu-custom-op, libedgetpu.so.1 not installed) is rejected with the library's
    reason, and the model serves the next rung, a CPU TFLite one, above the ONNX rung."""
    folder = tmp_path / "models" / "detector"
    folder.mkdir(parents=True)
    rungs: list[tuple[str, Path, dict[str, object]]] = [
        ("edgetpu", tflite_models.custom_op_tflite(folder / "tpu.tflite", "edgetpu-custom-op"),
         {"delegate": {"library": "libedgetpu.so.1", "options": {"device": "usb"}}}),
        ("int8-cpu", scale_tflite(folder / "cpu.tflite", factor=3.0), {}),
        ("fp32", onnx_models.scale_model(folder / "fp32.onnx", factor=2.0), {}),
    ]
    ladder(folder, rungs)
    events: list[tuple[str, dict[str, object]]] = []
    manager = ModelManager(
        ModelsConfig(dir=folder.parent),
        SessionSettings(threads=1),
        lambda event, **fields: events.append((event, fields)),
    )
    sources, rejected = scan(folder.parent)
    assert not rejected
    manager.load_all(sources)
    try:
        assert manager.get("detector").active_name == "int8-cpu"
        outcome = served_outcome(manager, "detector", np.ones((1, 4), np.float32))
        assert isinstance(outcome, Completed) and outcome.variant == "int8-cpu"
        np.testing.assert_array_equal(outcome.outputs["y"], np.full((1, 4), 4.0, np.float32))
    finally:
        manager.close(10)
    reasons = [str(f["reason"]) for e, f in events if e == "variant_rejected"]
    assert len(reasons) == 1 and "delegate libedgetpu.so.1 cannot load" in reasons[0]


def test_each_interpreter_counts_in_the_memory_the_policy_sees(tmp_path: Path) -> None:
    """A rung with four interpreters is predicted to need about four times what one needs:
    each interpreter holds its own copy of the weights, and the manager's measure of a
    load, the memory figure the policy reads, takes in all of them."""
    rng = np.random.default_rng(0)
    layers = [
        (rng.standard_normal((n, k)).astype(np.float32), np.zeros(n, np.float32))
        for k, n in ((4, 1024), (1024, 1024), (1024, 4))
    ]
    folder = tmp_path / "models" / "mlp"
    folder.mkdir(parents=True)
    one = tflite_models.mlp_tflite(folder / "one.tflite", layers)
    four = folder / "four.tflite"
    shutil.copyfile(one, four)
    ladder(folder, [("one", one, {"probe": False}),
                    ("four", four, {"probe": False, "interpreters": 4})])
    # LiteRT's first load in a process also pays for the library itself: not in this test.
    load_variant("warm", "up", scale_tflite(tmp_path / "warm.tflite"), SETTINGS).close()
    manager = ModelManager(
        ModelsConfig(dir=folder.parent), SETTINGS, lambda *_a, **_k: None
    )
    sources, _ = scan(folder.parent)
    manager.load_all(sources)
    try:
        served = manager.switch("mlp", "four", reason="test")
        one_mb = manager.predicted_mb("mlp", served.variant("one"))
        four_mb = manager.predicted_mb("mlp", served.variant("four"))
    finally:
        manager.close(10)
    weights_mb = sum(w.nbytes + b.nbytes for w, b in layers) / 2**20
    assert one_mb is not None and four_mb is not None
    assert one_mb > weights_mb
    assert four_mb - one_mb > 3 * weights_mb, (one_mb, four_mb, weights_mb)
