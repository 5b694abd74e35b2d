"""Small ONNX models built with onnx.helper for the tests: each exercises one behaviour."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
DEMO_MODEL = REPO / "models" / "digits"
OPSET = [helper.make_opsetid("", 17)]


def save_graph(graph: onnx.GraphProto, path: Path) -> Path:
    """`graph` as a checked opset-17 model at `path`."""
    model = helper.make_model(graph, opset_imports=OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def counting_loop_body() -> onnx.GraphProto:
    """A Loop body adding 1 to FP32 [n, 1] each trip (about a microsecond): a model whose
    run time a trip count sets."""
    return helper.make_graph(
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


def scale_model(path: Path, factor: float = 2.0, width: int = 4) -> Path:
    """y = x * factor + 1 on FP32 [-1, width]: trivially checkable outputs."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "factor"], ["scaled"]),
            helper.make_node("Add", ["scaled", "one"], ["y"]),
        ],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        [
            numpy_helper.from_array(np.array(factor, dtype=np.float32), "factor"),
            numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        ],
    )
    return save_graph(graph, path)


def picky_model(path: Path) -> Path:
    """x FP32 [-1, -1] times a 4x3 matrix: any width but 4 makes onnxruntime raise."""
    weights = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "picky",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "k"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(weights, "w")],
    )
    return save_graph(graph, path)


def two_input_model(path: Path) -> Path:
    """a INT64 [-1, 2] and b FP32 [-1, 2] -> total FP32 [-1, 2] and flag BOOL [-1, 2]."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["a"], ["a_float"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["a_float", "b"], ["total"]),
            helper.make_node("Greater", ["total", "zero"], ["flag"]),
        ],
        "two_input",
        [
            helper.make_tensor_value_info("a", TensorProto.INT64, ["n", 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 2]),
        ],
        [
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["n", 2]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, ["n", 2]),
        ],
        [numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")],
    )
    return save_graph(graph, path)


def slow_model(path: Path, width: int = 512, layers: int = 200) -> Path:
    """A chain of square MatMuls: slow enough per row to fill a queue on purpose."""
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, previous = [], "x"
    for layer in range(layers):
        nodes.append(helper.make_node("MatMul", [previous, "w"], [f"h{layer}"]))
        previous = f"h{layer}"
    nodes.append(helper.make_node("Identity", [previous], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        [numpy_helper.from_array(weights, "w")],
    )
    return save_graph(graph, path)


def rows_for_seconds(path: Path, seconds: float) -> int:
    """How many rows make one run of `path` (a slow_model) take about `seconds` on 1 thread."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    width = session.get_inputs()[0].shape[1]
    probe = np.ones((64, width), dtype=np.float32)
    session.run(None, {"x": probe})
    # The fastest of a few runs: other work on the machine only makes the real run longer.
    fastest = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        session.run(None, {"x": probe})
        fastest = min(fastest, time.perf_counter() - start)
    return max(64, int(seconds / (fastest / 64)))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ladder_folder(
    folder: Path,
    variants: list[tuple[str, Path]],
    *,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    hashes: bool = True,
    **extra: Any,
) -> Path:
    """A model folder whose manifest lists `variants` (name, built file) richest first."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, source in variants:
        target = folder / f"{name}.onnx"
        if source != target:
            shutil.copyfile(source, target)
        entry: dict[str, Any] = {
            "name": name,
            "file": target.name,
            "size_bytes": target.stat().st_size,
        }
        if hashes:
            entry["sha256"] = sha256(target)
        entries.append(entry)
    manifest = {
        "name": folder.name,
        "format": 1,
        "inputs": inputs,
        "outputs": outputs,
        "variants": entries,
        **extra,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


def copy_demo(models_dir: Path) -> Path:
    """The committed demo model (digits) copied into `models_dir`."""
    return Path(shutil.copytree(DEMO_MODEL, models_dir / "digits"))


def digits_samples(count: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits images (64 pixel values 0..16) and their labels."""
    with np.load(REPO / "tools" / "requests" / "digits.npz") as data:
        return data["input"][:count], data["labels"][:count]


def lookup_model(path: Path) -> Path:
    """y[i] = x[i, idx[i]]: an index out of range makes onnxruntime raise for that row."""
    graph = helper.make_graph(
        [helper.make_node("GatherElements", ["x", "idx"], ["y"], axis=1)],
        "lookup",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["n", 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
    )
    return save_graph(graph, path)


def pooling_model(path: Path) -> Path:
    """Sums over the batch dimension: stacking requests would mix them, so it must not."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        "pooling",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 4])],
        [numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")],
    )
    return save_graph(graph, path)


def cnn_model(
    path: Path,
    channels: tuple[int, ...] = (32, 64, 128, 256, 512),
    classes: int = 1000,
    seed: int = 0,
    size: int = 64,
) -> Path:
    """A small image classifier on FP32 [-1, 3, size, size] (64 by default): 3x3 stride-2
    Conv+Relu layers of `channels`, global average pooling and a dense head to `classes`
    scores.

    The default holds about 8 MB of fp32 weights (a CNN-sized variant); narrower
    `channels` make a lighter rung of the same signature."""
    rng = np.random.default_rng(seed)
    nodes, initializers, previous, width = [], [], "x", 3
    for layer, out in enumerate(channels):
        weight = (rng.standard_normal((out, width, 3, 3)) / np.sqrt(width * 9)).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"w{layer}"),
            numpy_helper.from_array(np.zeros(out, dtype=np.float32), f"b{layer}"),
        ]
        nodes += [
            helper.make_node(
                "Conv",
                [previous, f"w{layer}", f"b{layer}"],
                [f"c{layer}"],
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
            ),
            helper.make_node("Relu", [f"c{layer}"], [f"r{layer}"]),
        ]
        previous, width = f"r{layer}", out
    head = (rng.standard_normal((width, classes)) / np.sqrt(width)).astype(np.float32)
    initializers += [
        numpy_helper.from_array(head, "head"),
        numpy_helper.from_array(np.zeros(classes, dtype=np.float32), "head_bias"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [previous], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "head", "head_bias"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, size, size])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", classes])],
        initializers,
    )
    return save_graph(graph, path)


CNN_SIGNATURE: dict[str, Any] = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3, 64, 64]}],
    "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 1000]}],
}


def wide_model(path: Path, hidden: int, width: int = 256, seed: int = 0) -> Path:
    """x FP32 [-1, width] -> MatMul to `hidden` -> Relu -> MatMul back: 8 * width * hidden
    bytes of fp32 weights, so that `hidden` sets how much memory the variant holds."""
    rng = np.random.default_rng(seed)
    # Uniform float32 draws: a hundred MB of weights is built in a fraction of a second.
    down = (rng.random((width, hidden), dtype=np.float32) - 0.5) / np.float32(np.sqrt(width))
    up = (rng.random((hidden, width), dtype=np.float32) - 0.5) / np.float32(np.sqrt(hidden))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "down"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "up"], ["y"]),
        ],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
        [numpy_helper.from_array(down, "down"), numpy_helper.from_array(up, "up")],
    )
    return save_graph(graph, path)


def rowwise_model(path: Path, width: int = 262144, ops: int = 4) -> Path:
    """y = sin(sin(...sin(x))), `ops` times, on FP32 [-1, width]: all of its cost is per
    element, none per run, so stacking requests cannot make a row cheaper."""
    names = ["x", *(f"s{i}" for i in range(ops - 1)), "y"]
    graph = helper.make_graph(
        [helper.make_node("Sin", [a], [b]) for a, b in itertools.pairwise(names)],
        "rowwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])],
    )
    return save_graph(graph, path)
