"""The adaptive agent against the same agent pinned to each variant (issue 7, "Benchmark").

One scenario in phases — calm, two busy loops on both cores, calm again, a burst at a multiple
of the sustainable rate — played by an open-loop client at a fixed rate whose requests carry
a deadline, against real `python -m agent run` processes on a private mosquitto: the adaptive
agent, then the same agent (adapt.enabled=false) pinned over control/pin to each variant,
interleaved on the same machine. It prints per phase the latency percentiles, what was
answered in time, late, expired, lost or failed, the swaps, and the effective accuracy; then
the issue's targets with met/missed. Printed, not asserted.

    .venv/bin/python tools/bench_adapt.py [--model DIR | --synthetic] [--scale F] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from agent.adapt.monitor import usable_cpus
from agent.adapt.policy import RungView, objective
from agent.broker import MosquittoBroker, free_port
from agent.config import AgentConfig, MqttConfig, load_config
from agent.datatypes import NUMPY_DTYPES
from agent.logs import configure_logging
from agent.manifest import MANIFEST_FILE, Manifest, read_manifest
from agent.mqtt.requester import Reply, Requester, RequesterError
from agent.protocol import encode_request, split_payload

REPO = Path(__file__).resolve().parent.parent
log = structlog.get_logger("bench_adapt")

# The scenario of the issue: (name, seconds at scale 1, rate kind, busy loops on?).
SCENARIO: tuple[tuple[str, float, str, bool], ...] = (
    ("calm", 20.0, "base", False),
    ("busy loops", 60.0, "base", True),
    ("calm again", 40.0, "base", False),
    ("burst", 20.0, "burst", False),
)
PRESSURE_PHASES = ("busy loops", "burst")
SWAP_EVENTS = ("variant_swapped", "variant_swap_failed", "fleet_left", "fleet_rejoined")
WINDOW_S = 5.0
ID_TEMPLATE = "q00000000"
# The whole-second expiry lets a late request live up to a second; wait that long after the
# last one, plus the time a reply takes to come back.
REPLY_GRACE_S = 2.0
SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


# --- What the benchmark serves ---


@dataclass(frozen=True)
class Rung:
    """One variant as the benchmark judges it: its quality and its measured cost."""

    name: str
    quality: float
    quality_kind: str  # "accuracy", "fidelity" or "none"
    latency_ms: float | None


@dataclass(frozen=True)
class Ladder:
    name: str
    folder: Path
    rungs: tuple[Rung, ...]
    slo_ms: float
    slo_source: str
    batching: bool | None

    def quality(self, variant: str | None) -> float:
        return next((r.quality for r in self.rungs if r.name == variant), 0.0)

    def cost(self, variant: str | None) -> float:
        """The measured latency (ladder position when unmeasured): to tell down from up."""
        for index, rung in enumerate(self.rungs):
            if rung.name == variant:
                return rung.latency_ms if rung.latency_ms is not None else -float(index)
        return math.nan


def read_ladder(folder: Path, config: AgentConfig) -> Ladder:
    """The model's ladder and its objective, computed as the agent computes it."""
    manifest: Manifest = read_manifest(folder / MANIFEST_FILE)
    rungs = []
    for index, variant in enumerate(manifest.variants):
        metrics = variant.metrics
        if metrics.accuracy is not None:
            quality, kind = metrics.accuracy, "accuracy"
        elif metrics.fidelity is not None:
            quality, kind = metrics.fidelity, "fidelity"
        else:
            quality, kind = max(0.0, 1.0 - 0.1 * index), "none"
        rungs.append(Rung(variant.name, quality, kind, metrics.latency_ms or None))
    views = [RungView(r.name, r.quality, r.latency_ms, None) for r in rungs]
    declared = config.adapt.objectives.get(manifest.name)
    slo_declared = declared.slo_p95_ms if declared is not None else manifest.slo_p95_ms
    slo = objective(views, slo_declared, config.adapt)
    if slo is None:
        raise SystemExit(
            f"{folder}: no latency objective (no slo_p95_ms and no measured latency_ms of "
            "the richest variant)"
        )
    source = (
        "declared"
        if slo_declared is not None
        else f"derived: max({config.adapt.slo_min_ms:g}, {config.adapt.slo_factor:g} x "
        f"the richest's {rungs[0].latency_ms:.2f} ms)"
    )
    return Ladder(manifest.name, folder, tuple(rungs), slo, source, manifest.batching)


def sample_payload(folder: Path) -> tuple[bytes, int | None, int]:
    """One batch-1 request in the model's signature (pixel-like values), binary encoded; and
    where its id sits, so that each request gets its own id by patching those bytes."""
    manifest = read_manifest(folder / MANIFEST_FILE)
    rng = np.random.default_rng(0)
    inputs = {}
    for spec in manifest.inputs:
        shape = tuple(1 if d == -1 else d for d in spec.shape)
        inputs[spec.name] = (rng.random(shape) * 16).astype(NUMPY_DTYPES[spec.datatype])
    payload, header_length = encode_request(inputs, ID_TEMPLATE)
    at = payload.index(ID_TEMPLATE.encode())
    return payload, header_length, at


