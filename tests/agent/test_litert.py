"""The LiteRT runtime: .tflite variants loaded through load_variant, run beside the LiteRT
interpreter itself, quantized I/O, delegates, concurrency, and files that must be refused."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import structlog.testing
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from agent import tflite_check
from agent.errors import InferenceError, VariantRejected
from agent.litert import LiteRTVariant, probe_file
from agent.manifest import DelegateSpec, RuntimeOptions, TensorSpec
from agent.runtime import Runtime, load_variant
from agent.session import RunControl, SessionSettings
from tests import onnx_models, tflite_models

SETTINGS = SessionSettings(threads=1)
NO_PROBE = RuntimeOptions(probe=False)
X4 = TensorSpec(name="x", datatype="FP32", shape=(-1, 4))
Y4 = TensorSpec(name="y", datatype="FP32", shape=(-1, 4))


def reference(path: Path, **feeds: np.ndarray) -> dict[str, np.ndarray]:
    """What the LiteRT interpreter itself answers, through its default signature."""
    runner = Interpreter(model_path=str(path)).get_signature_runner()
    result: dict[str, np.ndarray] = runner(**feeds)
    return result


def test_float_model_matches_the_interpreter(tmp_path: Path) -> None:
    """A float .tflite loads through load_variant, serves its signature's names and answers
    exactly what the LiteRT interpreter answers, at any batch size."""
    path = tflite_models.scale_tflite(tmp_path / "scale.tflite", factor=3.0)
    variant = load_variant("m", "fp32", path, SETTINGS, [X4], [Y4])
    assert isinstance(variant, Runtime)
    assert isinstance(variant, LiteRTVariant)
    assert variant.inputs == (X4,) and variant.output_names == ("y",)
    assert variant.warmed_up and variant.rss_mb is not None and variant.rss_mb >= 0.0
    for batch in (1, 5, 2):
        x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
        (y,) = variant.run({"x": x})
        np.testing.assert_array_equal(y, reference(path, x=x)["y"])
        np.testing.assert_allclose(y, x * 3.0 + 1.0, rtol=1e-6)
    variant.close()


def test_mlp_matches_the_interpreter_and_numpy(tmp_path: Path) -> None:
    """A FullyConnected/ReLU network answers as the interpreter does and as numpy computes."""
    rng = np.random.default_rng(0)
    layers = [
        (rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal(n).astype(np.float32))
        for n, k in ((16, 8), (3, 16))
    ]
    path = tflite_models.mlp_tflite(tmp_path / "mlp.tflite", layers)
    variant = load_variant("m", "fp32", path, SessionSettings(threads=2), options=NO_PROBE)
    x = rng.standard_normal((7, 8)).astype(np.float32)
    (y,) = variant.run({"x": x}, ["y"])
    hidden = np.maximum(x @ layers[0][0].T + layers[0][1], 0.0)
    np.testing.assert_allclose(y, hidden @ layers[1][0].T + layers[1][1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y, reference(path, x=x)["y"], rtol=1e-6, atol=1e-6)


def test_model_without_signature_serves_its_tensor_names(tmp_path: Path) -> None:
    """Without a SignatureDef the input and output tensors' own names are served, and a new
    batch size resizes the interpreter."""
    path = tflite_models.scale_tflite(tmp_path / "plain.tflite", signature=False)
    variant = load_variant("m", "v", path, SETTINGS, options=NO_PROBE)
    assert isinstance(variant, LiteRTVariant) and variant.signature is None
    assert [s.name for s in variant.inputs] == ["x"] and variant.output_names == ("y",)
    for batch in (3, 1, 3):
        (y,) = variant.run({"x": np.ones((batch, 4), np.float32)})
        np.testing.assert_array_equal(y, np.full((batch, 4), 3.0, np.float32))
    strided = np.arange(32, dtype=np.float32).reshape(4, 8)[:, ::2]  # not C-contiguous
    np.testing.assert_array_equal(variant.run({"x": strided})[0], strided * 2.0 + 1.0)


def test_int8_io_is_served_as_the_model_declares(tmp_path: Path) -> None:
    """An int8-quantized model's inputs and outputs are INT8 and its answers are the
    interpreter's, bit for bit."""
    path = tmp_path / "int8.tflite"
    tflite_models.int8_fc_tflite(path)
    variant = load_variant("m", "int8", path, SETTINGS)
    assert variant.inputs == (TensorSpec(name="x", datatype="INT8", shape=(-1, 4)),)
    assert variant.outputs == (TensorSpec(name="y", datatype="INT8", shape=(-1, 3)),)
    x = np.random.default_rng(1).integers(-128, 127, size=(6, 4)).astype(np.int8)
    (y,) = variant.run({"x": x})
    assert y.dtype == np.int8
    np.testing.assert_array_equal(y, reference(path, x=x)["y"])


