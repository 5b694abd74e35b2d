"""Benchmark the LiteRT runtime: the agent serving a TFLite model beside the LiteRT interpreter's
own invoke() and beside the same network in ONNX on onnxruntime, same threads, in one run.

Usage: .venv/bin/python tools/bench_litert.py [--threads N] [--rounds R] [--calls C]

The network is an FP32 MLP 64-256-256-10, at batch 1 and 8 (8 is the most rows the agent
runs on the caller's thread). Every contender gets the same prebuilt inputs. The agent's
spans and their floors run on the very interpreter or session the model manager loaded (two
instances of one model can differ by more than what is measured here). What each covers:

  litert invoke()         set_tensor, invoke, get_tensor: LiteRT's public Python API, on
                          an interpreter of its own
  litert native calls     the same three calls on that interpreter's native wrapper
                          (invoke() minus this is LiteRT's Python layer)
  litert native, agent's interpreter
                          the three native calls on the agent's interpreter (whose public
                          invoke() refuses to run once the agent holds its wrapper); plus
                          LiteRT's Python layer, the floor "LiteRT invoke()" of the agent
  litert signature runner runner(x=x), LiteRT's other public way (not the agent's)
  agent LiteRT run        LiteRTVariant.run: the pool, the input check, the three calls
  agent LiteRT serving    ModelManager.submit of a decoded request, run on the caller's
                          thread: the check against the manifest, the lease, the run, the
                          reply's outputs, the stats
  onnxruntime run         session.run(None, feeds) on the agent's session: onnxruntime's
                          public Python API
  onnxruntime C++ run     session._sess.run: the same without onnxruntime's Python checks
  agent ONNX run          LoadedVariant.run
  agent ONNX serving      as agent LiteRT serving, on the ONNX model
  pause; pause, X         25 us busy, alone and before X: a call that follows other work,
                          as in serving, may cost more than one in a tight loop (caches;
                          thread pools whose workers went to sleep)

Rounds interleave every contender in a new random order; each times a block of `calls` calls
by the wall clock and by this thread's CPU time (which leaves out time the shared machine
gave to other processes; with threads > 1 it misses the worker threads, so read the wall).
Figures are medians over rounds; "adds" figures are medians of per-round differences, with a
95% confidence interval of that median. Then two client threads on one interpreter (runs take
turns) against a pool of two, and the RSS each interpreter adds. The MQTT layer is not in
these figures (edge-agent bench measures it end to end).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import structlog
from ai_edge_litert.interpreter import Interpreter
from onnx import TensorProto, helper, numpy_helper

from agent.batching import Completed, Outcome
from agent.config import ModelsConfig
from agent.manifest import RuntimeOptions
from agent.models import ModelManager
from agent.protocol import InferenceRequest
from agent.repository import scan
from agent.runtime import Runtime, load_variant
from agent.session import SessionSettings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.tflite_models import mlp_tflite

WIDTHS = (64, 256, 256, 10)
BATCHES = (1, 8)
PAUSE_US = 25.0  # about what the agent's serving path spends around a run
AGENTS_NATIVE = "litert native, agent's interpreter"
Samples = dict[str, list[float]]


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


def timed_rounds(
    contenders: dict[str, Callable[[], object]], rounds: int, calls: int
) -> tuple[Samples, Samples]:
    """Per-call microseconds of every contender in every round, by the wall clock and by
    this thread's CPU time; each round runs the contenders in a new random order."""
    wall: Samples = {name: [] for name in contenders}
    cpu: Samples = {name: [] for name in contenders}
    order = list(contenders)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            fn = contenders[name]
            w0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(calls):
                fn()
            c1, w1 = time.thread_time(), time.perf_counter()
            wall[name].append((w1 - w0) / calls * 1e6)
            cpu[name].append((c1 - c0) / calls * 1e6)
    return wall, cpu


def median_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """The median and a 95% confidence interval of it (order statistics, no assumption on
    the distribution)."""
    ordered = sorted(values)
    n = len(ordered)
    k = max(0, math.floor(n / 2 - 0.98 * math.sqrt(n)))
    return statistics.median(ordered), ordered[k], ordered[n - 1 - k]


def pause(us: float = PAUSE_US) -> None:
    """Busy for `us` microseconds, as the agent is between runs (decoding, checking)."""
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


def after_pause(call: Callable[[], object]) -> Callable[[], object]:
    """`call`, each time after a pause."""

    def paused() -> object:
        pause()
        return call()

    return paused


def served_call(manager: ModelManager, model: str, x: np.ndarray) -> Callable[[], object]:
    """One request through ModelManager.submit, which must answer on the caller's thread
    (the span then holds all the agent does for a request short of MQTT)."""
    outcomes: list[Outcome] = []
    request = InferenceRequest(None, {"x": x}, {"x": "FP32"})
    for _ in range(200):  # evidence that runs are short, after which small ones run inline
        before = len(outcomes)
        manager.submit(model, request, outcomes.append)
        deadline = time.monotonic() + 10.0
        while len(outcomes) == before and time.monotonic() < deadline:
            time.sleep(0.0005)
    before = len(outcomes)
    manager.submit(model, request, outcomes.append)
    if len(outcomes) != before + 1 or not isinstance(outcomes[-1], Completed):
        raise SystemExit(f"{model}: the request did not run on the caller's thread")
    outcomes.clear()

    def call() -> object:
        manager.submit(model, request, outcomes.append)
        return outcomes.pop()

    return call


