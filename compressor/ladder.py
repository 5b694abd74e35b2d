"""The automatic recipe: build the candidates that fit, measure them, keep the ladder, write it.

Phases, each logged with its progress: plan and build candidates; score their quality on
the evaluation set and drop those over budget; if no static int8 candidate is within
budget, search for a mixed-precision one; time and weigh the survivors side by side;
select the ladder; write the folder atomically.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from agent.manifest import Manifest
from compressor.candidates import PER_TENSOR, SMOOTH, Built, Candidate, Recipe, plan, static_name
from compressor.data import Dataset, load_dataset
from compressor.errors import CompressorError, DataError
from compressor.evaluate import Budget, EvalSettings, Evaluation, Quality, evaluate, score
from compressor.folder import Rung, build_manifest, check_output, model_name, write_folder
from compressor.mixed import quantize_mixed
from compressor.model import OnnxModel, load_model
from compressor.quantize import Calibration
from compressor.report import plot, table
from compressor.selection import Decision, Rules, over_budget_reason, select_ladder
from compressor.session import agent_batch_size, agent_threads

log = structlog.get_logger(__name__)

REFERENCE = "fp32"
MIXED = "int8-mixed"
REPORT_TEXT = "report.txt"
REPORT_PLOT = "report.png"


@dataclass(frozen=True)
class LadderSettings:
    """What the ladder tries and how it measures."""

    budget: Budget = field(default_factory=Budget)
    recipe: Recipe = field(default_factory=Recipe)
    threads: int = field(default_factory=agent_threads)
    batch_size: int = field(default_factory=agent_batch_size)
    rules: Rules = field(default_factory=Rules)
    rounds: int = 5
    seconds_per_round: float = 0.15
    measure_memory: bool = True
    mixed: bool = True
    plot: bool = True


@dataclass(frozen=True)
class LadderResult:
    """The folder written and everything measured on the way."""

    out: Path
    manifest: Manifest
    evaluations: dict[str, Evaluation]
    decisions: list[Decision]
    report: str


def build_ladder(
    model_path: Path,
    out: Path,
    *,
    calib: Path | None,
    evaluation: Path | None,
    settings: LadderSettings,
    name: str | None = None,
    force: bool = False,
) -> LadderResult:
    """Turn one model plus data into a measured ladder folder at `out`."""
    check_output(out, force)
    model = load_model(model_path)
    calib_set, eval_set = _datasets(model, calib, evaluation)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edge-compress-", dir=out.parent) as tmp:
        work = Path(tmp)
        log.info("ladder_phase", phase="build")
        built, failures = _build_all(model, plan(model, calib_set, settings.recipe), work)
        log.info("ladder_phase", phase="score", variants=len(built) + 1)
        paths = {REFERENCE: model.path} | {n: b.path for n, b in built.items()}
        scores = score(model.path, paths, eval_set, settings.threads)
        if settings.mixed and _needs_mixed(scores, settings.budget):
            mixed = _mixed(model, calib_set, eval_set, settings, work, _best_calibrator(scores))
            if isinstance(mixed, Decision):
                failures.append(mixed)
            else:
                built[MIXED], paths[MIXED] = mixed, mixed.path
                scores |= score(model.path, {MIXED: mixed.path}, eval_set, settings.threads)
        twins = _calibration_twins(scores, settings.budget)
        survivors = {
            n: p
            for n, p in paths.items()
            if n not in twins and (n == REFERENCE or scores[n].within(settings.budget))
        }
        log.info("ladder_phase", phase="measure", variants=len(survivors))
        measured = evaluate(model.path, survivors, eval_set, _eval_settings(settings), scores)
        over_budget = [
            Decision(n, False, twins.get(n) or over_budget_reason(scores[n], settings.budget))
            for n in paths
            if n not in survivors
        ]
        kept, decisions = select_ladder(REFERENCE, measured, settings.budget, settings.rules)
        decisions += over_budget + failures
        original = Built(model.path, "fp32")
        rungs = [
            Rung(measured[n], built.get(n, original).precision, built.get(n, original).sparsity)
            for n in kept
        ]
        manifest = build_manifest(
            # The agent names a model by its folder: anything else would be refused there.
            model_name(name or out.name),
            model.signature,
            rungs,
            measured[REFERENCE],
        )
        report = table(REFERENCE, measured, scores, decisions)

        def extras(stage: Path) -> None:
            (stage / REPORT_TEXT).write_text(report)
            if settings.plot:
                plot(REFERENCE, measured, kept, stage / REPORT_PLOT)

        write_folder(out, manifest, rungs, extras, force)
    log.info("ladder_written", out=str(out), rungs=kept)
    return LadderResult(out, manifest, measured, decisions, report)


def _datasets(
    model: OnnxModel, calib: Path | None, evaluation: Path | None
) -> tuple[Dataset, Dataset]:
    if calib is None and evaluation is None:
        raise DataError("the ladder needs data: pass --calib and/or --eval (.npz files)")
    calib_set = load_dataset(calib, model.signature) if calib else None
    eval_set = load_dataset(evaluation, model.signature) if evaluation else None
    if calib_set is None:
        assert eval_set is not None
        log.warning("calibrating_on_eval", why="no --calib given: figures will be optimistic")
        return eval_set, eval_set
    if eval_set is None:
        log.warning("evaluating_on_calib", why="no --eval given: figures will be optimistic")
        return calib_set, calib_set
    return calib_set, eval_set


def _build_all(
    model: OnnxModel, candidates: list[Candidate], work: Path
) -> tuple[dict[str, Built], list[Decision]]:
    """Build every candidate; one that fails is recorded with its reason, not fatal."""
    built: dict[str, Built] = {}
    failures: list[Decision] = []
    first = time.monotonic()
    for step, candidate in enumerate(candidates, start=1):
        started = time.monotonic()
        base = built.get(candidate.base) if candidate.base else None
        if candidate.base is not None and base is None:
            failures.append(Decision(candidate.name, False, f"skipped: {candidate.base} failed"))
            continue
        try:
            source = load_model(base.path) if base is not None else model
            result = candidate.build(source, work / f"{candidate.name}.onnx")
        except CompressorError as exc:
            failures.append(Decision(candidate.name, False, f"not applicable: {exc}"))
            log.info(
                "candidate_skipped",
                step=step,
                steps=len(candidates),
                name=candidate.name,
                reason=str(exc),
            )
            continue
        # onnxruntime's and onnx's tools raise arbitrary errors on odd graphs; one candidate
        # failing must not cost the user the rest of the ladder.
        except Exception as exc:
            failures.append(Decision(candidate.name, False, f"failed: {type(exc).__name__}: {exc}"))
            log.warning(
                "candidate_failed",
                step=step,
                steps=len(candidates),
                name=candidate.name,
                error=str(exc)[:300],
            )
            continue
        sparsity = base.sparsity if base is not None else result.sparsity
        built[candidate.name] = Built(result.path, result.precision, sparsity)
        per_step = (time.monotonic() - first) / step
        log.info(
            "candidate_built",
            step=step,
            steps=len(candidates),
            name=candidate.name,
            seconds=round(time.monotonic() - started, 2),
            # A rough guide: candidates differ in cost, pruned-int8 ones are quick.
            seconds_left=round(per_step * (len(candidates) - step), 1),
        )
    return built, failures


def _mixed(
    model: OnnxModel,
    calib: Dataset,
    evaluation: Dataset,
    settings: LadderSettings,
    work: Path,
    method: Calibration,
) -> Built | Decision:
    """The mixed-precision candidate, searched against the budget on the evaluation set."""
    log.info("ladder_phase", phase="mixed_precision", calibration=str(method))

    def meets(path: Path) -> bool:
        quality = score(model.path, {MIXED: path}, evaluation, settings.threads)[MIXED]
        return quality.within(settings.budget)

    try:
        result = quantize_mixed(model, work / f"{MIXED}.onnx", calib, meets, method=method)
    except CompressorError as exc:
        return Decision(MIXED, False, f"failed: {exc}")
    for layer, why in result.reasons.items():
        log.info("mixed_float_layer", layer=layer, why=why)
    return Built(result.path, "mixed")


def _best_calibrator(scores: dict[str, Quality]) -> Calibration:
    """The static int8 calibrator that scored best: the mixed search starts from its ranges."""
    static = {c: scores[static_name(c)] for c in Calibration if static_name(c) in scores}
    if not static:
        return Calibration.MINMAX
    return max(static, key=lambda c: (static[c].quality, static[c].fidelity.cosine))


def _needs_mixed(scores: dict[str, Quality], budget: Budget) -> bool:
    """True when static int8 was tried and every variant of it misses the budget."""
    static = [q for n, q in scores.items() if n in _static_names()]
    return bool(static) and not any(q.within(budget) for q in static)


def _static_names() -> set[str]:
    """The static int8 candidates: one graph and one cost per weight granularity, only
    their scales differ."""
    return {static_name(c, per_channel) for c in Calibration for per_channel in (True, False)} | {
        SMOOTH
    }


def _calibration_twins(scores: dict[str, Quality], budget: Budget) -> dict[str, str]:
    """Static int8 variants beaten by another calibrator of the same weight granularity:
    same graph, same cost, less quality.

    The calibrators only change scales, so timing them against each other measures noise;
    the best-scoring one stands for all of them. Per-tensor and per-channel weights run
    different kernels, so the best of each is timed and the ladder's selection keeps the
    one that is better by the measured quality and latency (both, if each earns a step).
    """
    twins: dict[str, str] = {}
    for per_tensor in (False, True):
        within = [
            n
            for n in scores
            if n in _static_names()
            and n.endswith(PER_TENSOR) == per_tensor
            and scores[n].within(budget)
        ]
        if not within:
            continue
        best = max(within, key=lambda n: (scores[n].quality, scores[n].fidelity.cosine, n))
        twins |= {
            n: f"duplicate: same graph as {best} (other scales), which scores higher"
            for n in within
            if n != best
        }
    return twins


def _eval_settings(settings: LadderSettings) -> EvalSettings:
    return EvalSettings(
        threads=settings.threads,
        batch_size=settings.batch_size,
        rounds=settings.rounds,
        seconds_per_round=settings.seconds_per_round,
        measure_memory=settings.measure_memory,
    )
