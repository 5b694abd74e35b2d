"""Small ONNX models and data sets that exercise the compressor, built from nothing.

No model or data set can be downloaded where the compressor is tested, so the tests and
`tools/bench_compress.py` build theirs here: a digits MLP in both export forms, a CNN whose
cost is in its convolutions, and the awkward shapes real exports take (weights in Constant
nodes, weights inside an If branch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import structlog
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

log = structlog.get_logger(__name__)

OPSET = 17
ZERO = np.array(0.0, np.float32)
TRAIN_BATCH = 32  # rows per step when the residual CNN is trained


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


def detector_model(
    size: int = 32, width: int = 16, classes: int = 3, seed: int = 0
) -> onnx.ModelProto:
    """A YOLOv8-style head in miniature: output [rows, 4 + classes, cells], one box per cell.

    Two stride-2 convs, then a 1x1 conv predicting per cell a box (centre offset within the
    cell and size, both through Sigmoid, scaled to pixels and added to the cell's centre)
    and class scores (Sigmoid, biased low so that only a few cells clear the 0.25 threshold,
    as in a real detector's output). Random weights: the box metric compares variants with
    the original, so the boxes need only be plausible.
    """
    rng = np.random.default_rng(seed)
    cells_side = size // 4
    cells = cells_side * cells_side
    attrs = 4 + classes
    centres = (np.arange(cells_side) + 0.5) * 4.0
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    offset = np.zeros((1, 4, cells), np.float32)
    offset[0, 0], offset[0, 1] = cx.reshape(-1) - 4.0, cy.reshape(-1) - 4.0
    offset[0, 2:] = 2.0
    scale = np.array([8.0, 8.0, 12.0, 12.0], np.float32).reshape(1, 4, 1)
    head_bias = np.concatenate([np.zeros(4), np.full(classes, -2.5)]).astype(np.float32)
    inits = [
        numpy_helper.from_array(
            rng.normal(0, np.sqrt(2 / 27), (width, 3, 3, 3)).astype(np.float32), "c1.w"
        ),
        numpy_helper.from_array(
            rng.normal(0, np.sqrt(2 / (9 * width)), (width, width, 3, 3)).astype(np.float32),
            "c2.w",
        ),
        numpy_helper.from_array(
            rng.normal(0, 1.5 / np.sqrt(width), (attrs, width, 1, 1)).astype(np.float32), "head.w"
        ),
        numpy_helper.from_array(head_bias, "head.b"),
        numpy_helper.from_array(np.array([0, attrs, cells], np.int64), "flat"),
        numpy_helper.from_array(np.array([4, classes], np.int64), "parts"),
        numpy_helper.from_array(scale, "scale"),
        numpy_helper.from_array(offset, "offset"),
    ]
    conv = {"pads": [1, 1, 1, 1], "strides": [2, 2]}
    nodes = [
        helper.make_node("Conv", ["input", "c1.w"], ["c1"], name="c1", **conv),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("Conv", ["r1", "c2.w"], ["c2"], name="c2", **conv),
        helper.make_node("Relu", ["c2"], ["r2"], name="r2"),
        helper.make_node("Conv", ["r2", "head.w", "head.b"], ["raw"], name="head"),
        helper.make_node("Reshape", ["raw", "flat"], ["grid"], name="flatten"),
        helper.make_node("Split", ["grid", "parts"], ["box", "cls"], name="split", axis=1),
        helper.make_node("Sigmoid", ["box"], ["box.s"], name="box.sigmoid"),
        helper.make_node("Mul", ["box.s", "scale"], ["box.px"], name="box.scale"),
        helper.make_node("Add", ["box.px", "offset"], ["xywh"], name="box.place"),
        helper.make_node("Sigmoid", ["cls"], ["scores"], name="cls.sigmoid"),
        helper.make_node("Concat", ["xywh", "scores"], ["output0"], name="concat", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [-1, attrs, cells])],
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


def residual_cnn_model(
    data: ImageDigits, width: int = 16, seed: int = 0, epochs: int = 0, stem_stride: int = 1
) -> onnx.ModelProto:
    """A small CNN with the blocks real detectors are made of, trained on the digits.

    stem conv; a residual block (two convs and an Add back onto the stem); a C2f-style
    block (a conv whose output is Split in two, one half through another conv, the three
    Concatenated and mixed by a conv); global pool and a Gemm head. With `epochs` 0 the
    convs keep random He-scaled weights and only the head is fitted (logistic regression
    on their features): quick, for the tests. With `epochs` > 0 the whole net is trained
    on the labels with PyTorch (the `train` extra), as a real one would be: its channels
    then carry what it learnt, so removing them really costs accuracy. A `stem_stride` of 2
    makes the stem a strided one, as in ResNet or YOLO (a quarter of the work per image).
    """
    shape = _ResidualShape(width, data.x_train.shape[-1], stem_stride)
    weights = _residual_weights(width, seed)
    if epochs:
        weights = _trained_residual_weights(weights, data, shape, epochs, seed)
    else:
        weights |= _fitted_head(weights, data, shape, seed)
    return _finish(_residual_graph(weights, shape))


@dataclass(frozen=True)
class _ResidualShape:
    width: int
    size: int  # the input images' side
    stem_stride: int


def _residual_layers(width: int) -> dict[str, tuple[int, int]]:
    """Each conv's (input, output) channels."""
    return {
        "stem": (1, width),
        "res1": (width, width),
        "res2": (width, width),
        "c2f": (width, 2 * width),
        "inner": (width, width),
        "mix": (3 * width, 2 * width),
    }


def _residual_weights(width: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    for name, (cin, cout) in _residual_layers(width).items():
        weights[f"{name}.w"] = rng.normal(0, np.sqrt(2.0 / (cin * 9)), (cout, cin, 3, 3))
        weights[f"{name}.b"] = rng.normal(0, 0.05, cout)
    # The residual branch starts near zero, so the block starts as the identity.
    weights["res2.w"] = weights["res2.w"] / 3.0
    weights["res2.b"] = np.zeros(width)
    weights["fc.w"] = np.zeros((2 * width, 10))
    weights["fc.b"] = np.zeros(10)
    return {k: v.astype(np.float32) for k, v in weights.items()}


def _residual_graph(weights: dict[str, np.ndarray], shape: _ResidualShape) -> onnx.GraphProto:
    width, size = shape.width, shape.size

    def conv(name: str, source: str, out: str, relu: bool = True) -> list[onnx.NodeProto]:
        stride = shape.stem_stride if name == "stem" else 1
        node = helper.make_node(
            "Conv",
            [source, f"{name}.w", f"{name}.b"],
            [f"{name}.c" if relu else out],
            name=name,
            pads=[1, 1, 1, 1],
            strides=[stride, stride],
        )
        if not relu:
            return [node]
        return [node, helper.make_node("Relu", [f"{name}.c"], [out], name=f"{name}.relu")]

    nodes = [
        *conv("stem", "input", "t0"),
        *conv("res1", "t0", "r1"),
        *conv("res2", "r1", "r2", relu=False),
        helper.make_node("Add", ["r2", "t0"], ["sum"], name="residual"),
        helper.make_node("Relu", ["sum"], ["t1"], name="residual.relu"),
        helper.make_node(
            "MaxPool", ["t1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        *conv("c2f", "p1", "c"),
        helper.make_node("Split", ["c", "split.sizes"], ["a", "b"], name="split", axis=1),
        *conv("inner", "b", "m"),
        helper.make_node("Concat", ["a", "b", "m"], ["cat"], name="concat", axis=1),
        *conv("mix", "cat", "t2"),
        helper.make_node("GlobalAveragePool", ["t2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["features"], name="flatten"),
        helper.make_node("Gemm", ["features", "fc.w", "fc.b"], ["logits"], name="fc"),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in weights.items()]
    inits.append(numpy_helper.from_array(np.array([width, width], np.int64), "split.sizes"))
    return helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [-1, 1, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [-1, 10])],
        inits,
    )


def _fitted_head(
    weights: dict[str, np.ndarray], data: ImageDigits, shape: _ResidualShape, seed: int
) -> dict[str, np.ndarray]:
    """The Gemm head fitted by logistic regression on the random convs' pooled features."""
    import onnxruntime as ort  # noqa: PLC0415 -- only to fit the head on the conv features
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415

    graph = _residual_graph(weights, shape)
    del graph.output[:]
    graph.output.append(
        helper.make_tensor_value_info("features", TensorProto.FLOAT, [-1, 2 * shape.width])
    )
    session = ort.InferenceSession(
        _finish(graph).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    train = session.run(["features"], {"input": data.x_train})[0]
    head = LogisticRegression(max_iter=2000, random_state=seed).fit(train, data.y_train)
    return {
        "fc.w": head.coef_.T.astype(np.float32).copy(),
        "fc.b": head.intercept_.astype(np.float32),
    }


def _trained_residual_weights(
    weights: dict[str, np.ndarray], data: ImageDigits, shape: _ResidualShape, epochs: int, seed: int
) -> dict[str, np.ndarray]:
    """Every weight trained on the labels with Adam (shifted images for augmentation)."""
    import torch  # noqa: PLC0415 -- the train extra, only for the benchmark's trained model
    from torch.nn import functional  # noqa: PLC0415

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in weights.items()}

    def forward(x: torch.Tensor) -> torch.Tensor:
        def conv(name: str, t: torch.Tensor) -> torch.Tensor:
            stride = shape.stem_stride if name == "stem" else 1
            return functional.conv2d(
                t, params[f"{name}.w"], params[f"{name}.b"], stride=stride, padding=1
            )

        t0 = torch.relu(conv("stem", x))
        t1 = torch.relu(conv("res2", torch.relu(conv("res1", t0))) + t0)
        c = torch.relu(conv("c2f", functional.max_pool2d(t1, 2)))
        a, b = torch.split(c, [shape.width, shape.width], dim=1)
        t2 = torch.relu(conv("mix", torch.cat([a, b, torch.relu(conv("inner", b))], dim=1)))
        return torch.mean(t2, dim=(2, 3)) @ params["fc.w"] + params["fc.b"]

    optimizer = torch.optim.Adam(params.values(), lr=2e-3)
    steps = epochs * -(-len(data.x_train) // TRAIN_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=4e-3, total_steps=steps)
    labels = torch.from_numpy(data.y_train)
    started = time.monotonic()
    for epoch in range(epochs):
        dy, dx = (int(v) for v in rng.integers(-2, 3, 2))
        images = torch.from_numpy(np.roll(data.x_train, (dy, dx), axis=(2, 3)))
        order = torch.from_numpy(rng.permutation(len(images)))
        for first in range(0, len(images), TRAIN_BATCH):
            rows = order[first : first + TRAIN_BATCH]
            loss = functional.cross_entropy(forward(images[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        per_epoch = (time.monotonic() - started) / (epoch + 1)
        log.info(
            "residual_cnn_epoch",
            epoch=epoch + 1,
            epochs=epochs,
            loss=round(float(loss.detach()), 4),
            seconds_left=round(per_epoch * (epochs - epoch - 1), 1),
        )
    return {k: p.detach().numpy().astype(np.float32) for k, p in params.items()}


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Check and write a model; returns the path for chaining in fixtures."""
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by every onnxruntime the agent supports (>= 1.17)
    return model
