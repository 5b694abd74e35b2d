"""Graph rewrites that must not change what a model computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from compressor.data import load_dataset
from compressor.graph import (
    constants_to_initializers,
    count_subnormals,
    flush_subnormals,
    gemm_to_matmul,
    name_nodes,
    op_counts,
    subgraph_weights,
)
from compressor.model import load_model
from compressor.session import open_session, run_dataset


def _outputs(proto: onnx.ModelProto, data_path: Path, signature_from: Path) -> np.ndarray:
    data = load_dataset(data_path, load_model(signature_from).signature)
    return next(iter(run_dataset(open_session(proto.SerializeToString(), 1), data).values()))


def test_gemm_to_matmul_keeps_outputs(digits_gemm: Path, digits_eval: Path) -> None:
    """Rewriting transB Gemm layers as MatMul+Add gives the same probabilities."""
    proto = onnx.load(digits_gemm)
    assert gemm_to_matmul(proto) == 2
    assert op_counts(proto.graph)["Gemm"] == 0
    before = _outputs(onnx.load(digits_gemm), digits_eval, digits_gemm)
    after = _outputs(proto, digits_eval, digits_gemm)
    assert np.allclose(before, after, atol=1e-6)


def test_name_nodes_makes_names_unique(cnn: Path) -> None:
    """Unnamed and duplicate-named nodes all get distinct, non-empty names."""
    proto = onnx.load(cnn)
    proto.graph.node[0].name = "dup"
    proto.graph.node[1].name = "dup"
    name_nodes(proto)
    names = [n.name for n in proto.graph.node]
    assert all(names) and len(set(names)) == len(names)


def test_constants_become_initializers(constant_weights: Path, vector16: Path) -> None:
    """Constant-node weights move to initializers and the outputs stay identical."""
    proto = onnx.load(constant_weights)
    assert constants_to_initializers(proto) == 2
    assert "Constant" not in op_counts(proto.graph)
    assert {i.name for i in proto.graph.initializer} == {"w1", "w2"}
    before = _outputs(onnx.load(constant_weights), vector16, constant_weights)
    assert np.array_equal(before, _outputs(proto, vector16, constant_weights))


def test_subgraph_weights_are_found(if_model: Path, digits_gemm: Path) -> None:
    """Both If branches' weights are counted; a plain MLP has none."""
    inner = subgraph_weights(onnx.load(if_model).graph)
    assert inner.tensors == 2 and inner.elements == 2 * 16 * 4
    assert subgraph_weights(onnx.load(digits_gemm).graph).tensors == 0


def test_flush_subnormals() -> None:
    """Weights below float32's normal range become zero; normal ones are untouched."""
    values = np.array([1e-40, -1e-39, 1e-30, 0.5, 0.0], np.float32)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [5])],
        [numpy_helper.from_array(values, "w")],
    )
    proto = helper.make_model(graph)
    assert count_subnormals(proto) == 2
    assert flush_subnormals(proto) == 2
    flushed = numpy_helper.to_array(proto.graph.initializer[0])
    assert flushed.tolist() == pytest.approx([0.0, 0.0, 1e-30, 0.5, 0.0], abs=0, rel=1e-6)
    assert count_subnormals(proto) == 0
