"""The model manager: which models are served, by which variant, and handing them requests.

It is the one owner of every change of a model's variant — start-up, the watcher's reload,
pin and unpin, the adaptation policy — each under that model's own lock, so that no change
can be lost to another running at the same time. A swap follows one order: load and warm
up the new variant, switch the reference, wait for the old one's batches, release it
(make-before-break); when memory cannot hold both, the old one is drained and released
first and requests wait in the queue meanwhile (break-before-make). A failed load keeps or
restores what was serving.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from agent.adapt.procstat import process_anon_mb, return_free_memory
from agent.batching import BatchingQueue, Job, Outcome
from agent.config import ModelsConfig
from agent.errors import (
    EdgeAgentError,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    RequestExpired,
    VariantRejected,
)
from agent.manifest import TensorSpec, Variant, by_quality
from agent.metrics import ModelStats
from agent.protocol import InferenceRequest
from agent.repository import DEFAULT_POLICY, ModelSource, SupplyPolicy, verify_variant
from agent.runtime import load_variant
from agent.session import SessionSettings
from agent.variant import VariantHandle

log = structlog.get_logger(__name__)

EventSink = Callable[..., None]
"""`emit(event_name, **fields)`: where loads, rejections and swaps are reported."""

SwapMode = Literal["make-before-break", "break-before-make"]

MEMORY_MARGIN = 1.25
"""A variant is expected to need this much more than measured before both fit at once."""


@dataclass(frozen=True)
class SwapRecord:
    """The last change of a model's variant: what, why, and what it cost."""

    at: float  # monotonic
    previous: str | None
    variant: str
    reason: str
    mode: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class VariantFailure:
    """A variant that failed to load: not tried again by the policy for a while."""

    count: int
    last: float  # monotonic
    reason: str


