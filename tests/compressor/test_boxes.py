"""Box IoU after NMS for YOLO-style heads: hand-made detections, and a built detector."""

from __future__ import annotations

from pathlib import Path

import compress_models as cm
import numpy as np
import pytest

from compressor.boxes import box_iou, candidates, detect
from compressor.data import Dataset
from compressor.errors import DataError
from compressor.evaluate import Budget, Metric, Quality, score
from compressor.metrics import fidelity
from compressor.model import load_model
from compressor.quantize import quantize_static_int8


def _head(*boxes: tuple[float, float, float, float, int, float]) -> np.ndarray:
    """One image's raw YOLOv8 output [1, 4 + 2 classes, 16 boxes] from (cx, cy, w, h, class,
    score) tuples; the rest score 0 (more boxes than attributes, as in every real head)."""
    out = np.zeros((1, 6, 16), np.float32)
    for i, (cx, cy, w, h, cls, conf) in enumerate(boxes):
        out[0, :4, i] = (cx, cy, w, h)
        out[0, 4 + cls, i] = conf
    return out


def test_nms_keeps_the_best_of_overlapping_boxes_of_one_class() -> None:
    """Of two heavily overlapping boxes of one class the better survives; another class's
    box in the same place and a box under the threshold are handled apart."""
    raw = _head(
        (10, 10, 8, 8, 0, 0.9),
        (10.5, 10, 8, 8, 0, 0.8),  # suppressed by the first
        (10, 10, 8, 8, 1, 0.7),  # other class: kept
        (30, 30, 8, 8, 0, 0.1),  # under the threshold
    )
    found = detect(candidates(raw))[0]  # type: ignore[arg-type]  # a head, checked below
    assert candidates(raw) is not None
    assert found.classes.tolist() == [0, 1]
    assert found.scores.tolist() == pytest.approx([0.9, 0.7])
    np.testing.assert_allclose(found.boxes[0], [6, 6, 14, 14])


def test_box_iou_counts_shifted_missed_and_spurious_boxes() -> None:
    """A box shifted by a quarter of its width matches at IoU 0.6; a missed box or a spurious
    one counts as 0 over the larger count; identical heads score 1."""
    ref = _head((10, 10, 8, 8, 0, 0.9), (30, 30, 8, 8, 1, 0.9))
    shifted = _head((12, 10, 8, 8, 0, 0.9), (30, 30, 8, 8, 1, 0.9))
    missed = _head((10, 10, 8, 8, 0, 0.9), (30, 30, 8, 8, 1, 0.1))
    wrong_class = _head((10, 10, 8, 8, 1, 0.9), (30, 30, 8, 8, 1, 0.9))
    assert box_iou(ref, ref) == 1.0
    assert box_iou(ref, shifted) == pytest.approx((6 * 8 / (2 * 64 - 48) + 1) / 2)
    assert box_iou(ref, missed) == pytest.approx(0.5)
    assert box_iou(ref, wrong_class) == pytest.approx(0.5)


def test_other_outputs_are_no_detector_heads() -> None:
    """Class scores, maps and square tensors give no box figure."""
    assert box_iou(np.ones((4, 10), np.float32), np.ones((4, 10), np.float32)) is None
    assert candidates(np.ones((2, 6, 6), np.float32)) is None
    assert candidates(np.ones((2, 1, 8, 8), np.float32)) is None


def test_box_iou_scores_a_quantized_detector(tmp_path: Path) -> None:
    """A built detector-like graph and its int8 copy: the figure is recorded beside cosine,
    is below 1 for int8, and decides the budget under --metric box-iou."""
    model_path = cm.save(cm.detector_model(), tmp_path / "det.onnx")
    data = Dataset({"input": cm.image_batch(24, size=32, seed=3)})
    int8 = quantize_static_int8(load_model(model_path), tmp_path / "int8.onnx", data)
    quality = score(model_path, {"fp32": model_path, "int8": int8}, data, 1)
    assert quality["fp32"].fidelity.box_iou == 1.0
    figure = quality["int8"].fidelity.box_iou
    assert figure is not None and 0.3 < figure < 1.0
    assert quality["int8"].measure(Metric.BOX_IOU) == figure
    assert quality["int8"].within(Budget(1.0 - figure + 1e-6, Metric.BOX_IOU))
    assert not quality["int8"].within(Budget(1.0 - figure - 1e-3, Metric.BOX_IOU))


def test_box_metric_on_a_model_without_a_detector_head_is_refused() -> None:
    """--metric box-iou on a classifier's outputs is a DataError naming what it needs."""
    probabilities = {"p": np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)}
    quality = Quality(None, None, fidelity(probabilities, probabilities))
    with pytest.raises(DataError, match="YOLO-style"):
        quality.measure(Metric.BOX_IOU)
