"""Scale migration before int8 (SmoothQuant-style, as cross-layer equalisation does for convs).

One activation channel far wider than the rest sets the int8 range of the whole tensor and
crushes the others. Where a Conv's output reaches the next Convs only through positively
homogeneous ops (Relu, max/average pooling, Concat, Identity), channel j can be divided by
s_j in the producer (weights and bias) and multiplied back in every reader's weights: the
float function is unchanged, and with s_j = sqrt(max|x_j| / max|w_j|) the activation and
weight ranges meet in the middle, so both quantize well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import structlog

from compressor.activations import collect
from compressor.data import Dataset
from compressor.errors import UnsupportedModelError
from compressor.graph import GraphIndex, constants_to_initializers, name_nodes
from compressor.model import OnnxModel, save_model

log = structlog.get_logger(__name__)

# Ops through which x/s in, y/s out holds for s > 0 per channel.
HOMOGENEOUS = frozenset({"Relu", "MaxPool", "AveragePool", "Identity", "Dropout"})
ALPHA = 0.5  # how much of the range moves into the weights (SmoothQuant's migration strength)
# Channels whose range is this close to the tensor's median are left alone: nothing to win.
MIN_SPREAD = 8.0
ROWS = 32


@dataclass(frozen=True)
class Migration:
    """One producer whose channels were rescaled, and the readers that absorbed the scales."""

    producer: str
    readers: tuple[str, ...]
    largest_scale: float


def smooth(model: OnnxModel, out: Path, calibration: Dataset) -> tuple[Path, list[Migration]]:
    """Write a float model with wide activation channels migrated into the next weights."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    constants_to_initializers(proto)
    name_nodes(proto)
    pairs = _pairs(proto)
    if not pairs:
        raise UnsupportedModelError("smoothing: no Conv feeds other Convs through Relu/pool/Concat")
    sample = calibration.head(min(ROWS, calibration.size))
    acts = collect(proto, [producer.output[0] for producer, _ in pairs], sample)
    index = GraphIndex(proto.graph)
    done: list[Migration] = []
    for producer, readers in pairs:
        act = np.abs(acts[producer.output[0]].astype(np.float64))
        act_range = np.max(np.moveaxis(act, 1, 0).reshape(act.shape[1], -1), axis=1)
        if np.max(act_range) < MIN_SPREAD * max(float(np.median(act_range)), 1e-12):
            continue
        weight_range = np.zeros_like(act_range)
        for reader, offset in readers:
            w = index.weight(reader.input[1])
            assert w is not None
            part = np.abs(w[:, offset : offset + len(act_range)]).astype(np.float64)
            weight_range = np.maximum(weight_range, part.max(axis=(0, 2, 3)))
        scale = np.maximum(act_range, 1e-8) ** ALPHA / np.maximum(weight_range, 1e-8) ** (1 - ALPHA)
        scale = np.clip(scale, 1e-6, 1e9)
        _rescale_producer(index, producer, 1.0 / scale)
        for reader, offset in readers:
            w = index.weight(reader.input[1])
            assert w is not None
            w = w.copy()
            w[:, offset : offset + len(scale)] *= scale[None, :, None, None].astype(np.float32)
            index.set_weight(reader.input[1], w)
        done.append(
            Migration(producer.name, tuple(r.name for r, _ in readers), float(np.max(scale)))
        )
        log.info(
            "scales_migrated",
            producer=producer.name,
            readers=[r.name for r, _ in readers],
            largest_scale=round(float(np.max(scale)), 3),
        )
    if not done:
        raise UnsupportedModelError("smoothing: no activation is wide enough to need it")
    return save_model(proto, out), done


def _rescale_producer(index: GraphIndex, producer: onnx.NodeProto, factor: np.ndarray) -> None:
    weight = index.weight(producer.input[1])
    assert weight is not None
    index.set_weight(producer.input[1], (weight * factor[:, None, None, None]).astype(np.float32))
    if len(producer.input) > 2 and producer.input[2]:
        bias = index.weight(producer.input[2])
        assert bias is not None
        index.set_weight(producer.input[2], (bias * factor).astype(np.float32))


def _pairs(
    proto: onnx.ModelProto,
) -> list[tuple[onnx.NodeProto, list[tuple[onnx.NodeProto, int]]]]:
    """Each Conv whose output reaches only Convs through homogeneous ops, with those readers
    and the input-channel offset at which each reads it."""
    index = GraphIndex(proto.graph)
    found: list[tuple[onnx.NodeProto, list[tuple[onnx.NodeProto, int]]]] = []
    for node in proto.graph.node:
        if not _private_conv(node, index):
            continue
        readers = _readers(node.output[0], 0, index)
        if readers:
            found.append((node, readers))
    return found


def _private_conv(node: onnx.NodeProto, index: GraphIndex) -> bool:
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in index.initializers:
        return False
    if any(a.name == "group" and a.i != 1 for a in node.attribute):
        return False
    shared = [n for n in node.input[1:] if n and len(index.consumers.get(n, [])) > 1]
    bias_ok = len(node.input) < 3 or not node.input[2] or node.input[2] in index.initializers
    return not shared and bias_ok


def _readers(
    tensor: str, offset: int, index: GraphIndex, depth: int = 0
) -> list[tuple[onnx.NodeProto, int]] | None:
    """The Convs reading `tensor` (at channel `offset`) through homogeneous ops; None if any
    path meets another op or leaves the graph."""
    if tensor in index.graph_outputs or depth > 16:
        return None
    found: list[tuple[onnx.NodeProto, int]] = []
    for node in index.consumers.get(tensor, []):
        if node.op_type == "Conv" and node.input[0] == tensor and _private_conv(node, index):
            found.append((node, offset))
        elif node.op_type in HOMOGENEOUS and node.input[0] == tensor:
            deeper = _readers(node.output[0], offset, index, depth + 1)
            if deeper is None:
                return None
            found += deeper
        elif node.op_type == "Concat" and any(
            a.name == "axis" and a.i == 1 for a in node.attribute
        ):
            position = 0
            for name in node.input:
                if name == tensor:
                    break
                width = _channels(name, index)
                if width is None:
                    return None
                position += width
            deeper = _readers(node.output[0], offset + position, index, depth + 1)
            if deeper is None:
                return None
            found += deeper
        else:
            return None
    return found or None


def _channels(tensor: str, index: GraphIndex) -> int | None:
    """The channel count of a Conv's output, through homogeneous ops back to that Conv."""
    node = index.producer.get(tensor)
    while node is not None and node.op_type in HOMOGENEOUS:
        node = index.producer.get(node.input[0])
    if node is None or node.op_type != "Conv" or node.input[1] not in index.initializers:
        return None
    return int(index.initializers[node.input[1]].dims[0])
