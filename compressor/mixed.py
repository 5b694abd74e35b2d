"""Accuracy-aware mixed precision: quantize everything, then return layers to float one by one.

As NNCF's accuracy-aware quantization does: start from the all-int8 model; while it misses
the budget, try returning each of the most promising quantized layers to float, keep the
reversal that recovers the most (output error on calibration data, re-measured on the
current mix, not on each layer alone: errors interact), and check the budget again. There
is no cap on how many layers return; a result that is no faster than float is left out by
the ladder's selection, not here. Calibration runs once: its ranges are cached and reused.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import structlog

from compressor.data import Dataset
from compressor.errors import UnsupportedModelError
from compressor.graph import GraphIndex
from compressor.metrics import fidelity
from compressor.model import OnnxModel, save_model
from compressor.quantize import WEIGHTED_OPS, Calibration, prepare, quantize_static_prepared
from compressor.session import open_session, run_dataset

log = structlog.get_logger(__name__)

# Reversals tried per step: the layers whose reversal recovered the most on the previous
# measurement. Trying every layer at every step costs layers^2 quantizations.
CANDIDATES_PER_STEP = 4


@dataclass(frozen=True)
class Sensitivity:
    """How much returning one layer to float lowers the output error (1 - cosine)."""

    node: str
    op_type: str
    error: float  # of the mix with this layer (and those before it) in float


@dataclass(frozen=True)
class MixedResult:
    """The mixed-precision variant, the layers it keeps in float and why each."""

    path: Path
    float_layers: tuple[str, ...]
    quantized_layers: int
    ranking: tuple[Sensitivity, ...]  # the reversals in the order they were made
    reasons: dict[str, str]


def quantizable_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes static int8 would quantize: Conv/MatMul/Gemm with a constant weight."""
    index = GraphIndex(proto.graph)
    return [
        node
        for node in proto.graph.node
        if node.op_type in WEIGHTED_OPS
        and len(node.input) > 1
        and node.input[1] in index.initializers
    ]


def quantize_mixed(
    model: OnnxModel,
    out: Path,
    calibration: Dataset,
    meets_budget: Callable[[Path], bool],
    *,
    method: Calibration = Calibration.MINMAX,
    candidates_per_step: int = CANDIDATES_PER_STEP,
) -> MixedResult:
    """Static int8 with layers returned to float, most recovering first, until the budget."""
    with tempfile.TemporaryDirectory(prefix="edge-compress-mixed-") as tmp:
        work = Path(tmp)
        prepared = save_model(prepare(model, work), work / "prepared.onnx")
        cache = work / "calibration.json"
        nodes = quantizable_nodes(onnx.load_model(prepared))
        kinds = {n.name: n.op_type for n in nodes}
        reference = run_dataset(open_session(prepared), calibration)
        trials = 0

        def build(floats: list[str], tag: str) -> tuple[Path, float]:
            nonlocal trials
            trials += 1
            path = quantize_static_prepared(
                prepared,
                model,
                work / f"{tag}.onnx",
                calibration,
                method,
                exclude=floats,
                cache=cache,
            )
            outputs = run_dataset(open_session(path), calibration)
            return path, 1.0 - fidelity(reference, outputs).cosine

        floats: list[str] = []
        current, error = build(floats, "all-int8")
        reversals: list[Sensitivity] = []
        reasons: dict[str, str] = {}
        # Order of promise: every layer's recovery measured once from all-int8.
        promise = {name: error for name in kinds}
        started = time.monotonic()
        while not meets_budget(current):
            left = [n for n in kinds if n not in floats]
            if not left:
                raise UnsupportedModelError(
                    f"mixed precision: the budget is not met even with all {len(kinds)} "
                    "layers in float (the loss is outside the quantized layers)"
                )
            if not reversals:
                tried = left  # the first step measures every layer, to rank them
            else:
                tried = sorted(left, key=lambda n: (promise[n], n))[:candidates_per_step]
            best: tuple[float, str, Path] | None = None
            for name in tried:
                path, err = build([*floats, name], f"try-{len(floats)}-{name}")
                promise[name] = err
                if best is None or err < best[0]:
                    best = (err, name, path)
            assert best is not None
            err, name, current = best
            floats.append(name)
            reasons[name] = (
                f"returning it to float took the output error from {error:.2e} to {err:.2e}"
            )
            error = err
            reversals.append(Sensitivity(name, kinds[name], err))
            elapsed = time.monotonic() - started
            log.info(
                "mixed_layer_reverted",
                layer=name,
                float_layers=len(floats),
                of=len(kinds),
                error=err,
                trials=trials,
                seconds=round(elapsed, 1),
            )
        result = save_model(onnx.load_model(current), out)
        log.info("mixed_found", float_layers=floats, quantized=len(kinds) - len(floats))
        return MixedResult(
            result, tuple(floats), len(kinds) - len(floats), tuple(reversals), reasons
        )
