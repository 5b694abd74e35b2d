"""The model manager: which models are served, by which variant, and handing them requests.

Each `ServedModel` keeps its active variant behind one reference; a worker reads it once
per batch, so switching variants (the adaptation issue) is one assignment and requests
already running finish on the variant they started with.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from agent.batching import BatchingQueue, Job, Outcome
from agent.config import ModelsConfig
from agent.errors import InvalidRequest, ModelNotFound, ModelNotReady, VariantRejected
from agent.manifest import TensorSpec, Variant
from agent.metrics import ModelStats
from agent.protocol import InferenceRequest
from agent.repository import DEFAULT_POLICY, ModelSource, SupplyPolicy, verify_variant
from agent.session import LoadedVariant, SessionSettings

log = structlog.get_logger(__name__)

EventSink = Callable[..., None]
"""`emit(event_name, **fields)`: where loads, rejections and swaps are reported."""


class ServedModel:
    """A model being served: its ladder, its active variant, its queue and its stats."""

    def __init__(
        self,
        source: ModelSource,
        active: LoadedVariant,
        config: ModelsConfig,
        stats_window: int,
    ) -> None:
        self.name = source.name
        self.source = source
        self.ladder: tuple[Variant, ...] = source.variants
        self.inputs: tuple[TensorSpec, ...] = active.inputs
        self.outputs: tuple[TensorSpec, ...] = active.outputs
        self._by_input = {spec.name: spec for spec in self.inputs}
        self._output_names = frozenset(spec.name for spec in self.outputs)
        self.active = active
        self.stats = ModelStats(stats_window)
        declared = source.manifest.batching if source.manifest is not None else None
        self.batching = _can_batch(self.inputs, self.outputs) if declared is None else declared
        self.queue = BatchingQueue(
            self.name,
            lambda: self.active,
            self.stats,
            workers=config.workers,
            max_queue=config.max_queue,
            max_batch_size=config.max_batch_size,
            batch_delay_s=config.batch_delay_ms / 1000.0,
            batchable=self.batching,
            inline_max_ms=config.inline_max_ms,
        )

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

    def describe(self) -> dict[str, Any]:
        """The model as status and the control topic show it."""
        return {
            "active": self.active.name,
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
    """Loads models from their sources and routes requests to them."""

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
        self._switch_lock = threading.Lock()
        # What a variant must prove before it loads; the agent sets it from [security].
        self.supply_policy: SupplyPolicy = DEFAULT_POLICY
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
        return [self._models[name] for name in sorted(self._models)]

    def load(self, source: ModelSource, prefer: str | None = None) -> ServedModel | None:
        """Load the richest variant of `source` that can serve; None if none can.

        Every variant that fails is reported with its reason; the model falls back to the
        next rung down. `prefer` names a variant to try first (a pin, or the last known
        good variant restored after a restart).
        """
        # sorted() is stable: the preferred variant first, then the ladder in order.
        for variant in sorted(source.variants, key=lambda v: v.name != prefer):
            try:
                loaded = self._load_variant(source, variant)
            except VariantRejected as exc:
                self._emit(
                    "variant_rejected", model=source.name, variant=variant.name, reason=str(exc)
                )
                continue
            served = ServedModel(source, loaded, self._config, self._stats_window)
            with self._lock:
                previous = self._models.get(source.name)
                self._models = {**self._models, source.name: served}
            if previous is not None:
                previous.queue.close(timeout=30.0)
            self._emit(
                "model_loaded",
                model=source.name,
                variant=loaded.name,
                ms=round(loaded.load_ms, 1),
                warmed_up=loaded.warmed_up,
                batching=served.batching,
                inputs=[s.model_dump() for s in served.inputs],
            )
            return served
        self._emit("model_rejected", model=source.name, reason="no variant could be loaded")
        return None

    def load_all(
        self,
        sources: Iterable[ModelSource],
        prefer: Callable[[str], str | None] | None = None,
    ) -> None:
        for source in sources:
            self.load(source, prefer(source.name) if prefer is not None else None)

    def unload(self, name: str, timeout: float = 30.0) -> bool:
        """Stop serving `name` once its queued requests are done; False if it was not loaded."""
        with self._lock:
            model = self._models.get(name)
            if model is None:
                return False
            self._models = {k: v for k, v in self._models.items() if k != name}
        model.queue.close(timeout)
        self._emit("model_unloaded", model=name)
        return True

    def describe(self) -> dict[str, Any]:
        return {model.name: model.describe() for model in self.served()}

    def close(self, timeout: float = 30.0) -> None:
        """Finish queued requests of every model, then stop their workers."""
        for model in self.served():
            if not model.queue.close(timeout):
                log.warning("model_workers_still_busy", model=model.name, timeout_s=timeout)

    # --- Switching the active variant on request (pins) ---

    def switch(self, name: str, variant: str, reason: str) -> ServedModel:
        """Make `variant` the active one of model `name`: load and warm it up, then switch.

        Requests already running finish on the old variant, which is released once they
        are done. Raises ModelNotFound, InvalidRequest (no such variant) or VariantRejected
        (it cannot load); the model then keeps serving what it had.
        """
        served = self.get(name)
        target = next((v for v in served.ladder if v.name == variant), None)
        if target is None:
            raise InvalidRequest(
                f"model {name}: no variant {variant!r}; it has {[v.name for v in served.ladder]}"
            )
        with self._switch_lock:
            previous = served.active
            if previous.name == variant:
                return served
            loaded = self._load_variant(served.source, target)
            served.active = loaded  # one reference: the next batch runs on the new variant
        self._emit(
            "variant_swapped",
            model=name,
            variant=loaded.name,
            previous=previous.name,
            reason=reason,
            ms=round(loaded.load_ms, 1),
        )
        return served

    def _load_variant(self, source: ModelSource, variant: Variant) -> LoadedVariant:
        path = verify_variant(source, variant, self._config.dir, self.supply_policy)
        manifest = source.manifest
        loaded = LoadedVariant.load(
            source.name,
            variant.name,
            path,
            self._settings,
            expected_inputs=manifest.inputs if manifest else None,
            expected_outputs=manifest.outputs if manifest else None,
        )
        return loaded


def _can_batch(inputs: Iterable[TensorSpec], outputs: Iterable[TensorSpec]) -> bool:
    """Stacking requests is safe when every tensor has a free leading (batch) dimension."""
    return all(spec.shape and spec.shape[0] == -1 for spec in (*inputs, *outputs))
