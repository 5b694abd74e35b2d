"""Does stacking pay? The agent as configured by default (stacking where the variant's
measured profile says it pays) against the same agent with `max_batch_size = 1`, on CPU
CNNs, with 8 and 32 requests in flight (issue 10, "batching that pays").

Both agents run as real `python -m agent run` processes on one private mosquitto, serve the
same model, and are measured in alternating rounds (single, stacked, single, ...) by one
closed-loop client keeping N binary requests in flight. The floor is raw onnxruntime with
the agent's session options: its ms per row at batch 1 and at batch N says what stacking
could gain at most. The stacked agent's own profile (ms per row by batch size, as measured
while it served) is printed beside it. Printed, not asserted.

    .venv/bin/python tools/bench_batching.py [--model DIR ...] [--rounds 4] [--duration 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.adapt.monitor import usable_cpus
from agent.bench import ChildProcess, Figures, answers, in_flight, wait_for
from agent.broker import MosquittoBroker, free_port
from agent.config import MqttConfig
from agent.datatypes import NUMPY_DTYPES
from agent.mqtt.requester import Requester
from agent.protocol import encode_request
from agent.session import SessionSettings, session_options

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = (8, 32)
AGENTS = {"single": {"EDGE_AGENT_MODELS__MAX_BATCH_SIZE": "1"}, "stacked": {}}
NOISE = 0.05
"""Within 5 % counts as "no worse": the machine is shared and timings are noisy."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        help="model folder or .onnx file (default: models/digits-cnn and a 3x64x64 CNN)",
    )
    parser.add_argument("--rounds", type=int, default=4, help="alternations per concurrency")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per round")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        models = args.model or [REPO / "models" / "digits-cnn", _big_cnn(Path(tmp))]
        reports = [_bench_model(path.resolve(), args) for path in models]
    print(json.dumps(reports, indent=2) if args.json else "\n\n".join(map(_render, reports)))
    return 0


def _big_cnn(folder: Path) -> Path:
    """A 3x64x64 classifier of about 8 MB of weights (tests/onnx_models.cnn_model)."""
    sys.path.insert(0, str(REPO))
    from tests.onnx_models import cnn_model  # noqa: PLC0415  (a dev tool: builds its model)

    return cnn_model(folder / "cnn.onnx")


def _onnx_file(model: Path) -> Path:
    if model.suffix == ".onnx":
        return model
    manifest = model / "manifest.json"
    if manifest.exists():
        return model / json.loads(manifest.read_text())["variants"][0]["file"]
    return next(model.glob("*.onnx"))


def _bench_model(model: Path, args: argparse.Namespace) -> dict[str, Any]:
    threads = usable_cpus()
    session = ort.InferenceSession(
        str(_onnx_file(model)),
        session_options(SessionSettings(threads=threads)),
        providers=["CPUExecutionProvider"],
    )
    spec = session.get_inputs()[0]
    row = _row(spec)
    name = model.stem if model.suffix == ".onnx" else model.name
    _say(f"{name}: raw onnxruntime, ms per row at batch 1 and {', '.join(map(str, CONCURRENCY))}")
    floor = _raw_ms_per_row(session, spec.name, row, (1, *CONCURRENCY))
    payload, header_length = encode_request({spec.name: row}, "b")
    port = free_port()
    broker = MosquittoBroker(port)
    broker.start()
    mqtt = MqttConfig(port=port, device_id="bench")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-batching-models-") as tmp:
            folder = Path(tmp) / "models"
            folder.mkdir()
            if model.is_dir():
                shutil.copytree(model, folder / name)
            else:
                shutil.copy(model, folder / model.name)
            results, profile = _bench_agents(folder, name, port, mqtt, payload, header_length, args)
    finally:
        broker.stop()
    return {
        "model": name,
        "input": list(row.shape),
        "threads": threads,
        "onnxruntime_ms_per_row": {str(n): round(ms, 3) for n, ms in floor.items()},
        "stacked_agent_profile_ms_per_row": profile,
        "uptime": _uptime(),
        "results": results,
    }


