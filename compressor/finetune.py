"""Knowledge-distillation fine-tuning of a pruned variant against the original, with PyTorch.

Pruning and the least-squares refit recover much of what removing channels costs; training
the student on the teacher's outputs recovers more, without labels: calibration inputs
(shifted and lightly noised) are run through the original in onnxruntime, and the student
learns to match its outputs (the logits before a final Softmax or Sigmoid where there is
one). The student is the ONNX graph itself, interpreted node by node with torch functions,
its weights made trainable; the trained values are written back into the same ONNX graph,
so the signature and the graph stay exactly as they were. Needs the `train` extra (torch);
`available()` says whether it is installed.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import structlog
from onnx import helper, numpy_helper

from compressor.data import Dataset
from compressor.errors import UnsupportedModelError
from compressor.graph import GraphIndex, constants_to_initializers
from compressor.model import OnnxModel, save_model, signature_of_bytes
from compressor.session import open_session, run_dataset

log = structlog.get_logger(__name__)

# The ops the interpreter knows; a graph with any other is refused with its names.
SUPPORTED = frozenset(
    {
        "Conv", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "MaxPool", "AveragePool",
        "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Gemm", "MatMul", "Add", "Sub",
        "Mul", "Div", "Concat", "Split", "BatchNormalization", "Softmax", "Identity",
        "Reshape", "Dropout",
    }
)  # fmt: skip
# Inputs of these ops at these positions are the weights that training moves.
TRAINABLE = {"Conv": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "BatchNormalization": (1, 2)}


@dataclass(frozen=True)
class FinetuneSettings:
    """How long and how hard the student trains."""

    epochs: int = 30
    batch: int = 32
    learning_rate: float = 2e-4  # small: the refitted weights are a good start, not noise
    shift: int = 1  # pixels an image input is rolled by at most, for augmentation
    noise: float = 0.0  # std of the noise added, relative to the input's std
    seed: int = 0
    threads: int | None = None


def available() -> bool:
    """Whether PyTorch (the `train` extra) is installed."""
    return importlib.util.find_spec("torch") is not None


def finetune(
    teacher: Path,
    student: OnnxModel,
    out: Path,
    data: Dataset,
    settings: FinetuneSettings = FinetuneSettings(),
) -> Path:
    """Train `student`'s weights to match `teacher`'s outputs on `data`; write it to `out`."""
    if not available():
        raise UnsupportedModelError("fine-tuning needs PyTorch: pip install -e '.[train]'")
    torch = _torch()
    proto = onnx.ModelProto()
    proto.CopyFrom(student.proto)
    constants_to_initializers(proto)
    unknown = sorted({n.op_type for n in proto.graph.node} - SUPPORTED)
    if unknown:
        raise UnsupportedModelError(f"fine-tuning: no translation for {', '.join(unknown)}")
    squashing = _squashing(proto)
    targets = list(squashing)
    teacher_proto = onnx.load_model(teacher)
    constants_to_initializers(teacher_proto)
    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    net = _Interpreter(proto, targets)
    optimizer = torch.optim.Adam(net.parameters(), lr=settings.learning_rate)
    steps = settings.epochs * -(-data.size // settings.batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    teacher_session = _exposing(teacher_proto, targets)
    started = time.monotonic()
    for epoch in range(settings.epochs):
        augmented = _augment(data, rng, settings)
        wanted = run_dataset(teacher_session, augmented, targets)
        order = rng.permutation(augmented.size)
        total = 0.0
        for first in range(0, augmented.size, settings.batch):
            rows = order[first : first + settings.batch]
            feed = {k: torch.from_numpy(v[rows]) for k, v in augmented.inputs.items()}
            produced = net(feed)
            loss = sum(
                _loss(
                    torch, squashing[t], produced[t], torch.from_numpy(wanted[t][rows]), wanted[t]
                )
                for t in targets
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
        elapsed = time.monotonic() - started
        log.info(
            "finetune_epoch",
            epoch=epoch + 1,
            epochs=settings.epochs,
            loss=round(total / augmented.size, 6),
            seconds_left=round(elapsed / (epoch + 1) * (settings.epochs - epoch - 1), 1),
        )
    net.write_back(proto)
    signature_of_bytes(proto.SerializeToString(), str(out))
    return save_model(proto, out)


def _torch() -> Any:
    """PyTorch, imported by name: it is optional, and untyped for the checker without it."""
    return importlib.import_module("torch")


def _squashing(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto | None]:
    """What the student learns to match: each output, or the logits before its Softmax or
    Sigmoid (with that node, which decides the loss)."""
    index = GraphIndex(proto.graph)
    found: dict[str, onnx.NodeProto | None] = {}
    for out in proto.graph.output:
        node = index.producer.get(out.name)
        if node is not None and node.op_type in ("Softmax", "Sigmoid"):
            found[node.input[0]] = node
        else:
            found[out.name] = None
    return found


# Softening of the teacher's distribution (Hinton et al.'s temperature).
TEMPERATURE = 2.0


def _loss(
    torch: Any, squash: onnx.NodeProto | None, mine: Any, theirs: Any, all_theirs: np.ndarray
) -> Any:
    """KL divergence at a temperature for Softmax logits, cross-entropy against the
    teacher's probabilities for Sigmoid logits, else mean squared error scaled by the
    teacher's variance."""
    functional = torch.nn.functional
    if squash is not None and squash.op_type == "Softmax":
        axis = int(_attrs(squash).get("axis", -1))
        soft = functional.log_softmax(theirs / TEMPERATURE, dim=axis)
        return (
            functional.kl_div(
                functional.log_softmax(mine / TEMPERATURE, dim=axis),
                soft,
                log_target=True,
                reduction="batchmean",
            )
            * TEMPERATURE**2
        )
    if squash is not None:
        return functional.binary_cross_entropy_with_logits(mine, torch.sigmoid(theirs))
    return torch.mean((mine - theirs) ** 2) / float(np.var(all_theirs) + 1e-8)


