"""Structured pruning: remove whole neurons and channels, so the dense graph itself shrinks.

Unstructured zeros do not speed up onnxruntime's dense kernels; fewer neurons do. Each unit
(see `units`) is cut in graph order: channels are ranked by an activation-aware score in
the spirit of Wanda (input activation norm on calibration data times the norm of the
weights that read it), the lowest are removed, and the next layer is refitted by least
squares so its output on calibration data matches the original model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import structlog
from onnx import helper

from compressor.activations import collect
from compressor.data import Dataset
from compressor.errors import UnsupportedModelError
from compressor.graph import (
    GraphIndex,
    constants_to_initializers,
    flush_subnormals,
    name_nodes,
    weight_elements,
)
from compressor.model import OnnxModel, save_model, signature_of_bytes
from compressor.prune.correction import ConvGeometry, refit_conv, refit_dense
from compressor.prune.groups import ChannelGraph, apply_cuts, kept_positions, owner_positions, trace
from compressor.prune.units import Unit, find_units

log = structlog.get_logger(__name__)

# Kept widths are rounded up to a multiple of this (when wide enough) to fill SIMD lanes.
LANES = 8


@dataclass(frozen=True)
class PrunedLayer:
    """One layer's width before and after pruning."""

    name: str
    before: int
    after: int
    corrected: bool


@dataclass(frozen=True)
class PruneResult:
    """What pruning wrote and removed."""

    path: Path
    layers: tuple[PrunedLayer, ...]
    sparsity: float


def prune_structured(
    model: OnnxModel,
    out: Path,
    ratio: float,
    calibration: Dataset | None,
    *,
    correct: bool = True,
) -> PruneResult:
    """Remove `ratio` of the neurons/channels of every prunable layer and write the result.

    A conv net is pruned by channel dependency groups (through residual Adds, Concats and
    Splits); a dense net, neuron by neuron along producer -> consumer chains.
    """
    if _is_conv_net(model.proto):
        return prune_groups(model, out, ratio, calibration, correct=correct)
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be between 0 and 1, got {ratio}")
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    constants_to_initializers(proto)
    name_nodes(proto)
    original = onnx.ModelProto()
    original.CopyFrom(proto)
    units, refusals = find_units(proto)
    for refusal in refusals:
        log.info("layer_not_prunable", layer=refusal.layer, reason=refusal.reason)
    if not units:
        reasons = "; ".join(f"{r.layer}: {r.reason}" for r in refusals) or "no MatMul/Gemm/Conv"
        raise UnsupportedModelError(f"structured pruning: no layer can be pruned ({reasons})")
    refit = correct and calibration is not None
    targets = (
        collect(original, [_target(u) for u in units], calibration)
        if refit and calibration is not None
        else {}
    )
    before = weight_elements(proto.graph)
    layers: list[PrunedLayer] = []
    for step, unit in enumerate(units, start=1):
        index = GraphIndex(proto.graph)
        acts = (
            collect(proto, [unit.consumer_input], calibration)[unit.consumer_input]
            if calibration is not None
            else None
        )
        keep = _keep(unit, index, acts, ratio)
        _cut(unit, index, keep)
        corrected = False
        if refit and acts is not None:
            corrected = _refit(unit, index, acts[:, keep], targets[_target(unit)])
        layers.append(PrunedLayer(unit.name, unit.width, len(keep), corrected))
        log.info(
            "layer_pruned",
            step=step,
            steps=len(units),
            layer=unit.name,
            before=unit.width,
            after=len(keep),
            corrected=corrected,
        )
    del proto.graph.value_info[:]  # shapes recorded before the cut are stale now
    flush_subnormals(proto)
    signature_of_bytes(proto.SerializeToString(), str(out))
    sparsity = 1.0 - weight_elements(proto.graph) / max(before, 1)
    return PruneResult(save_model(proto, out), tuple(layers), sparsity)


def _is_conv_net(proto: onnx.ModelProto) -> bool:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    constants_to_initializers(copy)
    index = GraphIndex(copy.graph)
    return any(
        n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in index.initializers
        for n in copy.graph.node
    )


def _target(unit: Unit) -> str:
    return unit.consumer_bias_output or unit.consumer_output


def _keep(unit: Unit, index: GraphIndex, acts: np.ndarray | None, ratio: float) -> np.ndarray:
    """Indices of the channels to keep: the highest Wanda-style scores, in order."""
    assert unit.consumer_slice is not None
    reader = index.weight(unit.consumer_slice.name)
    assert reader is not None
    axis = unit.consumer_slice.axis
    reader_norm = np.sqrt(np.sum(np.moveaxis(reader, axis, 0).reshape(unit.width, -1) ** 2, axis=1))
    if acts is not None:
        per_channel = np.moveaxis(acts.astype(np.float64), 1, 0).reshape(unit.width, -1)
        feed_norm = np.sqrt(np.sum(per_channel**2, axis=1))
    else:  # no data: fall back to the producer's own weight norms
        first = unit.producer_slices[0]
        producer = index.weight(first.name)
        assert producer is not None
        rows = np.moveaxis(producer, first.axis, 0).reshape(unit.width, -1)
        feed_norm = np.sqrt(np.sum(rows.astype(np.float64) ** 2, axis=1))
    score = feed_norm * reader_norm
    count = _kept_width(unit.width, ratio)
    # A stable sort keeps the choice deterministic when scores tie (e.g. dead neurons).
    order = np.argsort(-score, kind="stable")
    return np.sort(order[:count])


