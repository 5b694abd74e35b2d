"""Open Inference Protocol (KServe v2) messages: decoding requests, encoding replies.

Requests are JSON, optionally followed by raw tensor bytes (the binary-data extension: the
JSON header's length travels beside the payload, as the `Inference-Header-Content-Length`
MQTT 5 user property). This module knows bytes and JSON only: no MQTT, no onnxruntime.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from agent.datatypes import NUMPY_DTYPES, datatype_of
from agent.errors import InvalidRequest

if TYPE_CHECKING:
    from agent.shm import Placement

HEADER_LENGTH_PROPERTY = "Inference-Header-Content-Length"

# Limits checked before any arithmetic on client-supplied numbers (see README, "Requests
# and replies"): a hostile shape or literal must cost no more than reading it.
MAX_RANK = 32
"""Dimensions a tensor may have (numpy 1.x's own limit; ONNX models stay far below)."""
MAX_DIMENSION = 2**31 - 1
"""Largest size of one dimension."""
MAX_INT_DIGITS = 20
"""Digits of a JSON integer literal: enough for any INT64 or UINT64."""
MAX_JSON_DEPTH = 48
"""Nesting of JSON arrays and objects: a rank-32 nested `data` inside the request header."""
MAX_NAME_CHARS = 256
"""Length of a tensor name."""
MAX_ID_CHARS = 1024
"""Length of a request id (it is echoed in the reply)."""
MAX_ECHO_CHARS = 200
"""How much of a client's value an error message quotes."""
MAX_ERROR_CHARS = 1000
"""Length of an error reply's message, whatever it quotes."""

# Non-finite floats in JSON replies: strict JSON has no NaN or Infinity literal, so they
# travel as these strings (the proto3 JSON mapping, which KServe's gRPC schema implies).
NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

# One encoder for every reply: json.dumps(..., separators=...) builds a new one each call.
# allow_nan=False: a non-finite float that slipped past _to_json is a bug, not bare NaN.
_COMPACT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)

_LITTLE = {name: dtype.newbyteorder("<") for name, dtype in NUMPY_DTYPES.items()}


MAX_SHARED_BYTES = 2**48
"""Largest offset or size in a shared-memory region (far above any board's memory)."""


@dataclass(frozen=True, slots=True)
class SharedMemoryRef:
    """Where a tensor lies in a registered shared-memory region (the system shared-memory
    extension's `shared_memory_region`, `_offset` and `_byte_size` parameters)."""

    region: str
    offset: int
    byte_size: int

    def parameters(self) -> dict[str, Any]:
        """The tensor entry's parameters that name this place."""
        params: dict[str, Any] = {
            "shared_memory_region": self.region,
            "shared_memory_byte_size": self.byte_size,
        }
        if self.offset:
            params["shared_memory_offset"] = self.offset
        return params


@dataclass(frozen=True, slots=True)
class SharedInput:
    """An input whose bytes are in shared memory: read by the data plane, not decoded here."""

    ref: SharedMemoryRef
    datatype: str
    shape: tuple[int, ...]


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for, whether as raw bytes, and where in shared memory."""

    name: str
    binary: bool
    shared: SharedMemoryRef | None = None


@dataclass(slots=True)
class InferenceRequest:
    """A decoded request: tensors as numpy arrays, not yet checked against any model."""

    id: str | int | None
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    outputs: tuple[RequestedOutput, ...] | None = None
    binary_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)
    reply_to: str | None = None  # MQTT 3.1.1 clients carry their reply topic in the JSON
    shared_inputs: dict[str, SharedInput] | None = None  # inputs to read from shared memory
    shared_memory: Placement | None = None  # the regions the data plane resolved for it

    @property
    def uses_shared_memory(self) -> bool:
        return self.shared_inputs is not None or any(o.shared for o in self.outputs or ())


class RequestError(InvalidRequest):
    """An invalid request, with whatever could be read of where to send the error reply."""

    def __init__(
        self, message: str, request_id: str | int | None = None, reply_to: str | None = None
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.reply_to = reply_to


def clip(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """repr(value), cut to `limit` characters: error messages never echo input unbounded."""
    if isinstance(value, str | bytes) and len(value) > limit * 4:
        value = value[: limit * 4]  # repr of a huge string would cost its full size first
    if isinstance(value, list | dict | tuple) and len(value) > limit:
        return f"<{type(value).__name__} of {len(value)} items>"
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int over Python's digit limit, a deep list
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bounded_int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError(f"an integer literal has more than {MAX_INT_DIGITS} digits")
    return int(literal)


_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_RUN = b"0" * (MAX_INT_DIGITS + 1)


def _checked() -> json.JSONDecoder:
    # One per call: a decoder (its C scanner's memo) is not meant to be shared between
    # threads while a Python hook of it runs, and requests are decoded on several threads.
    return json.JSONDecoder(parse_int=_bounded_int)


def load_json(raw: bytes | bytearray) -> Any:
    """Parse JSON text with the limits above; RequestError says what is wrong.

    The checks cost two fast byte scans on ordinary payloads: the slow, exact paths (an
    integer hook, a depth walk) run only when a long digit run or much nesting is present.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("request header is not UTF-8 text") from None
    return _parse(text, raw)


