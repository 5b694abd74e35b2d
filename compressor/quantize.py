"""Quantization on top of onnxruntime's tools, with the settings that make it pay on a CPU.

Measured traps shape every default here: dynamic int8 is for MatMul only (Conv becomes
ConvInteger, several times slower); static int8 is QDQ with uint8 activations and int8
per-channel weights (the library defaults ran slower than fp32); graphs are upgraded to
opset 13+ and pre-processed without symbolic shape inference; weights inside If/Loop bodies
are never quantized, which is reported instead of shipping a bigger, identical model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import structlog
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from compressor.data import Dataset
from compressor.errors import UnsupportedModelError
from compressor.graph import (
    GraphIndex,
    constants_to_initializers,
    flatten_gemm_biases,
    gemm_to_matmul,
    name_nodes,
    op_counts,
    subgraph_weights,
    upgrade_opset,
)
from compressor.model import OnnxModel, save_model, signature_of_bytes

log = structlog.get_logger(__name__)

T = TypeVar("T")

# quantize_static writes an invalid DequantizeLinear axis below opset 13.
MIN_STATIC_OPSET = 13
# onnxruntime's dynamic quantizer turns Conv into ConvInteger, measured 4.5-5.7x slower.
DYNAMIC_OPS = ("MatMul",)
# The weighted operators static int8 is about; the activations around them (Relu, pooling,
# Flatten) are quantized too, or Relu stays in float between two QDQ pairs and the int8
# CNN ran at 1.7x the fp32 latency instead of 0.5x.
WEIGHTED_OPS = ("Conv", "MatMul", "Gemm")
CALIBRATION_BATCH = 16


class Calibration(StrEnum):
    """How activation ranges are chosen from the calibration set."""

    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


_ORT_METHODS = {
    Calibration.MINMAX: CalibrationMethod.MinMax,
    Calibration.ENTROPY: CalibrationMethod.Entropy,
    Calibration.PERCENTILE: CalibrationMethod.Percentile,
}


class _DatasetReader(CalibrationDataReader):  # type: ignore[misc]  # untyped base class
    """Feeds a Dataset to onnxruntime's calibrators in small batches."""

    def __init__(self, data: Dataset, batch: int) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = data.batches(batch)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def prepare(model: OnnxModel, workdir: Path, min_opset: int = MIN_STATIC_OPSET) -> onnx.ModelProto:
    """The model made ready for onnxruntime's quantizers: opset, pre-processing, node names.

    `quant_pre_process` runs without symbolic shape inference (it failed on every real model
    tried); its graph optimisation folds Constant-node weights into initializers and
    BatchNormalization into Conv, which the quantizers need.
    """
    proto = upgrade_opset(_copy(model.proto), min_opset)
    upgraded = save_model(proto, workdir / "upgraded.onnx")
    processed = workdir / "preprocessed.onnx"
    try:
        quiet(quant_pre_process, upgraded, processed, skip_symbolic_shape=True)
        proto = onnx.load_model(processed)
    # The pre-processor raises whatever its optimisers and shape inference raise.
    except Exception as exc:
        log.warning("preprocess_failed", error=str(exc)[:300], fallback="constants_hoisted")
        constants_to_initializers(proto)
    flatten_gemm_biases(proto)
    return name_nodes(proto)


def quantize_dynamic_int8(
    model: OnnxModel, out: Path, op_types: Sequence[str] = DYNAMIC_OPS, per_channel: bool = False
) -> Path:
    """Dynamic int8 weights (activations quantized at run time), MatMul/Gemm only by default."""
    if "Conv" in op_types:
        log.warning("dynamic_conv_requested", why="ConvInteger measured 4.5-5.7x slower than fp32")
    with tempfile.TemporaryDirectory(prefix="edge-compress-") as tmp:
        proto = prepare(model, Path(tmp))
        rewritten = gemm_to_matmul(proto)
        ops = set(op_types) | ({"MatMul"} if "Gemm" in op_types else set())
        _check_weights(proto, ops, "dynamic int8")
        source = save_model(proto, Path(tmp) / "input.onnx")
        target = Path(tmp) / "dynamic.onnx"
        quiet(
            quantize_dynamic,
            source,
            target,
            op_types_to_quantize=sorted(ops),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        )
        log.info("quantized", kind="dynamic_int8", gemm_rewritten=rewritten, ops=sorted(ops))
        return finish_transform(onnx.load_model(target), model, out)


def quantize_static_int8(
    model: OnnxModel,
    out: Path,
    calibration: Dataset,
    method: Calibration = Calibration.MINMAX,
    *,
    exclude: Iterable[str] = (),
    op_types: Sequence[str] | None = None,
    cache: Path | None = None,
    per_channel: bool = True,
) -> Path:
    """Static int8 QDQ: uint8 activations calibrated on data, int8 weights with one scale
    per output channel (or one per tensor: coarser, sometimes as good and a little faster)."""
    with tempfile.TemporaryDirectory(prefix="edge-compress-") as tmp:
        proto = prepare(model, Path(tmp))
        source = save_model(proto, Path(tmp) / "prepared.onnx")
        return quantize_static_prepared(
            source,
            model,
            out,
            calibration,
            method,
            exclude=exclude,
            op_types=op_types,
            cache=cache,
            per_channel=per_channel,
        )


