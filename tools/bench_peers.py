"""edge-agent side by side with MLServer and KServe, the servers a user would otherwise pick,
when they are installed (issue 10, item 5). Neither is a dependency: a peer that cannot be
imported is said to be missing and skipped, and with neither the tool says so and exits 0.

Each server runs in its own process and serves the same variant of the same model (the demo
by default) with the agent's onnxruntime session options (agent/bench.py's floor_model and
OPEN_FLOOR_SESSION: 2 threads here), and gets the same Open Inference Protocol JSON request:
- edge-agent over MQTT 5 on a private mosquitto (QoS 1), as `edge-agent bench` measures it;
- MLServer over REST V2, with a minimal onnxruntime runtime (MLServer ships none for ONNX),
  `parallel_workers = 0` (inference in the server's process: no hop to a worker pool);
- the KServe model server over REST V2, a `kserve.Model` with the same session, gRPC off.
Only loopback: MLServer is told `host = 127.0.0.1`; KServe's REST server always binds all
addresses, so its launcher here makes uvicorn bind 127.0.0.1 instead.

Per server: start to the first answer (the request sent at once and again every 5 ms), idle
RSS (1 s after it, 20 requests and a rest later), then in alternating rounds (server after
server, so that all share the machine's moods) sequential requests and a closed loop of N
in flight (one keep-alive connection per request in flight for the HTTP servers), with the
server's CPU time per request. Medians; printed, not asserted. The load generator is Python
in every case (paho for MQTT, http.client for REST): its own cost is in every figure.

    .venv/bin/python tools/bench_peers.py [--mlserver-python PY] [--kserve-python PY]
        [--model-dir models/digits] [--requests 1000] [--concurrency 16] [--duration 3]
        [--rounds 3] [--start-rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog

from agent.adapt.monitor import process_cpu_seconds, process_memory, usable_cpus
from agent.bench import (
    IDLE_REQUESTS,
    IDLE_REST_S,
    IDLE_S,
    OPEN_FLOOR_SESSION,
    ChildProcess,
    Figures,
    floor_model,
    in_flight,
    sample_inputs,
)
from agent.broker import MosquittoBroker, free_port
from agent.config import MqttConfig
from agent.mqtt.requester import Requester
from agent.protocol import encode_request
from agent.repository import read_model, verify_variant
from agent.session import LoadedVariant, SessionSettings

REPO = Path(__file__).resolve().parent.parent
RESEND_S = 0.005
START_TIMEOUT_S = 60.0
PEERS = {"mlserver": ("MLServer", "mlserver"), "kserve": ("KServe", "kserve")}

# A minimal onnxruntime runtime for MLServer: the floor's session, NumpyCodec both ways.
MLSERVER_RUNTIME = (
    OPEN_FLOOR_SESSION
    + """
import json, logging, os
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceResponse

logging.disable(logging.INFO)  # no access log line per request (edge-agent logs warnings)

class OnnxModel(MLModel):
    async def load(self):
        self._session = open_floor_session(json.loads(os.environ["BENCH_PEER_MODEL"]))
        self._names = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload):
        feeds = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        outputs = self._session.run(None, feeds)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(n, a) for n, a in zip(self._names, outputs)],
        )
"""
)

# The KServe model server with the floor's session, on loopback only.
KSERVE_SERVER = (
    OPEN_FLOOR_SESSION
    + """
import json, logging, os, sys
import uvicorn

_config = uvicorn.Config.__init__
def _loopback(self, *args, **kwargs):  # KServe's REST server binds 0.0.0.0 whatever it is told
    kwargs["host"] = "127.0.0.1"
    _config(self, *args, **kwargs)
uvicorn.Config.__init__ = _loopback

import kserve
from kserve import InferOutput, InferResponse

class OnnxModel(kserve.Model):
    def load(self):
        self._session = open_floor_session(json.loads(os.environ["BENCH_PEER_MODEL"]))
        self._names = [o.name for o in self._session.get_outputs()]
        self.ready = True
        return True

    def predict(self, payload, headers=None):
        feeds = {i.name: i.as_numpy() for i in payload.inputs}
        outputs = self._session.run(None, feeds)
        infer = []
        for name, array in zip(self._names, outputs):
            out = InferOutput(name=name, shape=list(array.shape), datatype="FP32")
            out.set_data_from_numpy(array, binary_data=False)
            infer.append(out)
        return InferResponse(response_id=payload.id or "", model_name=self.name,
                             infer_outputs=infer)

