"""Open Inference Protocol (KServe v2) messages: decoding requests, encoding replies.

Requests are JSON, optionally followed by raw tensor bytes (the binary-data extension: the
JSON header's length travels beside the payload, as the `Inference-Header-Content-Length`
MQTT 5 user property). This module knows bytes and JSON only: no MQTT, no onnxruntime.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.datatypes import NUMPY_DTYPES, datatype_of
from agent.errors import InvalidRequest

HEADER_LENGTH_PROPERTY = "Inference-Header-Content-Length"

# One encoder for every reply: json.dumps(..., separators=...) builds a new one each call.
_COMPACT = json.JSONEncoder(separators=(",", ":"))

_LITTLE = {name: dtype.newbyteorder("<") for name, dtype in NUMPY_DTYPES.items()}


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for, and whether it wants it as raw bytes."""

    name: str
    binary: bool


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


class RequestError(InvalidRequest):
    """An invalid request, with whatever could be read of where to send the error reply."""

    def __init__(
        self, message: str, request_id: str | int | None = None, reply_to: str | None = None
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.reply_to = reply_to


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
        header, tail = _loads(view[:header_length].tobytes()), view[header_length:]
    else:
        try:
            header, tail = json.loads(payload), view[len(payload) :]
        except UnicodeDecodeError:
            header, tail = _leading_json(payload)
        except json.JSONDecodeError as exc:
            if not exc.msg.startswith("Extra data"):
                raise RequestError(f"malformed JSON: {exc}") from None
            header, tail = _leading_json(payload)
    if not isinstance(header, dict):
        raise RequestError("the request must be a JSON object")
    return header, tail


def _loads(raw: bytes | bytearray) -> Any:
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise RequestError("request header is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"malformed JSON: {exc}") from None


def _leading_json(payload: bytes | bytearray) -> tuple[Any, memoryview]:
    # latin-1 maps each byte to one character, so the decoder's end index is a byte offset;
    # multi-byte UTF-8 only occurs inside JSON strings and cannot end the value early.
    try:
        _, end = json.JSONDecoder().raw_decode(payload.decode("latin-1"))
    except json.JSONDecodeError:
        raise RequestError("payload is neither JSON nor a JSON header with binary data") from None
    return _loads(payload[:end]), memoryview(payload)[end:]


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
    try:
        return _decode(header, tail, request_id, reply_to)
    except RequestError as exc:
        exc.request_id, exc.reply_to = request_id, reply_to
        raise


def _decode(
    header: Mapping[str, Any], tail: memoryview, request_id: str | int | None, reply_to: str | None
) -> InferenceRequest:
    unknown = set(header) - {"id", "inputs", "outputs", "parameters", "reply_to"}
    if unknown:
        raise RequestError(f"unknown request fields: {sorted(unknown)}")
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
    offset = 0
    for index, raw in enumerate(raw_inputs):
        name, datatype, array, used = _decode_tensor(raw, index, tail, offset)
        if name in inputs:
            raise RequestError(f"input {name!r} appears twice")
        inputs[name], datatypes[name] = array, datatype
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
    )


def _decode_tensor(
    raw: Any, index: int, tail: memoryview, offset: int, kind: str = "input"
) -> tuple[str, str, np.ndarray, int]:
    if not isinstance(raw, dict):
        raise RequestError(f"{kind}s[{index}] must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise RequestError(f"{kind}s[{index}].name must be a non-empty string")
    datatype = raw.get("datatype")
    if datatype not in NUMPY_DTYPES:
        raise RequestError(
            f"{kind} {name!r}: datatype {datatype!r} is not one of {sorted(NUMPY_DTYPES)}"
        )
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise RequestError(f"{kind} {name!r}: shape must be a list of non-negative integers")
    shape_t = tuple(shape)
    count = math.prod(shape_t)
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(f"{kind} {name!r}: parameters must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in raw:
            raise RequestError(f"{kind} {name!r}: has both data and binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RequestError(f"{kind} {name!r}: binary_data_size must be a non-negative integer")
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
            array = np.array(data, dtype=object).reshape(-1)
            array = np.array([s.encode() if isinstance(s, str) else s for s in array], dtype=object)
            if not all(isinstance(s, bytes) for s in array):
                raise ValueError("BYTES elements must be strings")
        elif datatype == "BOOL":
            array = np.array(data, dtype=object).reshape(-1)
            if not all(isinstance(v, bool) for v in array):
                raise ValueError("BOOL elements must be true or false")
            array = array.astype(np.bool_)
        else:
            array = np.array(data, dtype=NUMPY_DTYPES[datatype]).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise RequestError(f"{label}: data is not a list of {datatype}: {exc}") from None
    if array.size != count:
        raise RequestError(
            f"{label}: {array.size} data elements, shape {list(shape)} needs {count}"
        )
    return array.reshape(shape)


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
        outputs.append(RequestedOutput(item["name"], binary))
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
        name, _, array, used = _decode_tensor(raw, index, tail, offset, kind="output")
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
) -> tuple[bytes, int | None]:
    """The reply payload, and the JSON header's length when binary outputs follow it.

    `outputs` holds (name, array, as_binary) in the order the reply lists them.
    """
    entries, blobs = _encode_tensors(outputs)
    reply: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        reply["id"] = request_id
    if parameters:
        reply["parameters"] = dict(parameters)
    reply["outputs"] = entries
    return _with_blobs(reply, blobs)


def _encode_tensors(
    tensors: Iterable[tuple[str, np.ndarray, bool]],
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Tensor entries for a JSON header, and the raw bytes of those sent as binary."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array, binary in tensors:
        datatype = datatype_of(array)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
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
    """An error reply: `{"error", "code"}` plus the request id and model when known."""
    reply: dict[str, Any] = {"error": message, "code": code}
    if request_id is not None:
        reply["id"] = request_id
    if model_name is not None:
        reply["model_name"] = model_name
    return _COMPACT.encode(reply).encode()


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
    return values
