"""The Open Inference Protocol codec: every way a request can be wrong, and binary data."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import tritonclient.http as oip

from agent.protocol import (
    RequestError,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_response,
)


def request(**tensor: object) -> bytes:
    base: dict[str, object] = {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}
    base.update(tensor)
    return json.dumps({"id": "7", "inputs": [base]}).encode()


def test_json_request_becomes_typed_arrays() -> None:
    """JSON data (flat or nested) becomes a numpy array of the declared datatype and shape."""
    decoded = decode_request(request(data=[[1.5, 2]]))
    assert decoded.id == "7"
    assert decoded.datatypes == {"x": "FP32"}
    assert decoded.inputs["x"].dtype == np.float32
    assert decoded.inputs["x"].tolist() == [[1.5, 2.0]]
    assert decoded.outputs is None


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe\x00garbage\x80", "neither JSON nor a JSON header"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"inputs": []}', "'inputs' must be a non-empty list"),
        (b'{"inputs": [{"name": "x"}], "bogus": 1}', "unknown request fields"),
        (request(datatype="FLOAT"), "datatype 'FLOAT' is not one of"),
        (request(shape=[1, -2]), "shape must be a list of integers from 0 to"),
        (request(data=[1, 2, 3]), "3 data elements, shape [1, 2] needs 2"),
        (request(data=["a", "b"]), "data is not a list of FP32"),
        (request(datatype="INT8", data=[1, 300]), "data is not a list of INT8"),
        (request(datatype="BOOL", data=[1, 0]), "BOOL elements must be true or false"),
        (request(data=[[1], [2, 3]]), "data is not a list of FP32"),
        (
            json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}).encode(),
            "no data and no binary_data_size",
        ),
        (json.dumps({"id": {"a": 1}, "inputs": []}).encode(), "'id' must be a string"),
        (
            json.dumps(
                {
                    "inputs": [
                        {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
                        {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},
                    ]
                }
            ).encode(),
            "appears twice",
        ),
        (
            json.dumps(
                {
                    "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}],
                    "outputs": [{"name": "y"}, {"name": "y"}],
                }
            ).encode(),
            "requested twice",
        ),
    ],
)
def test_invalid_requests_are_refused_with_a_reason(payload: bytes, message: str) -> None:
    """Each malformed request raises RequestError with a message a client can act on."""
    with pytest.raises(RequestError) as info:
        decode_request(payload)
    assert message in str(info.value)
    assert info.value.code == 400


def test_request_id_and_reply_to_survive_a_decoding_error() -> None:
    """A 3.1.1 client still gets its error: reply_to and id are read before the failure."""
    payload = json.dumps({"id": "9", "reply_to": "r/t", "inputs": "nope"}).encode()
    with pytest.raises(RequestError) as info:
        decode_request(payload)
    assert (info.value.request_id, info.value.reply_to) == ("9", "r/t")


def test_binary_inputs_are_read_after_the_header() -> None:
    """Inputs with binary_data_size are sliced, in order, from the bytes after the header."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[1, -2]], dtype=np.int64)
    payload, header_length = encode_request({"a": a, "b": b}, "1")
    assert header_length is not None
    decoded = decode_request(payload, header_length)
    assert decoded.inputs["a"].tolist() == a.tolist()
    assert decoded.inputs["b"].tolist() == b.tolist()
    assert decoded.binary_output is True
    # MQTT 3.1.1 has no user property: the first JSON value is the header.
    assert decode_request(payload, None).inputs["b"].tolist() == b.tolist()


@pytest.mark.parametrize(
    ("header_length_delta", "tail_delta", "message"),
    [
        (10_000, 0, "binary header length"),
        (None, -4, "goes beyond the"),
        (None, 4, "4 bytes of binary data follow"),
    ],
)
def test_binary_length_errors(
    header_length_delta: int | None, tail_delta: int, message: str
) -> None:
    """A header length past the payload, or binary data too short or too long, is refused."""
    payload, header_length = encode_request({"x": np.ones((2, 2), np.float32)})
    assert header_length is not None
    if tail_delta < 0:
        payload = payload[:tail_delta]
    elif tail_delta > 0:
        payload += b"\0" * tail_delta
    length = header_length + (header_length_delta or 0)
    with pytest.raises(RequestError, match=message):
        decode_request(payload, length)