logging.disable(logging.INFO)  # no access or trace log lines per request
model = OnnxModel(os.environ["BENCH_PEER_NAME"])
model.load()
sys.argv = sys.argv[:1]
kserve.ModelServer(http_port=int(os.environ["BENCH_PEER_PORT"]), enable_grpc=False,
                   enable_latency_logging=False).start([model])
"""
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, (label, module) in PEERS.items():
        parser.add_argument(
            f"--{key}-python",
            default=sys.executable,
            help=f"a python that can import {module} and onnxruntime ({label})",
        )
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "digits")
    parser.add_argument("--requests", type=int, default=1000, help="sequential, per server")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds in flight, total")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the servers")
    parser.add_argument("--start-rounds", type=int, default=3, help="starts of each server")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    # The broker helper logs with structlog, the servers print: stdout is the report's.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    peers: dict[str, str] = {}
    for key, (label, module) in PEERS.items():
        python = getattr(args, f"{key}_python")
        if _imports(python, module):
            peers[key] = python
        else:
            print(
                f"{label}: not installed (`{python}` cannot import {module} and onnxruntime); "
                f"skipped. Install it in any python and name it with --{key}-python.",
                file=sys.stderr,
            )
    if not peers:
        print(
            "bench_peers: neither MLServer nor KServe is installed here: nothing to compare "
            "edge-agent with (`edge-agent bench` measures it against its floors)."
        )
        return 0
    report = _run(args, peers)
    print(json.dumps(report, indent=2) if args.json else _render(report))
    return 0


def _imports(python: str, module: str) -> bool:
    try:
        found = subprocess.run(
            [python, "-c", f"import {module}, onnxruntime"],
            capture_output=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return found.returncode == 0


class Server:
    """One server under test: how to start it, and how to send it one request."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.name, self.command, self.env = name, command, env
        self.payload = b""

    def connect(self) -> None:
        """Get the client ready (before the server starts)."""

    def reset(self) -> None:
        """Forget connections to a server process that has exited."""

    def close(self) -> None: ...

    def first_answer(self, child: subprocess.Popen[bytes]) -> float:
        """Seconds from now (the server just spawned) to its first answer, the request sent
        again every RESEND_S until one is answered."""
        raise NotImplementedError

    def request(self) -> None:
        raise NotImplementedError

    def in_flight(self, concurrency: int, duration: float) -> tuple[list[float], float]:
        raise NotImplementedError


class MqttServer(Server):
    def __init__(
        self, name: str, command: list[str], env: dict[str, str], mqtt: MqttConfig, topic: str
    ) -> None:
        super().__init__(name, command, env)
        self._mqtt, self._topic = mqtt, topic
        self._requester: Requester | None = None

    def connect(self) -> None:
        self._requester = Requester(self._mqtt, protocol="5")
        self._requester.connect()

    def close(self) -> None:
        if self._requester is not None:
            self._requester.close()

    def first_answer(self, child: subprocess.Popen[bytes]) -> float:
        assert self._requester is not None
        start = time.perf_counter()
        sent: list[Future[Any]] = []
        while time.perf_counter() - start < START_TIMEOUT_S and child.poll() is None:
            sent.append(self._requester.send(self._topic, self.payload))
            done, _ = wait(sent, timeout=RESEND_S, return_when=FIRST_COMPLETED)
            if done:
                _check(next(iter(done)).result().payload)
                return time.perf_counter() - start
        raise RuntimeError(f"{self.name}: no answer (exit code {child.poll()})")

    def request(self) -> None:
        assert self._requester is not None
        _check(self._requester.request(self._topic, self.payload).payload)

    def in_flight(self, concurrency: int, duration: float) -> tuple[list[float], float]:
        return in_flight(
            self.name, self._requester, self._topic, self.payload, None, concurrency, duration
        )


