"""The adaptation loop on real pressure: a real `edge-agent run` process inside a v1 memory
cgroup with a hog beside it, inside a CPU-quota cgroup, or next to busy loops, steps its
model down the ladder (and back up); and many swaps under concurrent MQTT traffic lose,
fail or duplicate nothing.

The agent is started inside its cgroup (charges do not move with a process on this kernel),
under the runner's own cgroup; every cgroup and process made here is removed in a finally.
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.broker import MosquittoBroker
from tests import onnx_models
from tests.agent.test_monitor import v1_cgroup_dir
from tests.agent.test_swap import FACTORS, scale_ladder
from tests.conftest import Probe, body

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]

# Each cgroup test's agent runs with short adaptation settings (seconds, not minutes).
FAST_ADAPT = {
    "EDGE_AGENT_ADAPT__INTERVAL_S": "0.2",
    "EDGE_AGENT_ADAPT__DOWN_AFTER_S": "1",
    "EDGE_AGENT_METRICS__INTERVAL_S": "0",
    "EDGE_AGENT_MODELS__THREADS": "1",
    "EDGE_AGENT_MODELS__WATCH": "false",
}


# --- cgroups and processes made by a test ------------------------------------------------------


@contextmanager
def made_cgroup(controller: str) -> Iterator[Path]:
    """A new v1 cgroup of `controller` under this process's own one (skips without root or
    a v1 hierarchy); removed at the end, once the processes started in it have exited."""
    parent = v1_cgroup_dir(controller)
    path = parent / f"edge-agent-live-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError as error:  # a read-only cgroupfs (containers): no test cgroups here
        pytest.skip(f"cannot create a cgroup under {parent}: {error}")
    try:
        yield path
    finally:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                path.rmdir()
                break
            except OSError:
                # EBUSY while a task that was in it is still being reaped
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def start_in(
    cgroup: Path | None,
    argv: list[str],
    env: Mapping[str, str],
    log: Path,
    stdout: int = subprocess.DEVNULL,
) -> subprocess.Popen[str]:
    """`argv` as a child that enters `cgroup` before it execs, so that every page it
    touches is charged there; its stderr (the agent's JSON log) goes to `log`."""
    if cgroup is not None:
        argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *argv]
    with log.open("w") as err:
        return subprocess.Popen(
            argv,
            cwd=REPO,
            env={**os.environ, **env},
            stdout=stdout,
            stderr=err,
            stdin=subprocess.PIPE,
            text=True,
        )


def end(process: subprocess.Popen[str], timeout: float = 15.0) -> None:
    """Stop a child this test started (SIGTERM, then SIGKILL), by its PID."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()


def agent_argv(port: int, device: str, models: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "agent",
        "run",
        "--mqtt-port",
        str(port),
        "--device-id",
        device,
        "--models-dir",
        str(models),
        "--log-format",
        "json",
    ]


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


class EventWatch:
    """The agent's events, as published on `edge/<device>/events`, on a client of their
    own (a request/response client drops what is not its reply)."""

    def __init__(self, port: int, device: str) -> None:
        self.probe = Probe(port)
        self.topic = f"edge/{device}/events"
        self.seen: list[dict[str, Any]] = []
        self.probe.subscribe(self.topic)

    def close(self) -> None:
        self.probe.close()

    def wait(
        self, match: Callable[[dict[str, Any]], bool], timeout: float, alive: Callable[[], bool]
    ) -> dict[str, Any] | None:
        """The first event (seen before or arriving within `timeout`) that `match`es;
        None at the deadline or once `alive()` turns false."""
        for event in self.seen:
            if match(event):
                return event
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and alive():
            try:
                msg = self.probe.messages.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg.topic != self.topic:
                continue
            event: dict[str, Any] = json.loads(msg.payload)
            self.seen.append(event)
            if match(event):
                return event
        return None

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if e.get("event") == name]


@pytest.fixture
def watch(broker: MosquittoBroker) -> Iterator[Callable[[str], EventWatch]]:
    """Watch a device's events; the watchers are closed after the test."""
    made: list[EventWatch] = []

    def make(device: str) -> EventWatch:
        made.append(EventWatch(broker.port, device))
        return made[-1]

    yield make
    for watcher in made:
        watcher.close()


