"""A model whose run time the request sets: y = x + steps, computed by a Loop of `steps`
additions (about a microsecond each), so a test can keep a worker busy on purpose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests import onnx_models


def busy_model(path: Path) -> Path:
    """x FP32 [-1, 1] and steps INT64 [-1, 1] -> y FP32 [-1, 1] after max(steps) loops."""
    body = onnx_models.counting_loop_body()
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
    return onnx_models.save_graph(graph, path)


def busy_request(steps: int, request_id: str) -> dict[str, object]:
    """An Open Inference Protocol request keeping the busy model running `steps` loops."""
    return {
        "id": request_id,
        "inputs": [
            {"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [0.0]},
            {"name": "steps", "shape": [1, 1], "datatype": "INT64", "data": [steps]},
        ],
    }
