"""The model directory, manifests and onnxruntime sessions: what is served and what is refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from agent.errors import InferenceError, ManifestError, VariantRejected
from agent.files import RefusedFile, open_regular, read_regular
from agent.manifest import Manifest, read_manifest
from agent.onnx_check import inspect_model
from agent.repository import MAX_MANIFEST_BYTES, scan, sha256_of, verify_variant
from agent.session import LoadedVariant, SessionSettings
from tests import onnx_models

SETTINGS = SessionSettings(threads=1)
SCALE_IO = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}


def manifest_dict(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "m",
        **SCALE_IO,
        "variants": [{"name": "fp32", "file": "fp32.onnx"}],
    }
    base.update(changes)
    return base


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"variants": [{"name": "a", "file": "../x.onnx"}]}, "plain path inside"),
        ({"variants": [{"name": "a", "file": "/etc/x.onnx"}]}, "plain path inside"),
        ({"variants": [{"name": "a", "file": "a.txt"}]}, "not an .onnx or .tflite file"),
        (
            {"variants": [{"name": "a", "file": "a.onnx"}, {"name": "a", "file": "b.onnx"}]},
            "duplicate variant names",
        ),
        ({"variants": []}, "at least 1 item"),
        ({"variants": [{"name": "a", "file": "a.onnx", "sha256": "XYZ"}]}, "sha256"),
        ({"name": "a/b"}, "name"),
        ({"format": 2}, "format"),
        ({"extra": 1}, "Extra inputs are not permitted"),
        ({"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1]}]}, "datatype"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-2]}]}, "-1 (free)"),
    ],
)
def test_manifest_schema_refuses_bad_manifests(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    """An invalid manifest is a ManifestError that says which field is wrong."""
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest_dict(**changes)))
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert message in str(info.value)


def test_manifest_keeps_unknown_metrics_for_newer_compressors() -> None:
    """Metrics written by a newer compressor survive a round trip through this schema."""
    data = manifest_dict(
        variants=[{"name": "a", "file": "a.onnx", "metrics": {"accuracy": 0.9, "cosine": 0.99}}]
    )
    manifest = Manifest.model_validate(data)
    assert manifest.variants[0].metrics.model_dump()["cosine"] == 0.99
    with pytest.raises(ValidationError):
        Manifest.model_validate(
            manifest_dict(variants=[{"name": "a", "file": "a.onnx", "metrics": {"accuracy": 1.5}}])
        )


def test_scan_finds_folders_and_bare_files_and_skips_hidden(tmp_path: Path) -> None:
    """Folders with manifests and bare .onnx files are models; dot-entries are staging areas."""
    onnx_models.copy_demo(tmp_path)
    onnx_models.scale_model(tmp_path / "scale.onnx")
    onnx_models.scale_model(tmp_path / ".incoming" / "x.onnx")
    (tmp_path / "notes.txt").write_text("not a model")
    models, rejected = scan(tmp_path)
    assert [m.name for m in models] == ["digits", "scale"]
    assert rejected == []
    assert models[1].variants[0].name == "default"


def test_scan_reports_unusable_entries_with_reasons(tmp_path: Path) -> None:
    """A folder without a manifest, a name mismatch or an invalid file name is rejected."""
    (tmp_path / "empty").mkdir()
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "manifest.json").write_text(json.dumps(manifest_dict(name="other")))
    onnx_models.scale_model(tmp_path / "bad name.onnx")
    models, rejected = scan(tmp_path)
    assert models == []
    reasons = {r.path.name: r.reason for r in rejected}
    assert "no manifest.json" in reasons["empty"]
    assert "differs from its folder" in reasons["wrong"]
    assert "not a valid model name" in reasons["bad name.onnx"]
    assert scan(tmp_path / "absent")[1][0].reason == "model directory does not exist"


def test_symlinks_out_of_the_models_directory_are_refused(tmp_path: Path) -> None:
    """A model or variant that resolves outside the models directory is never opened."""
    models_dir, outside = tmp_path / "models", tmp_path / "outside"
    models_dir.mkdir()
    onnx_models.scale_model(outside / "evil.onnx")
    os.symlink(outside / "evil.onnx", models_dir / "evil.onnx")
    folder = onnx_models.ladder_folder(
        models_dir / "m", [("fp32", onnx_models.scale_model(tmp_path / "s.onnx"))], **SCALE_IO
    )
    (folder / "fp32.onnx").unlink()
    os.symlink(outside / "evil.onnx", folder / "fp32.onnx")
    models, rejected = scan(models_dir)
    assert [r.path.name for r in rejected] == ["evil.onnx"]
    assert "outside" in rejected[0].reason
    (source,) = models
    with pytest.raises(VariantRejected, match="outside"):
        verify_variant(source, source.variants[0], models_dir)


def test_sha256_mismatch_and_missing_file_are_rejected(tmp_path: Path) -> None:
    """A variant whose bytes differ from the manifest's hash, or whose file is gone, is refused."""
    built = onnx_models.scale_model(tmp_path / "build" / "s.onnx")
    folder = onnx_models.ladder_folder(tmp_path / "m", [("a", built), ("b", built)], **SCALE_IO)
    (folder / "a.onnx").write_bytes(built.read_bytes() + b"\0")
    (folder / "b.onnx").unlink()
    (source,), _ = scan(tmp_path)
    with pytest.raises(VariantRejected, match=r"sha256 of a\.onnx is"):
        verify_variant(source, source.variants[0], tmp_path)
    with pytest.raises(VariantRejected, match=r"file b\.onnx is missing"):
        verify_variant(source, source.variants[1], tmp_path)