def swap_to(model: str, reason: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (
        e.get("event") == "variant_swapped"
        and e.get("model") == model
        and e.get("reason") == reason
    )


def loaded(model: str, variant: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (
        e.get("event") == "model_loaded" and e.get("model") == model and e.get("variant") == variant
    )


def with_metrics(folder: Path, metrics: Mapping[str, Mapping[str, float]], **extra: Any) -> None:
    """Write each variant's measured figures (and manifest-level keys) into its manifest."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    for entry in manifest["variants"]:
        entry["metrics"] = dict(metrics[entry["name"]])
    manifest.update(extra)
    path.write_text(json.dumps(manifest, indent=1))


# --- memory: a hog in the agent's memory cgroup -------------------------------------------------


def memory_stat(cgroup: Path) -> dict[str, int]:
    stat = {}
    for line in (cgroup / "memory.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        stat[key] = int(value)
    return stat


def resident_mb(pid: int) -> float:
    """A process's resident set (VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def oom_kills(cgroup: Path) -> int:
    """How many processes the kernel's OOM killer has killed in `cgroup` (v1 oom_control)."""
    for line in (cgroup / "memory.oom_control").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


HOG = """
import sys, time
first_mb, step_mb, cap_mb, pause_s = map(float, sys.argv[1:])
held, total, end = [], 0.0, time.monotonic() + 60.0  # exits by itself within a minute
while total < cap_mb and time.monotonic() < end:
    size = first_mb if not held else step_mb
    held.append(b"\\x01" * int(size * 1024 * 1024))  # written: every page is charged
    total += size
    print(total, flush=True)
    time.sleep(pause_s)
print("capped", flush=True)
while time.monotonic() < end and sys.stdin.readline():
    pass
"""


def hog_argv(first_mb: float, step_mb: float, cap_mb: float, pause_s: float) -> list[str]:
    """A child that takes `first_mb` at once, then `step_mb` every `pause_s` up to `cap_mb`,
    holds it until its stdin closes (a minute at most), and says "capped" on the way."""
    return [sys.executable, "-c", HOG, *(str(v) for v in (first_mb, step_mb, cap_mb, pause_s))]


HEAVY_HIDDEN, LIGHT_HIDDEN, LIGHTER_HIDDEN = 60_000, 5_000, 4_000


def memory_ladder(root: Path) -> Path:
    """memlad: a heavy rung of about 117 MB of fp32 weights and two light ones of about
    10 and 8 MB, with manifest figures that say so."""
    folder = root / "models" / "memlad"  # built in place: no copy of the heavy file
    variants = [
        ("heavy", onnx_models.wide_model(folder / "heavy.onnx", HEAVY_HIDDEN)),
        ("light", onnx_models.wide_model(folder / "light.onnx", LIGHT_HIDDEN, seed=1)),
        ("lighter", onnx_models.wide_model(folder / "lighter.onnx", LIGHTER_HIDDEN, seed=2)),
    ]
    onnx_models.ladder_folder(
        folder,
        variants,
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 256]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 256]}],
    )
    with_metrics(
        folder,
        {
            "heavy": {"accuracy": 0.95, "latency_ms": 20.0, "peak_rss_mb": 130.0},
            "light": {"accuracy": 0.93, "latency_ms": 2.0, "peak_rss_mb": 12.0},
            "lighter": {"accuracy": 0.90, "latency_ms": 1.6, "peak_rss_mb": 10.0},
        },
    )
    return root / "models"


