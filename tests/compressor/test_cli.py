"""The edge-compress command line: each subcommand works, and every error is one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import structlog

from agent.manifest import MANIFEST_FILE, read_manifest
from compressor.cli import main
from compressor.graph import op_counts
from compressor.model import load_model
from tests import onnx_models


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """The CLI configures structlog globally; restore the defaults after each test."""
    yield
    structlog.reset_defaults()


FAST_TIMING = ["--threads", "1", "--batch", "8", "--rounds", "1", "--no-memory"]


def test_quantize_dynamic(
    tmp_path: Path, digits_gemm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`quantize` writes a dynamic int8 model and reports it on stdout."""
    out = tmp_path / "int8.onnx"
    assert main(["quantize", str(digits_gemm), "-o", str(out)]) == 0
    assert "MatMulInteger" in op_counts(onnx.load(out).graph)
    assert f"wrote {out}" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["static", "int4", "fp16"])
def test_quantize_modes(tmp_path: Path, digits_gemm: Path, digits_calib: Path, mode: str) -> None:
    """Static, int4 and fp16 modes each write a loadable model with the same signature."""
    out = tmp_path / f"{mode}.onnx"
    code = main(
        ["quantize", str(digits_gemm), "-o", str(out), "--mode", mode, "--calib", str(digits_calib)]
    )
    assert code == 0
    assert load_model(out).signature == load_model(digits_gemm).signature