def contenders_at(
    batch: int, tfl: Path, threads: int, manager: ModelManager
) -> dict[str, Callable[[], object]]:
    """Every contender on the same input of `batch` rows (answers checked against each
    other first). The agent's spans and their floors run on the same interpreter or session,
    the one the model manager loaded: two instances of one model can differ by more than
    what is measured here."""
    x = np.random.default_rng(batch).standard_normal((batch, WIDTHS[0])).astype(np.float32)
    feeds = {"x": x}
    lite, onnx_variant = (runtime_of(manager, name) for name in ("lite", "onnx"))
    agent = lite._pool.get()  # private: the interpreter the agent runs
    lite._pool.put(agent)
    out = agent._out_index["y"]
    own_set, own_invoke, own_get = agent._set_tensor, agent._invoke, agent._get_tensor
    session = onnx_variant._session  # private: the session the agent runs
    cxx = session._sess  # private: under onnxruntime's Python checks
    interp = Interpreter(model_path=str(tfl), num_threads=threads)
    interp.resize_tensor_input(0, list(x.shape))
    interp.allocate_tensors()
    # A signature runner holds the interpreter's wrapper, after which LiteRT refuses a
    # resize on that interpreter: the runner gets its own.
    runner = Interpreter(model_path=str(tfl), num_threads=threads).get_signature_runner()

    def litert_invoke() -> object:
        interp.set_tensor(0, x)
        interp.invoke()
        return interp.get_tensor(out)

    def litert_native() -> object:
        # Looked up each call: holding the wrapper would fail invoke()'s check.
        interp._interpreter.SetTensor(0, x)
        interp._interpreter.Invoke()
        return interp._interpreter.GetTensor(out, 0)

    def agents_native() -> object:
        own_set(0, x)
        own_invoke()
        return own_get(out)

    contenders: dict[str, Callable[[], object]] = {
        "litert invoke()": litert_invoke,
        "litert native calls": litert_native,
        "litert signature runner": lambda: runner(x=x),
        AGENTS_NATIVE: agents_native,
        "agent LiteRT run": lambda: lite.run(feeds),
        "agent LiteRT serving": served_call(manager, "lite", x),
        "onnxruntime run": lambda: session.run(None, feeds),
        "onnxruntime C++ run": lambda: cxx.run(["y"], feeds, None),
        "agent ONNX run": lambda: onnx_variant.run(feeds),
        "agent ONNX serving": served_call(manager, "onnx", x),
        "pause": pause,
        f"pause, {AGENTS_NATIVE}": after_pause(agents_native),
        "pause, onnxruntime run": after_pause(lambda: session.run(None, feeds)),
    }
    want = session.run(None, feeds)[0]
    for name, fn in contenders.items():
        if name != "pause":
            np.testing.assert_allclose(answer(fn()), want, rtol=1e-4, atol=1e-4, err_msg=name)
    return contenders


def runtime_of(manager: ModelManager, model: str) -> Any:
    """The runtime serving `model` (Any: the benchmark reaches into its private parts)."""
    handle = manager.get(model).active
    assert handle is not None
    return handle.runtime


def answer(out: object) -> np.ndarray:
    """The output array of whichever contender returned `out`."""
    if isinstance(out, Completed):
        return out.outputs["y"]
    if isinstance(out, dict):  # a signature runner's outputs by name
        return np.asarray(next(iter(out.values())))
    if isinstance(out, list):
        return np.asarray(out[0])
    return np.asarray(out)


Terms = dict[str, float]
# LiteRT's invoke() on the agent's interpreter, which the agent's native wrapper makes
# impossible to call: the native calls there, plus what invoke() adds to them elsewhere.
INVOKE_ON_THE_AGENTS: Terms = {AGENTS_NATIVE: 1, "litert invoke()": 1, "litert native calls": -1}
# The same after a pause, less the pause.
PAUSED_INVOKE: Terms = {
    f"pause, {AGENTS_NATIVE}": 1, "pause": -1, "litert invoke()": 1, "litert native calls": -1
}
PAUSED_ONNX: Terms = {"pause, onnxruntime run": 1, "pause": -1}


def minus(span: str | Terms, floor: str | Terms) -> Terms:
    """`span` minus `floor`, each a contender or a sum of them."""
    terms: Terms = {span: 1.0} if isinstance(span, str) else dict(span)
    for name, k in ({floor: 1.0} if isinstance(floor, str) else floor).items():
        terms[name] = terms.get(name, 0.0) - k
    return terms


