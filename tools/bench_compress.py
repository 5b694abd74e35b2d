"""Benchmark edge-compress against plain `quantize_dynamic` on the digits MLP and a CNN.

Usage: .venv/bin/python tools/bench_compress.py [--threads N] [--rounds R] [--keep DIR]

For each model it builds the ladder with `edge-compress`'s API, then measures every rung
beside onnxruntime's `quantize_dynamic` with default settings, all in one interleaved run
(medians over rounds, so the variants share the machine's noise), and prints per variant
the size ratio, the latency ratio at batch 1 and 64, and accuracy or fidelity. It ends with
the targets of issue 3, each marked met or missed.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from onnxruntime.quantization import quantize_dynamic

from agent.manifest import MANIFEST_FILE, read_manifest
from compressor.data import Dataset, load_dataset
from compressor.evaluate import Budget, EvalSettings, Evaluation, evaluate
from compressor.ladder import LadderSettings, build_ladder
from compressor.logs import configure
from compressor.model import load_model
from compressor.session import agent_threads

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compress_models as cm

BASELINE = "ort-dynamic-default"


@dataclass(frozen=True)
class Case:
    """One model to benchmark, with its data."""

    name: str
    model: Path
    calib: Path
    eval: Path


def main() -> int:
    """Build both cases, run the ladders, print the tables and the targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=agent_threads())
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    parser.add_argument("--seconds", type=float, default=0.3, help="seconds per measurement")
    parser.add_argument("--keep", type=Path, help="write the ladders here instead of a temp dir")
    parser.add_argument("-v", "--verbose", action="count", default=-1)
    args = parser.parse_args()
    configure(verbosity=args.verbose)
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        results = [
            run_case(case, root, args)
            for case in (digits_case(root / "inputs"), cnn_case(root / "inputs"))
        ]
    print("\n== targets ==")
    verdicts = [*digits_targets(results[0]), *cnn_targets(results[1])]
    for met, text in verdicts:
        print(f"[{'MET ' if met else 'MISS'}] {text}")
    return 0


def digits_case(folder: Path) -> Case:
    """The demo form of the digits MLP (Gemm -> Relu -> Gemm -> Softmax, 100 neurons)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = cm.digits_data(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning is irrelevant here
        mlp = cm.train_digits_mlp(data, hidden=100, seed=0)
    return Case(
        "digits",
        cm.save(cm.digits_gemm_model(mlp), folder / "digits.onnx"),
        Dataset({"input": data.x_calib}).save(folder / "digits_calib.npz"),
        Dataset({"input": data.x_eval}, data.y_eval).save(folder / "digits_eval.npz"),
    )


def cnn_case(folder: Path) -> Case:
    """A conv classifier on 1x3x64x64 whose cost is in 3x3 convs over 32-128 channels."""
    folder.mkdir(parents=True, exist_ok=True)
    model = cm.cnn_model(channels=(32, 64, 128, 128), size=64, stem_stride=2)
    return Case(
        "cnn",
        cm.save(model, folder / "cnn.onnx"),
        Dataset({"input": cm.image_batch(64, size=64, seed=1)}).save(folder / "cnn_calib.npz"),
        Dataset({"input": cm.image_batch(128, size=64, seed=2)}).save(folder / "cnn_eval.npz"),
    )


@dataclass(frozen=True)
class CaseResult:
    """A case's ladder (names, richest first) and the final interleaved measurements."""

    case: Case
    rungs: list[str]
    measured: dict[str, Evaluation]


def run_case(case: Case, root: Path, args: argparse.Namespace) -> CaseResult:
    """Build the ladder, then measure its rungs beside the baseline in one run."""
    print(f"\n== {case.name}: building the ladder ==", flush=True)
    out = root / "models" / case.name
    settings = LadderSettings(threads=args.threads, rounds=5)
    result = build_ladder(
        case.model, out, calib=case.calib, evaluation=case.eval, settings=settings, force=True
    )
    print(result.report)
    manifest = read_manifest(out / MANIFEST_FILE)
    rungs = [v.name for v in manifest.variants]
    baseline = root / f"{case.name}-{BASELINE}.onnx"
    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(case.model, baseline)  # onnxruntime's defaults, nothing else
    variants = {name: out / f"{name}.onnx" for name in rungs} | {BASELINE: baseline}
    data = load_dataset(case.eval, load_model(case.model).signature)
    print(f"== {case.name}: final measurement, {args.rounds} interleaved rounds ==", flush=True)
    measured = evaluate(
        case.model,
        variants,
        data,
        EvalSettings(threads=args.threads, rounds=args.rounds, seconds_per_round=args.seconds),
    )
    print_table(case.name, rungs, measured, args.threads)
    return CaseResult(case, rungs, measured)


