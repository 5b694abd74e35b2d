"""PyTorch models as the compressor's input: a `torch.export` program (`.pt2`) or a TorchScript
file (`.pt`, `.pth`, `.ts`) becomes an ONNX model with torch's own exporter, checked against
the PyTorch model on the example inputs, and is then laddered like any ONNX model.

torch is optional (the `train` extra) and imported only here, only when such a file is given.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import structlog

from compressor.data import LABELS
from compressor.errors import CompressorError, DataError, ModelLoadError

log = structlog.get_logger(__name__)

EXPORTED_PROGRAM_SUFFIXES = frozenset({".pt2"})
TORCHSCRIPT_SUFFIXES = frozenset({".pt", ".pth", ".ts"})
TORCH_SUFFIXES = EXPORTED_PROGRAM_SUFFIXES | TORCHSCRIPT_SUFFIXES
EXAMPLE_ROWS = 2  # rows of the data set used as example inputs (a batch > 1 keeps it free)


def is_torch_model(path: Path) -> bool:
    """Whether `path` names a PyTorch model file by its suffix."""
    return path.suffix in TORCH_SUFFIXES


def export_to_onnx(
    path: Path,
    out: Path,
    examples: Mapping[str, np.ndarray],
    output_names: Sequence[str] | None = None,
    *,
    tolerance: float = 1e-4,
) -> Path:
    """Export the PyTorch model at `path` to ONNX at `out`.

    `examples` are the model's positional inputs in order, named as the ONNX inputs will be
    (a calibration set's arrays); their leading dimension is exported as free. The ONNX
    model must answer as the PyTorch model does on them, within `tolerance`.
    """
    torch = _torch()
    if not examples:
        raise CompressorError(f"{path}: exporting needs example inputs (a --calib/--eval set)")
    names = list(examples)
    arrays = [np.ascontiguousarray(a[:EXAMPLE_ROWS]) for a in examples.values()]
    args = tuple(torch.from_numpy(a) for a in arrays)
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # torch warns about the futures of TorchScript and of its own exporters; the result
        # is checked against the PyTorch model below.
        warnings.simplefilter("ignore")
        exportable, module = _load(torch, path)
        with torch.no_grad():
            expected = _as_arrays(module(*args))
        outputs = list(output_names) if output_names else _default_outputs(len(expected))
        if len(outputs) != len(expected):
            raise CompressorError(
                f"{path}: the model has {len(expected)} outputs, {len(outputs)} names were given"
            )
        try:
            if path.suffix in EXPORTED_PROGRAM_SUFFIXES:
                torch.onnx.export(
                    exportable, args, str(out), dynamo=True, input_names=names,
                    output_names=outputs, verbose=False, report=False,
                )  # fmt: skip
            else:
                free = {name: {0: "batch"} for name in (*names, *outputs)}
                torch.onnx.export(
                    exportable, args, str(out), dynamo=False, input_names=names,
                    output_names=outputs, dynamic_axes=free, opset_version=17,
                )  # fmt: skip
        except Exception as exc:  # torch's exporters raise many unrelated types
            raise ModelLoadError(f"{path}: torch cannot export it to ONNX: {exc}") from exc
    _check_fidelity(path, out, dict(zip(names, arrays, strict=True)), expected, tolerance)
    log.info("torch_model_exported", source=str(path), onnx=str(out), inputs=names,
             outputs=outputs)  # fmt: skip
    return out


def examples_from_npz(path: Path) -> dict[str, np.ndarray]:
    """A data set's input arrays in file order (its labels left out): the model's positional
    inputs and their names."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files if name != LABELS}
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}: not a readable .npz file of named arrays ({exc})") from exc


def _torch() -> Any:
    try:
        import torch  # noqa: PLC0415 - the train extra is optional
    except ImportError as exc:
        raise CompressorError(
            "a PyTorch model needs torch: pip install 'edge-agent[compress,train]'"
        ) from exc
    return torch


def _load(torch: Any, path: Path) -> tuple[Any, Any]:
    """What the exporter takes, and a callable of the same model to compare with."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        if path.suffix in EXPORTED_PROGRAM_SUFFIXES:
            program = torch.export.load(str(path))
            return program, program.module()
        script = torch.jit.load(str(path), map_location="cpu").eval()
        return script, script
    except Exception as exc:  # torch raises RuntimeError, pickle and zip errors alike
        kind = "torch.export program" if path.suffix == ".pt2" else "TorchScript file"
        raise ModelLoadError(f"{path}: not a readable {kind}: {exc}") from exc


def _as_arrays(result: Any) -> list[np.ndarray]:
    items = result if isinstance(result, list | tuple) else [result]
    return [item.detach().cpu().numpy() for item in items]


def _default_outputs(count: int) -> list[str]:
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _check_fidelity(
    source: Path,
    onnx_path: Path,
    feeds: Mapping[str, np.ndarray],
    expected: Sequence[np.ndarray],
    tolerance: float,
) -> None:
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        got = session.run(None, dict(feeds))
    except Exception as exc:  # onnxruntime's exception types are not a stable API
        raise ModelLoadError(f"{source}: the exported ONNX model does not run: {exc}") from exc
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        if a.shape != b.shape or not np.allclose(a, b, rtol=tolerance, atol=tolerance):
            raise ModelLoadError(
                f"{source}: output {i} of the exported ONNX model differs from PyTorch's"
            )
