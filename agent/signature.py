"""What every runtime checks the same way: that a loaded model serves the manifest's
signature, and synthetic inputs for its warm-up runs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from agent.datatypes import NUMPY_DTYPES
from agent.errors import VariantRejected
from agent.manifest import TensorSpec


def conform(
    variant: str,
    kind: str,
    actual: Sequence[TensorSpec],
    expected: Sequence[TensorSpec],
    datatype_hint: str = "",
) -> list[TensorSpec]:
    """The manifest's signature, once it is known to agree with what the model declares.

    `datatype_hint` is added to the message of a datatype that differs where the manifest
    expects FP32 (a runtime's way to serve other tensors as FP32)."""
    by_name = {spec.name: spec for spec in actual}
    if set(by_name) != {spec.name for spec in expected}:
        raise VariantRejected(
            f"variant {variant}: {kind}s are {sorted(by_name)}, "
            f"the manifest says {sorted(spec.name for spec in expected)}"
        )
    for want in expected:
        have = by_name[want.name]
        if have.datatype != want.datatype:
            hint = datatype_hint if want.datatype == "FP32" else ""
            raise VariantRejected(
                f"variant {variant}: {kind} {want.name} is {have.datatype}, "
                f"the manifest says {want.datatype}{hint}"
            )
        if len(have.shape) != len(want.shape) or any(
            -1 not in (h, w) and h != w for h, w in zip(have.shape, want.shape, strict=True)
        ):
            raise VariantRejected(
                f"variant {variant}: {kind} {want.name} has shape {list(have.shape)}, "
                f"the manifest says {list(want.shape)}"
            )
    return list(expected)


def zeros(spec: TensorSpec, rows: int = 1) -> np.ndarray:
    """Zeros for `spec`: free dimensions 1, a free batch (first) dimension `rows`."""
    shape = tuple(1 if dim == -1 else dim for dim in spec.shape)
    if spec.shape and spec.shape[0] == -1:
        shape = (rows, *shape[1:])
    if spec.datatype == "BYTES":
        return np.full(shape, "", dtype=object)
    return np.zeros(shape, dtype=NUMPY_DTYPES[spec.datatype])