def _kept_width(width: int, ratio: float) -> int:
    kept = max(1, math.ceil(width * (1.0 - ratio)))
    if width >= 4 * LANES:
        kept = min(width, math.ceil(kept / LANES) * LANES)
    return kept


def _cut(unit: Unit, index: GraphIndex, keep: np.ndarray) -> None:
    assert unit.consumer_slice is not None
    for cut in (*unit.producer_slices, *unit.chain_slices, unit.consumer_slice):
        value = index.weight(cut.name)
        assert value is not None
        index.set_weight(cut.name, np.ascontiguousarray(np.take(value, keep, axis=cut.axis)))


def _refit(unit: Unit, index: GraphIndex, inputs: np.ndarray, targets: np.ndarray) -> bool:
    """Refit the consumer on calibration data; False where its form does not allow it."""
    node = unit.consumer
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight_name = node.input[1]
    if node.op_type == "Conv":
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            log.info("refit_skipped", layer=node.name, reason="auto_pad")
            return False
        kernel = tuple(index.initializers[weight_name].dims[2:4])
        geometry = ConvGeometry(
            kernel=(int(kernel[0]), int(kernel[1])),
            strides=tuple(attrs.get("strides", (1, 1))),
            dilations=tuple(attrs.get("dilations", (1, 1))),
            pads=tuple(attrs.get("pads", (0, 0, 0, 0))),
        )
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        weight, bias = refit_conv(inputs, targets, geometry, with_bias=bias_name is not None)
        index.set_weight(weight_name, weight)
        if bias_name is not None and bias is not None:
            index.set_weight(bias_name, bias)
        return True
    if node.op_type == "Gemm":
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            log.info("refit_skipped", layer=node.name, reason="scaled Gemm")
            return False
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        old_bias = index.weight(bias_name) if bias_name else None
        fit_bias = old_bias is not None and old_bias.size == targets.shape[-1]
        weight, bias = refit_dense(inputs, targets, with_bias=fit_bias)
        index.set_weight(weight_name, weight.T.copy() if attrs.get("transB", 0) else weight)
        if fit_bias and bias_name and bias is not None and old_bias is not None:
            index.set_weight(bias_name, bias.reshape(old_bias.shape))
        return True
    weight, bias = refit_dense(inputs, targets, with_bias=unit.consumer_bias is not None)
    index.set_weight(weight_name, weight)
    if unit.consumer_bias is not None and bias is not None:
        index.set_weight(unit.consumer_bias, bias)
    return True


# Calibration rows used to score channels and refit layers in a conv net: activations of
# 64x64 maps are large, and the refit samples its rows anyway.
GROUP_ROWS = 64