class ServedModel:
    """A model being served: its ladder, its active variant, its queue and its stats."""

    def __init__(
        self,
        source: ModelSource,
        active: VariantHandle,
        config: ModelsConfig,
        stats: ModelStats,
    ) -> None:
        self.name = source.name
        self.source = source
        self.ladder: tuple[Variant, ...] = source.variants
        runtime = active.runtime
        self.inputs: tuple[TensorSpec, ...] = runtime.inputs
        self.outputs: tuple[TensorSpec, ...] = runtime.outputs
        self._by_input = {spec.name: spec for spec in self.inputs}
        self._output_names = frozenset(spec.name for spec in self.outputs)
        self._cond = threading.Condition()
        self._active: VariantHandle | None = active
        self._closed = False
        self.stats = stats
        self.last_swap: SwapRecord | None = None
        declared = source.manifest.batching if source.manifest is not None else None
        self.batching = _can_batch(self.inputs, self.outputs) if declared is None else declared
        self.queue = BatchingQueue(
            self.name,
            self.lease,
            self.stats,
            workers=config.workers,
            max_queue=config.max_queue,
            max_batch_size=config.max_batch_size,
            batch_delay_s=config.batch_delay_ms / 1000.0,
            batchable=self.batching,
            inline_max_ms=config.inline_max_ms,
        )

    @property
    def active(self) -> VariantHandle | None:
        """The variant answering now; None for the moment of a break-before-make swap."""
        return self._active

    @property
    def active_name(self) -> str | None:
        active = self._active
        return active.name if active is not None else None

    def variant(self, name: str) -> Variant:
        """The ladder entry called `name`, or InvalidRequest."""
        for variant in self.ladder:
            if variant.name == name:
                return variant
        raise InvalidRequest(
            f"model {self.name}: no variant {name!r}; it has {[v.name for v in self.ladder]}"
        )

    def lease(self, deadline: float | None, wait: bool = True) -> VariantHandle:
        """A lease on the active variant for one batch (release it when done).

        While a swap leaves the model without a variant, waits until the monotonic
        `deadline` (for good with None); RequestExpired past it, ModelNotReady once the
        model is closed, or at once when `wait` is False.
        """
        with self._cond:
            while self._active is None:
                if self._closed or not wait:
                    raise ModelNotReady(f"model {self.name} has no variant loaded right now")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise RequestExpired(f"model {self.name}: expired while a variant loaded")
                self._cond.wait(remaining)
            handle = self._active
            handle.take()
            return handle

    def install(self, handle: VariantHandle) -> VariantHandle | None:
        """Make `handle` the active variant; the previous one (to retire) is returned."""
        with self._cond:
            previous, self._active = self._active, handle
            self._cond.notify_all()
        return previous

    def clear(self) -> VariantHandle | None:
        """Leave the model without a variant (requests wait); the previous one is returned."""
        with self._cond:
            previous, self._active = self._active, None
        return previous

    def shut(self) -> None:
        """No variant will come any more: requests waiting for one are refused."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def submit(
        self,
        request: InferenceRequest,
        done: Callable[[Outcome], None],
        deadline: float | None = None,
    ) -> None:
        """Check a request against the signature and queue it.

        Raises InvalidRequest for a request that does not fit the model and Overloaded when
        the queue is full; otherwise `done` is called exactly once, from a worker thread.
        """
        try:
            feeds = self._feeds(request)
            names = self._output_names_of(request)
        except InvalidRequest:
            self.stats.record_error()
            raise
        job = Job(feeds, names, done, deadline)
        if not self.queue.try_inline(job):
            self.queue.submit(job)

    def typical_rows(self, window_s: float = 60.0) -> int:
        """The batch size this model has been serving lately (for warming a new variant)."""
        name = self.active_name
        if name is None:
            return 1
        figures = self.stats.variant_figures(name, window_s)
        if figures.mean_rows is None:
            return 1
        return max(1, math.ceil(figures.mean_rows))

    def describe(self) -> dict[str, Any]:
        """The model as status and the control topic show it."""
        swap = self.last_swap
        return {
            "active": self.active_name,
            "reason": swap.reason if swap is not None else None,
            "why": swap.figures.get("explanation") if swap is not None else None,
            "variants": [
                {
                    "name": v.name,
                    "precision": v.precision,
                    "sparsity": v.sparsity,
                    "size_bytes": v.size_bytes,
                }
                for v in self.ladder
            ],
            "inputs": [spec.model_dump() for spec in self.inputs],
            "outputs": [spec.model_dump() for spec in self.outputs],
            "batching": self.batching,
            # ms per row by batch size, measured while serving: where stacking pays
            "stacking_ms_per_row": self.queue.profile(self.active_name or "").figures(),
        }

    def _feeds(self, request: InferenceRequest) -> dict[str, np.ndarray]:
        missing = self._by_input.keys() - request.inputs.keys()
        extra = request.inputs.keys() - self._by_input.keys()
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing input(s) {sorted(missing)}")
            if extra:
                parts.append(f"unknown input(s) {sorted(extra)}")
            raise InvalidRequest(
                f"model {self.name}: {', '.join(parts)}; expected {sorted(self._by_input)}"
            )
        batch: int | None = None
        for name, array in request.inputs.items():
            spec = self._by_input[name]
            datatype = request.datatypes[name]
            if datatype != spec.datatype:
                raise InvalidRequest(
                    f"model {self.name}: input {name!r} is {spec.datatype}, got {datatype}"
                )
            if array.ndim != len(spec.shape) or any(
                want not in (-1, have) for want, have in zip(spec.shape, array.shape, strict=True)
            ):
                raise InvalidRequest(
                    f"model {self.name}: input {name!r} has shape {list(spec.shape)} "
                    f"(-1 is free), got {list(array.shape)}"
                )
            if self.batching and array.ndim:
                if batch is not None and array.shape[0] != batch:
                    raise InvalidRequest(
                        f"model {self.name}: inputs disagree on the batch dimension "
                        f"({batch} and {array.shape[0]})"
                    )
                batch = array.shape[0]
        return request.inputs

    def _output_names_of(self, request: InferenceRequest) -> tuple[str, ...]:
        """The outputs to compute; () for all of them."""
        if request.outputs is None:
            return ()
        unknown = [o.name for o in request.outputs if o.name not in self._output_names]
        if unknown:
            raise InvalidRequest(
                f"model {self.name}: unknown output(s) {unknown}; "
                f"it has {sorted(self._output_names)}"
            )
        return tuple(o.name for o in request.outputs)


class ModelManager:
    """Loads models from their sources, routes requests to them, and owns every change of
    their variants."""

    def __init__(
        self,
        config: ModelsConfig,
        settings: SessionSettings,
        events: EventSink,
        stats_window: int = 2048,
    ) -> None:
        self._config = config
        self._settings = settings
        self._emit = events
        self._stats_window = stats_window
        self._lock = threading.Lock()
        self._owners: dict[str, threading.RLock] = {}
        self._tickets: dict[str, int] = {}  # loads started, per model
        self._installed: dict[str, int] = {}  # the ticket of the load that serves
        self._stats: dict[str, ModelStats] = {}
        self._measured_mb: dict[tuple[str, str], float] = {}
        self.failures: dict[tuple[str, str], VariantFailure] = {}
        # What a variant must prove before it loads; the agent sets it from [security].
        self.supply_policy: SupplyPolicy = DEFAULT_POLICY
        # Read under the model's lock at every load: the pin, or the last known good.
        self.preferred: Callable[[str], str | None] = lambda _name: None
        # Memory this process may still take (the monitor's latest figure), for a swap.
        self.headroom_mb: Callable[[], float | None] = lambda: None
        self.drain_timeout_s = 10.0
        # Adapting: a model starts on its most accurate rung by measured quality, not on
        # the first of its ladder (the agent sets it from adapt.enabled).
        self.quality_first = False
        # Replaced, never mutated: readers on the hot path take no lock.
        self._models: Mapping[str, ServedModel] = {}

    @property
    def models_dir(self) -> Path:
        return self._config.dir

    def get(self, name: str) -> ServedModel:
        """The model called `name`, or ModelNotFound."""
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(f"model {name!r} is not loaded") from None

    def owner(self, name: str) -> threading.RLock:
        """The lock every change of model `name` is made under (re-entrant)."""
        with self._lock:
            lock = self._owners.get(name)
            if lock is None:
                lock = self._owners[name] = threading.RLock()
            return lock

    def stats(self, name: str) -> ModelStats:
        """Model `name`'s stats: they outlive reloads and swaps."""
        with self._lock:
            stats = self._stats.get(name)
            if stats is None:
                stats = self._stats[name] = ModelStats(self._stats_window)
            return stats

    def submit(
        self,
        name: str,
        request: InferenceRequest,
        done: Callable[[Outcome], None],
        deadline: float | None = None,
    ) -> None:
        """Hand a request to the model called `name` (see ServedModel.submit).

        A model replaced between the look-up and the hand-off (a reload) refuses with
        ModelNotReady; the request then goes to its successor, so a reload drops nothing.
        """
        model = self.get(name)
        try:
            model.submit(request, done, deadline)
        except ModelNotReady:
            successor = self.get(name)
            if successor is model:
                raise
            successor.submit(request, done, deadline)

    def names(self) -> list[str]:
        return sorted(self._models)

    def served(self) -> list[ServedModel]:
        models = self._models
        return [models[name] for name in sorted(models)]

    # --- Loading and unloading whole models (start-up, the watcher) ---

    def load(
        self, source: ModelSource, prefer: str | None = None, reason: str = "load"
    ) -> ServedModel | None:
        """Load the richest variant of `source` that can serve; None if none can.

        Every variant that fails is reported with its reason; the model falls back to the
        next rung down. The variant tried first is `prefer`, else `preferred(name)` (the
        pin). The load itself takes no lock, so that a load that never ends (a stuck
        warm-up) holds up no other change of the model; the result is installed under the
        model's lock, where the pin is read again: one that arrived meanwhile is applied.
        A load overtaken by a newer load of the same model is discarded. A model already
        served keeps serving until its successor is ready; its queued requests finish on it.
        """
        name = source.name
        with self._lock:
            ticket = self._tickets[name] = self._tickets.get(name, 0) + 1
        first = prefer if prefer is not None else self.preferred(name)
        loaded = self._load_first(source, first)
        if loaded is None:
            self._emit("model_rejected", model=name, reason="no variant could be loaded")
            return None
        previous: ServedModel | None = None
        with self.owner(name):
            if self._installed.get(name, 0) > ticket:
                loaded.retire()  # a newer version of the model is already serving
                log.info("model_load_superseded", model=name, variant=loaded.name)
                return self._models.get(name)
            self._installed[name] = ticket
            served = ServedModel(source, loaded, self._config, self.stats(name))
            served.last_swap = SwapRecord(time.monotonic(), None, loaded.name, reason, "load")
            with self._lock:
                previous = self._models.get(name)
                self._models = {**self._models, name: served}
            self._emit(
                "model_loaded",
                model=name,
                variant=loaded.name,
                reason=reason,
                ms=round(loaded.runtime.load_ms, 1),
                rss_added_mb=_round(loaded.rss_added_mb),
                warmed_up=loaded.runtime.warmed_up,
                batching=served.batching,
                inputs=[s.model_dump() for s in served.inputs],
            )
            self._honour_pin(served, first)
        if previous is not None:
            self._retire_model(previous, self.drain_timeout_s * 3)
        return served

    def _honour_pin(self, served: ServedModel, tried: str | None) -> None:
        """A pin set while the model loaded (read again under its lock) is applied now."""
        pinned = self.preferred(served.name)
        if pinned is None or pinned in (tried, served.active_name):
            return
        if any(v.name == pinned for v in served.ladder):
            with contextlib.suppress(VariantRejected):  # reported; it serves what loaded
                self._swap(served, served.variant(pinned), "pinned", {})

    def _load_first(self, source: ModelSource, prefer: str | None) -> VariantHandle | None:
        """The first variant that loads, `prefer` first, then the ladder in order — in
        measured quality order when `quality_first` (the policy then takes it from there)."""
        ladder = by_quality(source.variants) if self.quality_first else list(source.variants)
        # sorted() is stable: the preferred variant first, then the ladder in its order.
        for variant in sorted(ladder, key=lambda v: v.name != prefer):
            try:
                return self._load_handle(source, variant)
            except VariantRejected as exc:
                self._emit(
                    "variant_rejected", model=source.name, variant=variant.name, reason=str(exc)
                )
        return None

    def load_all(
        self,
        sources: Iterable[ModelSource],
        prefer: Callable[[str], str | None] | None = None,
    ) -> None:
        for source in sources:
            self.load(source, prefer(source.name) if prefer is not None else None, "start")

    def unload(self, name: str, timeout: float = 30.0) -> bool:
        """Stop serving `name` once its queued requests are done; False if it was not loaded."""
        with self.owner(name), self._lock:
            model = self._models.get(name)
            if model is None:
                return False
            self._models = {k: v for k, v in self._models.items() if k != name}
        self._retire_model(model, timeout)
        self._emit("model_unloaded", model=name)
        return True

    def _retire_model(self, model: ServedModel, timeout: float) -> None:
        """Let a replaced or removed model finish its queue, then release its variant."""
        if not model.queue.close(timeout):
            log.warning("model_workers_still_busy", model=model.name, timeout_s=timeout)
            model.queue.abandon(ModelNotReady(f"model {model.name} is being unloaded"))
        model.shut()
        handle = model.clear()
        if handle is not None:
            handle.retire()

    def describe(self) -> dict[str, Any]:
        return {model.name: model.describe() for model in self.served()}

    def close(self, timeout: float = 30.0) -> int:
        """Finish queued requests of every model within one bound for all, then stop their
        workers; requests still queued then are answered 'stopping' (503). Returns how
        many requests were still queued or running at the bound."""
        deadline = time.monotonic() + timeout
        models = self.served()
        for model in models:  # every intake closes first: the drains run side by side
            model.queue.close(0.0)
        left = 0
        for model in models:
            if not model.queue.close(max(0.0, deadline - time.monotonic())):
                log.warning("model_workers_still_busy", model=model.name, timeout_s=timeout)
                left += model.queue.busy
                left += model.queue.abandon(ModelNotReady(f"model {model.name}: agent stopping"))
        for model in models:
            model.shut()
            handle = model.clear()
            if handle is not None:
                handle.retire()
        return left

    # --- Switching the active variant (pins, the policy) ---

    def switch(
        self,
        name: str,
        variant: str,
        reason: str,
        figures: Mapping[str, Any] | None = None,
    ) -> ServedModel:
        """Make `variant` the active one of model `name` and return the model.

        Make-before-break when memory holds both variants (load and warm up the new one,
        switch, wait for the old one's batches, release it); break-before-make when it
        does not. Raises ModelNotFound, InvalidRequest (no such variant) or VariantRejected
        (it cannot load; the model then serves what it had, or what could be restored).
        """
        with self.owner(name):
            # Looked up under the lock: a reload that ran meanwhile is the model we change.
            served = self.get(name)
            target = served.variant(variant)
            if served.active_name == variant:
                return served
            self._swap(served, target, reason, dict(figures or {}))
        return served

    def predicted_mb(self, model: str, variant: Variant) -> float | None:
        """What loading `variant` is expected to add to the RSS: the larger of what the
        agent measured when it loaded before and the manifest's peak figure (either alone
        when only one is known; None when neither is). The larger, because a load that
        reuses pages freed by an earlier one measures less than a cold one needs."""
        measured = self._measured_mb.get((model, variant.name))
        declared = variant.metrics.peak_rss_mb
        known = [v for v in (measured, declared) if v is not None]
        return max(known) if known else None

    def measured_mb(self, model: str, variant: str) -> float | None:
        return self._measured_mb.get((model, variant))

    def _swap(
        self, served: ServedModel, target: Variant, reason: str, figures: dict[str, Any]
    ) -> None:
        need = self.predicted_mb(served.name, target)
        headroom = self.headroom_mb()
        both_fit = need is None or headroom is None or need * MEMORY_MARGIN < headroom
        start = time.monotonic()
        rows = served.typical_rows()
        if both_fit:
            try:
                handle = self._load_handle(served.source, target, rows)
            except VariantRejected as exc:
                self._failed(served, target, reason, exc)
                raise
            loaded = time.monotonic()
            previous = served.install(handle)
            drain_ms = self._drain(previous)
            self._swapped(
                served, previous, handle, reason, figures, "make-before-break",
                load_ms=(loaded - start) * 1000.0, drain_ms=drain_ms, gap_ms=0.0,
                need_mb=need, headroom_mb=headroom,
            )
            return
        previous = served.clear()  # requests wait in the queue from here
        drain_ms = self._drain(previous)
        drained = time.monotonic()
        try:
            handle = self._load_handle(served.source, target, rows)
        except VariantRejected as exc:
            self._failed(served, target, reason, exc)
            self._restore(served, previous)
            raise
        served.install(handle)
        done = time.monotonic()
        self._swapped(
            served, previous, handle, reason, figures, "break-before-make",
            load_ms=(done - drained) * 1000.0, drain_ms=drain_ms,
            gap_ms=(done - start) * 1000.0, need_mb=need, headroom_mb=headroom,
        )

    def _drain(self, previous: VariantHandle | None) -> float | None:
        """Retire `previous` and wait (bounded) for its batches; ms waited, None if not
        drained in time (it is released when its last batch ends)."""
        if previous is None:
            return 0.0
        start = time.monotonic()
        previous.retire()
        if not previous.wait_drained(self.drain_timeout_s):
            return None
        return (time.monotonic() - start) * 1000.0

    def _restore(self, served: ServedModel, previous: VariantHandle | None) -> None:
        """After a failed break-before-make load: the old variant back, else any that loads."""
        candidates = [previous.variant] if previous is not None else []
        candidates += [v for v in reversed(served.ladder) if v not in candidates]
        for variant in candidates:
            try:
                handle = self._load_handle(served.source, variant)
            except VariantRejected as exc:
                self._emit(
                    "variant_rejected", model=served.name, variant=variant.name, reason=str(exc)
                )
                continue
            served.install(handle)
            self._emit(
                "variant_restored", model=served.name, variant=variant.name, reason="swap failed"
            )
            return
        # Nothing loads any more: refuse the waiting requests rather than hold them.
        served.shut()
        self._emit("model_rejected", model=served.name, reason="no variant could be reloaded")

    def _failed(
        self, served: ServedModel, target: Variant, reason: str, exc: VariantRejected
    ) -> None:
        key = (served.name, target.name)
        failure = self.failures.get(key)
        count = failure.count + 1 if failure is not None else 1
        self.failures[key] = VariantFailure(count, time.monotonic(), str(exc))
        self._emit(
            "variant_swap_failed",
            model=served.name,
            to=target.name,
            active=served.active_name,
            reason=reason,
            error=str(exc),
            failures=count,
        )

    def _swapped(
        self,
        served: ServedModel,
        previous: VariantHandle | None,
        handle: VariantHandle,
        reason: str,
        figures: dict[str, Any],
        mode: SwapMode,
        **costs: float | None,
    ) -> None:
        self.failures.pop((served.name, handle.name), None)
        shown = {k: _round(v) for k, v in costs.items()}
        served.last_swap = SwapRecord(
            time.monotonic(),
            previous.name if previous is not None else None,
            handle.name,
            reason,
            mode,
            {**figures, **shown},
        )
        self._emit(
            "variant_swapped",
            model=served.name,
            **{"from": previous.name if previous is not None else None},
            to=handle.name,
            reason=reason,
            mode=mode,
            figures=figures,
            rss_added_mb=_round(handle.rss_added_mb),
            **shown,
        )

    def probe(self, name: str) -> float | None:
        """Run model `name`'s active variant once on zeros and record how long it took, as
        a probe (no client waits for it); None when it has no variant or the run failed.

        The policy needs the variant's latency under today's load even when no request
        comes; one small run now and then measures it instead of guessing."""
        try:
            served = self.get(name)
            handle = served.lease(None, wait=False)
        except EdgeAgentError:
            return None
        try:
            start = time.monotonic()
            if not handle.runtime.warm_up(timeout_s=self._settings.warmup_timeout_s):
                return None
            took_ms = (time.monotonic() - start) * 1000.0
        except VariantRejected:  # it did not finish on zeros: nothing to learn from it
            return None
        finally:
            handle.release()
        served.stats.record_probe(handle.name, took_ms)
        return took_ms

    def _load_handle(self, source: ModelSource, variant: Variant, rows: int = 1) -> VariantHandle:
        path = verify_variant(source, variant, self._config.dir, self.supply_policy)
        manifest = source.manifest
        # Trimmed on both sides: free heap reused by the load, or given back after it, must
        # not pass for what the variant itself keeps; nor must library code it faults in.
        return_free_memory()
        before = process_anon_mb()
        runtime = load_variant(
            source.name,
            variant.name,
            path,
            self._settings,
            expected_inputs=manifest.inputs if manifest else None,
            expected_outputs=manifest.outputs if manifest else None,
            options=variant.runtime_options(manifest) if path.suffix == ".tflite" else None,
        )
        if self._settings.warmup and rows > 1:
            # Warm at the batch size it will serve: the first big batch is not slow either.
            runtime.warm_up(rows, timeout_s=self._settings.warmup_timeout_s)
        return_free_memory()
        after = process_anon_mb()
        added = max(0.0, after - before) if before is not None and after is not None else None
        if added is not None:
            # A second load of the same file may reuse freed pages and add nothing: keep
            # the largest figure seen, the one a cold load needs.
            key = (source.name, variant.name)
            self._measured_mb[key] = max(added, self._measured_mb.get(key, 0.0))
        return VariantHandle(runtime, variant, added)


def _can_batch(inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec]) -> bool:
    """Stacking requests is safe when every tensor has a free leading (batch) dimension."""
    return all(spec.shape and spec.shape[0] == -1 for spec in (*inputs, *outputs))


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
