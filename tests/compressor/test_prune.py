"""Pruning: structured cuts really shrink the graph, keep the signature and refuse unsafe graphs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.neural_network import MLPClassifier

from compressor.data import Dataset, load_dataset
from compressor.errors import UnsupportedModelError
from compressor.metrics import accuracy, fidelity
from compressor.model import load_model
from compressor.prune.structured import prune_structured
from compressor.prune.unstructured import prune_magnitude
from compressor.session import open_session, run_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import compress_models as cm


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {i.name: tuple(i.dims) for i in onnx.load(path).graph.initializer}


def _compare(original: Path, variant: Path, data: Dataset) -> tuple[float, float]:
    ref = run_dataset(open_session(original, 1), data)
    out = run_dataset(open_session(variant, 1), data)
    drop = accuracy(ref, data.labels) - accuracy(out, data.labels) if data.labels is not None else 0
    return drop, fidelity(ref, out).cosine


def test_gemm_form_neurons_removed(
    tmp_path: Path, digits_gemm: Path, digits_calib: Path, digits_eval: Path
) -> None:
    """Half the hidden neurons go: both Gemm weights and the bias shrink, accuracy holds."""
    model = load_model(digits_gemm)
    calib = load_dataset(digits_calib, model.signature)
    result = prune_structured(model, tmp_path / "p.onnx", 0.5, calib)
    shapes = _shapes(result.path)
    assert shapes["w1"] == (32, 64) and shapes["b1"] == (32,) and shapes["w2"] == (10, 32)
    assert load_model(result.path).signature == model.signature
    assert result.layers[0].before == 64 and result.layers[0].after == 32
    assert 0.45 < result.sparsity < 0.5
    drop, _ = _compare(digits_gemm, result.path, load_dataset(digits_eval, model.signature))
    assert drop <= 0.02


def test_least_squares_correction_helps(
    tmp_path: Path, digits_gemm: Path, digits_calib: Path, digits_eval: Path
) -> None:
    """At 75% of neurons removed, refitting the next layer beats not refitting it."""
    model = load_model(digits_gemm)
    calib = load_dataset(digits_calib, model.signature)
    data = load_dataset(digits_eval, model.signature)
    fixed = prune_structured(model, tmp_path / "fixed.onnx", 0.75, calib, correct=True)
    raw = prune_structured(model, tmp_path / "raw.onnx", 0.75, calib, correct=False)
    assert fixed.layers[0].corrected and not raw.layers[0].corrected
    _, fixed_cos = _compare(digits_gemm, fixed.path, data)
    _, raw_cos = _compare(digits_gemm, raw.path, data)
    assert fixed_cos > raw_cos


def test_skl2onnx_form_neurons_removed(
    tmp_path: Path, digits_skl: Path, digits_skl_calib: Path, digits_skl_eval: Path
) -> None:
    """skl2onnx's MatMul+Add layers shrink and its label output stays right."""
    model = load_model(digits_skl)
    result = prune_structured(
        model, tmp_path / "p.onnx", 0.5, load_dataset(digits_skl_calib, model.signature)
    )
    shapes = _shapes(result.path)
    assert shapes["coefficient"] == (64, 32) and shapes["coefficient1"] == (32, 10)
    assert shapes["intercepts"] in ((32,), (1, 32))
    assert load_model(result.path).signature == model.signature
    drop, _ = _compare(digits_skl, result.path, load_dataset(digits_skl_eval, model.signature))
    assert drop <= 0.02


def test_cnn_channels_removed(tmp_path: Path, cnn: Path, cnn_calib: Path, cnn_eval: Path) -> None:
    """Conv output channels, BatchNorm parameters and the next layers' inputs all shrink."""
    model = load_model(cnn)
    result = prune_structured(
        model, tmp_path / "p.onnx", 0.5, load_dataset(cnn_calib, model.signature)
    )
    shapes = _shapes(result.path)
    assert shapes["conv0.w"] == (4, 3, 3, 3) and shapes["bn0.g"] == (4,)
    assert shapes["conv1.w"] == (8, 4, 3, 3) and shapes["bn1.var"] == (8,)
    assert shapes["fc.w"] == (8, 10)  # after GlobalAveragePool + Flatten
    assert load_model(result.path).signature == model.signature
    _, cosine = _compare(cnn, result.path, load_dataset(cnn_eval, model.signature))
    assert cosine > 0.95


def test_constant_node_weights_are_pruned(
    tmp_path: Path, constant_weights: Path, vector16: Path
) -> None:
    """Weights held in Constant nodes are hoisted and pruned like initializers."""
    model = load_model(constant_weights)
    result = prune_structured(
        model, tmp_path / "p.onnx", 0.5, load_dataset(vector16, model.signature)
    )
    assert _shapes(result.path)["w1"] == (16, 16)


