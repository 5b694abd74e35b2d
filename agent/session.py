"""One loaded variant: an onnxruntime session, its signature, and running it.

This is the only module that imports onnxruntime. A `LoadedVariant` is immutable once
built; a model switches variants by swapping which `LoadedVariant` it points at.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import onnxruntime as ort

from agent.adapt.procstat import return_free_memory
from agent.datatypes import ORT_TYPES, Datatype
from agent.errors import InferenceError, VariantRejected
from agent.manifest import TensorSpec
from agent.signature import conform, zeros

# onnxruntime prints its own errors to stderr, bypassing structlog; every failure it reports
# reaches us as an exception that we log (or answer) ourselves.
ort.set_default_logger_severity(4)
ort.disable_telemetry_events()


@dataclass(frozen=True)
class SessionSettings:
    """How sessions run on this board."""

    threads: int
    spin: bool = False
    warmup: bool = True
    warmup_timeout_s: float = 30.0
    """A warm-up run still going after this is stopped and the variant rejected: a model
    whose cost has no bound (a Loop with a huge trip count) must not hang a load."""


PROVIDERS = ["CPUExecutionProvider"]


def session_options(settings: SessionSettings) -> ort.SessionOptions:
    """The onnxruntime options every session of the agent runs with.

    The compressor measures its variants with these too, so that the figures in a manifest
    are the figures the agent will see.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in session_config(settings).items():
        options.add_session_config_entry(key, value)
    # Off: the arena keeps a session's peak activations until the session is closed, and
    # measured here it ran no faster than malloc (CNN, batch 1 and 8); without it what a
    # run frees goes back to the C heap at once, and close() can hand it to the system.
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 4
    return options


def session_config(settings: SessionSettings) -> dict[str, str]:
    """The session config entries of `session_options` (`edge-agent bench` gives its bare
    onnxruntime floor the same)."""
    # Idle spinning keeps a core busy between requests: costly on a board that is short
    # of CPU, which is exactly when this agent matters.
    return {"session.intra_op.allow_spinning": "1" if settings.spin else "0"}


class RunControl:
    """Lets another thread stop a run in progress: onnxruntime checks the flag between
    kernels. One per worker; once cancelled, every later run of that worker stops at once
    (cancelling is for a stop or an unload past its bound)."""

    def __init__(self) -> None:
        self.options = ort.RunOptions()
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.options.terminate = True


class LoadedVariant:
    """A variant ready to run: its session and the signature it serves."""

    def __init__(
        self,
        model: str,
        name: str,
        path: Path,
        session: ort.InferenceSession,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        load_ms: float,
    ) -> None:
        self.model = model
        self.name = name
        self.path = path
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.output_names = tuple(spec.name for spec in self.outputs)
        self.load_ms = load_ms
        self.warmed_up = False
        self._session: ort.InferenceSession | None = session

    @classmethod
    def load(
        cls,
        model: str,
        name: str,
        path: Path,
        settings: SessionSettings,
        expected_inputs: Sequence[TensorSpec] | None = None,
        expected_outputs: Sequence[TensorSpec] | None = None,
    ) -> LoadedVariant:
        """Open `path` in onnxruntime and check it against the expected signature.

        Raises VariantRejected when onnxruntime refuses the file or its signature differs
        from the manifest's.
        """
        start = time.monotonic()
        try:
            session = ort.InferenceSession(
                str(path), sess_options=session_options(settings), providers=PROVIDERS
            )
        except Exception as exc:  # onnxruntime raises bare RuntimeError/Fail/InvalidGraph
            raise VariantRejected(f"variant {name}: onnxruntime cannot load it: {exc}") from exc
        inputs = [_spec(arg) for arg in session.get_inputs()]
        outputs = [_spec(arg) for arg in session.get_outputs()]
        if expected_inputs is not None:
            inputs = conform(name, "input", inputs, expected_inputs)
        if expected_outputs is not None:
            outputs = conform(name, "output", outputs, expected_outputs)
        variant = cls(model, name, path, session, inputs, outputs, 0.0)
        if settings.warmup:
            variant.warmed_up = variant.warm_up(timeout_s=settings.warmup_timeout_s)
        variant.load_ms = (time.monotonic() - start) * 1000.0
        return variant

    def close(self) -> None:
        """Release the session (its weights and buffers) and return the freed pages to the
        system; the variant cannot run after this.

        Dropping the last reference destroys the session at once; glibc would then keep
        the freed heap for later allocations, so RSS would not come back without the trim
        (README, "Memory that comes back")."""
        session, self._session = self._session, None
        if session is None:
            return
        del session
        return_free_memory()

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        output_names: Sequence[str] | None = None,
        control: RunControl | None = None,
    ) -> list[np.ndarray]:
        """Run the session; any onnxruntime failure becomes an InferenceError."""
        session = self._session
        if session is None:
            raise InferenceError(f"{self.model}/{self.name}: this variant has been released")
        try:
            result: list[np.ndarray] = session.run(
                list(output_names) if output_names else None,
                dict(feeds),
                control.options if control is not None else None,
            )
        except Exception as exc:  # onnxruntime's exception types are not a stable API
            raise InferenceError(f"{self.model}/{self.name}: {_describe(exc)}") from exc
        return result

    def warm_up(self, rows: int = 1, timeout_s: float | None = None) -> bool:
        """Run on zeros (free dimensions 1, the batch dimension `rows`) so that the first
        request is not slow; True when it ran.

        A model may legitimately refuse synthetic input, so a failure here is reported and
        does not reject the variant. A run past `timeout_s` is stopped (onnxruntime checks
        `RunOptions.terminate` between kernels) and rejects the variant: a model that does
        not finish on zeros cannot be trusted to finish on requests.
        """
        feeds = {spec.name: zeros(spec, rows) for spec in self.inputs}
        control = RunControl()
        timer = None
        if timeout_s is not None:
            timer = threading.Timer(timeout_s, control.cancel)
            timer.daemon = True
            timer.start()
        try:
            self.run(feeds, control=control)
        except InferenceError as exc:
            if control.cancelled:
                raise VariantRejected(
                    f"variant {self.name}: its warm-up run did not finish within "
                    f"{timeout_s:g} s (models.warmup_timeout_s)"
                ) from exc
            return False
        finally:
            if timer is not None:
                timer.cancel()
        return True


def _spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = cast(Datatype | None, ORT_TYPES.get(arg.type))
    if datatype is None:
        raise VariantRejected(f"tensor {arg.name} has type {arg.type}, which is not served")
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in (arg.shape or ()))
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)


def _describe(exc: BaseException) -> str:
    """onnxruntime's reason, without its source locations (`matmul_helper.h:59 Compute`),
    which tell a client how the agent is built and nothing it can act on."""
    text = " ".join(str(exc).split())
    text = _SOURCE_LOCATION.sub("", text)
    text = " ".join(_STATUS_PREFIX.sub("", text).split())
    return text[:1000] if text else type(exc).__name__


# A source file with its line, optionally with a path and the function name after it.
_SOURCE_LOCATION = re.compile(
    r"(?:[\w.+-]*/)*[\w.+-]+\.(?:cc|cpp|cxx|c|h|hpp|cu)(?::\d+)?(?: \w+)?"
)
_STATUS_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : ")
