"""Finding the neurons and channels a graph lets us remove, and saying why where it does not.

A prunable unit is a producer layer (MatMul, Gemm or Conv with constant weights) whose
output channels flow through channel-wise nodes only (bias, BatchNormalization,
activations, pooling) into exactly one consumer layer that reads them as its weighted input.
Removing channel j then means deleting row j of the producer, entry j of every per-channel
parameter on the way, and input j of the consumer: a smaller graph computing the same
thing minus that channel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import onnx
from onnx import helper

from compressor.graph import GraphIndex

# Elementwise nodes that treat every channel alike and need no parameter slicing.
UNARY = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "Elu",
        "Selu",
        "Softplus",
        "HardSigmoid",
        "HardSwish",
        "Gelu",
        "Erf",
        "Identity",
        "Dropout",
        "Clip",
        "PRelu",
    }
)
# Nodes whose second operand may be a per-channel (or scalar) constant.
BINARY = frozenset({"Add", "Sub", "Mul", "Div"})
# Channel-preserving pooling; the Global ones leave a 1x1 spatial map.
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool"})


class Layout(Enum):
    """Where the channel axis sits in the producer's output."""

    FEATURES = "features"  # [rows, H] from MatMul/Gemm: the last axis
    CHANNELS = "channels"  # [rows, C, H, W] from Conv: axis 1


@dataclass
class Slice:
    """One initializer to cut down to the kept channels along `axis`."""

    name: str
    axis: int


@dataclass
class Unit:
    """A producer -> channel-wise chain -> consumer path whose channels can be removed."""

    producer: onnx.NodeProto
    consumer: onnx.NodeProto
    width: int
    layout: Layout
    # The tensor the consumer reads (its data input) and writes.
    consumer_input: str
    consumer_output: str
    producer_slices: list[Slice] = field(default_factory=list)
    chain_slices: list[Slice] = field(default_factory=list)
    consumer_slice: Slice | None = None
    # An Add right after a MatMul consumer holding its bias, refitted by the correction.
    consumer_bias: str | None = None
    consumer_bias_output: str | None = None

    @property
    def name(self) -> str:
        """A readable name: the producer node's."""
        return self.producer.name or self.producer.output[0]


@dataclass(frozen=True)
class Refusal:
    """A layer that cannot be pruned, and why."""

    layer: str
    reason: str


def find_units(proto: onnx.ModelProto) -> tuple[list[Unit], list[Refusal]]:
    """Every prunable unit in the main graph, and a refusal for every weighted layer left."""
    index = GraphIndex(proto.graph)
    units: list[Unit] = []
    refusals: list[Refusal] = []
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        if node.input[1] not in index.initializers:
            continue
        result = _unit_from(node, index)
        if isinstance(result, Unit):
            units.append(result)
        else:
            refusals.append(Refusal(node.name or node.output[0], result))
    return units, refusals


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@dataclass
class _Walk:
    """The state of following a producer's channels towards their consumer."""

    producer: onnx.NodeProto
    layout: Layout
    width: int
    producer_slices: list[Slice]
    chain_slices: list[Slice] = field(default_factory=list)
    spatial_gone: bool = False


def _unit_from(node: onnx.NodeProto, index: GraphIndex) -> Unit | str:
    if _shared(node.input[1], index):
        return "its weight is shared with another node"
    start = {"Conv": _conv_producer, "Gemm": _gemm_producer, "MatMul": _matmul_producer}
    walk = start[node.op_type](node, index)
    if isinstance(walk, str):
        return walk
    tensor = node.output[0]
    while True:
        reader = _single_reader(tensor, index)
        if isinstance(reader, str):
            return reader
        if reader.op_type in ("MatMul", "Gemm", "Conv") and reader.input[0] == tensor:
            return _consumer(walk, reader, tensor, index)
        reason = _pass_through(reader, tensor, index, walk)
        if reason is not None:
            return reason
        tensor = reader.output[0]