def test_a_hog_in_the_memory_cgroup_makes_the_agent_step_down_before_anything_is_killed(
    broker: MosquittoBroker, watch: Callable[[str], EventWatch], tmp_path: Path
) -> None:
    """With a hog growing in its v1 memory cgroup towards more than the limit leaves with the
    heavy rung loaded, the agent swaps to a light rung (reason memory), the memory comes
    back, and the kernel kills nobody: agent and hog both still run with the hog at its cap."""
    models = memory_ladder(tmp_path)
    with made_cgroup("memory") as cgroup:
        device = f"mem-{uuid.uuid4().hex[:8]}"
        events = watch(device)
        env = {
            **FAST_ADAPT,
            "EDGE_AGENT_ADAPT__MEMORY_LOW_MB": "96",
            "EDGE_AGENT_ADAPT__MEMORY_CALM_MB": "128",
            "EDGE_AGENT_ADAPT__UP_AFTER_S": "600",  # no step back up within the test
            "EDGE_AGENT_ADAPT__PROBE_INTERVAL_S": "600",
            "EDGE_AGENT_ADAPT__OBJECTIVES__MEMLAD__SLO_P95_MS": "600000",  # memory only
        }
        agent_log = tmp_path / "agent.log"
        agent = start_in(cgroup, agent_argv(broker.port, device, models), env, agent_log)
        hog: subprocess.Popen[str] | None = None
        try:
            alive = lambda: agent.poll() is None  # noqa: E731  (a tiny predicate)
            assert events.wait(loaded("memlad", "heavy"), 60, alive), tail(agent_log)
            # The limit: what the agent holds now (its anonymous memory, the heavy rung in
            # it) plus room that a hog fills well before its cap. Without a step down the
            # hog's cap is more than the limit can hold; after one, it fits with room.
            time.sleep(0.5)  # not an outcome: lets the load's freed pages settle
            anon_mb = memory_stat(cgroup)["total_rss"] / MIB
            heavy_rss_mb = resident_mb(agent.pid)
            limit_mb = int(anon_mb) + 224
            (cgroup / "memory.limit_in_bytes").write_text(f"{limit_mb * MIB}\n")
            kills_before = oom_kills(cgroup)
            hog_log = tmp_path / "hog.log"
            argv = hog_argv(first_mb=112, step_mb=4, cap_mb=244, pause_s=0.2)
            hog = start_in(cgroup, argv, {}, hog_log, stdout=subprocess.PIPE)
            swapped = events.wait(swap_to("memlad", "memory"), 60, alive)
            assert swapped is not None, f"no step down for memory\n{tail(agent_log)}"
            assert swapped["from"] == "heavy" and swapped["to"] in ("light", "lighter")
            assert hog.stdout is not None
            for line in hog.stdout:  # bounded: the hog stops at its cap or after a minute
                if line.strip() == "capped":
                    break
            time.sleep(1.0)  # not an outcome: the hog holds its cap a moment
            assert hog.poll() is None, f"the hog died (rc {hog.returncode})\n{tail(hog_log)}"
            assert agent.poll() is None, (
                f"the agent died (rc {agent.returncode})\n{tail(agent_log)}"
            )
            assert oom_kills(cgroup) == kills_before
            # The heavy rung's memory left the agent (about 117 MB of weights).
            assert resident_mb(agent.pid) < heavy_rss_mb - 80
            assert memory_stat(cgroup)["total_rss"] / MIB < limit_mb
        finally:
            if hog is not None:
                end(hog)
            end(agent)


# --- CPU: a ladder whose rungs differ clearly in compute ---------------------------------------

WIDTH = 512
CPU_RUNGS = {"heavy": 200, "mid": 60, "light": 15}  # MatMul layers of a slow_model
QUALITY = {"heavy": 0.95, "mid": 0.93, "light": 0.90}


