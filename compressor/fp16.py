"""fp16 that does not overflow: nodes whose values leave float16's range stay in float32.

A plain float16 conversion turns any activation beyond 65504 into infinity (the DBNet-style
map model came out at cosine 0.51). On calibration data we find the tensors whose range is
too wide for float16 (with a safety factor: calibration never sees the worst input) and keep
their producers and consumers in float32, through onnxruntime's converter's node block
list. Then, while the converted model still strays from the original, the node that adds
the most error of its own (its output's error minus its inputs') joins the list.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import structlog
from onnx import helper

from compressor.data import Dataset
from compressor.graph import GraphIndex, constants_to_initializers, name_nodes
from compressor.metrics import fidelity
from compressor.model import OnnxModel
from compressor.quantize import finish_transform, quiet
from compressor.session import open_session, run_dataset

log = structlog.get_logger(__name__)

FP16_MAX = 65504.0
# Calibration covers a few dozen inputs; real traffic goes further. Half the range is kept
# free, so that a value twice the largest seen still fits.
RANGE_SAFETY = 0.5
# Rows of calibration data used to find ranges and errors: enough to see the tails.
PROBE_ROWS = 64
# The converted model's outputs must match the original's this well on calibration data
# (mean cosine), or more nodes stay in float32.
TARGET_COSINE = 0.9995
MAX_ERROR_STEPS = 8


@dataclass(frozen=True)
class Fp16Plan:
    """Which nodes stay in float32, and why each does."""

    blocked: dict[str, str]
    cosine: float | None  # of the converted model on calibration data, when measured


def convert_fp16_safe(
    model: OnnxModel,
    out: Path,
    calibration: Dataset | None,
    *,
    target_cosine: float = TARGET_COSINE,
    max_error_steps: int = MAX_ERROR_STEPS,
) -> tuple[Path, Fp16Plan]:
    """float16 weights and compute, keeping in float32 what overflows or loses most."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    constants_to_initializers(proto)
    name_nodes(proto)
    if calibration is None:
        converted = _convert(proto, {})
        return finish_transform(converted, model, out), Fp16Plan({}, None)
    probe = calibration.head(min(PROBE_ROWS, calibration.size))
    blocked = overflowing_nodes(proto, probe)
    reference = run_dataset(open_session(proto.SerializeToString()), probe)
    converted = _convert(proto, blocked)
    cosine = _cosine(reference, converted, probe)
    for _ in range(max_error_steps):
        if cosine >= target_cosine:
            break
        worst = _worst_node(proto, converted, probe, set(blocked))
        if worst is None:
            break
        blocked[worst[0]] = f"adds the most fp16 error (relative {worst[1]:.2e})"
        converted = _convert(proto, blocked)
        cosine = _cosine(reference, converted, probe)
    for node, reason in blocked.items():
        log.info("fp16_node_kept_float", node=node, reason=reason)
    log.info("quantized", kind="fp16", float_nodes=len(blocked), cosine=round(cosine, 6))
    return finish_transform(converted, model, out), Fp16Plan(blocked, cosine)


def overflowing_nodes(proto: onnx.ModelProto, data: Dataset) -> dict[str, str]:
    """Nodes that produce or read a float tensor whose range float16 cannot hold."""
    index = GraphIndex(proto.graph)
    tensors = [o for node in proto.graph.node for o in node.output if o]
    peaks = _peaks(proto, tensors, data)
    limit = FP16_MAX * RANGE_SAFETY
    blocked: dict[str, str] = {}
    for tensor, peak in peaks.items():
        if peak <= limit:
            continue
        why = f"{tensor} reaches {peak:.3g} on calibration data (fp16 holds {FP16_MAX:g})"
        producer = index.producer.get(tensor)
        for node in [producer, *index.consumers.get(tensor, [])]:
            if node is not None and node.name not in blocked:
                blocked[node.name] = why
    return blocked


