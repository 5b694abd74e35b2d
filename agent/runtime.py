"""What a loaded variant offers whichever runtime serves it, and the one place that picks the
runtime: a file's suffix (`.onnx` -> onnxruntime in agent/session.py, `.tflite` -> LiteRT in
agent/litert.py). Nothing else in the agent needs to know which runtime a variant uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from agent.errors import VariantRejected
from agent.manifest import RuntimeOptions, TensorSpec
from agent.session import LoadedVariant, RunControl, SessionSettings


@runtime_checkable
class Runtime(Protocol):
    """A variant ready to run: its signature, its cost, and running it.

    `run` may be called from several worker threads at once; an implementation whose
    library is not thread-safe serialises or pools internally.
    """

    model: str
    name: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    output_names: tuple[str, ...]
    load_ms: float
    warmed_up: bool

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        output_names: Sequence[str] | None = None,
        control: RunControl | None = None,
    ) -> list[np.ndarray]:
        """Outputs in the order of `output_names` (all, in signature order, when None);
        any failure of the runtime raises InferenceError, and so does a run whose `control`
        was cancelled (onnxruntime stops between kernels; LiteRT before it starts)."""
        ...

    def warm_up(self, rows: int = 1, timeout_s: float | None = None) -> bool:
        """Run on zeros (free dimensions 1, the batch dimension `rows`); False when the model
        refuses synthetic input; VariantRejected when it does not finish in `timeout_s`."""
        ...

    def close(self) -> None:
        """Release the runtime's resources; a run afterwards raises InferenceError."""
        ...


def load_variant(
    model: str,
    name: str,
    path: Path,
    settings: SessionSettings,
    expected_inputs: Sequence[TensorSpec] | None = None,
    expected_outputs: Sequence[TensorSpec] | None = None,
    options: RuntimeOptions | None = None,
) -> Runtime:
    """Load `path` in the runtime its suffix names; VariantRejected when it cannot serve.

    `options` are a .tflite variant's (Variant.runtime_options); ONNX variants take none.
    """
    suffix = path.suffix
    if suffix == ".onnx":
        return LoadedVariant.load(model, name, path, settings, expected_inputs, expected_outputs)
    if suffix == ".tflite":
        # Imported here: an agent serving only ONNX models never loads the LiteRT bridge.
        from agent.litert import LiteRTVariant  # noqa: PLC0415

        return LiteRTVariant.load(
            model, name, path, settings, expected_inputs, expected_outputs, options
        )
    raise VariantRejected(f"variant {name}: {path.name} is neither .onnx nor .tflite")
