#!/usr/bin/env python3
"""Build the demo model: a small MLP trained on scikit-learn's bundled digits data set.

Writes `models/digits/` (manifest.json + fp32.onnx), sample requests under
`tools/requests/`, and the data the compressor needs: `digits-calib.npz` (training images)
and `digits-eval.npz` (held-out images with labels). `tools/build_demo_ladder.sh` then
turns the model into the committed ladder of variants. The graph is plain ONNX
(Gemm -> Relu -> Gemm -> Softmax) taking raw 8x8 pixel values 0..16 as 64 floats, so that a
request can be typed by hand.
Needs the `compress` extra (scikit-learn, onnx). Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo_files import write_fp32_folder, write_request  # noqa: E402


def train(
    seed: int, hidden: int
) -> tuple[MLPClassifier, float, np.ndarray, np.ndarray, np.ndarray]:
    """Train on 80% of digits: the classifier, its test accuracy, the test split and the
    training images (calibration data for the compressor)."""
    digits = load_digits()
    x = digits.data.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=400, random_state=seed)
    clf.fit(x_train / 16.0, y_train)
    accuracy = float(clf.score(x_test / 16.0, y_test))
    return clf, accuracy, x_test, y_test, x_train


def _flush_subnormals(array: np.ndarray) -> np.ndarray:
    """float32 copy with subnormal values set to zero.

    scikit-learn's training leaves a few weights below float32's smallest normal number;
    the CPU handles those in microcode, which made the fp32 model about 4x slower at
    batch 64 than the same model without them (measured by the compressor's benchmark).
    """
    single = array.astype(np.float32)
    single[np.abs(single) < np.finfo(np.float32).tiny] = 0.0
    return single


def to_onnx(clf: MLPClassifier) -> onnx.ModelProto:
    """Export the MLP as Gemm/Relu/Gemm/Softmax, folding the /16 pixel scaling into W1."""
    # The /16 pixel scaling is folded in before flushing: it can itself make subnormals.
    w1, w2 = _flush_subnormals(clf.coefs_[0] / 16.0), _flush_subnormals(clf.coefs_[1])
    b1, b2 = (_flush_subnormals(b) for b in clf.intercepts_)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(b2, "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["hidden_pre"], name="fc1"),
        helper.make_node("Relu", ["hidden_pre"], ["hidden"], name="relu1"),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edge-agent-demo"
    )
    model.ir_version = 8  # readable by every onnxruntime since 1.10
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "digits")
    parser.add_argument("--requests", type=Path, default=ROOT / "tools" / "requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=128)
    args = parser.parse_args(argv)

    clf, accuracy, x_test, y_test, x_train = train(args.seed, args.hidden)
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / "fp32.onnx"
    onnx.save(to_onnx(clf), model_path)
    write_fp32_folder(
        model_path,
        "8x8 digit classifier (scikit-learn digits); input: 64 pixel values 0..16.",
        (-1, 64),
        (-1, 10),
        accuracy,
    )
    one = x_test[:1]
    write_request(args.requests / "digits.json", "digit-1", one, [int(v) for v in one.reshape(-1)])
    np.savez(args.requests / "digits.npz", input=x_test[:8], labels=y_test[:8])
    np.savez(args.requests / "digits-eval.npz", input=x_test, labels=y_test)
    np.savez(args.requests / "digits-calib.npz", input=x_train[:512])
    print(f"wrote {model_path} (test accuracy {accuracy:.4f}); first sample is a {y_test[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
