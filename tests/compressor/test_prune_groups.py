"""Structured pruning through residual Adds, Splits and Concats, by channel dependency group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressor.data import load_dataset
from compressor.evaluate import score
from compressor.model import load_model
from compressor.prune.groups import trace
from compressor.prune.structured import prune_structured


def _widths(path: Path) -> dict[str, int]:
    graph = onnx.load_model(path).graph
    inits = {i.name: i for i in graph.initializer}
    return {n.name: int(inits[n.input[1]].dims[0]) for n in graph.node if n.op_type == "Conv"}


def test_groups_follow_add_split_and_concat(residual_cnn: Path) -> None:
    """The Add ties the stem to the block's last conv; the Split cuts its conv in two halves."""
    graph = trace(onnx.load_model(residual_cnn))
    groups = sorted(
        sorted((graph.atoms[a].owner, graph.atoms[a].start, graph.atoms[a].width) for a in g)
        for g in graph.groups()
    )
    assert [("res2", 0, 16), ("stem", 0, 16)] in groups
    assert [("c2f", 0, 16)] in groups and [("c2f", 16, 16)] in groups
    assert [("inner", 0, 16)] in groups and [("mix", 0, 32)] in groups
    assert [("res1", 0, 16)] in groups


def test_pruned_residual_net_runs_smaller_and_close(
    tmp_path: Path, residual_cnn: Path, residual_calib: Path, residual_eval: Path
) -> None:
    """Half the channels go from every group; tied convs shrink alike and the net still works."""
    model = load_model(residual_cnn)
    calib = load_dataset(residual_calib, model.signature)
    refit = prune_structured(model, tmp_path / "refit.onnx", 0.5, calib)
    plain = prune_structured(model, tmp_path / "plain.onnx", 0.5, calib, correct=False)
    widths = _widths(refit.path)
    assert widths["stem"] == widths["res2"] == 8
    assert widths["c2f"] == 16 and widths["mix"] == 16
    assert refit.sparsity > 0.5
    split = next(n for n in onnx.load_model(refit.path).graph.node if n.op_type == "Split")
    sizes = next(
        numpy_helper.to_array(i)
        for i in onnx.load_model(refit.path).graph.initializer
        if i.name == split.input[1]
    )
    assert sizes.tolist() == [8, 8]
    assert load_model(refit.path).signature == model.signature
    scores = score(
        residual_cnn,
        {"refit": refit.path, "plain": plain.path},
        load_dataset(residual_eval, model.signature),
        1,
    )
    # The refit recovers most of what removing half the channels costs.
    assert scores["refit"].fidelity.cosine > 0.97
    assert scores["refit"].fidelity.cosine > scores["plain"].fidelity.cosine + 0.1


def _reshape_net() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w")
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["output"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "reshape",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 1, 4, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [-1, 64])],
        [w, shape],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_channels_that_are_reshaped_are_not_pruned() -> None:
    """A conv whose channels pass into a Reshape forms no group, and the reason is given."""
    graph = trace(_reshape_net())
    assert graph.groups() == []
    assert "Reshape" in graph.refusals["reshape"]