def test_float_io_converts_with_scale_and_zero_point(tmp_path: Path) -> None:
    """With float_io an int8 model serves FP32: requests are quantized and replies
    dequantized with each tensor's scale and zero point, close to the float computation."""
    path = tmp_path / "int8.tflite"
    fc = tflite_models.int8_fc_tflite(path)
    x_spec = TensorSpec(name="x", datatype="FP32", shape=(-1, 4))
    y_spec = TensorSpec(name="y", datatype="FP32", shape=(-1, 3))
    variant = load_variant(
        "m", "int8", path, SETTINGS, [x_spec], [y_spec], RuntimeOptions(float_io=True)
    )
    x = np.random.default_rng(2).uniform(-3, 3, size=(5, 4)).astype(np.float32)
    (y,) = variant.run({"x": x})
    assert y.dtype == np.float32
    qx = np.clip(np.rint(x / fc.input_quant.scale) + fc.input_quant.zero_point, -128, 127)
    qy = reference(path, x=qx.astype(np.int8))["y"]
    expected = (qy.astype(np.float32) - fc.output_quant.zero_point) * fc.output_quant.scale
    np.testing.assert_allclose(y, expected, rtol=1e-6)
    # Quantization error: half an input step through the weights, half an output step.
    bound = fc.input_quant.scale / 2 * np.abs(fc.weights).sum(axis=1) + fc.output_quant.scale
    assert np.all(np.abs(y - (x @ fc.weights.T + fc.bias)) <= bound)


def test_int8_rung_without_float_io_is_refused_for_a_float_manifest(tmp_path: Path) -> None:
    """A manifest that declares FP32 refuses an int8 rung that lacks float_io, saying so."""
    path = tmp_path / "int8.tflite"
    tflite_models.int8_fc_tflite(path)
    y_spec = TensorSpec(name="y", datatype="FP32", shape=(-1, 3))
    with pytest.raises(VariantRejected, match="float_io"):
        load_variant("m", "int8", path, SETTINGS, [X4], [y_spec], NO_PROBE)


def test_signature_differing_from_the_manifest_is_refused(tmp_path: Path) -> None:
    """A .tflite whose names or shapes differ from the manifest's is rejected with both."""
    path = tflite_models.scale_tflite(tmp_path / "scale.tflite", width=4)
    other = TensorSpec(name="input", datatype="FP32", shape=(-1, 4))
    with pytest.raises(VariantRejected, match=r"inputs are \['x'\], the manifest says"):
        load_variant("m", "v", path, SETTINGS, [other], [Y4], NO_PROBE)
    wide = TensorSpec(name="x", datatype="FP32", shape=(-1, 8))
    with pytest.raises(VariantRejected, match="has shape"):
        load_variant("m", "v", path, SETTINGS, [wide], [Y4], NO_PROBE)


def test_a_signature_on_another_subgraph_is_served_through_its_runner(tmp_path: Path) -> None:
    """A model whose serving_default signature is its second subgraph answers as LiteRT's
    signature runner for it does (not as its first subgraph), at changing batch sizes."""
    path = tflite_models.two_signature_tflite(tmp_path / "two.tflite", factors=(2.0, 5.0))
    variant = load_variant("m", "v", path, SETTINGS, [X4], [Y4])
    assert isinstance(variant, LiteRTVariant) and variant.signature == "serving_default"
    runner = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
    rng = np.random.default_rng(3)
    for rows in (1, 3, 1):
        x = rng.standard_normal((rows, 4)).astype(np.float32)
        (y,) = variant.run({"x": x})
        np.testing.assert_array_equal(y, runner(x=x)["y"])
        np.testing.assert_allclose(y, x * 5.0 + 1.0, rtol=1e-6)
    with pytest.raises(InferenceError, match=r"missing inputs \['x'\], unknown inputs \['z'\]"):
        variant.run({"z": np.ones((1, 4), np.float32)})


def test_bad_request_is_an_inference_error_and_the_next_run_works(tmp_path: Path) -> None:
    """A feed the interpreter refuses raises InferenceError; the variant keeps serving."""
    path = tflite_models.scale_tflite(tmp_path / "scale.tflite")
    variant = load_variant("m", "v", path, SETTINGS, options=NO_PROBE)
    with pytest.raises(InferenceError, match="m/v"):
        variant.run({"x": np.ones((2, 4), np.float64)})
    with pytest.raises(InferenceError, match="missing inputs"):
        variant.run({})
    with pytest.raises(InferenceError, match=r"missing inputs \['x'\], unknown inputs \['z'\]"):
        variant.run({"z": np.ones((1, 4), np.float32)})
    (y,) = variant.run({"x": np.zeros((1, 4), np.float32)})
    np.testing.assert_array_equal(y, np.ones((1, 4), np.float32))


