"""Quantization: each mode keeps the signature, loads in onnxruntime and uses the right kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.data import load_dataset
from compressor.errors import UnsupportedModelError
from compressor.graph import op_counts
from compressor.metrics import accuracy, fidelity
from compressor.model import OnnxModel, default_opset, load_model
from compressor.quantize import (
    Calibration,
    convert_fp16,
    quantize_dynamic_int8,
    quantize_int4,
    quantize_static_int8,
)
from compressor.session import open_session, run_dataset


def _ops(path: Path) -> set[str]:
    return set(op_counts(onnx.load(path).graph))


def _same_signature(a: Path, b: Path) -> bool:
    return load_model(a).signature == load_model(b).signature


def _scores(original: Path, variant: Path, data_path: Path) -> tuple[float, float]:
    """(variant accuracy - original accuracy, or 0 without labels; mean cosine)."""
    data = load_dataset(data_path, load_model(original).signature)
    ref = run_dataset(open_session(original, 1), data)
    out = run_dataset(open_session(variant, 1), data)
    gain = accuracy(out, data.labels) - accuracy(ref, data.labels) if data.labels is not None else 0
    return gain, fidelity(ref, out).cosine


def test_dynamic_int8_on_gemm_form(tmp_path: Path, digits_gemm: Path, digits_eval: Path) -> None:
    """The demo's Gemm layers are rewritten so dynamic int8 applies, and accuracy holds."""
    out = quantize_dynamic_int8(load_model(digits_gemm), tmp_path / "int8.onnx")
    assert "MatMulInteger" in _ops(out) and "Gemm" not in _ops(out)
    assert _same_signature(digits_gemm, out)
    assert out.stat().st_size < digits_gemm.stat().st_size / 2
    gain, cosine = _scores(digits_gemm, out, digits_eval)
    assert gain >= -0.01 and cosine > 0.99


def test_dynamic_int8_on_skl2onnx_form(
    tmp_path: Path, digits_skl: Path, digits_skl_eval: Path
) -> None:
    """skl2onnx's MatMul+Add form quantizes and keeps its label and probabilities outputs."""
    out = quantize_dynamic_int8(load_model(digits_skl), tmp_path / "int8.onnx")
    assert "MatMulInteger" in _ops(out)
    assert _same_signature(digits_skl, out)
    gain, _ = _scores(digits_skl, out, digits_skl_eval)
    assert gain >= -0.01


def test_dynamic_int8_leaves_conv_in_float(tmp_path: Path, cnn: Path) -> None:
    """By default dynamic int8 never produces ConvInteger, the measured slow path."""
    out = quantize_dynamic_int8(load_model(cnn), tmp_path / "int8.onnx")
    assert "ConvInteger" not in _ops(out)
    assert "Conv" in _ops(out)


@pytest.mark.parametrize("method", list(Calibration))
def test_static_int8_qdq_settings(
    tmp_path: Path, cnn: Path, cnn_calib: Path, cnn_eval: Path, method: Calibration
) -> None:
    """Static int8 is QDQ with uint8 activations and per-channel int8 conv weights."""
    model = load_model(cnn)
    calib = load_dataset(cnn_calib, model.signature)
    out = quantize_static_int8(model, tmp_path / "int8.onnx", calib, method)
    proto = onnx.load(out)
    assert _same_signature(cnn, out)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    quant = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert quant and all(inits[n.input[2]].dtype == np.uint8 for n in quant)
    weights = [i for i in proto.graph.initializer if i.data_type == TensorProto.INT8]
    conv_weights = [w for w in weights if len(w.dims) == 4]
    assert conv_weights
    for weight in conv_weights:
        scale = next(
            inits[n.input[1]]
            for n in proto.graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] == weight.name
        )
        assert scale.shape == (weight.dims[0],)  # one scale per output channel
    _, cosine = _scores(cnn, out, cnn_eval)
    assert cosine >= 0.99


def test_static_int8_per_tensor_has_one_weight_scale(
    tmp_path: Path, cnn: Path, cnn_calib: Path, cnn_eval: Path
) -> None:
    """Per-tensor static int8 gives every conv weight a single scale, and still follows fp32."""
    model = load_model(cnn)
    calib = load_dataset(cnn_calib, model.signature)
    out = quantize_static_int8(model, tmp_path / "int8.onnx", calib, per_channel=False)
    proto = onnx.load(out)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    conv_weights = [
        i.name
        for i in proto.graph.initializer
        if i.data_type == TensorProto.INT8 and len(i.dims) == 4
    ]
    assert conv_weights
    scales = [
        inits[n.input[1]]
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in conv_weights
    ]
    assert len(scales) == len(conv_weights) and all(s.size == 1 for s in scales)
    _, cosine = _scores(cnn, out, cnn_eval)
    assert cosine >= 0.98


