"""A model whose run time the request sets: y = x + steps, computed by a Loop of `steps`
additions (about a microsecond each), so a test can keep a worker busy on purpose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests import onnx_models


def busy_model(path: Path) -> Path:
    """x FP32 [-1, 1] and steps INT64 [-1, 1] -> y FP32 [-1, 1] after max(steps) loops."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["n", 1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["n", 1]),
        ],
        [numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["steps"], ["m"], keepdims=0),
            helper.make_node("Loop", ["m", "true", "x"], ["y"], body=body),
        ],
        "busy",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1]),
            helper.make_tensor_value_info("steps", TensorProto.INT64, ["n", 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        [numpy_helper.from_array(np.array(True), "true")],
    )
    model = helper.make_model(graph, opset_imports=onnx_models.OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def busy_request(steps: int, request_id: str) -> dict[str, object]:
    """An Open Inference Protocol request keeping the busy model running `steps` loops."""
    return {
        "id": request_id,
        "inputs": [
            {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [0.0]},
            {"name": "steps", "shape": [1, 1], "datatype": "INT64", "data": [steps]},
        ],
    }
