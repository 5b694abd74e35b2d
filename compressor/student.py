"""Convolutional students: a narrower copy of the teacher's architecture, distilled from it.

The copy comes from the channel dependency groups (compressor.prune.groups): every group
keeps the same share of its channels, so residual Adds, Concats and Splits stay consistent
and the graph, its signature and its op mix are the teacher's. Its weights start afresh
(He-initialised, as a student trained from scratch does) and learn the teacher's outputs
on the calibration inputs, no labels needed (compressor.finetune, with PyTorch). Where a
pruned-and-fine-tuned variant of the same width starts from the teacher's own channels, a
student starts from nothing: the ladder measures both and keeps whichever is better.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from compressor.data import Dataset
from compressor.finetune import TRAINABLE, FinetuneSettings, finetune
from compressor.graph import GraphIndex
from compressor.model import OnnxModel, load_model, save_model
from compressor.prune.structured import prune_groups

# A student trains from scratch: more steps, a larger step size than a fine-tune's.
STUDENT_LEARNING_RATE = 2e-3
STUDENT_EPOCH_FACTOR = 2


def conv_student(
    teacher: OnnxModel,
    out: Path,
    data: Dataset,
    ratio: float,
    settings: FinetuneSettings,
) -> Path:
    """A copy of `teacher` with `ratio` of every channel group removed, freshly initialised
    and trained to match the teacher's outputs on `data`, written to `out`."""
    with tempfile.TemporaryDirectory(prefix="edge-compress-student-") as tmp:
        narrow = prune_groups(teacher, Path(tmp) / "narrow.onnx", ratio, None, correct=False)
        proto = onnx.load_model(narrow.path)
        reinitialise(proto, settings.seed)
        fresh = load_model(save_model(proto, Path(tmp) / "fresh.onnx"))
        return finetune(teacher.path, fresh, out, data, student_settings(settings))


def student_settings(settings: FinetuneSettings) -> FinetuneSettings:
    """A fine-tune's settings made a from-scratch training's."""
    return replace(
        settings,
        epochs=settings.epochs * STUDENT_EPOCH_FACTOR,
        learning_rate=STUDENT_LEARNING_RATE,
    )


def reinitialise(proto: onnx.ModelProto, seed: int) -> None:
    """He-normal weights and zero biases for every trainable Conv, Gemm and MatMul; unit
    BatchNormalization scales (in place)."""
    rng = np.random.default_rng(seed)
    index = GraphIndex(proto.graph)
    for node in proto.graph.node:
        positions = TRAINABLE.get(node.op_type, ())
        names = [node.input[i] for i in positions if i < len(node.input) and node.input[i]]
        for position, name in zip(positions, names, strict=False):
            if name not in index.initializers:
                continue
            value = numpy_helper.to_array(index.initializers[name])
            index.set_weight(name, _fresh(node, position, value, rng))


def _fresh(
    node: onnx.NodeProto, position: int, value: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    if node.op_type == "BatchNormalization":  # scale 1, shift 0
        return np.full_like(value, 1.0 if position == 1 else 0.0)
    if position == 2 or value.ndim < 2:  # a bias
        return np.zeros_like(value)
    transposed = any(a.name == "transB" and a.i for a in node.attribute)
    if node.op_type == "Conv":
        fan_in = int(np.prod(value.shape[1:]))
    else:  # Gemm stores [out, in] with transB, MatMul and plain Gemm [in, out]
        fan_in = int(value.shape[1] if transposed else value.shape[0])
    return rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), value.shape).astype(value.dtype)