def test_missing_delegate_library_rejects_the_variant(tmp_path: Path) -> None:
    """A delegate whose library is not installed (the Edge TPU's here) rejects the variant
    with the library's name and the loader's reason."""
    path = tflite_models.scale_tflite(tmp_path / "scale.tflite")
    options = RuntimeOptions(delegate=DelegateSpec(library="libedgetpu.so.1"), probe=False)
    with pytest.raises(VariantRejected, match=r"delegate libedgetpu\.so\.1 cannot load"):
        load_variant("m", "edgetpu", path, SETTINGS, options=options)


def test_edgetpu_model_needs_its_delegate(tmp_path: Path) -> None:
    """A model compiled for the Edge TPU (its edgetpu-custom-op) is refused without the
    delegate, and with libedgetpu configured but not installed the reason is the library."""
    path = tflite_models.custom_op_tflite(tmp_path / "tpu.tflite", "edgetpu-custom-op")
    with pytest.raises(VariantRejected, match="edgetpu-custom-op"):
        load_variant("m", "tpu", path, SETTINGS)
    options = RuntimeOptions(delegate=DelegateSpec(library="libedgetpu.so.1"))
    with pytest.raises(VariantRejected, match=r"delegate libedgetpu\.so\.1 cannot load"):
        load_variant("m", "tpu", path, SETTINGS, options=options)


def test_library_that_is_no_delegate_rejects_the_variant(tmp_path: Path) -> None:
    """A library that loads but exports no delegate entry point is refused as such."""
    path = tflite_models.scale_tflite(tmp_path / "scale.tflite")
    options = RuntimeOptions(delegate=DelegateSpec(library="libm.so.6"), probe=False)
    with pytest.raises(VariantRejected, match="is not a LiteRT delegate"):
        load_variant("m", "v", path, SETTINGS, options=options)


def test_delegate_shipped_in_the_model_folder_is_refused(tmp_path: Path) -> None:
    """A delegate path inside the model's own folder is refused before anything loads it."""
    path = tflite_models.scale_tflite(tmp_path / "scale.tflite")
    (tmp_path / "libevil.so").write_bytes(b"\x7fELF")
    options = RuntimeOptions(delegate=DelegateSpec(library=str(tmp_path / "libevil.so")))
    with pytest.raises(VariantRejected, match="lies in the model's folder"):
        load_variant("m", "v", path, SETTINGS, options=options)


def test_without_the_litert_extra_a_tflite_variant_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When ai_edge_litert cannot be imported, a .tflite variant is rejected with how to
    install the extra, and ONNX variants still load."""
    path = tflite_models.scale_tflite(tmp_path / "scale.tflite")
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    with pytest.raises(VariantRejected, match=r"edge-agent\[litert\]"):
        load_variant("m", "v", path, SETTINGS)
    onnx = onnx_models.scale_model(tmp_path / "scale.onnx")
    assert load_variant("m", "v", onnx, SETTINGS).run({"x": np.ones((1, 4), np.float32)})


@pytest.mark.parametrize("interpreters", [1, 2])
def test_concurrent_runs_each_get_their_own_answer(tmp_path: Path, interpreters: int) -> None:
    """Runs from four threads at once, on one interpreter (taking turns) or a pool of two,
    all answer their own request correctly."""
    path = tflite_models.scale_tflite(tmp_path / "scale.tflite")
    variant = load_variant(
        "m", "v", path, SETTINGS, options=RuntimeOptions(probe=False, interpreters=interpreters)
    )
    assert isinstance(variant, LiteRTVariant) and variant.interpreters == interpreters
    wrong: list[str] = []

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(200):
            x = rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32)
            (y,) = variant.run({"x": x})
            if not np.allclose(y, x * 2.0 + 1.0):
                wrong.append(f"client {seed}")

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert wrong == []


def test_onnx_variant_offers_the_same_protocol(tmp_path: Path) -> None:
    """load_variant gives an .onnx file to onnxruntime, behind the same Runtime protocol."""
    path = onnx_models.scale_model(tmp_path / "scale.onnx")
    variant = load_variant("m", "v", path, SETTINGS, [X4], [Y4])
    assert isinstance(variant, Runtime)
    (y,) = variant.run({"x": np.ones((2, 4), np.float32)})
    np.testing.assert_array_equal(y, np.full((2, 4), 3.0, np.float32))
    variant.close()


def test_other_suffix_is_rejected(tmp_path: Path) -> None:
    """A file that is neither .onnx nor .tflite is rejected, not guessed at."""
    path = tmp_path / "model.pb"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(VariantRejected, match="neither"):
        load_variant("m", "v", path, SETTINGS)


def test_probe_survives_a_file_that_crashes_the_interpreter(tmp_path: Path) -> None:
    """A well-formed flatbuffer that kills the LiteRT interpreter (SIGSEGV) kills only the
    probe process; the variant is rejected with the signal's name."""
    path = tflite_models.constant_input_tflite(tmp_path / "crash.tflite")
    with pytest.raises(VariantRejected, match=r"crashed \(SIGSEGV\)"):
        probe_file(path, "v")


