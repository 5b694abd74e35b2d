"""onnxruntime sessions configured as the agent configures them, and running a whole set.

Latency measured with other settings would not predict what the board sees, so the options
come from the agent's own builder (`agent.session.session_options`): intra-op threads = the
CPUs it may use, no spinning, full graph optimisation. The batch size the agent serves
comes from its configuration's default.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.config import ModelsConfig
from agent.session import PROVIDERS, SessionSettings, session_options
from compressor.data import Dataset
from compressor.errors import ModelLoadError

# Rows per run when a whole set is pushed through a model that takes any batch size.
RUN_CHUNK = 256


def agent_batch_size() -> int:
    """The largest batch the agent stacks requests into by default (`models.max_batch_size`)."""
    default = ModelsConfig.model_fields["max_batch_size"].default
    assert isinstance(default, int)
    return default


def agent_options(threads: int | None = None) -> ort.SessionOptions:
    """The agent's session options, with its default thread count unless told otherwise."""
    return session_options(SessionSettings(threads=threads or agent_threads(), warmup=False))


def agent_threads() -> int:
    """The agent's default intra-op thread count: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def open_session(model: Path | bytes, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session with the agent's threading; ModelLoadError if onnxruntime refuses it."""
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, agent_options(threads), providers=PROVIDERS)
    # onnxruntime raises its own exception classes, none shared with the standard ones.
    except Exception as exc:
        where = "model" if isinstance(model, bytes) else str(model)
        raise ModelLoadError(f"{where}: onnxruntime cannot load the model: {exc}") from exc


def run_dataset(
    session: ort.InferenceSession, data: Dataset, names: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Run every row of `data` and return each output concatenated along the rows."""
    wanted = names or [out.name for out in session.get_outputs()]
    fixed = _fixed_batch(session)
    chunk = fixed or RUN_CHUNK
    if fixed and data.size % fixed:
        raise ModelLoadError(
            f"the model takes batches of exactly {fixed} rows; the set has {data.size}"
        )
    parts: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    for feed in data.batches(chunk):
        try:
            results = session.run(wanted, feed)
        # onnxruntime raises its own exception classes, none shared with the standard ones.
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime failed to run the model: {exc}") from exc
        for name, value in zip(wanted, results, strict=True):
            parts[name].append(np.asarray(value))
    return {name: np.concatenate(chunks, axis=0) for name, chunks in parts.items()}


def _fixed_batch(session: ort.InferenceSession) -> int | None:
    for arg in session.get_inputs():
        dims = arg.shape or []
        if dims and isinstance(dims[0], int) and dims[0] > 0:
            return int(dims[0])
    return None
