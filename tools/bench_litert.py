"""Benchmark the LiteRT runtime: its run() beside the interpreter's own invoke() and beside the
same network in ONNX on onnxruntime (raw session.run and the agent's variant), same threads.

Usage: .venv/bin/python tools/bench_litert.py [--threads N] [--rounds R] [--seconds S]

One process, interleaved rounds (medians, so every contender shares the machine's noise), at
batch 1 and 32 on an FP32 MLP 64-256-256-10. It prints per-call latency, the agent's overhead
over each library, then throughput of two client threads on one interpreter (runs take
turns) against a pool of two, and the RSS each interpreter adds. The MQTT layer is not in
this figure (edge-agent bench measures it end to end).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import structlog
from ai_edge_litert.interpreter import Interpreter
from onnx import TensorProto, helper, numpy_helper

from agent.manifest import RuntimeOptions
from agent.runtime import Runtime, load_variant
from agent.session import PROVIDERS, SessionSettings, session_options

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.tflite_models import mlp_tflite

WIDTHS = (64, 256, 256, 10)


def layers(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random weights [out, in] and biases of the MLP, shared by both formats."""
    rng = np.random.default_rng(seed)
    return [
        (
            (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32),
            rng.standard_normal(n).astype(np.float32) * 0.1,
        )
        for k, n in itertools.pairwise(WIDTHS)
    ]


def onnx_mlp(path: Path, weights: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """The same network as Gemm(transB=1) -> Relu ... -> Gemm, input x, output y."""
    nodes, inits = [], []
    current = "x"
    for i, (w, b) in enumerate(weights):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == len(weights) - 1
        out = "y" if last else f"g{i}"
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out], transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"]))
            out = f"h{i}"
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", WIDTHS[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", WIDTHS[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def per_call_us(fn: Callable[[], object], seconds: float) -> float:
    """Median of per-call times (microseconds) over `seconds` of calls."""
    times = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def throughput(variant: Runtime, x: np.ndarray, clients: int, seconds: float) -> float:
    """Runs per second from `clients` threads calling run() at once."""
    counts = [0] * clients
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        while time.monotonic() < deadline:
            variant.run({"x": x})
            counts[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds


def bench_pools(
    tfl: Path, settings: SessionSettings, rounds: int, seconds: float
) -> dict[int, Runtime]:
    """Throughput of two client threads on one interpreter (a lock) and on a pool of two."""
    print("\n== two client threads: one interpreter (a lock) vs a pool of two ==")
    pools = {
        n: load_variant("b", f"pool{n}", tfl, settings, options=RuntimeOptions(interpreters=n))
        for n in (1, 2)
    }
    rates: dict[tuple[int, int], list[float]] = {}
    for _ in range(rounds):
        for batch in (1, 256):
            x = np.random.default_rng(0).standard_normal((batch, WIDTHS[0]))
            x = x.astype(np.float32)
            for n, variant in pools.items():
                rate = throughput(variant, x, clients=2, seconds=seconds)
                rates.setdefault((n, batch), []).append(rate)
    for n, variant in pools.items():
        rss = getattr(variant, "rss_mb", None) or 0.0  # LiteRTVariant measures its own
        print(f"interpreters={n}: batch 1 {statistics.median(rates[(n, 1)]):8.0f} runs/s, "
              f"batch 256 {statistics.median(rates[(n, 256)]):6.0f} runs/s, "
              f"load RSS {rss:.1f} MiB ({rss / n:.1f} per interpreter)")
    return pools


def main() -> int:
    """Build both formats, time every contender in interleaved rounds, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.3, help="seconds per measurement")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    settings = SessionSettings(threads=args.threads)
    weights = layers()
    with tempfile.TemporaryDirectory(prefix="bench-litert-") as tmp:
        tfl = mlp_tflite(Path(tmp) / "mlp.tflite", weights)
        onx = onnx_mlp(Path(tmp) / "mlp.onnx", weights)
        agent_tfl = load_variant("b", "tflite", tfl, settings)
        agent_onnx = load_variant("b", "onnx", onx, settings)
        interp = Interpreter(model_path=str(tfl), num_threads=args.threads)
        interp.allocate_tensors()
        # A signature runner holds the interpreter's wrapper, after which LiteRT refuses a
        # resize on that interpreter: the runner gets its own.
        runner = Interpreter(model_path=str(tfl), num_threads=args.threads).get_signature_runner()
        session = ort.InferenceSession(
            str(onx), sess_options=session_options(settings), providers=PROVIDERS
        )
        in_index = interp.get_input_details()[0]["index"]
        out_index = interp.get_output_details()[0]["index"]
        results: dict[tuple[str, int], list[float]] = {}
        for batch in (1, 32):
            x = np.random.default_rng(batch).standard_normal((batch, WIDTHS[0]))
            x = x.astype(np.float32)
            np.testing.assert_allclose(
                agent_tfl.run({"x": x})[0], agent_onnx.run({"x": x})[0], rtol=1e-4, atol=1e-4
            )
            interp.resize_tensor_input(in_index, list(x.shape))
            interp.allocate_tensors()

            def invoke(x: np.ndarray = x) -> object:
                interp.set_tensor(in_index, x)
                interp.invoke()
                return interp.get_tensor(out_index)

            contenders: dict[str, Callable[[], object]] = {
                "litert invoke()": invoke,
                "litert signature runner": lambda x=x: runner(x=x),
                "agent LiteRTVariant.run": lambda x=x: agent_tfl.run({"x": x}),
                "onnxruntime session.run": lambda x=x: session.run(None, {"x": x}),
                "agent onnx variant.run": lambda x=x: agent_onnx.run({"x": x}),
            }
            for _ in range(args.rounds):
                for name, fn in contenders.items():
                    results.setdefault((name, batch), []).append(per_call_us(fn, args.seconds))
        # The best round of each contender: on a shared machine other load only ever adds.
        best = {key: min(v) for key, v in results.items()}
        print(f"== per-call latency, us: the best of {args.rounds} rounds' medians "
              f"(threads={args.threads}) ==")
        print(f"{'contender':28s} {'batch 1':>10s} {'batch 32':>10s}")
        for name in dict.fromkeys(n for n, _ in results):
            print(f"{name:28s} {best[(name, 1)]:10.1f} {best[(name, 32)]:10.1f}")
        print("\n== what the agent adds over its library, us ==")
        for batch in (1, 32):
            lite = best[("agent LiteRTVariant.run", batch)] - best[("litert invoke()", batch)]
            ortx = best[("agent onnx variant.run", batch)]
            ortx -= best[("onnxruntime session.run", batch)]
            # Noise: how far the raw invoke's rounds spread (its median minus its best).
            raw = results[("litert invoke()", batch)]
            noise = statistics.median(raw) - min(raw)
            verdict = "MET" if lite <= ortx else (
                f"within noise ({noise:.1f})" if lite <= ortx + noise else "MISS"
            )
            print(f"batch {batch:2d}: over LiteRT {lite:+.1f}, over onnxruntime {ortx:+.1f}  "
                  f"[{verdict}: the agent adds no more over LiteRT than over onnxruntime]")

        pools = bench_pools(tfl, settings, args.rounds, args.seconds)
        for variant in (*pools.values(), agent_tfl, agent_onnx):
            variant.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
