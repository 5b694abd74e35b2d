#!/usr/bin/env python3
"""Build the adapting demo's model: a CNN trained on scikit-learn's digits, seen in the wild.

The 8x8 digits are scaled up (bilinear) to 64x64 images, then each is drawn at a random
size (55-100% of the frame), angle (+-30 degrees) and place, under sensor noise: a task on which
accuracy costs compute, so that the compressor's lighter rungs are cheaper *and* less
accurate, and adapting has a real trade to make. The convolutions cost real time: the fp32
model runs in several milliseconds at batch 1 on two threads, enough for two busy loops to
push it over a latency objective and for a lighter rung to bring it back.
Writes `--out/fp32.onnx` (+ a one-variant manifest), the request files
`tools/requests/digits-cnn{.json,.npz,-1.npz}` and the compressor's data into `--data`:
`calib.npz` (augmented training images) and `eval.npz` (held-out digits, each drawn
`EVAL_DRAWS` times, with labels; noise does not compress, so they are rebuilt, not
committed); `tools/build_demo_ladder.sh` then builds the committed ladder
`models/digits-cnn/`.
Trains with PyTorch: needs the `train` extra (`pip install -e '.[compress,train]'`); the
agent and the test suite only read the committed result. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compress_models import upsample  # noqa: E402 -- tools/ is on the path as the script's home
from demo_files import write_fp32_folder, write_request  # noqa: E402

SIZE = 64
# Output channels of the 3x3 convolutions, and which of them a 2x2 max-pool follows: three
# stages of two, so that the last layer sees most of the image before the global pool.
CHANNELS = (64, 64, 128, 128, 256, 256)
POOLED = (False, True, False, True, False, True)
BATCH = 64
CLASSES = 10
EVAL_DRAWS = 4  # random drawings of each held-out digit: 1,440 images to measure rungs by
CALIB_IMAGES = 1024
# How a digit is drawn: its size (a share of the frame), its angle and the sensor noise (a
# standard deviation, in units of a full-scale pixel). Turned, shrunk and noisy enough that
# the narrower rungs lose points of accuracy, not noise in the figures. (Smaller, more
# turned and noisier digits, 35-75% at +-40 degrees under 0.5 of noise, were tried: every
# rung lost about 11 points, and the gaps between them stayed as they are here.)
SIZES = (0.55, 1.0)
ANGLE_DEG = 30.0
NOISE = 0.25


def draw(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image [N, 1, S, S] in 0..1 drawn at a random size, angle and place, plus noise
    (torch tensors in and out; a seeded `generator` makes it reproducible)."""
    import torch  # noqa: PLC0415 -- only the builder needs it (the `train` extra)
    from torch import nn  # noqa: PLC0415

    n = len(images)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(ANGLE_DEG)
    scale = SIZES[0] + torch.rand(n, generator=generator) * (SIZES[1] - SIZES[0])
    room = 1 - scale  # how far the digit can move and stay in the frame
    tx = (torch.rand(n, generator=generator) * 2 - 1) * room
    ty = (torch.rand(n, generator=generator) * 2 - 1) * room
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid maps output to input coordinates: the inverse of the drawing.
    theta = torch.stack(
        [
            torch.stack([cos, -sin, -(cos * tx - sin * ty)], 1),
            torch.stack([sin, cos, -(sin * tx + cos * ty)], 1),
        ],
        1,
    )
    grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    drawn = nn.functional.grid_sample(images, grid, align_corners=False)
    noise = torch.randn(drawn.shape, generator=generator) * NOISE
    return (drawn + noise).clamp(0.0, 1.0)