def test_static_int8_upgrades_old_opset(tmp_path: Path, cnn: Path, cnn_calib: Path) -> None:
    """An opset-11 model is upgraded before quantize_static so the result is valid and loads."""
    proto = onnx.load(cnn)
    proto.opset_import[0].version = 11  # every op in the CNN means the same at opset 11
    old = tmp_path / "old.onnx"
    onnx.save(proto, old)
    model = load_model(old)
    out = quantize_static_int8(
        model, tmp_path / "int8.onnx", load_dataset(cnn_calib, model.signature)
    )
    assert default_opset(onnx.load(out)) >= 13
    onnx.checker.check_model(onnx.load(out))
    assert _same_signature(old, out)


def test_constant_node_weights_get_quantized(
    tmp_path: Path, constant_weights: Path, vector16: Path
) -> None:
    """Weights stored in Constant nodes are hoisted so both int8 modes quantize them."""
    model = load_model(constant_weights)
    dynamic = quantize_dynamic_int8(model, tmp_path / "dyn.onnx")
    assert "MatMulInteger" in _ops(dynamic)
    static = quantize_static_int8(
        model, tmp_path / "static.onnx", load_dataset(vector16, model.signature)
    )
    assert any(i.data_type == TensorProto.INT8 for i in onnx.load(static).graph.initializer)
    _, cosine = _scores(constant_weights, static, vector16)
    assert cosine > 0.99


@pytest.mark.parametrize("mode", ["dynamic", "static", "int4", "fp16"])
def test_if_subgraph_weights_are_refused(
    tmp_path: Path, if_model: Path, vector16: Path, mode: str
) -> None:
    """Weights only inside If branches are refused with the reason, not shipped unquantized."""
    model = load_model(if_model)
    with pytest.raises(UnsupportedModelError, match="subgraphs of If"):
        _quantize(mode, model, tmp_path / "q.onnx", vector16)
    assert not (tmp_path / "q.onnx").exists()


def _quantize(mode: str, model: OnnxModel, out: Path, data: Path) -> Path:
    if mode == "dynamic":
        return quantize_dynamic_int8(model, out)
    if mode == "static":
        return quantize_static_int8(model, out, load_dataset(data, model.signature))
    if mode == "int4":
        return quantize_int4(model, out, block_size=16)
    return convert_fp16(model, out)


def test_int4_uses_matmulnbits(tmp_path: Path, digits_gemm: Path, digits_eval: Path) -> None:
    """int4 turns the demo's layers into MatMulNBits, shrinks the file and keeps accuracy."""
    out = quantize_int4(load_model(digits_gemm), tmp_path / "int4.onnx")
    assert "MatMulNBits" in _ops(out)
    assert _same_signature(digits_gemm, out)
    assert out.stat().st_size < digits_gemm.stat().st_size / 3
    gain, _ = _scores(digits_gemm, out, digits_eval)
    assert gain >= -0.02


def test_int4_refuses_conv_only_model(tmp_path: Path) -> None:
    """A model with no MatMul or Gemm weight is refused for int4, naming its op mix."""
    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["output"])],
        "conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [-1, 4, 6, 6])],
        [weight],
    )
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(UnsupportedModelError, match=r"no MatMul node.*Convx1"):
        quantize_int4(load_model(path), tmp_path / "int4.onnx")


def test_fp16_keeps_float32_io(tmp_path: Path, digits_gemm: Path, digits_eval: Path) -> None:
    """fp16 stores half-precision weights behind float32 inputs and outputs."""
    out = convert_fp16(load_model(digits_gemm), tmp_path / "fp16.onnx")
    proto = onnx.load(out)
    assert {i.data_type for i in proto.graph.initializer} == {TensorProto.FLOAT16}
    assert _same_signature(digits_gemm, out)
    _, cosine = _scores(digits_gemm, out, digits_eval)
    assert cosine > 0.999


def test_static_needs_weights(tmp_path: Path, cnn: Path, cnn_calib: Path) -> None:
    """Asking static int8 for an operator the model lacks is refused, naming the op mix."""
    model = load_model(cnn)
    with pytest.raises(UnsupportedModelError, match="no MatMul node"):
        quantize_static_int8(
            model,
            tmp_path / "q.onnx",
            load_dataset(cnn_calib, model.signature),
            op_types=("MatMul",),
        )


def test_static_int8_on_skl2onnx_form(
    tmp_path: Path, digits_skl: Path, digits_skl_calib: Path, digits_skl_eval: Path
) -> None:
    """skl2onnx's [1, N] intercepts, folded into Gemm, do not break static int8."""
    model = load_model(digits_skl)
    calib = load_dataset(digits_skl_calib, model.signature)
    out = quantize_static_int8(model, tmp_path / "int8.onnx", calib)
    assert _same_signature(digits_skl, out)
    gain, cosine = _scores(digits_skl, out, digits_skl_eval)
    assert gain >= -0.01 and cosine > 0.99
