"""PyTorch models into the compressor: torch.export programs and TorchScript files become ONNX
with torch's exporter, answer as PyTorch does, and ladder like any ONNX model."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import structlog
import torch  # the train extra, which dev installs: a missing torch fails here

from agent.manifest import MANIFEST_FILE, read_manifest
from compressor.cli import main
from compressor.errors import CompressorError, ModelLoadError
from compressor.torch_import import examples_from_npz, export_to_onnx

FAST_TIMING = ["--threads", "1", "--batch", "8", "--rounds", "1", "--no-memory"]


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """The CLI configures structlog globally; restore the defaults after each test."""
    yield
    structlog.reset_defaults()


class Classifier(torch.nn.Module):  # type: ignore[misc]  # torch is Any to mypy
    """64 features -> 32 -> 10 probabilities, the digits' shape."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = torch.nn.Linear(64, 32)
        self.out = torch.nn.Linear(32, 10)

    def forward(self, x: object) -> object:
        return torch.softmax(self.out(torch.relu(self.hidden(x))), dim=-1)


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The classifier as a torch.export program with a free batch dimension."""
    path = tmp_path_factory.mktemp("torch") / "classifier.pt2"
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(
        Classifier().eval(), (torch.zeros(4, 64),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(path))
    return path


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    result: np.ndarray = ort.InferenceSession(str(path)).run(None, {"input": x})[0]
    return result


def test_exported_program_becomes_onnx_that_answers_as_torch(pt2: Path, tmp_path: Path) -> None:
    """A .pt2 program exports to ONNX named after the examples, batch free, same answers."""
    examples = {"input": np.random.default_rng(0).random((5, 64), dtype=np.float32)}
    out = export_to_onnx(pt2, tmp_path / "c.onnx", examples, ["probabilities"])
    session = ort.InferenceSession(str(out))
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    x = np.random.default_rng(1).random((7, 64), dtype=np.float32)
    with torch.no_grad():
        expected = torch.export.load(str(pt2)).module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_onnx(out, x), expected, rtol=1e-5, atol=1e-6)


def test_torchscript_file_becomes_onnx_that_answers_as_torch(tmp_path: Path) -> None:
    """A TorchScript file exports with a free batch dimension and the same answers."""
    model = Classifier().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated
        script = torch.jit.trace(model, (torch.zeros(2, 64),))
    path = tmp_path / "classifier.pt"
    script.save(str(path))
    examples = {"input": np.zeros((3, 64), np.float32)}
    out = export_to_onnx(path, tmp_path / "c.onnx", examples)
    x = np.random.default_rng(2).random((9, 64), dtype=np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_onnx(out, x), expected, rtol=1e-5, atol=1e-6)


def test_unreadable_or_unexampled_models_are_refused(pt2: Path, tmp_path: Path) -> None:
    """A file torch cannot read, or a model given no example inputs, is a CompressorError."""
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a program")
    with pytest.raises(ModelLoadError, match=r"not a readable torch\.export program"):
        export_to_onnx(junk, tmp_path / "j.onnx", {"input": np.zeros((1, 64), np.float32)})
    with pytest.raises(CompressorError, match="example inputs"):
        export_to_onnx(pt2, tmp_path / "e.onnx", {})


def test_ladder_takes_a_pt2_model(
    pt2: Path, tmp_path: Path, digits_calib: Path, digits_eval: Path
) -> None:
    """`edge-compress ladder model.pt2` exports it and writes a ladder whose first rung is
    the exported model, named by the calibration set's input."""
    assert list(examples_from_npz(digits_eval)) == ["input"]  # labels are not an input
    out = tmp_path / "models" / "classifier"
    code = main(
        [
            "ladder", str(pt2), "--out", str(out), "--calib", str(digits_calib),
            "--eval", str(digits_eval), "--output-names", "probabilities",
            "--prune-ratios", "0.5", "--no-plot", "--no-mixed", *FAST_TIMING,
        ]
    )  # fmt: skip
    assert code == 0
    manifest = read_manifest(out / MANIFEST_FILE)
    assert manifest.variants[0].name == "fp32"
    assert [t.name for t in manifest.inputs] == ["input"]
    assert [t.name for t in manifest.outputs] == ["probabilities"]
