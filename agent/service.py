"""The daemon: wires configuration, models, the MQTT front end and metrics, runs until told
to stop, and shuts down in order (stop intake, finish queued requests, say `stopped`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import structlog

from agent import __version__
from agent.config import AgentConfig, read_password, usable_cpus
from agent.control import ControlCommands
from agent.events import Events
from agent.models import ModelManager
from agent.monitor import ResourceMonitor
from agent.mqtt.frontend import MqttFrontend
from agent.repository import scan
from agent.session import SessionSettings

log = structlog.get_logger(__name__)

DRAIN_TIMEOUT_S = 30.0


class Agent:
    """One running agent. `start()` loads and connects; `stop()` shuts down in order."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.events = Events()
        threads = config.models.threads or usable_cpus()
        self.manager = ModelManager(
            config.models,
            SessionSettings(threads=threads, spin=config.models.spin, warmup=config.models.warmup),
            self.events.emit,
            stats_window=config.metrics.window,
        )
        self.control = ControlCommands(self.manager)
        self.monitor = ResourceMonitor()
        self.frontend: MqttFrontend | None = None
        self._started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self._stop = threading.Event()

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
        sources, rejected = scan(models_dir)
        for rejection in rejected:
            self.events.emit("model_rejected", path=str(rejection.path), reason=rejection.reason)
        self.manager.load_all(sources)
        self.frontend = MqttFrontend(
            self.config.mqtt,
            self.manager,
            self.control,
            self.events,
            self.status,
            password=read_password(self.config.mqtt),
        )
        self.frontend.start()

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
        for model in self.manager.served():
            models[model.name] = {
                "variant": model.active.name,
                "queue_depth": model.queue.depth,
                "busy_workers": model.queue.busy,
                **model.stats.snapshot().as_dict(),
            }
        return {
            "ts": time.time(),
            "device": self.config.mqtt.device_id,
            "resources": self.monitor.sample().as_dict(),
            "models": models,
        }

    def run_until_stopped(self) -> None:
        """Publish metrics every interval until `request_stop()` (or a signal)."""
        interval = self.config.metrics.interval_s
        while not self._stop.wait(interval if interval > 0 else None):
            if self.frontend is not None:
                self.frontend.publish_metrics(self.metrics())

    def request_stop(self, reason: str = "requested") -> None:
        if not self._stop.is_set():
            log.info("agent_stopping", reason=reason)
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            self.request_stop(signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def stop(self, drain_timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Stop taking requests, finish the queued ones, publish `stopped`, disconnect."""
        self._stop.set()
        if self.frontend is not None:
            self.frontend.stop_intake()
        self.manager.close(drain_timeout)
        if self.frontend is not None:
            self.frontend.stop()
        log.info("agent_stopped")