def build_synthetic(folder: Path, rungs: int, richest_ms: float, threads: int) -> Path:
    """A ladder of chains of MatMuls (tests/onnx_models.py `slow_model`) of decreasing depth,
    each timed here at batch 1 and its latency written into the manifest, batching off (each
    request one run, so its cost grows with the rate). Their fidelities are declared, not
    measured: the chains compute different things, only their costs are real."""
    sys.path.insert(0, str(REPO))
    from agent.session import LoadedVariant, SessionSettings  # noqa: PLC0415
    from tests.onnx_models import ladder_folder, slow_model  # noqa: PLC0415

    width = 1024
    work = folder.parent / f".{folder.name}-build"
    settings = SessionSettings(threads=threads)
    x = {"x": np.ones((1, width), dtype=np.float32)}

    def load(layers: int) -> tuple[Path, LoadedVariant]:
        path = slow_model(work / f"depth{layers}.onnx", width=width, layers=layers)
        return path, LoadedVariant.load("synthetic", f"depth{layers}", path, settings)

    def once(variant: LoadedVariant, repeat: int) -> float:
        start = time.perf_counter()
        for _ in range(repeat):
            variant.run(x)
        return (time.perf_counter() - start) / repeat * 1000.0

    # Layers for the richest: scaled from a probe, then once more from that (a long chain
    # does not cost exactly a short one's time per layer).
    layers = 40
    for _ in range(2):
        _, probe = load(layers)
        once(probe, 3)
        layers = max(2, round(layers * richest_ms / min(once(probe, 3) for _ in range(9))))
    shares = [0.1 ** (i / max(1, rungs - 1)) for i in range(rungs)]  # 1 .. 0.1, geometric
    loaded = [load(max(2, round(layers * share))) for share in shares]
    # Timed in interleaved rounds, keeping each one's fastest: other work on a shared
    # machine only makes a run longer, and comes and goes; the policy reads the ratios
    # between the variants' figures, which this keeps best.
    fastest = [math.inf] * len(loaded)
    began = time.monotonic()
    for round_number in range(40):
        if round_number >= 9 and time.monotonic() - began > 4.0:
            break
        for index, (_, variant) in enumerate(loaded):
            repeat = max(3, min(50, round(100.0 / max(0.1, richest_ms * shares[index]))))
            fastest[index] = min(fastest[index], once(variant, repeat))
    built = [(f"depth{path.stem[5:]}", path) for path, _ in loaded]
    latencies = fastest
    ladder_folder(
        folder,
        built,
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, width]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, width]}],
        batching=False,
        description="Synthetic ladder of tools/bench_adapt.py --synthetic.",
    )
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    for index, (entry, ms) in enumerate(zip(manifest["variants"], latencies, strict=True)):
        entry["metrics"] = {
            "fidelity": round(1.0 - 0.06 * index, 3),  # declared, see the docstring
            "latency_ms": round(ms, 4),
        }
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return folder


# --- The agents ---


class EventTap:
    """A subscriber to one agent's events topic, noting when each arrived (monotonic)."""

    def __init__(self, mqtt: MqttConfig, device: str) -> None:
        import paho.mqtt.client as paho  # noqa: PLC0415  (the benchmark is a client too)

        from agent.mqtt.connection import build_client  # noqa: PLC0415

        self.events: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        topic = f"{mqtt.prefix}/{device}/events"
        client = build_client(mqtt, f"bench-events-{device}-{os.getpid()}")

        def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            with suppress(ValueError):
                event = json.loads(msg.payload)
                with self._lock:
                    self.events.append((time.monotonic(), event))

        client.on_message = on_message
        client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        client.on_subscribe = lambda *_: self._subscribed.set()
        client.connect(mqtt.host, mqtt.port)
        client.loop_start()
        self._client = client
        if not self._subscribed.wait(10):
            raise RuntimeError(f"cannot subscribe to {topic}")

    def swaps(self, since: float, until: float) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return [
                (at, e)
                for at, e in self.events
                if e.get("event") in SWAP_EVENTS and since <= at <= until
            ]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class AgentProcess:
    """`python -m agent run` on the private broker, serving only the benchmark model."""

    def __init__(
        self, device: str, port: int, models: Path, workdir: Path, *, adaptive: bool
    ) -> None:
        self.device = device
        self.adaptive = adaptive
        self.log_path = workdir / f"{device}.log"
        state = workdir / f"{device}-state"
        state.mkdir()
        env = {
            **os.environ,
            "EDGE_AGENT_METRICS__INTERVAL_S": "0",
            "EDGE_AGENT_LOG__LEVEL": "info",  # request_expired, with the request's id
            "EDGE_AGENT_STATE__DIR": str(state),
            "EDGE_AGENT_MODELS__WATCH": "false",
        }
        if not adaptive:
            env["EDGE_AGENT_ADAPT__ENABLED"] = "false"
        command = [sys.executable, "-m", "agent", "run", "--mqtt-port", str(port)]
        command += ["--device-id", device, "--models-dir", str(models), "--log-format", "json"]
        self._log = self.log_path.open("w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=self._log, cwd=REPO
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()

    def log_events(self, name: str) -> list[dict[str, Any]]:
        """The agent's own log lines of event `name`."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") == name:
                    found.append(entry)
        return found

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])


# --- The client ---


@dataclass
class Ledger:
    """Every request of one run: when it was sent and what came back."""

    sent: list[float] = field(default_factory=list)
    phase: list[int] = field(default_factory=list)
    replied: list[float] = field(default_factory=list)  # nan: no reply
    variant: list[str | None] = field(default_factory=list)
    error: list[str | None] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)  # behind schedule when sent, s

    def add(self, phase: int, at: float, lag: float) -> int:
        self.sent.append(at)
        self.phase.append(phase)
        self.replied.append(math.nan)
        self.variant.append(None)
        self.error.append(None)
        self.lag.append(lag)
        return len(self.sent) - 1


class Client:
    """A connected requester sending the benchmark's request to one agent."""

    def __init__(self, mqtt: MqttConfig, ladder: Ladder, folder: Path) -> None:
        self.requester = Requester(mqtt, protocol="5")
        self.requester.connect()
        self.mqtt = mqtt
        self.model = ladder.name
        self.payload, self.header_length, self._id_at = sample_payload(folder)

    def topic(self, device: str) -> str:
        return f"{self.mqtt.prefix}/{device}/infer/{self.model}"

    def payload_for(self, index: int) -> bytes:
        rid = f"q{index:08d}".encode()
        at = self._id_at
        return self.payload[:at] + rid + self.payload[at + len(ID_TEMPLATE) :]

    def control(self, device: str, command: str, body: dict[str, Any]) -> dict[str, Any]:
        topic = f"{self.mqtt.prefix}/{device}/control/{command}"
        reply = self.requester.request(topic, json.dumps(body).encode(), timeout=60)
        header, _ = split_payload(reply.payload, reply.header_length)
        if "error" in header:
            raise RuntimeError(f"control/{command} on {device}: {header['error']}")
        return header

    def objective_in(self, device: str, model: str, timeout: float = 10.0) -> float | None:
        """The objective the adaptive agent's policy holds `model` to (control/adapt), once
        its first decision is out; None when it has none by `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self.control(device, "adapt", {})
            body = view.get("models", {}).get(model)
            if body is not None:
                slo = body.get("slo_p95_ms")
                return float(slo) if slo is not None else None
            time.sleep(0.5)
        return None

    def answers(self, device: str) -> str | None:
        """One request; the variant that answered, None without a reply."""
        try:
            reply = self.requester.request(
                self.topic(device), self.payload, self.header_length, timeout=2
            )
        except RequesterError:
            return None
        header, _ = split_payload(reply.payload, reply.header_length)
        variant = header.get("model_version")
        return variant if isinstance(variant, str) else None

    def wait_ready(self, agent: AgentProcess, timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not agent.alive():
                raise RuntimeError(f"agent {agent.device} exited:\n{agent.tail()}")
            variant = self.answers(agent.device)
            if variant is not None:
                return variant
            time.sleep(0.2)
        raise RuntimeError(f"agent {agent.device} not answering after {timeout} s:\n{agent.tail()}")

    def capacity(self, device: str, in_flight: int, seconds: float) -> float:
        """Closed loop: `in_flight` requests outstanding for `seconds`; replies per second."""
        lock = threading.Lock()
        done = [0]
        outstanding = [0]
        finished = threading.Event()
        stop_at = time.monotonic() + seconds

        def launch() -> None:
            future = self.requester.send(self.topic(device), self.payload, self.header_length)
            future.add_done_callback(landed)

        def landed(_f: Future[Reply]) -> None:
            with lock:
                done[0] += 1
                again = time.monotonic() < stop_at
                if not again:
                    outstanding[0] -= 1
                    if outstanding[0] == 0:
                        finished.set()
            if again:
                launch()

        start = time.monotonic()
        with lock:
            outstanding[0] = in_flight
        for _ in range(in_flight):
            launch()
        if not finished.wait(seconds + 30):
            raise RuntimeError(f"{device}: replies stopped coming in the closed loop")
        return done[0] / (time.monotonic() - start)

    def open_loop(  # noqa: PLR0915  (one schedule, read top to bottom)
        self,
        device: str,
        phases: Sequence[Phase],
        expiry_s: int,
        on_phase: Callable[[int, Phase], None],
        progress: Callable[[int, Phase, Ledger, float], None],
    ) -> tuple[Ledger, list[float]]:
        """Send at each phase's fixed rate, whatever comes back; returns the ledger and the
        phases' start times. Latency counts from the moment a request was really sent."""
        ledger = Ledger()
        lock = threading.Lock()
        topic = self.topic(device)
        starts: list[float] = []

        def landed(index: int, future: Future[Reply]) -> None:
            now = time.monotonic()
            reply = future.result()
            variant: str | None = None
            error: str | None = None
            try:
                header, _ = split_payload(reply.payload, reply.header_length)
                version = header.get("model_version")
                variant = version if isinstance(version, str) else None
                if "error" in header:
                    error = str(header["error"])
            except ValueError as exc:
                error = f"undecodable reply: {exc}"
            with lock:
                ledger.replied[index] = now
                ledger.variant[index] = variant
                ledger.error[index] = error

        begin = time.monotonic()
        offset = 0.0
        for number, phase in enumerate(phases):
            phase_start = begin + offset
            _sleep_until(phase_start)
            starts.append(time.monotonic())
            on_phase(number, phase)
            count = max(1, round(phase.rate * phase.seconds))
            next_report = phase_start + 10.0
            for k in range(count):
                due = phase_start + k / phase.rate
                _sleep_until(due)
                now = time.monotonic()
                with lock:
                    index = ledger.add(number, now, now - due)
                future = self.requester.send(
                    topic, self.payload_for(index), self.header_length, expiry_s=expiry_s
                )
                future.add_done_callback(_bind(landed, index))
                if now >= next_report:
                    next_report += 10.0
                    progress(number, phase, ledger, now - phase_start)
            offset += phase.seconds
        _sleep_until(begin + offset)
        starts.append(time.monotonic())  # the end of the last phase
        on_phase(len(phases), phases[-1])
        settle = time.monotonic() + expiry_s + REPLY_GRACE_S
        while time.monotonic() < settle:
            with lock:
                if not any(math.isnan(r) for r in ledger.replied):
                    break
            time.sleep(0.1)
        with lock:
            return (
                Ledger(
                    list(ledger.sent),
                    list(ledger.phase),
                    list(ledger.replied),
                    list(ledger.variant),
                    list(ledger.error),
                    list(ledger.lag),
                ),
                starts,
            )

    def close(self) -> None:
        self.requester.close()


def _bind(
    landed: Callable[[int, Future[Reply]], None], index: int
) -> Callable[[Future[Reply]], None]:
    def done(future: Future[Reply]) -> None:
        landed(index, future)

    return done


def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    rate: float
    busy_loops: bool


class BusyLoops:
    """Processes spinning on the CPU, each ending by itself after `seconds` should it
    outlive us; `stop()` kills them by PID."""

    def __init__(self, count: int, seconds: float) -> None:
        self.children = [
            subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)])
            for _ in range(count)
        ]

    def stop(self) -> None:
        for child in self.children:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
            child.wait()
        self.children = []


