"""Hostile input and faults: a seeded generator of hostile requests and control commands,
a loop that sends them, and a client that survives broker faults.

What the fuzzing report of issue 12 found, kept findable: mutated Open Inference Protocol
requests (hostile values in every field, byte-level damage, wrong binary lengths, deep
nesting, huge literals) and control bodies, sent over MQTT 5 with a reply address, with a
valid request interleaved after every window so that a stalled MQTT thread shows up as the
valid request's latency. Loopback only; bounded in count and in time.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.protocol import encode_request
from tests.conftest import HEADER, Probe

_RAW = "\x00raw{}\x00"  # a placeholder replaced by raw JSON text after json.dumps


def _raw(index: int) -> str:
    return _RAW.format(index)


@dataclass(frozen=True, slots=True)
class Case:
    """One payload to send: where, what, and the binary header length if any."""

    kind: str  # "infer" or "control"
    target: str  # model or command (a single topic level)
    payload: bytes
    header_length: str | None = None  # as sent in the user property (may be junk)


def _valid_tensor(rng: random.Random) -> dict[str, Any]:
    rows = rng.randint(1, 3)
    return {
        "name": "x",
        "shape": [rows, 4],
        "datatype": "FP32",
        "data": [rng.uniform(-5, 5) for _ in range(rows * 4)],
    }


def _hostile_values(rng: random.Random) -> list[Any]:
    """Values that broke, or could break, a decoder that trusts its input."""
    depth = rng.choice([50, 999, 1001, 5000])
    return [
        None,
        True,
        False,
        0,
        -1,
        2**31,
        2**63,
        2**64,
        -(2**63) - 1,
        1e308,
        -0.0,
        1.9,
        "",
        "1.5",
        "NaN",
        "x" * rng.choice([1, 300, 70_000]),
        "\u0000",
        "\ud800",
        "\uffff",
        "a/+/#",
        "$SYS/x",
        "FP32",
        "BYTES",
        "BOOL",
        "é日本\U0001f600",
        [],
        {},
        [[]],
        [1] * rng.choice([33, 65, 200]),
        [0, 2**62],
        [2**62] * rng.choice([2, 100, 10_000]),
        ["FP32"],
        {"a": {"b": []}},
        json.loads("[" * 40 + "]" * 40),
        _RawText("[" * depth + "]" * depth),
        _RawText("7" * rng.choice([21, 4299, 4301, 20_000])),
        _RawText("NaN"),
        _RawText("-Infinity"),
        _RawText("1e999999"),
    ]


@dataclass(frozen=True, slots=True)
class _RawText:
    """JSON text inserted verbatim (what json.dumps cannot produce: huge literals, NaN)."""

    text: str


def _dumps(value: Any) -> bytes:
    raws: list[str] = []

    def swap(item: Any) -> Any:
        if isinstance(item, _RawText):
            raws.append(item.text)
            return _raw(len(raws) - 1)
        if isinstance(item, dict):
            return {k: swap(v) for k, v in item.items()}
        if isinstance(item, list):
            return [swap(v) for v in item]
        return item

    text = json.dumps(swap(value))
    for index, raw in enumerate(raws):
        text = text.replace(json.dumps(_raw(index)), raw)
    return text.encode("utf-8", "surrogatepass")


# Where a hostile value goes: a request field, a tensor's (t.), an output's (o.) or a
# parameter (p.); t.dim and t.elem are one dimension and one data element.
_TARGETS = (
    *("id", "inputs", "outputs", "parameters", "extra", "reply_to"),
    *("t.name", "t.shape", "t.datatype", "t.data", "t.parameters", "t.dim", "t.elem"),
    *("o.name", "o.parameters", "p.binary_data_output", "t.binary_data_size"),
)


@dataclass
class PayloadFuzzer:
    """Seeded: the same seed gives the same cases."""

    seed: int
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def case(self) -> Case:
        roll = self.rng.random()
        if roll < 0.45:
            return self._field_mutation()
        if roll < 0.6:
            return self._byte_mutation()
        if roll < 0.72:
            return self._binary_mutation()
        if roll < 0.9:
            return self._control()
        if roll < 0.95:
            return self._large()
        return Case("infer", self._model(), self.rng.randbytes(self.rng.randint(0, 300)))

    def _model(self) -> str:
        return self.rng.choice(["scale", "scale", "scale", "pair", "digits", "nope", "s" * 300])

    def _request(self) -> dict[str, Any]:
        request: dict[str, Any] = {"id": f"f{self.rng.randint(0, 10**6)}"}
        request["inputs"] = [_valid_tensor(self.rng)]
        if self.rng.random() < 0.3:
            request["outputs"] = [{"name": "y"}]
        if self.rng.random() < 0.2:
            request["parameters"] = {"binary_data_output": True}
        return request

    def _field_mutation(self) -> Case:
        request = self._request()
        value = self.rng.choice(_hostile_values(self.rng))
        tensor = request["inputs"][0]
        target = self.rng.choice(_TARGETS)
        if target.startswith("t."):
            key = target[2:]
            if key == "dim":
                tensor["shape"][self.rng.randrange(len(tensor["shape"]))] = value
            elif key == "elem":
                tensor["data"][self.rng.randrange(len(tensor["data"]))] = value
            elif key == "binary_data_size":
                tensor.pop("data")
                tensor["parameters"] = {"binary_data_size": value}
            else:
                tensor[key] = value
        elif target.startswith("o."):
            request["outputs"] = [{"name": "y", target[2:]: value}]
        elif target.startswith("p."):
            request["parameters"] = {target[2:]: value}
        else:
            request[target] = value
        return Case("infer", self._model(), _dumps(request))

    def _byte_mutation(self) -> Case:
        data = bytearray(_dumps(self._request()))
        for _ in range(self.rng.randint(1, 8)):
            op = self.rng.random()
            pos = self.rng.randrange(len(data)) if data else 0
            if op < 0.4 and data:
                data[pos] = self.rng.randrange(256)
            elif op < 0.6:
                data[pos:pos] = self.rng.randbytes(self.rng.randint(1, 16))
            elif op < 0.8:
                del data[pos : pos + self.rng.randint(1, 16)]
            else:
                data = data[:pos]
        return Case("infer", self._model(), bytes(data))

    def _binary_mutation(self) -> Case:
        rows = self.rng.randint(1, 4)
        dtype = self.rng.choice([np.float32, np.float64, np.int64, np.uint8, np.bool_])
        tensor = np.ones((rows, 4), dtype=dtype)
        payload, length = encode_request({"x": tensor}, "b1", binary_outputs=True)
        header: str | None = str(length)
        roll = self.rng.random()
        if roll < 0.25:
            header = str(self.rng.choice([0, -1, len(payload) + 1, 2**40, 1]))
        elif roll < 0.4:
            header = self.rng.choice(["", "twelve", "1e3", " 7", "٣"])
        elif roll < 0.6:
            payload = payload[: self.rng.randint(0, len(payload))]
        elif roll < 0.75:
            payload += self.rng.randbytes(self.rng.randint(1, 64))
        elif roll < 0.85:
            header = None
        strings = self.rng.random() < 0.15
        if strings:
            blob = self.rng.randbytes(self.rng.randint(0, 40))
            head = _dumps(
                {
                    "inputs": [
                        {
                            "name": "x",
                            "shape": [self.rng.randint(0, 3)],
                            "datatype": "BYTES",
                            "parameters": {"binary_data_size": len(blob)},
                        }
                    ]
                }
            )
            payload, header = head + blob, str(len(head))
        return Case("infer", self._model(), payload, header)

    def _control(self) -> Case:
        command = self.rng.choice(["models", "models", "pin", "unpin", "nope", "x" * 300, "é日本"])
        roll = self.rng.random()
        if roll < 0.5:
            body: Any = {
                self.rng.choice(["model", "variant", "reply_to", "x"]): self.rng.choice(
                    _hostile_values(self.rng)
                )
            }
            payload = _dumps(body)
        elif roll < 0.7:
            depth = self.rng.choice([10, 1000, 5000])
            payload = b"[" * depth + b"]" * depth
        elif roll < 0.85:
            payload = self.rng.randbytes(self.rng.randint(0, 64))
        else:
            payload = _dumps(self.rng.choice(_hostile_values(self.rng)))
        return Case("control", command, payload)

    def _large(self) -> Case:
        rows = self.rng.randint(2_000, 20_000)
        request = {
            "id": "big",
            "inputs": [
                {"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": [0.25] * (rows * 4)}
            ],
        }
        if self.rng.random() < 0.5:
            request["inputs"][0]["data"][self.rng.randrange(rows * 4)] = "junk"
        return Case("infer", "scale", _dumps(request))


VALID = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
).encode()


@dataclass
class FuzzReport:
    """What a run found: payloads sent and unanswered, valid requests' worst latency."""

    sent: int = 0
    unanswered: list[Case] = field(default_factory=list)
    valid_sent: int = 0
    valid_wrong: int = 0
    worst_valid_s: float = 0.0
    codes: dict[int, int] = field(default_factory=dict)


