"""The compressor's error hierarchy: every failure a user can cause, with a message to act on.

The command line prints the message and exits non-zero; nothing here is raised for a bug.
"""

from __future__ import annotations


class CompressorError(Exception):
    """Base of every error the compressor raises on purpose."""


class NotOnnxError(CompressorError):
    """The file is missing or is not an ONNX model."""


class ModelLoadError(CompressorError):
    """The file is ONNX but onnxruntime cannot load or run it."""


class UnsupportedModelError(CompressorError):
    """The model's graph does not fit the requested transform; the message says why."""


class DataError(CompressorError):
    """A calibration or evaluation set is missing, empty or does not match the signature."""


class OutputExistsError(CompressorError):
    """The output path exists and overwriting it was not asked for."""