# --- One run: the scenario against one agent ---


class PolicyWatch:
    """Asks the adaptive agent for its policy's view (control/adapt) every `interval_s`
    while the scenario runs: why it moved, or why it did not."""

    def __init__(self, client: Client, device: str, model: str, interval_s: float) -> None:
        self.samples: list[tuple[float, dict[str, Any]]] = []
        self._stop = threading.Event()

        def watch() -> None:
            while not self._stop.wait(interval_s):
                try:
                    view = client.control(device, "adapt", {"model": model})
                except (RequesterError, RuntimeError):
                    continue  # a busy moment: the next sample will do
                body = view.get("models", {}).get(model)
                if body is not None:
                    body["board"] = view.get("board", {})
                    self.samples.append((time.monotonic(), body))

        self._thread = threading.Thread(target=watch, name="policy-watch", daemon=True)
        self._thread.start()

    def stop(self) -> list[tuple[float, dict[str, Any]]]:
        self._stop.set()
        self._thread.join(70)
        return self.samples


@dataclass
class Run:
    """What one agent did over the scenario."""

    label: str  # "adaptive" or "pinned <variant>"
    device: str
    ledger: Ledger
    starts: list[float]
    swaps: list[tuple[float, dict[str, Any]]]
    """(when the new variant took over, the event), fleet events when received."""
    expired_ids: set[int]
    first_variant: str | None
    policy: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    """control/adapt samples of the adaptive agent: (when, its view of the model)."""
    load: tuple[float, float] = (0.0, 0.0)
    """1-minute load average at the run's start and end."""


