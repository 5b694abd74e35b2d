"""Mixed precision: the layers int8 hurts most are found and kept in float, and no more."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from compressor.data import Dataset, load_dataset
from compressor.errors import UnsupportedModelError
from compressor.metrics import fidelity
from compressor.mixed import quantize_mixed
from compressor.model import load_model
from compressor.quantize import quantize_static_int8
from compressor.session import open_session, run_dataset


def _cosine(original: Path, variant: Path, data: Dataset) -> float:
    ref = run_dataset(open_session(original, 1), data)
    return fidelity(ref, run_dataset(open_session(variant, 1), data)).cosine


def test_full_int8_loses_the_outlier_model(
    tmp_path: Path, outlier_mlp: Path, vector16: Path
) -> None:
    """Every layer in int8 wrecks the outputs of the model with a hot channel."""
    model = load_model(outlier_mlp)
    data = load_dataset(vector16, model.signature)
    out = quantize_static_int8(model, tmp_path / "int8.onnx", data)
    assert _cosine(outlier_mlp, out, data) < 0.9


def test_sensitive_layers_kept_in_float(tmp_path: Path, outlier_mlp: Path, vector16: Path) -> None:
    """The two layers around the hot tensor are returned to float first; the rest stay int8."""
    model = load_model(outlier_mlp)
    data = load_dataset(vector16, model.signature)

    def meets(path: Path) -> bool:
        return _cosine(outlier_mlp, path, data) >= 0.99

    result = quantize_mixed(model, tmp_path / "mixed.onnx", data, meets)
    assert {s.node for s in result.ranking[:2]} == {"layer1", "layer2"}
    assert set(result.float_layers) == {"layer1", "layer2"}
    assert result.quantized_layers == 2
    assert _cosine(outlier_mlp, result.path, data) >= 0.99
    float_matmuls = [
        n.name
        for n in onnx.load(result.path).graph.node
        if n.op_type == "MatMul" and not n.input[1].endswith("DequantizeLinear_Output")
    ]
    assert set(float_matmuls) == {"layer1", "layer2"}
    assert load_model(result.path).signature == model.signature


def test_unreachable_budget_is_refused(tmp_path: Path, outlier_mlp: Path, vector16: Path) -> None:
    """A budget that even an all-float mix cannot meet is refused, naming the layer count."""
    model = load_model(outlier_mlp)
    data = load_dataset(vector16, model.signature)
    with pytest.raises(UnsupportedModelError, match="even with all 4 layers"):
        quantize_mixed(model, tmp_path / "mixed.onnx", data, lambda _: False)
    assert not (tmp_path / "mixed.onnx").exists()
