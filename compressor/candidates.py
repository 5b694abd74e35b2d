"""The ladder's candidate variants: which transforms fit a model's op mix, and how to build each.

A candidate is a name, a precision and a build function; combinations (pruned then int8)
name the candidate they start from. Planning only decides; building happens in the ladder.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from compressor.data import Dataset
from compressor.distill import DistillSettings, distill
from compressor.errors import UnsupportedModelError
from compressor.finetune import FinetuneSettings, finetune
from compressor.finetune import available as finetune_available
from compressor.fp16 import convert_fp16_safe
from compressor.graph import (
    GraphIndex,
    constants_to_initializers,
    count_subnormals,
    flush_subnormals,
    op_counts,
    subgraph_weights,
    weight_elements,
)
from compressor.model import OnnxModel, load_model, save_model
from compressor.prune.groups import trace
from compressor.prune.structured import prune_structured
from compressor.prune.units import find_units
from compressor.quantize import (
    Calibration,
    quantize_dynamic_int8,
    quantize_int4,
    quantize_static_int8,
)
from compressor.smooth import smooth
from compressor.student import conv_student

# The static int8 candidate built after scale migration (compressor.smooth).
SMOOTH = "int8-smooth"
# Suffix of the static int8 candidates with one weight scale per tensor, not per channel.
PER_TENSOR = "-tensor"


def static_name(method: Calibration, per_channel: bool = True) -> str:
    """The static int8 candidate of a calibrator and a weight granularity."""
    return f"int8-{method}" + ("" if per_channel else PER_TENSOR)


@dataclass(frozen=True)
class Built:
    """A candidate's file and what the manifest says about it."""

    path: Path
    precision: str
    sparsity: float = 0.0


# Builds a candidate from its source model (the original, or the candidate it starts from).
Builder = Callable[[OnnxModel, Path], Built]


@dataclass(frozen=True)
class Candidate:
    """A variant to try: its name, how to build it, and what it starts from."""

    name: str
    build: Builder
    base: str | None = None


@dataclass(frozen=True)
class Recipe:
    """Which candidates the ladder tries."""

    prune_ratios: tuple[float, ...] = (0.25, 0.5, 0.75, 0.875)
    calibrations: tuple[Calibration, ...] = tuple(Calibration)
    # Also try each calibrator with one weight scale per tensor (per channel is always tried).
    per_tensor: bool = True
    student_shares: tuple[float, ...] = (0.5, 0.25, 0.125)  # student weights / teacher weights
    distill_augment: int = 32
    int4: bool = True
    fp16: bool = True
    # Distillation fine-tuning of pruned conv variants against the original, and conv
    # students (narrower copies trained from scratch) removing these shares of the channels
    # (both need torch).
    finetune: bool = False
    finetune_epochs: int = 30
    student_ratios: tuple[float, ...] = (0.5, 0.75)
    seed: int = 0


@dataclass(frozen=True)
class OpMix:
    """What kinds of weights a model holds, which decides the candidates that fit it."""

    dense: bool  # MatMul/Gemm hold most of the weights: the dense-only quantizers pay
    conv: bool  # Conv with constant weights
    prunable: bool
    vector_input: bool
    subnormals: int
    ops: dict[str, int] = field(default_factory=dict)


def op_mix(model: OnnxModel) -> OpMix:
    """Inspect the model (with Constant-node weights hoisted, as every transform does)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    constants_to_initializers(proto)
    index = GraphIndex(proto.graph)
    weighted: dict[str, int] = {}
    for node in proto.graph.node:
        if len(node.input) > 1 and node.input[1] in index.initializers:
            size = int(np.prod(index.initializers[node.input[1]].dims))
            weighted[node.op_type] = weighted.get(node.op_type, 0) + size
    inner = subgraph_weights(proto.graph)
    ops = dict(op_counts(proto.graph))
    dense = weighted.get("MatMul", 0) + weighted.get("Gemm", 0)
    if not dense + weighted.get("Conv", 0):
        if inner.tensors:
            raise UnsupportedModelError(
                f"nothing to compress: the weights sit inside the subgraphs of "
                f"{', '.join(inner.nodes)}, which onnxruntime's quantizers leave in float"
            )
        raise UnsupportedModelError(
            f"nothing to compress: no MatMul, Gemm or Conv with constant weights (op mix: {ops})"
        )
    units, _ = find_units(proto)
    groups = trace(proto).groups() if "Conv" in weighted else []
    spec = model.signature.inputs
    vector = len(spec) == 1 and spec[0].datatype == "FP32" and len(spec[0].shape) == 2
    return OpMix(
        # A conv net's small classifier head is no reason to run dense-only quantizers.
        dense=dense >= weighted.get("Conv", 0),
        conv="Conv" in weighted,
        prunable=bool(units or groups),
        vector_input=vector,
        subnormals=count_subnormals(proto),
        ops=ops,
    )


def plan(model: OnnxModel, calibration: Dataset, recipe: Recipe) -> list[Candidate]:
    """The candidates that fit the model's op mix, in build order."""
    mix = op_mix(model)
    found: list[Candidate] = []
    if mix.subnormals:
        found.append(Candidate("fp32-ftz", _flushed))
    if recipe.fp16:
        found.append(Candidate("fp16", _fp16(calibration)))
    if mix.dense:
        found.append(Candidate("int8-dynamic", _dynamic))
    for method in recipe.calibrations:
        for per_channel in (True, False)[: 1 + recipe.per_tensor]:
            found.append(
                Candidate(
                    static_name(method, per_channel), _static(calibration, method, per_channel)
                )
            )
    if mix.conv and recipe.calibrations:
        # Wide activation channels migrated into the next convs' weights, then int8.
        found.append(Candidate(SMOOTH, _smoothed(calibration, recipe.calibrations[0])))
    if mix.dense and recipe.int4:
        found.append(Candidate("int4", lambda m, out: Built(quantize_int4(m, out), "int4")))
    found += _narrower(mix, calibration, recipe)
    if mix.vector_input and not mix.conv:
        for hidden in _student_widths(model, recipe.student_shares):
            settings = DistillSettings(
                hidden=(hidden,), augment=recipe.distill_augment, seed=recipe.seed
            )
            found.append(Candidate(f"distilled{hidden}", _student(calibration, settings)))
    return found