def _parse(text: str, raw: bytes | bytearray) -> Any:
    long_digits = _LONG_RUN in raw.translate(_DIGITS)
    try:
        value = _checked().decode(text) if long_digits else json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise RequestError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _too_deep(value):
        raise RequestError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _too_deep(value: Any) -> bool:
    """True when `value` nests containers deeper than MAX_JSON_DEPTH (iteratively)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if type(child) in (list, dict))
    return False


def split_payload(
    payload: bytes | bytearray, header_length: int | None
) -> tuple[dict[str, Any], memoryview]:
    """The JSON header as a dict and the binary tail (empty when there is none).

    Without an explicit header length (MQTT 3.1.1 has no user properties) the header is
    the first JSON value of the payload and whatever follows it is binary data.
    """
    view = memoryview(payload)
    if header_length is not None:
        if not 0 < header_length <= len(payload):
            raise RequestError(
                f"binary header length {header_length} is beyond the payload of "
                f"{len(payload)} bytes"
            )
        header, tail = load_json(view[:header_length].tobytes()), view[header_length:]
    else:
        try:
            text = bytes(payload).decode("utf-8")
        except UnicodeDecodeError:
            header, tail = _leading_json(payload)
        else:
            try:
                header, tail = _parse(text, payload), view[len(payload) :]
            except RequestError as exc:
                if "Extra data" not in str(exc):
                    raise
                header, tail = _leading_json(payload)
    if not isinstance(header, dict):
        raise RequestError("the request must be a JSON object")
    return header, tail


def _leading_json(payload: bytes | bytearray) -> tuple[Any, memoryview]:
    # latin-1 maps each byte to one character, so the decoder's end index is a byte offset;
    # multi-byte UTF-8 only occurs inside JSON strings and cannot end the value early.
    try:
        _, end = _checked().raw_decode(payload.decode("latin-1"))
    except json.JSONDecodeError:
        raise RequestError("payload is neither JSON nor a JSON header with binary data") from None
    except RecursionError:
        raise RequestError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    return load_json(payload[:end]), memoryview(payload)[end:]


def decode_request(
    payload: bytes | bytearray, header_length: int | None = None
) -> InferenceRequest:
    """Decode an inference request; RequestError says what is wrong with it."""
    header, tail = split_payload(payload, header_length)
    request_id = header.get("id")
    reply_to = header.get("reply_to")
    if reply_to is not None and not isinstance(reply_to, str):
        raise RequestError("'reply_to' must be a string", None)
    if request_id is not None and (
        not isinstance(request_id, str | int) or isinstance(request_id, bool)
    ):
        raise RequestError("'id' must be a string", None, reply_to)
    if isinstance(request_id, str) and len(request_id) > MAX_ID_CHARS:
        raise RequestError(f"'id' is longer than {MAX_ID_CHARS} characters", None, reply_to)
    try:
        return _decode(header, tail, request_id, reply_to, len(payload))
    except RequestError as exc:
        exc.request_id, exc.reply_to = request_id, reply_to
        raise


def _decode(
    header: Mapping[str, Any],
    tail: memoryview,
    request_id: str | int | None,
    reply_to: str | None,
    payload_size: int,
) -> InferenceRequest:
    unknown = set(header) - {"id", "inputs", "outputs", "parameters", "reply_to"}
    if unknown:
        raise RequestError(f"unknown request fields: {clip(sorted(unknown))}")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError("'parameters' must be an object")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise RequestError("parameters.binary_data_output must be true or false")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise RequestError("'inputs' must be a non-empty list")

    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    shared: dict[str, SharedInput] | None = None
    offset = 0
    for index, raw in enumerate(raw_inputs):
        name, datatype, array, used = _decode_tensor(raw, index, tail, offset, payload_size)
        if name in datatypes:
            raise RequestError(f"input {name!r} appears twice")
        datatypes[name] = datatype
        if isinstance(array, SharedInput):
            shared = shared or {}
            shared[name] = array
        else:
            inputs[name] = array
        offset += used
    if offset != len(tail):
        raise RequestError(
            f"{len(tail) - offset} bytes of binary data follow the inputs that declare "
            f"binary_data_size (declared {offset}, received {len(tail)})"
        )
    return InferenceRequest(
        id=request_id,
        inputs=inputs,
        datatypes=datatypes,
        outputs=_decode_outputs(header.get("outputs"), binary_output),
        binary_output=binary_output,
        parameters=parameters,
        reply_to=reply_to,
        shared_inputs=shared,
    )


def _is_count(value: object, limit: int) -> bool:
    """A JSON integer in [0, limit] (bool is an int to Python, not to JSON)."""
    return type(value) is int and 0 <= value <= limit


def _shape(label: str, shape: Any, payload_size: int) -> tuple[tuple[int, ...], int]:
    """The shape and its element count, checked before any arithmetic on it."""
    if not isinstance(shape, list) or not all(_is_count(d, MAX_DIMENSION) for d in shape):
        raise RequestError(f"{label}: shape must be a list of integers from 0 to {MAX_DIMENSION}")
    if len(shape) > MAX_RANK:
        raise RequestError(f"{label}: {len(shape)} dimensions, at most {MAX_RANK}")
    count = math.prod(shape)  # at most 32 factors below 2**31: cheap
    if count > payload_size:
        # Every element takes at least one byte of the payload, as JSON or binary.
        raise RequestError(
            f"{label}: shape {shape} has {count} elements, more than the "
            f"{payload_size} bytes of the payload can hold"
        )
    return tuple(shape), count


def _decode_tensor(
    raw: Any,
    index: int,
    tail: memoryview,
    offset: int,
    payload_size: int,
    kind: str = "input",
) -> tuple[str, str, np.ndarray | SharedInput, int]:
    if not isinstance(raw, dict):
        raise RequestError(f"{kind}s[{index}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"{kind}s[{index}].name must be a non-empty string")
    if len(name) > MAX_NAME_CHARS:
        raise RequestError(f"{kind}s[{index}].name is longer than {MAX_NAME_CHARS} characters")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in NUMPY_DTYPES:
        raise RequestError(
            f"{kind} {name!r}: datatype {clip(datatype)} is not one of {sorted(NUMPY_DTYPES)}"
        )
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(f"{kind} {name!r}: parameters must be an object")
    shared = shared_memory_ref(params, kind, name) if params else None
    bound = payload_size if shared is None else shared.byte_size
    shape_t, count = _shape(f"{kind} {name!r}", raw.get("shape"), bound)
    if shared is not None:
        if "data" in raw or "binary_data_size" in params:
            raise RequestError(
                f"{kind} {name!r}: its data is in shared memory; it cannot also carry "
                "data or binary_data_size"
            )
        return name, datatype, SharedInput(shared, datatype, shape_t), 0
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in raw:
            raise RequestError(f"{kind} {name!r}: has both data and binary_data_size")
        if not _is_count(size, payload_size):
            raise RequestError(
                f"{kind} {name!r}: binary_data_size must be an integer from 0 to the payload's size"
            )
        if offset + size > len(tail):
            raise RequestError(
                f"{kind} {name!r}: binary_data_size {size} goes beyond the "
                f"{len(tail) - offset} bytes of binary data left"
            )
        array = _from_bytes(
            f"{kind} {name!r}", datatype, shape_t, count, tail[offset : offset + size]
        )
        return name, datatype, array, size
    if "data" not in raw:
        raise RequestError(f"{kind} {name!r}: no data and no binary_data_size")
    array = _from_json(f"{kind} {name!r}", datatype, shape_t, count, raw["data"])
    return name, datatype, array, 0


def shared_memory_ref(params: Mapping[str, Any], kind: str, name: str) -> SharedMemoryRef | None:
    """The shared-memory place a tensor's parameters name, or None when they name none
    (`kind` and `name` say which tensor an error is about)."""
    region = params.get("shared_memory_region")
    if region is None:
        if "shared_memory_byte_size" in params or "shared_memory_offset" in params:
            raise RequestError(
                f"{kind} {name!r}: shared_memory_byte_size without shared_memory_region"
            )
        return None
    label = f"{kind} {name!r}"
    if not isinstance(region, str) or not 0 < len(region) <= MAX_NAME_CHARS:
        raise RequestError(
            f"{label}: shared_memory_region must be a string of 1 to {MAX_NAME_CHARS} characters"
        )
    size = params.get("shared_memory_byte_size", -1)  # required: -1 is refused below
    offset = params.get("shared_memory_offset", 0)
    if not _is_count(size, MAX_SHARED_BYTES) or not _is_count(offset, MAX_SHARED_BYTES):
        raise RequestError(
            f"{label}: shared_memory_byte_size (required) and shared_memory_offset must be "
            f"integers from 0 to {MAX_SHARED_BYTES}"
        )
    return SharedMemoryRef(region, offset, size)


def tensor_from_bytes(
    label: str, datatype: str, shape: tuple[int, ...], raw: memoryview
) -> np.ndarray:
    """A tensor of `shape` over `raw` (a view, no copy), which must hold exactly its bytes."""
    return _from_bytes(label, datatype, shape, math.prod(shape), raw)


def _from_bytes(
    label: str, datatype: str, shape: tuple[int, ...], count: int, raw: memoryview
) -> np.ndarray:
    if datatype == "BYTES":
        return _unpack_bytes(label, shape, count, raw)
    dtype = _LITTLE[datatype]
    if len(raw) != count * dtype.itemsize:
        raise RequestError(
            f"{label}: {len(raw)} bytes of data, shape {list(shape)} of {datatype} "
            f"needs {count * dtype.itemsize}"
        )
    # A read-only view on the payload: no copy on the hot path.
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _unpack_bytes(label: str, shape: tuple[int, ...], count: int, raw: memoryview) -> np.ndarray:
    items: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise RequestError(f"{label}: truncated BYTES element length")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > len(raw):
            raise RequestError(f"{label}: BYTES element runs past the data")
        items.append(bytes(raw[pos : pos + length]))
        pos += length
    if len(items) != count:
        raise RequestError(
            f"{label}: {len(items)} BYTES elements, shape {list(shape)} needs {count}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


def _from_json(
    label: str, datatype: str, shape: tuple[int, ...], count: int, data: Any
) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    try:
        if datatype == "BYTES":
            array = _json_strings(data)
        elif datatype == "BOOL":
            array = np.array(data, dtype=object).reshape(-1)
            if not all(isinstance(v, bool) for v in array):
                raise ValueError("BOOL elements must be true or false")
            array = array.astype(np.bool_)
        else:
            array = _json_numbers(data, datatype)
    except (ValueError, TypeError, OverflowError) as exc:
        reason = clip(str(exc)).strip("'\"")
        raise RequestError(f"{label}: data is not a list of {datatype}: {reason}") from None
    if array.size != count:
        raise RequestError(
            f"{label}: {array.size} data elements, shape {list(shape)} needs {count}"
        )
    return array.reshape(shape)


def _json_strings(data: list[Any]) -> np.ndarray:
    array = np.array(data, dtype=object).reshape(-1)
    if not all(isinstance(s, str) for s in array):
        raise ValueError("BYTES elements must be strings")
    encoded = np.empty(array.size, dtype=object)
    encoded[:] = [s.encode("utf-8", "surrogatepass") for s in array]
    return encoded


def _json_numbers(data: list[Any], datatype: str) -> np.ndarray:
    """Numbers of `datatype`, refusing what a cast would silently change.

    numpy alone would parse "1.5" into 1.5, null into NaN and truncate 1.9 to 1 for an
    integer type, or wrap 300 into an INT8; none of those is what the client meant.
    """
    dtype = NUMPY_DTYPES[datatype]
    parsed = np.asarray(data)  # inferred: int64, uint64, float64, or str/object on junk
    kind = parsed.dtype.kind
    if dtype.kind == "f":
        if kind in "iuf":
            flat = parsed.reshape(-1)
            with np.errstate(over="ignore"):
                converted = flat.astype(dtype)
            # 1e308 as FP32 would become inf: a value the client did not send.
            if (
                not np.isfinite(converted).all()
                and (np.isfinite(flat) & ~np.isfinite(converted)).any()
            ):
                raise ValueError(f"an element is outside the range of {datatype}")
            return converted
        if kind in "OU":  # strings (maybe "NaN") mixed with numbers all became strings
            return _non_finite(np.array(data, dtype=object).reshape(-1), dtype)
        raise ValueError(f"elements must be numbers, not {_kind_name(kind)}")
    if kind == "f":
        flat = parsed.reshape(-1)
        if not np.all(np.isfinite(flat)) or not np.all(flat == np.trunc(flat)):
            raise ValueError("elements must be integers, a fraction would be truncated")
        parsed = flat
        kind = "i"
    if kind not in "iu":
        raise ValueError(f"elements must be integers, not {_kind_name(kind)}")
    flat = parsed.reshape(-1)
    info = np.iinfo(cast(Any, dtype))  # an integer dtype here; numpy types it loosely
    if flat.size and (flat.min() < info.min or flat.max() > info.max):
        raise ValueError(f"an element is outside [{info.min}, {info.max}]")
    return flat.astype(dtype)


def _kind_name(kind: str) -> str:
    return {"U": "strings", "O": "null or mixed values", "b": "booleans"}.get(kind, "numbers")


def _non_finite(flat: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """Floats where non-finite values come as the strings "NaN", "Infinity", "-Infinity"."""
    values: list[float] = []
    for item in flat.tolist():
        if type(item) in (int, float):
            values.append(item)
        elif isinstance(item, str) and item in NON_FINITE:
            values.append(NON_FINITE[item])
        else:
            raise ValueError(
                'elements must be numbers (or "NaN", "Infinity", "-Infinity"), '
                f"not {clip(item, 40)}"
            )
    return np.array(values, dtype=dtype)


def _decode_outputs(raw: Any, binary_default: bool) -> tuple[RequestedOutput, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise RequestError("'outputs' must be a list")
    outputs: list[RequestedOutput] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise RequestError(f"outputs[{index}] must be an object with a name")
        params = item.get("parameters") or {}
        binary = params.get("binary_data", binary_default) if isinstance(params, dict) else None
        if not isinstance(binary, bool):
            raise RequestError(f"outputs[{index}].parameters.binary_data must be true or false")
        shared = shared_memory_ref(params, "output", item["name"]) if params else None
        outputs.append(RequestedOutput(item["name"], binary, shared))
    names = [o.name for o in outputs]
    if len(set(names)) != len(names):
        raise RequestError("an output is requested twice")
    return tuple(outputs)


def decode_response(
    payload: bytes | bytearray, header_length: int | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A reply's JSON header and its outputs as arrays (the client side of encode_response).

    An error reply comes back as its header with no outputs.
    """
    header, tail = split_payload(payload, header_length)
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for index, raw in enumerate(header.get("outputs") or []):
        name, _, array, used = _decode_tensor(raw, index, tail, offset, len(payload), kind="output")
        if isinstance(array, np.ndarray):  # not an output the agent put in shared memory
            outputs[name] = array
        offset += used
    return header, outputs


