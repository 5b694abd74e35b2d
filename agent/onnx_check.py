"""Checks an ONNX file before onnxruntime opens it: no custom-op domains (they would need a
native library loaded into the agent) and no external data outside the model's folder
(onnxruntime would read whatever file the model names, e.g. `../../etc/shadow`).

The agent does not depend on the `onnx` package, so this reads the protobuf wire format
itself, and only the few fields it needs. The file is read whole, once (onnxruntime reads
it whole right after anyway), and tensor payloads are skipped by length, never copied. Not
memory-mapped: a push truncating the file under a mapping would kill the agent (SIGBUS).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from agent.errors import VariantRejected
from agent.files import RefusedFile, check_regular, open_regular

# Operator domains onnxruntime implements itself. Anything else needs a custom-op library.
BUILTIN_DOMAINS = frozenset(
    {
        "",
        "ai.onnx",
        "ai.onnx.ml",
        "ai.onnx.preview.training",
        "ai.onnx.training",
        "com.microsoft",
        "com.microsoft.experimental",
        "com.microsoft.nchwc",
        "com.ms.internal.nhwc",
    }
)

# Field numbers from onnx.proto.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE, _NODE_DOMAIN = 5, 7
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS = 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_FUNCTION_NODE, _FUNCTION_DOMAIN = 7, 10
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_MAX_DEPTH = 64  # nested subgraphs; deeper is a crafted file, not a model


class OnnxFormatError(ValueError):
    """The file is not a well-formed ONNX protobuf."""


@dataclass
class OnnxFacts:
    """What the checks need to know about a model file."""

    node_domains: set[str] = field(default_factory=set)
    function_domains: set[str] = field(default_factory=set)
    external_locations: set[str] = field(default_factory=set)
    external_without_location: bool = False

    @property
    def custom_domains(self) -> set[str]:
        """Operator domains that neither onnxruntime nor the model's own functions define."""
        return self.node_domains - BUILTIN_DOMAINS - self.function_domains


def check_model_file(
    path: Path, folder: Path, *, variant: str, allow_external_data: bool = True
) -> None:
    """Raise VariantRejected when `path` needs custom ops or data from outside `folder`."""
    try:
        facts = inspect_model(path)
    except (OSError, OnnxFormatError) as exc:
        raise VariantRejected(
            f"variant {variant}: {path.name} is not a readable ONNX file: {exc}"
        ) from exc
    custom = facts.custom_domains
    if custom:
        raise VariantRejected(
            f"variant {variant}: {path.name} uses custom operator domain(s) {sorted(custom)}, "
            "which need a native library the agent does not load"
        )
    if facts.external_without_location:
        raise VariantRejected(f"variant {variant}: {path.name} has external data without a path")
    if facts.external_locations and not allow_external_data:
        raise VariantRejected(
            f"variant {variant}: {path.name} keeps tensors in external data files "
            f"{sorted(facts.external_locations)}, which a signed manifest does not cover"
        )
    root = folder.resolve()
    for location in sorted(facts.external_locations):
        pure = PurePosixPath(location)
        target = (path.parent / location).resolve()
        if (
            pure.is_absolute()
            or "\\" in location
            or ".." in pure.parts
            or (target != root and root not in target.parents)
        ):
            raise VariantRejected(
                f"variant {variant}: {path.name} reads external data from {location!r}, "
                f"outside its model folder {root}"
            )
        try:
            check_regular(target)
        except RefusedFile as exc:
            # onnxruntime would open it itself, and a FIFO would hold the load forever.
            raise VariantRejected(
                f"variant {variant}: external data file {location!r} of {path.name} "
                f"is refused: {exc}"
            ) from exc
        except OSError:
            raise VariantRejected(
                f"variant {variant}: external data file {location!r} of {path.name} is missing"
            ) from None