def _bench_agents(
    folder: Path,
    name: str,
    port: int,
    mqtt: MqttConfig,
    payload: bytes,
    header_length: int | None,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], Any]:
    """Both agents, rounds alternating between them at each concurrency."""
    env = {**os.environ, "EDGE_AGENT_METRICS__INTERVAL_S": "0", "EDGE_AGENT_LOG__LEVEL": "warning"}
    command = [sys.executable, "-m", "agent", "run", "--mqtt-port", str(port)]
    command += ["--models-dir", str(folder), "--device-id"]
    topics = {agent: f"edge/{agent}/infer/{name}" for agent in AGENTS}
    with (
        ChildProcess([*command, "single"], {**env, **AGENTS["single"]}),
        ChildProcess([*command, "stacked"], {**env, **AGENTS["stacked"]}),
    ):
        for topic in topics.values():
            wait_for(lambda t=topic: answers(mqtt, t, payload, header_length), 60)
        results: dict[str, Any] = {}
        with Requester(mqtt, protocol="5") as requester:
            requester.connect()
            for topic in topics.values():
                for _ in range(20):  # warm both up, and let the stacked one measure
                    requester.request(topic, payload, header_length, timeout=30)
            for concurrency in CONCURRENCY:
                _say(
                    f"{name}: {concurrency} in flight, {args.rounds} alternating rounds of "
                    f"{args.duration} s per agent (about "
                    f"{2 * args.rounds * args.duration:.0f} s)"
                )
                latencies: dict[str, list[float]] = {agent: [] for agent in AGENTS}
                seconds = dict.fromkeys(AGENTS, 0.0)
                for _ in range(args.rounds):
                    for agent, topic in topics.items():
                        done, elapsed = in_flight(
                            agent,
                            requester,
                            topic,
                            payload,
                            header_length,
                            concurrency,
                            args.duration,
                        )
                        latencies[agent] += done
                        seconds[agent] += elapsed
                results[str(concurrency)] = {
                    agent: vars(Figures.of(agent, latencies[agent], len(latencies[agent]) / s))
                    for agent, s in seconds.items()
                }
            reply = requester.request("edge/stacked/control/models", b"{}", None, timeout=10)
            profile = json.loads(reply.payload)["models"][name].get("stacking_ms_per_row")
    return results, profile


def _row(spec: Any) -> np.ndarray:
    shape = [1 if not isinstance(d, int) or d < 0 else d for d in spec.shape]
    dtype = NUMPY_DTYPES["FP32"] if "float" in spec.type else np.int64
    return (np.random.default_rng(0).random(shape) * 16).astype(dtype)


def _raw_ms_per_row(
    session: ort.InferenceSession, name: str, row: np.ndarray, sizes: tuple[int, ...]
) -> dict[int, float]:
    """Median ms per row of session.run at each batch size, the sizes interleaved."""
    feeds = {n: {name: np.repeat(row, n, axis=0)} for n in sizes}
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for feed in feeds.values():
        session.run(None, feed)
    for _ in range(15):
        for n, feed in feeds.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[n].append((time.perf_counter() - start) * 1000.0 / n)
    return {n: statistics.median(ms) for n, ms in times.items()}


def _render(report: dict[str, Any]) -> str:
    floor = report["onnxruntime_ms_per_row"]
    lines = [
        f"model {report['model']}, input {report['input']}, binary, QoS 1, "
        f"{report['threads']} thread(s); load average {report['uptime']}",
        "raw onnxruntime ms per row: "
        + ", ".join(f"batch {n}: {ms:.3f}" for n, ms in floor.items()),
        f"stacked agent's measured ms per row by batch size: "
        f"{report['stacked_agent_profile_ms_per_row']}",
        "",
        f"{'in flight':>9} {'agent':>8} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>8}",
    ]
    for concurrency, by_agent in report["results"].items():
        for agent, figures in by_agent.items():
            lines.append(
                f"{concurrency:>9} {agent:>8} {figures['p50_ms']:9.2f} {figures['p99_ms']:9.2f} "
                f"{figures['per_s']:8.1f}"
            )
    lines.append("")
    for concurrency, by_agent in report["results"].items():
        single, stacked = by_agent["single"], by_agent["stacked"]
        p50 = stacked["p50_ms"] / single["p50_ms"]
        rps = stacked["per_s"] / single["per_s"]
        gain = float(floor["1"]) / float(floor[concurrency])
        met = p50 <= 1 + NOISE and rps >= 1 - NOISE
        lines.append(
            f"{concurrency} in flight: stacked/single p50 {p50:.2f}x, req/s {rps:.2f}x "
            f"(raw onnxruntime: a row at batch {concurrency} {gain:.2f}x as fast as alone); "
            f"no worse than max_batch_size = 1 (within {NOISE:.0%}): "
            f"{'met' if met else 'MISSED'}"
        )
    return "\n".join(lines)


def _uptime() -> str:
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def _say(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
