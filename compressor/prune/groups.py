"""Channel dependency groups of a conv net: the channels that must be removed together.

A residual Add ties the channels of its two inputs, a Concat lays several producers'
channels side by side, a Split cuts one producer's channels into parts read by different
layers. Following every tensor's channel layout through the graph (what Torch-Pruning's
dependency graph does for PyTorch, here on ONNX) yields groups: sets of equally wide
channel ranges, each owned by one Conv, whose channel j is one channel of the network.
Removing it means deleting output j of every owner, input j of every layer reading it
(at its position in that layer's input), entry j of every per-channel parameter on the way,
and shrinking the Splits that cut through it.

Layouts are lists of atoms: ranges of one Conv's output channels. An atom is refined
(split in two, with everything it is tied to) where a Split cuts through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compressor.graph import GraphIndex
from compressor.prune.units import BINARY, GLOBAL_POOLS, POOLS, UNARY

# Ops that keep every channel where it is (spatial or elementwise work only).
CHANNEL_WISE = UNARY | POOLS | GLOBAL_POOLS | {"Resize", "Upsample", "Pad"}


@dataclass
class Atom:
    """A range of one Conv's output channels; refined atoms have children instead."""

    owner: str  # the producing Conv node's name
    start: int
    width: int
    children: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Reader:
    """A weighted layer reading a laid-out tensor: its weight is cut along `axis`."""

    node: str
    weight: str
    axis: int
    layout: tuple[int, ...]


@dataclass(frozen=True)
class ParamCut:
    """A per-channel constant applied to a laid-out tensor, cut along `axis`."""

    name: str
    axis: int
    layout: tuple[int, ...]


@dataclass(frozen=True)
class SplitCut:
    """A Split along channels whose part sizes follow its outputs' layouts."""

    node: str
    layouts: tuple[tuple[int, ...], ...]


@dataclass
class ChannelGraph:
    """Every atom, how they are tied, and what must be cut when channels go."""

    atoms: list[Atom] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    frozen: set[int] = field(default_factory=set)  # union-find roots that may not shrink
    readers: list[Reader] = field(default_factory=list)
    params: list[ParamCut] = field(default_factory=list)
    splits: list[SplitCut] = field(default_factory=list)
    refusals: dict[str, str] = field(default_factory=dict)
    owners: dict[str, int] = field(default_factory=dict)  # Conv name -> its root atom

    def new_atom(self, owner: str, start: int, width: int) -> int:
        self.atoms.append(Atom(owner, start, width))
        self.parent.append(len(self.atoms) - 1)
        return len(self.atoms) - 1

    def find(self, atom: int) -> int:
        while self.parent[atom] != atom:
            self.parent[atom] = self.parent[self.parent[atom]]
            atom = self.parent[atom]
        return atom

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.frozen:
                self.frozen.discard(rb)
                self.frozen.add(ra)

    def leaves(self, atom: int) -> list[int]:
        node = self.atoms[atom]
        if not node.children:
            return [atom]
        return [leaf for child in node.children for leaf in self.leaves(child)]

    def expand(self, layout: tuple[int, ...]) -> list[int]:
        return [leaf for atom in layout for leaf in self.leaves(atom)]

    def freeze(self, layout: tuple[int, ...], why: str, where: str) -> None:
        for leaf in self.expand(layout):
            self.frozen.add(self.find(leaf))
        self.refusals.setdefault(where, why)

    def is_frozen(self, leaf: int) -> bool:
        return self.find(leaf) in self.frozen

    def members(self, leaf: int) -> list[int]:
        root = self.find(leaf)
        return [
            a for a in range(len(self.atoms)) if not self.atoms[a].children and self.find(a) == root
        ]

    def refine(self, leaf: int, offset: int) -> None:
        """Split `leaf` (and every atom tied to it) into [0, offset) and [offset, width)."""
        heads: list[int] = []
        tails: list[int] = []
        frozen = self.is_frozen(leaf)
        for member in self.members(leaf):
            atom = self.atoms[member]
            head = self.new_atom(atom.owner, atom.start, offset)
            tail = self.new_atom(atom.owner, atom.start + offset, atom.width - offset)
            atom.children = [head, tail]
            heads.append(head)
            tails.append(tail)
        for group in (heads, tails):
            for other in group[1:]:
                self.union(group[0], other)
            if frozen:
                self.frozen.add(self.find(group[0]))

    def groups(self) -> list[list[int]]:
        """The prunable groups: lists of tied leaf atoms, none frozen."""
        by_root: dict[int, list[int]] = {}
        for atom in range(len(self.atoms)):
            if not self.atoms[atom].children:
                by_root.setdefault(self.find(atom), []).append(atom)
        return [
            members
            for root, members in by_root.items()
            if root not in self.frozen and self.atoms[members[0]].width > 1
        ]


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def trace(proto: onnx.ModelProto) -> ChannelGraph:
    """Follow the channel layout of every tensor from the Convs that make it."""
    index = GraphIndex(proto.graph)
    graph = ChannelGraph()
    layouts: dict[str, tuple[int, ...]] = {}
    handlers: dict[
        str, Callable[[onnx.NodeProto, GraphIndex, ChannelGraph, dict[str, tuple[int, ...]]], None]
    ] = {
        "Conv": _conv,
        "Concat": _concat,
        "Split": _split,
        "BatchNormalization": _batchnorm,
        "Flatten": _flatten,
        "Gemm": _dense,
        "MatMul": _dense,
    }
    for node in proto.graph.node:
        laid = [name for name in node.input if name in layouts]
        handler = handlers.get(node.op_type)
        if handler is not None:
            handler(node, index, graph, layouts)
        elif node.op_type in BINARY or node.op_type == "PRelu":
            _binary(node, index, graph, layouts)
        elif node.op_type in CHANNEL_WISE and laid == [node.input[0]]:
            if _keeps_channels(node, index):
                layouts[node.output[0]] = layouts[node.input[0]]
            else:
                graph.freeze(layouts[node.input[0]], f"{node.op_type} resizes channels", node.name)
        else:
            for name in laid:
                graph.freeze(
                    layouts[name],
                    f"channels pass through {node.op_type}, which mixes them",
                    node.name,
                )
    for out in proto.graph.output:
        if out.name in layouts:
            graph.freeze(layouts[out.name], "a graph output", out.name)
    return graph