def test_without_data_uses_weight_norms(tmp_path: Path, digits_gemm: Path) -> None:
    """Without calibration data, pruning still shrinks the graph but cannot refit."""
    result = prune_structured(load_model(digits_gemm), tmp_path / "p.onnx", 0.5, None)
    assert _shapes(result.path)["w1"] == (32, 64)
    assert not result.layers[0].corrected


def test_wide_layers_keep_whole_simd_lanes(tmp_path: Path, digits_gemm: Path) -> None:
    """A 64-neuron layer cut by 30% keeps a multiple of 8 neurons (48), not 45."""
    result = prune_structured(load_model(digits_gemm), tmp_path / "p.onnx", 0.3, None)
    assert result.layers[0].after == 48


def test_ratio_out_of_range(tmp_path: Path, digits_gemm: Path) -> None:
    """A ratio of 0 or 1 is refused before anything is written."""
    with pytest.raises(ValueError, match="between 0 and 1"):
        prune_structured(load_model(digits_gemm), tmp_path / "p.onnx", 1.0, None)
    assert not (tmp_path / "p.onnx").exists()


def _conv_model(tmp_path: Path, tail: str) -> Path:
    """Conv -> Relu -> <tail> -> Conv, where the tail makes channel removal unsafe."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (4, 4, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.normal(0, 1, (4, 4, 3, 3)).astype(np.float32), "w1"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
    ]
    outputs = [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)]
    if tail == "residual":
        nodes += [
            helper.make_node("Add", ["r0", "input"], ["s0"]),
            helper.make_node("Conv", ["s0", "w1"], ["output"], pads=[1, 1, 1, 1]),
        ]
    elif tail == "grouped":
        depthwise = rng.normal(0, 1, (4, 1, 3, 3)).astype(np.float32)
        inits = [numpy_helper.from_array(depthwise, "w0"), numpy_helper.from_array(depthwise, "w1")]
        nodes[0] = helper.make_node("Conv", ["input", "w0"], ["c0"], pads=[1, 1, 1, 1], group=4)
        nodes.append(helper.make_node("Conv", ["r0", "w1"], ["output"], pads=[1, 1, 1, 1], group=4))
    elif tail == "output":
        nodes.append(helper.make_node("Conv", ["r0", "w1"], ["output"], pads=[1, 1, 1, 1]))
        outputs.append(helper.make_tensor_value_info("r0", TensorProto.FLOAT, None))
    elif tail == "flatten":
        inits[1] = numpy_helper.from_array(
            rng.normal(0, 1, (4 * 8 * 8, 3)).astype(np.float32), "w1"
        )
        nodes += [
            helper.make_node("Flatten", ["r0"], ["f0"]),
            helper.make_node("MatMul", ["f0", "w1"], ["output"]),
        ]
    graph = helper.make_graph(
        nodes,
        tail,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 4, 8, 8])],
        outputs,
        inits,
    )
    path = tmp_path / f"{tail}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        ("residual", "residual"),
        ("grouped", "grouped or depthwise"),
        ("output", "graph output"),
        ("flatten", "Flatten, which mixes or reshapes"),
    ],
)
def test_unsafe_graphs_are_refused(tmp_path: Path, tail: str, reason: str) -> None:
    """Residual adds, grouped convs, exposed activations and plain Flatten are refused."""
    model = load_model(_conv_model(tmp_path, tail))
    with pytest.raises(UnsupportedModelError, match=reason):
        prune_structured(model, tmp_path / "p.onnx", 0.5, None)
    assert not (tmp_path / "p.onnx").exists()


def test_magnitude_pruning_zeroes_without_shrinking(tmp_path: Path, digits_gemm: Path) -> None:
    """Magnitude pruning zeroes half of each weight matrix and keeps every shape."""
    result = prune_magnitude(load_model(digits_gemm), tmp_path / "m.onnx", 0.5)
    assert _shapes(result.path) == _shapes(digits_gemm)
    w1 = next(
        numpy_helper.to_array(i) for i in onnx.load(result.path).graph.initializer if i.name == "w1"
    )
    assert np.mean(w1 == 0) == pytest.approx(0.5, abs=0.01)
    assert 0.45 < result.sparsity < 0.5


def test_gemm_without_transpose(
    tmp_path: Path, digits_mlp: MLPClassifier, digits_calib: Path, digits_eval: Path
) -> None:
    """Gemm layers storing [in, out] weights (transB=0) shrink along the right axes."""
    path = cm.save(cm.digits_gemm_model(digits_mlp, trans_b=False), tmp_path / "plain.onnx")
    model = load_model(path)
    result = prune_structured(
        model, tmp_path / "p.onnx", 0.5, load_dataset(digits_calib, model.signature)
    )
    shapes = _shapes(result.path)
    assert shapes["w1"] == (64, 32) and shapes["w2"] == (32, 10)
    drop, _ = _compare(path, result.path, load_dataset(digits_eval, model.signature))
    assert drop <= 0.02
