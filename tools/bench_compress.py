"""Benchmark edge-compress on real-shaped networks beside onnxruntime's quantize_static defaults.

Usage: .venv/bin/python tools/bench_compress.py [--threads N] [--rounds R] [--keep DIR [--retime]]

Two models, built here (nothing downloaded): a residual CNN with Add, Concat and Split
blocks trained whole on the digits (upsampled; torch, the `train` extra), laddered with
fine-tuning and conv students, and a segmentation-style net with a sigmoid map and one
wide-range activation. For each, the ladder is built with the compressor's API (or, with
--retime, the one an earlier run left in --keep is reused), then every rung is measured
beside onnxruntime's `quantize_static` with its default settings, plain fp16, and
onnx-neural-compressor's defaults when that package is installed (optional, never a
dependency), all in one interleaved run. Per variant it
prints latency ratios at batch 1 and at the agent's batch size, size, memory and quality,
the load average around the timing (and whether it was too high to trust), and ends
with the targets of issue 9, each marked met or missed. Build with `nice -n 10` on a
shared machine, then re-time with `--retime` when it is quieter.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from onnxruntime.quantization import CalibrationDataReader, quantize_static

from agent.manifest import MANIFEST_FILE, read_manifest
from compressor.candidates import Recipe
from compressor.data import Dataset, load_dataset
from compressor.evaluate import Budget, EvalSettings, Evaluation, evaluate
from compressor.ladder import REPORT_TEXT, LadderSettings, build_ladder
from compressor.logs import configure
from compressor.model import load_model
from compressor.quantize import convert_fp16
from compressor.session import agent_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_models as cm

STATIC = "ort-static-default"
FP16 = "fp16-plain"
INC = "onnx-neural-compressor"


@dataclass(frozen=True)
class Case:
    """One model to benchmark, with its data and quality budget."""

    name: str
    model: Path
    calib: Path
    eval: Path
    budget: Budget
    recipe: Recipe = field(default_factory=Recipe)


def main() -> int:
    """Build both cases, run the ladders, print the tables and the targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=agent_threads())
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    parser.add_argument("--seconds", type=float, default=0.3, help="seconds per measurement")
    parser.add_argument("--keep", type=Path, help="write the ladders here instead of a temp dir")
    parser.add_argument(
        "--cases", default="residual,map", help="comma-separated: residual, map (default both)"
    )
    parser.add_argument(
        "--epochs", type=int, default=15, help="training epochs of the residual CNN"
    )
    parser.add_argument(
        "--retime",
        action="store_true",
        help="with --keep: measure the ladders built by an earlier run again, build nothing",
    )
    parser.add_argument("-v", "--verbose", action="count", default=-1)
    args = parser.parse_args()
    configure(verbosity=args.verbose)
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        cases = {c.strip() for c in args.cases.split(",")}
        verdicts: list[tuple[bool, str]] = []
        if "residual" in cases:
            case = residual_case(root / "inputs", args.epochs)
            verdicts += residual_targets(run_case(case, root, args))
        if "map" in cases:
            verdicts += map_targets(run_case(map_case(root / "inputs"), root, args))
    print("\n== targets (issue 9) ==")
    for met, text in verdicts:
        print(f"[{'MET ' if met else 'MISS'}] {text}")
    return 0


def residual_case(folder: Path, epochs: int) -> Case:
    """The residual CNN on 32x32 digits, 64 channels wide, trained whole with torch: strided
    stem, residual block, C2f-style Split/Concat block. The trained model is kept in
    `folder` and reused by a later run with the same --keep (training takes minutes)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = cm.image_digits(size=32, seed=0)
    model = folder / f"residual-trained{epochs}.onnx"
    if model.exists():
        print(f"(reusing the trained residual CNN {model})")
    else:
        print(f"== residual: training the CNN for {epochs} epochs ==", flush=True)
        trained = cm.residual_cnn_model(data, width=64, epochs=epochs, stem_stride=2)
        cm.save(trained, model)
    return Case(
        "residual",
        model,
        Dataset({"input": data.x_calib}).save(folder / "residual_calib.npz"),
        Dataset({"input": data.x_eval}, data.y_eval).save(folder / "residual_eval.npz"),
        Budget(0.01),
        # Fine-tuned pruned variants and conv students (torch); pruning a quarter of the
        # channels is left out, it never earns a step beside int8 and costs a fine-tune.
        Recipe(prune_ratios=(0.5, 0.75, 0.875), finetune=True),
    )


def map_case(folder: Path) -> Case:
    """The map net on 64x64 images, 32 channels wide; quality is cosine to the original."""
    folder.mkdir(parents=True, exist_ok=True)
    return Case(
        "map",
        cm.save(cm.map_model(size=64, width=32), folder / "map.onnx"),
        Dataset({"input": cm.image_batch(48, size=64, seed=1)}).save(folder / "map_calib.npz"),
        Dataset({"input": cm.image_batch(64, size=64, seed=2)}).save(folder / "map_eval.npz"),
        Budget(0.02),
    )


@dataclass(frozen=True)
class CaseResult:
    """A case's ladder (names, richest first), what was tried, and the final measurements."""

    case: Case
    rungs: list[str]
    tried: dict[str, str]  # every candidate and the ladder's decision about it
    measured: dict[str, Evaluation]


