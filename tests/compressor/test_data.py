"""Reading calibration and evaluation sets and checking them against the signature."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compressor.data import Dataset, load_dataset
from compressor.errors import DataError
from compressor.model import Signature, load_model


@pytest.fixture(scope="module")
def signature(digits_gemm: Path) -> Signature:
    """The demo model's signature."""
    return load_model(digits_gemm).signature


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    with path.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    return path


def test_reads_inputs_and_labels(tmp_path: Path, signature: Signature) -> None:
    """A matching file yields its rows and integer labels."""
    x = np.zeros((5, 64), np.float32)
    data = load_dataset(_npz(tmp_path / "d.npz", input=x, labels=np.arange(5)), signature)
    assert data.size == 5
    assert data.labels is not None and data.labels.tolist() == [0, 1, 2, 3, 4]


def test_float64_is_narrowed(tmp_path: Path, signature: Signature) -> None:
    """numpy's default float64 is cast to the model's FP32."""
    data = load_dataset(_npz(tmp_path / "d.npz", input=np.zeros((2, 64))), signature)
    assert data.inputs["input"].dtype == np.float32


def test_missing_input_is_named(tmp_path: Path, signature: Signature) -> None:
    """A file without the model's input names what is missing and what the file holds."""
    with pytest.raises(DataError, match=r"missing input\(s\) \['input'\].*\['x'\]"):
        load_dataset(_npz(tmp_path / "d.npz", x=np.zeros((2, 64), np.float32)), signature)


def test_unknown_array_is_refused(tmp_path: Path, signature: Signature) -> None:
    """An array that is neither an input nor labels is refused, not silently ignored."""
    arrays = {"input": np.zeros((2, 64), np.float32), "extra": np.zeros(2)}
    with pytest.raises(DataError, match="unknown array"):
        load_dataset(_npz(tmp_path / "d.npz", **arrays), signature)


def test_wrong_width_is_refused(tmp_path: Path, signature: Signature) -> None:
    """Rows of 63 features for a 64-feature input are refused with both shapes."""
    with pytest.raises(DataError, match=r"\[2, 63\].*\[-1, 64\]"):
        load_dataset(_npz(tmp_path / "d.npz", input=np.zeros((2, 63), np.float32)), signature)


def test_wrong_rank_is_refused(tmp_path: Path, signature: Signature) -> None:
    """A flat vector where a [rows, 64] matrix is expected is refused."""
    with pytest.raises(DataError, match="shape"):
        load_dataset(_npz(tmp_path / "d.npz", input=np.zeros(64, np.float32)), signature)


def test_empty_set_is_refused(tmp_path: Path, signature: Signature) -> None:
    """A set with zero rows is refused as empty."""
    with pytest.raises(DataError, match="empty"):
        load_dataset(_npz(tmp_path / "d.npz", input=np.zeros((0, 64), np.float32)), signature)


def test_wrong_dtype_is_refused(tmp_path: Path, signature: Signature) -> None:
    """Complex numbers cannot become FP32 and are refused."""
    with pytest.raises(DataError, match="expects FP32"):
        load_dataset(_npz(tmp_path / "d.npz", input=np.zeros((2, 64), np.complex64)), signature)


def test_labels_must_match_rows(tmp_path: Path, signature: Signature) -> None:
    """Labels must hold one class per row."""
    arrays = {"input": np.zeros((3, 64), np.float32), "labels": np.zeros(2, np.int64)}
    with pytest.raises(DataError, match="one class per row"):
        load_dataset(_npz(tmp_path / "d.npz", **arrays), signature)


def test_float_labels_are_refused(tmp_path: Path, signature: Signature) -> None:
    """Labels must be integer class indices, not floats."""
    arrays = {"input": np.zeros((3, 64), np.float32), "labels": np.zeros(3)}
    with pytest.raises(DataError, match="integer class"):
        load_dataset(_npz(tmp_path / "d.npz", **arrays), signature)


def test_single_array_npy_is_refused(tmp_path: Path, signature: Signature) -> None:
    """A bare .npy array has no names and is refused with how to save a set."""
    path = tmp_path / "d.npy"
    np.save(path, np.zeros((2, 64), np.float32))
    with pytest.raises(DataError, match=r"np\.savez"):
        load_dataset(path, signature)


def test_garbage_file_is_refused(tmp_path: Path, signature: Signature) -> None:
    """A file that is not an npz archive is reported as unreadable."""
    path = tmp_path / "d.npz"
    path.write_text("not numpy")
    with pytest.raises(DataError, match="not a readable"):
        load_dataset(path, signature)


def test_missing_file_is_refused(tmp_path: Path, signature: Signature) -> None:
    """A data path that does not exist is reported as such."""
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "absent.npz", signature)


def test_round_trip_through_save(tmp_path: Path, signature: Signature) -> None:
    """Dataset.save writes a file load_dataset reads back unchanged."""
    original = Dataset({"input": np.ones((4, 64), np.float32)}, np.array([1, 2, 3, 4]))
    again = load_dataset(original.save(tmp_path / "d.npz"), signature)
    assert np.array_equal(again.inputs["input"], original.inputs["input"])
    assert again.labels is not None and again.labels.tolist() == [1, 2, 3, 4]