def combined(samples: Samples, terms: Terms) -> list[float]:
    """Per round, the sum of each contender's figure times its factor (same round, so the
    same load)."""
    rounds = len(next(iter(samples.values())))
    return [sum(k * samples[name][r] for name, k in terms.items()) for r in range(rounds)]


ADDS: list[tuple[str, Terms]] = [
    ("run over LiteRT invoke()", minus("agent LiteRT run", INVOKE_ON_THE_AGENTS)),
    ("run over onnxruntime run", minus("agent ONNX run", "onnxruntime run")),
    ("serving over LiteRT invoke()", minus("agent LiteRT serving", INVOKE_ON_THE_AGENTS)),
    ("serving over onnxruntime run", minus("agent ONNX serving", "onnxruntime run")),
    ("LiteRT's own Python layer", minus("litert invoke()", "litert native calls")),
    ("onnxruntime's Python checks", minus("onnxruntime run", "onnxruntime C++ run")),
    ("run over LiteRT native calls", minus("agent LiteRT run", AGENTS_NATIVE)),
    ("run over onnxruntime C++ run", minus("agent ONNX run", "onnxruntime C++ run")),
    # A call after the CPU did other work (as in serving) may cost more than one of a tight
    # loop: caches, and thread pools whose workers went to sleep.
    ("a pause before LiteRT's calls", minus(PAUSED_INVOKE, INVOKE_ON_THE_AGENTS)),
    ("a pause before onnxruntime", minus(PAUSED_ONNX, "onnxruntime run")),
]
# The target: over LiteRT minus over onnxruntime; the last against floors that
# follow a pause, as serving's runs follow the agent's work.
TARGETS: list[tuple[str, Terms]] = [
    ("run", minus(ADDS[0][1], ADDS[1][1])),
    ("serving", minus(ADDS[2][1], ADDS[3][1])),
    ("serving, floors after a pause", minus(
        minus("agent LiteRT serving", PAUSED_INVOKE), minus("agent ONNX serving", PAUSED_ONNX)
    )),
]


def report(batch: int, wall: Samples, cpu: Samples) -> None:
    """The latency table and the verdict of one batch size."""
    print(f"\n== batch {batch}: per-call us, median of rounds ==")
    print(f"{'contender':42s} {'wall':>8s} {'cpu':>8s}")
    for name in wall:
        print(f"{name:42s} {statistics.median(wall[name]):8.2f} "
              f"{statistics.median(cpu[name]):8.2f}")
    print("what the agent adds, us (median of per-round differences [95% CI]):")
    for label, terms in ADDS:
        cells = []
        for samples in (wall, cpu):
            mid, lo, hi = median_ci(combined(samples, terms))
            cells.append(f"{mid:+6.2f} [{lo:+6.2f}, {hi:+6.2f}]")
        print(f"  {label:30s} wall {cells[0]}   cpu {cells[1]}")
    print("the target, the agent adds no more over LiteRT than over onnxruntime "
          "(per round: over LiteRT minus over onnxruntime, us [95% CI]):")
    for label, terms in TARGETS:
        for clock, samples in (("wall", wall), ("cpu", cpu)):
            mid, lo, hi = median_ci(combined(samples, terms))
            verdict = "MET" if mid <= 0 else ("within noise" if lo <= 0 else "MISSED")
            print(f"  {label:30s} {clock}: {mid:+6.2f} [{lo:+6.2f}, {hi:+6.2f}] {verdict}")


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


def bench_pools(tfl: Path, settings: SessionSettings, rounds: int, seconds: float) -> None:
    """Throughput of two client threads on one interpreter (a lock) and on a pool of two."""
    print("\n== two client threads: one interpreter (runs take turns) vs a pool of two ==")
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
        variant.close()


def main() -> int:
    """Build both formats, time every contender in interleaved rounds, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=101)
    parser.add_argument("--calls", type=int, default=200, help="calls per timed block")
    parser.add_argument("--pool-seconds", type=float, default=0.3)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    settings = SessionSettings(threads=args.threads)
    weights = layers()
    print(f"threads={args.threads}, {args.rounds} rounds of {args.calls} calls; "
          f"load average {os.getloadavg()[0]:.2f} at the start")
    with tempfile.TemporaryDirectory(prefix="bench-litert-") as tmp:
        models = Path(tmp) / "models"
        models.mkdir()
        tfl = mlp_tflite(models / "lite.tflite", weights)
        onnx_mlp(models / "onnx.onnx", weights)
        # The widest inline bound: on a shared machine a preempted run can take tens of ms,
        # which would send requests to the workers for a while (a thread hand-off each).
        config = ModelsConfig(dir=models, inline_max_ms=100.0)
        manager = ModelManager(config, settings, lambda *_a, **_k: None)
        sources, rejected = scan(models)
        assert not rejected, rejected
        manager.load_all(sources)
        for batch in BATCHES:
            contenders = contenders_at(batch, tfl, args.threads, manager)
            wall, cpu = timed_rounds(contenders, args.rounds, args.calls)
            report(batch, wall, cpu)
        manager.close(10)
        bench_pools(tfl, settings, rounds=7, seconds=args.pool_seconds)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