def test_binary_size_must_match_the_shape() -> None:
    """binary_data_size must be exactly shape x element size."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [2],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 4},
                }
            ]
        }
    ).encode()
    with pytest.raises(RequestError, match="4 bytes of data, shape \\[2\\] of FP32 needs 8"):
        decode_request(header + b"\0" * 4, len(header))


def test_bytes_tensors_both_ways() -> None:
    """BYTES elements are length-prefixed in binary and strings in JSON."""
    strings = np.array([b"ab", b"", "é".encode()], dtype=object)
    payload, header_length = encode_request({"s": strings})
    assert decode_request(payload, header_length).inputs["s"].tolist() == strings.tolist()
    decoded = decode_request(request(datatype="BYTES", shape=[2], data=["x", "yz"]))
    assert decoded.inputs["x"].tolist() == [b"x", b"yz"]
    blob = struct.pack("<I", 5) + b"abc"  # claims 5 bytes, carries 3
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "s",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    with pytest.raises(RequestError, match="BYTES element runs past"):
        decode_request(header + blob, len(header))


def test_response_round_trip_json_and_binary() -> None:
    """encode_response writes JSON data or binary tails that decode_response reads back."""
    probs = np.array([[0.25, 0.75]], dtype=np.float32)
    labels = np.array([1], dtype=np.int64)
    payload, header_length = encode_response(
        "m", "int8", "5", [("p", probs, True), ("l", labels, False)], {"total_ms": 1.0}
    )
    assert header_length is not None
    header, outputs = decode_response(payload, header_length)
    assert header["model_version"] == "int8"
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert outputs["p"].tolist() == probs.tolist()
    assert outputs["l"].tolist() == [1]
    plain, none = encode_response("m", "v", None, [("l", labels, False)])
    assert none is None and "id" not in json.loads(plain)


def test_error_reply_carries_code_and_id() -> None:
    """Error replies say what went wrong, with a status code and the request id."""
    assert json.loads(encode_error("bad", 400, "3", "digits")) == {
        "error": "bad",
        "code": 400,
        "id": "3",
        "model_name": "digits",
    }


def test_triton_client_requests_decode_unchanged() -> None:
    """A request body built by Triton's client library (binary inputs) decodes as sent."""
    pixels = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    tensor = oip.InferInput("input", [3, 64], "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    wanted = oip.InferRequestedOutput("probabilities", binary_data=True)
    body, header_length = oip.InferenceServerClient.generate_request_body(
        [tensor], outputs=[wanted], request_id="t1"
    )
    decoded = decode_request(body, header_length)
    assert decoded.id == "t1"
    np.testing.assert_array_equal(decoded.inputs["input"], pixels)
    assert decoded.outputs is not None and decoded.outputs[0].binary


def test_triton_client_parses_our_replies() -> None:
    """Triton's InferResult reads our binary and JSON outputs from the reply as is."""
    probs = np.random.default_rng(1).random((3, 10), dtype=np.float32)
    payload, header_length = encode_response(
        "digits", "fp32", "t1", [("probabilities", probs, True), ("label", probs.argmax(1), False)]
    )
    result = oip.InferResult.from_response_body(payload, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
    np.testing.assert_array_equal(result.as_numpy("label"), probs.argmax(1))
    assert result.get_response()["model_version"] == "fp32"


def test_bytes_length_prefix_is_little_endian() -> None:
    """BYTES elements use a 4-byte little-endian length, as the protocol specifies."""
    payload, header_length = encode_request({"s": np.array([b"abc"], dtype=object)})
    assert header_length is not None
    assert payload[header_length:] == struct.pack("<I", 3) + b"abc"


def _raw_tensor(**fields: object) -> bytes:
    tensor = {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2], **fields}
    return json.dumps({"id": "h", "inputs": [tensor]}).encode()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (_raw_tensor(datatype=["FP32"]), "datatype ['FP32'] is not one of"),
        (_raw_tensor(datatype={"a": 1}), "datatype {'a': 1} is not one of"),
        (_raw_tensor(shape=[1] * 33, data=[1]), "33 dimensions, at most 32"),
        (_raw_tensor(shape=[2**62] * 100_000), "shape must be a list of integers from 0 to"),
        (_raw_tensor(shape=[0, 2**70], data=[]), "more than 20 digits"),
        (_raw_tensor(shape=[0, 2**63], data=[]), "shape must be a list of integers from 0 to"),
        (_raw_tensor(shape=[65536, 65536], data=[]), "more than the"),
        (
            b'{"id": ' + b"7" * 5000 + b', "inputs": []}',
            "an integer literal has more than 20 digits",
        ),
        (
            _raw_tensor().replace(b"[1, 2]", b"[1, " + b"9" * 4299 + b"]", 1),
            "an integer literal has more than 20 digits",
        ),
        (b'{"inputs": ' + b"[" * 1000 + b"]" * 1000 + b"}", "nested deeper than 48"),
        (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper than 48"),
        (_raw_tensor(data=["1.5", 2]), "elements must be numbers"),
        (_raw_tensor(data=[None, 2]), "elements must be numbers"),
        (_raw_tensor(datatype="INT64", data=[1.9, 2]), "a fraction would be truncated"),
        (_raw_tensor(datatype="INT64", data=["1", 2]), "elements must be integers"),
        (_raw_tensor(datatype="UINT8", data=[-1, 2]), "outside [0, 255]"),
        (_raw_tensor(datatype="FP32", data=[True, False]), "elements must be numbers"),
        (_raw_tensor(datatype="FP32", data=[1e308, 1]), "outside the range of FP32"),
        (_raw_tensor(datatype="FP16", data=[70000, 1]), "outside the range of FP16"),
        (_raw_tensor(name="n" * 300), "name is longer than 256"),
        (json.dumps({"id": "i" * 2000, "inputs": []}).encode(), "'id' is longer than 1024"),
    ],
)
def test_hostile_requests_are_refused_cheaply_with_a_reason(payload: bytes, message: str) -> None:
    """Wrong types, huge ranks, dimensions, literals and nesting, and values a cast would
    change are refused with a 400 before any arithmetic on them."""
    with pytest.raises(RequestError) as info:
        decode_request(payload)
    assert message in str(info.value)
    assert info.value.code == 400
    assert len(str(info.value)) < 1000


