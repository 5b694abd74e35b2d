"""`edge-agent bench`: what the agent costs over raw onnxruntime and a bare MQTT echo.

In one run, on one private mosquitto, with one load generator and the same payload and QoS:
1. onnxruntime `session.run` on the model's richest variant (the floor for inference);
2. a bare paho MQTT 5 echo responder in its own process (the floor for the transport);
3. the agent in its own process, serving the same model.
Each is measured sequentially (one request at a time: latency) and with N requests in
flight (throughput); the report gives the agent's ratios to the floors.
"""

from __future__ import annotations

import argparse
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
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from agent.adapt.monitor import usable_cpus
from agent.broker import BrokerError, MosquittoBroker, free_port
from agent.config import AgentConfig, MqttConfig
from agent.datatypes import NUMPY_DTYPES
from agent.errors import EdgeAgentError
from agent.logs import configure_logging
from agent.protocol import decode_response, encode_request
from agent.repository import read_model, verify_variant
from agent.session import LoadedVariant, SessionSettings

log = structlog.get_logger(__name__)

ECHO_TOPIC = "bench/echo"


@dataclass
class Figures:
    """Latency percentiles (ms) and throughput (requests/s) of one measured target."""

    name: str
    p50_ms: float
    p99_ms: float
    per_s: float
    count: int


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


def run_bench(args: argparse.Namespace, config: AgentConfig) -> dict[str, Any]:
    model_dir: Path = args.model_dir.resolve()
    source = read_model(model_dir, model_dir.parent)
    threads = config.models.threads or usable_cpus()
    variant = LoadedVariant.load(
        source.name,
        source.variants[0].name,
        verify_variant(source, source.variants[0], source.folder.parent),
        SessionSettings(threads=threads),
        source.manifest.inputs if source.manifest else None,
        source.manifest.outputs if source.manifest else None,
    )
    inputs = _sample_inputs(variant, args.batch)
    payload, header_length = encode_request(
        inputs, "b", binary=args.binary, binary_outputs=args.binary
    )
    progress = _progress(args.json)

    progress(
        f"onnxruntime: {source.name}/{source.variants[0].name}, batch {args.batch}, "
        f"{threads} thread(s)"
    )
    raw = _bench_onnxruntime(variant, inputs, args.requests)

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
            command = [sys.executable, "-m", "agent", "run", "--mqtt-port", str(port)]
            command += ["--device-id", "bench", "--models-dir", str(models)]
            if args.config is not None:
                command += ["--config", str(args.config)]
            echo = [sys.executable, "-m", "agent.bench", "--echo", str(port)]
            with _process(echo), _process(command, env):
                _wait_for(lambda: _answers(mqtt, echo_topic, payload, header_length), 30)
                _wait_for(lambda: _answers(mqtt, agent_topic, payload, header_length), 60)
                progress(
                    f"bare MQTT 5 echo and edge-agent side by side, in {args.rounds} "
                    f"alternating rounds: {args.requests} sequential requests each, then "
                    f"{args.concurrency} in flight for {args.duration} s each"
                )
                results = _bench_mqtt(
                    {"echo": echo_topic, "agent": agent_topic},
                    mqtt,
                    payload,
                    header_length,
                    args,
                )
    finally:
        broker.stop()

    ratios = {
        "agent_p50_over_echo_p50": results["agent_seq"].p50_ms / results["echo_seq"].p50_ms,
        "agent_rps_over_echo_rps_in_flight": (
            results["agent_conc"].per_s / results["echo_conc"].per_s
        ),
        "agent_p50_minus_echo_p50_ms": results["agent_seq"].p50_ms - results["echo_seq"].p50_ms,
        "agent_p50_minus_onnxruntime_p50_ms": results["agent_seq"].p50_ms - raw.p50_ms,
    }
    return {
        "model": f"{source.name}/{source.variants[0].name}",
        "payload_bytes": len(payload),
        "encoding": "binary" if args.binary else "json",
        "batch": args.batch,
        "qos": 1,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "threads": threads,
        "onnxruntime": asdict(raw),
        **{key: asdict(value) for key, value in results.items()},
        "ratios": ratios,
        "targets": {
            "agent_p50_over_echo_p50": {
                "max": 1.3,
                "met": ratios["agent_p50_over_echo_p50"] <= 1.3,
            },
            "agent_rps_over_echo_rps_in_flight": {
                "min": 0.6,
                "met": ratios["agent_rps_over_echo_rps_in_flight"] >= 0.6,
            },
        },
    }


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
        f"{'':36} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>10} {'n':>7}",
    ]
    for name, figures in rows:
        lines.append(
            f"{name:36} {figures['p50_ms']:9.3f} {figures['p99_ms']:9.3f} "
            f"{figures['per_s']:10.0f} {figures['count']:7d}"
        )
    ratios, targets = report["ratios"], report["targets"]
    p50, rps = ratios["agent_p50_over_echo_p50"], ratios["agent_rps_over_echo_rps_in_flight"]
    lines += [
        "",
        f"agent p50 / echo p50 (sequential):       {p50:5.2f}x  (target <= 1.3x: "
        f"{'met' if targets['agent_p50_over_echo_p50']['met'] else 'MISSED'})",
        f"agent req/s / echo req/s ({report['concurrency']} in flight): {rps:5.2f}x  "
        f"(target >= 0.6x: "
        f"{'met' if targets['agent_rps_over_echo_rps_in_flight']['met'] else 'MISSED'})",
        f"agent p50 - echo p50: {ratios['agent_p50_minus_echo_p50_ms']:.3f} ms added by the agent; "
        f"- onnxruntime p50: {ratios['agent_p50_minus_onnxruntime_p50_ms']:.3f} ms",
    ]
    return "\n".join(lines)