def run_fuzz(
    probe: Probe,
    device_topic: str,
    *,
    seed: int,
    count: int,
    budget_s: float,
    window: int = 25,
    reply_timeout_s: float = 10.0,
) -> FuzzReport:
    """Send up to `count` fuzzed payloads (stopping after `budget_s`), `window` at a time,
    each window followed by a valid request; wait for every reply of a window."""
    fuzzer = PayloadFuzzer(seed)
    report = FuzzReport()
    deadline = time.monotonic() + budget_s
    while report.sent < count and time.monotonic() < deadline:
        pending: dict[bytes, Case] = {}
        for _ in range(min(window, count - report.sent)):
            case = fuzzer.case()
            key = f"f{report.sent}".encode()
            pending[key] = case
            _publish(probe, device_topic, case, key)
            report.sent += 1
        valid_key = f"v{report.valid_sent}-{uuid.uuid4().hex[:6]}".encode()
        report.valid_sent += 1
        valid_start = time.monotonic()
        _publish(probe, device_topic, Case("infer", "scale", VALID), valid_key)
        waiting = {*pending, valid_key}
        until = time.monotonic() + reply_timeout_s
        while waiting and time.monotonic() < until:
            try:
                msg = probe.messages.get(timeout=0.2)
            except Exception:  # queue.Empty: keep waiting until the window's deadline
                continue
            key = getattr(msg.properties, "CorrelationData", None)
            if key not in waiting:
                continue
            waiting.discard(key)
            code = _code(msg.payload, msg.properties)
            report.codes[code] = report.codes.get(code, 0) + 1
            if key == valid_key:
                report.worst_valid_s = max(report.worst_valid_s, time.monotonic() - valid_start)
                if code != 200:
                    report.valid_wrong += 1
        report.unanswered += [pending[k] for k in waiting if k in pending]
        if valid_key in waiting:
            report.valid_wrong += 1
    return report