def prune_groups(
    model: OnnxModel,
    out: Path,
    ratio: float,
    calibration: Dataset | None,
    *,
    correct: bool = True,
) -> PruneResult:
    """Remove `ratio` of the channels of every dependency group of a conv net, then refit."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be between 0 and 1, got {ratio}")
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    constants_to_initializers(proto)
    name_nodes(proto)
    original = onnx.ModelProto()
    original.CopyFrom(proto)
    graph = trace(proto)
    for where, why in graph.refusals.items():
        log.info("channels_not_prunable", at=where, reason=why)
    groups = graph.groups()
    if not groups:
        reasons = "; ".join(f"{k}: {v}" for k, v in graph.refusals.items()) or "no Conv"
        raise UnsupportedModelError(
            f"structured pruning: no channel group can be pruned ({reasons})"
        )
    sample = calibration.head(min(GROUP_ROWS, calibration.size)) if calibration else None
    scores = _group_scores(proto, graph, groups, sample)
    kept: dict[int, np.ndarray] = {}
    layers: list[PrunedLayer] = []
    for members, score in zip(groups, scores, strict=True):
        width = graph.atoms[members[0]].width
        count = _kept_width(width, ratio)
        keep = np.sort(np.argsort(-score, kind="stable")[:count])
        for leaf in members:
            kept[leaf] = keep
        owners = sorted({graph.atoms[m].owner for m in members})
        layers.append(PrunedLayer("+".join(owners), width, count, False))
        log.info("group_pruned", owners=owners, before=width, after=count)
    before = weight_elements(proto.graph)
    apply_cuts(proto, graph, kept)
    corrected: set[str] = set()
    if correct and sample is not None:
        corrected = _refit_readers(proto, original, graph, kept, sample)
    layers = [
        PrunedLayer(
            layer.name,
            layer.before,
            layer.after,
            any(o in corrected for o in layer.name.split("+")),
        )
        for layer in layers
    ]
    del proto.graph.value_info[:]  # shapes recorded before the cut are stale now
    flush_subnormals(proto)
    signature_of_bytes(proto.SerializeToString(), str(out))
    sparsity = 1.0 - weight_elements(proto.graph) / max(before, 1)
    return PruneResult(save_model(proto, out), tuple(layers), sparsity)


def _group_scores(
    proto: onnx.ModelProto,
    graph: ChannelGraph,
    groups: list[list[int]],
    sample: Dataset | None,
) -> list[np.ndarray]:
    """Per channel of each group: sum over readers of activation norm x reading weight norm.

    Without data, the owners' filter norms stand in for the activations.
    """
    index = GraphIndex(proto.graph)
    group_of = {leaf: g for g, members in enumerate(groups) for leaf in members}
    scores = [np.zeros(graph.atoms[m[0]].width) for m in groups]
    nodes = {n.name: n for n in proto.graph.node}
    inputs = [nodes[r.node].input[0] for r in graph.readers]
    acts = collect(proto, inputs, sample) if sample is not None else {}
    for reader, tensor in zip(graph.readers, inputs, strict=True):
        weight = index.weight(reader.weight)
        assert weight is not None
        moved = np.moveaxis(weight.astype(np.float64), reader.axis, 0)
        reading = np.sqrt(np.sum(moved.reshape(moved.shape[0], -1) ** 2, axis=1))
        if tensor in acts:
            per_channel = np.moveaxis(acts[tensor].astype(np.float64), 1, 0)
            feeding = np.sqrt(np.sum(per_channel.reshape(per_channel.shape[0], -1) ** 2, axis=1))
        else:
            feeding = np.ones_like(reading)
        offset = 0
        for leaf in graph.expand(reader.layout):
            width = graph.atoms[leaf].width
            if leaf in group_of:
                scores[group_of[leaf]] += (feeding * reading)[offset : offset + width]
            offset += width
    if sample is None:
        for g, members in enumerate(groups):
            for leaf in members:
                atom = graph.atoms[leaf]
                weight = index.weight(nodes[atom.owner].input[1])
                assert weight is not None
                rows = weight[atom.start : atom.start + atom.width].reshape(atom.width, -1)
                scores[g] += np.sqrt(np.sum(rows.astype(np.float64) ** 2, axis=1))
    return scores


def _refit_readers(
    proto: onnx.ModelProto,
    original: onnx.ModelProto,
    graph: ChannelGraph,
    kept: dict[int, np.ndarray],
    sample: Dataset,
) -> set[str]:
    """Refit, in graph order, each layer that lost inputs, to its original output."""
    order = {n.name: i for i, n in enumerate(proto.graph.node)}
    done: set[str] = set()
    for reader in sorted(graph.readers, key=lambda r: order[r.node]):
        full = sum(graph.atoms[a].width for a in graph.expand(reader.layout))
        if len(kept_positions(graph, reader.layout, kept)) == full:
            continue
        index = GraphIndex(proto.graph)
        node = next(n for n in proto.graph.node if n.name == reader.node)
        target = collect(original, [node.output[0]], sample)[node.output[0]]
        if reader.node in graph.owners:
            target = np.take(target, owner_positions(graph, reader.node, kept), axis=1)
        inputs = collect(proto, [node.input[0]], sample)[node.input[0]]
        if _refit_node(node, index, inputs, target):
            done.add(reader.node)
            log.info("layer_refitted", layer=reader.node)
    return done


def _refit_node(
    node: onnx.NodeProto, index: GraphIndex, inputs: np.ndarray, targets: np.ndarray
) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight_name = node.input[1]
    bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Conv":
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return False
        kernel = tuple(index.initializers[weight_name].dims[2:4])
        geometry = ConvGeometry(
            kernel=(int(kernel[0]), int(kernel[1])),
            strides=tuple(attrs.get("strides", (1, 1))),
            dilations=tuple(attrs.get("dilations", (1, 1))),
            pads=tuple(attrs.get("pads", (0, 0, 0, 0))),
        )
        weight, bias = refit_conv(inputs, targets, geometry, with_bias=bias_name is not None)
        index.set_weight(weight_name, weight)
        if bias_name is not None and bias is not None:
            index.set_weight(bias_name, bias)
        return True
    if node.op_type != "Gemm" or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return False
    old_bias = index.weight(bias_name) if bias_name else None
    fit_bias = old_bias is not None and old_bias.size == targets.shape[-1]
    weight, bias = refit_dense(inputs, targets, with_bias=fit_bias)
    index.set_weight(weight_name, weight.T.copy() if attrs.get("transB", 0) else weight)
    if fit_bias and bias_name and bias is not None and old_bias is not None:
        index.set_weight(bias_name, bias.reshape(old_bias.shape))
    return True