def _narrower(mix: OpMix, calibration: Dataset, recipe: Recipe) -> list[Candidate]:
    """Pruned variants (fine-tuned when asked) and conv students, each also in int8."""
    if not mix.prunable:
        return []
    found: list[Candidate] = []
    tuning = _tuning(recipe, mix)
    # A conv model wants static int8 after pruning; a dense one dynamic.
    combo = _static(calibration, Calibration.MINMAX) if mix.conv else _dynamic
    for ratio in recipe.prune_ratios:
        name = f"pruned{round(ratio * 100)}"
        found.append(Candidate(name, _pruned(calibration, ratio, tuning)))
        found.append(Candidate(f"{name}-int8", combo, base=name))
    if tuning is None:
        return found
    for ratio in recipe.student_ratios:
        name = f"student{round((1 - ratio) * 100)}"
        found.append(Candidate(name, _conv_student(calibration, ratio, tuning)))
        found.append(Candidate(f"{name}-int8", combo, base=name))
    return found


def _flushed(model: OnnxModel, out: Path) -> Built:
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    flush_subnormals(proto)
    return Built(save_model(proto, out), "fp32")


def _fp16(calibration: Dataset) -> Builder:
    def build(model: OnnxModel, out: Path) -> Built:
        path, _ = convert_fp16_safe(model, out, calibration)
        return Built(path, "fp16")

    return build


def _dynamic(model: OnnxModel, out: Path) -> Built:
    return Built(quantize_dynamic_int8(model, out), "int8")


def _static(calibration: Dataset, method: Calibration, per_channel: bool = True) -> Builder:
    def build(model: OnnxModel, out: Path) -> Built:
        # Both granularities of one calibrator on one source share its activation ranges.
        cache = out.parent / f".ranges-{model.path.stem}-{method}.json"
        path = quantize_static_int8(
            model, out, calibration, method, cache=cache, per_channel=per_channel
        )
        return Built(path, "int8")

    return build


def _tuning(recipe: Recipe, mix: OpMix) -> FinetuneSettings | None:
    if not (recipe.finetune and mix.conv):
        return None
    if not finetune_available():
        raise UnsupportedModelError("fine-tuning was asked for, but torch is not installed")
    return FinetuneSettings(epochs=recipe.finetune_epochs, seed=recipe.seed)


def _smoothed(calibration: Dataset, method: Calibration) -> Builder:
    def build(model: OnnxModel, out: Path) -> Built:
        with tempfile.TemporaryDirectory(prefix="edge-compress-smooth-") as tmp:
            smoothed, _ = smooth(model, Path(tmp) / "smoothed.onnx", calibration)
            return Built(
                quantize_static_int8(load_model(smoothed), out, calibration, method), "int8"
            )

    return build


def _pruned(calibration: Dataset, ratio: float, tuning: FinetuneSettings | None) -> Builder:
    def build(model: OnnxModel, out: Path) -> Built:
        result = prune_structured(model, out, ratio, calibration)
        if tuning is not None:
            # Recover what pruning lost by learning from the original (no labels needed).
            finetune(model.path, load_model(result.path), out, calibration, tuning)
        return Built(result.path, "fp32", result.sparsity)

    return build


def _conv_student(calibration: Dataset, ratio: float, tuning: FinetuneSettings) -> Builder:
    def build(model: OnnxModel, out: Path) -> Built:
        path = conv_student(model, out, calibration, ratio, tuning)
        return Built(path, "fp32", _weights_removed(model, path))

    return build


def _student(calibration: Dataset, settings: DistillSettings) -> Builder:
    def build(model: OnnxModel, out: Path) -> Built:
        path = distill(model, out, calibration, settings)
        return Built(path, "fp32", _weights_removed(model, path))

    return build


def _weights_removed(teacher: OnnxModel, student: Path) -> float:
    """The share of the teacher's weights a student does without (its sparsity)."""
    mine = weight_elements(onnx.load_model(student).graph)
    return max(0.0, 1.0 - mine / max(weight_elements(teacher.proto.graph), 1))


def _student_widths(model: OnnxModel, shares: tuple[float, ...]) -> list[int]:
    """Hidden widths giving the student roughly each share of the teacher's weights."""
    features = model.signature.inputs[0].shape[1]
    outputs = max((t.shape[-1] for t in model.signature.outputs if t.shape), default=1)
    teacher = weight_elements(model.proto.graph)
    widths = []
    for share in shares:
        hidden = share * teacher / max(features + outputs, 1)
        widths.append(max(8, math.ceil(hidden / 8) * 8))
    return sorted(set(widths), reverse=True)
