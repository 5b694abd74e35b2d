"""`edge-compress`: the command line over the compressor's Python API.

Each subcommand parses its arguments, calls one API function and prints a short result on
stdout; progress goes to stderr as log lines. Every CompressorError becomes a one-line
message and exit status 1; bad usage exits with 2, as argparse does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

from agent.manifest import MANIFEST_FILE, read_manifest
from compressor.candidates import Recipe
from compressor.data import Dataset, load_dataset
from compressor.distill import DistillSettings, distill
from compressor.errors import CompressorError, DataError, OutputExistsError
from compressor.evaluate import Budget, EvalSettings, Evaluation, Metric, evaluate, score
from compressor.fp16 import convert_fp16_safe
from compressor.ladder import LadderSettings, build_ladder
from compressor.logs import configure
from compressor.mixed import quantize_mixed
from compressor.model import OnnxModel, load_model
from compressor.prune.structured import prune_structured
from compressor.prune.unstructured import prune_magnitude
from compressor.quantize import (
    Calibration,
    quantize_dynamic_int8,
    quantize_int4,
    quantize_static_int8,
)
from compressor.report import table
from compressor.retime import retime
from compressor.selection import DEFAULT_MAX_RUNGS, DEFAULT_MIN_STEP, Decision, Rules
from compressor.session import agent_batch_size, agent_threads
from compressor.torch_import import examples_from_npz, export_to_onnx, is_torch_model

log = structlog.get_logger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edge-compress` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    configure(verbosity=args.verbose - args.quiet, json=args.json_logs)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except CompressorError as exc:
        log.error("command_failed", command=args.command, error=str(exc))
        print(f"edge-compress: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edge-compress: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-compress",
        description="Turn one ONNX model into a measured ladder of lighter variants.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log lines")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="fewer log lines")
    parser.add_argument("--json-logs", action="store_true", help="log lines as JSON")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _ladder_parser(commands)
    _quantize_parser(commands)
    _prune_parser(commands)
    _distill_parser(commands)
    _evaluate_parser(commands)
    _retime_parser(commands)
    return parser


def _ladder_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("ladder", help="build, measure and write a variant ladder folder")
    p.add_argument(
        "model",
        type=Path,
        help="the original .onnx model, or a PyTorch one (.pt2 torch.export program, "
        ".pt/.pth/.ts TorchScript; needs --calib or --eval for its inputs and the train extra)",
    )
    p.add_argument("--out", "-o", type=Path, required=True, help="the model folder to write")
    p.add_argument(
        "--output-names",
        type=lambda text: [n for n in text.split(",") if n],
        help="comma-separated ONNX output names for a PyTorch model (default: output)",
    )
    _data_args(p, calib_required=False)
    _budget_arg(p)
    _timing_args(p)
    p.add_argument(
        "--name",
        help="model name in the manifest (default: the --out folder's name, which the agent "
        "requires it to be)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for training and sampling")
    p.add_argument(
        "--prune-ratios",
        type=_ratios,
        default=Recipe().prune_ratios,
        help="comma-separated fractions of neurons/channels to try removing",
    )
    p.add_argument(
        "--calibrations",
        type=_calibrations,
        default=Recipe().calibrations,
        help="comma-separated static int8 calibrators to try: minmax, percentile, entropy",
    )
    p.add_argument(
        "--no-per-tensor",
        action="store_true",
        help="try static int8 weights with one scale per channel only, not also per tensor",
    )
    p.add_argument(
        "--finetune",
        action="store_true",
        help="fine-tune pruned conv variants against the original by distillation "
        "(needs the train extra: torch)",
    )
    p.add_argument(
        "--min-step",
        type=float,
        default=DEFAULT_MIN_STEP,
        help="how much cheaper (fraction) a rung must be than every richer rung in the cost "
        "it relieves: batch-1 latency, batch latency or peak memory (default 0.15)",
    )
    p.add_argument(
        "--max-rungs",
        type=int,
        default=DEFAULT_MAX_RUNGS,
        help="most variants in the ladder, the original included (default 6)",
    )
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed-precision search")
    p.add_argument("--no-plot", action="store_true", help="skip report.png")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=_run_ladder)


def _quantize_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("quantize", help="write one quantized variant")
    p.add_argument("model", type=Path)
    p.add_argument("--out", "-o", type=Path, required=True, help="the .onnx file to write")
    p.add_argument(
        "--mode",
        choices=("dynamic", "static", "mixed", "int4", "fp16"),
        default="dynamic",
        help="dynamic int8 (MatMul/Gemm), static int8 QDQ, mixed int8/float, int4, fp16",
    )
    _data_args(p, calib_required=False)
    p.add_argument(
        "--method",
        choices=[c.value for c in Calibration],
        default=Calibration.MINMAX.value,
        help="activation calibration for static/mixed",
    )
    p.add_argument(
        "--ops",
        default="MatMul,Gemm",
        help="dynamic mode: operator types to quantize (Conv is measured to be slower)",
    )
    p.add_argument(
        "--per-tensor",
        action="store_true",
        help="static mode: one scale per weight tensor instead of one per output channel",
    )
    p.add_argument("--block-size", type=int, default=32, help="int4 block size")
    _budget_arg(p)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=_run_quantize)


def _prune_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("prune", help="write one pruned variant")
    p.add_argument("model", type=Path)
    p.add_argument("--out", "-o", type=Path, required=True, help="the .onnx file to write")
    p.add_argument(
        "--method",
        choices=("structured", "magnitude"),
        default="structured",
        help="remove neurons/channels (faster) or zero small weights (smaller when zipped)",
    )
    p.add_argument("--ratio", type=float, default=0.5, help="fraction to remove")
    p.add_argument("--calib", type=Path, help="calibration .npz for scores and the refit")
    p.add_argument("--no-correct", action="store_true", help="skip the least-squares refit")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=_run_prune)


def _distill_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("distill", help="train a smaller MLP student with the same signature")
    p.add_argument("model", type=Path)
    p.add_argument("--out", "-o", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--calib", type=Path, required=True, help="inputs to train on (.npz)")
    p.add_argument("--hidden", type=_widths, default=(32,), help="hidden widths, e.g. 64,32")
    p.add_argument("--augment", type=int, default=32, help="synthetic rows per real row")
    p.add_argument("--max-iter", type=int, default=300, help="training epochs at most")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=_run_distill)


def _evaluate_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("evaluate", help="measure variants against the original")
    p.add_argument("model", type=Path, help="the original .onnx model")
    p.add_argument("variants", type=Path, nargs="*", help="variant .onnx files")
    p.add_argument("--eval", type=Path, required=True, help="evaluation .npz (labels optional)")
    _budget_arg(p)
    _timing_args(p)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(handler=_run_evaluate)


def _data_args(p: argparse.ArgumentParser, calib_required: bool) -> None:
    p.add_argument("--calib", type=Path, required=calib_required, help="calibration .npz")
    p.add_argument("--eval", type=Path, help="evaluation .npz, with 'labels' for accuracy")


def _retime_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "retime",
        help="time a model folder's variants again on this machine and rewrite the latency "
        "figures of its manifest (do it on the device that serves them)",
    )
    p.add_argument("folder", type=Path, help="a model folder with a manifest.json")
    p.add_argument(
        "--sample", type=Path, help="inputs to time on (.npz; default: zeros of the signature)"
    )
    _timing_args(p)
    p.set_defaults(handler=_run_retime)


def _budget_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--budget",
        type=float,
        default=0.01,
        help="quality a variant may lose: accuracy points with labels, else 1 - cosine "
        "(default 0.01: one point of accuracy, or cosine 0.99); with --metric, 1 - that figure",
    )
    p.add_argument(
        "--metric",
        choices=[m.value for m in Metric],
        default=Metric.AUTO.value,
        help="what quality means: accuracy (labels), cosine, top1 (agreement with the "
        "original's class), iou (of the sigmoid maps thresholded at 0.5), box-iou (mean IoU "
        "of a YOLO-style head's boxes after NMS); auto: accuracy with labels, else cosine",
    )


def _timing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=int, default=None, help="intra-op threads (default: as the agent)"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=agent_batch_size(),
        help="the agent's batch size: timed, and the batch peak memory is measured at "
        "(default: the agent's models.max_batch_size default)",
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS probe")


def _run_ladder(args: argparse.Namespace) -> int:
    settings = LadderSettings(
        budget=Budget(args.budget, Metric(args.metric)),
        recipe=Recipe(
            prune_ratios=args.prune_ratios,
            calibrations=args.calibrations,
            per_tensor=not args.no_per_tensor,
            finetune=args.finetune,
            seed=args.seed,
        ),
        threads=args.threads or agent_threads(),
        batch_size=args.batch,
        rules=_rules(args.min_step, args.max_rungs),
        rounds=args.rounds,
        measure_memory=not args.no_memory,
        mixed=not args.no_mixed,
        plot=not args.no_plot,
    )
    with tempfile.TemporaryDirectory(prefix="edge-compress-torch-") as tmp:
        model = args.model
        if is_torch_model(model):  # exported to ONNX first (compressor/torch_import.py)
            data = args.calib or args.eval
            examples = examples_from_npz(data) if data else {}
            model = export_to_onnx(model, Path(tmp) / f"{model.stem}.onnx", examples,
                                   args.output_names)  # fmt: skip
        result = build_ladder(
            model,
            args.out,
            calib=args.calib,
            evaluation=args.eval,
            settings=settings,
            name=args.name,
            force=args.force,
        )
    print(result.report, end="")
    print(f"wrote {result.out} ({len(result.manifest.variants)} variants)")
    return 0


def _run_quantize(args: argparse.Namespace) -> int:
    _refuse_existing(args.out, args.force)
    model = load_model(args.model)
    method = Calibration(args.method)
    if args.mode == "dynamic":
        out = quantize_dynamic_int8(model, args.out, op_types=_ops(args.ops))
    elif args.mode == "int4":
        out = quantize_int4(model, args.out, block_size=args.block_size)
    elif args.mode == "fp16":
        calib = load_dataset(args.calib, model.signature) if args.calib else None
        out, plan = convert_fp16_safe(model, args.out, calib)
        for node, reason in plan.blocked.items():
            print(f"kept in float32: {node}: {reason}")
    elif args.mode == "static":
        out = quantize_static_int8(
            model, args.out, _calibration(args, model), method, per_channel=not args.per_tensor
        )
    else:
        out = _mixed(args, model, method)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


def _mixed(args: argparse.Namespace, model: OnnxModel, method: Calibration) -> Path:
    calib = _calibration(args, model)
    check = load_dataset(args.eval, model.signature) if args.eval else calib
    budget = Budget(args.budget, Metric(args.metric))

    def meets(path: Path) -> bool:
        return score(model.path, {"m": path}, check, agent_threads())["m"].within(budget)

    result = quantize_mixed(model, args.out, calib, meets, method=method)
    print(f"kept in float: {', '.join(result.float_layers)}")
    return result.path


def _run_prune(args: argparse.Namespace) -> int:
    _refuse_existing(args.out, args.force)
    model = load_model(args.model)
    if args.method == "magnitude":
        result = prune_magnitude(model, args.out, args.ratio)
    else:
        calib = load_dataset(args.calib, model.signature) if args.calib else None
        result = prune_structured(model, args.out, args.ratio, calib, correct=not args.no_correct)
    for layer in result.layers:
        print(f"{layer.name}: {layer.before} -> {layer.after}")
    print(f"wrote {result.path} (sparsity {result.sparsity:.3f})")
    return 0


def _run_distill(args: argparse.Namespace) -> int:
    _refuse_existing(args.out, args.force)
    model = load_model(args.model)
    settings = DistillSettings(
        hidden=args.hidden, augment=args.augment, max_iter=args.max_iter, seed=args.seed
    )
    out = distill(model, args.out, load_dataset(args.calib, model.signature), settings)
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    data = load_dataset(args.eval, model.signature)
    variants = {"original": model.path}
    for path in args.variants:
        load_model(path)  # a clear error for a bad variant before any timing starts
        variants[path.stem if path.stem not in variants else str(path)] = path
    settings = EvalSettings(
        threads=args.threads or agent_threads(),
        batch_size=args.batch,
        rounds=args.rounds,
        measure_memory=not args.no_memory,
    )
    results = evaluate(model.path, variants, data, settings)
    budget = Budget(args.budget, Metric(args.metric))
    if args.json:
        print(json.dumps({n: _as_json(e, budget) for n, e in results.items()}, indent=2))
        return 0
    decisions = [
        Decision(n, e.within(budget), "within budget" if e.within(budget) else "over budget")
        for n, e in results.items()
    ]
    print(table("original", results, results, decisions), end="")
    return 0


def _as_json(e: Evaluation, budget: Budget) -> dict[str, object]:
    return {
        "file": str(e.path),
        "size_bytes": e.size_bytes,
        "accuracy": e.accuracy,
        "reference_accuracy": e.reference_accuracy,
        "cosine": e.fidelity.cosine,
        "min_cosine": e.fidelity.min_cosine,
        "top1_agreement": e.fidelity.top1_agreement,
        "map_iou": e.fidelity.map_iou,
        "box_iou": e.fidelity.box_iou,
        "max_abs_error": e.fidelity.max_abs_error,
        "latency_ms": e.latency.batch1_ms,
        "batch_latency_ms": e.latency.batch_ms,
        "batch_size": e.latency.batch_size,
        "peak_rss_mb": e.peak_rss_mb,
        "within_budget": e.within(budget),
    }


def _run_retime(args: argparse.Namespace) -> int:
    from compressor.latency import LatencySettings  # noqa: PLC0415 -- this command only
    from compressor.model import Signature  # noqa: PLC0415

    manifest = read_manifest(args.folder / MANIFEST_FILE)
    sample = None
    if args.sample is not None:
        signature = Signature(tuple(manifest.inputs), tuple(manifest.outputs))
        sample = load_dataset(args.sample, signature)
    settings = LatencySettings(
        threads=args.threads if args.threads is not None else agent_threads(),
        batch_size=args.batch,
        rounds=args.rounds,
    )
    for row in retime(args.folder, settings, sample):
        before = f"{row.before_ms:.3f}" if row.before_ms is not None else "-"
        after = f"{row.after_ms:.3f}" if row.after_ms is not None else "not timed"
        print(f"{row.name:<24} {before:>10} -> {after} ms")
    return 0


def _calibration(args: argparse.Namespace, model: OnnxModel) -> Dataset:
    if args.calib is None:
        raise DataError(f"--mode {args.mode} needs calibration data: pass --calib FILE.npz")
    return load_dataset(args.calib, model.signature)


def _refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")


def _rules(min_step: float, max_rungs: int) -> Rules:
    try:
        return Rules(min_step=min_step, max_rungs=max_rungs)
    except ValueError as exc:
        raise DataError(f"ladder rules: {exc}") from None


def _ops(text: str) -> tuple[str, ...]:
    return tuple(op.strip() for op in text.split(",") if op.strip())


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError("ratios are fractions between 0 and 1")
    return values


def _calibrations(text: str) -> tuple[Calibration, ...]:
    try:
        return tuple(Calibration(v.strip()) for v in text.split(",") if v.strip())
    except ValueError:
        names = ", ".join(c.value for c in Calibration)
        raise argparse.ArgumentTypeError(f"calibrators are {names}; got {text!r}") from None


def _widths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("hidden widths are positive integers")
    return values


if __name__ == "__main__":
    sys.exit(main())