def test_error_messages_quote_client_values_within_a_limit() -> None:
    """A 10 MB datatype is quoted in 200 characters, and every error reply is bounded."""
    with pytest.raises(RequestError) as info:
        decode_request(_raw_tensor(datatype="F" * 10_000_000))
    assert len(str(info.value)) < 400
    assert len(encode_error("x" * 10_000_000, 400)) < 1100


def test_integral_floats_and_non_finite_strings_are_read_exactly() -> None:
    """2.0 is a valid INT64 and "NaN"/"Infinity" are FP32 values, as the agent writes them."""
    assert decode_request(_raw_tensor(datatype="INT64", data=[2.0, -3])).inputs["x"].tolist() == [
        [2, -3]
    ]
    decoded = decode_request(_raw_tensor(data=["NaN", "-Infinity"])).inputs["x"]
    assert np.isnan(decoded[0, 0]) and decoded[0, 1] == -np.inf


def test_replies_are_strict_json_with_non_finite_floats_as_strings() -> None:
    """NaN and infinities in a JSON output become "NaN", "Infinity", "-Infinity"."""
    values = np.array([[np.nan, np.inf, -np.inf, 1.5]], dtype=np.float32)
    payload, _ = encode_response("m", "v", None, [("y", values, False)])

    def refuse(constant: str) -> None:
        raise AssertionError(f"bare {constant} in the reply")

    reply = json.loads(payload, parse_constant=refuse)
    assert reply["outputs"][0]["data"] == ["NaN", "Infinity", "-Infinity", 1.5]
    _, outputs = decode_response(payload)
    assert np.isnan(outputs["y"][0, 0]) and outputs["y"][0, 1:].tolist() == [np.inf, -np.inf, 1.5]