def _conv_producer(node: onnx.NodeProto, index: GraphIndex) -> _Walk | str:
    if _attrs(node).get("group", 1) != 1:
        return "grouped or depthwise convolution: channels are tied to groups"
    weight = index.initializers[node.input[1]]
    walk = _Walk(node, Layout.CHANNELS, int(weight.dims[0]), [Slice(node.input[1], 0)])
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in index.initializers or _shared(node.input[2], index):
            return "its bias is not a private constant"
        walk.producer_slices.append(Slice(node.input[2], 0))
    return walk


def _gemm_producer(node: onnx.NodeProto, index: GraphIndex) -> _Walk | str:
    attrs = _attrs(node)
    if attrs.get("transA", 0):
        return "Gemm with transA is not supported"
    trans_b = bool(attrs.get("transB", 0))
    dims = index.initializers[node.input[1]].dims
    width = int(dims[0] if trans_b else dims[1])
    walk = _Walk(node, Layout.FEATURES, width, [Slice(node.input[1], 0 if trans_b else 1)])
    if len(node.input) > 2 and node.input[2]:
        bias = index.weight(node.input[2])
        if bias is None or _shared(node.input[2], index):
            return "its bias is not a private constant"
        if bias.ndim >= 1 and bias.shape[-1] == width:
            walk.producer_slices.append(Slice(node.input[2], bias.ndim - 1))
        elif bias.size != 1:
            return f"its bias of shape {list(bias.shape)} is not per-neuron"
    return walk


def _matmul_producer(node: onnx.NodeProto, index: GraphIndex) -> _Walk | str:
    dims = index.initializers[node.input[1]].dims
    if len(dims) != 2:
        return "a MatMul weight that is not a 2-D matrix"
    return _Walk(node, Layout.FEATURES, int(dims[1]), [Slice(node.input[1], 1)])


def _single_reader(tensor: str, index: GraphIndex) -> onnx.NodeProto | str:
    if tensor in index.graph_outputs:
        return "its output (through the channel-wise nodes) is a graph output"
    readers = index.consumers.get(tensor, [])
    if len(readers) != 1:
        kinds = ", ".join(sorted({r.op_type for r in readers})) or "nothing"
        return f"its output feeds {len(readers)} nodes ({kinds}), e.g. a residual branch"
    return readers[0]


def _pass_through(node: onnx.NodeProto, tensor: str, index: GraphIndex, walk: _Walk) -> str | None:
    """Account for one channel-wise node on the way; a reason if it is not channel-wise."""
    op = node.op_type
    if op == "PRelu" or op in BINARY:
        return _constant_operand(node, tensor, index, walk)
    if op in UNARY:
        extra = [n for n in node.input[1:] if n]
        return (
            f"{op} has non-scalar parameters"
            if any(_size(n, index) not in (1, None) for n in extra)
            else None
        )
    handler = _CONV_SIDE.get(op) if walk.layout is Layout.CHANNELS else None
    if handler is None:
        return _mixes(op)
    return handler(node, index, walk)


def _mixes(op: str) -> str:
    return f"channels pass through {op}, which mixes or reshapes them"


def _batchnorm(node: onnx.NodeProto, index: GraphIndex, walk: _Walk) -> str | None:
    params = list(node.input[1:5])
    if any(p not in index.initializers or _shared(p, index) for p in params):
        return "BatchNormalization parameters are not private constants"
    walk.chain_slices += [Slice(p, 0) for p in params]
    return None


def _pool(node: onnx.NodeProto, index: GraphIndex, walk: _Walk) -> str | None:
    if node.op_type in GLOBAL_POOLS:
        walk.spatial_gone = True
    return None


def _flatten(node: onnx.NodeProto, index: GraphIndex, walk: _Walk) -> str | None:
    # Only after a global pool does channel j become exactly feature j.
    if not walk.spatial_gone or _attrs(node).get("axis", 1) != 1:
        return _mixes(node.op_type)
    walk.layout = Layout.FEATURES
    return None


