"""Brings the served models in line with the model directory, on a thread of its own.

Start-up, the watcher and a SIGHUP reload only ask for a rescan. This thread scans, and runs
each load (and unload) on a short-lived thread that it waits for at most
`models.load_timeout_s`: a load past that is abandoned to its thread (Python cannot stop
it), reported as `model_load_stuck` and shown by the health check until it ends; the same
files are not loaded again meanwhile, a newer push of the model is. One model that never
finishes loading holds up neither the other models nor the agent. What cannot be served
is reported once per (entry, reason, stamp).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from agent.models import EventSink, ModelManager, ServedModel
from agent.repository import ModelSource, Rejection

log = structlog.get_logger(__name__)

Scan = Callable[[], tuple[list[ModelSource], list[Rejection]]]

# How often waits look at the stop event: it is set from a signal handler, which must not
# take a lock to wake anyone. Idle, the loader thread looks less often.
_POLL_S = 0.1
_IDLE_POLL_S = 1.0


@dataclass(frozen=True)
class StuckLoad:
    """A load past its bound, still running on its own thread."""

    model: str
    source: ModelSource
    since: float  # monotonic
    done: threading.Event


class ModelLoader:
    """Runs rescans one at a time on its thread; every load and unload in them is bounded."""

    def __init__(
        self,
        manager: ModelManager,
        scan: Scan,
        emit: EventSink,
        *,
        timeout_s: float,
        stopping: threading.Event,
        unsettled: Callable[[], set[str]] = set,
    ) -> None:
        self._manager = manager
        self._scan = scan
        self._emit = emit
        self.timeout_s = timeout_s
        self._stopping = stopping
        self._unsettled = unsettled
        self._cond = threading.Condition()
        self._requested = 0  # rescans asked for, counted
        self._completed = 0  # the last asked-for rescan that a finished pass covered
        self._retry = False
        self._stuck: list[StuckLoad] = []
        self._workers: set[threading.Thread] = set()
        # Touched by the loader thread only.
        self._failed: dict[str, ModelSource] = {}  # these files could not load: said once
        self._reported: set[tuple[str, str, tuple[tuple[str, int, int], ...]]] = set()
        # Called with the model's name before each load (start-up extends systemd's timeout).
        self.before_load: Callable[[str], None] | None = None
        self._thread = threading.Thread(target=self._run, name="model-loader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request(self, *, retry: bool = False) -> int:
        """Ask for a rescan (soon, after the one running); returns its number for `wait`.

        `retry` also tries again what failed or was rejected before, and reports it again,
        and looks at entries the watcher has not seen settle yet.
        """
        with self._cond:
            self._requested += 1
            self._retry = self._retry or retry
            self._cond.notify_all()
            return self._requested

    def wait(self, ticket: int, timeout: float | None = None) -> bool:
        """Whether rescan `ticket` has been done within `timeout` (False when stopping)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._completed < ticket:
                if self._stopping.is_set() or not self._thread.is_alive():
                    return False
                left = _POLL_S if deadline is None else min(_POLL_S, deadline - time.monotonic())
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def rescan(self, *, retry: bool = False, timeout: float | None = None) -> bool:
        """Ask for a rescan and wait for it (each load in it is bounded, so this is too)."""
        return self.wait(self.request(retry=retry), timeout)

    def stuck(self) -> list[tuple[str, float]]:
        """(model, seconds) of every load past its bound that has not ended yet."""
        now = time.monotonic()
        with self._cond:
            loads = list(self._stuck)
        return [(s.model, now - s.since) for s in loads if not s.done.is_set()]

    def running(self) -> int:
        """Load and unload threads still running: abandoned ones, or one in progress."""
        with self._cond:
            self._workers = {t for t in self._workers if t.is_alive()}
            return len(self._workers)

    # --- The loader thread ---

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._completed >= self._requested and not self._stopping.is_set():
                    self._cond.wait(_IDLE_POLL_S)
                if self._stopping.is_set():
                    self._cond.notify_all()
                    return
                ticket, retry = self._requested, self._retry
                self._retry = False
            try:
                self._pass(retry)
            except Exception:  # one bad pass must not end the loading for good
                log.exception("models_rescan_failed")
            with self._cond:
                self._completed = ticket
                self._cond.notify_all()

    def _pass(self, retry: bool) -> None:
        if retry:
            self._failed.clear()
            self._reported.clear()
        # Entries still being written (the watcher has not seen them settle) are left as
        # they are: a rescan for one push must not judge another push half-way through.
        # A reload (retry) is the operator asking for everything now.
        busy = set() if retry else self._unsettled()
        sources, rejected = self._scan()
        sources = [s for s in sources if s.path.name not in busy]
        rejected = [r for r in rejected if r.path.name not in busy]
        self._report(rejected, busy)
        self._reap()
        served = {model.name: model for model in self._manager.served()}
        for source in sources:
            if self._stopping.is_set():
                return
            name = source.name
            with self._cond:
                if any(s.model == name and s.source == source for s in self._stuck):
                    continue  # these very files are still loading; looked at again when done
            current = served.get(name)
            if current is not None and current.source == source:
                self._failed.pop(name, None)
                continue
            if self._failed.get(name) == source:
                continue  # the same files failed already, and it was said then
            self._load(source)
        # A model whose folder is there but now rejected keeps serving what it had.
        present = {s.name for s in sources} | {_model_name(r.path) for r in rejected}
        present |= {_model_name(Path(entry)) for entry in busy}
        for name in sorted(served.keys() - present):
            if self._stopping.is_set():
                return
            self._unload(name)
        self._failed = {k: v for k, v in self._failed.items() if k in present}

    def _report(self, rejected: list[Rejection], busy: set[str]) -> None:
        """Emit each rejection once; one that goes away or changes is forgotten."""
        keys = {key for key in self._reported if Path(key[0]).name in busy}
        for rejection in rejected:
            key = (str(rejection.path), rejection.reason, rejection.stamp)
            keys.add(key)
            if key not in self._reported:
                self._emit("model_rejected", path=str(rejection.path), reason=rejection.reason)
        self._reported = keys

    def _reap(self) -> None:
        with self._cond:
            ended = [s for s in self._stuck if s.done.is_set()]
            self._stuck = [s for s in self._stuck if not s.done.is_set()]
        for load in ended:
            loaded = self._served_from(load.model, load.source)
            if not loaded:
                # Not these files once more (they may stick again); a newer failure stays.
                self._failed.setdefault(load.model, load.source)
            self._emit(
                "model_load_ended",
                model=load.model,
                after_s=round(time.monotonic() - load.since, 1),
                loaded=loaded,
            )

    def _load(self, source: ModelSource) -> None:
        name = source.name
        if self.before_load is not None:
            self.before_load(name)
        outcome: list[ServedModel | None] = []
        reason = "start" if self.before_load is not None else "reload"

        def load() -> None:
            try:
                # The manager reads the preference (the pin) under the model's lock: a pin
                # that arrives while this load waits for that lock is still honoured.
                outcome.append(self._manager.load(source, reason=reason))
            except Exception:  # a bug in one load must not take the loader with it
                log.exception("model_load_failed", model=name)
                outcome.append(None)

        started = time.monotonic()
        done = self._spawn(f"load-{name}", load, reap=True)
        if self._wait(done, started + self.timeout_s):
            if outcome and outcome[0] is not None:
                self._failed.pop(name, None)
            else:
                self._failed[name] = source
            return
        if self._stopping.is_set():
            return  # abandoned to the stop; running() counts it
        if self._served_from(name, source):
            return  # loaded: only the previous version is still draining
        with self._cond:
            # A stale load that ends after a newer one replaces it for a moment: the rescan
            # its end asks for loads the newer files again.
            self._stuck.append(StuckLoad(name, source, started, done))
        self._emit(
            "model_load_stuck",
            model=name,
            timeout_s=self.timeout_s,
            reason=f"still loading after models.load_timeout_s = {self.timeout_s:g} s; "
            "abandoned to its thread, the model keeps serving what it had",
        )
        if done.is_set():  # ended just now: have it reaped
            self.request()

    def _unload(self, name: str) -> None:
        started = time.monotonic()
        done = self._spawn(f"unload-{name}", lambda: self._manager.unload(name))
        if not self._wait(done, started + self.timeout_s):
            # It no longer serves: only its in-flight requests are still finishing.
            log.warning("model_unload_slow", model=name, timeout_s=self.timeout_s)

    def _spawn(self, name: str, work: Callable[[], object], reap: bool = False) -> threading.Event:
        done = threading.Event()

        def run() -> None:
            try:
                work()
            finally:
                done.set()
                if reap:
                    with self._cond:
                        was_stuck = any(s.done is done for s in self._stuck)
                    if was_stuck:
                        self.request()  # a stuck load ended: see what it left

        thread = threading.Thread(target=run, name=name, daemon=True)
        with self._cond:
            self._workers.add(thread)
        thread.start()
        return done

    def _wait(self, done: threading.Event, deadline: float) -> bool:
        while not done.wait(min(_POLL_S, max(0.0, deadline - time.monotonic()))):
            if self._stopping.is_set() or time.monotonic() >= deadline:
                return done.is_set()
        return True

    def _served_from(self, name: str, source: ModelSource) -> bool:
        current = next((m for m in self._manager.served() if m.name == name), None)
        return current is not None and current.source is source


def _model_name(path: Path) -> str:
    return path.stem if path.suffix == ".onnx" else path.name
