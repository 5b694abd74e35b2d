"""What the demo builders write besides their model: a one-variant model folder (the
compressor builds the ladder from it) and a JSON request with one sample."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.manifest import Manifest, TensorSpec, Variant, VariantMetrics, write_manifest  # noqa: E402
from agent.repository import sha256_of  # noqa: E402


def write_fp32_folder(
    model_path: Path,
    description: str,
    input_shape: Sequence[int],
    output_shape: Sequence[int],
    accuracy: float,
) -> None:
    """The manifest of a folder holding one fp32 variant, `model_path`, measured at
    `accuracy` on held-out labels."""
    folder = model_path.parent
    manifest = Manifest(
        name=folder.name,
        description=description,
        inputs=[TensorSpec(name="input", datatype="FP32", shape=tuple(input_shape))],
        outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=tuple(output_shape))],
        variants=[
            Variant(
                name="fp32",
                file=model_path.name,
                sha256=sha256_of(model_path),
                precision="fp32",
                size_bytes=model_path.stat().st_size,
                metrics=VariantMetrics(accuracy=round(accuracy, 4), fidelity=1.0),
            )
        ],
    )
    write_manifest(manifest, folder / "manifest.json")


def write_request(path: Path, request_id: str, sample: np.ndarray, data: list[float]) -> None:
    """An Open Inference Protocol request for `sample` (one row), its values as `data`."""
    request = {
        "id": request_id,
        "inputs": [
            {"name": "input", "shape": list(sample.shape), "datatype": "FP32", "data": data}
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(request, separators=(",", ":")) + "\n")
