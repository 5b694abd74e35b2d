"""A 320x320 CNN request through shared memory against raw onnxruntime (issue 10, part 1).

Builds a CNN ONNX model (tests/onnx_models.py, no download), starts a private mosquitto and
two real agents (`python -m agent run`, shm.enabled; one with shm.zero_copy), and measures,
request by request in turn, the round trip as the client sees it for:

- raw onnxruntime `session.run` with the agent's own session options (agent/session.py);
- the agent through shared memory, the client using tritonclient's helpers unchanged: write
  the frame into its region, publish the request, wait for the reply, read the scores out
  of its output region (copy mode, then zero-copy mode);
- the same request with the frame as a binary tensor over MQTT (the transport it replaces);
- the transport's floor: the bare paho MQTT 5 echo of `edge-agent bench` of the shared-memory
  request's payload, on the same broker.

Medians and ratios against onnxruntime (and against onnxruntime plus the echo: what no MQTT
server can beat) are printed, with the machine's load. Not asserted.

    .venv/bin/python tools/bench_shm.py [--rounds 10] [--requests 20] [--size 320] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import structlog
import tritonclient.http as oip
import tritonclient.utils.shared_memory as shm

from agent.bench import ECHO_TOPIC, _floor_command  # the echo floor edge-agent bench uses
from agent.broker import MosquittoBroker, free_port
from agent.config import MqttConfig
from agent.mqtt.requester import Requester, RequesterError
from agent.protocol import decode_response, encode_request
from agent.session import PROVIDERS, SessionSettings, session_options

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.onnx_models import cnn_model

CLASSES = 1000
Target = Callable[[], np.ndarray]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--requests", type=int, default=20, help="requests per target a round")
    parser.add_argument("--size", type=int, default=320, help="image side (pixels)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=5.0,
        help="pause between requests, not timed (a camera's frames come at a cadence; a "
        "loop that never sleeps would be scheduled as a CPU hog, one that waits would not)",
    )
    parser.add_argument(
        "--inline-ms",
        type=float,
        default=None,
        help="the agents' models.inline_max_ms (run on the MQTT thread when the model's runs "
        "take less); unset keeps the agent's default",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    # The broker helper logs with structlog: keep stdout for the report (--json).
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    with tempfile.TemporaryDirectory(prefix="bench-shm-") as tmp:
        models = Path(tmp) / "models"
        path = cnn_model(models / "cnn.onnx", size=args.size)
        report = run(args, path)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def run(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    load_before = _load()
    frame = np.random.default_rng(0).random((1, 3, args.size, args.size), dtype=np.float32)
    session = ort.InferenceSession(
        str(path), session_options(SessionSettings(threads=args.threads)), providers=PROVIDERS
    )
    expected = session.run(None, {"x": frame})[0]
    broker = MosquittoBroker(free_port())
    broker.start()
    try:
        with (
            _child(_floor_command(broker.port)),
            _agent(broker.port, path.parent, args, zero_copy=False) as copy_device,
            _agent(broker.port, path.parent, args, zero_copy=True) as zero_device,
            Requester(MqttConfig(port=broker.port), protocol="5") as requester,
            _regions(frame.nbytes, CLASSES * 4) as (frame_region, scores_region),
        ):
            requester.connect()
            for device in (copy_device, zero_device):
                _register(requester, device, (frame_region, frame.nbytes))
                _register(requester, device, (scores_region, CLASSES * 4))
            targets: dict[str, Target] = {"onnxruntime": lambda: session.run(None, {"x": frame})[0]}
            for mode, device in (("copy", copy_device), ("zero_copy", zero_device)):
                for writes, label in ((True, "client writes the frame"), (False, "frame in place")):
                    targets[f"shm {mode}, {label}"] = _via_shm(
                        requester, device, frame, (frame_region, scores_region), writes
                    )
            targets["binary tensor over MQTT"] = _via_binary(requester, copy_device, frame)
            echo_body = _shm_body(frame, (frame_region, scores_region))
            targets["echo of the shm request"] = lambda: _echo(requester, echo_body, expected)
            for target in targets.values():  # warm up and check every path's answer
                for _ in range(5):
                    np.testing.assert_allclose(target(), expected, rtol=1e-4, atol=1e-4)
            latencies = _interleaved(targets, args.rounds, args.requests, args.gap_ms / 1000.0)
    finally:
        broker.stop()
    floor = statistics.median(latencies["onnxruntime"])
    transport = statistics.median(latencies["echo of the shm request"])
    return {
        "model": f"CNN FP32 [1, 3, {args.size}, {args.size}] -> [1, {CLASSES}]",
        "threads": args.threads,
        "gap_ms": args.gap_ms,
        "inline_max_ms": args.inline_ms,
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "load_before": load_before,
        "targets": {
            name: {
                "p50_ms": round(statistics.median(values), 3),
                "p90_ms": round(float(np.percentile(values, 90)), 3),
                "ratio_to_onnxruntime": round(statistics.median(values) / floor, 3),
                "ratio_to_onnxruntime_plus_echo": round(
                    statistics.median(values) / (floor + transport), 3
                ),
            }
            for name, values in latencies.items()
        },
        "load_after": _load(),
    }


def _interleaved(
    targets: dict[str, Target], rounds: int, per_round: int, gap_s: float
) -> dict[str, list[float]]:
    """Request by request, every target in turn (the order rotating), so that all share
    the machine's moods: with other loads coming and going, blocks of one target would
    measure the moment as much as the target."""
    latencies: dict[str, list[float]] = {name: [] for name in targets}
    order = list(targets.items())
    for index in range(rounds):
        for _ in range(per_round):
            order = order[1:] + order[:1]
            for name, target in order:
                t0 = time.perf_counter()
                target()
                latencies[name].append((time.perf_counter() - t0) * 1000.0)
                time.sleep(gap_s)
        print(f"... round {index + 1}/{rounds}", file=sys.stderr, flush=True)
    return latencies


def _register(requester: Requester, device: str, region: tuple[Any, int]) -> None:
    handle, size = region
    reply = _command(requester, device, "shm_register", {
        "name": handle._triton_shm_name, "key": handle._shm_key, "byte_size": size,
    })  # fmt: skip
    if "error" in reply:
        raise RuntimeError(f"shm_register: {reply['error']}")


def _via_shm(
    requester: Requester,
    device: str,
    frame: np.ndarray,
    regions: tuple[Any, Any],
    writes_frame: bool,
) -> Target:
    """A client as Triton's examples write one (regions registered once): per request,
    write the frame (or not: a camera may decode it there), publish, read the scores."""
    frame_region, scores_region = regions
    shm.set_shared_memory_region(frame_region, [frame])
    body = _shm_body(frame, regions)
    topic = f"edge/{device}/infer/cnn"

    def infer() -> np.ndarray:
        if writes_frame:
            shm.set_shared_memory_region(frame_region, [frame])
        reply = requester.request(topic, body)
        output = oip.InferResult.from_response_body(reply.payload).get_output("scores")
        if output is None:
            raise RuntimeError(f"no scores in the reply: {bytes(reply.payload)[:300]!r}")
        contents = shm.get_contents_as_numpy(scores_region, np.float32, output["shape"])
        return np.array(contents)

    return infer


def _shm_body(frame: np.ndarray, regions: tuple[Any, Any]) -> bytes:
    """The request tritonclient builds for an input and an output in shared memory."""
    frame_region, scores_region = regions
    inp = oip.InferInput("x", list(frame.shape), "FP32")
    inp.set_shared_memory(frame_region._triton_shm_name, frame.nbytes)
    out = oip.InferRequestedOutput("scores", binary_data=False)
    out.set_shared_memory(scores_region._triton_shm_name, CLASSES * 4)
    body, _ = oip.InferenceServerClient.generate_request_body([inp], outputs=[out])
    return bytes(body)


def _echo(requester: Requester, body: bytes, expected: np.ndarray) -> np.ndarray:
    reply = requester.request(f"{ECHO_TOPIC}/shm", body)
    if bytes(reply.payload) != body:
        raise RuntimeError("the echo answered something else")
    return expected  # the echo computes nothing: its answer is the transport's time only


def _via_binary(requester: Requester, device: str, frame: np.ndarray) -> Target:
    topic = f"edge/{device}/infer/cnn"

    def infer() -> np.ndarray:
        payload, header_length = encode_request({"x": frame})
        reply = requester.request(topic, payload, header_length)
        return decode_response(reply.payload, reply.header_length)[1]["scores"]

    return infer


def _command(requester: Requester, device: str, name: str, body: dict[str, Any]) -> Any:
    reply = requester.request(f"edge/{device}/control/{name}", json.dumps(body).encode())
    return json.loads(reply.payload)


@contextmanager
def _agent(port: int, models: Path, args: argparse.Namespace, *, zero_copy: bool) -> Iterator[str]:
    """A real agent process serving `models` with shared memory on; yields its device id."""
    device = f"bench-shm-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "EDGE_AGENT_SHM__ENABLED": "true",
        "EDGE_AGENT_SHM__ZERO_COPY": str(zero_copy).lower(),
        "EDGE_AGENT_MODELS__THREADS": str(args.threads),
        "EDGE_AGENT_MODELS__WATCH": "false",
        "EDGE_AGENT_METRICS__INTERVAL_S": "0",
        "EDGE_AGENT_ADAPT__ENABLED": "false",
        "EDGE_AGENT_LOG__LEVEL": "warning",
    }
    if args.inline_ms is not None:
        env["EDGE_AGENT_MODELS__INLINE_MAX_MS"] = str(args.inline_ms)
    command = [sys.executable, "-m", "agent", "run", "--mqtt-port", str(port)]
    command += ["--device-id", device, "--models-dir", str(models)]
    with _child(command, env):
        _wait_ready(port, device)
        yield device


@contextmanager
def _child(command: list[str], env: dict[str, str] | None = None) -> Iterator[None]:
    child = subprocess.Popen(command, env=env)
    try:
        yield
    finally:
        child.terminate()
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _wait_ready(port: int, device: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with Requester(MqttConfig(port=port), protocol="5") as requester:
        requester.connect()
        while time.monotonic() < deadline:
            try:
                _command(requester, device, "shm_status", {})
                return
            except RequesterError:
                time.sleep(0.2)
    raise TimeoutError(f"agent {device} did not answer within {timeout} s")


@contextmanager
def _regions(*sizes: int) -> Iterator[list[Any]]:
    handles = [
        shm.create_shared_memory_region(f"bench{i}", f"/bench-shm-{uuid.uuid4().hex}", size)
        for i, size in enumerate(sizes)
    ]
    try:
        yield handles
    finally:
        for handle in handles:
            shm.destroy_shared_memory_region(handle)


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def render(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']}, onnxruntime {report['threads']} threads, "
        f"{report['rounds']} interleaved rounds x {report['requests_per_round']} requests, "
        f"{report['gap_ms']:g} ms apart",
        f"load average before {report['load_before']}, after {report['load_after']}",
        f"{'target':44} {'p50 ms':>9} {'p90 ms':>9} {'x onnxruntime':>14} {'x ort+echo':>11}",
    ]
    for name, figures in report["targets"].items():
        lines.append(
            f"{name:44} {figures['p50_ms']:9.3f} {figures['p90_ms']:9.3f} "
            f"{figures['ratio_to_onnxruntime']:14.3f} "
            f"{figures['ratio_to_onnxruntime_plus_echo']:11.3f}"
        )
    for name, figures in report["targets"].items():
        if name.startswith("shm"):
            ratio = figures["ratio_to_onnxruntime"]
            verdict = "met" if ratio <= 1.05 else "missed"
            lines.append(f"target <= 1.05x onnxruntime, {name}: {ratio:.3f}x, {verdict}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
