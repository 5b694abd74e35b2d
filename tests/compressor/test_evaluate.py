"""Measuring variants: quality against the original, latency, size and peak memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compressor.data import Dataset, load_dataset
from compressor.errors import ModelLoadError
from compressor.evaluate import Budget, EvalSettings, Evaluation, evaluate
from compressor.latency import Latency
from compressor.memprobe import probe_peak_rss_mb
from compressor.metrics import Fidelity
from compressor.model import load_model, save_model
from compressor.session import open_session, run_dataset

FAST = EvalSettings(threads=1, batch_size=16, rounds=2, seconds_per_round=0.01)


def _flip_last_layer(source: Path, target: Path) -> Path:
    proto = onnx.load(source)
    for init in proto.graph.initializer:
        if init.name == "w2":
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), "w2"))
    return save_model(proto, target)


def test_original_against_itself(digits_gemm: Path, digits_eval: Path) -> None:
    """The original scores perfect fidelity and its own accuracy, with positive figures."""
    data = load_dataset(digits_eval, load_model(digits_gemm).signature)
    result = evaluate(digits_gemm, {"fp32": digits_gemm}, data, FAST)["fp32"]
    assert result.fidelity.cosine == pytest.approx(1.0)
    assert result.fidelity.top1_agreement == 1.0
    assert result.fidelity.max_abs_error == 0.0
    assert result.accuracy == result.reference_accuracy
    assert result.accuracy is not None and result.accuracy > 0.9
    assert result.latency.batch1_ms > 0 and result.latency.batch_ms is not None
    assert result.size_bytes == digits_gemm.stat().st_size
    assert result.peak_rss_mb is not None and result.peak_rss_mb >= 0
    assert result.within(Budget())


def test_broken_variant_is_over_budget(
    tmp_path: Path, digits_gemm: Path, digits_eval: Path
) -> None:
    """Negating the last layer's weights wrecks accuracy and the budget says so."""
    broken = _flip_last_layer(digits_gemm, tmp_path / "broken.onnx")
    data = load_dataset(digits_eval, load_model(digits_gemm).signature)
    settings = EvalSettings(
        threads=1, batch_size=8, rounds=1, seconds_per_round=0.0, measure_memory=False
    )
    result = evaluate(digits_gemm, {"broken": broken}, data, settings)["broken"]
    assert result.accuracy is not None and result.reference_accuracy is not None
    assert result.accuracy < result.reference_accuracy - 0.5
    assert result.fidelity.top1_agreement is not None and result.fidelity.top1_agreement < 0.5
    assert not result.within(Budget())
    assert result.peak_rss_mb is None


def test_without_labels_fidelity_decides(
    tmp_path: Path, digits_gemm: Path, digits_calib: Path
) -> None:
    """Without labels, accuracy is absent and the budget compares cosine with 1 - loss."""
    data = load_dataset(digits_calib, load_model(digits_gemm).signature)
    settings = EvalSettings(
        threads=1, batch_size=8, rounds=1, seconds_per_round=0.0, measure_memory=False
    )
    broken = _flip_last_layer(digits_gemm, tmp_path / "broken.onnx")
    results = evaluate(digits_gemm, {"same": digits_gemm, "broken": broken}, data, settings)
    assert results["same"].accuracy is None
    assert results["same"].within(Budget(0.01))
    assert results["broken"].fidelity.cosine < 0.99
    assert not results["broken"].within(Budget(0.01))
    assert results["broken"].within(Budget(2.0))


def test_budget_boundary() -> None:
    """A variant losing exactly the allowed accuracy is kept; a hair more is dropped."""

    def at(acc: float) -> Evaluation:
        return Evaluation(
            acc, 0.95, Fidelity(1, 1, 0, 1), "v", Path("v.onnx"), 1, Latency(1.0, 1.0, 8), None
        )

    assert at(0.94).within(Budget(0.01))
    assert not at(0.9399).within(Budget(0.01))
    assert np.isclose(Budget(0.02).min_cosine, 0.98)


def _fixed_batch(source: Path, target: Path, rows: int) -> Path:
    proto = onnx.load(source)
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = rows
    return save_model(proto, target)


def test_fixed_batch_model_has_no_batch_latency(
    tmp_path: Path, constant_weights: Path, vector16: Path
) -> None:
    """A model fixed at batch 1 is run row by row and gets no batch latency."""
    fixed = _fixed_batch(constant_weights, tmp_path / "fixed.onnx", 1)
    model = load_model(fixed)
    assert not model.signature.batchable
    data = load_dataset(vector16, model.signature)
    result = evaluate(fixed, {"fixed": fixed}, data, FAST)["fixed"]
    assert result.latency.batch_ms is None
    assert result.fidelity.cosine == pytest.approx(1.0)


def test_fixed_batch_needs_whole_batches(tmp_path: Path, constant_weights: Path) -> None:
    """A set whose rows do not fill whole fixed batches is refused with both numbers."""
    fixed = _fixed_batch(constant_weights, tmp_path / "fixed4.onnx", 4)
    data = Dataset({"input": np.zeros((6, 16), np.float32)})
    with pytest.raises(ModelLoadError, match="exactly 4 rows; the set has 6"):
        run_dataset(open_session(fixed, 1), data)


def test_memory_probe_failure_is_reported(tmp_path: Path) -> None:
    """A model the probe cannot load raises a ModelLoadError naming the probe."""
    with pytest.raises(ModelLoadError, match="memory probe failed"):
        probe_peak_rss_mb(tmp_path / "absent.onnx", {"input": np.zeros((1, 4), np.float32)}, 1)