def encode_request(
    inputs: Mapping[str, np.ndarray],
    request_id: str | None = None,
    *,
    binary: bool = True,
    binary_outputs: bool = True,
    outputs: Sequence[str] | None = None,
    reply_to: str | None = None,
) -> tuple[bytes, int | None]:
    """A request payload for `inputs`, and its JSON header length when binary data follows."""
    entries, blobs = _encode_tensors((name, array, binary) for name, array in inputs.items())
    request: dict[str, Any] = {}
    if request_id is not None:
        request["id"] = request_id
    if reply_to is not None:
        request["reply_to"] = reply_to
    request["inputs"] = entries
    if outputs is not None:
        request["outputs"] = [
            {"name": name, "parameters": {"binary_data": binary_outputs}} for name in outputs
        ]
    elif binary_outputs:
        request["parameters"] = {"binary_data_output": True}
    return _with_blobs(request, blobs)


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | int | None,
    outputs: Sequence[tuple[str, np.ndarray, bool]],
    parameters: Mapping[str, Any] | None = None,
    shared: Mapping[str, SharedMemoryRef] | None = None,
) -> tuple[bytes, int | None]:
    """The reply payload, and the JSON header's length when binary outputs follow it.

    `outputs` holds (name, array, as_binary) in the order the reply lists them; those
    named in `shared` were written there and are described without their data.
    """
    entries, blobs = _encode_tensors(outputs, shared)
    reply: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        reply["id"] = request_id
    if parameters:
        reply["parameters"] = dict(parameters)
    reply["outputs"] = entries
    return _with_blobs(reply, blobs)