class _Reader(CalibrationDataReader):  # type: ignore[misc]  # untyped base class
    def __init__(self, data: Dataset) -> None:
        self._rows = data.batches(1)

    def get_next(self) -> dict[str, object] | None:
        return next(self._rows, None)  # type: ignore[arg-type]  # numpy feed dicts


def run_case(case: Case, root: Path, args: argparse.Namespace) -> CaseResult:
    """Build the ladder (or, with --retime, take the one built before), then measure its
    rungs beside the baselines in one run."""
    out = root / "models" / case.name
    tried: dict[str, str] = {}
    if args.retime and (out / MANIFEST_FILE).exists():
        print(f"\n== {case.name}: re-timing the ladder built before in {out} ==", flush=True)
        print((out / REPORT_TEXT).read_text())
    else:
        print(f"\n== {case.name}: building the ladder ==", flush=True)
        settings = LadderSettings(
            budget=case.budget, recipe=case.recipe, threads=args.threads, rounds=5
        )
        result = build_ladder(
            case.model, out, calib=case.calib, evaluation=case.eval, settings=settings, force=True
        )
        print(result.report)
        tried = {d.name: d.reason for d in result.decisions}
    rungs = [v.name for v in read_manifest(out / MANIFEST_FILE).variants]
    model = load_model(case.model)
    logging.getLogger().setLevel(logging.ERROR)
    baselines = {STATIC: root / f"{case.name}-{STATIC}.onnx", FP16: root / f"{case.name}-fp16.onnx"}
    # onnxruntime's defaults, nothing else (QDQ, per-tensor, MinMax).
    quantize_static(
        case.model, baselines[STATIC], _Reader(load_dataset(case.calib, model.signature))
    )
    convert_fp16(model, baselines[FP16])
    inc = _neural_compressor(case, root)
    if inc is not None:
        baselines[INC] = inc
    variants = {name: out / f"{name}.onnx" for name in rungs} | baselines
    data = load_dataset(case.eval, model.signature)
    print(f"== {case.name}: final measurement, {args.rounds} interleaved rounds ==", flush=True)
    before = os.getloadavg()[0]
    measured = evaluate(
        case.model,
        variants,
        data,
        EvalSettings(threads=args.threads, rounds=args.rounds, seconds_per_round=args.seconds),
    )
    print(load_note(before, os.getloadavg()[0]))
    print_table(case.name, rungs, list(baselines), measured, args.threads)
    return CaseResult(case, rungs, tried, measured)


def load_note(before: float, after: float) -> str:
    """The machine's load around a timing run, and whether it was too busy to trust."""
    cores = len(os.sched_getaffinity(0))
    verdict = (
        "quiet enough"
        if max(before, after) <= cores
        else "TOO LOADED: others were running, the ratios are noisy (re-time on a quiet machine)"
    )
    return f"(load average {before:.1f} -> {after:.1f} on {cores} cores: {verdict})"


def _neural_compressor(case: Case, root: Path) -> Path | None:
    """onnx-neural-compressor's default static quantization, when it is installed."""
    if importlib.util.find_spec("onnx_neural_compressor") is None:
        print(f"({INC} is not installed: its column is left out)")
        return None
    try:
        from onnx_neural_compressor.quantization import (  # noqa: PLC0415 -- optional
            config,
            quantize,
        )

        target = root / f"{case.name}-{INC}.onnx"
        model = load_model(case.model)
        reader = _Reader(load_dataset(case.calib, model.signature))
        quantize(str(case.model), str(target), config.StaticQuantConfig(reader))
        return target
    # An optional comparison: whatever it raises, the benchmark goes on without it.
    except Exception as exc:
        print(f"({INC} failed: {type(exc).__name__}: {exc})")
        return None


