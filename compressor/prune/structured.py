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
    """Remove `ratio` of the neurons/channels of every prunable layer and write the result."""
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
