"""Models whose warm-up takes as long as a test needs, up to forever: y = x + trips, by a
Loop whose trip count is a constant of the graph, so that the agent's warm-up run (on
zeros) makes every trip. 10**12 trips is about eleven days: an endless warm-up."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from tests import onnx_models

ENDLESS = 10**12


def loop_model(path: Path, trips: int) -> Path:
    """x FP32 [-1, 1] -> y FP32 [-1, 1] = x + trips, after `trips` Loop iterations."""
    body = onnx_models.counting_loop_body()
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "true", "x"], ["y"], body=body)],
        "stuck",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        [
            numpy_helper.from_array(np.array(trips, dtype=np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "true"),
        ],
    )
    return onnx_models.save_graph(graph, path)


def trips_for_seconds(scratch: Path, seconds: float) -> int:
    """How many trips make one run take at least about `seconds` here (fastest of three)."""
    probe_trips = 100_000
    path = loop_model(scratch / "probe-loop.onnx", probe_trips)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"x": np.zeros((1, 1), dtype=np.float32)}
    fastest = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        session.run(None, feeds)
        fastest = min(fastest, time.perf_counter() - start)
    path.unlink()
    return max(probe_trips, int(seconds * probe_trips / fastest))
