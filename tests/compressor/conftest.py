"""Fixture models and data sets for the compressor tests, built once per session.

Nothing is downloaded: the models come from `tools/compress_models.py`, the same builders
the benchmark uses, at sizes small enough to keep the suite fast.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.neural_network import MLPClassifier

from compressor.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import compress_models as cm


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide folder for fixture models and data sets."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def digits() -> cm.DigitsData:
    """The digits set, split for training, calibration and evaluation."""
    return cm.digits_data(seed=0)


@pytest.fixture(scope="session")
def digits_mlp(digits: cm.DigitsData) -> MLPClassifier:
    """A trained one-hidden-layer classifier (64 neurons) on the digits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's ConvergenceWarning is irrelevant here
        return cm.train_digits_mlp(digits, hidden=64, seed=0)


@pytest.fixture(scope="session")
def digits_gemm(models_dir: Path, digits_mlp: MLPClassifier) -> Path:
    """The demo form: Gemm -> Relu -> Gemm -> Softmax, input 'input', output 'probabilities'."""
    return cm.save(cm.digits_gemm_model(digits_mlp), models_dir / "digits_gemm.onnx")


@pytest.fixture(scope="session")
def digits_skl(models_dir: Path, digits_mlp: MLPClassifier) -> Path:
    """skl2onnx's form: MatMul + Add layers, outputs 'label' and 'probabilities'."""
    return cm.save(cm.digits_skl2onnx_model(digits_mlp), models_dir / "digits_skl.onnx")


@pytest.fixture(scope="session")
def digits_calib(models_dir: Path, digits: cm.DigitsData) -> Path:
    """A calibration set for the digits models (input only)."""
    return Dataset({"input": digits.x_calib}).save(models_dir / "digits_calib.npz")


@pytest.fixture(scope="session")
def digits_eval(models_dir: Path, digits: cm.DigitsData) -> Path:
    """A labelled evaluation set for the digits models."""
    return Dataset({"input": digits.x_eval}, digits.y_eval).save(models_dir / "digits_eval.npz")


@pytest.fixture(scope="session")
def digits_skl_calib(models_dir: Path, digits: cm.DigitsData) -> Path:
    """The calibration set under skl2onnx's input name 'X'."""
    return Dataset({"X": digits.x_calib}).save(models_dir / "digits_skl_calib.npz")


@pytest.fixture(scope="session")
def digits_skl_eval(models_dir: Path, digits: cm.DigitsData) -> Path:
    """The labelled evaluation set under skl2onnx's input name 'X'."""
    return Dataset({"X": digits.x_eval}, digits.y_eval).save(models_dir / "digits_skl_eval.npz")


@pytest.fixture(scope="session")
def cnn(models_dir: Path) -> Path:
    """A small conv classifier on 1x3x16x16 with BatchNorm and pooling."""
    return cm.save(cm.cnn_model(channels=(8, 16), size=16), models_dir / "cnn.onnx")


@pytest.fixture(scope="session")
def cnn_calib(models_dir: Path) -> Path:
    """Calibration images for the small CNN."""
    return Dataset({"input": cm.image_batch(24, size=16, seed=1)}).save(
        models_dir / "cnn_calib.npz"
    )


@pytest.fixture(scope="session")
def cnn_eval(models_dir: Path) -> Path:
    """Evaluation images for the small CNN (no labels: fidelity only)."""
    return Dataset({"input": cm.image_batch(32, size=16, seed=2)}).save(models_dir / "cnn_eval.npz")


@pytest.fixture(scope="session")
def constant_weights(models_dir: Path) -> Path:
    """An MLP whose weights live in Constant nodes, as Paddle exports them."""
    return cm.save(cm.constant_weights_model(), models_dir / "constants.onnx")


@pytest.fixture(scope="session")
def if_model(models_dir: Path) -> Path:
    """A model whose only weights sit inside If branches."""
    return cm.save(cm.if_subgraph_model(), models_dir / "if.onnx")


@pytest.fixture(scope="session")
def vector16(models_dir: Path) -> Path:
    """Random [rows, 16] inputs for the Constant-node and If models."""
    rng = np.random.default_rng(3)
    return Dataset({"input": rng.normal(0, 1, (48, 16)).astype(np.float32)}).save(
        models_dir / "vector16.npz"
    )


@pytest.fixture(scope="session")
def outlier_mlp(models_dir: Path) -> Path:
    """A 4-layer MLP with one 1000x hotter hidden channel that int8 activations crush."""
    return cm.save(cm.outlier_mlp_model(), models_dir / "outlier.onnx")


@pytest.fixture(scope="session")
def map_net(models_dir: Path) -> Path:
    """A segmentation-style net with a sigmoid map and one channel far beyond fp16's range."""
    return cm.save(cm.map_model(), models_dir / "map.onnx")


@pytest.fixture(scope="session")
def map_calib(models_dir: Path) -> Path:
    """Calibration images for the map net."""
    return Dataset({"input": cm.image_batch(24, size=32, seed=1)}).save(models_dir / "map_cal.npz")


@pytest.fixture(scope="session")
def map_eval(models_dir: Path) -> Path:
    """Evaluation images for the map net (no labels: fidelity only)."""
    return Dataset({"input": cm.image_batch(32, size=32, seed=2)}).save(models_dir / "map_ev.npz")


@pytest.fixture(scope="session")
def image_digits() -> cm.ImageDigits:
    """The digits as 16x16 images, split for training, calibration and evaluation."""
    return cm.image_digits(size=16, seed=0)


@pytest.fixture(scope="session")
def residual_cnn(models_dir: Path, image_digits: cm.ImageDigits) -> Path:
    """A CNN with a residual Add, a Split and a Concat, its head trained on the digits."""
    return cm.save(cm.residual_cnn_model(image_digits), models_dir / "residual.onnx")


@pytest.fixture(scope="session")
def residual_calib(models_dir: Path, image_digits: cm.ImageDigits) -> Path:
    """Calibration images for the residual CNN."""
    return Dataset({"input": image_digits.x_calib}).save(models_dir / "residual_cal.npz")


@pytest.fixture(scope="session")
def residual_eval(models_dir: Path, image_digits: cm.ImageDigits) -> Path:
    """Labelled evaluation images for the residual CNN."""
    return Dataset({"input": image_digits.x_eval}, image_digits.y_eval).save(
        models_dir / "residual_ev.npz"
    )
