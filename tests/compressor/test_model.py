"""Loading models: ONNX or not, loadable or not, and the signature read from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from skl2onnx import to_onnx
from sklearn.neural_network import MLPClassifier

from compressor.errors import ModelLoadError, NotOnnxError, UnsupportedModelError
from compressor.model import load_model, save_model


def test_signature_of_demo_form(digits_gemm: Path) -> None:
    """The demo model's signature is input FP32 [-1,64] and probabilities FP32 [-1,10]."""
    model = load_model(digits_gemm)
    assert [(t.name, t.datatype, t.shape) for t in model.signature.inputs] == [
        ("input", "FP32", (-1, 64))
    ]
    assert [(t.name, t.datatype, t.shape) for t in model.signature.outputs] == [
        ("probabilities", "FP32", (-1, 10))
    ]
    assert model.signature.batchable


def test_signature_of_skl2onnx_form(digits_skl: Path) -> None:
    """skl2onnx's classifier exposes an INT64 label and FP32 probabilities."""
    model = load_model(digits_skl)
    assert [(t.name, t.datatype) for t in model.signature.outputs] == [
        ("label", "INT64"),
        ("probabilities", "FP32"),
    ]


def test_missing_file_is_refused(tmp_path: Path) -> None:
    """A path that does not exist is reported as such."""
    with pytest.raises(NotOnnxError, match="no such file"):
        load_model(tmp_path / "absent.onnx")


def test_text_file_is_not_onnx(tmp_path: Path) -> None:
    """A text file is refused as not ONNX rather than crashing in protobuf."""
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n")
    with pytest.raises(NotOnnxError, match="not an ONNX model"):
        load_model(path)


def test_empty_file_is_not_onnx(tmp_path: Path) -> None:
    """An empty file parses as an empty protobuf and is still refused."""
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(NotOnnxError):
        load_model(path)


def test_model_onnxruntime_cannot_load(tmp_path: Path) -> None:
    """A well-formed ONNX file with an unknown operator fails with ModelLoadError."""
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="example.invalid")],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("example.invalid", 1)],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        load_model(path)


def test_zipmap_output_is_unsupported(tmp_path: Path, digits_mlp: MLPClassifier) -> None:
    """A classifier exported with ZipMap (a sequence of maps) is refused with the fix to apply."""
    proto = to_onnx(digits_mlp, np.zeros((1, 64), np.float32), target_opset=17)
    path = tmp_path / "zipmap.onnx"
    onnx.save(proto, path)
    with pytest.raises(UnsupportedModelError, match="zipmap=False"):
        load_model(path)


def test_save_model_replaces_atomically(tmp_path: Path, digits_gemm: Path) -> None:
    """save_model leaves exactly the target file behind, no temporary."""
    proto = onnx.load(digits_gemm)
    target = save_model(proto, tmp_path / "copy.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.onnx"]
    assert load_model(target).signature == load_model(digits_gemm).signature