def print_table(name: str, rungs: list[str], measured: dict[str, Evaluation], threads: int) -> None:
    """Per variant: size ratio, latency ratios at batch 1 and 64, accuracy or fidelity."""
    ref = measured[rungs[0]]
    print(
        f"\n{name}  threads={threads}  "
        f"fp32: {ref.size_bytes / 1024:.1f} KB, {ref.latency.batch1_ms:.4f} ms at batch 1, "
        f"{(ref.latency.batch_ms or 0):.4f} ms at batch {ref.latency.batch_size}"
    )
    header = (
        f"{'variant':<20} {'size x':>7} {'b1 x':>6} {'b64 x':>6} {'accuracy':>9} "
        f"{'cosine':>8} {'top1 agr':>8} {'RSS MB':>7}"
    )
    print(header)
    print("-" * len(header))
    for variant in [*rungs, BASELINE]:
        e = measured[variant]
        batch = (e.latency.batch_ms or 0) / (ref.latency.batch_ms or 1)
        acc = "-" if e.accuracy is None else f"{e.accuracy:.4f}"
        agree = "-" if e.fidelity.top1_agreement is None else f"{e.fidelity.top1_agreement:.3f}"
        label = variant if variant != BASELINE else f"{BASELINE} *"
        print(
            f"{label:<20} {e.size_bytes / ref.size_bytes:7.2f} "
            f"{e.latency.batch1_ms / ref.latency.batch1_ms:6.2f} {batch:6.2f} {acc:>9} "
            f"{e.fidelity.cosine:8.5f} {agree:>8} {e.peak_rss_mb or 0:7.1f}"
        )
    print("* not a rung: onnxruntime's quantize_dynamic with default settings, for comparison")


def ladder_monotone(result: CaseResult) -> tuple[bool, str]:
    """Whether every rung is faster (either batch) or smaller than the one above it."""
    bad = []
    for above, below in itertools.pairwise(result.rungs):
        a, b = result.measured[above], result.measured[below]
        faster = b.latency.batch1_ms < a.latency.batch1_ms or (
            (b.latency.batch_ms or 0) < (a.latency.batch_ms or 0)
        )
        if not (faster or b.size_bytes < a.size_bytes):
            bad.append(f"{below} after {above}")
    text = f"{result.case.name}: every rung faster or smaller than the one above"
    return not bad, text + (f" (not: {', '.join(bad)})" if bad else "")


def digits_targets(result: CaseResult) -> list[tuple[bool, str]]:
    """Digits: a pruned or distilled rung within 1 point at <= 0.6x batch latency."""
    ref = result.measured[result.rungs[0]]
    verdicts = [ladder_monotone(result)]
    for base_name in [result.rungs[0], "fp32-ftz"]:
        base = result.measured.get(base_name)
        if base is None or base.latency.batch_ms is None or ref.accuracy is None:
            continue
        best = None
        for name in result.rungs:
            e = result.measured[name]
            if not name.startswith(("pruned", "distilled")) or e.latency.batch_ms is None:
                continue
            ratio = e.latency.batch_ms / base.latency.batch_ms
            if e.within(Budget(0.01)) and (best is None or ratio < best[1]):
                best = (name, ratio, e.accuracy or 0)
        if best is None:
            text = f"digits: no pruned/distilled rung within 1 point ({base_name})"
            verdicts.append((False, text))
            continue
        verdicts.append(
            (
                best[1] <= 0.6,
                f"digits: {best[0]} accuracy {best[2]:.4f} vs {ref.accuracy:.4f}, "
                f"batch-64 latency {best[1]:.2f}x {base_name} (target <= 0.6x)",
            )
        )
    return verdicts


def cnn_targets(result: CaseResult) -> list[tuple[bool, str]]:
    """CNN: the int8 rung at <= 0.75x fp32 latency with cosine >= 0.99."""
    ref = result.measured[result.rungs[0]]
    verdicts = [ladder_monotone(result)]
    int8 = [n for n in result.rungs if n.startswith("int8")]
    if not int8:
        return [*verdicts, (False, "cnn: no int8 rung in the ladder")]
    e = result.measured[int8[0]]
    b1 = e.latency.batch1_ms / ref.latency.batch1_ms
    b64 = (e.latency.batch_ms or 0) / (ref.latency.batch_ms or 1)
    met = b1 <= 0.75 and b64 <= 0.75 and e.fidelity.cosine >= 0.99
    verdicts.append(
        (
            met,
            f"cnn: {int8[0]} latency {b1:.2f}x (batch 1) / {b64:.2f}x (batch 64), "
            f"cosine {e.fidelity.cosine:.5f} (target <= 0.75x, >= 0.99)",
        )
    )
    base = result.measured[BASELINE]
    verdicts.append(
        (
            True,
            f"cnn: for comparison {BASELINE} runs at "
            f"{base.latency.batch1_ms / ref.latency.batch1_ms:.2f}x / "
            f"{(base.latency.batch_ms or 0) / (ref.latency.batch_ms or 1):.2f}x, "
            f"cosine {base.fidelity.cosine:.5f}",
        )
    )
    return verdicts


if __name__ == "__main__":
    sys.exit(main())