def measured_ms(path: Path, runs: int = 15) -> float:
    """The fastest of a few batch-1 runs on one onnxruntime thread: the variant's compute
    cost, as the compressor would measure it (other load only makes runs slower)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.ones((1, WIDTH), dtype=np.float32)
    session.run(None, {"x": x})
    fastest = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        fastest = min(fastest, time.perf_counter() - start)
    return fastest * 1000.0


def cpu_ladder(
    root: Path, name: str, rungs: Mapping[str, int] = CPU_RUNGS
) -> tuple[Path, dict[str, float]]:
    """A model folder `name` of slow_model rungs (`rungs`: name -> layers, richest first),
    the latency of each measured here and written into the manifest; returns the models
    dir and the latencies."""
    folder = root / "models" / name
    variants = [
        (rung, onnx_models.slow_model(folder / f"{rung}.onnx", width=WIDTH, layers=layers))
        for rung, layers in rungs.items()
    ]
    onnx_models.ladder_folder(
        folder,
        variants,
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, WIDTH]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, WIDTH]}],
    )
    latency = {rung: measured_ms(path) for rung, path in variants}
    with_metrics(
        folder,
        {
            rung: {"accuracy": QUALITY[rung], "latency_ms": round(ms, 3), "peak_rss_mb": 2.0}
            for rung, ms in latency.items()
        },
    )
    return root / "models", latency


REQUEST = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32", "data": [0.5] * WIDTH}]}
)


class Traffic:
    """Clients sending requests one after another (each waits for its reply) until stopped;
    counts what came back."""

    def __init__(self, port: int, topic: str, clients: int = 1) -> None:
        self._stop = threading.Event()
        self.replies = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._probes = [Probe(port) for _ in range(clients)]
        self._threads = [
            threading.Thread(target=self._run, args=(p, topic), daemon=True) for p in self._probes
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, probe: Probe, topic: str) -> None:
        while not self._stop.is_set():
            try:
                reply = probe.request(topic, REQUEST, timeout=60)
            except AssertionError as exc:  # no reply within a minute
                with self._lock:
                    self.errors.append(str(exc))
                return
            with self._lock:
                if "error" in body(reply):
                    self.errors.append(body(reply)["error"])
                self.replies += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(70)
        for probe in self._probes:
            probe.close()


def adapt_view(probe: Probe, device: str) -> dict[str, Any]:
    """The agent's answer on control/adapt."""
    view: dict[str, Any] = body(probe.request(f"edge/{device}/control/adapt", "{}", timeout=30))
    return view


def explain(probe: Probe, device: str, model: str) -> str:
    """What the policy says of `model` now, for a failure message."""
    try:
        view = adapt_view(probe, device)["models"][model]
    except (AssertionError, KeyError) as exc:
        return f"(no adapt view: {exc})"
    figures = view["figures"]
    return (
        f"{view['active']} -> {view['desired']} ({view['reason']}): {view['explanation']}; "
        f"observed p95 {figures.get('observed_p95_ms')} ms over "
        f"{figures.get('observed_count')} runs; predicted {view['predicted_p95_ms']}"
    )


# Only the cgroup's throttling may say the CPU is contended: this machine's other load
# (PSI, other processes' CPU) must not decide for it.
THROTTLING_ONLY = {
    "EDGE_AGENT_ADAPT__PSI_CPU_SOME": "100",
    "EDGE_AGENT_ADAPT__CPU_BUSY_PERCENT": "100",
    "EDGE_AGENT_ADAPT__THROTTLED_RATIO": "0.1",
}


