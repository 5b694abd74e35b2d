"""How close a variant's outputs are to the original's, and how often it is right.

Pure numpy on arrays already computed, so the figures can be checked against hand-made
examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from compressor.boxes import box_iou
from compressor.errors import DataError


@dataclass(frozen=True)
class Fidelity:
    """Agreement of a variant's outputs with the original's, over every float output."""

    cosine: float
    min_cosine: float
    max_abs_error: float
    top1_agreement: float | None
    map_iou: float | None = None  # of maps thresholded at 0.5, where outputs are maps in [0, 1]
    box_iou: float | None = None  # of detections after NMS, where outputs are YOLO-style heads


def cosine_per_row(reference: np.ndarray, output: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row's flattened values (1.0 where both rows are all zero)."""
    ref = reference.reshape(reference.shape[0], -1).astype(np.float64)
    out = output.reshape(output.shape[0], -1).astype(np.float64)
    dot = np.sum(ref * out, axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    both_zero = (np.linalg.norm(ref, axis=1) == 0) & (np.linalg.norm(out, axis=1) == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, np.clip(cos, -1.0, 1.0))


def top1(scores: np.ndarray) -> np.ndarray | None:
    """The arg-max class of each row of a [rows, classes] output; None for other shapes."""
    if scores.ndim != 2 or scores.shape[1] < 2:
        return None
    return np.asarray(np.argmax(scores, axis=1))


# A probability map (a Sigmoid's output) is read as "object here" above this value.
MAP_THRESHOLD = 0.5


def map_iou(reference: np.ndarray, output: np.ndarray) -> float | None:
    """Mean per-row IoU of the thresholded maps; None unless the reference is a map in [0, 1]
    (at least [rows, channels, height] values) with something above the threshold."""
    if reference.ndim < 3 or reference.size == 0:
        return None
    if float(np.min(reference)) < 0.0 or float(np.max(reference)) > 1.0:
        return None
    ref = (reference > MAP_THRESHOLD).reshape(reference.shape[0], -1)
    out = (output > MAP_THRESHOLD).reshape(output.shape[0], -1)
    union = np.sum(ref | out, axis=1)
    if not np.any(union):
        return None
    inter = np.sum(ref & out, axis=1)
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def fidelity(reference: Mapping[str, np.ndarray], output: Mapping[str, np.ndarray]) -> Fidelity:
    """Compare every floating-point output; the figures are the worst over the outputs."""
    names = [n for n, a in reference.items() if a.dtype.kind == "f"]
    if not names:
        names = list(reference)
    cosines = [cosine_per_row(reference[n], output[n]) for n in names]
    errors = [
        float(np.max(np.abs(reference[n].astype(np.float64) - output[n].astype(np.float64))))
        for n in names
    ]
    agreements = []
    for n in names:
        ref_top, out_top = top1(reference[n]), top1(output[n])
        if ref_top is not None and out_top is not None:
            agreements.append(float(np.mean(ref_top == out_top)))
    ious = [v for n in names if (v := map_iou(reference[n], output[n])) is not None]
    boxes = [v for n in names if (v := box_iou(reference[n], output[n])) is not None]
    return Fidelity(
        cosine=min(float(np.mean(c)) for c in cosines),
        min_cosine=min(float(np.min(c)) for c in cosines),
        max_abs_error=max(errors),
        top1_agreement=min(agreements) if agreements else None,
        map_iou=min(ious) if ious else None,
        box_iou=min(boxes) if boxes else None,
    )


def predicted_classes(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """A classifier's predicted class per row: an integer [rows] output, else the arg-max.

    skl2onnx classifiers emit the label itself next to the probabilities; the label is the
    truth when classes are not 0..C-1, so it wins over the arg-max of the scores.
    """
    for array in outputs.values():
        if array.ndim == 1 and array.dtype.kind in "iu":
            return array.astype(np.int64)
    for array in outputs.values():
        classes = top1(array) if array.dtype.kind == "f" else None
        if classes is not None:
            return classes
    raise DataError(
        "labels were given but the model has no classifier output "
        "(an integer [rows] label or a float [rows, classes] score)"
    )


def accuracy(outputs: Mapping[str, np.ndarray], labels: np.ndarray) -> float:
    """Top-1 accuracy of a classifier's outputs against integer labels."""
    return float(np.mean(predicted_classes(outputs) == labels))