def split(seed: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """80/20 stratified split of the digits, upsampled; pixel values stay 0..16."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )
    return upsample(x_train, size), upsample(x_test, size), y_train, y_test


def train(x: np.ndarray, y: np.ndarray, seed: int, epochs: int) -> dict[str, np.ndarray]:
    """Train the CNN with Adam on randomly shifted images; returns its weights by name.

    Trained with BatchNormalization after each convolution (it trains in a few epochs
    where the plain net stalls), folded into the convolutions for export.
    """
    import torch  # noqa: PLC0415 -- only the builder needs it (the `train` extra)
    from torch import nn  # noqa: PLC0415

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    inputs = 1
    for width, pooled in zip(CHANNELS, POOLED, strict=True):
        layers += [nn.Conv2d(inputs, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        if pooled:
            layers.append(nn.MaxPool2d(2))
        inputs = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, CLASSES)]
    net = nn.Sequential(*layers)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    steps = epochs * -(-len(x) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    images = torch.from_numpy(x / 16.0)
    labels = torch.from_numpy(y.astype(np.int64))
    generator = torch.Generator().manual_seed(seed + 1)
    net.train()
    started = time.monotonic()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for start in range(0, len(order), BATCH):
            index = order[start : start + BATCH]
            batch = draw(images[index], generator)
            loss = nn.functional.cross_entropy(net(batch), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
        took = time.monotonic() - started
        left = took / (epoch + 1) * (epochs - epoch - 1)
        print(
            f"epoch {epoch + 1}/{epochs}: loss {total / len(images):.4f} "
            f"({took:.0f} s, about {left:.0f} s left)",
            file=sys.stderr,
        )
    net.eval()
    weights: dict[str, np.ndarray] = {}
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    norms = [m for m in net if isinstance(m, nn.BatchNorm2d)]
    for i, (conv, norm) in enumerate(zip(convs, norms, strict=True)):
        assert conv.bias is not None and norm.running_var is not None
        assert norm.running_mean is not None
        scale = (norm.weight / torch.sqrt(norm.running_var + norm.eps)).detach().numpy()
        weight = conv.weight.detach().numpy() * scale[:, None, None, None]
        bias = (conv.bias.detach().numpy() - norm.running_mean.numpy()) * scale
        bias = bias + norm.bias.detach().numpy()
        if i == 0:
            weight = weight / 16.0  # the model takes raw 0..16 pixels: fold the scaling in
        weights[f"conv{i}.weight"] = weight
        weights[f"conv{i}.bias"] = bias
    head = next(m for m in net if isinstance(m, nn.Linear))
    weights["fc.weight"] = head.weight.detach().numpy().T.copy()
    weights["fc.bias"] = head.bias.detach().numpy()
    return {k: _flush_subnormals(v) for k, v in weights.items()}


def _flush_subnormals(array: np.ndarray) -> np.ndarray:
    # Subnormal weights run in microcode on x86 (see build_demo_model.py): never ship any.
    out = array.astype(np.float32)
    out[np.abs(out) < np.finfo(np.float32).tiny] = 0.0
    return out


def to_onnx(weights: dict[str, np.ndarray], size: int) -> onnx.ModelProto:
    """Conv/Relu/MaxPool blocks, global average pool, Gemm, Softmax: plain opset-17 ONNX."""
    nodes: list[onnx.NodeProto] = []
    tensor = "input"
    for i, pooled in enumerate(POOLED):
        nodes.append(
            helper.make_node(
                "Conv",
                [tensor, f"conv{i}.weight", f"conv{i}.bias"],
                [f"conv{i}"],
                name=f"conv{i}",
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        tensor = f"relu{i}"
        if pooled:
            nodes.append(
                helper.make_node(
                    "MaxPool",
                    [tensor],
                    [f"pool{i}"],
                    name=f"pool{i}",
                    kernel_shape=[2, 2],
                    strides=[2, 2],
                )
            )
            tensor = f"pool{i}"
    nodes += [
        helper.make_node("GlobalAveragePool", [tensor], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["features"], name="flatten", axis=1),
        helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits-cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edge-agent-demo"
    )
    model.ir_version = 8  # readable by every onnxruntime since 1.10
    onnx.checker.check_model(model, full_check=True)
    return model


def drawn(images: np.ndarray, seed: int) -> np.ndarray:
    """`images` (0..16) each drawn once by `draw`, reproducibly for `seed`; 0..16 again."""
    import torch  # noqa: PLC0415 -- only the builder needs it (the `train` extra)

    generator = torch.Generator().manual_seed(seed)
    out = draw(torch.from_numpy(images / 16.0), generator) * 16.0
    return np.asarray(out.numpy(), dtype=np.float32)


def _accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort  # noqa: PLC0415 -- a check of the export, not the agent's path

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {"input": x})[0]
    return float(np.mean(np.argmax(probabilities, axis=1) == y))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for fp32.onnx")
    parser.add_argument("--requests", type=Path, default=ROOT / "tools" / "requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=SIZE, help="image side after upsampling")
    parser.add_argument("--data", type=Path, required=True, help="folder for calib/eval.npz")
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args(argv)

    x_train, x_test, y_train, y_test = split(args.seed, args.size)
    model = to_onnx(train(x_train, y_train, args.seed, args.epochs), args.size)
    # Held-out digits drawn EVAL_DRAWS times each: the accuracy every rung is measured by.
    x_eval = drawn(np.concatenate([x_test] * EVAL_DRAWS), args.seed + 2)
    y_eval = np.concatenate([y_test] * EVAL_DRAWS)
    accuracy = _accuracy(model, x_eval, y_eval)
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / "fp32.onnx"
    onnx.save(model, model_path)
    write_fp32_folder(
        model_path,
        f"digit classifier CNN; input: a {args.size}x{args.size} image, 0..16, a digit drawn "
        "at any size, angle and place, with noise.",
        (-1, 1, args.size, args.size),
        (-1, CLASSES),
        accuracy,
    )
    # The request files ask the same question in JSON and in binary: values rounded alike.
    sample = np.round(x_eval[:8], 3)
    write_request(
        args.requests / "digits-cnn.json",
        "digit-cnn-1",
        sample[:1],
        [float(v) for v in sample[0].reshape(-1)],
    )
    np.savez_compressed(args.requests / "digits-cnn.npz", input=sample, labels=y_eval[:8])
    # One image, binary: what `edge-agent infer --rate` streams in the README's example.
    np.savez_compressed(args.requests / "digits-cnn-1.npz", input=sample[:1], labels=y_eval[:1])
    args.data.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.data / "eval.npz", input=x_eval, labels=y_eval)
    calib = np.resize(x_train, (CALIB_IMAGES, *x_train.shape[1:]))
    np.savez_compressed(args.data / "calib.npz", input=drawn(calib, args.seed + 3))
    print(
        f"wrote {model_path} (accuracy {accuracy:.4f} on {len(y_eval)} drawn held-out "
        f"digits); first sample is a {y_eval[0]}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