_CONV_SIDE: dict[str, Callable[[onnx.NodeProto, GraphIndex, _Walk], str | None]] = {
    "BatchNormalization": _batchnorm,
    "Flatten": _flatten,
    **{op: _pool for op in POOLS | GLOBAL_POOLS},
}


def _constant_operand(
    node: onnx.NodeProto, tensor: str, index: GraphIndex, walk: _Walk
) -> str | None:
    others = [n for n in node.input if n != tensor]
    if len(others) != 1 or others[0] not in index.initializers:
        return f"{node.op_type} combines it with a computed tensor (e.g. a residual connection)"
    cut = _per_channel(others[0], index, walk.layout, walk.width)
    if cut is None:
        return f"{node.op_type} constant does not broadcast per channel"
    walk.chain_slices += cut
    return None


def _reader_axis(node: onnx.NodeProto, layout: Layout, ndim: int) -> int | str:
    attrs = _attrs(node)
    if node.op_type == "Conv":
        if layout is not Layout.CHANNELS or attrs.get("group", 1) != 1:
            return "the next Conv is grouped or does not read channels"
        return 1
    if layout is not Layout.FEATURES or attrs.get("transA", 0) or ndim != 2:
        return f"the next {node.op_type} does not read features"
    return 1 if node.op_type == "Gemm" and attrs.get("transB", 0) else 0


def _consumer(walk: _Walk, node: onnx.NodeProto, tensor: str, index: GraphIndex) -> Unit | str:
    if len(node.input) < 2 or node.input[1] not in index.initializers:
        return f"the next {node.op_type} has no constant weight"
    if _shared(node.input[1], index):
        return f"the next {node.op_type}'s weight is shared"
    dims = index.initializers[node.input[1]].dims
    axis = _reader_axis(node, walk.layout, len(dims))
    if isinstance(axis, str):
        return axis
    if dims[axis] != walk.width:
        return f"the next {node.op_type} reads {dims[axis]} inputs, not {walk.width}"
    unit = Unit(
        producer=walk.producer,
        consumer=node,
        width=walk.width,
        layout=walk.layout,
        consumer_input=tensor,
        consumer_output=node.output[0],
        producer_slices=walk.producer_slices,
        chain_slices=walk.chain_slices,
        consumer_slice=Slice(node.input[1], axis),
    )
    if node.op_type == "MatMul":
        _attach_bias(unit, index)
    return unit


def _attach_bias(unit: Unit, index: GraphIndex) -> None:
    """Record the Add holding a MatMul consumer's bias, so the refit can move it too."""
    follower = index.only_consumer(unit.consumer_output)
    if follower is None or follower.op_type != "Add":
        return
    other = [n for n in follower.input if n != unit.consumer_output]
    bias = index.weight(other[0]) if len(other) == 1 else None
    if bias is not None and bias.ndim == 1 and not _shared(other[0], index):
        unit.consumer_bias = other[0]
        unit.consumer_bias_output = follower.output[0]


def _per_channel(name: str, index: GraphIndex, layout: Layout, width: int) -> list[Slice] | None:
    value = index.weight(name)
    if value is None:
        return None
    if value.size == 1:
        return []
    if _shared(name, index):
        return None
    # Align the constant's shape to the output's rank from the right (numpy broadcasting).
    axis_from_end = 1 if layout is Layout.FEATURES else 3
    if value.ndim < axis_from_end or value.shape[value.ndim - axis_from_end] != width:
        return None
    if value.size != width:
        return None
    return [Slice(name, value.ndim - axis_from_end)]


def _shared(name: str, index: GraphIndex) -> bool:
    return len(index.consumers.get(name, [])) > 1


def _size(name: str, index: GraphIndex) -> int | None:
    value = index.weight(name)
    return None if value is None else int(np.size(value))
