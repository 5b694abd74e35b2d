"""The client side: send requests to agents and wait for their replies.

Speaks MQTT 5 (Response Topic + Correlation Data) and falls back to MQTT 3.1.1, where the
reply topic and the request id travel in the JSON instead. Used by `edge-agent infer`,
`edge-agent status` and the benchmark.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import MqttConfig
from agent.mqtt.connection import build_client, publish_properties
from agent.protocol import HEADER_LENGTH_PROPERTY


class RequesterError(RuntimeError):
    """No connection to the broker, or no reply in time."""


@dataclass(frozen=True)
class Reply:
    """A reply as received: payload, JSON header length (binary replies) and topic."""

    payload: bytes | bytearray
    header_length: int | None
    topic: str


class Requester:
    """A connected client with its own reply topic."""

    def __init__(
        self,
        config: MqttConfig,
        protocol: str = "auto",
        password: str | None = None,
        client_id: str | None = None,
    ) -> None:
        self._config = config
        self._protocol_choice = protocol
        self._password = password
        self.client_id = client_id or f"edge-client-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        # Under the user name when there is one: the shipped ACL lets a user read only
        # edge/reply/<user>/#, and an agent with mqtt.reply_prefix answers only there.
        user = config.username
        self.reply_topic = (
            f"{config.prefix}/reply/{user}/{self.client_id}"
            if user
            else f"{config.prefix}/reply/{self.client_id}"
        )
        self.protocol = ""
        self._client: mqtt.Client | None = None
        self._pending: dict[bytes, Future[Reply]] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._connected = threading.Event()
        self._refused: str | None = None
        self._retained: dict[str, bytes | bytearray] = {}
        self._retained_event = threading.Condition()

    def request_topic(self, topic: str) -> str:
        """`topic` with the user name as its last level when there is one: the ACL lets a
        user publish requests only there, which is how the agent knows who asks."""
        user = self._config.username
        return f"{topic}/{user}" if user else topic

    def connect(self, timeout: float = 5.0) -> str:
        """Connect (MQTT 5 first when `auto`); returns the protocol that worked."""
        choices = ["5", "3.1.1"] if self._protocol_choice == "auto" else [self._protocol_choice]
        errors = []
        for protocol in choices:
            try:
                self._connect(protocol, timeout)
            except RequesterError as exc:
                errors.append(f"MQTT {protocol}: {exc}")
                continue
            self.protocol = protocol
            return protocol
        raise RequesterError(
            f"cannot connect to {self._config.host}:{self._config.port}: " + "; ".join(errors)
        )

    def _connect(self, protocol: str, timeout: float) -> None:
        client = build_client(self._config, self.client_id, self._password, protocol=protocol)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        self._connected.clear()
        self._refused = None
        try:
            client.connect(self._config.host, self._config.port, keepalive=30)
        except (OSError, ValueError) as exc:
            raise RequesterError(str(exc)) from exc
        client.loop_start()
        if not self._connected.wait(timeout) or self._refused:
            client.loop_stop()
            client.disconnect()
            raise RequesterError(self._refused or "no CONNACK (broker does not speak it?)")
        self._client = client
        subscribed = client.subscribe(self.reply_topic, qos=1)
        if subscribed[0] != mqtt.MQTT_ERR_SUCCESS:
            raise RequesterError(f"cannot subscribe to {self.reply_topic}")

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    def __enter__(self) -> Requester:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def send(
        self,
        topic: str,
        payload: bytes,
        header_length: int | None = None,
        *,
        qos: int = 1,
        expiry_s: int | None = None,
    ) -> Future[Reply]:
        """Publish a request; the future completes with its reply."""
        client = self._require_client()
        token = f"{self.client_id}-{next(self._counter)}"
        future: Future[Reply] = Future()
        if self.protocol == "5":
            key = token.encode()
            props = publish_properties()
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = key
            if header_length is not None:
                props.UserProperty = [(HEADER_LENGTH_PROPERTY, str(header_length))]
            if expiry_s is not None:
                props.MessageExpiryInterval = expiry_s
            with self._lock:
                self._pending[key] = future
            client.publish(topic, payload, qos=qos, properties=props)
        else:
            # MQTT 3.1.1 has no properties: the reply address and the correlating id go in
            # the JSON header, and binary data must follow a header we rewrite.
            key, payload = _with_reply_fields(payload, header_length, token, self.reply_topic)
            with self._lock:
                self._pending[key] = future
            client.publish(topic, payload, qos=qos)
        return future

    def request(
        self,
        topic: str,
        payload: bytes,
        header_length: int | None = None,
        *,
        timeout: float = 10.0,
        qos: int = 1,
    ) -> Reply:
        """Send and wait for the reply, or raise RequesterError after `timeout` seconds."""
        future = self.send(topic, payload, header_length, qos=qos)
        try:
            return future.result(timeout)
        except TimeoutError:
            raise RequesterError(f"no reply on {self.reply_topic} within {timeout} s") from None

    def retained(self, topic_filter: str, wait: float) -> dict[str, bytes | bytearray]:
        """Retained messages under `topic_filter`, collected for `wait` seconds."""
        client = self._require_client()
        client.subscribe(topic_filter, qos=1)
        time.sleep(wait)
        client.unsubscribe(topic_filter)
        with self._retained_event:
            return {
                t: p for t, p in self._retained.items() if mqtt.topic_matches_sub(topic_filter, t)
            }

    def _require_client(self) -> mqtt.Client:
        if self._client is None:
            raise RequesterError("not connected")
        return self._client

    def _on_connect(
        self, _c: mqtt.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Properties | None
    ) -> None:
        if reason.is_failure:
            self._refused = f"broker refused: {reason}"
        self._connected.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic != self.reply_topic:
            if msg.retain:
                with self._retained_event:
                    self._retained[msg.topic] = msg.payload
            return
        props = getattr(msg, "properties", None)
        header_length = None
        for key, value in getattr(props, "UserProperty", ()):
            if key == HEADER_LENGTH_PROPERTY:
                header_length = int(value)
        correlation: bytes | None = getattr(props, "CorrelationData", None)
        if correlation is None:
            correlation = _reply_id(msg.payload)
        with self._lock:
            future = self._pending.pop(correlation, None) if correlation else None
        if future is not None:
            future.set_result(Reply(msg.payload, header_length, msg.topic))


def _with_reply_fields(
    payload: bytes, header_length: int | None, token: str, reply_to: str
) -> tuple[bytes, bytes]:
    """Put `reply_to` (and an id, when the request has none) into the JSON header."""
    end = header_length if header_length is not None else len(payload)
    header = json.loads(payload[:end])
    # id and reply_to first: an agent that sheds a request unparsed reads only its head.
    first = {"id": header.pop("id", token), "reply_to": reply_to}
    header.pop("reply_to", None)
    key = str(first["id"]).encode()
    return key, json.dumps({**first, **header}, separators=(",", ":")).encode() + payload[end:]


def _reply_id(payload: bytes | bytearray) -> bytes | None:
    try:
        _, end = json.JSONDecoder().raw_decode(payload.decode("latin-1"))
        header = json.loads(payload[:end])
    except ValueError:
        return None
    if isinstance(header, dict) and "id" in header:
        return str(header["id"]).encode()
    return None
