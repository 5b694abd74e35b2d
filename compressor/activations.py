"""Intermediate tensors of a model on calibration data, for scoring and refitting layers."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper

from compressor.data import Dataset
from compressor.session import open_session, run_dataset


def collect(
    proto: onnx.ModelProto, tensors: Iterable[str], data: Dataset, threads: int | None = None
) -> dict[str, np.ndarray]:
    """Run `data` through the model and return the named intermediate tensors (float32).

    The tensors are exposed as extra graph outputs on a copy, which also stops onnxruntime
    from fusing them away.
    """
    wanted = list(dict.fromkeys(tensors))
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    existing = {out.name for out in probe.graph.output}
    for name in wanted:
        if name not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = open_session(probe.SerializeToString(), threads)
    return run_dataset(session, data, wanted)