def test_a_cpu_quota_is_noticed_through_throttling_and_a_model_missing_its_objective_steps_down(
    broker: MosquittoBroker, probe: Probe, watch: Callable[[str], EventWatch], tmp_path: Path
) -> None:
    """Inside a v1 CPU cgroup limited to 0.1 cores and serving a steady stream of requests,
    control/adapt shows the throttling and the board as CPU-contended, and a model whose p95
    then exceeds its objective steps down (reason cpu)."""
    models, latency = cpu_ladder(tmp_path, "cpulad")
    # Met with room by the heavy rung on a whole core, missed on a tenth of one.
    slo_ms = 5.0 * latency["heavy"]
    with made_cgroup("cpu") as cgroup:
        device = f"cpu-{uuid.uuid4().hex[:8]}"
        events = watch(device)
        env = {
            **FAST_ADAPT,
            **THROTTLING_ONLY,
            "EDGE_AGENT_ADAPT__LATENCY_WINDOW_S": "3",
            "EDGE_AGENT_ADAPT__UP_AFTER_S": "600",
            "EDGE_AGENT_ADAPT__PROBE_INTERVAL_S": "600",  # requests, not probes, are judged
            "EDGE_AGENT_ADAPT__OBJECTIVES__CPULAD__SLO_P95_MS": f"{slo_ms:.3f}",
        }
        agent_log = tmp_path / "agent.log"
        agent = start_in(cgroup, agent_argv(broker.port, device, models), env, agent_log)
        traffic: Traffic | None = None
        try:
            alive = lambda: agent.poll() is None  # noqa: E731  (a tiny predicate)
            assert events.wait(loaded("cpulad", "heavy"), 60, alive), tail(agent_log)
            # The quota comes after start-up (importing and loading on a tenth of a core
            # would take long) and before any request: every p95 judged is under it.
            (cgroup / "cpu.cfs_period_us").write_text("20000\n")
            (cgroup / "cpu.cfs_quota_us").write_text("2000\n")
            traffic = Traffic(broker.port, f"edge/{device}/infer/cpulad")
            deadline = time.monotonic() + 60
            board: dict[str, Any] = {}
            while time.monotonic() < deadline and alive():
                board = adapt_view(probe, device)["board"]
                if board.get("cgroup_cpu_throttled_ratio") and board["cpu_contended"]:
                    break
                time.sleep(0.2)  # polling interval, not an outcome
            assert board.get("cgroup_cpu_throttled_ratio", 0) > 0, board
            assert board["cpu_contended"] is True, board
            swapped = events.wait(swap_to("cpulad", "cpu"), 60, alive)
            assert swapped is not None, f"no step down for cpu\n{tail(agent_log)}"
            assert swapped["from"] == "heavy" and swapped["to"] in ("mid", "light")
            assert swapped["figures"]["cgroup_cpu_throttled_ratio"] > 0
            assert swapped["figures"]["observed_p95_ms"] > slo_ms
            assert traffic.replies > 0
        finally:
            if traffic is not None:
                traffic.stop()
            end(agent)
        assert not traffic.errors


# --- CPU: busy loops beside the agent, no cgroup -----------------------------------------------

BUSY_RUNGS = {"heavy": 600, "mid": 300, "light": 150}  # each rung half the compute of the last
BUSY_LOOP = """
import time
end = time.monotonic() + 60.0  # exits by itself within a minute
while time.monotonic() < end:
    pass
"""


