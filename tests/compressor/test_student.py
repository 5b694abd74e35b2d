"""Conv students: a narrower copy of the teacher, trained from scratch by distillation."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import numpy_helper

from compressor.data import load_dataset
from compressor.evaluate import score
from compressor.finetune import FinetuneSettings
from compressor.model import load_model, save_model
from compressor.prune.structured import prune_groups
from compressor.student import conv_student, reinitialise


def _conv_widths(path: Path) -> dict[str, int]:
    graph = onnx.load_model(path).graph
    inits = {i.name: i for i in graph.initializer}
    return {n.name: int(inits[n.input[1]].dims[0]) for n in graph.node if n.op_type == "Conv"}


def test_student_is_a_narrower_copy_that_learns_the_teacher(
    tmp_path: Path, residual_cnn: Path, residual_calib: Path
) -> None:
    """The student keeps the teacher's ops and signature with half of every channel group,
    starts from fresh weights (not the teacher's), and training brings it closer to the
    teacher than its untrained start."""
    teacher = load_model(residual_cnn)
    calib = load_dataset(residual_calib, teacher.signature)
    settings = FinetuneSettings(epochs=1, seed=0, threads=1)
    student = conv_student(teacher, tmp_path / "s.onnx", calib, 0.5, settings)
    assert load_model(student).signature == teacher.signature
    ops = [n.op_type for n in onnx.load_model(student).graph.node]
    assert ops == [n.op_type for n in teacher.proto.graph.node]
    widths, original = _conv_widths(student), _conv_widths(residual_cnn)
    assert all(widths[n] == original[n] // 2 for n in original)
    narrow = prune_groups(teacher, tmp_path / "n.onnx", 0.5, None, correct=False).path
    untrained = onnx.load_model(narrow)
    reinitialise(untrained, 0)
    start = save_model(untrained, tmp_path / "start.onnx")
    kept = {i.name: numpy_helper.to_array(i) for i in onnx.load_model(narrow).graph.initializer}
    fresh = {i.name: numpy_helper.to_array(i) for i in untrained.graph.initializer}
    assert not (fresh["stem.w"] == kept["stem.w"]).all()
    scores = score(residual_cnn, {"start": start, "student": student}, calib, 1)
    assert scores["student"].fidelity.cosine > scores["start"].fidelity.cosine