def test_probe_reports_a_file_the_interpreter_refuses(tmp_path: Path) -> None:
    """A file LiteRT refuses is rejected by the probe with LiteRT's own reason."""
    path = tmp_path / "junk.tflite"
    path.write_bytes(b"\x10\0\0\0TFL3" + bytes(64))
    with pytest.raises(VariantRejected, match="LiteRT cannot load"):
        probe_file(path, "v")


def test_custom_operator_is_refused_before_the_interpreter(tmp_path: Path) -> None:
    """A model with a custom operator is rejected by name before LiteRT opens it."""
    path = tflite_models.custom_op_tflite(tmp_path / "custom.tflite")
    with pytest.raises(VariantRejected, match="EdgeAgentSecret"):
        load_variant("m", "v", path, SETTINGS)


def test_builtin_ceiling_and_tensor_types_match_the_installed_schema() -> None:
    """The verifier's highest builtin operator code and its tensor types are the installed
    LiteRT schema's, so that a LiteRT upgrade shows here first."""
    codes = [v for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")]
    assert max(codes) == tflite_check.MAX_BUILTIN_CODE
    types = {v for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    assert types == set(tflite_check.ELEMENT_BITS)


def test_litert_runs_without_writable_executable_memory(tmp_path: Path) -> None:
    """XNNPACK needs no W+X memory, so the unit's MemoryDenyWriteExecute=yes holds: a child
    that forbids it (prctl PR_SET_MDWE, what that setting enforces) loads and runs a float
    and an int8 model through load_variant."""
    float_path = tflite_models.scale_tflite(tmp_path / "f.tflite")
    int8_path = tmp_path / "q.tflite"
    tflite_models.int8_fc_tflite(int8_path)
    code = f"""
import ctypes, sys
import numpy as np
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(77)
from agent.manifest import RuntimeOptions
from agent.runtime import load_variant
from agent.session import RunControl, SessionSettings
from pathlib import Path
s, opts = SessionSettings(threads=2), RuntimeOptions(probe=False)
for path, dtype in (({str(float_path)!r}, np.float32), ({str(int8_path)!r}, np.int8)):
    v = load_variant("m", "v", Path(path), s, options=opts)
    assert v.warmed_up
    v.run({{"x": np.ones((2, 4), dtype)}})
print("ran")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE")
    assert done.returncode == 0, done.stderr
    assert "ran" in done.stdout


def test_the_threads_option_sizes_the_interpreters_thread_pool(tmp_path: Path) -> None:
    """A variant's `threads` reach its interpreter: with 3 the process runs two more threads
    (XNNPACK's workers) until the variant is closed, with 1 none. In a child process, whose
    threads are only these."""
    path = tflite_models.scale_tflite(tmp_path / "scale.tflite")
    code = f"""
import gc, os
from pathlib import Path
import numpy as np
from agent.manifest import RuntimeOptions
from agent.runtime import load_variant
from agent.session import SessionSettings
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
for n in (1, 3):
    v = load_variant("m", "v", Path({str(path)!r}), SessionSettings(threads=1),
                     options=RuntimeOptions(threads=n, probe=False))
    v.run({{"x": np.ones((2, 4), np.float32)}})
    loaded = threads()
    v.close()
    del v
    gc.collect()
    print("threads", n, loaded - before, threads() - before)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    counts = [line for line in done.stdout.splitlines() if line.startswith("threads ")]
    assert counts == ["threads 1 0 0", "threads 3 2 0"]


def test_a_probed_file_is_not_probed_again_until_it_changes(tmp_path: Path) -> None:
    """Loading the same unchanged file again (a swap back to a rung) skips the probe; a
    rewritten file is probed again."""
    path = tflite_models.scale_tflite(tmp_path / "scale.tflite")

    def probes() -> int:
        with structlog.testing.capture_logs() as logs:
            load_variant("m", "v", path, SETTINGS).close()
        return sum(1 for entry in logs if entry["event"] == "litert_probed")

    assert probes() == 1
    assert probes() == 0
    tflite_models.scale_tflite(tmp_path / "next.tflite", factor=5.0).replace(path)
    assert probes() == 1


def test_a_closed_variant_refuses_to_run(tmp_path: Path) -> None:
    """After close, run raises InferenceError instead of waiting for an interpreter."""
    path = tflite_models.scale_tflite(tmp_path / "scale.tflite")
    variant = load_variant("m", "v", path, SETTINGS, options=NO_PROBE)
    variant.close()
    with pytest.raises(InferenceError, match="unloaded"):
        variant.run({"x": np.ones((1, 4), np.float32)})


def test_missing_tflite_file_is_rejected(tmp_path: Path) -> None:
    """A .tflite path that does not exist is a VariantRejected, not an OSError."""
    with pytest.raises(VariantRejected, match=r"cannot read gone\.tflite"):
        load_variant("m", "v", tmp_path / "gone.tflite", SETTINGS)


def test_without_xnnpack_the_builtin_kernels_answer_the_same(tmp_path: Path) -> None:
    """xnnpack = false runs LiteRT's own kernels, which answer as XNNPACK does."""
    rng = np.random.default_rng(3)
    layers = [(rng.standard_normal((5, 4)).astype(np.float32), np.zeros(5, np.float32))]
    path = tflite_models.mlp_tflite(tmp_path / "fc.tflite", layers)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    answers = [
        load_variant("m", "v", path, SETTINGS, options=RuntimeOptions(probe=False, xnnpack=on))
        .run({"x": x})[0]
        for on in (True, False)
    ]
    np.testing.assert_allclose(answers[0], answers[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(answers[1], x @ layers[0][0].T, rtol=1e-5, atol=1e-5)


CONVERTED = sorted((Path(__file__).parent / "data").glob("converted_*.tflite"))


@pytest.mark.parametrize("path", CONVERTED, ids=[p.stem for p in CONVERTED])
def test_converter_made_models_pass_the_check_and_answer_as_the_interpreter(path: Path) -> None:
    """Files a real converter wrote (litert-torch, ai-edge-quantizer; rebuilt by
    tools/build_tflite_fixtures.py) pass the check, load and answer as LiteRT does."""
    assert len(CONVERTED) == 3
    facts = tflite_check.check_tflite_file(path, variant="v")
    assert facts.signatures == 1 and facts.operators >= 3
    variant = load_variant("m", "v", path, SETTINGS)
    rng = np.random.default_rng(0)
    feeds = {
        spec.name: rng.standard_normal([max(d, 1) for d in spec.shape]).astype(np.float32)
        for spec in variant.inputs
    }
    expected = reference(path, **feeds)
    for name, got in zip(variant.output_names, variant.run(feeds), strict=True):
        np.testing.assert_array_equal(got, expected[name])
    variant.close()


def test_warm_up_runs_the_batch_size_it_is_asked(tmp_path: Path) -> None:
    """warm_up(rows) runs a batch of that many rows, as the model manager asks of a runtime."""
    path = tflite_models.scale_tflite(tmp_path / "scale.tflite", signature=False)
    variant = load_variant("m", "v", path, SessionSettings(threads=1, warmup=False))
    assert not variant.warmed_up
    assert variant.warm_up(rows=8, timeout_s=5.0)
    assert isinstance(variant, LiteRTVariant)
    interpreter = variant._pool.get()._interpreter
    assert list(interpreter.get_input_details()[0]["shape"]) == [8, 4]  # resized to it


def test_a_cancelled_control_stops_a_run_before_it_starts(tmp_path: Path) -> None:
    """A run whose RunControl was cancelled (a stop past its bound) raises InferenceError
    instead of running, and the variant keeps serving other runs."""
    path = tflite_models.scale_tflite(tmp_path / "scale.tflite")
    variant = load_variant("m", "v", path, SETTINGS, options=NO_PROBE)
    control = RunControl()
    x = {"x": np.ones((1, 4), np.float32)}
    assert variant.run(x, None, control)[0].shape == (1, 4)
    control.cancel()
    with pytest.raises(InferenceError, match="cancelled"):
        variant.run(x, None, control)
    np.testing.assert_array_equal(variant.run(x)[0], np.full((1, 4), 3.0, np.float32))