def print_table(
    name: str, rungs: list[str], baselines: list[str], measured: dict[str, Evaluation], threads: int
) -> None:
    """Per variant: latency ratios at batch 1 and N, size, memory, accuracy or fidelity."""
    ref = measured[rungs[0]]
    batch = ref.latency.batch_size
    print(
        f"\n{name}  threads={threads}  fp32: {ref.size_bytes / 1024:.1f} KB, "
        f"{ref.latency.batch1_ms:.3f} ms at batch 1, "
        f"{(ref.latency.batch_ms or 0):.3f} ms at batch {batch}"
    )
    header = (
        f"{'variant':<24} {'b1 x':>6} {f'b{batch} x':>6} {'size x':>7} {'RSS MB':>7} "
        f"{'accuracy':>9} {'cosine':>8} {'top1 agr':>8}"
    )
    print(header)
    print("-" * len(header))
    for variant in [*rungs, *baselines]:
        e = measured[variant]
        ratio = (e.latency.batch_ms or 0) / (ref.latency.batch_ms or 1)
        acc = "-" if e.accuracy is None else f"{e.accuracy:.4f}"
        agree = "-" if e.fidelity.top1_agreement is None else f"{e.fidelity.top1_agreement:.3f}"
        label = f"{variant} *" if variant in baselines else variant
        print(
            f"{label:<24} {e.latency.batch1_ms / ref.latency.batch1_ms:6.2f} {ratio:6.2f} "
            f"{e.size_bytes / ref.size_bytes:7.2f} {e.peak_rss_mb or 0:7.1f} {acc:>9} "
            f"{e.fidelity.cosine:8.5f} {agree:>8}"
        )
    print("* not a rung: a baseline with its library's defaults, for comparison")


def _cost(e: Evaluation) -> float:
    return e.latency.batch1_ms


def residual_targets(result: CaseResult) -> list[tuple[bool, str]]:
    """At least 3 rungs each 15% faster than the one above; the lightest <= 0.4x fp32."""
    ref = result.measured[result.rungs[0]]
    steps = [
        (a, b, _step(result.measured[a], result.measured[b]))
        for a, b in itertools.pairwise(result.rungs)
    ]
    good = [s for s in steps if s[2] <= 0.85]
    lightest = result.measured[result.rungs[-1]]
    ratio = _cost(lightest) / _cost(ref)
    within = lightest.within(result.case.budget)
    text = ", ".join(f"{b} {r:.2f}x of {a}" for a, b, r in steps) or "no rung below fp32"
    return [
        (
            len(result.rungs) - 1 >= 3 and len(good) == len(steps),
            f"residual: {len(result.rungs) - 1} rungs below fp32, each step: {text} "
            "(target >= 3 rungs, each <= 0.85x, batch 1 or batch N)",
        ),
        (
            ratio <= 0.4 and within,
            f"residual: lightest {result.rungs[-1]} at {ratio:.2f}x fp32 batch-1 latency, "
            f"accuracy {lightest.accuracy or 0:.4f} vs {ref.accuracy or 0:.4f} (target <= 0.4x, "
            "within budget)",
        ),
    ]


def _step(above: Evaluation, below: Evaluation) -> float:
    b1 = below.latency.batch1_ms / above.latency.batch1_ms
    if below.latency.batch_ms is None or above.latency.batch_ms is None:
        return b1
    return min(b1, below.latency.batch_ms / above.latency.batch_ms)


def map_targets(result: CaseResult) -> list[tuple[bool, str]]:
    """A rung <= 0.85x fp32 within cosine 0.98, where plain static int8 and fp16 miss it."""
    ref = result.measured[result.rungs[0]]
    verdicts: list[tuple[bool, str]] = []
    for base in (STATIC, FP16):
        e = result.measured[base]
        verdicts.append(
            (
                e.fidelity.cosine < 0.98,
                f"map: {base} cosine {e.fidelity.cosine:.4f} at "
                f"{_cost(e) / _cost(ref):.2f}x (expected to miss 0.98)",
            )
        )
    best = None
    for name in result.rungs[1:]:
        e = result.measured[name]
        ratio = _cost(e) / _cost(ref)
        if e.fidelity.cosine >= 0.98 and (best is None or ratio < best[1]):
            best = (name, ratio, e.fidelity.cosine)
    if best is None:
        verdicts.append((False, "map: no rung within cosine 0.98 below fp32"))
    else:
        verdicts.append(
            (
                best[1] <= 0.85,
                f"map: {best[0]} at {best[1]:.2f}x fp32 latency, cosine {best[2]:.4f} "
                "(target <= 0.85x, >= 0.98)",
            )
        )
    for name in ("fp16", "int8-mixed"):
        if name in result.tried:
            verdicts.append((True, f"map: {name}: {result.tried[name]}"))
    return verdicts


if __name__ == "__main__":
    sys.exit(main())
