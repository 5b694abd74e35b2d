"""Distillation: the student has the teacher's signature, its outputs and a useful accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.data import load_dataset
from compressor.distill import DistillSettings, distill
from compressor.errors import UnsupportedModelError
from compressor.metrics import accuracy
from compressor.model import load_model
from compressor.session import open_session, run_dataset

QUICK = DistillSettings(hidden=(16,), augment=4, max_iter=200)


def test_student_of_demo_form(
    tmp_path: Path, digits_gemm: Path, digits_calib: Path, digits_eval: Path
) -> None:
    """The student keeps input/probabilities, ends in Softmax and classifies digits well."""
    teacher = load_model(digits_gemm)
    out = distill(
        teacher, tmp_path / "s.onnx", load_dataset(digits_calib, teacher.signature), QUICK
    )
    student = load_model(out)
    assert student.signature == teacher.signature
    proto = onnx.load(out)
    assert proto.graph.node[-1].op_type == "Softmax"
    shapes = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    assert (64, 16) in shapes.values()
    data = load_dataset(digits_eval, teacher.signature)
    probs = run_dataset(open_session(out, 1), data)["probabilities"]
    assert probs.shape == (data.size, 10)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert data.labels is not None
    assert accuracy({"p": probs}, data.labels) > 0.85


def test_student_of_skl2onnx_form(
    tmp_path: Path, digits_skl: Path, digits_skl_calib: Path, digits_skl_eval: Path
) -> None:
    """skl2onnx's label output is reproduced as the arg-max of the student's probabilities."""
    teacher = load_model(digits_skl)
    out = distill(
        teacher, tmp_path / "s.onnx", load_dataset(digits_skl_calib, teacher.signature), QUICK
    )
    assert load_model(out).signature == teacher.signature
    data = load_dataset(digits_skl_eval, teacher.signature)
    outputs = run_dataset(open_session(out, 1), data)
    assert np.array_equal(outputs["label"], outputs["probabilities"].argmax(axis=1))


def test_regression_output_shape_is_fixed(
    tmp_path: Path, constant_weights: Path, vector16: Path
) -> None:
    """A 4-wide regression student outputs [rows, 4], not skl2onnx's [rows*4, 1]."""
    teacher = load_model(constant_weights)
    data = load_dataset(vector16, teacher.signature)
    out = distill(teacher, tmp_path / "s.onnx", data, QUICK)
    assert run_dataset(open_session(out, 1), data)["output"].shape == (data.size, 4)
    assert load_model(out).signature == teacher.signature


def test_image_model_is_refused(tmp_path: Path, cnn: Path, cnn_calib: Path) -> None:
    """A 4-D image input cannot feed an MLP student and is refused with the reason."""
    teacher = load_model(cnn)
    with pytest.raises(UnsupportedModelError, match=r"one FP32 \[rows, features\] input"):
        distill(teacher, tmp_path / "s.onnx", load_dataset(cnn_calib, teacher.signature), QUICK)


def test_unrelated_second_output_is_refused(tmp_path: Path, vector16: Path) -> None:
    """A second output that is not the arg-max of the first cannot be reproduced."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 1, (16, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["scores"]),
            helper.make_node("ArgMin", ["scores"], ["worst"], axis=1, keepdims=0),
        ],
        "two",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 16])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [-1, 3]),
            helper.make_tensor_value_info("worst", TensorProto.INT64, [-1]),
        ],
        [weight],
    )
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    teacher = load_model(path)
    data = load_dataset(vector16, teacher.signature)
    with pytest.raises(UnsupportedModelError, match="not the arg-max"):
        distill(teacher, tmp_path / "s.onnx", data, QUICK)