def quantize_static_prepared(
    prepared: Path,
    model: OnnxModel,
    out: Path,
    calibration: Dataset,
    method: Calibration = Calibration.MINMAX,
    *,
    exclude: Iterable[str] = (),
    op_types: Sequence[str] | None = None,
    cache: Path | None = None,
    per_channel: bool = True,
) -> Path:
    """Static int8 QDQ of an already prepared model; `cache` reuses calibrated ranges (the
    activations' ranges: one cache serves both weight granularities)."""
    proto = onnx.load_model(prepared)
    _check_weights(proto, set(op_types or WEIGHTED_OPS) & set(WEIGHTED_OPS), "static int8")
    extra: dict[str, object] = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if method is Calibration.PERCENTILE:
        extra["CalibPercentile"] = 99.999
    with tempfile.TemporaryDirectory(prefix="edge-compress-") as tmp:
        target = Path(tmp) / "static.onnx"
        # Histogram calibrators stack every batch into one array: ragged batches break them.
        even = method is Calibration.MINMAX and model.signature.batchable
        batch = CALIBRATION_BATCH if even else 1
        quiet(
            quantize_static,
            prepared,
            target,
            _DatasetReader(calibration, batch),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=None if op_types is None else list(op_types),
            per_channel=per_channel,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(exclude),
            calibrate_method=_ORT_METHODS[method],
            extra_options=extra,
            calibration_cache_path=cache,
        )
        log.info(
            "quantized",
            kind="static_int8",
            method=str(method),
            per_channel=per_channel,
            excluded=len(list(exclude)),
        )
        return finish_transform(onnx.load_model(target), model, out)


def quantize_int4(model: OnnxModel, out: Path, block_size: int = 32) -> Path:
    """4-bit weight-only quantization of MatMul weights (MatMulNBits), activations in float."""
    # Imported here: onnxruntime's 4-bit quantizer pulls in onnx_ir, needed by no other path.
    from onnxruntime.quantization.matmul_nbits_quantizer import (  # noqa: PLC0415
        MatMulNBitsQuantizer,
    )

    with tempfile.TemporaryDirectory(prefix="edge-compress-") as tmp:
        proto = prepare(model, Path(tmp))
        gemm_to_matmul(proto)
        _check_weights(proto, {"MatMul"}, "int4")
        # accuracy_level 4 computes with int8 inputs: the fast path on x86 with VNNI.
        quantizer = MatMulNBitsQuantizer(
            proto, bits=4, block_size=block_size, is_symmetric=True, accuracy_level=4
        )
        quiet(quantizer.process)
        result: onnx.ModelProto = quantizer.model.model
        if "MatMulNBits" not in op_counts(result.graph):
            raise UnsupportedModelError("int4: onnxruntime quantized no MatMul weight to 4 bits")
        log.info("quantized", kind="int4", block_size=block_size)
        return finish_transform(result, model, out)


def convert_fp16(model: OnnxModel, out: Path) -> Path:
    """Float16 weights and compute with float32 inputs and outputs (a size rung on CPUs)."""
    from onnxruntime.transformers.float16 import (  # noqa: PLC0415 -- heavy, used only here
        convert_float_to_float16,
    )

    # Measured: the converter leaves If/Loop bodies in float32 too (the file grew).
    _check_no_subgraph_only(model.proto, "fp16")
    proto = quiet(convert_float_to_float16, _copy(model.proto), keep_io_types=True)
    log.info("quantized", kind="fp16")
    return finish_transform(proto, model, out)


def _check_weights(proto: onnx.ModelProto, op_types: set[str], what: str) -> None:
    index = GraphIndex(proto.graph)
    weighted = [
        node
        for node in proto.graph.node
        if node.op_type in op_types and any(name in index.initializers for name in node.input[1:2])
    ]
    _check_no_subgraph_only(proto, what, has_main_weights=bool(weighted))
    if not weighted:
        mix = ", ".join(f"{op}x{n}" for op, n in op_counts(proto.graph).most_common(8))
        raise UnsupportedModelError(
            f"{what}: no {'/'.join(sorted(op_types))} node with constant weights to quantize "
            f"(the graph holds {mix})"
        )


def _check_no_subgraph_only(
    proto: onnx.ModelProto, what: str, has_main_weights: bool | None = None
) -> None:
    inner = subgraph_weights(proto.graph)
    if not inner.tensors:
        return
    if has_main_weights is None:
        has_main_weights = any(
            i.data_type == onnx.TensorProto.FLOAT for i in proto.graph.initializer
        )
    if not has_main_weights:
        raise UnsupportedModelError(
            f"{what}: the weights ({inner.tensors} tensors, {inner.elements} values) sit inside "
            f"the subgraphs of {', '.join(inner.nodes)}; onnxruntime's quantizers leave those in "
            "float, so the variant would be larger with identical outputs"
        )
    log.warning(
        "subgraph_weights_left_in_float",
        transform=what,
        nodes=list(inner.nodes),
        tensors=inner.tensors,
        values=inner.elements,
    )


def finish_transform(proto: onnx.ModelProto, model: OnnxModel, out: Path) -> Path:
    """Check that onnxruntime loads the result with the original's signature, then write it."""
    signature = signature_of_bytes(proto.SerializeToString(), str(out))
    if [(t.name, t.datatype) for t in signature.inputs] != [
        (t.name, t.datatype) for t in model.signature.inputs
    ] or [t.name for t in signature.outputs] != [t.name for t in model.signature.outputs]:
        raise UnsupportedModelError(f"{out}: the transform changed the model's signature")
    return save_model(proto, out)


def _copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(proto)
    return clone


def quiet(func: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Call an onnxruntime tool with its root-logger chatter turned down to errors."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    chatter = io.StringIO()  # the calibrators print progress to stdout, which holds reports
    try:
        with contextlib.redirect_stdout(chatter):
            return func(*args, **kwargs)
    finally:
        root.setLevel(level)
        if chatter.getvalue():
            log.debug("tool_output", text=chatter.getvalue()[-2000:])
