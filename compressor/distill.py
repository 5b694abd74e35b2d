"""Knowledge distillation: a smaller MLP trained to mimic the teacher, with its signature.

The teacher labels as many inputs as we like, so the student trains on the calibration
inputs plus augmented ones (mixup between rows and small Gaussian noise, kept inside the
observed range). When the teacher ends in Softmax the student learns the logits before it
and gets the Softmax appended, so it still outputs probabilities. A real trainer does the
work: scikit-learn's MLPRegressor, exported with skl2onnx.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import structlog
from onnx import helper
from skl2onnx import to_onnx
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPRegressor

from compressor.activations import collect
from compressor.data import Dataset
from compressor.errors import UnsupportedModelError
from compressor.graph import GraphIndex, flush_subnormals
from compressor.model import OnnxModel, save_model, signature_of_bytes

log = structlog.get_logger(__name__)

MIN_OPSET = 13  # Softmax along one axis, as the teacher's classifiers use it


@dataclass(frozen=True)
class DistillSettings:
    """Student size and training recipe."""

    hidden: tuple[int, ...] = (32,)
    augment: int = 8  # synthetic rows per real row
    noise: float = 0.05  # Gaussian noise, as a fraction of each feature's spread
    max_iter: int = 300
    seed: int = 0


@dataclass(frozen=True)
class _Head:
    """What the student must reproduce: the regressed tensor and how outputs derive from it."""

    output: str  # the teacher's float [rows, classes] output
    target: str  # the tensor the student regresses (the Softmax input, or the output)
    softmax: bool
    labels: str | None  # an integer output equal to the arg-max, if the teacher has one


def distill(model: OnnxModel, out: Path, inputs: Dataset, settings: DistillSettings) -> Path:
    """Train a student MLP on teacher outputs and write it with the teacher's signature."""
    feature_input = _check_input(model)
    head = _head(model, inputs)
    x = _augment(inputs.inputs[feature_input], settings)
    y = collect(model.proto, [head.target], Dataset({feature_input: x}))[head.target]
    log.info("student_training", rows=len(x), hidden=list(settings.hidden), softmax=head.softmax)
    student = MLPRegressor(
        hidden_layer_sizes=settings.hidden,
        max_iter=settings.max_iter,
        random_state=settings.seed,
        early_stopping=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        student.fit(x, y.reshape(len(y), -1))
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.info("student_not_converged", max_iter=settings.max_iter)
    proto = _export(student, model, feature_input, head, y.shape[1])
    signature = signature_of_bytes(proto.SerializeToString(), str(out))
    if signature != model.signature:
        raise UnsupportedModelError(f"{out}: the student's signature differs from the teacher's")
    return save_model(proto, out)


def _check_input(model: OnnxModel) -> str:
    inputs = model.signature.inputs
    if len(inputs) != 1 or inputs[0].datatype != "FP32" or len(inputs[0].shape) != 2:
        shapes = [(t.name, t.datatype, list(t.shape)) for t in inputs]
        raise UnsupportedModelError(
            f"distillation needs one FP32 [rows, features] input (an MLP student); "
            f"the model takes {shapes}"
        )
    if inputs[0].shape[1] == -1:
        raise UnsupportedModelError("distillation needs a fixed number of input features")
    return inputs[0].name


def _head(model: OnnxModel, inputs: Dataset) -> _Head:
    outputs = model.signature.outputs
    floats = [t for t in outputs if t.datatype == "FP32" and len(t.shape) == 2]
    if len(floats) != 1 or floats[0].shape[1] == -1:
        raise UnsupportedModelError(
            "distillation needs exactly one FP32 [rows, classes] output with a fixed width; "
            f"the model has {[(t.name, t.datatype, list(t.shape)) for t in outputs]}"
        )
    main = floats[0].name
    others = [t for t in outputs if t.name != main]
    labels = None
    if others:
        labels = others[0].name
        derived = len(others) == 1 and others[0].datatype in ("INT64", "INT32")
        values = collect(model.proto, [main, labels], inputs) if derived else {}
        if not derived or not np.array_equal(values[labels], np.argmax(values[main], axis=1)):
            raise UnsupportedModelError(
                f"distillation: output(s) {[t.name for t in others]} are not the arg-max of "
                f"{main!r}, so the student cannot reproduce them"
            )
    logits = _softmax_input(model.proto.graph, main)
    return _Head(main, logits or main, logits is not None, labels)


def _softmax_input(graph: onnx.GraphProto, output: str) -> str | None:
    """The tensor a final Softmax (possibly behind Identity nodes) normalises, if any."""
    index = GraphIndex(graph)
    node = index.producer.get(output)
    while node is not None and node.op_type == "Identity":
        node = index.producer.get(node.input[0])
    if node is None or node.op_type != "Softmax":
        return None
    axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), -1)
    return str(node.input[0]) if axis in (1, -1) else None


def _augment(x: np.ndarray, settings: DistillSettings) -> np.ndarray:
    rng = np.random.default_rng(settings.seed)
    rows = len(x) * settings.augment
    low, high = x.min(axis=0), x.max(axis=0)
    a, b = rng.integers(0, len(x), rows), rng.integers(0, len(x), rows)
    mix = rng.uniform(0, 1, (rows, 1)).astype(np.float32)
    mixed = mix * x[a] + (1 - mix) * x[b]
    noisy = x[rng.integers(0, len(x), rows)] + rng.normal(0, 1, (rows, x.shape[1])).astype(
        np.float32
    ) * (settings.noise * (high - low))
    synthetic = np.concatenate([mixed[: rows // 2], noisy[: rows - rows // 2]])
    return np.concatenate([x, np.clip(synthetic, low, high)]).astype(np.float32)


def _export(
    student: MLPRegressor, teacher: OnnxModel, feature_input: str, head: _Head, width: int
) -> onnx.ModelProto:
    opset = max(MIN_OPSET, teacher.opset)
    sample = np.zeros((1, student.n_features_in_), dtype=np.float32)
    proto: onnx.ModelProto = to_onnx(student, sample, target_opset=opset)
    graph = proto.graph
    _fix_regressor_shape(graph, width)
    _rename(graph, graph.input[0].name, feature_input)
    regressed = graph.output[0].name
    del graph.output[:]
    nodes: list[onnx.NodeProto] = []
    if head.softmax:
        nodes.append(helper.make_node("Softmax", [regressed], [head.output], axis=1))
    else:
        _rename(graph, regressed, head.output)
    if head.labels is not None:
        nodes.append(helper.make_node("ArgMax", [head.output], [head.labels], axis=1, keepdims=0))
    graph.node.extend(nodes)
    for spec in teacher.signature.outputs:
        elem = onnx.TensorProto.FLOAT if spec.datatype == "FP32" else onnx.TensorProto.INT64
        dims = [None if d == -1 else d for d in spec.shape]
        graph.output.append(helper.make_tensor_value_info(spec.name, elem, dims))
    del graph.value_info[:]
    flush_subnormals(proto)
    return proto


def _fix_regressor_shape(graph: onnx.GraphProto, width: int) -> None:
    """skl2onnx 1.20 reshapes a k-output MLPRegressor to [rows*k, 1]; make it [rows, k]."""
    index = GraphIndex(graph)
    node = index.producer.get(graph.output[0].name)
    if node is None or node.op_type != "Reshape":
        return
    shape = index.weight(node.input[1])
    if shape is not None and shape.tolist() == [-1, 1] and width != 1:
        index.set_weight(node.input[1], np.array([-1, width], dtype=np.int64))


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
    for value in (*graph.input, *graph.output):
        if value.name == old:
            value.name = new
