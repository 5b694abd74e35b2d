"""fp16 that does not overflow: wide-range nodes stay in float32, the rest goes to float16."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from compressor.data import load_dataset
from compressor.evaluate import score
from compressor.fp16 import FP16_MAX, convert_fp16_safe, overflowing_nodes
from compressor.graph import name_nodes
from compressor.model import load_model
from compressor.quantize import convert_fp16


def test_overflowing_tensor_blocks_its_producer_and_readers(map_net: Path, map_calib: Path) -> None:
    """The conv whose output passes 65504, its Relu and the Concat reading it are found."""
    model = load_model(map_net)
    proto = name_nodes(onnx.load_model(map_net))
    blocked = overflowing_nodes(proto, load_dataset(map_calib, model.signature))
    assert {"wide", "wide.relu", "skip", "mix"} <= set(blocked)
    assert "stem" not in blocked and "head" not in blocked
    assert f"{FP16_MAX:g}" in blocked["wide"]


def test_safe_fp16_keeps_the_map_where_plain_fp16_breaks_it(
    tmp_path: Path, map_net: Path, map_calib: Path, map_eval: Path
) -> None:
    """Plain fp16 misses cosine 0.98 on the wide-range map net; the block-listed one does not."""
    model = load_model(map_net)
    plain = convert_fp16(model, tmp_path / "plain.onnx")
    safe, plan = convert_fp16_safe(
        model, tmp_path / "safe.onnx", load_dataset(map_calib, model.signature)
    )
    scores = score(
        map_net, {"plain": plain, "safe": safe}, load_dataset(map_eval, model.signature), 1
    )
    assert scores["plain"].fidelity.cosine < 0.98
    assert scores["safe"].fidelity.cosine > 0.999
    assert plan.cosine is not None and plan.cosine > 0.999
    converted = onnx.load_model(safe)
    halves = [i for i in converted.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    assert {i.name for i in halves} >= {"stem.w", "head.w"}  # the rest did go to float16


def test_no_round_trip_casts_between_float_nodes(
    tmp_path: Path, map_net: Path, map_calib: Path
) -> None:
    """No Cast to float16 sits between two nodes kept in float32 (it would overflow there)."""
    model = load_model(map_net)
    safe, _ = convert_fp16_safe(
        model, tmp_path / "safe.onnx", load_dataset(map_calib, model.signature)
    )
    graph = onnx.load_model(safe).graph
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type == "Cast" and node.attribute[0].i == onnx.TensorProto.FLOAT:
            source = producers.get(node.input[0])
            assert source is None or source.op_type != "Cast", node.name


@pytest.mark.parametrize("calibrated", [False, True])
def test_fp16_of_an_ordinary_model_blocks_nothing(
    tmp_path: Path, cnn: Path, cnn_calib: Path, calibrated: bool
) -> None:
    """A model with ordinary ranges converts whole, with or without calibration data."""
    model = load_model(cnn)
    calib = load_dataset(cnn_calib, model.signature) if calibrated else None
    _, plan = convert_fp16_safe(model, tmp_path / "h.onnx", calib)
    assert plan.blocked == {}