def test_non_regular_files_are_refused_without_being_opened(tmp_path: Path) -> None:
    """A FIFO or a directory where a manifest or model file should be is rejected by the
    scan and by verification, and the hashing and ONNX checks refuse it, without blocking."""
    models = tmp_path / "models"
    built = onnx_models.scale_model(tmp_path / "build" / "s.onnx")
    folder = onnx_models.ladder_folder(models / "m", [("a", built), ("b", built)], **SCALE_IO)
    (folder / "a.onnx").unlink()
    os.mkfifo(folder / "a.onnx")
    (folder / "b.onnx").unlink()
    (folder / "b.onnx").mkdir()
    (models / "pipe").mkdir()
    os.mkfifo(models / "pipe" / "manifest.json")
    os.mkfifo(models / "bare.onnx")
    (source,), rejected = scan(models)
    reasons = {r.path.name: r.reason for r in rejected}
    assert "manifest.json is a FIFO, not a regular file" in reasons["pipe"]
    assert "bare.onnx is a FIFO, not a regular file" in reasons["bare.onnx"]
    with pytest.raises(VariantRejected, match=r"a\.onnx is a FIFO"):
        verify_variant(source, source.variants[0], models)
    with pytest.raises(VariantRejected, match=r"b\.onnx is a directory"):
        verify_variant(source, source.variants[1], models)
    for reader in (sha256_of, inspect_model, open_regular):
        with pytest.raises(RefusedFile, match="FIFO"):
            reader(folder / "a.onnx")  # type: ignore[operator]  # each takes one path


def test_a_rejection_carries_the_stamp_of_what_was_rejected(tmp_path: Path) -> None:
    """The same bad entry scans to an equal rejection until it is rewritten."""
    (tmp_path / "bad").mkdir()
    manifest = tmp_path / "bad" / "manifest.json"
    manifest.write_text("{")
    first = scan(tmp_path)[1]
    assert scan(tmp_path)[1] == first
    manifest.write_text("{ ")
    assert scan(tmp_path)[1] != first


def test_an_oversized_manifest_is_refused(tmp_path: Path) -> None:
    """A manifest.json larger than MAX_MANIFEST_BYTES is refused before it is parsed."""
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "manifest.json").write_bytes(b" " * (MAX_MANIFEST_BYTES + 1))
    (rejection,) = scan(tmp_path)[1]
    assert "larger than" in rejection.reason
    with pytest.raises(RefusedFile):
        read_regular(tmp_path / "big" / "manifest.json", MAX_MANIFEST_BYTES)


def test_session_exposes_the_graph_signature(tmp_path: Path) -> None:
    """A bare model's signature comes from the graph, free dimensions as -1."""
    path = onnx_models.two_input_model(tmp_path / "pair.onnx")
    variant = LoadedVariant.load("pair", "default", path, SETTINGS)
    assert [(s.name, s.datatype, s.shape) for s in variant.inputs] == [
        ("a", "INT64", (-1, 2)),
        ("b", "FP32", (-1, 2)),
    ]
    assert [(s.name, s.datatype) for s in variant.outputs] == [("total", "FP32"), ("flag", "BOOL")]
    assert variant.warmed_up
    total, flag = variant.run({"a": np.array([[1, -5]]), "b": np.array([[0.5, 1]], np.float32)})
    assert total.tolist() == [[1.5, -4.0]]
    assert flag.tolist() == [[True, False]]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([{"name": "z", "datatype": "FP32", "shape": [-1, 4]}], "inputs are ['x']"),
        ([{"name": "x", "datatype": "FP64", "shape": [-1, 4]}], "is FP32, the manifest says FP64"),
        ([{"name": "x", "datatype": "FP32", "shape": [-1, 5]}], "has shape [-1, 4]"),
        ([{"name": "x", "datatype": "FP32", "shape": [-1]}], "has shape [-1, 4]"),
    ],
)
def test_session_refuses_a_graph_that_differs_from_its_manifest(
    tmp_path: Path, inputs: list[dict[str, object]], message: str
) -> None:
    """A variant whose graph does not have the manifest's signature is rejected with both."""
    path = onnx_models.scale_model(tmp_path / "s.onnx")
    expected = Manifest.model_validate(manifest_dict(inputs=inputs))
    with pytest.raises(VariantRejected) as info:
        LoadedVariant.load("m", "fp32", path, SETTINGS, expected.inputs, expected.outputs)
    assert message in str(info.value)


def test_manifest_may_fix_a_dimension_the_graph_leaves_free(tmp_path: Path) -> None:
    """The manifest can be stricter than the graph; the manifest's shape is then served."""
    path = onnx_models.picky_model(tmp_path / "p.onnx")
    expected = Manifest.model_validate(
        manifest_dict(
            inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
            outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
        )
    )
    variant = LoadedVariant.load("m", "fp32", path, SETTINGS, expected.inputs, expected.outputs)
    assert variant.inputs[0].shape == (-1, 4)


def test_a_file_onnxruntime_cannot_load_is_rejected(tmp_path: Path) -> None:
    """Garbage bytes named .onnx are a VariantRejected with onnxruntime's reason."""
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(VariantRejected, match="onnxruntime cannot load it"):
        LoadedVariant.load("junk", "default", path, SETTINGS)


def test_runtime_failure_is_an_inference_error(tmp_path: Path) -> None:
    """When onnxruntime raises during run, the caller gets an InferenceError with its message."""
    variant = LoadedVariant.load(
        "picky", "default", onnx_models.picky_model(tmp_path / "p.onnx"), SETTINGS
    )
    assert not variant.warmed_up  # zeros of width 1 do not fit a 4x3 MatMul: reported, kept
    assert variant.run({"x": np.ones((2, 4), np.float32)})[0].shape == (2, 3)
    with pytest.raises(InferenceError, match="picky/default"):
        variant.run({"x": np.ones((2, 5), np.float32)})
