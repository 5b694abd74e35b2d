"""Tensor datatypes: the Open Inference Protocol names and their numpy and ONNX equivalents.

One table, so that the manifest, the protocol codec and the session wrapper agree on what
"FP32" means.
"""

from __future__ import annotations

from typing import Final, Literal

import numpy as np

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]

# BYTES has no fixed-width numpy type; it maps to object arrays of bytes.
NUMPY_DTYPES: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

# onnxruntime reports element types as these strings (NodeArg.type).
ORT_TYPES: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

_BY_NUMPY: Final[dict[np.dtype[np.generic], str]] = {
    dtype: name for name, dtype in NUMPY_DTYPES.items() if name != "BYTES"
}


def datatype_of(array: np.ndarray) -> str:
    """The protocol datatype of a numpy array; raises ValueError for types it lacks."""
    if array.dtype.kind in ("O", "S", "U"):
        return "BYTES"
    try:
        return _BY_NUMPY[array.dtype]
    except KeyError:
        raise ValueError(
            f"numpy dtype {array.dtype} has no Open Inference Protocol datatype"
        ) from None