def test_quantize_mixed(
    tmp_path: Path, outlier_mlp: Path, vector16: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mixed mode names the layers it kept in float."""
    out = tmp_path / "mixed.onnx"
    code = main(
        ["quantize", str(outlier_mlp), "-o", str(out), "--mode", "mixed", "--calib", str(vector16)]
    )
    assert code == 0
    assert "kept in float: layer" in capsys.readouterr().out


def test_static_without_calibration(
    tmp_path: Path, digits_gemm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Static mode without --calib fails with exit 1 and says what to pass."""
    code = main(["quantize", str(digits_gemm), "-o", str(tmp_path / "q.onnx"), "--mode", "static"])
    assert code == 1
    assert "needs calibration data: pass --calib" in capsys.readouterr().err


def test_output_file_exists(
    tmp_path: Path, digits_gemm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing output file is refused without --force and replaced with it."""
    out = tmp_path / "q.onnx"
    out.write_text("keep")
    assert main(["quantize", str(digits_gemm), "-o", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    assert out.read_text() == "keep"
    assert main(["quantize", str(digits_gemm), "-o", str(out), "--force"]) == 0
    load_model(out)


def test_not_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A text file given as the model is reported in one line, without a traceback."""
    bad = tmp_path / "bad.onnx"
    bad.write_text("hello")
    assert main(["quantize", str(bad), "-o", str(tmp_path / "q.onnx")]) == 1
    err = capsys.readouterr().err
    assert "edge-compress: error:" in err and "not an ONNX model" in err
    assert "Traceback" not in err


def test_prune_structured(
    tmp_path: Path, digits_gemm: Path, digits_calib: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`prune` prints each layer's width change."""
    out = tmp_path / "p.onnx"
    assert main(["prune", str(digits_gemm), "-o", str(out), "--calib", str(digits_calib)]) == 0
    assert "64 -> 32" in capsys.readouterr().out


def test_prune_refusal(tmp_path: Path, if_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Pruning a model with nothing prunable exits 1 with the reason."""
    assert main(["prune", str(if_model), "-o", str(tmp_path / "p.onnx")]) == 1
    assert "no layer can be pruned" in capsys.readouterr().err


def test_prune_magnitude(
    tmp_path: Path, digits_gemm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Magnitude pruning reports the sparsity it reached."""
    out = tmp_path / "m.onnx"
    assert main(["prune", str(digits_gemm), "-o", str(out), "--method", "magnitude"]) == 0
    assert "sparsity 0.4" in capsys.readouterr().out


def test_distill(tmp_path: Path, digits_gemm: Path, digits_calib: Path) -> None:
    """`distill` writes a student with the teacher's signature."""
    out = tmp_path / "s.onnx"
    code = main(
        [
            "distill",
            str(digits_gemm),
            "-o",
            str(out),
            "--calib",
            str(digits_calib),
            "--hidden",
            "16",
            "--augment",
            "2",
        ]
    )
    assert code == 0
    assert load_model(out).signature == load_model(digits_gemm).signature


def test_evaluate_json(
    tmp_path: Path, digits_gemm: Path, digits_eval: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`evaluate --json` prints accuracy, fidelity and latency for the original and variants."""
    variant = tmp_path / "int8.onnx"
    main(["quantize", str(digits_gemm), "-o", str(variant)])
    capsys.readouterr()
    code = main(
        [
            "evaluate",
            str(digits_gemm),
            str(variant),
            "--eval",
            str(digits_eval),
            "--json",
            *FAST_TIMING,
        ]
    )
    assert code == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures) == {"original", "int8"}
    assert figures["original"]["cosine"] == pytest.approx(1.0)
    assert figures["int8"]["accuracy"] > 0.9
    assert figures["int8"]["latency_ms"] > 0


def test_evaluate_table(
    digits_gemm: Path, digits_eval: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --json, `evaluate` prints the table."""
    assert main(["evaluate", str(digits_gemm), "--eval", str(digits_eval), *FAST_TIMING]) == 0
    assert capsys.readouterr().out.startswith("variant")


def test_evaluate_wrong_data(
    digits_gemm: Path, cnn_eval: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Evaluation data that does not match the model fails with the shapes."""
    assert main(["evaluate", str(digits_gemm), "--eval", str(cnn_eval), *FAST_TIMING]) == 1
    assert "shape" in capsys.readouterr().err


def test_bad_ratio_is_a_usage_error(digits_gemm: Path, tmp_path: Path) -> None:
    """A ratio list with a value outside (0, 1) is rejected by argument parsing (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["ladder", str(digits_gemm), "--out", str(tmp_path / "d"), "--prune-ratios", "1.5"])
    assert exit_info.value.code == 2


def test_bad_hidden_widths_are_a_usage_error(digits_gemm: Path, tmp_path: Path) -> None:
    """A zero hidden width is rejected by argument parsing (exit 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "distill",
                str(digits_gemm),
                "-o",
                str(tmp_path / "s.onnx"),
                "--calib",
                "x.npz",
                "--hidden",
                "0",
            ]
        )
    assert exit_info.value.code == 2


@pytest.mark.timeout(300)  # a whole ladder in a child process: minutes on a busy machine
def test_console_script_ladder(
    tmp_path: Path, digits_gemm: Path, digits_calib: Path, digits_eval: Path
) -> None:
    """The installed `edge-compress` script builds a ladder: table on stdout, progress on stderr."""
    script = Path(sys.executable).with_name("edge-compress")
    out = tmp_path / "models" / "digits"
    done = subprocess.run(
        [
            str(script),
            "ladder",
            str(digits_gemm),
            "--out",
            str(out),
            "--calib",
            str(digits_calib),
            "--eval",
            str(digits_eval),
            "--prune-ratios",
            "0.5",
            "--no-plot",
            "--no-mixed",  # searched in tests/compressor/test_mixed.py; here the script
            "--no-per-tensor",  # tried in tests/compressor/test_ladder.py
            *FAST_TIMING,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("variant")
    assert "candidate_built" in done.stderr and "step=" in done.stderr
    assert read_manifest(out / MANIFEST_FILE).variants[0].name == "fp32"


def _two_rungs(tmp_path: Path) -> Path:
    """A folder whose manifest says both rungs take 100 ms: a 60-MatMul chain and one Mul."""
    build = tmp_path / "build"
    slow = onnx_models.slow_model(build / "slow.onnx", width=256, layers=60)
    fast = onnx_models.scale_model(build / "fast.onnx", width=256)
    folder = onnx_models.ladder_folder(
        tmp_path / "models" / "m",
        [("slow", slow), ("fast", fast)],
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 256]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 256]}],
    )
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    for entry, accuracy in zip(manifest["variants"], (0.97, 0.91), strict=True):
        entry["metrics"] = {"accuracy": accuracy, "latency_ms": 100.0, "custom": 7.0}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder


def test_retime_rewrites_the_latencies_and_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`retime` times the rungs on this machine: the chain comes out slower than the single
    Mul, the ratios are to the first rung, and accuracies, hashes and unknown figures stay."""
    folder = _two_rungs(tmp_path)
    before = read_manifest(folder / MANIFEST_FILE)
    assert main(["retime", str(folder), "--threads", "1", "--batch", "4", "--rounds", "1"]) == 0
    after = read_manifest(folder / MANIFEST_FILE)
    slow, fast = after.variants
    assert slow.metrics.latency_ms is not None and fast.metrics.latency_ms is not None
    assert fast.metrics.latency_ms < slow.metrics.latency_ms < 100.0
    extra = slow.metrics.model_extra or {}
    assert extra["latency_ratio"] == 1.0 and extra["custom"] == 7.0
    assert "batch_latency_ms" in extra
    assert [(v.sha256, v.metrics.accuracy) for v in after.variants] == [
        (v.sha256, v.metrics.accuracy) for v in before.variants
    ]
    out = capsys.readouterr().out
    assert "slow" in out and "100.000 ->" in out


def test_retime_with_a_sample_that_does_not_fit_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sample file whose input is named otherwise fails with one line and exit 1, and the
    manifest is left as it was."""
    folder = _two_rungs(tmp_path)
    before = (folder / MANIFEST_FILE).read_bytes()
    sample = tmp_path / "sample.npz"
    np.savez(sample, other=np.zeros((1, 256), np.float32))
    assert main(["retime", str(folder), "--sample", str(sample)]) == 1
    assert "missing input(s) ['x']" in capsys.readouterr().err
    assert (folder / MANIFEST_FILE).read_bytes() == before
