"""The TFLite verifier and the model directory's .tflite files: corrupt, truncated, bit-flipped
and random files are refused with a reason and never take the test process down."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from agent.errors import ManifestError, VariantRejected
from agent.manifest import (
    DelegateSpec,
    Manifest,
    RuntimeOptions,
    read_manifest,
    write_manifest,
)
from agent.repository import BARE_VARIANT, scan, verify_variant
from agent.runtime import load_variant
from agent.session import SessionSettings
from agent.tflite_check import TfliteFormatError, check_tflite_file, inspect_tflite
from tests import tflite_models

SETTINGS = SessionSettings(threads=1, warmup=False)


@pytest.fixture
def mlp(tmp_path: Path) -> bytes:
    """The bytes of a small two-layer FullyConnected model."""
    rng = np.random.default_rng(0)
    layers = [
        (rng.standard_normal((8, 4)).astype(np.float32), np.zeros(8, np.float32)),
        (rng.standard_normal((2, 8)).astype(np.float32), np.zeros(2, np.float32)),
    ]
    return tflite_models.mlp_tflite(tmp_path / "mlp.tflite", layers).read_bytes()


def test_valid_models_pass_and_are_described(tmp_path: Path, mlp: bytes) -> None:
    """The test models pass the check, which counts their subgraphs, tensors and operators."""
    facts = inspect_tflite(tmp_path / "mlp.tflite")
    assert (facts.subgraphs, facts.tensors, facts.operators, facts.signatures) == (1, 7, 2, 1)
    assert facts.builtin_codes == {9} and not facts.custom_ops  # FULLY_CONNECTED
    tflite_models.int8_fc_tflite(tmp_path / "q.tflite")
    check_tflite_file(tmp_path / "q.tflite", variant="q")


def test_every_truncation_is_refused(tmp_path: Path, mlp: bytes) -> None:
    """A file cut short anywhere (an interrupted copy) is refused with a reason."""
    path = tmp_path / "cut.tflite"
    for length in range(len(mlp)):
        path.write_bytes(mlp[:length])
        with pytest.raises(TfliteFormatError):
            inspect_tflite(path)


def test_random_files_are_refused(tmp_path: Path) -> None:
    """Random bytes, with or without the TFL3 identifier, are refused with a reason."""
    rng = np.random.default_rng(7)
    path = tmp_path / "random.tflite"
    for i in range(300):
        data = bytearray(rng.integers(0, 256, size=int(rng.integers(1, 4096)), dtype=np.uint8))
        if i % 2 and len(data) >= 8:
            data[4:8] = b"TFL3"
        path.write_bytes(bytes(data))
        with pytest.raises(VariantRejected, match="not a valid TFLite file"):
            check_tflite_file(path, variant="v")


def test_bit_flipped_files_are_refused_or_served_never_crash(tmp_path: Path, mlp: bytes) -> None:
    """A file with flipped bits is refused by the check, refused by the probe, or (when the
    flips only changed values) served; the agent's process survives every one of them."""
    rng = np.random.default_rng(11)
    refused_by_check = loaded = refused_later = 0
    for i in range(60):
        data = bytearray(mlp)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(8, len(data)))] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"flip{i}.tflite"
        path.write_bytes(bytes(data))
        try:
            check_tflite_file(path, variant="v")
        except VariantRejected as exc:
            assert "not a valid TFLite file" in str(exc)
            refused_by_check += 1
            continue
        try:
            load_variant("m", "v", path, SETTINGS).close()
            loaded += 1
        except VariantRejected:
            refused_later += 1
    assert refused_by_check + loaded + refused_later == 60
    assert refused_by_check >= 30  # most flips break the structure, and the check sees it


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_bytes(b"\x10\0\0\0ONNX" + bytes(32)), "file identifier"),
        (tflite_models.constant_input_tflite, "is a constant"),
        (tflite_models.custom_op_tflite, "custom operator"),
    ],
)
def test_specific_defects_are_named(tmp_path: Path, build: object, reason: str) -> None:
    """Each defect the check knows is refused with a reason that names it."""
    path = tmp_path / "bad.tflite"
    build(path)  # type: ignore[operator]  # the parametrized builders take one Path
    with pytest.raises(VariantRejected, match=reason):
        check_tflite_file(path, variant="v")


def test_custom_ops_of_the_delegate_are_allowed(tmp_path: Path) -> None:
    """A custom operator passes only when the variant's delegate provides it: the Edge TPU's
    by default for libedgetpu, others when listed; anything else is still refused."""
    path = tflite_models.custom_op_tflite(tmp_path / "tpu.tflite", "edgetpu-custom-op")
    edgetpu = RuntimeOptions(delegate=DelegateSpec(library="libedgetpu.so.1"))
    check_tflite_file(path, variant="v", custom_ops=edgetpu.custom_ops)
    other = RuntimeOptions(delegate=DelegateSpec(library="/opt/npu/libnpu.so", custom_ops=["X"]))
    with pytest.raises(VariantRejected, match="its delegate provides"):
        check_tflite_file(path, variant="v", custom_ops=other.custom_ops)
    assert RuntimeOptions().custom_ops == frozenset()


