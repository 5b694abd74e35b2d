"""Reading and rewriting ONNX graphs: who produces and consumes what, and small safe rewrites.

The rewrites here change how a graph is written, never what it computes (up to float
rounding): naming nodes, hoisting Constant weights into initializers, Gemm into MatMul+Add,
flushing subnormal weights, upgrading the opset. The transforms build on them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
import structlog
from onnx import TensorProto, helper, numpy_helper, version_converter

from compressor.errors import UnsupportedModelError
from compressor.model import default_opset

log = structlog.get_logger(__name__)

# Operators whose constant second input is a weight matrix the quantizers and pruners handle.
WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Conv"})
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE})


class GraphIndex:
    """Producers, consumers and initializers of one graph, for navigating it by tensor name."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.graph_outputs = {out.name for out in graph.output}

    def weight(self, name: str) -> np.ndarray | None:
        """The value of an initializer, or None if `name` is not one."""
        init = self.initializers.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def set_weight(self, name: str, value: np.ndarray) -> None:
        """Replace an initializer's value (and shape) in place."""
        self.initializers[name].CopyFrom(numpy_helper.from_array(value, name))

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        """The single node reading `tensor`, or None if it has several readers or is an output."""
        readers = self.consumers.get(tensor, [])
        if len(readers) != 1 or tensor in self.graph_outputs:
            return None
        return readers[0]


@dataclass(frozen=True)
class SubgraphWeights:
    """Float weights found inside control-flow subgraphs (If/Loop/Scan bodies)."""

    tensors: int
    elements: int
    nodes: tuple[str, ...]


def op_counts(graph: onnx.GraphProto) -> Counter[str]:
    """How many nodes of each operator type the main graph holds."""
    return Counter(node.op_type for node in graph.node)


def weight_elements(graph: onnx.GraphProto) -> int:
    """Float initializer elements in the main graph (the weights a transform can touch)."""
    return sum(
        int(np.prod(init.dims)) for init in graph.initializer if init.data_type in FLOAT_TYPES
    )


def subgraph_weights(graph: onnx.GraphProto) -> SubgraphWeights:
    """Float weights held inside the subgraphs of control-flow nodes, at any depth."""
    tensors = elements = 0
    owners: list[str] = []
    for node in graph.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                found = [t for t in _float_constants(body) if t.data_type in FLOAT_TYPES]
                inner = subgraph_weights(body)
                count = len(found) + inner.tensors
                if count:
                    owners.append(node.name or node.op_type)
                tensors += count
                elements += sum(int(np.prod(t.dims)) for t in found) + inner.elements
    return SubgraphWeights(tensors, elements, tuple(dict.fromkeys(owners)))