@contextmanager
def busy_loops(count: int = 2) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` processes spinning on the CPU (one per core), each ending by itself within a
    minute; killed by PID on the way out."""
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(count)]
    try:
        yield loops
    finally:
        for loop in loops:
            if loop.poll() is None:
                loop.kill()
            loop.wait(10)


def served_p95_ms(path: Path, runs: int = 60, gap_s: float = 0.005) -> float:
    """The p95 of batch-1 runs one after another, as a client waiting for each reply sends
    them, in this process: what the agent will observe under the same load."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.ones((1, WIDTH), dtype=np.float32)
    session.run(None, {"x": x})
    took = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        took.append((time.perf_counter() - start) * 1000.0)
        time.sleep(gap_s)  # a reply's round trip before the next request
    return float(np.percentile(took, 95))


def test_two_busy_loops_step_a_model_down_and_it_steps_back_up_after_they_stop(
    broker: MosquittoBroker, probe: Probe, watch: Callable[[str], EventWatch], tmp_path: Path
) -> None:
    """Two busy loops on both cores push a model's p95 under a steady request stream over
    its objective and the agent steps it down (reason cpu or latency) within seconds; after
    they stop it steps back up (reason calm)."""
    models, _latency = cpu_ladder(tmp_path, "busylad", BUSY_RUNGS)
    heavy = models / "busylad" / "heavy.onnx"
    # The objective sits between the heavy rung's p95 on this machine as it is and with
    # the two loops running, both measured here and now (other load on the machine moves
    # both; a fixed figure would not fit every machine).
    calm_ms = served_p95_ms(heavy)
    with busy_loops():
        busy_ms = served_p95_ms(heavy)
    # On 2 cores a single-threaded run shares them with two loops: about 1.5x slower in
    # theory (2/3 of a core), 1.5-1.8x measured. 1.5x still leaves the objective 1.22x
    # under the loaded p95 and 1.22x over the calm one.
    if busy_ms < 1.5 * calm_ms:
        pytest.skip(
            f"two busy loops do not stand out of this machine's other load: heavy p95 "
            f"{calm_ms:.1f} ms without them, {busy_ms:.1f} ms with them"
        )
    slo_ms = math.sqrt(calm_ms * busy_ms)
    device = f"busy-{uuid.uuid4().hex[:8]}"
    events = watch(device)
    env = {
        **FAST_ADAPT,
        # Judged by the latency the loops cause: this machine's other load (PSI, others'
        # CPU) would keep the board from ever reading calm.
        **THROTTLING_ONLY,
        "EDGE_AGENT_ADAPT__INTERVAL_S": "0.1",
        "EDGE_AGENT_ADAPT__LATENCY_WINDOW_S": "3",
        "EDGE_AGENT_ADAPT__UP_AFTER_S": "2",
        "EDGE_AGENT_ADAPT__COOLDOWN_S": "2",
        "EDGE_AGENT_ADAPT__UP_MARGIN": "0.9",
        "EDGE_AGENT_ADAPT__OBJECTIVES__BUSYLAD__SLO_P95_MS": f"{slo_ms:.3f}",
    }
    agent_log = tmp_path / "agent.log"
    agent = start_in(None, agent_argv(broker.port, device, models), env, agent_log)
    traffic: Traffic | None = None
    try:
        alive = lambda: agent.poll() is None  # noqa: E731  (a tiny predicate)
        assert events.wait(loaded("busylad", "heavy"), 60, alive), tail(agent_log)
        traffic = Traffic(broker.port, f"edge/{device}/infer/busylad")
        with busy_loops():
            started = time.monotonic()
            down = events.wait(stepped_down("busylad"), 30, alive)
            took_s = time.monotonic() - started
        assert down is not None, (
            f"no step down within 30 s (objective {slo_ms:.1f} ms, heavy p95 measured "
            f"{calm_ms:.1f} ms calm, {busy_ms:.1f} ms busy): "
            f"{explain(probe, device, 'busylad')}\n{tail(agent_log)}"
        )
        assert down["from"] == "heavy" and down["to"] in ("mid", "light")
        assert down["figures"]["observed_p95_ms"] > slo_ms
        up = events.wait(swap_to("busylad", "calm"), 60, alive)
        assert up is not None, (
            f"no step back up within 60 s (objective {slo_ms:.1f} ms, heavy p95 measured "
            f"{calm_ms:.1f} ms calm): {explain(probe, device, 'busylad')}\n{tail(agent_log)}"
        )
        assert BUSY_RUNGS[up["to"]] > BUSY_RUNGS[up["from"]]
        assert took_s < 30
        assert traffic.replies > 0
    finally:
        if traffic is not None:
            traffic.stop()
        end(agent)
    assert not traffic.errors


def stepped_down(model: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (
        e.get("event") == "variant_swapped"
        and e.get("model") == model
        and e.get("reason") in ("cpu", "latency")
    )


# --- 100 swaps under load from concurrent MQTT clients -----------------------------------------


class Client:
    """An application sending requests over MQTT 5 request/response, a few in flight at a
    time, until stopped; it counts the replies per correlation data."""

    def __init__(self, port: int, topic: str, slot: int, in_flight: int = 8) -> None:
        self.probe = Probe(port)
        self.topic = topic
        self.slot = slot
        self.in_flight = in_flight
        self.sent: dict[bytes, float] = {}  # correlation -> the input value
        self.replies: dict[bytes, list[dict[str, Any]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        count = 0
        while not self._stop.is_set():
            if len(self.sent) - len(self.replies) >= self.in_flight:
                self._take(timeout=0.1)
                continue
            count += 1
            value = float(self.slot * 1000 + count % 1000)
            correlation = f"{self.slot}-{count}".encode()
            self.sent[correlation] = value
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.probe.reply_topic
            props.CorrelationData = correlation
            payload = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": [value] * 4}]}  # fmt: skip
            self.probe.publish(self.topic, json.dumps(payload), props)
            self._take(timeout=0.0)

    def _take(self, timeout: float) -> bool:
        """Record one reply if there is one (waiting up to `timeout`)."""
        try:
            msg = (
                self.probe.messages.get(timeout=timeout)
                if timeout
                else self.probe.messages.get_nowait()
            )
        except queue.Empty:
            return False
        if msg.topic == self.probe.reply_topic:
            self.replies.setdefault(msg.properties.CorrelationData, []).append(body(msg))
        return True

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def drain(self, timeout: float) -> None:
        """Take replies until every request has one, or `timeout`; then until none has come
        for a second (a duplicate would come then)."""
        deadline = time.monotonic() + timeout
        while len(self.replies) < len(self.sent) and time.monotonic() < deadline:
            self._take(timeout=0.1)
        while self._take(timeout=1.0):
            pass

    def close(self) -> None:
        self.probe.close()


def test_a_hundred_pinned_swaps_under_load_from_four_clients_lose_fail_and_duplicate_nothing(
    broker: MosquittoBroker,
    probe: Probe,
    watch: Callable[[str], EventWatch],
    tmp_path: Path,
    start_agent: Callable[..., Any],
) -> None:
    """While four MQTT clients keep sending requests, 100 pins over control/pin (each a
    swap through the owner, alternating two variants, each followed by an unpin) leave
    every request answered exactly once, without an error, by the variant that its reply
    names."""
    models = scale_ladder(tmp_path)
    # The policy off: every swap is a pin's, so that each pin really swaps.
    running = start_agent(models, adapt={"enabled": False})
    topic = running.topic
    events = watch(running.config.mqtt.device_id)
    clients = [Client(broker.port, f"{topic}/infer/lad", slot) for slot in range(4)]
    try:
        for i in range(100):
            variant = "b" if i % 2 == 0 else "a"
            pinned = body(
                probe.request(
                    f"{topic}/control/pin",
                    json.dumps({"model": "lad", "variant": variant}),
                    timeout=30,
                )
            )
            assert pinned == {"model": "lad", "pinned": variant, "active": variant}, pinned
            unpinned = body(
                probe.request(f"{topic}/control/unpin", json.dumps({"model": "lad"}), timeout=30)
            )
            assert unpinned["was_pinned"] is True, unpinned
        for client in clients:
            client.stop()
        for client in clients:
            client.drain(60)
    finally:
        for client in clients:
            client.stop()
            client.close()
    sent = sum(len(c.sent) for c in clients)
    assert sent > 200, f"only {sent} requests: the swaps were not under load"
    for client in clients:
        missing = set(client.sent) - set(client.replies)
        assert not missing, f"{len(missing)} of {len(client.sent)} requests got no reply"
        for correlation, replies in client.replies.items():
            assert len(replies) == 1, f"{correlation!r} answered {len(replies)} times"
            reply = replies[0]
            assert "error" not in reply, reply
            variant = reply["model_version"]
            expected = client.sent[correlation] * FACTORS[variant] + 1.0
            assert reply["outputs"][0]["data"] == [expected] * 4, (variant, reply)
    events.wait(lambda _e: len(events.named("variant_swapped")) >= 100, 30, lambda: True)
    pinned_swaps = [e for e in events.named("variant_swapped") if e["reason"] == "pinned"]
    assert len(pinned_swaps) == 100