def test_shared_objects_cannot_multiply_the_work(tmp_path: Path) -> None:
    """A file whose tables are shared so that a walk would read far more entries than the
    file holds (here 20 million from 100 KB) is refused once its reads pass the budget."""
    path = tflite_models.shared_operator_tflite(tmp_path / "shared.tflite")
    assert path.stat().st_size < 200_000
    with pytest.raises(TfliteFormatError, match="shared objects"):
        inspect_tflite(path)


def test_bare_tflite_file_is_a_one_variant_model(tmp_path: Path) -> None:
    """A bare name.tflite in the model directory is a model named by the file, with one
    variant that verify_variant accepts and load_variant serves."""
    models = tmp_path / "models"
    tflite_models.scale_tflite(models / "scaler.tflite")
    (models / "notes.txt").write_text("not a model")
    found, rejected = scan(models)
    assert rejected == []
    assert [(m.name, [v.name for v in m.variants]) for m in found] == [("scaler", [BARE_VARIANT])]
    path = verify_variant(found[0], found[0].variants[0], models)
    (y,) = load_variant("scaler", BARE_VARIANT, path, SETTINGS).run(
        {"x": np.zeros((1, 4), np.float32)}
    )
    np.testing.assert_array_equal(y, np.ones((1, 4), np.float32))


def test_corrupt_tflite_in_the_model_directory_is_rejected_by_verify(tmp_path: Path) -> None:
    """verify_variant routes a .tflite file to the TFLite check, which refuses a corrupt one."""
    models = tmp_path / "models"
    path = tflite_models.scale_tflite(models / "scaler.tflite")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    found, _ = scan(models)
    with pytest.raises(VariantRejected, match="not a valid TFLite file"):
        verify_variant(found[0], found[0].variants[0], models)


def manifest(**variant_changes: object) -> dict[str, object]:
    return {
        "name": "m",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
        "runtime": {"threads": 2, "float_io": False},
        "variants": [
            {"name": "fp32", "file": "fp32.onnx"},
            {"name": "int8", "file": "int8.tflite", **variant_changes},
        ],
    }


def test_manifest_mixes_runtimes_and_merges_options(tmp_path: Path) -> None:
    """A ladder may mix .onnx and .tflite rungs; a variant's runtime options override the
    model's field by field, and unset fields stay unset (defaults)."""
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest(runtime={"float_io": True, "interpreters": 2})))
    parsed = read_manifest(path)
    options = parsed.variants[1].runtime_options(parsed)
    assert (options.float_io, options.threads, options.interpreters) == (True, 2, 2)
    assert options.delegate is None and options.probe is None
    assert parsed.variants[0].runtime_options(None).model_dump(exclude_none=True) == {}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"runtime": {"delegate": {"library": "edgetpu"}}}, "shared library name"),
        ({"runtime": {"delegate": {"library": "../lib/libx.so"}}}, "bare library name"),
        ({"runtime": {"threads": 0}}, "greater than or equal to 1"),
        ({"runtime": {"turbo": True}}, "Extra inputs"),
        ({"file": "int8.tfl"}, "not an .onnx or .tflite file"),
    ],
)
def test_manifest_refuses_bad_runtime_options(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    """Invalid runtime options or file suffixes are a ManifestError naming the problem."""
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest(**changes)))
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_runtime_options_on_an_onnx_variant_are_refused() -> None:
    """Runtime options belong to .tflite variants; on an .onnx variant they are an error."""
    data = manifest()
    data["variants"] = [{"name": "a", "file": "a.onnx", "runtime": {"float_io": True}}]
    with pytest.raises(ValueError, match=r"apply to \.tflite variants"):
        Manifest.model_validate(data)


def test_written_manifest_leaves_unset_runtime_options_out(tmp_path: Path) -> None:
    """write_manifest omits runtime options nobody set (older agents refuse unknown keys)
    and keeps those that are set, which read back the same."""
    parsed = Manifest.model_validate(manifest(runtime={"float_io": True}))
    write_manifest(parsed, tmp_path / "manifest.json")
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert "runtime" not in data["variants"][0]
    assert data["variants"][1]["runtime"]["float_io"] is True
    assert read_manifest(tmp_path / "manifest.json") == parsed


def test_a_fifo_in_place_of_a_tflite_file_is_refused_without_blocking(tmp_path: Path) -> None:
    """A FIFO named like a model is refused at once, never opened for a blocking read."""
    fifo = tmp_path / "m.tflite"
    os.mkfifo(fifo)
    with pytest.raises(VariantRejected, match="FIFO"):
        check_tflite_file(fifo, variant="v")
