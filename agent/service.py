"""The daemon: wires configuration, models, the MQTT front end and metrics, runs until told
to stop, and shuts down in order (stop intake, finish queued requests, say `stopped`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog

from agent import __version__
from agent.adapt.monitor import ResourceMonitor, ResourceSampler, SnapshotSource, usable_cpus
from agent.adapt.procstat import release_file_pages
from agent.coalesce import Coalescer
from agent.config import AgentConfig, read_password
from agent.control import ControlCommands
from agent.errors import ConfigError
from agent.events import Events
from agent.loader import ModelLoader
from agent.logs import configure_logging
from agent.models import ModelManager
from agent.mqtt.frontend import MqttFrontend
from agent.repository import SupplyPolicy, scan
from agent.sdnotify import Notifier, watchdog_interval
from agent.session import SessionSettings
from agent.shm import SharedMemoryRegistry
from agent.state import StateStore
from agent.supervisor import Supervisor

if TYPE_CHECKING:
    # Imported in start() once the front end is connecting: the policy, psutil and watchdog
    # are not needed for a first answer, and importing them took a sixth of the time to it.
    from agent.adapt.loop import Adapter
    from agent.watcher import ModelWatcher

log = structlog.get_logger(__name__)

DRAIN_TIMEOUT_S = 30.0
SIGNAL_POLL_S = 0.25
# The retained status is republished at most this often (loads of many models at once).
STATUS_INTERVAL_S = 0.5


class Agent:
    """One running agent. `start()` loads and connects; `stop()` shuts down in order."""

    def __init__(
        self,
        config: AgentConfig,
        reload_config: Callable[[], AgentConfig] | None = None,
        resources: SnapshotSource | None = None,
    ) -> None:
        self.config = config
        self.events = Events()
        threads = config.models.threads or usable_cpus()
        self.manager = ModelManager(
            config.models,
            SessionSettings(threads=threads, spin=config.models.spin, warmup=config.models.warmup),
            self._on_model_event,
            stats_window=config.metrics.window,
        )
        self.state = StateStore(config.state.dir)
        # Shared-memory regions of local clients; refused while shm.enabled is false.
        self.shared_memory = SharedMemoryRegistry(config.shm)
        self.control = ControlCommands(self.manager, self.state, self.shared_memory)
        # systemd integration; both are replaced in start(), which reads the environment.
        self.notifier = Notifier(None)
        self.supervisor: Supervisor | None = None
        self._reload_config = reload_config
        self._started = False
        self._abandoned_requests = 0
        # One sampler feeds the metrics and the policy; tests may script the figures.
        self._resources = resources
        self.sampler: ResourceSampler | None = None
        self.adapter: Adapter | None = None
        self.frontend: MqttFrontend | None = None
        self.watcher: ModelWatcher | None = None
        self._started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self._stop = threading.Event()
        self._signals: list[int] = []  # noted by the signal handlers, taken by the main loop
        # Loads run there, each bounded, so that neither the watcher nor start-up waits on one.
        self.loader = ModelLoader(
            self.manager,
            lambda: scan(self.config.models.dir, self.manager.supply_policy),
            self._emit,
            timeout_s=config.models.load_timeout_s,
            stopping=self._stop,
        )
        self._status_updates = Coalescer(
            self._publish_status, STATUS_INTERVAL_S, name="status-publisher", stopping=self._stop
        )

    def start(self) -> None:
        """Load every model in the directory, then connect to the broker (in the background)."""
        models_dir = self.config.models.dir
        log.info(
            "agent_starting",
            version=__version__,
            models_dir=str(models_dir),
            device=self.config.mqtt.device_id,
            pid=os.getpid(),
        )
        self.notifier = Notifier.from_environment()
        self.notifier.status(f"loading models from {models_dir}")
        self.manager.supply_policy = SupplyPolicy.from_config(self.config.security)
        self.state = StateStore(self.config.state.dir or _state_directory())
        self.control = ControlCommands(self.manager, self.state, self.shared_memory)
        self.state.load()
        self.manager.preferred = self.state.preferred
        adapt = self.config.adapt
        self.manager.headroom_mb = self._headroom_mb  # None until the sampler's first sample
        self.manager.drain_timeout_s = adapt.drain_timeout_s
        self.manager.quality_first = adapt.enabled
        self._status_updates.start()
        self.loader.start()
        # Each load is bounded: a model stuck loading is abandoned, and start-up goes on.
        self.loader.before_load = self._starting_load
        self.loader.rescan()
        self.loader.before_load = None
        self._warn_unhonoured_pins()
        if self.config.adapt.enabled:
            self.control.expect_adapter()  # see _start_adapting
        self.frontend = MqttFrontend(
            self.config.mqtt,
            self.manager,
            self.control,
            self.events,
            self.status,
            password=read_password(self.config.mqtt),
        )
        self.frontend.start()
        self._start_adapting()
        if self.config.models.watch:
            from agent.watcher import ModelWatcher  # noqa: PLC0415  (see TYPE_CHECKING above)

            self.watcher = ModelWatcher(
                models_dir,
                self._on_models_changed,
                settle_s=self.config.models.settle_s,
                max_wait_s=self.config.models.settle_max_s,
            )
            self.watcher.start()
        self._started = True
        self.supervisor = Supervisor(self, self.notifier, watchdog_interval())
        self.supervisor.start()

    def _start_adapting(self) -> None:
        """The resource sampler (metrics and policy) and, when enabled, the policy's loop."""
        adapt = self.config.adapt
        self.sampler = ResourceSampler(
            self._resources or ResourceMonitor(),
            adapt.interval_s,
            history_size=max(16, int(adapt.history_s / adapt.interval_s)),
        )
        self.sampler.start()
        if not adapt.enabled:
            return
        from agent.adapt.loop import Adapter  # noqa: PLC0415  (see TYPE_CHECKING above)

        self.adapter = Adapter(
            self.manager,
            adapt,
            self.sampler.history.all,
            pinned=self.state.pinned,
            emit=self.events.emit,
            fleet=self._fleet_hook(),
            round_trip=self.frontend.broker_round_trip if self.frontend is not None else None,
        )
        self.control.adapter = self.adapter
        self.adapter.start()

    def status(self) -> dict[str, Any]:
        """The retained status body: who we are and what we serve."""
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self._started_at,
            "models": self.manager.describe(),
        }

    def metrics(self) -> dict[str, Any]:
        """The periodic metrics body: resources, then per-model traffic and latency."""
        models = {}
        window = self.config.metrics.latency_window_s
        for model in self.manager.served():
            models[model.name] = {
                "variant": model.active_name,
                "queue_depth": model.queue.depth,
                "busy_workers": model.queue.busy,
                "arrival_rate": round(model.stats.arrival_rate(window), 3),
                **model.stats.snapshot().as_dict(),
                "variants": {
                    name: model.stats.variant_figures(name, window).as_dict()
                    for name in model.stats.variants_seen()
                },
            }
        return {
            "ts": time.time(),
            "device": self.config.mqtt.device_id,
            "resources": self._latest_resources(),
            "models": models,
        }

    @property
    def abandoned(self) -> int:
        """Requests still queued or running when stop() gave up, plus loads still running
        (stuck): work inside onnxruntime that the interpreter must not be finalised under."""
        return self._abandoned_requests + self.loader.running()

    @abandoned.setter
    def abandoned(self, requests: int) -> None:
        self._abandoned_requests = requests

    def run_until_stopped(self) -> None:
        """Publish metrics every interval until `request_stop()` (or a signal)."""
        interval = self.config.metrics.interval_s
        due = time.monotonic() + interval
        # Never one long wait: a signal that the kernel delivers to another thread only
        # flags Python's handler, which runs when the main thread next wakes. A wait
        # without a timeout here was the rare "no exit within 30 s of SIGTERM".
        while not self._stop.wait(self._next_wait(interval, due)):
            self._take_signals()
            if interval > 0 and time.monotonic() >= due:
                due += interval
                if self.frontend is not None:
                    self.frontend.publish_metrics(self.metrics())

    @staticmethod
    def _next_wait(interval: float, due: float) -> float:
        if interval <= 0:
            return SIGNAL_POLL_S
        return min(SIGNAL_POLL_S, max(0.0, due - time.monotonic()))

    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            log.info("agent_stopping", reason=reason)
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the agent, SIGHUP reloads it.

        The handlers only note the signal: the main thread acts on it within SIGNAL_POLL_S.
        A handler runs on the main thread between two of its bytecodes, possibly while that
        thread holds a lock (structlog's print lock, an Event's condition); a handler that
        logged, or set an Event, would then wait for itself. Seen: Ctrl-C in the quick
        start (SIGINT, then the script's SIGTERM, while the first handler was logging)
        froze the agent for good.
        """

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            self._signals.append(signum)  # a list append: atomic, takes no lock

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, on_signal)

    def _take_signals(self) -> None:
        """Act on the signals the handlers noted (main thread, outside any handler)."""
        while self._signals:
            signum = self._signals.pop(0)
            if signum == signal.SIGHUP:
                self.request_reload()
            else:
                self.request_stop(signal.Signals(signum).name)

    def stop(self, drain_timeout: float | None = None) -> None:
        """Stop taking requests, finish the queued ones, publish `stopped`, disconnect.

        Requests still running after `drain_timeout` (service.stop_timeout_s by default)
        are abandoned: systemd would kill the agent a little later anyway.
        """
        if drain_timeout is None:
            drain_timeout = self.config.service.stop_timeout_s
        self._stop.set()
        self.notifier.stopping(self._stopping_line(drain_timeout))
        if self.adapter is not None:
            self.adapter.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.frontend is not None:
            self.frontend.stop_intake()
        self.abandoned = self.manager.close(drain_timeout)
        if self.abandoned:
            log.warning("requests_abandoned", count=self.abandoned, timeout_s=drain_timeout)
        if self.frontend is not None:
            self.frontend.stop()
        self.shared_memory.close()
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.sampler is not None:
            self.sampler.stop()
        self.notifier.close()
        log.info("agent_stopped")

    # --- Running as a systemd service: readiness, health, status, reload (issue 4) ---

    @property
    def ready(self) -> bool:
        """Models loaded and the broker connected: what READY=1 promises."""
        return self._started and self.frontend is not None and self.frontend.connected

    def on_ready(self) -> None:
        """Serving: hand back the pages of code and constants that only start-up touched
        (procstat.release_file_pages; about 30 MB of RSS with the demo model)."""
        log.info("startup_pages_released", rss_mb=round(release_file_pages(), 1))

    def request_reload(self) -> None:
        """Re-read the configuration soon (SIGHUP); the supervisor thread does the work."""
        if self.supervisor is not None:
            self.supervisor.request_reload()

    def health_problems(self, loop_stale_after: float) -> list[str]:
        """Why the agent cannot serve: a dead or stuck MQTT loop, a hung model worker."""
        problems: list[str] = []
        if self.frontend is not None:
            self.frontend.probe_loop(idle_after=loop_stale_after / 6)
            loop = self.frontend.loop_problem(loop_stale_after)
            if loop is not None:
                problems.append(loop)
        stall = self.config.service.worker_stall_s
        for model in self.manager.served():
            problems += [f"model {model.name}: {p}" for p in model.queue.stalled(stall)]
        return problems

    def degradations(self) -> list[str]:
        """Model loads stuck past models.load_timeout_s. The agent serves everything else,
        and a restart would load the same files and stick again (a restart loop, the
        whole device down for one model): the watchdog keeps being fed, STATUS says it."""
        return [
            f"model {name}: load stuck for {seconds:.0f} s "
            f"(models.load_timeout_s = {self.loader.timeout_s:g})"
            for name, seconds in self.loader.stuck()
        ]

    def status_line(self) -> str:
        """What `systemctl status` shows: models with their active variant, broker state."""
        if self._stop.is_set():
            return "stopping"
        served = self.manager.served()
        models = ", ".join(f"{m.name}={m.active_name}" for m in served) or "none"
        mqtt = self.config.mqtt
        broker = self.frontend.broker_state if self.frontend is not None else "not started"
        verb = "serving" if self.ready else "waiting for the broker;"
        return f"{verb} {len(served)} model(s) [{models}]; broker {mqtt.host}:{mqtt.port} {broker}"

    def reload(self) -> str:
        """Re-read the configuration, apply what can change live, rescan the models.

        Sections that shape connections or threads (mqtt, models, metrics, state) need a
        restart; a change there is logged, not applied. Never raises: a bad file keeps
        the running configuration.
        """
        if self._reload_config is None:
            log.warning("reload_unsupported", reason="no configuration source")
            return self.status_line()
        try:
            new = self._reload_config()
            policy = SupplyPolicy.from_config(new.security)
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            return f"reload failed, running on the previous configuration: {exc}"
        changed = [
            name
            for name in AgentConfig.model_fields
            if getattr(new, name) != getattr(self.config, name)
        ]
        live = [name for name in changed if name in _LIVE_SECTIONS]
        if "log" in live:
            configure_logging(new.log.level, new.log.format)
        self.config = self.config.model_copy(update={name: getattr(new, name) for name in live})
        self.manager.supply_policy = policy
        restart = [name for name in changed if name not in _LIVE_SECTIONS]
        if restart:
            log.warning("reload_needs_restart", sections=restart)
        # A reload retries what failed before: the security section may have changed.
        self.loader.rescan(retry=True)
        self._status_updates.request()
        log.info("reload_done", applied=live, needs_restart=restart)
        return self.status_line()

    def _on_models_changed(self, entries: set[str]) -> None:
        """The watcher saw pushes settle: have the loader bring the served models in line.

        Returns at once: the watcher thread must never wait on a load.
        """
        log.info("models_changed", entries=sorted(entries))
        self.loader.request(entries)  # only these: others may still be half written

    def _emit(self, event: str, **fields: Any) -> None:
        self.events.emit(event, **fields)  # looked up on each call: start() replaces parts

    def _starting_load(self, model: str) -> None:
        # Start-up may load many models, each within the bound: keep systemd's start timeout
        # ahead of the next one.
        self.notifier.extend_timeout(self.loader.timeout_s + 30.0)
        self.notifier.status(f"loading model {model}")

    def _publish_status(self) -> None:
        if self.frontend is not None and not self._stop.is_set():
            self.frontend.publish_status()

    def _on_model_event(self, event: str, **fields: Any) -> None:
        """Events from the model manager: published, and remembered as last known good."""
        self.events.emit(event, **fields)
        if event == "model_loaded" or (event == "variant_swapped" and fields["reason"] == "pinned"):
            # What the policy chose is not remembered: the next boot starts from the pin
            # or the most accurate variant that loads, and the policy decides from there.
            self.state.record_good(fields["model"], fields.get("variant") or fields["to"])
        if event in ("model_loaded", "variant_swapped", "variant_restored", "model_unloaded"):
            self._status_updates.request()  # coalesced: one publication for many loads
        if event in ("model_loaded", "model_unloaded") and self.frontend is not None:
            self.frontend.refresh_fleet()

    def _headroom_mb(self) -> float | None:
        latest = self.sampler.history.latest() if self.sampler is not None else None
        return latest.memory_headroom_mb if latest is not None else None

    def _latest_resources(self) -> dict[str, Any]:
        latest = self.sampler.history.latest() if self.sampler is not None else None
        return latest.as_dict() if latest is not None else {}

    def _fleet_hook(self) -> Callable[[str, bool], None] | None:
        """How the policy gives a model's fleet traffic away, when this agent is in a fleet."""
        frontend = self.frontend
        if frontend is None or not self.config.mqtt.fleet_group:
            return None
        return frontend.set_fleet_membership

    def _warn_unhonoured_pins(self) -> None:
        for model in self.manager.served():
            pinned = self.state.pinned(model.name)
            if pinned is not None and model.active_name != pinned:
                log.warning(
                    "pin_not_honoured", model=model.name, pinned=pinned, active=model.active_name
                )

    def _stopping_line(self, drain_timeout: float) -> str:
        waiting = sum(m.queue.depth + m.queue.busy for m in self.manager.served())
        return f"stopping: finishing {waiting} request(s), at most {drain_timeout:g} s"


# Sections a SIGHUP applies without a restart.
_LIVE_SECTIONS = frozenset({"log", "service", "security"})


def _state_directory() -> Path | None:
    """systemd's StateDirectory= (the first one, when it lists several)."""
    value = os.environ.get("STATE_DIRECTORY", "")
    first = value.split(":")[0]
    return Path(first) if first else None
