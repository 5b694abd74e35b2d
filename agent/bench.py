"""`edge-agent bench`: what the agent costs over raw onnxruntime and a bare MQTT echo.

In one run, on one private mosquitto, with one load generator and the same payload and QoS:
1. onnxruntime `session.run` on the model's richest variant (the floor for inference);
2. a bare paho MQTT 5 echo responder in its own process (the floor for the transport);
3. the agent in its own process, serving the same model.
Each is measured sequentially (one request at a time: latency) and with N requests in
flight (throughput), with the server's CPU time per request; the report gives the agent's
ratios to the floors. Before that, in alternating rounds, each server is started afresh and
timed to its first answer, then its idle memory is read: the bare echo and a bare
onnxruntime server (the same session options, in a python that imports only numpy,
onnxruntime and paho) are the floors of the agent's start-up and footprint. The agent's
bytecode is written first where it is missing, as installing it does (see _cache_bytecode).
With `--shm`, last, a client on the same board passes the tensors through shared memory
(agent/bench_shm.py), timed round trip by round trip beside raw onnxruntime on the same
inputs and the echo of its request; only the measured agent has shared memory on.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass, fields
from importlib.util import cache_from_source
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from agent import bench_shm
from agent.adapt.monitor import ProcessMemory, process_cpu_seconds, process_memory, usable_cpus
from agent.broker import BrokerError, MosquittoBroker, free_port
from agent.config import AgentConfig, MqttConfig
from agent.datatypes import NUMPY_DTYPES
from agent.errors import EdgeAgentError
from agent.logs import configure_logging
from agent.protocol import decode_response, encode_request
from agent.repository import read_model, verify_variant
from agent.session import LoadedVariant, SessionSettings, session_config, session_options

log = structlog.get_logger(__name__)

ECHO_TOPIC = "bench/echo"
# The issue 10 targets, with the demo model.
START_TARGET_S = 0.3
IDLE_RSS_TARGET_MB = 60.0
SHM_TARGET = 1.05
"""A request through shared memory, over raw onnxruntime on the same inputs."""
# How often a request is sent to a server that is starting, until it answers one.
FIRST_ANSWER_RESEND_S = 0.005
START_TIMEOUT_S = 60.0
# A server's idle memory: IDLE_S after its first answer, IDLE_REQUESTS more, IDLE_REST_S.
IDLE_S = 1.0
IDLE_REQUESTS = 20
IDLE_REST_S = 0.5


@dataclass
class Figures:
    """Latency percentiles (ms) and throughput (requests/s) of one measured target."""

    name: str
    p50_ms: float
    p99_ms: float
    per_s: float
    count: int
    cpu_ms_per_request: float | None = None
    """The server process's CPU time over the measured window, per request answered."""

    @classmethod
    def of(
        cls, name: str, latencies: list[float], per_s: float, cpu_s: float | None = None
    ) -> Figures:
        """The figures of `latencies` (ms), with the server's CPU seconds over them."""
        ordered = sorted(latencies)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        cpu_ms = None if cpu_s is None else cpu_s * 1000.0 / len(ordered)
        return cls(name, statistics.median(ordered), p99, per_s, len(ordered), cpu_ms)


@dataclass
class Start:
    """One server's start to first answer (median of the rounds) and its idle memory."""

    name: str
    first_answer_s: float
    cpu_s: float
    """CPU time the server had used by its first answer: steadier than the elapsed time on
    a machine that others keep busy."""
    rounds: int
    memory: ProcessMemory


