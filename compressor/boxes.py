"""Detections of a YOLO-style head, and how closely a variant's match the original's.

A detector's raw output is one row of attributes per candidate box: centre x, centre y,
width, height, then one score per class (YOLOv8's layout, `[rows, 4 + classes, boxes]`, or
transposed, `[rows, boxes, 4 + classes]`; the attribute axis is the shorter one). What a
user sees is what survives the score threshold and non-maximum suppression, so that is
what is compared: each of the original's boxes is matched to the variant's box of the same
class that overlaps it most (one to one, greedily), and an image scores the summed IoU of
its matches over the larger of the two box counts (a missed box and a spurious one both
count as 0). Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCORE_THRESHOLD = 0.25  # Ultralytics' default confidence for predictions
NMS_IOU = 0.45  # boxes of one class overlapping more than this are one object
MIN_CLASSES = 1
# The best-scoring boxes NMS considers, and the most it keeps (Ultralytics keeps 300).
MAX_CANDIDATES = 1000
MAX_DETECTIONS = 300


@dataclass(frozen=True)
class Detections:
    """One image's boxes after NMS: corners [n, 4] (x1, y1, x2, y2), class and score [n]."""

    boxes: np.ndarray
    classes: np.ndarray
    scores: np.ndarray


def candidates(output: np.ndarray) -> np.ndarray | None:
    """The output as [rows, boxes, 4 + classes], or None when it is no detector head."""
    if output.ndim != 3 or output.dtype.kind != "f":
        return None
    first, second = output.shape[1:]
    attributes = min(first, second)
    if attributes < 4 + MIN_CLASSES or first == second:
        return None
    return np.swapaxes(output, 1, 2) if first < second else output


def detect(
    rows: np.ndarray, score_threshold: float = SCORE_THRESHOLD, nms_iou: float = NMS_IOU
) -> list[Detections]:
    """Per image of [rows, boxes, 4 + classes]: the boxes over the threshold, after NMS."""
    found = []
    for image in rows.astype(np.float64):
        classes = np.argmax(image[:, 4:], axis=1)
        scores = image[np.arange(len(image)), 4 + classes]
        keep = np.flatnonzero(scores > score_threshold)
        keep = keep[np.argsort(-scores[keep], kind="stable")[:MAX_CANDIDATES]]
        corners = _corners(image[keep, :4])
        classes, scores = classes[keep], scores[keep]
        chosen = _nms(corners, classes, scores, nms_iou)[:MAX_DETECTIONS]
        found.append(Detections(corners[chosen], classes[chosen], scores[chosen]))
    return found


def box_iou(reference: np.ndarray, output: np.ndarray) -> float | None:
    """Mean over images of how well the variant's detections match the original's; None when
    the output is no detector head or the original detects nothing on any image."""
    ref_rows, out_rows = candidates(reference), candidates(output)
    if ref_rows is None or out_rows is None:
        return None
    ref_found, out_found = detect(ref_rows), detect(out_rows)
    if not any(len(d.boxes) for d in ref_found):
        return None
    return float(np.mean([match_score(a, b) for a, b in zip(ref_found, out_found, strict=True)]))


def match_score(reference: Detections, output: Detections) -> float:
    """Summed IoU of one-to-one same-class matches over the larger box count (1 if both
    found nothing)."""
    most = max(len(reference.boxes), len(output.boxes))
    if most == 0:
        return 1.0
    overlaps = pairwise_iou(reference.boxes, output.boxes)
    overlaps[reference.classes[:, None] != output.classes[None, :]] = 0.0
    total = 0.0
    while overlaps.size and overlaps.max() > 0.0:
        i, j = np.unravel_index(int(np.argmax(overlaps)), overlaps.shape)
        total += float(overlaps[i, j])
        overlaps[i, :] = 0.0
        overlaps[:, j] = 0.0
    return total / most


def pairwise_iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """IoU of every corner box in `first` [n, 4] with every one in `second` [m, 4]."""
    low = np.maximum(first[:, None, :2], second[None, :, :2])
    high = np.minimum(first[:, None, 2:], second[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0.0, None), axis=2)
    area_a = np.prod(np.clip(first[:, 2:] - first[:, :2], 0.0, None), axis=1)
    area_b = np.prod(np.clip(second[:, 2:] - second[:, :2], 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _corners(centred: np.ndarray) -> np.ndarray:
    half = centred[:, 2:4] / 2.0
    return np.concatenate([centred[:, :2] - half, centred[:, :2] + half], axis=1)


def _nms(corners: np.ndarray, classes: np.ndarray, scores: np.ndarray, limit: float) -> np.ndarray:
    """Indices kept by greedy per-class non-maximum suppression, best score first."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    suppressed = np.zeros(len(order), dtype=bool)
    overlaps = pairwise_iou(corners, corners)
    for rank, index in enumerate(order):
        if suppressed[rank]:
            continue
        kept.append(int(index))
        later = order[rank + 1 :]
        same = (classes[later] == classes[index]) & (overlaps[index, later] > limit)
        suppressed[rank + 1 :] |= same
    return np.array(kept, dtype=np.int64)