def play(
    client: Client,
    agent: AgentProcess,
    label: str,
    phases: Sequence[Phase],
    expiry_s: int,
    events: EventTap,
    clock: Clock,
) -> Run:
    """The scenario once against `agent`: busy loops started and killed at their phase."""
    active: list[BusyLoops] = []

    def on_phase(number: int, phase: Phase) -> None:
        while active:
            active.pop().stop()
        if number < len(phases):
            left = clock.left(phases[number:])
            log.info(
                "bench_phase",
                run=label,
                phase=phase.name,
                rate_per_s=round(phase.rate, 1),
                seconds=round(phase.seconds, 1),
                busy_loops=phase.busy_loops,
                left_s=round(left),
            )
            if phase.busy_loops:
                active.append(BusyLoops(2, phase.seconds + 2.0))

    def progress(number: int, phase: Phase, ledger: Ledger, in_phase_s: float) -> None:
        answered = sum(1 for r in ledger.replied if not math.isnan(r))
        log.info(
            "bench_progress",
            run=label,
            phase=phase.name,
            sent=len(ledger.sent),
            answered=answered,
            left_s=round(clock.left(phases[number:]) - in_phase_s),
        )

    load_start = os.getloadavg()[0]
    watch = (
        PolicyWatch(client, agent.device, client.model, max(1.0, min(5.0, phases[0].seconds)))
        if agent.adaptive
        else None
    )
    try:
        ledger, starts = client.open_loop(agent.device, phases, expiry_s, on_phase, progress)
    finally:
        while active:
            active.pop().stop()
        samples = watch.stop() if watch is not None else []
    expired = set()
    for entry in agent.log_events("request_expired"):
        rid = str(entry.get("id", ""))
        if rid.startswith("q") and rid[1:].isdigit():
            expired.add(int(rid[1:]))
    swaps = [
        (_took_over(at, e), e)
        for at, e in events.swaps(starts[0], starts[-1] + expiry_s + REPLY_GRACE_S)
    ]
    return Run(
        label,
        agent.device,
        ledger,
        starts,
        swaps,
        expired,
        None,
        samples,
        (load_start, os.getloadavg()[0]),
    )


def _took_over(received: float, event: dict[str, Any]) -> float:
    """When a swap's new variant took over: make-before-break emits its event after the old
    one drained, break-before-make right after the new one is in."""
    if event.get("event") != "variant_swapped" or event.get("mode") == "break-before-make":
        return received
    return received - (event.get("drain_ms") or 0.0) / 1000.0


def _decided(took_over: float, event: dict[str, Any]) -> float:
    """When the swap began (about when the policy decided): before the load, or before the
    whole gap of a break-before-make."""
    if event.get("event") != "variant_swapped":
        return took_over
    if event.get("mode") == "break-before-make":
        return took_over - (event.get("gap_ms") or 0.0) / 1000.0
    return took_over - (event.get("load_ms") or 0.0) / 1000.0


class Clock:
    """What is left of the plan, for the progress lines."""

    def __init__(self, runs_left: int, scenario_s: float, startup_s: float) -> None:
        self.runs_left = runs_left
        self.scenario_s = scenario_s
        self.startup_s = startup_s

    def left(self, phases_left: Sequence[Phase]) -> float:
        this = sum(p.seconds for p in phases_left)
        return this + (self.runs_left - 1) * (self.scenario_s + self.startup_s + REPLY_GRACE_S)


# --- Figures ---


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))]


def outcomes(run: Run, slo_s: float) -> list[str]:
    """Each request's fate: on-time, late, failed, expired (the agent dropped it past its
    expiry) or lost (no reply and no expiry logged)."""
    ledger = run.ledger
    fates = []
    for i, sent in enumerate(ledger.sent):
        replied = ledger.replied[i]
        if math.isnan(replied):
            fates.append("expired" if i in run.expired_ids else "lost")
        elif ledger.error[i] is not None:
            fates.append("failed")
        elif replied - sent <= slo_s:
            fates.append("on-time")
        else:
            fates.append("late")
    return fates


def phase_figures(run: Run, ladder: Ladder, phases: Sequence[Phase]) -> list[dict[str, Any]]:
    slo_s = ladder.slo_ms / 1000.0
    fates = outcomes(run, slo_s)
    ledger = run.ledger
    rows = []
    for number, phase in enumerate(phases):
        picks = [i for i, p in enumerate(ledger.phase) if p == number]
        answered = [
            (ledger.replied[i] - ledger.sent[i]) * 1000.0
            for i in picks
            if not math.isnan(ledger.replied[i]) and ledger.error[i] is None
        ]
        counts = {k: sum(1 for i in picks if fates[i] == k) for k in _FATES}
        effective = sum(ladder.quality(ledger.variant[i]) for i in picks if fates[i] == "on-time")
        served: dict[str, int] = {}
        for i in picks:
            v = ledger.variant[i]
            if v is not None and ledger.error[i] is None:
                served[v] = served.get(v, 0) + 1
        start, end = run.starts[number], run.starts[number + 1]
        swaps = [(at, e) for at, e in run.swaps if start <= at < end]
        rows.append(
            {
                "phase": phase.name,
                "rate_per_s": round(phase.rate, 1),
                "sent": len(picks),
                **counts,
                "p50_ms": _r(_pct(answered, 50)),
                "p95_ms": _r(_pct(answered, 95)),
                "p99_ms": _r(_pct(answered, 99)),
                "swaps": len([1 for _, e in swaps if e.get("event") == "variant_swapped"]),
                "effective_accuracy": round(effective / len(picks), 4) if picks else None,
                "served": served,
                "client_lag_p99_ms": _r((_pct([ledger.lag[i] for i in picks], 99) or 0.0) * 1000.0),
            }
        )
    return rows


_FATES = ("on-time", "late", "expired", "lost", "failed")


def whole_figures(run: Run, ladder: Ladder) -> dict[str, Any]:
    fates = outcomes(run, ladder.slo_ms / 1000.0)
    ledger = run.ledger
    effective = sum(
        ladder.quality(ledger.variant[i]) for i, f in enumerate(fates) if f == "on-time"
    )
    answered = [
        (ledger.replied[i] - ledger.sent[i]) * 1000.0
        for i in range(len(fates))
        if not math.isnan(ledger.replied[i]) and ledger.error[i] is None
    ]
    return {
        "sent": len(fates),
        **{k: fates.count(k) for k in _FATES},
        "p50_ms": _r(_pct(answered, 50)),
        "p95_ms": _r(_pct(answered, 95)),
        "p99_ms": _r(_pct(answered, 99)),
        "effective_accuracy": round(effective / len(fates), 4) if fates else None,
        "errors": _error_kinds(ledger.error),
    }


