"""A paho client configured from `MqttConfig`: protocol, TLS, credentials, TCP_NODELAY."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import struct
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from agent.config import MqttConfig


def build_client(
    config: MqttConfig,
    client_id: str,
    password: str | None = None,
    *,
    protocol: str | None = None,
) -> mqtt.Client:
    """A paho client (callback API v2) for `config`; `protocol` overrides config.protocol."""
    version = mqtt.MQTTv5 if (protocol or config.protocol) == "5" else mqtt.MQTTv311
    client = _Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=version,
        clean_session=None if version == mqtt.MQTTv5 else True,
    )
    if config.tcp_nodelay:
        # paho has no option for it. Without it (and `set_tcp_nodelay true` in mosquitto)
        # Nagle + delayed ACK add ~40 ms to each leg of a small QoS 1 exchange.
        client.on_socket_open = _set_nodelay
    if config.tls.enabled:
        tls = config.tls
        client.tls_set(
            ca_certs=str(tls.ca_file) if tls.ca_file else None,
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        client.tls_insecure_set(not tls.verify_hostname)
    if config.username is not None:
        client.username_pw_set(config.username, password)
    client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)
    # paho defaults to 20 QoS>0 messages in flight; replies to a burst of requests would
    # then wait on each other's acknowledgements.
    client.max_inflight_messages_set(1000)
    return client


class _Client(mqtt.Client):
    """paho's client with one wake-up of its network thread per burst of packets.

    paho's background thread sleeps in select() on the socket and on a self-pipe, and every
    packet queued (a reply, a PUBACK) writes a byte to that pipe so that the thread wakes
    and sends it: two system calls and a select round per packet. None is needed for a
    packet the network thread queues itself, in a callback (the PUBACK of every request,
    the reply of a request run inline): its loop selects for writing next, as a packet is
    waiting. And one byte per loop turn wakes the thread for all the replies a worker
    publishes meanwhile. (The bare echo the bench compares with, on paho's `loop_forever`,
    has no pipe at all.) Written against paho 2.x's `_packet_queue` and `_loop`.
    """

    _wake_pending = False

    def _loop(self, timeout: float = 1.0) -> MQTTErrorCode:
        # Cleared before the loop decides what to select for: a packet queued after this
        # either finds the flag down and wakes the loop, or is seen by its next turn.
        self._wake_pending = False
        return super()._loop(timeout)

    def _packet_queue(
        self,
        command: int,
        packet: bytes | bytearray,
        mid: int,
        qos: int,
        info: mqtt.MQTTMessageInfo | None = None,
    ) -> MQTTErrorCode:
        thread = self._thread
        if thread is None:  # no background thread (loop_forever): paho's own way
            return super()._packet_queue(command, packet, mid, qos, info)
        self._out_packet.append(
            {
                "command": command,
                "mid": mid,
                "qos": qos,
                "pos": 0,
                "to_process": len(packet),
                "packet": packet,
                "info": info,
            }
        )
        if threading.get_ident() != thread.ident and not self._wake_pending:
            self._wake_pending = True
            wake = self._sockpairW
            if wake is not None:
                with contextlib.suppress(BlockingIOError):  # full: a wake is pending anyway
                    wake.send(b"0")
        self._call_socket_register_write()
        return MQTTErrorCode.MQTT_ERR_SUCCESS


class ReplyProperties(Properties):
    """The PUBLISH properties of a reply (Correlation Data, User Properties), built fast.

    paho's generic Properties builds four lookup tables per instance and scans them on
    every attribute set and on pack: about 40 µs per reply, measured, a quarter of the
    agent's own time on a small request. A reply needs two properties with fixed codes.
    """

    # Shared, read-only copies of paho's tables, for __str__ and paho's debug logging.
    _prototype = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    types = _prototype.types
    names = _prototype.names
    properties = _prototype.properties

    def __init__(
        self, correlation: bytes | None = None, user: list[tuple[str, str]] | None = None
    ) -> None:
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        if correlation is not None:
            object.__setattr__(self, "CorrelationData", correlation)
        if user:
            object.__setattr__(self, "UserProperty", list(user))

    def pack(self) -> bytes:
        parts: list[bytes] = []
        correlation = getattr(self, "CorrelationData", None)
        if correlation is not None:
            parts += [b"\x09", _LENGTH.pack(len(correlation)), correlation]
        for key, value in getattr(self, "UserProperty", ()):
            k, v = key.encode(), value.encode()
            parts += [b"\x26", _LENGTH.pack(len(k)), k, _LENGTH.pack(len(v)), v]
        body = b"".join(parts)
        length = VariableByteIntegers.encode(len(body))  # type: ignore[no-untyped-call]
        return bytes(length) + body


_LENGTH = struct.Struct("!H")


def publish_properties() -> Properties:
    """Empty PUBLISH properties (paho's constructor carries no type annotations)."""
    return Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


def connect_properties() -> Properties:
    return Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]


def is_v5(client: mqtt.Client) -> bool:
    return bool(client.protocol == mqtt.MQTTv5)


def _set_nodelay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    # Not a TCP socket (a unix or websocket transport): nothing to tune.
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


MQTT_MAX_PACKET = 268_435_455
"""The largest packet MQTT can express (a 4-byte remaining length)."""

# What MQTT forbids in a topic name, or mosquitto refuses: U+0000, the C0 and C1 control
# characters, lone surrogates (they cannot be UTF-8 encoded) and the non-characters
# U+FDD0..U+FDEF and U+xxFFFE/U+xxFFFF of every plane (MQTT 5 1.5.4, 3.1.1 1.5.3).
_FORBIDDEN = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(17))
    + "]"
)


def topic_problem(topic: str) -> str | None:
    """Why `topic` cannot be published to, or None when the broker will take it."""
    if not topic:
        return "empty"
    if _FORBIDDEN.search(topic):
        return "a control character, non-character or lone surrogate"
    if "+" in topic or "#" in topic:
        return "a wildcard"
    if topic.startswith("$"):
        return "a $ topic"
    if len(topic.encode("utf-8")) > 65535:
        return "longer than 65535 bytes"
    return None


def publish_overhead(topic: str, correlation: bytes | None, v5: bool) -> int:
    """Bytes a PUBLISH adds around its payload (a safe upper bound, for size checks)."""
    overhead = 1 + 4 + 2 + len(topic.encode("utf-8")) + 2  # header, length, topic, packet id
    if v5:
        # property length, correlation data, the header-length user property
        overhead += 4 + (3 + len(correlation) if correlation else 0) + 64
    return overhead
