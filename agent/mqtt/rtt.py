"""Measures the broker's round trip once the agent is connected, and warns when it is slow.

mosquitto without `set_tcp_nodelay true` holds back a small packet written right after
another (Nagle's algorithm) until the client acknowledges the first, which Linux delays up
to 40 ms: every request/reply exchange then costs ~40 ms more. Two short-lived clients of
our own play application and agent for a few QoS 1 request/reply exchanges: the broker
writes the requester's PUBACK, then the reply a moment later on the same socket, which is
what Nagle holds back.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import structlog

from agent.config import MqttConfig
from agent.mqtt.connection import build_client

log = structlog.get_logger(__name__)

# Nagle against delayed ACK costs ~40 ms; a broker on loopback or a LAN answers in 1-5 ms.
SLOW_MS = 20.0
SAMPLES = 7
FIX = (
    "mosquitto without `set_tcp_nodelay true` delays small packets ~40 ms (Nagle): "
    "`edge-agent install-service` places /etc/mosquitto/conf.d/edge-agent.conf with it "
    "(or add the line to mosquitto.conf), then `systemctl restart mosquitto`"
)


@dataclass(frozen=True)
class RoundTrip:
    """What the probe measured: request published until its reply arrived, in ms."""

    median_ms: float
    fastest_ms: float
    samples: int

    @property
    def slow(self) -> bool:
        return self.median_ms >= SLOW_MS


class _Client:
    """One paho client of the probe, with events for its acknowledgements."""

    def __init__(self, config: MqttConfig, password: str | None, role: str) -> None:
        client_id = f"{config.effective_client_id}-rtt-{role}-{uuid.uuid4().hex[:6]}"
        self.client = build_client(config, client_id, password)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_args: self.subscribed.set()

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if not reason.is_failure:
            self.connected.set()

    def start(self, config: MqttConfig, topic: str, timeout: float) -> bool:
        try:
            self.client.connect(config.host, config.port, keepalive=config.keepalive_s)
        except (OSError, ValueError):
            return False
        self.client.loop_start()
        if not self.connected.wait(timeout):
            return False
        self.client.subscribe(topic, qos=1)
        return self.subscribed.wait(timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def measure(
    config: MqttConfig, password: str | None, *, samples: int = SAMPLES, timeout: float = 3.0
) -> RoundTrip | None:
    """Time `samples` QoS 1 request/reply exchanges between two clients of our own, as
    an application and the agent do; None when it could not be done.

    The topics are under `<prefix>/reply/<device_id>/`, which the shipped ACL lets a device
    both publish (replies) and read (its own reply topics).
    """
    root = f"{config.prefix}/reply/{config.device_id}/rtt-{uuid.uuid4().hex[:6]}"
    requests, replies = f"{root}/request", f"{root}/reply"
    requester = _Client(config, password, "app")
    responder = _Client(config, password, "agent")
    answered = threading.Event()
    requester.client.on_message = lambda *_args: answered.set()

    def answer(client: Any, _userdata: Any, msg: Any) -> None:
        client.publish(replies, msg.payload, qos=1)

    responder.client.on_message = answer
    try:
        if not (
            responder.start(config, requests, timeout) and requester.start(config, replies, timeout)
        ):
            return None
        times: list[float] = []
        for index in range(samples):
            answered.clear()
            start = time.monotonic()
            requester.client.publish(requests, str(index).encode(), qos=1)
            if not answered.wait(timeout):
                return None
            times.append(time.monotonic() - start)
        return RoundTrip(
            median_ms=statistics.median(times) * 1000.0,
            fastest_ms=min(times) * 1000.0,
            samples=samples,
        )
    finally:
        requester.close()
        responder.close()


def check(config: MqttConfig, password: str | None) -> RoundTrip | None:
    """Measure and log: a warning with the fix when the round trip is slow."""
    try:
        result = measure(config, password)
    except Exception:  # a probe must never hurt the agent it is measuring for
        log.exception("broker_round_trip_failed")
        return None
    where: dict[str, Any] = {"host": config.host, "port": config.port}
    if result is None:
        log.info("broker_round_trip_unmeasured", **where)
    elif result.slow:
        log.warning(
            "broker_round_trip_slow",
            median_ms=round(result.median_ms, 1),
            fastest_ms=round(result.fastest_ms, 1),
            samples=result.samples,
            fix=FIX,
            **where,
        )
    else:
        log.info(
            "broker_round_trip",
            median_ms=round(result.median_ms, 2),
            samples=result.samples,
            **where,
        )
    return result


def check_in_background(config: MqttConfig, password: str | None) -> threading.Thread:
    """`check` on a daemon thread of its own: the agent serves meanwhile."""
    thread = threading.Thread(target=check, args=(config, password), name="broker-rtt", daemon=True)
    thread.start()
    return thread


__all__ = ["FIX", "SLOW_MS", "RoundTrip", "check", "check_in_background", "measure"]