def _width(graph: ChannelGraph, layout: tuple[int, ...]) -> int:
    return sum(graph.atoms[a].width for a in graph.expand(layout))


def _conv(
    node: onnx.NodeProto,
    index: GraphIndex,
    graph: ChannelGraph,
    layouts: dict[str, tuple[int, ...]],
) -> None:
    weight = index.initializers.get(node.input[1]) if len(node.input) > 1 else None
    source = layouts.get(node.input[0])
    if weight is None or len(index.consumers.get(node.input[1], [])) > 1:
        if source is not None:
            graph.freeze(source, "read by a Conv without a private constant weight", node.name)
        return
    if _attrs(node).get("group", 1) != 1:
        why = "grouped or depthwise convolution: channels are tied to groups"
        if source is not None:
            graph.freeze(source, why, node.name)
        graph.refusals.setdefault(node.name, why)
        return
    if source is not None:
        graph.readers.append(Reader(node.name, node.input[1], 1, source))
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and (bias not in index.initializers or len(index.consumers[bias]) > 1):
        return  # an odd bias: the output channels are not ours to cut
    atom = graph.new_atom(node.name, 0, int(weight.dims[0]))
    graph.owners[node.name] = atom
    layouts[node.output[0]] = (atom,)


def _batchnorm(
    node: onnx.NodeProto,
    index: GraphIndex,
    graph: ChannelGraph,
    layouts: dict[str, tuple[int, ...]],
) -> None:
    source = layouts.get(node.input[0])
    if source is None:
        return
    params = list(node.input[1:5])
    if any(p not in index.initializers or len(index.consumers[p]) > 1 for p in params):
        graph.freeze(source, "BatchNormalization parameters are not private constants", node.name)
        return
    graph.params.extend(ParamCut(p, 0, source) for p in params)
    layouts[node.output[0]] = source


