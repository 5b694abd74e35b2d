"""Distillation fine-tuning of a pruned conv net with PyTorch (skipped when torch is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compressor.data import load_dataset
from compressor.errors import UnsupportedModelError
from compressor.evaluate import score
from compressor.finetune import FinetuneSettings, finetune
from compressor.model import load_model
from compressor.prune.structured import prune_structured


def test_finetune_moves_closer_to_the_teacher_and_keeps_the_graph(
    tmp_path: Path, residual_cnn: Path, residual_calib: Path
) -> None:
    """Training on the original's outputs lowers the pruned net's error on the data it saw,
    with the same nodes, signature and weight shapes."""
    model = load_model(residual_cnn)
    calib = load_dataset(residual_calib, model.signature)
    pruned = prune_structured(model, tmp_path / "p.onnx", 0.75, calib).path
    settings = FinetuneSettings(epochs=4, learning_rate=5e-4, seed=0, threads=1)
    tuned = finetune(residual_cnn, load_model(pruned), tmp_path / "t.onnx", calib, settings)
    before, after = onnx.load_model(pruned), onnx.load_model(tuned)
    assert [n.op_type for n in before.graph.node] == [n.op_type for n in after.graph.node]
    assert load_model(tuned).signature == model.signature
    weights = {i.name: numpy_helper.to_array(i) for i in before.graph.initializer}
    moved = 0
    for init in after.graph.initializer:
        value = numpy_helper.to_array(init)
        assert value.shape == weights[init.name].shape
        moved += int(not np.array_equal(value, weights[init.name]))
    assert moved > 0
    scores = score(residual_cnn, {"pruned": pruned, "tuned": tuned}, calib, 1)
    assert scores["tuned"].fidelity.cosine > scores["pruned"].fidelity.cosine


def test_unknown_ops_are_refused(tmp_path: Path, if_model: Path, vector16: Path) -> None:
    """A graph with an op the translator does not know is refused, naming the op."""
    model = load_model(if_model)
    with pytest.raises(UnsupportedModelError, match="If"):
        finetune(if_model, model, tmp_path / "t.onnx", load_dataset(vector16, model.signature))