def _publish(probe: Probe, device_topic: str, case: Case, key: bytes) -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = probe.reply_topic
    props.CorrelationData = key
    if case.header_length is not None:
        props.UserProperty = [(HEADER, case.header_length)]
    probe.publish(f"{device_topic}/{case.kind}/{case.target}", case.payload, props)


def _code(payload: bytes, properties: Any) -> int:
    length = None
    for key, value in getattr(properties, "UserProperty", []):
        if key == HEADER:
            length = int(value)
    try:
        header = json.loads(payload[:length] if length else payload)
    except ValueError:
        return -1
    if not isinstance(header, dict):
        return -1
    code = header.get("code", 200)
    return code if isinstance(code, int) else -1


class ResubscribingClient:
    """An MQTT 5 client that subscribes again on every (re)connection, as a robust app does."""

    def __init__(self, port: int) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.reply_topic = f"test/replies/{uuid.uuid4().hex[:8]}"
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"faults-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.reconnect_delay_set(0.1, 0.2)  # back before the agent (1 s)
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_args: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(5)

    def _on_connect(self, client: mqtt.Client, *_args: object) -> None:
        client.subscribe(self.reply_topic, qos=1)

    def send(self, topic: str, payload: bytes, key: bytes, header_length: int | None) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = key
        if header_length is not None:
            props.UserProperty = [("Inference-Header-Content-Length", str(header_length))]
        self.client.publish(topic, payload, qos=1, properties=props)

    def replies(self, count: int, timeout: float) -> set[bytes]:
        """The Correlation Data of up to `count` replies received within `timeout` s."""
        return set(self.messages_for(count, timeout))

    def messages_for(self, count: int, timeout: float) -> dict[bytes, mqtt.MQTTMessage]:
        """Up to `count` replies received within `timeout` s, by Correlation Data."""
        got: dict[bytes, mqtt.MQTTMessage] = {}
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            try:
                msg = self.messages.get(timeout=0.2)
            except queue.Empty:
                continue
            got[msg.properties.CorrelationData] = msg
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