def main(args: argparse.Namespace, config: AgentConfig) -> int:
    """Run the whole comparison and print the report; 0 when it ran, 1 when it could not."""
    configure_logging("warning" if args.json else "info", "console")
    try:
        report = run_bench(args, config)
    except (BrokerError, EdgeAgentError, RuntimeError, TimeoutError) as exc:
        print(f"edge-agent bench: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def _agent_command(port: int, models: Path, config: Path | None) -> list[str]:
    command = [sys.executable, "-m", "agent", "run", "--mqtt-port", str(port)]
    command += ["--device-id", "bench", "--models-dir", str(models)]
    return command + (["--config", str(config)] if config is not None else [])


def _compile_first(progress: Callable[[str], None]) -> None:
    if compiled := _cache_bytecode():
        progress(f"bytecode: compiled {compiled} agent module(s) that had none")


def run_bench(args: argparse.Namespace, config: AgentConfig) -> dict[str, Any]:
    model_dir: Path = args.model_dir.resolve()
    source = read_model(model_dir, model_dir.parent)
    threads = config.models.threads or usable_cpus()
    settings = SessionSettings(threads=threads, spin=config.models.spin)
    variant_path = verify_variant(source, source.variants[0], source.folder.parent)
    variant = LoadedVariant.load(
        source.name,
        source.variants[0].name,
        variant_path,
        settings,
        source.manifest.inputs if source.manifest else None,
        source.manifest.outputs if source.manifest else None,
    )
    inputs = sample_inputs(variant, args.batch)
    payload, header_length = encode_request(
        inputs, "b", binary=args.binary, binary_outputs=args.binary
    )
    progress = _progress(args.json)

    progress(
        f"onnxruntime: {source.name}/{source.variants[0].name}, batch {args.batch}, "
        f"{threads} thread(s)"
    )
    raw = _bench_onnxruntime(variant, inputs, args.requests)
    if not args.shm:
        variant.close()  # else the floor of the shared-memory stage, closed at the end

    _compile_first(progress)
    port = free_port()
    broker = MosquittoBroker(port)
    broker.start()
    mqtt = MqttConfig(port=port, device_id="bench")
    echo_topic, agent_topic = f"{ECHO_TOPIC}/x", f"edge/bench/infer/{source.name}"
    try:
        with tempfile.TemporaryDirectory(prefix="edge-bench-") as tmp:
            models = Path(tmp) / "models"
            models.mkdir()
            # A copy, not a symlink: the agent refuses links that leave its model directory.
            shutil.copytree(model_dir, models / source.name)
            env = {
                **os.environ,
                "EDGE_AGENT_METRICS__INTERVAL_S": "0",
                "EDGE_AGENT_LOG__LEVEL": "warning",
            }
            command = _agent_command(port, models, args.config)
            echo = _floor_command(port)
            np.savez(Path(tmp) / "inputs.npz", **inputs)  # type: ignore[arg-type]
            bare = _floor_command(
                port, floor_model(variant_path, settings, Path(tmp) / "inputs.npz")
            )
            progress(
                f"start to first answer and idle memory, in {args.start_rounds} alternating "
                "rounds: bare MQTT echo, bare onnxruntime server, edge-agent"
            )
            starts = _bench_starts(
                {
                    "echo": (echo, echo_topic, None),
                    "onnxruntime_server": (bare, echo_topic, None),
                    "agent": (command, agent_topic, env),
                },
                mqtt,
                payload,
                header_length,
                args.start_rounds,
            )
            # Shared memory is off by default: on for the measured agent only, with --shm.
            served = {**env, "EDGE_AGENT_SHM__ENABLED": "true"} if args.shm else env
            with (
                ChildProcess(echo) as echo_process,
                ChildProcess(command, served) as agent_process,
            ):
                wait_for(lambda: answers(mqtt, echo_topic, payload, header_length), 30)
                wait_for(lambda: answers(mqtt, agent_topic, payload, header_length), 60)
                progress(
                    f"bare MQTT 5 echo and edge-agent side by side, in {args.rounds} "
                    f"alternating rounds: {args.requests} sequential requests each, then "
                    f"{args.concurrency} in flight for {args.duration} s each"
                )
                results = _bench_mqtt(
                    {"echo": echo_topic, "agent": agent_topic},
                    {"echo": echo_process.pid, "agent": agent_process.pid},
                    mqtt,
                    payload,
                    header_length,
                    args,
                )
                shm = None
                if args.shm:
                    progress(
                        f"shared memory: {args.shm_requests} requests each to onnxruntime, "
                        "the echo of the request and edge-agent (inputs in place, inputs "
                        "written by the client), in turn"
                    )
                    shm = _bench_shm(
                        mqtt,
                        source.name,
                        variant,
                        inputs,
                        {"echo": echo_process.pid, "agent": agent_process.pid},
                        args.shm_requests,
                    )
    finally:
        variant.close()
        broker.stop()
    report = _report(
        args, source.name, source.variants[0].name, payload, threads, raw, results, starts
    )
    if shm is not None:
        report["shm"] = _shm_report(*shm, config)
    return report


def _bench_shm(
    mqtt: MqttConfig,
    model: str,
    variant: LoadedVariant,
    inputs: dict[str, np.ndarray],
    pids: dict[str, int],
    requests: int,
) -> tuple[dict[str, Figures], int]:
    """The shared-memory stage's figures, and its request's size in bytes. The agent's CPU
    time is shared evenly between its two targets (both are the same request to it)."""
    from agent.mqtt.requester import Requester  # noqa: PLC0415

    with Requester(mqtt, protocol="5") as requester:
        requester.connect()
        run = bench_shm.measure(
            requester,
            f"{mqtt.prefix}/{mqtt.device_id}",
            model,
            variant,
            inputs,
            f"{ECHO_TOPIC}/shm",
            requests,
            lambda server: process_cpu_seconds(pids[server]),
        )
    cpu_s = {
        bench_shm.ONNXRUNTIME: None,
        bench_shm.ECHO: run.cpu_s["echo"],
        bench_shm.IN_PLACE: run.cpu_s["agent"] / 2,
        bench_shm.WRITES: run.cpu_s["agent"] / 2,
    }
    figures = {
        name: Figures.of(name, values, len(values) * 1000.0 / sum(values), cpu_s[name])
        for name, values in run.latencies_ms.items()
    }
    return figures, run.request_bytes


def _shm_report(
    figures: dict[str, Figures], request_bytes: int, config: AgentConfig
) -> dict[str, Any]:
    """The shared-memory figures, and the agent's ratios to raw onnxruntime (the issue's
    target) and to onnxruntime plus the echo of the request (what no MQTT server can beat)."""
    floor = figures[bench_shm.ONNXRUNTIME].p50_ms
    transport = figures[bench_shm.ECHO].p50_ms
    ratios: dict[str, float] = {}
    for name in (bench_shm.IN_PLACE, bench_shm.WRITES):
        p50 = figures[name].p50_ms
        ratios[f"{name}_over_onnxruntime"] = p50 / floor
        ratios[f"{name}_over_onnxruntime_plus_echo"] = p50 / (floor + transport)
        ratios[f"{name}_minus_onnxruntime_ms"] = p50 - floor
    return {
        "requests": figures[bench_shm.ONNXRUNTIME].count,
        "request_bytes": request_bytes,
        "gap_ms": bench_shm.GAP_S * 1000.0,
        "zero_copy": config.shm.zero_copy,
        **{name: asdict(value) for name, value in figures.items()},
        "ratios": ratios,
        "targets": {
            f"{name}_over_onnxruntime": _target(ratios[f"{name}_over_onnxruntime"], high=SHM_TARGET)
            for name in (bench_shm.IN_PLACE, bench_shm.WRITES)
        },
    }


def _cache_bytecode() -> int:
    """Write the bytecode of the agent's modules that have none (or stale), as `pip install`
    does for an installed agent; how many it compiled (0 where it may not write).

    Run from a source tree with PYTHONDONTWRITEBYTECODE set (or never run before), the agent
    would compile its sources at every start: 0.1 s of CPU that an installed agent never
    spends, which the bench would count as start-up.
    """
    package = Path(__file__).resolve().parent
    stale = [path for path in package.rglob("*.py") if not _cached(path)]
    if stale:
        compileall.compile_dir(package, quiet=2)
    return sum(1 for path in stale if _cached(path))


def _cached(source: Path) -> bool:
    cached = Path(cache_from_source(str(source)))
    return cached.exists() and cached.stat().st_mtime >= source.stat().st_mtime


def _report(
    args: argparse.Namespace,
    model: str,
    variant: str,
    payload: bytes,
    threads: int,
    raw: Figures,
    results: dict[str, Figures],
    starts: dict[str, Start],
) -> dict[str, Any]:
    """The figures, each with its floor, and the ratios the issues set targets for."""
    agent_start, bare = starts["agent"], starts["onnxruntime_server"]
    p50_ratio = results["agent_seq"].p50_ms / results["echo_seq"].p50_ms
    rps_ratio = results["agent_conc"].per_s / results["echo_conc"].per_s
    ratios = {
        "agent_p50_over_echo_p50": p50_ratio,
        "agent_rps_over_echo_rps_in_flight": rps_ratio,
        "agent_p50_minus_echo_p50_ms": results["agent_seq"].p50_ms - results["echo_seq"].p50_ms,
        "agent_p50_minus_onnxruntime_p50_ms": results["agent_seq"].p50_ms - raw.p50_ms,
        "agent_cpu_over_echo_cpu_sequential": _ratio(
            results["agent_seq"].cpu_ms_per_request, results["echo_seq"].cpu_ms_per_request
        ),
        "agent_cpu_over_echo_cpu_in_flight": _ratio(
            results["agent_conc"].cpu_ms_per_request, results["echo_conc"].cpu_ms_per_request
        ),
        "agent_start_over_onnxruntime_server_start": agent_start.first_answer_s
        / bare.first_answer_s,
        "agent_start_cpu_over_onnxruntime_server_start_cpu": agent_start.cpu_s / bare.cpu_s,
        "agent_rss_over_onnxruntime_server_rss": agent_start.memory.rss_mb / bare.memory.rss_mb,
    }
    return {
        "model": f"{model}/{variant}",
        "payload_bytes": len(payload),
        "encoding": "binary" if args.binary else "json",
        "batch": args.batch,
        "qos": 1,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "threads": threads,
        "onnxruntime": asdict(raw),
        **{key: asdict(value) for key, value in results.items()},
        "start": {name: asdict(start) for name, start in starts.items()},
        "ratios": ratios,
        "targets": {
            "agent_p50_over_echo_p50": _target(p50_ratio, high=1.3),
            "agent_rps_over_echo_rps_in_flight": _target(rps_ratio, low=0.6),
            "agent_start_s": _target(agent_start.first_answer_s, high=START_TARGET_S),
            "agent_idle_rss_mb": _target(agent_start.memory.rss_mb, high=IDLE_RSS_TARGET_MB),
        },
    }


def _ratio(value: float | None, floor: float | None) -> float | None:
    return value / floor if value is not None and floor else None


def _target(value: float, *, low: float | None = None, high: float | None = None) -> dict[str, Any]:
    met = (low is None or value >= low) and (high is None or value <= high)
    bounds = {"min": low} if low is not None else {"max": high}
    return {**bounds, "met": met}


def render(report: dict[str, Any]) -> str:
    rows = [
        ("onnxruntime session.run", report["onnxruntime"]),
        ("bare MQTT echo, sequential", report["echo_seq"]),
        ("edge-agent, sequential", report["agent_seq"]),
        (f"bare MQTT echo, {report['concurrency']} in flight", report["echo_conc"]),
        (f"edge-agent, {report['concurrency']} in flight", report["agent_conc"]),
    ]
    lines = [
        f"model {report['model']}, batch {report['batch']}, {report['encoding']} payload of "
        f"{report['payload_bytes']} bytes, QoS {report['qos']}, {report['threads']} thread(s)",
        "",
        f"{'':36} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>10} {'n':>7} {'CPU ms/req':>11}",
    ]
    for name, figures in rows:
        cpu = figures["cpu_ms_per_request"]
        lines.append(
            f"{name:36} {figures['p50_ms']:9.3f} {figures['p99_ms']:9.3f} "
            f"{figures['per_s']:10.0f} {figures['count']:7d} "
            f"{'' if cpu is None else f'{cpu:11.3f}'}"
        )
    ratios, targets = report["ratios"], report["targets"]
    p50, rps = ratios["agent_p50_over_echo_p50"], ratios["agent_rps_over_echo_rps_in_flight"]
    lines += [
        "",
        f"agent p50 / echo p50 (sequential):       {p50:5.2f}x  (target <= 1.3x: "
        f"{_verdict(targets['agent_p50_over_echo_p50'])})",
        f"agent req/s / echo req/s ({report['concurrency']} in flight): {rps:5.2f}x  "
        f"(target >= 0.6x: {_verdict(targets['agent_rps_over_echo_rps_in_flight'])})",
        f"agent p50 - echo p50: {ratios['agent_p50_minus_echo_p50_ms']:.3f} ms added by the agent; "
        f"- onnxruntime p50: {ratios['agent_p50_minus_onnxruntime_p50_ms']:.3f} ms",
        f"agent CPU per request / echo's: {_times(ratios['agent_cpu_over_echo_cpu_sequential'])} "
        f"sequential, {_times(ratios['agent_cpu_over_echo_cpu_in_flight'])} in flight",
        "",
        *_render_starts(report),
        *(_render_shm(report["shm"]) if "shm" in report else []),
    ]
    return "\n".join(lines)


def _render_shm(shm: dict[str, Any]) -> list[str]:
    names = {
        bench_shm.ONNXRUNTIME: "onnxruntime session.run (floor)",
        bench_shm.ECHO: "bare MQTT echo of the shm request",
        bench_shm.IN_PLACE: "edge-agent, shm, inputs in place",
        bench_shm.WRITES: "edge-agent, shm, client writes inputs",
    }
    floor = shm[bench_shm.ONNXRUNTIME]["p50_ms"]
    lines = [
        "",
        f"shared memory ({'zero-copy' if shm['zero_copy'] else 'copy'} mode): "
        f"{shm['requests']} requests each, in turn, {shm['gap_ms']:g} ms apart; a request "
        f"of {shm['request_bytes']} bytes names the regions",
        f"{'':38} {'p50 ms':>9} {'p99 ms':>9} {'x ort p50':>10} {'CPU ms/req':>11}",
    ]
    for key, name in names.items():
        figures = shm[key]
        cpu = figures["cpu_ms_per_request"]
        lines.append(
            f"{name:38} {figures['p50_ms']:9.3f} {figures['p99_ms']:9.3f} "
            f"{figures['p50_ms'] / floor:9.2f}x {'' if cpu is None else f'{cpu:11.3f}'}"
        )
    ratios, targets = shm["ratios"], shm["targets"]
    lines.append("")
    for key, label in ((bench_shm.IN_PLACE, "inputs in place"), (bench_shm.WRITES, "writing")):
        lines.append(
            f"agent through shm, {label}: {ratios[f'{key}_over_onnxruntime']:.2f}x onnxruntime "
            f"(+{ratios[f'{key}_minus_onnxruntime_ms']:.3f} ms; target <= {SHM_TARGET}x: "
            f"{_verdict(targets[f'{key}_over_onnxruntime'])}), "
            f"{ratios[f'{key}_over_onnxruntime_plus_echo']:.2f}x onnxruntime + echo"
        )
    return lines


def _render_starts(report: dict[str, Any]) -> list[str]:
    names = {
        "echo": "bare MQTT echo",
        "onnxruntime_server": "bare onnxruntime server (floor)",
        "agent": "edge-agent",
    }
    rounds = report["start"]["agent"]["rounds"]
    lines = [
        f"start to first answer (median of {rounds}), then idle memory (MiB; RSS is reported)",
        f"{'':36} {'start s':>9} {'CPU s':>7} {'RSS':>7} {'anon':>7} {'USS':>7} {'PSS':>7}",
    ]
    for key, name in names.items():
        start = report["start"][key]
        memory = start["memory"]
        lines.append(
            f"{name:36} {start['first_answer_s']:9.3f} {start['cpu_s']:7.3f} "
            f"{memory['rss_mb']:7.1f} "
            f"{memory['anon_mb']:7.1f} {memory['uss_mb']:7.1f} {memory['pss_mb']:7.1f}"
        )
    ratios, targets = report["ratios"], report["targets"]
    agent = report["start"]["agent"]
    return [
        *lines,
        "",
        f"agent start: {agent['first_answer_s']:.3f} s, "
        f"{ratios['agent_start_over_onnxruntime_server_start']:.2f}x the bare server's, "
        f"CPU {ratios['agent_start_cpu_over_onnxruntime_server_start_cpu']:.2f}x "
        f"(target <= {START_TARGET_S} s: {_verdict(targets['agent_start_s'])})",
        f"agent idle RSS: {agent['memory']['rss_mb']:.1f} MiB, "
        f"{ratios['agent_rss_over_onnxruntime_server_rss']:.2f}x the bare server's "
        f"(target <= {IDLE_RSS_TARGET_MB} MiB: {_verdict(targets['agent_idle_rss_mb'])})",
    ]


def _verdict(target: dict[str, Any]) -> str:
    return "met" if target["met"] else "MISSED"


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _progress(quiet: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if not quiet:
            print(f"... {message}", file=sys.stderr, flush=True)

    return say


def sample_inputs(variant: LoadedVariant, batch: int) -> dict[str, np.ndarray]:
    """One request's inputs: random values 0..16 (pixel-like) in the variant's signature."""
    rng = np.random.default_rng(0)
    inputs = {}
    for spec in variant.inputs:
        shape = tuple(
            batch if i == 0 and d == -1 else (1 if d == -1 else d) for i, d in enumerate(spec.shape)
        )
        inputs[spec.name] = (rng.random(shape) * 16).astype(NUMPY_DTYPES[spec.datatype])
    return inputs


def _bench_onnxruntime(
    variant: LoadedVariant, inputs: dict[str, np.ndarray], count: int
) -> Figures:
    for _ in range(min(200, count)):
        variant.run(inputs)
    latencies = []
    start = time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        variant.run(inputs)
        latencies.append((time.perf_counter() - t0) * 1000.0)
    elapsed = time.perf_counter() - start
    return Figures.of("onnxruntime", latencies, count / elapsed)


def _bench_mqtt(
    topics: dict[str, str],
    pids: dict[str, int],
    mqtt: MqttConfig,
    payload: bytes,
    header_length: int | None,
    args: argparse.Namespace,
) -> dict[str, Figures]:
    """Sequential and in-flight figures per target, measured in alternating rounds.

    Alternating (echo, agent, echo, agent...) spreads the machine's drifts and moods over
    both targets instead of letting one of them have a quiet minute. Each server's CPU time
    (process `pids[name]`) is read around each of its windows.
    """
    from agent.mqtt.requester import Requester  # noqa: PLC0415

    latencies: dict[str, list[float]] = {name: [] for name in topics}
    seconds: dict[str, float] = dict.fromkeys(topics, 0.0)
    flight: dict[str, list[float]] = {name: [] for name in topics}
    flight_seconds: dict[str, float] = dict.fromkeys(topics, 0.0)
    cpu: dict[str, float] = dict.fromkeys(topics, 0.0)
    flight_cpu: dict[str, float] = dict.fromkeys(topics, 0.0)
    per_round = max(1, args.requests // args.rounds)
    with Requester(mqtt, protocol="5") as requester:
        requester.connect()
        for name, topic in topics.items():
            for _ in range(200):  # warm both ends up
                reply = requester.request(topic, payload, header_length)
            _check_reply(name, reply.payload, reply.header_length)
        for _ in range(args.rounds):
            for name, topic in topics.items():
                start, cpu_start = time.perf_counter(), process_cpu_seconds(pids[name])
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    requester.request(topic, payload, header_length)
                    latencies[name].append((time.perf_counter() - t0) * 1000.0)
                seconds[name] += time.perf_counter() - start
                cpu[name] += process_cpu_seconds(pids[name]) - cpu_start
        for _ in range(args.rounds):
            for name, topic in topics.items():
                cpu_start = process_cpu_seconds(pids[name])
                done, elapsed = in_flight(
                    name,
                    requester,
                    topic,
                    payload,
                    header_length,
                    args.concurrency,
                    args.duration / args.rounds,
                )
                flight[name] += done
                flight_seconds[name] += elapsed
                flight_cpu[name] += process_cpu_seconds(pids[name]) - cpu_start
    results = {}
    for name in topics:
        results[f"{name}_seq"] = Figures.of(
            f"{name}_seq", latencies[name], len(latencies[name]) / seconds[name], cpu[name]
        )
        results[f"{name}_conc"] = Figures.of(
            f"{name}_conc",
            flight[name],
            len(flight[name]) / flight_seconds[name],
            flight_cpu[name],
        )
    return results


def in_flight(
    name: str,
    requester: Any,
    topic: str,
    payload: bytes,
    header_length: int | None,
    concurrency: int,
    duration: float,
) -> tuple[list[float], float]:
    """Keep `concurrency` requests outstanding for `duration` seconds: latencies, seconds."""
    lock = threading.Lock()
    latencies: list[float] = []
    stop_at = time.perf_counter() + duration
    finished = threading.Event()
    outstanding = [0]

    def launch() -> None:
        sent = time.perf_counter()
        future: Future[Any] = requester.send(topic, payload, header_length)

        def on_done(_future: Future[Any]) -> None:
            landed(sent)

        future.add_done_callback(on_done)

    def landed(sent: float) -> None:
        now = time.perf_counter()
        with lock:
            latencies.append((now - sent) * 1000.0)
            again = now < stop_at
            if not again:
                outstanding[0] -= 1
                if outstanding[0] == 0:
                    finished.set()
        if again:
            launch()

    start = time.perf_counter()
    with lock:
        outstanding[0] = concurrency
    for _ in range(concurrency):
        launch()
    if not finished.wait(duration + 30):
        raise TimeoutError(f"{name}: replies stopped arriving with {concurrency} in flight")
    return latencies, time.perf_counter() - start


def _bench_starts(
    servers: dict[str, tuple[list[str], str, dict[str, str] | None]],
    mqtt: MqttConfig,
    payload: bytes,
    header_length: int | None,
    rounds: int,
) -> dict[str, Start]:
    """Each server (command, request topic, environment) started `rounds` times, in
    alternating order: the median start to first answer, and the median idle memory."""
    from agent.mqtt.requester import Requester  # noqa: PLC0415

    seconds: dict[str, list[float]] = {name: [] for name in servers}
    cpu: dict[str, list[float]] = {name: [] for name in servers}
    memories: dict[str, list[ProcessMemory]] = {name: [] for name in servers}
    with Requester(mqtt, protocol="5") as requester:
        requester.connect()
        for _ in range(rounds):
            for name, (command, topic, env) in servers.items():
                start_s, cpu_s, memory = _first_answer(
                    name, requester, ChildProcess(command, env), topic, payload, header_length
                )
                seconds[name].append(start_s)
                cpu[name].append(cpu_s)
                memories[name].append(memory)
    return {
        name: Start(
            name,
            statistics.median(seconds[name]),
            statistics.median(cpu[name]),
            rounds,
            _median(memories[name]),
        )
        for name in servers
    }


def _first_answer(
    name: str,
    requester: Any,
    server: ChildProcess,
    topic: str,
    payload: bytes,
    header_length: int | None,
) -> tuple[float, float, ProcessMemory]:
    """Start `server` and send the request at once, and again every FIRST_ANSWER_RESEND_S
    until one is answered (a request published before the server subscribed reaches no
    one): the seconds from the spawn to that answer and the server's CPU seconds by then;
    then its memory, read IDLE_S later after IDLE_REQUESTS more answers and a rest."""
    start = time.perf_counter()
    with server as child:
        sent: list[Future[Any]] = []
        while True:
            sent.append(requester.send(topic, payload, header_length))
            done, _ = wait(sent, timeout=FIRST_ANSWER_RESEND_S, return_when=FIRST_COMPLETED)
            if done:
                break
            if child.poll() is not None:
                raise RuntimeError(f"{name} exited ({child.returncode}) before its first answer")
            if time.perf_counter() - start > START_TIMEOUT_S:
                raise TimeoutError(f"{name}: no answer within {START_TIMEOUT_S:g} s of its start")
        seconds = time.perf_counter() - start
        cpu_s = process_cpu_seconds(child.pid)
        reply = next(iter(done)).result()
        _check_reply(name, reply.payload, reply.header_length)
        time.sleep(IDLE_S)  # the agent hands its start-up pages back at READY
        for _ in range(IDLE_REQUESTS):  # what serving keeps resident is part of idle memory
            requester.request(topic, payload, header_length)
        time.sleep(IDLE_REST_S)
        return seconds, cpu_s, process_memory(child.pid)


def _median(memories: list[ProcessMemory]) -> ProcessMemory:
    return ProcessMemory(
        **{
            field.name: statistics.median(getattr(m, field.name) for m in memories)
            for field in fields(ProcessMemory)
        }
    )


def _floor_command(port: int, model: dict[str, Any] | None = None) -> list[str]:
    """The bare MQTT 5 echo, or with `model` (see floor_model) the bare onnxruntime server."""
    return [sys.executable, "-c", _FLOOR_SERVER, str(port), f"{ECHO_TOPIC}/+", json.dumps(model)]


def floor_model(
    path: Path, settings: SessionSettings, inputs: Path | None = None
) -> dict[str, Any]:
    """What a bare onnxruntime server loads (in JSON; OPEN_FLOOR_SESSION opens it): the
    variant, the agent's session options (as plain values: a floor must not import the agent
    to build them) and the file of the inputs it runs on, if any."""
    options = session_options(settings)
    return {
        "path": str(path),
        "inputs": None if inputs is None else str(inputs),
        "options": {name: _plain(getattr(options, name)) for name in _FLOOR_OPTIONS},
        "config": session_config(settings),
    }


def _plain(value: Any) -> Any:
    return getattr(value, "name", value)  # an onnxruntime enum by its member's name


# The SessionOptions attributes that session_options() sets.
_FLOOR_OPTIONS = (
    "intra_op_num_threads",
    "inter_op_num_threads",
    "execution_mode",
    "graph_optimization_level",
    "enable_cpu_mem_arena",
    "log_severity_level",
)

OPEN_FLOOR_SESSION = """
def open_floor_session(model):
    import onnxruntime as ort
    options = ort.SessionOptions()
    for name, value in model["options"].items():
        kind = type(getattr(options, name))
        setattr(options, name, kind.__members__[value] if hasattr(kind, "__members__") else value)
    for key, value in model["config"].items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(
        model["path"], sess_options=options, providers=["CPUExecutionProvider"]
    )
"""
"""Python source of `open_floor_session(model)`: the onnxruntime session of a floor_model()
with the agent's options, for servers that must not import the agent (the floors here, the
peers of tools/bench_peers.py)."""

# The floors, each in a python of its own that imports only what it needs (`python -c`):
# paho for the echo; numpy and onnxruntime too for the bare onnxruntime server, which runs
# the session on the bench's inputs for each request before echoing it. Both hand their
# start-up pages back after their first answer, as the agent does once ready.
_FLOOR_SERVER = (
    OPEN_FLOOR_SESSION
    + """
import json, os, socket, sys
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from agent.adapt.procstat import release_file_pages

port, topics, model = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
work = None
if model:
    import numpy as np
    session = open_floor_session(model)
    with np.load(model["inputs"]) as data:
        feeds = {name: data[name] for name in data.files}
    session.run(None, feeds)  # warmed up, as the agent's variants are
    work = lambda: session.run(None, feeds)
answered = []

def on_message(client, _userdata, msg):
    if work is not None:
        work()
    request = msg.properties
    reply = Properties(PacketTypes.PUBLISH)
    reply.CorrelationData = getattr(request, "CorrelationData", None)
    if hasattr(request, "UserProperty"):
        reply.UserProperty = request.UserProperty
    client.publish(getattr(request, "ResponseTopic", ""), msg.payload, qos=msg.qos,
                   properties=reply)
    if not answered:
        answered.append(release_file_pages())

client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-floor-{os.getpid()}",
                     protocol=mqtt.MQTTv5)
client.on_socket_open = lambda _c, _u, sock: sock.setsockopt(
    socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
)
client.max_inflight_messages_set(1000)
client.on_message = on_message
client.on_connect = lambda c, *_: c.subscribe(topics, qos=1)
client.connect("127.0.0.1", port)
client.loop_forever()
"""
)


def _check_reply(name: str, payload: bytes | bytearray, header_length: int | None) -> None:
    if name == "echo":
        return
    header, _ = decode_response(payload, header_length)
    if "error" in header:
        raise RuntimeError(f"the agent answered with an error: {header['error']}")


def answers(mqtt: MqttConfig, topic: str, payload: bytes, header_length: int | None) -> bool:
    """Whether a server answers one request on `topic` within 2 s (a fresh client)."""
    from agent.mqtt.requester import Requester, RequesterError  # noqa: PLC0415

    try:
        with Requester(mqtt, protocol="5") as requester:
            requester.connect(timeout=2)
            requester.request(topic, payload, header_length, timeout=2)
    except RequesterError:
        return False
    return True


def wait_for(ready: Callable[[], bool], timeout: float) -> None:
    """Poll `ready` every 0.2 s until it is true; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise TimeoutError(f"not ready within {timeout} s")


class ChildProcess:
    """A child process for the duration of a `with` block (`stdout`: where its output goes,
    as subprocess takes it; by default this process's)."""

    def __init__(
        self, command: list[str], env: dict[str, str] | None = None, stdout: Any = None
    ) -> None:
        self._command, self._env, self._stdout = command, env, stdout
        self._child: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> subprocess.Popen[bytes]:
        self._child = subprocess.Popen(self._command, env=self._env, stdout=self._stdout)
        return self._child

    def __exit__(self, *_exc: object) -> None:
        assert self._child is not None
        self._child.terminate()
        try:
            self._child.wait(15)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()