def _encode_tensors(
    tensors: Iterable[tuple[str, np.ndarray, bool]],
    shared: Mapping[str, SharedMemoryRef] | None = None,
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Tensor entries for a JSON header, and the raw bytes of those sent as binary."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array, binary in tensors:
        datatype = datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if shared and name in shared:
            entry["parameters"] = shared[name].parameters()
        elif binary:
            blob = _to_bytes(array, datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json(array, datatype)
        entries.append(entry)
    return entries, blobs


def _with_blobs(header: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, int | None]:
    """The payload: the JSON header, then the binary data; and the header's length if any."""
    encoded = _COMPACT.encode(header).encode()
    if not blobs:
        return encoded, None
    return b"".join([encoded, *blobs]), len(encoded)


def encode_error(
    message: str, code: int, request_id: str | int | None = None, model_name: str | None = None
) -> bytes:
    """An error reply: `{"error", "code"}` plus the request id and model when known.

    The message is cut to MAX_ERROR_CHARS: it may quote what the client sent.
    """
    if len(message) > MAX_ERROR_CHARS:
        message = message[: MAX_ERROR_CHARS - 1] + "…"
    reply: dict[str, Any] = {"error": message, "code": code}
    if request_id is not None:
        reply["id"] = request_id
    if model_name is not None:
        reply["model_name"] = model_name
    return _COMPACT.encode(reply).encode()


def tensor_buffer(array: np.ndarray) -> memoryview:
    """The tensor's bytes as the binary and shared-memory extensions lay them out: a view
    when the array already is contiguous little-endian, else a copy."""
    datatype = datatype_of(array)
    if datatype == "BYTES":
        return memoryview(_to_bytes(array, datatype))
    flat = np.ascontiguousarray(array, dtype=_LITTLE[datatype]).reshape(-1)
    return memoryview(cast(Any, flat)).cast("B")


def _to_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = item.encode() if isinstance(item, str) else bytes(item)
            parts += [struct.pack("<I", len(data)), data]
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=_LITTLE[datatype]).tobytes()


def _to_json(array: np.ndarray, datatype: str) -> list[Any]:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [
            item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
            for item in flat
        ]
    values: list[Any] = flat.tolist()
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        # Strict JSON: no bare NaN/Infinity (see NON_FINITE).
        values = [v if math.isfinite(v) else _non_finite_text(v) for v in values]
    return values


def _non_finite_text(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


_PEEK_BYTES = 65536
_REPLY_TO = re.compile(rb'"reply_to"\s*:\s*("(?:[^"\\]|\\.){0,65535}")')
_ID = re.compile(rb'"id"\s*:\s*("(?:[^"\\]|\\.){0,1024}"|-?[0-9]{1,20}[,}\s])')


def peek_reply_fields(payload: bytes | bytearray) -> tuple[str | int | None, str | None]:
    """A best guess at the `id` and `reply_to` of a request, without parsing it.

    For answering an MQTT 3.1.1 request that is shed unparsed: only the first 64 KiB are
    searched, so clients should put `id` and `reply_to` first (`edge-agent infer` does).
    """
    head = bytes(payload[:_PEEK_BYTES])
    reply_to = request_id = None
    if found := _REPLY_TO.search(head):
        try:
            value = json.loads(found.group(1))
        except ValueError:
            value = None
        reply_to = value if isinstance(value, str) else None
    if found := _ID.search(head):
        try:
            literal = json.loads(found.group(1).rstrip(b",} \t\r\n"))
        except ValueError:
            literal = None
        request_id = literal if isinstance(literal, str | int) else None
    return request_id, reply_to