def _exposing(proto: onnx.ModelProto, tensors: list[str]) -> Any:
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    existing = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    return open_session(probe.SerializeToString())


def _augment(data: Dataset, rng: np.random.Generator, settings: FinetuneSettings) -> Dataset:
    inputs: dict[str, np.ndarray] = {}
    for name, value in data.inputs.items():
        array = np.array(value, dtype=np.float32, copy=True)
        if array.ndim == 4 and settings.shift:
            dy, dx = (int(v) for v in rng.integers(-settings.shift, settings.shift + 1, 2))
            array = np.roll(array, (dy, dx), axis=(2, 3))
        if settings.noise:
            scale = float(np.std(array)) * settings.noise
            array = array + rng.normal(0.0, scale, array.shape).astype(np.float32)
        inputs[name] = array
    return Dataset(inputs)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Interpreter:
    """Runs an ONNX graph with torch functions; its weights are torch parameters."""

    def __init__(self, proto: onnx.ModelProto, targets: list[str]) -> None:
        torch = _torch()
        self._torch = torch
        self.nodes = list(proto.graph.node)
        self.targets = targets
        trainable = {
            node.input[i]
            for node in self.nodes
            for i in TRAINABLE.get(node.op_type, ())
            if i < len(node.input) and node.input[i]
        }
        self.params: dict[str, Any] = {}
        self.constants: dict[str, Any] = {}
        for init in proto.graph.initializer:
            value = numpy_helper.to_array(init)
            if init.name in trainable and value.dtype == np.float32:
                self.params[init.name] = torch.nn.Parameter(torch.from_numpy(value.copy()))
            else:
                self.constants[init.name] = value
        self._ops: dict[str, Callable[[onnx.NodeProto, list[Any]], list[Any]]] = _ops(torch)

    def parameters(self) -> list[Any]:
        return list(self.params.values())

    def __call__(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        torch = self._torch
        values: dict[str, Any] = dict(feed)
        values.update(self.params)
        for name, value in self.constants.items():
            values[name] = torch.from_numpy(value) if value.dtype != np.int64 else value
        for node in self.nodes:
            args = [values[i] if i else None for i in node.input]
            for name, result in zip(node.output, self._ops[node.op_type](node, args), strict=False):
                values[name] = result
        return {t: values[t] for t in self.targets}

    def write_back(self, proto: onnx.ModelProto) -> None:
        index = GraphIndex(proto.graph)
        for name, param in self.params.items():
            index.set_weight(name, param.detach().numpy().astype(np.float32))


def _ops(torch: Any) -> dict[str, Callable[[onnx.NodeProto, list[Any]], list[Any]]]:
    functional = torch.nn.functional

    def conv(node: onnx.NodeProto, a: list[Any]) -> list[Any]:
        at = _attrs(node)
        pads = list(at.get("pads", [0, 0, 0, 0]))
        x = a[0]
        if pads[0] != pads[2] or pads[1] != pads[3]:
            x = functional.pad(x, (pads[1], pads[3], pads[0], pads[2]))
            pads = [0, 0, 0, 0]
        bias = a[2] if len(a) > 2 else None
        return [
            functional.conv2d(
                x, a[1], bias, tuple(at.get("strides", (1, 1))), (pads[0], pads[1]),
                tuple(at.get("dilations", (1, 1))), int(at.get("group", 1)),
            )
        ]  # fmt: skip

    def pool(kind: str) -> Callable[[onnx.NodeProto, list[Any]], list[Any]]:
        def run(node: onnx.NodeProto, a: list[Any]) -> list[Any]:
            at = _attrs(node)
            kernel = tuple(at["kernel_shape"])
            strides = tuple(at.get("strides", kernel))
            pads = list(at.get("pads", [0, 0, 0, 0]))
            x = a[0]
            if kind == "max":
                if any(pads):
                    x = functional.pad(x, (pads[1], pads[3], pads[0], pads[2]), value=-1e30)
                return [functional.max_pool2d(x, kernel, strides)]
            if any(pads):
                x = functional.pad(x, (pads[1], pads[3], pads[0], pads[2]))
            return [functional.avg_pool2d(x, kernel, strides)]

        return run

    def gemm(node: onnx.NodeProto, a: list[Any]) -> list[Any]:
        at = _attrs(node)
        x = a[0].t() if at.get("transA", 0) else a[0]
        w = a[1].t() if at.get("transB", 0) else a[1]
        y = float(at.get("alpha", 1.0)) * (x @ w)
        if len(a) > 2 and a[2] is not None:
            y = y + float(at.get("beta", 1.0)) * a[2]
        return [y]

    def split(node: onnx.NodeProto, a: list[Any]) -> list[Any]:
        at = _attrs(node)
        axis = int(at.get("axis", 0))
        if len(a) > 1 and a[1] is not None:
            sizes = [int(v) for v in np.asarray(a[1]).reshape(-1)]
        elif "split" in at:
            sizes = [int(v) for v in at["split"]]
        else:
            sizes = [a[0].shape[axis] // len(node.output)] * len(node.output)
        return list(torch.split(a[0], sizes, dim=axis))

    def batchnorm(node: onnx.NodeProto, a: list[Any]) -> list[Any]:
        eps = float(_attrs(node).get("epsilon", 1e-5))
        return [functional.batch_norm(a[0], a[3], a[4], a[1], a[2], False, 0.0, eps)]

    def clip(node: onnx.NodeProto, a: list[Any]) -> list[Any]:
        at = _attrs(node)
        low = a[1] if len(a) > 1 and a[1] is not None else at.get("min")
        high = a[2] if len(a) > 2 and a[2] is not None else at.get("max")
        return [torch.clamp(a[0], low, high)]

    def flatten(node: onnx.NodeProto, a: list[Any]) -> list[Any]:
        return [torch.flatten(a[0], int(_attrs(node).get("axis", 1)))]

    def reshape(node: onnx.NodeProto, a: list[Any]) -> list[Any]:
        shape = [int(v) for v in np.asarray(a[1]).reshape(-1)]
        shape = [a[0].shape[i] if v == 0 else v for i, v in enumerate(shape)]
        return [torch.reshape(a[0], shape)]

    return {
        "Conv": conv,
        "Relu": lambda n, a: [torch.relu(a[0])],
        "LeakyRelu": lambda n, a: [
            functional.leaky_relu(a[0], float(_attrs(n).get("alpha", 0.01)))
        ],
        "Sigmoid": lambda n, a: [torch.sigmoid(a[0])],
        "Tanh": lambda n, a: [torch.tanh(a[0])],
        "Clip": clip,
        "MaxPool": pool("max"),
        "AveragePool": pool("avg"),
        "GlobalAveragePool": lambda n, a: [torch.mean(a[0], dim=(2, 3), keepdim=True)],
        "GlobalMaxPool": lambda n, a: [torch.amax(a[0], dim=(2, 3), keepdim=True)],
        "Flatten": flatten,
        "Gemm": gemm,
        "MatMul": lambda n, a: [a[0] @ a[1]],
        "Add": lambda n, a: [a[0] + a[1]],
        "Sub": lambda n, a: [a[0] - a[1]],
        "Mul": lambda n, a: [a[0] * a[1]],
        "Div": lambda n, a: [a[0] / a[1]],
        "Concat": lambda n, a: [torch.cat(a, dim=int(_attrs(n)["axis"]))],
        "Split": split,
        "BatchNormalization": batchnorm,
        "Softmax": lambda n, a: [torch.softmax(a[0], dim=int(_attrs(n).get("axis", -1)))],
        "Identity": lambda n, a: [a[0]],
        "Dropout": lambda n, a: [a[0]],
        "Reshape": reshape,
    }
