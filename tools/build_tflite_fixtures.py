"""Rebuild the converter-made TFLite fixtures in tests/agent/data/: small PyTorch networks
converted by litert-torch (and one weight-quantized by ai-edge-quantizer), so that the TFLite
check and the LiteRT runtime are tested on what a real converter writes, not only on the
models tests/tflite_models.py packs by hand.

The converter is heavy (torch, jax, transformers) and is not a dependency of this project:
run this in a throwaway venv, e.g.
    python3.11 -m venv /tmp/lt && /tmp/lt/bin/pip install torch litert-torch
    /tmp/lt/bin/python tools/build_tflite_fixtures.py
"""

from __future__ import annotations

from pathlib import Path

import litert_torch
import torch
from ai_edge_quantizer import quantizer, recipe

OUT = Path(__file__).resolve().parent.parent / "tests" / "agent" / "data"


class SmallCnn(torch.nn.Module):
    """Conv 3->8, ReLU, max-pool, FullyConnected to 10, softmax, on 1x3x16x16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 2)
        return torch.softmax(self.fc(h.flatten(1)), dim=-1)


class SmallMlp(torch.nn.Module):
    """64 -> 32 -> 10 with ReLU and softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(64, 32)
        self.b = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.b(torch.relu(self.a(x))), dim=-1)


def main() -> None:
    """Convert both networks and quantize the MLP's weights to int8."""
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    litert_torch.convert(SmallCnn().eval(), (torch.zeros(1, 3, 16, 16),)).export(
        str(OUT / "converted_cnn.tflite")
    )
    mlp = OUT / "converted_mlp.tflite"
    litert_torch.convert(SmallMlp().eval(), (torch.zeros(1, 64),)).export(str(mlp))
    qt = quantizer.Quantizer(str(mlp))
    qt.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    qt.quantize().export_model(str(OUT / "converted_mlp_int8w.tflite"), overwrite=True)


if __name__ == "__main__":
    main()