def _progress(quiet: bool) -> Callable[[str], None]:
    def say(message: str) -> None:
        if not quiet:
            print(f"... {message}", file=sys.stderr, flush=True)

    return say


def _sample_inputs(variant: LoadedVariant, batch: int) -> dict[str, np.ndarray]:
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
    return _figures("onnxruntime", latencies, count / elapsed)


def _bench_mqtt(
    topics: dict[str, str],
    mqtt: MqttConfig,
    payload: bytes,
    header_length: int | None,
    args: argparse.Namespace,
) -> dict[str, Figures]:
    """Sequential and in-flight figures per target, measured in alternating rounds.

    Alternating (echo, agent, echo, agent...) spreads the machine's drifts and moods over
    both targets instead of letting one of them have a quiet minute.
    """
    from agent.mqtt.requester import Requester  # noqa: PLC0415

    latencies: dict[str, list[float]] = {name: [] for name in topics}
    seconds: dict[str, float] = dict.fromkeys(topics, 0.0)
    flight: dict[str, list[float]] = {name: [] for name in topics}
    flight_seconds: dict[str, float] = dict.fromkeys(topics, 0.0)
    per_round = max(1, args.requests // args.rounds)
    with Requester(mqtt, protocol="5") as requester:
        requester.connect()
        for name, topic in topics.items():
            for _ in range(200):  # warm both ends up
                reply = requester.request(topic, payload, header_length)
            _check_reply(name, reply.payload, reply.header_length)
        for _ in range(args.rounds):
            for name, topic in topics.items():
                start = time.perf_counter()
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    requester.request(topic, payload, header_length)
                    latencies[name].append((time.perf_counter() - t0) * 1000.0)
                seconds[name] += time.perf_counter() - start
        for _ in range(args.rounds):
            for name, topic in topics.items():
                done, elapsed = _in_flight(
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
    results = {}
    for name in topics:
        results[f"{name}_seq"] = _figures(
            f"{name}_seq", latencies[name], len(latencies[name]) / seconds[name]
        )
        results[f"{name}_conc"] = _figures(
            f"{name}_conc", flight[name], len(flight[name]) / flight_seconds[name]
        )
    return results


def _in_flight(
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


def _check_reply(name: str, payload: bytes | bytearray, header_length: int | None) -> None:
    if name == "echo":
        return
    header, _ = decode_response(payload, header_length)
    if "error" in header:
        raise RuntimeError(f"the agent answered with an error: {header['error']}")


def _figures(name: str, latencies: list[float], per_s: float) -> Figures:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return Figures(name, statistics.median(ordered), p99, per_s, len(ordered))


def _answers(mqtt: MqttConfig, topic: str, payload: bytes, header_length: int | None) -> bool:
    from agent.mqtt.requester import Requester, RequesterError  # noqa: PLC0415

    try:
        with Requester(mqtt, protocol="5") as requester:
            requester.connect(timeout=2)
            requester.request(topic, payload, header_length, timeout=2)
    except RequesterError:
        return False
    return True


def _wait_for(ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise TimeoutError(f"not ready within {timeout} s")


class _process:  # noqa: N801  (used as a context manager, reads like a function)
    """A child process for the duration of a `with` block."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self._command, self._env = command, env
        self._child: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> subprocess.Popen[bytes]:
        self._child = subprocess.Popen(self._command, env=self._env)
        return self._child

    def __exit__(self, *_exc: object) -> None:
        assert self._child is not None
        self._child.terminate()
        try:
            self._child.wait(15)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()


def echo_responder(port: int) -> None:
    """The transport floor: answer every request with its own payload, as fast as paho can."""
    import paho.mqtt.client as mqtt  # noqa: PLC0415

    from agent.mqtt.connection import build_client, publish_properties  # noqa: PLC0415

    client = build_client(MqttConfig(port=port, device_id="echo"), f"bench-echo-{os.getpid()}")

    def on_message(c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        request = msg.properties
        assert request is not None  # an MQTT 5 client always has properties
        props = publish_properties()
        props.CorrelationData = getattr(request, "CorrelationData", None)
        if hasattr(request, "UserProperty"):
            props.UserProperty = request.UserProperty
        c.publish(getattr(request, "ResponseTopic", ""), msg.payload, qos=msg.qos, properties=props)

    client.on_message = on_message
    client.on_connect = lambda c, *_: c.subscribe(f"{ECHO_TOPIC}/+", qos=1)
    client.connect("127.0.0.1", port)
    client.loop_forever()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--echo":
        echo_responder(int(sys.argv[2]))