def _binary(
    node: onnx.NodeProto,
    index: GraphIndex,
    graph: ChannelGraph,
    layouts: dict[str, tuple[int, ...]],
) -> None:
    laid = [n for n in node.input if n in layouts]
    if not laid:
        return
    others = [n for n in node.input if n not in layouts]
    if len(laid) == 2:
        first, second = (layouts[n] for n in laid)
        a, b = graph.expand(first), graph.expand(second)
        if [graph.atoms[x].width for x in a] != [graph.atoms[x].width for x in b]:
            graph.freeze(first, f"{node.op_type} of two differently laid-out tensors", node.name)
            graph.freeze(second, f"{node.op_type} of two differently laid-out tensors", node.name)
            return
        for x, y in zip(a, b, strict=True):
            graph.union(x, y)  # a residual connection: channel j of both is one channel
        layouts[node.output[0]] = first
        return
    source = layouts[laid[0]]
    constant = index.weight(others[0]) if len(others) == 1 else None
    if constant is None:
        graph.freeze(
            source,
            f"{node.op_type} combines it with a computed tensor no Conv makes (e.g. a "
            "residual connection from the input)",
            node.name,
        )
        return
    if constant.size != 1:
        width = _width(graph, source)
        if (
            constant.ndim < 3
            or constant.shape[-3] != width
            or constant.size != width
            or len(index.consumers[others[0]]) > 1
        ):
            graph.freeze(source, f"{node.op_type} constant is not per channel", node.name)
            return
        graph.params.append(ParamCut(others[0], constant.ndim - 3, source))
    layouts[node.output[0]] = source


def _concat(
    node: onnx.NodeProto,
    index: GraphIndex,
    graph: ChannelGraph,
    layouts: dict[str, tuple[int, ...]],
) -> None:
    parts = [layouts.get(n) for n in node.input]
    axis = _attrs(node).get("axis", 1)
    if axis != 1 or any(p is None for p in parts):
        for p in parts:
            if p is not None:
                graph.freeze(p, "Concat along another axis or with an unknown input", node.name)
        return
    layouts[node.output[0]] = tuple(a for p in parts if p is not None for a in p)


def _split(
    node: onnx.NodeProto,
    index: GraphIndex,
    graph: ChannelGraph,
    layouts: dict[str, tuple[int, ...]],
) -> None:
    source = layouts.get(node.input[0])
    if source is None:
        return
    sizes = _split_sizes(node, index, _width(graph, source))
    if _attrs(node).get("axis", 0) != 1 or sizes is None:
        graph.freeze(source, "Split along another axis or of unknown sizes", node.name)
        return
    bounds = np.cumsum(sizes)[:-1].tolist()
    for bound in bounds:
        position = 0
        for leaf in graph.expand(source):
            width = graph.atoms[leaf].width
            if position < bound < position + width:
                graph.refine(leaf, bound - position)
                break
            position += width
    leaves = graph.expand(source)
    outputs: list[tuple[int, ...]] = []
    position, cursor = 0, 0
    for size in sizes:
        part: list[int] = []
        while cursor < len(leaves) and position < sum(sizes[: len(outputs) + 1]):
            part.append(leaves[cursor])
            position += graph.atoms[leaves[cursor]].width
            cursor += 1
        outputs.append(tuple(part))
        del size
    for name, layout in zip(node.output, outputs, strict=True):
        layouts[name] = layout
    graph.splits.append(SplitCut(node.name, tuple(outputs)))