def inspect_model(path: Path) -> OnnxFacts:
    """Operator domains and external data locations of the ONNX model at `path`.

    Only a regular file is opened (RefusedFile otherwise): a FIFO would block the read.
    """
    with open_regular(path) as f:
        data = f.read()
    if not data:
        raise OnnxFormatError("empty file")
    facts = OnnxFacts()
    _model(memoryview(data), facts)
    return facts


def _model(buf: memoryview, facts: OnnxFacts) -> None:
    for number, value in _fields(buf):
        if number == _MODEL_GRAPH:
            _graph(_bytes(value), facts, 0)
        elif number == _MODEL_FUNCTIONS:
            _function(_bytes(value), facts)


def _function(buf: memoryview, facts: OnnxFacts) -> None:
    for number, value in _fields(buf):
        if number == _FUNCTION_DOMAIN:
            facts.function_domains.add(_text(value))
        elif number == _FUNCTION_NODE:
            _node(_bytes(value), facts, 1)


def _graph(buf: memoryview, facts: OnnxFacts, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise OnnxFormatError(f"subgraphs nested deeper than {_MAX_DEPTH}")
    for number, value in _fields(buf):
        if number == _GRAPH_NODE:
            _node(_bytes(value), facts, depth)
        elif number == _GRAPH_INITIALIZER:
            _tensor(_bytes(value), facts)
        elif number == _GRAPH_SPARSE_INITIALIZER:
            _sparse(_bytes(value), facts)


def _node(buf: memoryview, facts: OnnxFacts, depth: int) -> None:
    domain = ""
    for number, value in _fields(buf):
        if number == _NODE_DOMAIN:
            domain = _text(value)
        elif number == _NODE_ATTRIBUTE:
            _attribute(_bytes(value), facts, depth)
    facts.node_domains.add(domain)


def _attribute(buf: memoryview, facts: OnnxFacts, depth: int) -> None:
    for number, value in _fields(buf):
        if number in (_ATTR_T, _ATTR_TENSORS):
            _tensor(_bytes(value), facts)
        elif number in (_ATTR_G, _ATTR_GRAPHS):
            _graph(_bytes(value), facts, depth + 1)
        elif number in (_ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS):
            _sparse(_bytes(value), facts)


def _sparse(buf: memoryview, facts: OnnxFacts) -> None:
    for number, value in _fields(buf):
        if number in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor(_bytes(value), facts)


def _tensor(buf: memoryview, facts: OnnxFacts) -> None:
    external = False
    location: str | None = None
    for number, value in _fields(buf):
        if number == _TENSOR_DATA_LOCATION:
            external = value == _EXTERNAL
        elif number == _TENSOR_EXTERNAL_DATA:
            key, text = "", ""
            for entry_number, entry_value in _fields(_bytes(value)):
                if entry_number == _ENTRY_KEY:
                    key = _text(entry_value)
                elif entry_number == _ENTRY_VALUE:
                    text = _text(entry_value)
            if key == "location":
                location = text
    if external:
        if location:
            facts.external_locations.add(location)
        else:
            facts.external_without_location = True


def _fields(buf: memoryview) -> list[tuple[int, int | memoryview]]:
    """(field number, value) of each field: an int for varints, a view for byte strings.

    Fixed-width scalars are skipped: none of the fields read here have that type.
    """
    out: list[tuple[int, int | memoryview]] = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            out.append((number, value))
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise OnnxFormatError("a field runs past the end of its message")
            out.append((number, buf[pos : pos + length]))
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise OnnxFormatError(f"unsupported protobuf wire type {wire}")
    if pos != end:
        raise OnnxFormatError("truncated message")
    return out


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise OnnxFormatError("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _bytes(value: int | memoryview) -> memoryview:
    if isinstance(value, int):
        raise OnnxFormatError("expected a length-delimited field, got a varint")
    return value


def _text(value: int | memoryview) -> str:
    return bytes(_bytes(value)).decode("utf-8", errors="replace")
