"""Unstructured magnitude pruning: zero the smallest weights of each layer.

The graph keeps its shapes, so onnxruntime's dense kernels run no faster; what shrinks is
the compressed size of the file. It is offered for that, and the ladder does not expect it
to be faster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import structlog

from compressor.errors import UnsupportedModelError
from compressor.graph import (
    GraphIndex,
    constants_to_initializers,
    flush_subnormals,
    weight_elements,
)
from compressor.model import OnnxModel, save_model, signature_of_bytes
from compressor.prune.structured import PrunedLayer, PruneResult

log = structlog.get_logger(__name__)


def prune_magnitude(model: OnnxModel, out: Path, sparsity: float) -> PruneResult:
    """Set the `sparsity` fraction of smallest-magnitude weights of each layer to zero."""
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be between 0 and 1, got {sparsity}")
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    constants_to_initializers(proto)
    index = GraphIndex(proto.graph)
    zeroed = 0
    layers: list[PrunedLayer] = []
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        weight = index.weight(node.input[1])
        if weight is None or weight.dtype != np.float32:
            continue
        count = int(weight.size * sparsity)
        if count == 0:
            continue
        threshold = np.partition(np.abs(weight).ravel(), count - 1)[count - 1]
        pruned = np.where(np.abs(weight) <= threshold, 0.0, weight).astype(np.float32)
        zeroed += int(np.sum(pruned == 0) - np.sum(weight == 0))
        index.set_weight(node.input[1], pruned)
        layers.append(
            PrunedLayer(
                node.name or node.output[0], weight.size, int(np.count_nonzero(pruned)), False
            )
        )
        log.info("layer_sparsified", layer=node.name or node.output[0], zeroed=count)
    if not layers:
        raise UnsupportedModelError("magnitude pruning: no MatMul/Gemm/Conv with float weights")
    flush_subnormals(proto)
    signature_of_bytes(proto.SerializeToString(), str(out))
    total = weight_elements(proto.graph)
    zeros = sum(
        int(np.sum(index.weight(n.input[1]) == 0))
        for n in proto.graph.node
        if n.op_type in ("MatMul", "Gemm", "Conv") and n.input[1] in index.initializers
    )
    return PruneResult(save_model(proto, out), tuple(layers), zeros / max(total, 1))
