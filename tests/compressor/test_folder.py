"""Writing the model folder: all or nothing, and replacement only when asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.manifest import Manifest, TensorSpec, Variant
from compressor.errors import OutputExistsError
from compressor.folder import check_output, model_name, write_folder


def test_model_name_is_sanitised() -> None:
    """File stems with spaces or symbols become manifest-safe names."""
    assert model_name("my model (v2)") == "my-model-v2"
    assert model_name("digits") == "digits"
    assert model_name("***") == "model"


def test_existing_file_is_not_a_folder(tmp_path: Path) -> None:
    """An output path that is a file is refused even with force."""
    path = tmp_path / "out"
    path.write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        check_output(path, force=True)


def test_failure_while_staging_leaves_nothing(tmp_path: Path) -> None:
    """If writing fails midway, neither the output nor a temporary folder remains."""
    manifest = Manifest(
        name="m",
        format=1,
        batching=None,
        inputs=[TensorSpec(name="input", datatype="FP32", shape=(-1, 64))],
        outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=(-1, 10))],
        variants=[Variant(name="fp32", file="fp32.onnx")],
    )

    def broken(stage: Path) -> None:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_folder(tmp_path / "m", manifest, [], broken, force=False)
    assert list(tmp_path.iterdir()) == []
