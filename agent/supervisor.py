"""Keeps the service manager informed: READY once serving, STATUS lines, WATCHDOG pings
while the health check passes, RELOADING/READY around a SIGHUP reload.

READY=1 follows the broker's acceptance, or `BROKER_WAIT_S` after the models are loaded,
whichever comes first: a missing broker must not make `systemctl start` look hung. STATUS=
then says the agent is waiting for the broker, and why.

The health check looks at the real loops (the MQTT network thread, each model's workers),
so a hung worker stops the pings and systemd restarts the agent; a broker that is down does
not (a restart would not bring it back): the agent keeps retrying with backoff instead.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import structlog

from agent.sdnotify import Notifier

log = structlog.get_logger(__name__)

# Without a systemd watchdog the health check still runs, to log and to refresh STATUS=.
DEFAULT_INTERVAL_S = 10.0
# Until READY=1 the check runs this often, so that READY follows the broker's CONNACK.
_STARTING_POLL_S = 0.1
# How long READY=1 waits for the broker once the models are loaded (the supervisor starts
# then). A connection on loopback or a LAN takes milliseconds, so READY normally means
# "serving"; past this, READY means "running, retrying the broker" and STATUS= says so.
BROKER_WAIT_S = 10.0
# What Supervised.reload() returns when the new configuration was refused.
RELOAD_FAILED = "reload failed"
# What Supervised.status_line() begins with once the agent is shutting down.
STOPPING = "stopping"


class Supervised(Protocol):
    """What the supervisor needs from the agent."""

    @property
    def ready(self) -> bool:
        """Models loaded and the broker connected."""
        ...

    def health_problems(self, loop_stale_after: float) -> list[str]:
        """Why the agent is not healthy (a restart would help); empty when it is."""
        ...

    def degradations(self) -> list[str]:
        """What the agent cannot do while it serves the rest (a restart would not help)."""
        ...

    def status_line(self) -> str:
        """One line for `systemctl status`: what the agent is doing."""
        ...

    def reload(self) -> str:
        """Re-read the configuration and apply it; returns a status line, which starts with
        RELOAD_FAILED when the new configuration was refused. Never raises."""
        ...

    def on_ready(self) -> None:
        """Called once, right after READY=1: start-up is over."""
        ...


class Supervisor:
    """A thread that runs the health check, feeds the watchdog and performs reloads."""

    def __init__(
        self, target: Supervised, notifier: Notifier, watchdog_s: float | None = None
    ) -> None:
        self._target = target
        self._notifier = notifier
        self.watchdog_s = watchdog_s
        # systemd's advice: ping at half the watchdog timeout.
        self.interval = watchdog_s / 2 if watchdog_s else DEFAULT_INTERVAL_S
        # A healthy loop is stamped at least every interval (probe_loop sees to it).
        self.loop_stale_after = 3 * self.interval
        self._wake = threading.Event()
        self._reload = threading.Event()
        self._reloading: threading.Thread | None = None
        self._reload_result: str | None = None
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready_sent = False
        self._last_status: str | None = None
        self._last_problems: list[str] = []
        self._last_degraded: list[str] = []
        self._extended_at = -float("inf")
        self._started_at = time.monotonic()
        self.broker_wait_s = BROKER_WAIT_S
        # Why the last reload was refused: kept in STATUS= until a reload succeeds, or the
        # next health-check tick would replace it.
        self._reload_failure: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()

    def request_reload(self) -> None:
        """Ask for a reload (safe from a signal handler: it only sets events)."""
        self._reload.set()
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._tick()
            except Exception:  # the supervisor must outlive any bug in what it watches
                log.exception("supervisor_tick_failed")
            self._wake.wait(self.interval if self.ready_sent else _STARTING_POLL_S)
            self._wake.clear()

    def _tick(self) -> None:
        self._reload_step()
        problems = self._target.health_problems(self.loop_stale_after)
        if problems != self._last_problems:
            if problems:
                log.error("health_check_failed", problems=problems)
            elif self._last_problems:
                log.info("health_check_passed")
            self._last_problems = problems
        if problems:
            # No ping: if this lasts WatchdogSec, systemd restarts the agent.
            self._status("unhealthy: " + "; ".join(problems))
            return
        degraded = self._target.degradations()
        if degraded != self._last_degraded:
            if degraded:
                log.warning("service_degraded", problems=degraded)
            self._last_degraded = degraded
        waited = time.monotonic() - self._started_at >= self.broker_wait_s
        line = self._line()
        if degraded:
            line = "degraded: " + "; ".join(degraded) + "; " + line
        # Not once shutdown has begun (STOPPING=1 went out; the status line says so).
        stopping = self._target.status_line().startswith(STOPPING)
        if not self.ready_sent and (self._target.ready or waited) and not stopping:
            self.ready_sent = True
            self._last_status = status = line
            self._notifier.ready(status)
            log.info("service_ready", status=status, broker_connected=self._target.ready)
            self._target.on_ready()
        if self.ready_sent:
            if self.watchdog_s:
                self._notifier.watchdog()
        elif time.monotonic() - self._extended_at >= self.interval:
            # Waiting a moment for the broker, alive: keep systemd's start timeout away.
            self._extended_at = time.monotonic()
            self._notifier.extend_timeout(3 * self.interval)
        self._status(line)

    def _line(self) -> str:
        """The agent's status line, after why the last reload was refused, if it was."""
        line = self._target.status_line()
        return line if self._reload_failure is None else f"{self._reload_failure}; {line}"

    def _reload_step(self) -> None:
        """Start a requested reload, or report a finished one.

        The reload runs in a thread of its own: loading models may take longer than the
        watchdog allows, and the health check (and its pings) must go on meanwhile.
        """
        if self._reloading is not None:
            if self._reloading.is_alive():
                return
            self._reloading = None
            status = self._reload_result or self._target.status_line()
            failed = status.startswith(RELOAD_FAILED)
            self._reload_failure = status if failed else None
            self._last_status = status
            if self.ready_sent:
                self._notifier.ready(status)
            else:
                self._notifier.status(status)
        if self._reload.is_set():
            self._reload.clear()
            self._notifier.reloading("reloading the configuration")
            log.info("reload_started")
            self._reloading = threading.Thread(
                target=self._reload_worker, name="reload", daemon=True
            )
            self._reloading.start()

    def _reload_worker(self) -> None:
        self._reload_result = self._target.reload()
        self._wake.set()  # report it now, not at the next interval

    def _status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self._notifier.status(text)