def name_nodes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed or duplicate-named main-graph node a unique name.

    onnxruntime's quantizers select and exclude nodes by name; exporters often leave names
    empty, and excluding "" would silently exclude every unnamed node.
    """
    seen: set[str] = set()
    for index, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
            while node.name in seen:
                node.name += "_"
        seen.add(node.name)
    return proto


def constants_to_initializers(proto: onnx.ModelProto) -> int:
    """Turn main-graph Constant nodes holding a tensor into initializers; returns how many."""
    kept: list[onnx.NodeProto] = []
    moved = 0
    for node in proto.graph.node:
        value = _constant_tensor(node)
        if value is None:
            kept.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        proto.graph.initializer.append(tensor)
        moved += 1
    if moved:
        del proto.graph.node[:]
        proto.graph.node.extend(kept)
    return moved


def flush_subnormals(proto: onnx.ModelProto) -> int:
    """Set float32 weights below the normal range to zero; returns how many were changed.

    Subnormal floats take a slow path in x86 arithmetic: an L2-regularised MLP whose unused
    inputs decayed to 1e-40 ran several times slower than the same model with zeros there.
    """
    flushed = 0
    tiny = np.finfo(np.float32).tiny
    for init in proto.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        value = numpy_helper.to_array(init)
        mask = (value != 0) & (np.abs(value) < tiny)
        count = int(mask.sum())
        if count:
            init.CopyFrom(
                numpy_helper.from_array(np.where(mask, 0, value).astype(np.float32), init.name)
            )
            flushed += count
    return flushed


def count_subnormals(proto: onnx.ModelProto) -> int:
    """How many float32 weights sit below the normal range (and slow x86 arithmetic down)."""
    tiny = np.finfo(np.float32).tiny
    total = 0
    for init in proto.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            value = numpy_helper.to_array(init)
            total += int(((value != 0) & (np.abs(value) < tiny)).sum())
    return total


def upgrade_opset(proto: onnx.ModelProto, minimum: int) -> onnx.ModelProto:
    """Convert the graph to at least `minimum` of the default opset (unchanged if already)."""
    current = default_opset(proto)
    if current >= minimum:
        return proto
    try:
        upgraded = version_converter.convert_version(proto, minimum)
    # The converter raises bare RuntimeErrors and ValueErrors from C++ adapters.
    except Exception as exc:
        raise UnsupportedModelError(
            f"cannot upgrade the model from opset {current} to {minimum}: {exc}"
        ) from exc
    log.info("opset_upgraded", src=current, dst=minimum)
    return upgraded


def gemm_to_matmul(proto: onnx.ModelProto) -> int:
    """Rewrite Gemm nodes with a constant weight as MatMul (+ Add); returns how many.

    onnxruntime's dynamic and 4-bit weight quantizers only know MatMul, so a model exported
    with Gemm (as torch and the demo model are) would come out unchanged.
    """
    index = GraphIndex(proto.graph)
    rewritten: list[onnx.NodeProto] = []
    count = 0
    for node in proto.graph.node:
        if node.op_type != "Gemm":
            rewritten.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = index.weight(node.input[1])
        plain = attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0
        shared = len(index.consumers[node.input[1]]) > 1  # transposing it would break the others
        if weight is None or not plain or shared or weight.ndim != 2:
            rewritten.append(node)
            continue
        beta = attrs.get("beta", 1.0)
        has_bias = len(node.input) > 2 and bool(node.input[2])
        bias = index.weight(node.input[2]) if has_bias else None
        if has_bias and beta != 1.0 and bias is None:
            rewritten.append(node)  # a scaled runtime bias: leave the node alone
            continue
        if attrs.get("transB", 0):
            index.set_weight(node.input[1], np.ascontiguousarray(weight.T))
        if bias is not None and beta != 1.0:
            index.set_weight(node.input[2], (bias * beta).astype(bias.dtype))
        if has_bias:
            product = f"{node.output[0]}__matmul"
            matmul = helper.make_node("MatMul", node.input[:2], [product], name=f"{product}_node")
            add = helper.make_node("Add", [product, node.input[2]], node.output, name=node.name)
            rewritten += [matmul, add]
        else:
            rewritten.append(
                helper.make_node("MatMul", node.input[:2], node.output, name=node.name)
            )
        count += 1
    if count:
        del proto.graph.node[:]
        proto.graph.node.extend(rewritten)
    return count


def flatten_gemm_biases(proto: onnx.ModelProto) -> int:
    """Store [1, N] Gemm biases as [N] (same broadcast); returns how many were changed.

    skl2onnx writes [1, N] intercepts, which onnxruntime's optimizer folds into Gemm;
    quantize_static's per-channel bias adjustment then fails on the 2-D bias.
    """
    index = GraphIndex(proto.graph)
    changed = 0
    for node in proto.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or not node.input[2]:
            continue
        bias = index.weight(node.input[2])
        if bias is None or bias.ndim != 2 or bias.shape[0] != 1:
            continue
        if len(index.consumers[node.input[2]]) > 1:
            continue
        index.set_weight(node.input[2], bias.reshape(-1))
        changed += 1
    return changed


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            tensor: onnx.TensorProto = attr.t
            return tensor
    return None


def _float_constants(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    found = list(graph.initializer)
    for node in graph.node:
        value = _constant_tensor(node)
        if value is not None:
            found.append(value)
    return found
