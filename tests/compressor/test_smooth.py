"""Scale migration before int8: a wide activation channel no longer crushes the others."""

from __future__ import annotations

from pathlib import Path

import pytest

from compressor.data import load_dataset
from compressor.errors import UnsupportedModelError
from compressor.evaluate import score
from compressor.model import load_model
from compressor.quantize import quantize_static_int8
from compressor.smooth import smooth


def test_smoothing_keeps_the_function_and_rescues_int8(
    tmp_path: Path, map_net: Path, map_calib: Path, map_eval: Path
) -> None:
    """The migrated float model computes the same map; its int8 copy is within cosine 0.98
    where plain int8 is far off."""
    model = load_model(map_net)
    calib = load_dataset(map_calib, model.signature)
    smoothed, migrations = smooth(model, tmp_path / "s.onnx", calib)
    assert [m.producer for m in migrations] == ["wide"]
    assert migrations[0].readers == ("mix",)
    plain = quantize_static_int8(model, tmp_path / "plain.onnx", calib)
    rescued = quantize_static_int8(load_model(smoothed), tmp_path / "rescued.onnx", calib)
    scores = score(
        map_net,
        {"smoothed": smoothed, "plain": plain, "rescued": rescued},
        load_dataset(map_eval, model.signature),
        1,
    )
    assert scores["smoothed"].fidelity.cosine > 0.99999
    assert scores["plain"].fidelity.cosine < 0.9
    assert scores["rescued"].fidelity.cosine >= 0.98
    assert load_model(smoothed).signature == model.signature


def test_ordinary_ranges_need_no_smoothing(tmp_path: Path, cnn: Path, cnn_calib: Path) -> None:
    """A conv net whose channels have similar ranges is left alone, and says why."""
    model = load_model(cnn)
    with pytest.raises(UnsupportedModelError, match="smoothing"):
        smooth(model, tmp_path / "s.onnx", load_dataset(cnn_calib, model.signature))
