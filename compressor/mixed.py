"""Accuracy-aware mixed precision: keep the layers int8 hurts most in float, and no more.

Some models lose their output when every layer is int8. Each quantizable layer is
quantized alone and its output error on calibration data measured; the most sensitive are
then kept in float, a few more at a time, until the variant meets the budget. Calibration
runs once: its ranges are cached and reused by every trial.
"""

from __future__ import annotations

import tempfile
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

# Beyond this share of layers in float the rung is unlikely to be faster than fp32.
MAX_FLOAT_SHARE = 0.5


@dataclass(frozen=True)
class Sensitivity:
    """How much quantizing one layer alone moves the outputs (1 - cosine on calibration)."""

    node: str
    op_type: str
    error: float


@dataclass(frozen=True)
class MixedResult:
    """The mixed-precision variant and the layers it keeps in float."""

    path: Path
    float_layers: tuple[str, ...]
    quantized_layers: int
    ranking: tuple[Sensitivity, ...]


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


def rank_layers(
    prepared: Path,
    model: OnnxModel,
    calibration: Dataset,
    *,
    method: Calibration,
    cache: Path,
    workdir: Path,
) -> list[Sensitivity]:
    """Quantize each layer alone and measure its output error; most sensitive first."""
    proto = onnx.load_model(prepared)
    nodes = quantizable_nodes(proto)
    names = [n.name for n in nodes]
    reference = run_dataset(open_session(prepared), calibration)
    ranking: list[Sensitivity] = []
    for step, node in enumerate(nodes, start=1):
        trial = quantize_static_prepared(
            prepared,
            model,
            workdir / "single.onnx",
            calibration,
            method,
            exclude=[n for n in names if n != node.name],
            cache=cache,
        )
        outputs = run_dataset(open_session(trial), calibration)
        error = 1.0 - fidelity(reference, outputs).cosine
        ranking.append(Sensitivity(node.name, node.op_type, error))
        log.info("layer_sensitivity", step=step, steps=len(nodes), layer=node.name, error=error)
    return sorted(ranking, key=lambda s: (-s.error, s.node))


def quantize_mixed(
    model: OnnxModel,
    out: Path,
    calibration: Dataset,
    meets_budget: Callable[[Path], bool],
    *,
    method: Calibration = Calibration.MINMAX,
    max_float_share: float = MAX_FLOAT_SHARE,
) -> MixedResult:
    """Static int8 with the fewest, most sensitive layers in float that meets the budget."""
    with tempfile.TemporaryDirectory(prefix="edge-compress-mixed-") as tmp:
        work = Path(tmp)
        prepared = save_model(prepare(model, work), work / "prepared.onnx")
        cache = work / "calibration.json"
        ranking = rank_layers(
            prepared, model, calibration, method=method, cache=cache, workdir=work
        )
        limit = max(1, int(len(ranking) * max_float_share))

        def attempt(count: int) -> Path | None:
            kept = [s.node for s in ranking[:count]]
            path = quantize_static_prepared(
                prepared,
                model,
                work / f"mixed{count}.onnx",
                calibration,
                method,
                exclude=kept,
                cache=cache,
            )
            ok = meets_budget(path)
            log.info("mixed_attempt", float_layers=count, of=len(ranking), meets_budget=ok)
            return path if ok else None

        count, found = _smallest_passing(attempt, limit)
        if found is None:
            raise UnsupportedModelError(
                f"mixed precision: the budget is not met even with {limit} of "
                f"{len(ranking)} layers kept in float"
            )
        result = save_model(onnx.load_model(found), out)
        return MixedResult(
            result, tuple(s.node for s in ranking[:count]), len(ranking) - count, tuple(ranking)
        )


def _smallest_passing(attempt: Callable[[int], Path | None], limit: int) -> tuple[int, Path | None]:
    """The smallest count in 1..limit that passes, assuming more float layers never hurt.

    Doubling finds a passing bound in log steps, bisection then narrows it down.
    """
    low, high, best = 0, 1, None
    while high <= limit:
        best = attempt(high)
        if best is not None:
            break
        low, high = high, high * 2
    else:
        if low >= limit:
            return limit, None
        high = limit
        best = attempt(high)
        if best is None:
            return limit, None
    while high - low > 1:
        middle = (low + high) // 2
        found = attempt(middle)
        if found is not None:
            high, best = middle, found
        else:
            low = middle
    return high, best