def _peaks(proto: onnx.ModelProto, tensors: Iterable[str], data: Dataset) -> dict[str, float]:
    """The largest absolute value (inf/nan count as overflow) of each float tensor."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    existing = {o.name for o in probe.graph.output}
    wanted = list(dict.fromkeys(tensors))
    for name in wanted:
        if name not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = open_session(probe.SerializeToString())
    peaks: dict[str, float] = {}
    for feed in data.batches(8):
        for name, value in zip(wanted, session.run(wanted, feed), strict=True):
            array = np.asarray(value)
            if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
                continue
            finite = np.isfinite(array).all()
            peak = float(np.max(np.abs(array))) if finite else float("inf")
            peaks[name] = max(peaks.get(name, 0.0), peak)
    return peaks


def _convert(proto: onnx.ModelProto, blocked: dict[str, str]) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import (  # noqa: PLC0415 -- heavy, used only here
        convert_float_to_float16,
    )

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    converted: onnx.ModelProto = quiet(
        convert_float_to_float16, copy, keep_io_types=True, node_block_list=sorted(blocked)
    )
    return drop_round_trips(converted)


def drop_round_trips(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Remove float32 -> float16 -> float32 Cast pairs between two float32 nodes.

    The converter casts every blocked node's output to float16 and back for the next
    blocked node, so the value overflows in the Cast exactly where it was meant not to.
    """
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    index = GraphIndex(proto.graph)
    renamed: dict[str, str] = {}
    dropped: set[int] = set()
    for node in proto.graph.node:
        if node.op_type != "Cast" or _cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        first = index.producer.get(node.input[0])
        if first is None or first.op_type != "Cast" or _cast_to(first) != onnx.TensorProto.FLOAT16:
            continue
        if types.get(first.input[0]) != onnx.TensorProto.FLOAT:
            continue
        if node.output[0] in index.graph_outputs:
            continue
        renamed[node.output[0]] = first.input[0]
        dropped.add(id(node))
    if not renamed:
        return proto
    kept = [n for n in proto.graph.node if id(n) not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    used = {i for n in kept for i in n.input} | {o.name for o in proto.graph.output}
    # A float16 Cast left with no reader (its only readers were the round trips) goes too.
    kept = [n for n in kept if not (n.op_type == "Cast" and n.output[0] not in used)]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    return proto


def _cast_to(node: onnx.NodeProto) -> int | None:
    for attribute in node.attribute:
        if attribute.name == "to":
            return int(attribute.i)
    return None


def _cosine(reference: dict[str, np.ndarray], proto: onnx.ModelProto, data: Dataset) -> float:
    outputs = run_dataset(open_session(proto.SerializeToString()), data)
    return fidelity(reference, outputs).cosine


def _worst_node(
    original: onnx.ModelProto, converted: onnx.ModelProto, data: Dataset, blocked: set[str]
) -> tuple[str, float] | None:
    """The unblocked node whose output error most exceeds the error of its inputs."""
    index = GraphIndex(original.graph)
    converted_names = {o for node in converted.graph.node for o in node.output}
    candidates = [
        node
        for node in original.graph.node
        if node.name not in blocked and node.output and node.output[0] in converted_names
    ]
    tensors = sorted({node.output[0] for node in candidates})
    if not tensors:
        return None
    exact = _values(original, tensors, data)
    approx = _values(converted, tensors, data)
    error = {
        name: _relative_error(exact[name], approx[name])
        for name in tensors
        if name in exact and name in approx
    }
    worst: tuple[str, float] | None = None
    for node in candidates:
        mine = error.get(node.output[0])
        if mine is None:
            continue
        inherited = max((error.get(i, 0.0) for i in node.input if i in index.producer), default=0.0)
        own = mine - inherited
        if own > 0 and (worst is None or own > worst[1]):
            worst = (node.name, own)
    return worst


def _values(proto: onnx.ModelProto, tensors: list[str], data: Dataset) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    existing = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    outputs = run_dataset(open_session(probe.SerializeToString()), data, tensors)
    return {k: np.asarray(v, dtype=np.float64) for k, v in outputs.items()}


def _relative_error(exact: np.ndarray, approx: np.ndarray) -> float:
    if exact.shape != approx.shape:
        return 0.0
    if not np.isfinite(approx).all():
        return float("inf")
    scale = float(np.linalg.norm(exact))
    return float(np.linalg.norm(exact - approx)) / max(scale, 1e-12)
