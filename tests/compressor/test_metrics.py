"""Accuracy and fidelity figures on hand-made outputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from compressor.errors import DataError
from compressor.metrics import accuracy, cosine_per_row, fidelity, map_iou


def test_cosine_of_scaled_and_opposite_rows() -> None:
    """A scaled row has cosine 1, an opposite row -1, an orthogonal row 0."""
    ref = np.array([[1.0, 0.0], [1.0, 2.0], [0.0, 1.0]], np.float32)
    out = np.array([[3.0, 0.0], [-1.0, -2.0], [1.0, 0.0]], np.float32)
    assert cosine_per_row(ref, out).tolist() == pytest.approx([1.0, -1.0, 0.0])


def test_cosine_of_zero_rows() -> None:
    """Two all-zero rows agree (1); a zero row against a non-zero one does not (0)."""
    ref = np.zeros((2, 3), np.float32)
    out = np.array([[0, 0, 0], [0, 1, 0]], np.float32)
    assert cosine_per_row(ref, out).tolist() == [1.0, 0.0]


def test_fidelity_figures() -> None:
    """Top-1 agreement, mean and min cosine, and max abs error come out as computed by hand."""
    ref = {"p": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]], np.float32)}
    out = {"p": np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.5, 0.5]], np.float32)}
    fid = fidelity(ref, out)
    assert fid.top1_agreement == pytest.approx(0.75)
    assert fid.max_abs_error == pytest.approx(0.6)
    second = (0.2 * 0.8 + 0.8 * 0.2) / (0.2**2 + 0.8**2)
    assert fid.cosine == pytest.approx((3 + second) / 4)
    assert fid.min_cosine == pytest.approx(second)


def test_fidelity_ignores_integer_outputs_when_floats_exist() -> None:
    """With a label and a probability output, fidelity is computed on the probabilities."""
    ref = {"label": np.array([0, 1]), "p": np.array([[1.0, 0.0], [0.0, 1.0]])}
    out = {"label": np.array([1, 0]), "p": np.array([[1.0, 0.0], [0.0, 1.0]])}
    assert fidelity(ref, out).cosine == pytest.approx(1.0)


def test_accuracy_from_scores() -> None:
    """Without a label output, accuracy is the arg-max of the scores against the labels."""
    scores = {"p": np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])}
    assert accuracy(scores, np.array([0, 1, 1])) == pytest.approx(2 / 3)


def test_accuracy_prefers_label_output() -> None:
    """An integer label output is used as the prediction rather than the scores' arg-max."""
    outputs = {"label": np.array([5, 7]), "p": np.array([[0.9, 0.1], [0.3, 0.7]])}
    assert accuracy(outputs, np.array([5, 7])) == 1.0


def test_accuracy_needs_a_classifier_output() -> None:
    """Labels for a model with only a [rows, 1] regression output are refused."""
    with pytest.raises(DataError, match="no classifier output"):
        accuracy({"y": np.zeros((3, 1))}, np.array([0, 1, 2]))


def test_map_iou_of_thresholded_maps() -> None:
    """Two sigmoid-like maps overlapping on half their foreground have IoU 1/3."""
    ref = np.zeros((1, 1, 2, 4), np.float32)
    out = np.zeros((1, 1, 2, 4), np.float32)
    ref[0, 0, 0, :2] = 0.9
    out[0, 0, 0, 1:3] = 0.8
    assert map_iou(ref, out) == pytest.approx(1 / 3)
    assert map_iou(ref * 10, out) is None  # not a map in [0, 1]
