"""Small ONNX models and data sets that exercise the compressor, built from nothing.

No model or data set can be downloaded where the compressor is tested, so the tests and
`tools/bench_compress.py` build theirs here: a digits MLP in both export forms, a CNN whose
cost is in its convolutions, and the awkward shapes real exports take (weights in Constant
nodes, weights inside an If branch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

OPSET = 17
ZERO = np.array(0.0, np.float32)


@dataclass(frozen=True)
class DigitsData:
    """The digits set scaled to [0, 1], split for training, calibration and evaluation."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray


def digits_data(seed: int = 0) -> DigitsData:
    """Split sklearn's bundled 8x8 digits: 60% train, 10% calibration, 30% evaluation."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, train_size=0.6, random_state=seed, stratify=y
    )
    x_calib, x_eval, _, y_eval = train_test_split(
        x_rest, y_rest, train_size=0.25, random_state=seed, stratify=y_rest
    )
    return DigitsData(x_train, y_train.astype(np.int64), x_calib, x_eval, y_eval.astype(np.int64))


def train_digits_mlp(data: DigitsData, hidden: int = 100, seed: int = 0) -> MLPClassifier:
    """A one-hidden-layer ReLU classifier on the digits, as the demo model is trained."""
    model = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=400, random_state=seed)
    model.fit(data.x_train, data.y_train)
    return model


def digits_gemm_model(mlp: MLPClassifier, trans_b: bool = True) -> onnx.ModelProto:
    """The demo form: input FP32 [-1,64] -> Gemm -> Relu -> Gemm -> Softmax -> probabilities."""
    w1, w2 = (np.asarray(w, dtype=np.float32) for w in mlp.coefs_)
    b1, b2 = (np.asarray(b, dtype=np.float32) for b in mlp.intercepts_)
    if trans_b:  # torch.onnx stores [out, in] with transB=1; sklearn's coefs are [in, out]
        w1, w2 = w1.T.copy(), w2.T.copy()
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "w1", "b1"], ["h"], transB=int(trans_b)),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], transB=int(trans_b)),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [-1, 10])],
        [
            numpy_helper.from_array(a, n)
            for a, n in zip((w1, b1, w2, b2), ("w1", "b1", "w2", "b2"), strict=True)
        ],
    )
    return _finish(graph)


def digits_skl2onnx_model(mlp: MLPClassifier) -> onnx.ModelProto:
    """skl2onnx's own export: MatMul+Add layers, a label and a probabilities output."""
    sample = np.zeros((1, 64), dtype=np.float32)
    model: onnx.ModelProto = to_onnx(
        mlp, sample, options={id(mlp): {"zipmap": False}}, target_opset=OPSET
    )
    return model


