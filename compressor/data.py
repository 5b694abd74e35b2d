"""Calibration and evaluation sets: `.npz` files whose arrays are named after the model inputs.

A set is checked against the model's signature once, when it is read, so that every later
step can trust names, dtypes and shapes; `labels` (one integer class per row) is optional.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from agent.datatypes import NUMPY_DTYPES
from compressor.errors import DataError
from compressor.model import Signature

log = structlog.get_logger(__name__)

LABELS = "labels"


@dataclass(frozen=True)
class Dataset:
    """Rows of model inputs (all arrays share their first dimension) and optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @property
    def size(self) -> int:
        """The number of rows."""
        return int(next(iter(self.inputs.values())).shape[0])

    def rows(self, index: slice | np.ndarray) -> Dataset:
        """The rows picked by a slice or an index array, labels included."""
        labels = None if self.labels is None else self.labels[index]
        return Dataset({k: v[index] for k, v in self.inputs.items()}, labels)

    def head(self, count: int) -> Dataset:
        """The first `count` rows (all of them if there are fewer)."""
        return self.rows(slice(0, count))

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        """Input feeds of at most `size` rows each, in order."""
        for start in range(0, self.size, size):
            yield {k: v[start : start + size] for k, v in self.inputs.items()}

    def save(self, path: Path) -> Path:
        """Write the set as an `.npz` file the loader reads back."""
        arrays = dict(self.inputs)
        if self.labels is not None:
            arrays[LABELS] = self.labels
        with path.open("wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]
        return path


def load_dataset(path: Path, signature: Signature) -> Dataset:
    """Read an `.npz` file and check it against the model's inputs."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single array; save named arrays with np.savez")
    with loaded as npz:
        try:
            arrays = {name: npz[name] for name in npz.files}
        except ValueError as exc:  # object arrays need pickle, which is refused on purpose
            raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    return dataset_from_arrays(arrays, signature, str(path))


def dataset_from_arrays(
    arrays: Mapping[str, np.ndarray], signature: Signature, source: str
) -> Dataset:
    """Check named arrays against the model's inputs and build a Dataset from them."""
    expected = [spec.name for spec in signature.inputs]
    missing = [name for name in expected if name not in arrays]
    if missing:
        raise DataError(
            f"{source}: missing input(s) {missing}; the model's inputs are {expected} "
            f"and the file holds {sorted(arrays)}"
        )
    unknown = sorted(set(arrays) - set(expected) - {LABELS})
    if unknown:
        raise DataError(
            f"{source}: unknown array(s) {unknown}; arrays are named after the model's "
            f"inputs {expected}, plus optional {LABELS!r}"
        )
    inputs = {
        spec.name: _checked_input(arrays[spec.name], spec.name, spec.datatype, spec.shape, source)
        for spec in signature.inputs
    }
    sizes = {name: int(a.shape[0]) for name, a in inputs.items()}
    if len(set(sizes.values())) > 1:
        raise DataError(f"{source}: inputs disagree on the number of rows: {sizes}")
    count = next(iter(sizes.values()))
    if count == 0:
        raise DataError(f"{source}: the set is empty (0 rows)")
    labels = arrays.get(LABELS)
    if labels is not None:
        labels = _checked_labels(labels, count, source)
    log.debug("dataset_checked", source=source, rows=count, labelled=labels is not None)
    return Dataset(inputs, labels)


def _checked_input(
    array: np.ndarray, name: str, datatype: str, shape: tuple[int, ...], source: str
) -> np.ndarray:
    if array.ndim != len(shape) or array.ndim == 0:
        raise DataError(
            f"{source}: input {name!r} has shape {list(array.shape)}, the model expects "
            f"{list(shape)} (-1 = any), rows along the first dimension"
        )
    for axis, (got, want) in enumerate(zip(array.shape, shape, strict=True)):
        # The leading dimension counts rows: a fixed batch of 1 still takes a set of many.
        if axis > 0 and want not in (-1, got):
            raise DataError(
                f"{source}: input {name!r} has shape {list(array.shape)}, the model expects "
                f"{list(shape)} (-1 = any); dimension {axis} differs"
            )
    dtype = NUMPY_DTYPES[datatype]
    if array.dtype != dtype:
        if not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise DataError(
                f"{source}: input {name!r} is {array.dtype}, the model expects {datatype}"
            )
        # float64 is numpy's default; narrowing it to the model's float type is expected.
        log.info("input_cast", source=source, input=name, src=str(array.dtype), dst=str(dtype))
        array = array.astype(dtype)
    return np.ascontiguousarray(array)


def _checked_labels(labels: np.ndarray, count: int, source: str) -> np.ndarray:
    if labels.ndim != 1 or labels.shape[0] != count:
        raise DataError(
            f"{source}: {LABELS!r} must hold one class per row: shape [{count}], "
            f"got {list(labels.shape)}"
        )
    if labels.dtype.kind not in "iu":
        raise DataError(f"{source}: {LABELS!r} must be integer class indices, got {labels.dtype}")
    return labels.astype(np.int64)