def _error_kinds(errors: Sequence[str | None]) -> dict[str, int]:
    """The error replies by message, numbers blanked out so that alike ones add up."""
    kinds: dict[str, int] = {}
    for error in errors:
        if error is not None:
            kind = "".join("#" if c.isdigit() else c for c in error)[:80]
            kinds[kind] = kinds.get(kind, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def swap_list(run: Run) -> list[dict[str, Any]]:
    out = []
    for at, e in run.swaps:
        number = next(
            (n for n in range(len(run.starts) - 1) if run.starts[n] <= at < run.starts[n + 1]),
            len(run.starts) - 2,
        )
        out.append(
            {
                "t_s": round(at - run.starts[0], 2),
                "began_t_s": round(_decided(at, e) - run.starts[0], 2),
                "phase_index": number,
                "event": e.get("event"),
                "from": e.get("from", e.get("active")),
                "to": e.get("to"),
                "reason": e.get("reason"),
                "mode": e.get("mode"),
                "load_ms": e.get("load_ms"),
                "drain_ms": e.get("drain_ms"),
                "gap_ms": e.get("gap_ms"),
                "explanation": (e.get("figures") or {}).get("explanation"),
            }
        )
    return out


def reactions(run: Run, ladder: Ladder, phases: Sequence[Phase]) -> dict[str, Any]:
    """Seconds from each pressure's start to the first step down, and from each calm's start
    to the first step up and back to the richest."""
    out: dict[str, Any] = {}
    for number, phase in enumerate(phases):
        start, end = run.starts[number], run.starts[number + 1]
        swaps = [
            (at, e)
            for at, e in run.swaps
            if start <= at < end and e.get("event") == "variant_swapped"
        ]
        down = [(at, e) for at, e in swaps if ladder.cost(e.get("to")) < ladder.cost(e.get("from"))]
        up = [(at, e) for at, e in swaps if ladder.cost(e.get("to")) > ladder.cost(e.get("from"))]
        entry: dict[str, Any] = {"swaps": len(swaps)}
        if phase.name in PRESSURE_PHASES:
            entry["step_down_s"] = round(down[0][0] - start, 2) if down else None
            entry["step_down_began_s"] = round(_decided(*down[0]) - start, 2) if down else None
            entry["step_down_to"] = down[0][1].get("to") if down else None
        else:
            entry["step_up_s"] = round(up[0][0] - start, 2) if up else None
            back = [at for at, e in up if e.get("to") == ladder.rungs[0].name]
            entry["back_to_richest_s"] = round(back[0] - start, 2) if back else None
        said = [body for at, body in run.policy if start <= at < end]
        if said:
            last = said[-1]
            board = last.get("board", {})
            entry["policy_at_end"] = {
                "desired": last.get("desired"),
                "reason": last.get("reason"),
                "explanation": last.get("explanation"),
                "cpu_contended": board.get("cpu_contended"),
                "others_cpu_percent": board.get("others_cpu_percent"),
                "psi_cpu_some_avg10": board.get("psi_cpu_some_avg10"),
            }
            # The policy's own clock: the agent's p95 and the broker's share it added.
            for key in ("observed_p95_ms", "transport_ms"):
                values = [f[key] for b in said if (f := b.get("figures", {})).get(key) is not None]
                entry[f"policy_{key}"] = _r(statistics.median(values)) if values else None
            contended = [b.get("board", {}).get("cpu_contended") for b in said]
            entry["cpu_contended_share"] = round(sum(1 for c in contended if c) / len(contended), 2)
        # What served at the phase's start: the last swap before it, else the first reply.
        before = [e for at, e in run.swaps if at < start and e.get("event") == "variant_swapped"]
        entry["active_at_start"] = before[-1].get("to") if before else run.first_variant
        out[phase.name] = entry
    return out


def windows_p95(run: Run, number: int, slo_s: float) -> list[float]:
    """p95 latency (ms) of each whole 5-second window of phase `number`, a late or missing
    answer counting as infinitely late."""
    ledger = run.ledger
    start, end = run.starts[number], run.starts[number + 1]
    count = max(1, int((end - start) // WINDOW_S))
    buckets: list[list[float]] = [[] for _ in range(count)]
    for i, sent in enumerate(ledger.sent):
        if ledger.phase[i] != number:
            continue
        slot = int((sent - start) // WINDOW_S)
        if 0 <= slot < count:
            replied = ledger.replied[i]
            failed = math.isnan(replied) or ledger.error[i] is not None
            buckets[slot].append(math.inf if failed else (replied - sent) * 1000.0)
    return [p if (p := _pct(b, 95)) is not None else math.inf for b in buckets]


def lost_or_failed_around_swaps(run: Run, slo_s: float) -> tuple[int, int, int]:
    """(lost, failed, requests) among those sent from a second before each swap's load
    began to a second after its old variant drained."""
    fates = outcomes(run, slo_s)
    spans = []
    for at, e in run.swaps:
        if e.get("event") != "variant_swapped":
            continue
        began = at - (e.get("load_ms") or 0.0) / 1000.0
        ended = at + (e.get("drain_ms") or 0.0) / 1000.0
        spans.append((began - 1.0, ended + 1.0))
    picks = [i for i, sent in enumerate(run.ledger.sent) if any(a <= sent <= b for a, b in spans)]
    lost = sum(1 for i in picks if fates[i] == "lost")
    failed = sum(1 for i in picks if fates[i] == "failed")
    return lost, failed, len(picks)


def _phase_p95(run: Run | None, ladder: Ladder, phases: Sequence[Phase], name: str) -> float | None:
    """A run's p95 (ms) over the phase called `name`, a late, expired or missing answer
    counting as infinitely late; None without that run."""
    if run is None:
        return None
    number = next(n for n, p in enumerate(phases) if p.name == name)
    ledger = run.ledger
    took = [
        math.inf
        if math.isnan(ledger.replied[i]) or ledger.error[i] is not None
        else (ledger.replied[i] - ledger.sent[i]) * 1000.0
        for i in range(len(ledger.sent))
        if ledger.phase[i] == number
    ]
    return _pct(took, 95)


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def targets(
    adaptive: Run, pinned: dict[str, Run], ladder: Ladder, phases: Sequence[Phase]
) -> list[dict[str, Any]]:
    """The issue's targets, each with its figures and met/missed (None: cannot be judged)."""
    slo_s = ladder.slo_ms / 1000.0
    out: list[dict[str, Any]] = []
    mine = whole_figures(adaptive, ladder)["effective_accuracy"] or 0.0
    theirs = {v: whole_figures(r, ladder)["effective_accuracy"] or 0.0 for v, r in pinned.items()}
    best = max(theirs, key=lambda v: theirs[v]) if theirs else None
    out.append(
        {
            "target": "effective accuracy over the scenario >= every pinned variant's",
            "figures": f"adaptive {mine:.3f}; best pinned "
            + (f"{best} {theirs[best]:.3f}" if best else "none"),
            "met": all(mine >= t for t in theirs.values()),
        }
    )
    busy = next(n for n, p in enumerate(phases) if p.busy_loops)
    richest = ladder.rungs[0].name
    if richest in pinned:
        mine_w = windows_p95(adaptive, busy, slo_s)
        theirs_w = windows_p95(pinned[richest], busy, slo_s)
        pairs = list(zip(mine_w, theirs_w, strict=False))
        judged = [(m, t) for m, t in pairs if t > ladder.slo_ms]
        kept = sum(1 for m, _ in judged if m <= ladder.slo_ms)
        out.append(
            {
                "target": "busy loops: p95 within the objective in >= 95% of the 5-s windows "
                f"where pinned {richest}'s is not",
                "figures": (
                    f"{kept} of {len(judged)} windows"
                    + (f" ({100.0 * kept / len(judged):.0f}%)" if judged else "")
                    + f"; pinned {richest} missed {len(judged)} of {len(pairs)}"
                ),
                "met": (kept >= 0.95 * len(judged)) if judged else None,
            }
        )
    lost, failed, around = lost_or_failed_around_swaps(adaptive, slo_s)
    swaps = sum(1 for _, e in adaptive.swaps if e.get("event") == "variant_swapped")
    whole = whole_figures(adaptive, ladder)
    out.append(
        {
            "target": "0 requests lost or failed across the swaps",
            "figures": f"{swaps} swaps, {around} requests around them: {lost} lost, {failed} "
            f"failed (whole run: {whole['lost']} lost, {whole['failed']} failed, "
            f"{whole['expired']} expired)",
            "met": (lost == 0 and failed == 0) if swaps else None,
        }
    )
    react = reactions(adaptive, ladder, phases)
    downs = []
    spared = []
    for name in PRESSURE_PHASES:
        entry = react.get(name)
        if entry is None:
            continue
        serving = entry["active_at_start"]
        at_start = ladder.cost(serving)
        if not any(ladder.cost(r.name) < at_start for r in ladder.rungs):
            continue
        # Pressure is pressure on the variant serving: when that variant, pinned through
        # the same phase, kept within the objective, there was nothing to step down for.
        kept = _phase_p95(pinned.get(serving), ladder, phases, name)
        if kept is not None and kept <= ladder.slo_ms:
            spared.append(f"{name}: none needed (pinned {serving} p95 {kept:.1f} ms)")
            continue
        downs.append((name, entry["step_down_s"], entry["step_down_began_s"]))
    out.append(
        {
            "target": "step-down within 5 s of the pressure's start (the lighter one serving)",
            "figures": "; ".join(
                [
                    f"{n}: " + (f"{s:.1f} s (swap began at {b:.1f} s)" if s is not None else "none")
                    for n, s, b in downs
                ]
                + spared
            )
            or "nothing cheaper to step to",
            "met": all(s is not None and s <= 5.0 for _, s, _ in downs) if downs else None,
        }
    )
    per_phase = {name: entry["swaps"] for name, entry in react.items()}
    out.append(
        {
            "target": "at most 2 swaps per change of pressure",
            "figures": ", ".join(f"{n} {c}" for n, c in per_phase.items()),
            "met": all(c <= 2 for c in per_phase.values()),
        }
    )
    return out


# --- The whole benchmark ---


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(None, env=dict(os.environ))
    threads = config.models.threads or usable_cpus()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-adapt-") as tmp:
        work = Path(tmp)
        models = work / "models"
        models.mkdir()
        if args.synthetic:
            log.info("bench_synthetic", rungs=args.synthetic_rungs, richest_ms=args.synthetic_ms)
            folder = build_synthetic(
                models / "synthetic", args.synthetic_rungs, args.synthetic_ms, threads
            )
        else:
            source: Path = args.model.resolve()
            # A copy, not a link: the agent refuses links that leave its model directory.
            folder = Path(shutil.copytree(source, models / source.name))
        ladder = read_ladder(folder, config)
        pinned_names = _pinned_names(ladder, args.pinned)
        expiry_s = max(1, math.ceil(ladder.slo_ms / 1000.0))
        port = free_port()
        broker = MosquittoBroker(port)
        broker.start()
        mqtt = MqttConfig(port=port, device_id="bench-client")
        try:
            return _measure(
                args,
                work,
                models,
                folder,
                ladder,
                pinned_names,
                expiry_s,
                mqtt,
                threads,
                load_before,
            )
        finally:
            broker.stop()


def _measure(
    args: argparse.Namespace,
    work: Path,
    models: Path,
    folder: Path,
    ladder: Ladder,
    pinned_names: list[str],
    expiry_s: int,
    mqtt: MqttConfig,
    threads: int,
    load_before: tuple[float, float, float],
) -> dict[str, Any]:
    client = Client(mqtt, ladder, folder)
    pinned_agent = AgentProcess("bench-pinned", mqtt.port, models, work, adaptive=False)
    pinned_events = EventTap(mqtt, pinned_agent.device)
    taps = [pinned_events]
    try:
        startup_s = time.monotonic()
        client.wait_ready(pinned_agent)
        startup_s = time.monotonic() - startup_s
        capacity = _capacities(client, pinned_agent, ladder, args)
        sustainable = capacity[ladder.rungs[0].name]
        base, burst = args.base * sustainable, args.burst * sustainable
        phases = [
            Phase(name, seconds * args.scale, burst if kind == "burst" else base, loops)
            for name, seconds, kind, loops in SCENARIO
        ]
        scenario_s = sum(p.seconds for p in phases)
        labels = ["adaptive", *pinned_names]
        order: list[str] = []
        for round_number in range(args.rounds):
            order += labels if round_number % 2 == 0 else list(reversed(labels))
        clock = Clock(len(order), scenario_s, startup_s)
        log.info(
            "bench_plan",
            runs=len(order),
            scenario_s=round(scenario_s),
            base_per_s=round(base, 1),
            burst_per_s=round(burst, 1),
            objective_ms=round(ladder.slo_ms, 2),
            expiry_s=expiry_s,
            left_s=round(clock.left(phases)),
        )
        runs: dict[str, list[Run]] = {label: [] for label in labels}
        adaptive_slo: float | None = None
        for number, label in enumerate(order):
            clock.runs_left = len(order) - number
            first: str | None
            if label == "adaptive":
                agent = AgentProcess(
                    f"bench-adaptive-{number}", mqtt.port, models, work, adaptive=True
                )
                tap = EventTap(mqtt, agent.device)
                taps.append(tap)
                try:
                    first = client.wait_ready(agent)
                    adaptive_slo = client.objective_in(agent.device, ladder.name)
                    run = play(client, agent, label, phases, expiry_s, tap, clock)
                finally:
                    agent.stop()
            else:
                client.control(pinned_agent.device, "pin", {"model": ladder.name, "variant": label})
                first = client.answers(pinned_agent.device)
                if first != label:
                    raise RuntimeError(f"pinned to {label}, but {first} answered")
                run = play(
                    client, pinned_agent, f"pinned {label}", phases, expiry_s, pinned_events, clock
                )
            run.first_variant = first
            runs[label].append(run)
    finally:
        pinned_agent.stop()
        for tap in taps:
            tap.close()
        client.close()
    return _report(
        args,
        ladder,
        pinned_names,
        phases,
        runs,
        capacity,
        sustainable,
        expiry_s,
        threads,
        load_before,
        adaptive_slo,
    )


def _capacities(
    client: Client, agent: AgentProcess, ladder: Ladder, args: argparse.Namespace
) -> dict[str, float]:
    """Each variant's closed-loop capacity, pinned over control/pin; the richest's is the
    sustainable rate."""
    capacity: dict[str, float] = {}
    seconds = max(1.0, 5.0 * args.scale)
    for rung in ladder.rungs:
        client.control(agent.device, "pin", {"model": ladder.name, "variant": rung.name})
        for _ in range(10):  # warm the path up
            client.answers(agent.device)
        capacity[rung.name] = client.capacity(agent.device, args.in_flight, seconds)
        log.info(
            "bench_capacity",
            variant=rung.name,
            per_s=round(capacity[rung.name], 1),
            in_flight=args.in_flight,
        )
    return capacity


def _report(
    args: argparse.Namespace,
    ladder: Ladder,
    pinned_names: list[str],
    phases: Sequence[Phase],
    runs: dict[str, list[Run]],
    capacity: dict[str, float],
    sustainable: float,
    expiry_s: int,
    threads: int,
    load_before: tuple[float, float, float],
    adaptive_slo: float | None,
) -> dict[str, Any]:
    rounds = []
    for number in range(args.rounds):
        adaptive = runs["adaptive"][number]
        pinned = {name: runs[name][number] for name in pinned_names}
        table = {
            run.label: {
                "phases": phase_figures(run, ladder, phases),
                "whole": whole_figures(run, ladder),
                "load": [round(v, 2) for v in run.load],
            }
            for run in (adaptive, *pinned.values())
        }
        rounds.append(
            {
                "table": table,
                "reactions": reactions(adaptive, ladder, phases),
                "swaps": swap_list(adaptive),
                "targets": targets(adaptive, pinned, ladder, phases),
            }
        )
    return {
        "model": ladder.name,
        "ladder": [
            {
                "name": r.name,
                "quality": r.quality,
                "quality_kind": r.quality_kind,
                "latency_ms": r.latency_ms,
                "capacity_per_s": round(capacity[r.name], 1),
            }
            for r in ladder.rungs
        ],
        "batching": ladder.batching,
        "objective_ms": round(ladder.slo_ms, 3),
        "objective_source": ladder.slo_source,
        "objective_in_agent_ms": adaptive_slo,
        "expiry_s": expiry_s,
        "sustainable_per_s": round(sustainable, 1),
        "in_flight": args.in_flight,
        "base": args.base,
        "burst": args.burst,
        "scale": args.scale,
        "phases": [
            {
                "name": p.name,
                "seconds": p.seconds,
                "rate_per_s": round(p.rate, 1),
                "busy_loops": p.busy_loops,
            }
            for p in phases
        ],
        "threads": threads,
        "cpus": os.cpu_count(),
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "rounds": rounds,
    }


def _pinned_names(ladder: Ladder, wanted: str | None) -> list[str]:
    names = [r.name for r in ladder.rungs]
    if wanted == "all" or (wanted is None and len(names) <= 4):
        return names
    if wanted is not None:
        # Names, or positions in the ladder (0 is the richest).
        chosen = [
            names[int(n)] if n.isdigit() and int(n) < len(names) else n
            for n in (part.strip() for part in wanted.split(","))
            if n
        ]
        unknown = [n for n in chosen if n not in names]
        if unknown:
            raise SystemExit(f"no such variant(s) in {ladder.name}: {unknown}; have {names}")
        return chosen
    # A long ladder: the richest, the most accurate (not always the same one), the cheapest,
    # then others spread between them by cost, four in all.
    by_cost = sorted(ladder.rungs, key=lambda r: ladder.cost(r.name))
    best = max(ladder.rungs, key=lambda r: r.quality)
    picks = {names[0], best.name, by_cost[0].name}
    for share in (1 / 3, 2 / 3, 1 / 2):
        if len(picks) >= 4:
            break
        picks.add(by_cost[round(share * (len(by_cost) - 1))].name)
    return [n for n in names if n in picks]


# --- Printing ---


def render(report: dict[str, Any]) -> str:
    lines = [
        f"model {report['model']}: "
        + ", ".join(
            f"{r['name']} ({r['quality_kind']} {r['quality']:.3f}, "
            + (f"{r['latency_ms']:.2f} ms" if r["latency_ms"] is not None else "? ms")
            + f", {r['capacity_per_s']:.0f} req/s closed-loop)"
            for r in report["ladder"]
        ),
        f"objective p95 {report['objective_ms']:.2f} ms ({report['objective_source']}"
        + (
            f"; the adaptive agent reports {report['objective_in_agent_ms']:.2f} ms"
            if report["objective_in_agent_ms"] is not None
            else ""
        )
        + ")",
        f"deadline: MQTT 5 Message Expiry {report['expiry_s']} s (whole seconds only), so "
        f"on-time is judged here on the client against the {report['objective_ms']:.2f} ms "
        "objective; late = answered after it, expired = dropped by the agent past the expiry, "
        "lost = no reply and no expiry logged",
        f"sustainable rate {report['sustainable_per_s']:.0f} req/s (the richest variant, "
        f"{report['in_flight']} in flight); base {report['base']:g}x, burst {report['burst']:g}x",
        "phases: "
        + ", ".join(
            f"{p['name']} {p['seconds']:g} s at {p['rate_per_s']:g}/s"
            + (" + 2 busy loops" if p["busy_loops"] else "")
            for p in report["phases"]
        ),
        f"machine: {report['cpus']} CPUs, agent threads {report['threads']}, load average "
        f"{report['load_before'][0]:.1f} before / {report['load_after'][0]:.1f} after "
        "(shared with other work)",
    ]
    for number, round_ in enumerate(report["rounds"]):
        lines += ["", f"round {number + 1}" if len(report["rounds"]) > 1 else ""]
        lines += _render_round(round_)
    return "\n".join(lines)


def _render_round(round_: dict[str, Any]) -> list[str]:
    """One round: the table, the adaptive agent's reactions and swaps, the targets."""
    lines: list[str] = []
    header = (
        f"{'run':22} {'phase':11} {'sent':>6} {'on-time':>7} {'late':>6} {'expd':>5} "
        f"{'lost':>5} {'fail':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'swaps':>5} "
        f"{'eff.acc':>7}  served"
    )
    lines.append(header)
    for label, body in round_["table"].items():
        if body.get("load") is not None:
            a, b = body["load"]
            lines.append(f"{label:22} (load average {a:.1f} at its start, {b:.1f} at its end)")
        for row in [*body["phases"], {"phase": "whole", **body["whole"]}]:
            lines.append(
                f"{label:22} {row['phase']:11} {row['sent']:6d} {row['on-time']:7d} "
                f"{row['late']:6d} {row['expired']:5d} {row['lost']:5d} {row['failed']:5d} "
                f"{_f(row.get('p50_ms'))} {_f(row.get('p95_ms'))} {_f(row.get('p99_ms'))} "
                f"{_i(row.get('swaps'))} {_a(row['effective_accuracy'])}  "
                + ", ".join(f"{k} {v}" for k, v in (row.get("served") or {}).items())
            )
    for label, body in round_["table"].items():
        for kind, count in body["whole"]["errors"].items():
            lines.append(f"{label:22} {count} error replies: {kind}")
    lines += ["", "adaptive agent's reactions:"]
    for name, entry in round_["reactions"].items():
        lines += _render_reaction(name, entry)
    lines.append("swaps:")
    for s in round_["swaps"]:
        if s["event"] != "variant_swapped":
            lines.append(f"  t={s['t_s']:7.2f} s  {s['event']}: {s['reason']}")
            continue
        lines.append(
            f"  t={s['t_s']:7.2f} s (began {s['began_t_s']:.2f})  {s['from']} -> {s['to']} "
            f"({s['reason']}, "
            f"{s['mode']}, load {s['load_ms']} ms, drain {s['drain_ms']} ms, gap "
            f"{s['gap_ms']} ms): {s['explanation']}"
        )
    if not round_["swaps"]:
        lines.append("  none")
    lines += ["", "targets (issue 7):"]
    for t in round_["targets"]:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(f"  [{verdict:6}] {t['target']}: {t['figures']}")
    return lines


def _render_reaction(name: str, entry: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    parts = [f"at start {entry['active_at_start']}", f"{entry['swaps']} swap(s)"]
    if "step_down_s" in entry:
        parts.append(
            f"step-down to {entry['step_down_to']} serving after {entry['step_down_s']} s"
            f" (began after {entry['step_down_began_s']} s)"
            if entry["step_down_s"] is not None
            else "no step-down"
        )
    else:
        parts.append(
            f"step-up after {entry['step_up_s']} s"
            if entry["step_up_s"] is not None
            else "no step-up"
        )
        if entry["back_to_richest_s"] is not None:
            parts.append(f"back to the richest after {entry['back_to_richest_s']} s")
    lines.append(f"  {name:11} " + "; ".join(parts))
    said = entry.get("policy_at_end")
    if said is not None:
        lines.append(
            f"  {'':11} policy at the end: {said['reason']}: {said['explanation']} "
            f"(CPU contended in {100 * entry['cpu_contended_share']:.0f}% of the "
            f"samples; others' CPU {said['others_cpu_percent']}%, PSI cpu some "
            f"{said['psi_cpu_some_avg10']})"
        )
    if entry.get("policy_observed_p95_ms") is not None:
        lines.append(
            f"  {'':11} median of the policy's looks: p95 in the agent "
            f"{entry['policy_observed_p95_ms']} ms, the broker's share "
            f"{entry.get('policy_transport_ms')} ms"
        )
    return lines


def _f(value: float | None) -> str:
    return f"{value:8.2f}" if value is not None else f"{'-':>8}"


def _i(value: int | None) -> str:
    return f"{value:5d}" if value is not None else f"{'':>5}"


def _a(value: float | None) -> str:
    return f"{value:7.3f}" if value is not None else f"{'-':>7}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    default = REPO / "models" / "digits-cnn"
    if not default.is_dir():
        default = REPO / "models" / "digits"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default, help="model folder (manifest)")
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="serve a synthetic ladder of MatMul chains timed here instead of --model",
    )
    parser.add_argument("--synthetic-rungs", type=int, default=3, help="variants in it")
    parser.add_argument(
        "--synthetic-ms", type=float, default=20.0, help="its richest variant's latency, ms"
    )
    parser.add_argument("--scale", type=float, default=1.0, help="shorten every phase (0.25)")
    parser.add_argument(
        "--base", type=float, default=0.4, help="base rate, a share of the sustainable rate"
    )
    parser.add_argument(
        "--burst", type=float, default=3.0, help="burst rate, a multiple of the sustainable rate"
    )
    parser.add_argument(
        "--in-flight", type=int, default=4, help="requests in flight when measuring capacity"
    )
    parser.add_argument(
        "--pinned",
        help="variants to pin, comma-separated names or ladder positions (0: the richest), "
        "or 'all' (default: all, or 4 spread over the costs of a longer ladder)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="scenario rounds, order reversed every other"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--save", type=Path, help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 10 or args.rounds < 1 or args.in_flight < 1:
        parser.error("--scale in (0, 10], --rounds and --in-flight at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("info", "console")
    report = run_bench(args)
    if args.save is not None:
        args.save.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2) if args.json else render(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