def cnn_model(
    channels: tuple[int, ...] = (32, 64, 64),
    size: int = 64,
    classes: int = 10,
    seed: int = 0,
    stem_stride: int = 1,
) -> onnx.ModelProto:
    """A conv classifier on 1x3xSxS: (Conv3x3 -> BatchNorm -> Relu -> MaxPool) per stage.

    With `stem_stride` > 1 the first conv is a strided stem without pooling, as in ResNet
    or YOLO, so the cost sits in the 3x3 convs over many channels rather than in a
    3-channel conv at full resolution. Weights are random but He-scaled and BatchNorm keeps
    activations at unit scale: fidelity is measured against fp32, so the network need not
    be trained, only numerically realistic.
    """
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    prev, cin = "input", 3
    for i, cout in enumerate(channels):
        w = rng.normal(0, np.sqrt(2.0 / (cin * 9)), (cout, cin, 3, 3)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"conv{i}.w"),
            numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), f"conv{i}.b"),
            numpy_helper.from_array(rng.uniform(0.5, 1.5, cout).astype(np.float32), f"bn{i}.g"),
            numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), f"bn{i}.beta"),
            numpy_helper.from_array(rng.normal(0, 0.1, cout).astype(np.float32), f"bn{i}.mean"),
            numpy_helper.from_array(rng.uniform(0.5, 1.5, cout).astype(np.float32), f"bn{i}.var"),
        ]
        stride = stem_stride if i == 0 else 1
        nodes += [
            helper.make_node(
                "Conv",
                [prev, f"conv{i}.w", f"conv{i}.b"],
                [f"c{i}"],
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            ),
            helper.make_node(
                "BatchNormalization",
                [f"c{i}", f"bn{i}.g", f"bn{i}.beta", f"bn{i}.mean", f"bn{i}.var"],
                [f"n{i}"],
            ),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"]),
        ]
        prev, cin = f"r{i}", cout
        if stride == 1:
            nodes.append(
                helper.make_node("MaxPool", [prev], [f"p{i}"], kernel_shape=[2, 2], strides=[2, 2])
            )
            prev = f"p{i}"
    fc = rng.normal(0, np.sqrt(1.0 / cin), (cin, classes)).astype(np.float32)
    inits += [
        numpy_helper.from_array(fc, "fc.w"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fc.b"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [-1, classes])],
        inits,
    )
    return _finish(graph)


def image_batch(count: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth random images (low-frequency noise) so conv activations look like real ones."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0, 1, (count, 3, size // 8, size // 8)).astype(np.float32)
    images = coarse.repeat(8, axis=2).repeat(8, axis=3)
    images += rng.normal(0, 0.2, images.shape).astype(np.float32)
    return images


def constant_weights_model(seed: int = 0) -> onnx.ModelProto:
    """An MLP whose weights live in Constant nodes, as Paddle exports them."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (16, 32)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (32, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "w1")),
        helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w2, "w2")),
        helper.make_node("MatMul", ["input", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "constants",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [-1, 4])],
    )
    return _finish(graph)


def if_subgraph_model(seed: int = 0) -> onnx.ModelProto:
    """A model whose only weights sit inside the branches of an If node."""
    rng = np.random.default_rng(seed)

    def branch(name: str) -> onnx.GraphProto:
        w = rng.normal(0, 0.3, (16, 4)).astype(np.float32)
        return helper.make_graph(
            [helper.make_node("MatMul", ["input", f"{name}.w"], [f"{name}.out"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}.out", TensorProto.FLOAT, [-1, 4])],
            [numpy_helper.from_array(w, f"{name}.w")],
        )

    nodes = [
        helper.make_node("ReduceSum", ["input"], ["total"], keepdims=0),
        helper.make_node(
            "Constant",
            [],
            ["zero"],
            value=numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        ),
        helper.make_node("Greater", ["total", "zero"], ["positive"]),
        helper.make_node(
            "If",
            ["positive"],
            ["output"],
            then_branch=branch("then"),
            else_branch=branch("else"),
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [-1, 4])],
    )
    return _finish(graph)


def outlier_mlp_model(seed: int = 0) -> onnx.ModelProto:
    """A 4-layer MLP where one hidden channel runs 1000x hotter than the rest.

    The next layer scales that channel back down, so the function is ordinary, but an
    int8 per-tensor activation range sized for the outlier crushes every other channel:
    the two layers touching that tensor are far more sensitive than the others.
    """
    rng = np.random.default_rng(seed)
    shapes = [(16, 32), (32, 32), (32, 32), (32, 4)]
    weights = [rng.normal(0, 1 / np.sqrt(s[0]), s).astype(np.float32) for s in shapes]
    weights[0][:, 0] *= 1000.0
    weights[1][0, :] /= 1000.0
    nodes: list[onnx.NodeProto] = []
    prev = "input"
    for i in range(len(shapes)):
        last = i == len(shapes) - 1
        out = "output" if last else f"h{i + 1}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i + 1}"], [out], name=f"layer{i + 1}"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"a{i + 1}"], name=f"relu{i + 1}"))
            prev = f"a{i + 1}"
    graph = helper.make_graph(
        nodes,
        "outlier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [-1, 4])],
        [numpy_helper.from_array(w, f"w{i + 1}") for i, w in enumerate(weights)],
    )
    return _finish(graph)


def map_model(size: int = 32, width: int = 16, seed: int = 0, hot: float = 3e6) -> onnx.ModelProto:
    """A segmentation-style net: conv stages, a skip Concat, a one-channel sigmoid map.

    One channel of the middle activation runs about `hot` times wider than the rest (as
    text detectors' unnormalised features do) and the next conv scales it back down: the
    function is ordinary, but float16 overflows on that tensor where it enters the Concat
    (which onnxruntime runs in float16 on a CPU), and an int8 per-tensor range sized for it
    crushes every other channel.
    """
    rng = np.random.default_rng(seed)
    shapes = {"stem": (width, 3), "wide": (width, width), "mix": (width, 2 * width)}
    shapes["head"] = (1, width)
    weights = {
        name: rng.normal(0, np.sqrt(2.0 / (cin * 9)), (cout, cin, 3, 3)).astype(np.float32)
        for name, (cout, cin) in shapes.items()
    }
    weights["wide"][0] = np.abs(weights["wide"][0]) * hot  # channel 0: positive and huge
    weights["mix"][:, 0] /= hot
    weights["head"] *= 4.0  # a confident map: most pixels near 0 or 1, as a trained one is
    inits: list[TensorProto] = []
    for name, w in weights.items():
        bias = rng.normal(0, 0.1, w.shape[0]).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"{name}.w"),
            numpy_helper.from_array(bias, f"{name}.b"),
        ]

    def conv(name: str, source: str, out: str) -> onnx.NodeProto:
        return helper.make_node(
            "Conv", [source, f"{name}.w", f"{name}.b"], [out], name=name, pads=[1, 1, 1, 1]
        )

    nodes = [
        conv("stem", "input", "stem"),
        helper.make_node("Relu", ["stem"], ["stem.r"], name="stem.relu"),
        conv("wide", "stem.r", "wide"),
        helper.make_node("Relu", ["wide"], ["wide.r"], name="wide.relu"),
        helper.make_node("Concat", ["wide.r", "stem.r"], ["skip"], name="skip", axis=1),
        conv("mix", "skip", "mix"),
        helper.make_node("Relu", ["mix"], ["mix.r"], name="mix.relu"),
        conv("head", "mix.r", "logits"),
        helper.make_node("Sigmoid", ["logits"], ["map"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "map",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 3, size, size])],
        [helper.make_tensor_value_info("map", TensorProto.FLOAT, [-1, 1, size, size])],
        inits,
    )
    return _finish(graph)


def upsample(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of [N, 8, 8] images to [N, 1, size, size] (align-corners grid)."""
    side = images.shape[-1]
    grid = np.linspace(0.0, side - 1.0, size)
    low = np.clip(np.floor(grid).astype(int), 0, side - 2)
    frac = grid - low
    matrix = np.zeros((size, side))
    matrix[np.arange(size), low] = 1.0 - frac
    matrix[np.arange(size), low + 1] += frac
    scaled = np.einsum("ij,njk,lk->nil", matrix, images.astype(np.float64), matrix)
    return scaled[:, None].astype(np.float32)


@dataclass(frozen=True)
class ImageDigits:
    """The digits upsampled to images [N, 1, S, S] in [0, 1], split as `digits_data`."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray


def image_digits(size: int = 16, seed: int = 0) -> ImageDigits:
    """`digits_data` as upsampled images, for the conv test models."""
    data = digits_data(seed)

    def image(x: np.ndarray) -> np.ndarray:
        return upsample(x.reshape(-1, 8, 8), size)

    return ImageDigits(
        image(data.x_train), data.y_train, image(data.x_calib), image(data.x_eval), data.y_eval
    )


def residual_cnn_model(data: ImageDigits, width: int = 16, seed: int = 0) -> onnx.ModelProto:
    """A small CNN with the blocks real detectors are made of, its head trained on digits.

    stem conv; a residual block (two convs and an Add back onto the stem); a C2f-style
    block (a conv whose output is Split in two, one half through another conv, the three
    Concatenated and mixed by a conv); global pool and a Gemm head. The convs keep their
    random He-scaled weights and the head is fitted by logistic regression on their
    features: trained a little, so that removing channels really costs accuracy.
    """
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []

    def conv(name: str, source: str, cin: int, cout: int, out: str) -> list[onnx.NodeProto]:
        w = rng.normal(0, np.sqrt(2.0 / (cin * 9)), (cout, cin, 3, 3)).astype(np.float32)
        inits.extend(
            [
                numpy_helper.from_array(w, f"{name}.w"),
                numpy_helper.from_array(rng.normal(0, 0.05, cout).astype(np.float32), f"{name}.b"),
            ]
        )
        return [
            helper.make_node(
                "Conv",
                [source, f"{name}.w", f"{name}.b"],
                [f"{name}.c"],
                name=name,
                pads=[1, 1, 1, 1],
            ),
            helper.make_node("Relu", [f"{name}.c"], [out], name=f"{name}.relu"),
        ]

    half = width
    inits.append(numpy_helper.from_array(np.array([half, half], np.int64), "split.sizes"))
    nodes = [
        *conv("stem", "input", 1, width, "t0"),
        *conv("res1", "t0", width, width, "r1"),
        helper.make_node(
            "Conv", ["r1", "res2.w", "res2.b"], ["r2"], name="res2", pads=[1, 1, 1, 1]
        ),
        helper.make_node("Add", ["r2", "t0"], ["sum"], name="residual"),
        helper.make_node("Relu", ["sum"], ["t1"], name="residual.relu"),
        helper.make_node(
            "MaxPool", ["t1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        *conv("c2f", "p1", width, 2 * half, "c"),
        helper.make_node("Split", ["c", "split.sizes"], ["a", "b"], name="split", axis=1),
        *conv("inner", "b", half, half, "m"),
        helper.make_node("Concat", ["a", "b", "m"], ["cat"], name="concat", axis=1),
        *conv("mix", "cat", 3 * half, 2 * width, "t2"),
        helper.make_node("GlobalAveragePool", ["t2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["features"], name="flatten"),
    ]
    w2 = rng.normal(0, np.sqrt(1.0 / (width * 9)), (width, width, 3, 3)).astype(np.float32)
    inits += [
        numpy_helper.from_array(w2, "res2.w"),
        numpy_helper.from_array(np.zeros(width, np.float32), "res2.b"),
    ]
    size = data.x_train.shape[-1]
    features = helper.make_graph(
        nodes,
        "residual-features",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 1, size, size])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [-1, 2 * width])],
        inits,
    )
    import onnxruntime as ort  # noqa: PLC0415 -- only to fit the head on the conv features
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    session = ort.InferenceSession(
        _finish(features).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    train = session.run(None, {"input": data.x_train})[0]
    head = LogisticRegression(max_iter=2000, random_state=seed).fit(train, data.y_train)
    inits += [
        numpy_helper.from_array(head.coef_.T.astype(np.float32).copy(), "fc.w"),
        numpy_helper.from_array(head.intercept_.astype(np.float32), "fc.b"),
    ]
    nodes += [
        helper.make_node("Gemm", ["features", "fc.w", "fc.b"], ["logits"], name="fc"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 1, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [-1, 10])],
        inits,
    )
    return _finish(graph)


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Check and write a model; returns the path for chaining in fixtures."""
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by every onnxruntime the agent supports (>= 1.17)
    return model