def _split_sizes(node: onnx.NodeProto, index: GraphIndex, width: int) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        value = index.weight(node.input[1])
        return None if value is None else [int(v) for v in value.reshape(-1)]
    attrs = _attrs(node)
    if "split" in attrs:
        return [int(v) for v in attrs["split"]]  # type: ignore[attr-defined]  # ints attribute
    parts = len(node.output)
    if width % parts:
        return None
    return [width // parts] * parts


def _flatten(
    node: onnx.NodeProto,
    index: GraphIndex,
    graph: ChannelGraph,
    layouts: dict[str, tuple[int, ...]],
) -> None:
    source = layouts.get(node.input[0])
    if source is None:
        return
    producer = index.producer.get(node.input[0])
    # Only after a global pool does channel j become exactly feature j.
    if producer is None or producer.op_type not in GLOBAL_POOLS or _attrs(node).get("axis", 1) != 1:
        graph.freeze(
            source,
            "channels pass through Flatten, which mixes or reshapes them (no global pool)",
            node.name,
        )
        return
    layouts[node.output[0]] = source


def _dense(
    node: onnx.NodeProto,
    index: GraphIndex,
    graph: ChannelGraph,
    layouts: dict[str, tuple[int, ...]],
) -> None:
    source = layouts.get(node.input[0])
    if source is None:
        return
    weight = index.initializers.get(node.input[1]) if len(node.input) > 1 else None
    attrs = _attrs(node)
    if weight is None or len(weight.dims) != 2 or attrs.get("transA", 0):
        graph.freeze(source, f"read by a {node.op_type} without a plain constant weight", node.name)
        return
    axis = 1 if node.op_type == "Gemm" and attrs.get("transB", 0) else 0
    graph.readers.append(Reader(node.name, node.input[1], axis, source))


def _keeps_channels(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """Resize/Upsample/Pad must leave the channel axis alone."""
    if node.op_type in ("Resize", "Upsample"):
        scales = next(
            (index.weight(n) for n in node.input[1:] if n and index.weight(n) is not None), None
        )
        if scales is None or scales.size < 2:
            return False
        return bool(scales.size == 0 or (scales.reshape(-1)[:2] == [1, 1]).all())
    if node.op_type == "Pad":
        pads = index.weight(node.input[1]) if len(node.input) > 1 else None
        if pads is None:
            pads_attr = _attrs(node).get("pads")
            pads = None if pads_attr is None else np.asarray(pads_attr)
        if pads is None or pads.size != 8:
            return False
        return bool(pads[1] == 0 and pads[5] == 0)
    return True


def kept_positions(
    graph: ChannelGraph, layout: tuple[int, ...], kept: dict[int, np.ndarray]
) -> np.ndarray:
    """Indices into a laid-out tensor's channels that survive, given each leaf's kept ones."""
    parts: list[np.ndarray] = []
    offset = 0
    for leaf in graph.expand(layout):
        width = graph.atoms[leaf].width
        parts.append(offset + kept.get(leaf, np.arange(width)))
        offset += width
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def owner_positions(graph: ChannelGraph, owner: str, kept: dict[int, np.ndarray]) -> np.ndarray:
    """The output channels of a Conv that survive."""
    root = graph.owners[owner]
    return kept_positions(graph, (root,), kept)


def apply_cuts(proto: onnx.ModelProto, graph: ChannelGraph, kept: dict[int, np.ndarray]) -> None:
    """Slice every weight, parameter and Split the kept channels touch."""
    index = GraphIndex(proto.graph)
    nodes = {n.name: n for n in proto.graph.node}

    def cut(name: str, axis: int, keep: np.ndarray) -> None:
        value = index.weight(name)
        assert value is not None
        if value.shape[axis] != len(keep):
            index.set_weight(name, np.ascontiguousarray(np.take(value, keep, axis=axis)))

    for owner in graph.owners:
        node = nodes[owner]
        keep = owner_positions(graph, owner, kept)
        cut(node.input[1], 0, keep)
        if len(node.input) > 2 and node.input[2]:
            cut(node.input[2], 0, keep)
    for reader in graph.readers:
        cut(reader.weight, reader.axis, kept_positions(graph, reader.layout, kept))
    for param in graph.params:
        cut(param.name, param.axis, kept_positions(graph, param.layout, kept))
    for split in graph.splits:
        sizes = [len(kept_positions(graph, layout, kept)) for layout in split.layouts]
        _set_split_sizes(proto, nodes[split.node], sizes)


def _set_split_sizes(proto: onnx.ModelProto, node: onnx.NodeProto, sizes: list[int]) -> None:
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    if opset < 13:
        for attribute in node.attribute:
            if attribute.name == "split":
                node.attribute.remove(attribute)
                break
        node.attribute.append(helper.make_attribute("split", sizes))
        return
    name = f"{node.name}.split_sizes"
    value = numpy_helper.from_array(np.asarray(sizes, dtype=np.int64), name)
    existing = [i for i in proto.graph.initializer if i.name == name]
    if existing:
        existing[0].CopyFrom(value)
    else:
        proto.graph.initializer.append(value)
    if len(node.input) > 1:
        node.input[1] = name
    else:
        node.input.append(name)
    for attribute in list(node.attribute):
        if attribute.name == "num_outputs":
            node.attribute.remove(attribute)
