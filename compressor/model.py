"""Loading an ONNX model: check that it is ONNX, that onnxruntime runs it, and read its signature.

Every transform starts here, so that a bad file fails once, early, with a message saying
whether the bytes are not ONNX at all or onnxruntime refuses the graph.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
import structlog
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]  # no stubs in deps

from agent.datatypes import ORT_TYPES
from agent.manifest import TensorSpec
from compressor.errors import ModelLoadError, NotOnnxError, UnsupportedModelError

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Signature:
    """A model's inputs and outputs, as the agent's manifest describes them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        """The input called `name`; KeyError if there is none."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def batchable(self) -> bool:
        """Whether every input and output has a free leading dimension."""
        return all(t.shape and t.shape[0] == -1 for t in (*self.inputs, *self.outputs))


@dataclass(frozen=True)
class OnnxModel:
    """A model file that parsed as ONNX and loaded in onnxruntime."""

    path: Path
    proto: onnx.ModelProto
    signature: Signature

    @property
    def opset(self) -> int:
        """The version of the default ("ai.onnx") operator set the graph uses."""
        return default_opset(self.proto)


def default_opset(proto: onnx.ModelProto) -> int:
    """The version of the default operator set a model imports (1 if it imports none)."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def load_model(path: Path) -> OnnxModel:
    """Parse `path` as ONNX, load it in onnxruntime and read its signature."""
    proto = _parse(path)
    signature = signature_of_bytes(proto.SerializeToString(), str(path))
    log.debug("model_loaded", path=str(path), nodes=len(proto.graph.node))
    return OnnxModel(path=path, proto=proto, signature=signature)


def signature_of_bytes(data: bytes, where: str) -> Signature:
    """Load serialized model bytes in onnxruntime and read the signature it reports."""
    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    # onnxruntime raises its own exception classes, none shared with the standard ones.
    except Exception as exc:
        raise ModelLoadError(f"{where}: onnxruntime cannot load the model: {exc}") from exc
    inputs = tuple(_spec(arg, where) for arg in session.get_inputs())
    outputs = tuple(_spec(arg, where) for arg in session.get_outputs())
    return Signature(inputs=inputs, outputs=outputs)


def save_model(proto: onnx.ModelProto, path: Path) -> Path:
    """Write a model atomically (temporary file + rename) so no reader sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _parse(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise NotOnnxError(f"{path}: no such file")
    try:
        proto = onnx.load_model(path)
    except (DecodeError, OSError, ValueError) as exc:
        raise NotOnnxError(f"{path}: not an ONNX model ({exc})") from exc
    # Protobuf parses some non-ONNX bytes into an empty message: that is no model either.
    if proto.ir_version <= 0 or not proto.graph.output:
        raise NotOnnxError(f"{path}: not an ONNX model (no IR version or no graph outputs)")
    return proto


def _spec(arg: ort.NodeArg, where: str) -> TensorSpec:
    datatype = ORT_TYPES.get(arg.type)
    if datatype is None:
        raise UnsupportedModelError(
            f"{where}: tensor {arg.name!r} has type {arg.type}, which the agent cannot serve "
            "(export classifiers without ZipMap, e.g. skl2onnx option zipmap=False)"
        )
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in arg.shape or ())
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)
