"""The least-squares refit: im2col agrees with onnxruntime's Conv and the solves recover weights."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.prune.correction import ConvGeometry, im2col, refit_conv, refit_dense
from compressor.session import open_session

GEOMETRIES = [
    ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
    ConvGeometry((3, 3), (2, 2), (1, 1), (0, 1, 0, 1)),
    ConvGeometry((3, 3), (1, 1), (2, 2), (2, 2, 2, 2)),
    ConvGeometry((1, 1), (1, 1), (1, 1), (0, 0, 0, 0)),
]


def _ort_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, g: ConvGeometry) -> np.ndarray:
    graph = helper.make_graph(
        [
            helper.make_node(
                "Conv",
                ["x", "w", "b"],
                ["y"],
                strides=list(g.strides),
                dilations=list(g.dilations),
                pads=list(g.pads),
            )
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result: np.ndarray = open_session(model.SerializeToString(), 1).run(None, {"x": x})[0]
    return result


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_im2col_matches_onnxruntime(geometry: ConvGeometry) -> None:
    """Patches times the flattened kernel reproduce onnxruntime's Conv output."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (2, 4, 9, 9)).astype(np.float32)
    w = rng.normal(0, 1, (5, 4, *geometry.kernel)).astype(np.float32)
    b = rng.normal(0, 1, 5).astype(np.float32)
    y = _ort_conv(x, w, b, geometry)
    patches = im2col(x, geometry)
    mine = (patches @ w.reshape(5, -1).T + b).reshape(2, y.shape[2], y.shape[3], 5)
    assert np.allclose(mine.transpose(0, 3, 1, 2), y, atol=1e-4)


@pytest.mark.parametrize("geometry", GEOMETRIES[:3])
def test_refit_conv_recovers_weights(geometry: ConvGeometry) -> None:
    """Refitting on a conv's own inputs and outputs gives back its weights and bias."""
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (8, 4, 9, 9)).astype(np.float32)
    w = rng.normal(0, 1, (5, 4, 3, 3)).astype(np.float32)
    b = rng.normal(0, 1, 5).astype(np.float32)
    weight, bias = refit_conv(x, _ort_conv(x, w, b, geometry), geometry, with_bias=True)
    assert bias is not None
    assert np.allclose(weight, w, atol=0.05) and np.allclose(bias, b, atol=0.05)


def test_refit_dense_recovers_weights() -> None:
    """A noiseless linear map with a bias is recovered by the dense refit."""
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (500, 6)).astype(np.float32)
    w = rng.normal(0, 1, (6, 3)).astype(np.float32)
    b = np.array([0.5, -1.0, 2.0], np.float32)
    weight, bias = refit_dense(x, x @ w + b, with_bias=True)
    assert bias is not None
    assert np.allclose(weight, w, atol=0.02) and np.allclose(bias, b, atol=0.02)


def test_refit_without_bias_returns_none() -> None:
    """Asked for no bias, the dense refit returns weights only."""
    x = np.eye(4, dtype=np.float32)
    weight, bias = refit_dense(x, x * 2.0, with_bias=False)
    assert bias is None and weight.shape == (4, 4)


def test_one_wide_range_input_does_not_erase_the_others() -> None:
    """A dense refit whose inputs include one channel a million times wider than the rest
    still recovers the weights of the ordinary channels (the ridge is per input)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (400, 8))
    x[:, 0] *= 1e6
    w = rng.normal(0, 1, (8, 3))
    w[0] /= 1e6
    weight, _ = refit_dense(x.astype(np.float32), (x @ w).astype(np.float32), with_bias=False)
    np.testing.assert_allclose(weight[1:], w[1:], rtol=0.02, atol=0.02)