class HttpServer(Server):
    def __init__(
        self, name: str, command: list[str], env: dict[str, str], port: int, model: str
    ) -> None:
        super().__init__(name, command, env)
        self._port, self._path = port, f"/v2/models/{model}/infer"
        self._local = threading.local()

    def first_answer(self, child: subprocess.Popen[bytes]) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < START_TIMEOUT_S and child.poll() is None:
            try:
                self.request()
                return time.perf_counter() - start
            except (OSError, http.client.HTTPException, RuntimeError):
                self.reset()
                time.sleep(RESEND_S)
        raise RuntimeError(f"{self.name}: no answer (exit code {child.poll()})")

    def reset(self) -> None:
        self._local.__dict__.clear()

    def request(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
            self._local.connection = connection
        connection.request("POST", self._path, self.payload, HEADERS)
        response = connection.getresponse()
        _check(response.read(), response.status)

    def in_flight(self, concurrency: int, duration: float) -> tuple[list[float], float]:
        latencies: list[list[float]] = [[] for _ in range(concurrency)]
        stop_at = time.perf_counter() + duration

        def loop(mine: list[float]) -> None:
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                self.request()
                mine.append((time.perf_counter() - t0) * 1000.0)

        start = time.perf_counter()
        threads = [threading.Thread(target=loop, args=(mine,)) for mine in latencies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(duration + 60)
        return [ms for mine in latencies for ms in mine], time.perf_counter() - start


HEADERS = {"Content-Type": "application/json"}


def _check(payload: bytes | bytearray, status: int = 200) -> None:
    if status != 200 or b'"outputs"' not in payload:
        raise RuntimeError(f"an error answer ({status}): {bytes(payload)[:200]!r}")


def _run(args: argparse.Namespace, peers: dict[str, str]) -> dict[str, Any]:
    model_dir: Path = args.model_dir.resolve()
    source = read_model(model_dir, model_dir.parent)
    path = verify_variant(source, source.variants[0], source.folder.parent)
    threads = usable_cpus()
    settings = SessionSettings(threads=threads)
    spec = json.dumps(floor_model(path, settings))
    variant = LoadedVariant.load(source.name, source.variants[0].name, path, settings)
    payload = encode_request(sample_inputs(variant, 1), "b", binary=False, binary_outputs=False)[0]
    variant.close()
    broker = MosquittoBroker(free_port())
    broker.start()
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp, ExitStack() as stack:
        stack.callback(broker.stop)
        servers = [_agent(Path(tmp), model_dir, broker.port, threads, source.name)]
        peer_env = {**os.environ, "BENCH_PEER_MODEL": spec, "BENCH_PEER_NAME": source.name}
        if "mlserver" in peers:
            servers.append(_mlserver(Path(tmp), peers["mlserver"], peer_env, source.name))
        if "kserve" in peers:
            servers.append(_kserve(Path(tmp), peers["kserve"], peer_env, source.name))
        for server in servers:
            server.payload = payload
            server.connect()
            stack.callback(server.close)
        _say(f"start to first answer and idle RSS, {args.start_rounds} alternating rounds")
        starts = _starts(servers, args.start_rounds)
        _say(
            f"{args.requests} sequential requests and {args.concurrency} in flight for "
            f"{args.duration} s per server, in {args.rounds} alternating rounds"
        )
        figures = _serving(servers, args)
    return {
        "model": f"{source.name}/{source.variants[0].name}",
        "payload_bytes": len(payload),
        "threads": threads,
        "concurrency": args.concurrency,
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "servers": {
            s.name: {**starts[s.name], **{k: asdict(v) for k, v in figures[s.name].items()}}
            for s in servers
        },
    }


def _agent(tmp: Path, model_dir: Path, port: int, threads: int, name: str) -> Server:
    models = tmp / "agent-models"
    models.mkdir()
    shutil.copytree(model_dir, models / name)
    env = {
        **os.environ,
        "EDGE_AGENT_METRICS__INTERVAL_S": "0",
        "EDGE_AGENT_LOG__LEVEL": "warning",
        "EDGE_AGENT_MODELS__THREADS": str(threads),
    }
    command = [sys.executable, "-m", "agent", "run", "--mqtt-port", str(port)]
    command += ["--device-id", "peers", "--models-dir", str(models)]
    mqtt = MqttConfig(port=port, device_id="peers")
    return MqttServer("edge-agent", command, env, mqtt, f"edge/peers/infer/{name}")


def _mlserver(tmp: Path, python: str, env: dict[str, str], name: str) -> Server:
    folder = tmp / "mlserver"
    (folder / name).mkdir(parents=True)
    (folder / name / "runtime.py").write_text(MLSERVER_RUNTIME)
    settings = {"name": name, "implementation": "runtime.OnnxModel"}
    (folder / name / "model-settings.json").write_text(json.dumps(settings))
    port = free_port()
    server = {
        "host": "127.0.0.1",
        "http_port": port,
        "grpc_port": free_port(),
        "metrics_port": free_port(),
        "metrics_endpoint": None,
        "parallel_workers": 0,
    }
    (folder / "settings.json").write_text(json.dumps(server))
    command = [python, "-c", "import sys; from mlserver.cli import main; sys.exit(main())"]
    command += ["start", str(folder)]
    return HttpServer("MLServer", command, {**env, "PYTHONPATH": str(folder / name)}, port, name)


def _kserve(tmp: Path, python: str, env: dict[str, str], name: str) -> Server:
    script = tmp / "kserve_server.py"
    script.write_text(KSERVE_SERVER)
    port = free_port()
    return HttpServer(
        "KServe", [python, str(script)], {**env, "BENCH_PEER_PORT": str(port)}, port, name
    )


def _starts(servers: list[Server], rounds: int) -> dict[str, dict[str, Any]]:
    seconds: dict[str, list[float]] = {s.name: [] for s in servers}
    rss: dict[str, list[float]] = {s.name: [] for s in servers}
    for _ in range(rounds):
        for server in servers:
            with ChildProcess(server.command, server.env, sys.stderr) as child:
                seconds[server.name].append(server.first_answer(child))
                time.sleep(IDLE_S)
                for _ in range(IDLE_REQUESTS):
                    server.request()
                time.sleep(IDLE_REST_S)
                rss[server.name].append(process_memory(child.pid).rss_mb)
            server.reset()
    return {
        name: {
            "first_answer_s": statistics.median(seconds[name]),
            "idle_rss_mb": statistics.median(rss[name]),
        }
        for name in seconds
    }


def _serving(servers: list[Server], args: argparse.Namespace) -> dict[str, dict[str, Figures]]:
    with ExitStack() as stack:
        children = {
            s.name: stack.enter_context(ChildProcess(s.command, s.env, sys.stderr)) for s in servers
        }
        for server in servers:
            server.first_answer(children[server.name])
            for _ in range(200):  # warm up
                server.request()
        seq: dict[str, list[float]] = {s.name: [] for s in servers}
        flight: dict[str, list[float]] = {s.name: [] for s in servers}
        seconds = {s.name: [0.0, 0.0] for s in servers}
        cpu = {s.name: [0.0, 0.0] for s in servers}
        per_round = max(1, args.requests // args.rounds)
        for _ in range(args.rounds):
            for server in servers:
                pid = children[server.name].pid
                cpu0, t0 = process_cpu_seconds(pid), time.perf_counter()
                for _ in range(per_round):
                    start = time.perf_counter()
                    server.request()
                    seq[server.name].append((time.perf_counter() - start) * 1000.0)
                seconds[server.name][0] += time.perf_counter() - t0
                cpu[server.name][0] += process_cpu_seconds(pid) - cpu0
        for _ in range(args.rounds):
            for server in servers:
                pid = children[server.name].pid
                cpu0 = process_cpu_seconds(pid)
                done, elapsed = server.in_flight(args.concurrency, args.duration / args.rounds)
                flight[server.name] += done
                seconds[server.name][1] += elapsed
                cpu[server.name][1] += process_cpu_seconds(pid) - cpu0
    return {
        name: {
            "sequential": Figures.of(
                name, seq[name], len(seq[name]) / seconds[name][0], cpu[name][0]
            ),
            "in_flight": Figures.of(
                name, flight[name], len(flight[name]) / seconds[name][1], cpu[name][1]
            ),
        }
        for name in seq
    }


def _render(report: dict[str, Any]) -> str:
    servers = report["servers"]
    agent = servers["edge-agent"]
    lines = [
        f"model {report['model']}, JSON payload of {report['payload_bytes']} bytes, "
        f"{report['threads']} onnxruntime thread(s); load average {report['load_average']} "
        "at the end",
        "",
        f"{'':12} {'seq p50 ms':>11} {'CPU ms/req':>11} {report['concurrency']:>4} in flight "
        f"{'req/s':>7} {'p50 ms':>8} {'CPU ms/req':>11} {'start s':>8} {'idle RSS':>9}",
    ]
    for name, s in servers.items():
        seq, flight = s["sequential"], s["in_flight"]
        lines.append(
            f"{name:12} {seq['p50_ms']:11.3f} {seq['cpu_ms_per_request']:11.3f} "
            f"{'':12} {flight['per_s']:7.0f} {flight['p50_ms']:8.2f} "
            f"{flight['cpu_ms_per_request']:11.3f} {s['first_answer_s']:8.3f} "
            f"{s['idle_rss_mb']:8.1f}M"
        )
    lines.append("")
    for name, s in servers.items():
        if name == "edge-agent":
            continue
        lines.append(
            f"edge-agent / {name}: sequential p50 "
            f"{agent['sequential']['p50_ms'] / s['sequential']['p50_ms']:.2f}x, "
            f"req/s in flight {agent['in_flight']['per_s'] / s['in_flight']['per_s']:.2f}x, "
            f"start {agent['first_answer_s'] / s['first_answer_s']:.2f}x, "
            f"idle RSS {agent['idle_rss_mb'] / s['idle_rss_mb']:.2f}x"
        )
    return "\n".join(lines)


def _say(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
