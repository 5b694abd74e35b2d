"""The agent's MQTT front end: broker messages in, model manager calls, replies out.

Topics (prefix `edge`, device id `dev`):
    edge/dev/infer/<model>                  requests for this device
    $share/<group>/edge/fleet/infer/<model> requests load-balanced over a fleet
    edge/dev/control/<command>              operator commands (request/response)
    edge/dev/status                         retained status; last will `offline`
    edge/dev/events, edge/dev/metrics       what the agent does and how it performs

Replies go to the MQTT 5 Response Topic with the request's Correlation Data, or for MQTT
3.1.1 clients to the `reply_to` topic named in the request's JSON.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import structlog
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import MqttConfig
from agent.control import ControlCommands
from agent.dataplane import DataPlane, DecodeBacklog, Response, error_response, overloaded
from agent.errors import EdgeAgentError, InvalidRequest, PayloadTooLarge
from agent.events import Events
from agent.models import ModelManager
from agent.mqtt import rtt
from agent.mqtt.connection import (
    MQTT_MAX_PACKET,
    ReplyProperties,
    build_client,
    connect_properties,
    is_v5,
    publish_overhead,
    topic_problem,
)
from agent.mqtt.echo import BrokerEcho
from agent.protocol import (
    HEADER_LENGTH_PROPERTY,
    RequestError,
    load_json,
    peek_reply_fields,
)

log = structlog.get_logger(__name__)

StatusSource = Callable[[], dict[str, Any]]

MAX_COMMAND_BYTES = 65536
"""Largest control request: they are parsed on the network thread, and all are small."""

POISON_RECONNECTS = 3
"""Connections in a row that the broker closed within 3 s before pending publications are
dropped (see MqttFrontend._guard_against_poison)."""


@dataclass(frozen=True, slots=True)
class ReplyAddress:
    """Where a reply goes: topic, correlation data (MQTT 5) and QoS."""

    topic: str
    correlation: bytes | None
    qos: int


class MqttFrontend:
    """Connects to the broker, serves requests and publishes what the agent reports."""

    def __init__(
        self,
        config: MqttConfig,
        manager: ModelManager,
        control: ControlCommands,
        events: Events,
        status: StatusSource,
        password: str | None = None,
    ) -> None:
        self._config = config
        self._manager = manager
        self._control = control
        self._events = events
        self._status = status
        self._password = password
        root = config.device_topic
        self.status_topic = f"{root}/status"
        self.events_topic = f"{root}/events"
        self.metrics_topic = f"{root}/metrics"
        self._infer_prefix = f"{root}/infer/"
        self._fleet_prefix = f"{config.prefix}/fleet/infer/"
        self._control_prefix = f"{root}/control/"
        self._connected = threading.Event()
        self._commands = ThreadPoolExecutor(max_workers=1, thread_name_prefix="control")
        self._fleet_lock = threading.Lock()
        self._fleet_shed: set[str] = set()
        self._fleet_subscribed: set[str] = set()
        self._pending_commands = 0  # queued or running; bounded by max_pending_commands
        self._pending_lock = threading.Lock()
        self._plane = DataPlane(manager, config.max_payload_bytes, control.shared_memory)
        self._decoder = DecodeBacklog(config.decode_workers, config.decode_backlog_bytes)
        # The broker's Maximum Packet Size (MQTT 5 CONNACK), else the configured one.
        self._max_packet = min(config.max_packet_bytes, MQTT_MAX_PACKET)
        # Connections the broker dropped within seconds: a reply paho resends on every
        # reconnect may be what it refuses (see _on_connect).
        self._connected_at = 0.0
        self._short_sessions = 0
        self._subscribe_mid: int | None = None
        self._session_present = False
        self._accepting = True
        self._stopping = False
        self._last_loop = time.monotonic()
        self._disconnected_at = 0.0
        self._client = build_client(config, config.effective_client_id, password)
        self._v5 = is_v5(self._client)
        self._client.will_set(self.status_topic, self._state_payload("offline"), qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        # For the health check and systemd's STATUS= line (see "Health" below).
        self.broker_state = "connecting"
        self.heartbeat_topic = f"{root}/heartbeat"
        self._refusals = 0
        self._client.on_publish = self._on_publish
        self._client.on_connect_fail = self._on_connect_fail
        # Under the device's own reply topics, which the shipped ACL lets it read.
        owner = config.username or config.device_id
        self._echo = BrokerEcho(
            f"{config.prefix}/reply/{owner}/echo",
            lambda topic, payload: self._client.publish(topic, payload, qos=0),
        )

    @property
    def plane(self) -> DataPlane:
        return self._plane

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def subscriptions(self) -> list[str]:
        # The second level, when present, is the requester's user name (see _address).
        topics = [
            f"{self._infer_prefix}+",
            f"{self._infer_prefix}+/+",
            f"{self._control_prefix}+",
            f"{self._control_prefix}+/+",
            self._echo.topic,
        ]
        for name in sorted(self._fleet_wanted()):
            topics += self._fleet_topics(name)
        return topics

    # --- The fleet: shared subscriptions per model, so that one can be given away ---

    def _fleet_topics(self, model: str) -> list[str]:
        shared = f"$share/{self._config.fleet_group}/{self._fleet_prefix}{model}"
        return [shared, f"{shared}/+"]

    def _fleet_wanted(self) -> set[str]:
        if not self._config.fleet_group:
            return set()
        return set(self._manager.names()) - self._fleet_shed

    def set_fleet_membership(self, model: str, joined: bool) -> None:
        """Leave (joined False) or rejoin the fleet's shared subscription of `model`: while
        it is left, the broker gives that model's fleet requests to the other agents of the
        group; requests addressed to this device are still served."""
        with self._fleet_lock:
            if joined:
                self._fleet_shed.discard(model)
            else:
                self._fleet_shed.add(model)
        self.refresh_fleet()

    def refresh_fleet(self) -> None:
        """Subscribe the fleet topics of models loaded (or rejoined) since, unsubscribe
        those unloaded (or left)."""
        with self._fleet_lock:
            if not self.connected or not self._accepting:
                return
            wanted = self._fleet_wanted()
            added = sorted(wanted - self._fleet_subscribed)
            removed = sorted(self._fleet_subscribed - wanted)
            self._fleet_subscribed = wanted
        qos = self._config.qos
        if added:
            topics: list[tuple[str, Any]] = [
                (topic, SubscribeOptions(qos=qos) if self._v5 else qos)
                for n in added
                for topic in self._fleet_topics(n)
            ]
            self._client.subscribe(topics)
        if removed:
            self._client.unsubscribe([t for n in removed for t in self._fleet_topics(n)])

    def start(self) -> None:
        """Connect in the background; paho retries with backoff until the broker answers."""
        properties = None
        if self._v5:
            properties = connect_properties()
            properties.SessionExpiryInterval = self._config.session_expiry_s
        log.info(
            "broker_connecting",
            host=self._config.host,
            port=self._config.port,
            protocol=self._config.protocol,
            client_id=self._config.effective_client_id,
            tls=self._config.tls.enabled,
        )
        # The first connection of a run starts clean (no stale requests from a previous
        # run); reconnects resume the session, so the broker's queue survives a blip.
        self._client.connect_async(
            self._config.host,
            self._config.port,
            keepalive=self._config.keepalive_s,
            clean_start=mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self._client.loop_start()

    def broker_round_trip(self, window_s: float) -> list[float]:
        """The round trips (ms) of the echoes that came back through the broker in the
        last `window_s` seconds (see `echo`); sends the next one."""
        if self.connected and self._accepting:
            self._echo.send()
        return self._echo.trips(window_s)

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop_intake(self) -> None:
        """Stop taking requests (before draining the queues on shutdown)."""
        self._accepting = False
        if self.connected:
            self._client.unsubscribe(self.subscriptions)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish `stopped`, disconnect cleanly (no last will) and end the network thread."""
        self._stopping = True
        # A command under way (a pin loading a model) finishes and answers first.
        self._commands.shutdown(wait=True, cancel_futures=True)
        self._decoder.close(timeout)
        if self.connected:
            info = self._client.publish(
                self.status_topic, self._state_payload("stopped"), qos=1, retain=True
            )
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                log.warning("status_not_published", state="stopped")
        self._events.attach(None)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def publish_status(self) -> None:
        """Publish the retained status (models, active variants); after loads and swaps."""
        if self.connected:
            self._client.publish(
                self.status_topic, self._state_payload("online"), qos=1, retain=True
            )

    def publish_metrics(self, payload: dict[str, Any]) -> None:
        if self.connected:
            self._client.publish(self.metrics_topic, _json(payload), qos=0)

    def _publish_event(self, payload: dict[str, Any]) -> None:
        self._client.publish(self.events_topic, _json(payload), qos=self._config.qos)

    def _state_payload(self, state: str) -> bytes:
        body = self._status() if state == "online" else {}
        return _json({"state": state, "device": self._config.device_id, **body})

    # paho callbacks: they run on paho's network thread and must never raise.

    def _on_connect(
        self,
        client: mqtt.Client,
        _userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        self._last_loop = time.monotonic()
        if reason.is_failure:
            self._refusals += 1
            self.broker_state = f"refused by the broker: {reason} ({self._refusals} attempts)"
            self._events.emit(
                "broker_refused",
                reason=str(reason),
                host=self._config.host,
                port=self._config.port,
                username=self._config.username,
                attempt=self._refusals,
                hint=_refusal_hint(reason),
            )
            return
        self._refusals = 0
        self.broker_state = "connected"
        self._max_packet = min(self._config.max_packet_bytes, MQTT_MAX_PACKET)
        if _properties is not None:
            announced = vars(_properties).get("MaximumPacketSize")
            if isinstance(announced, int) and announced > 0:
                self._max_packet = min(self._max_packet, announced)
        self._guard_against_poison(client)
        self._connected_at = time.monotonic()
        qos = self._config.qos
        with self._fleet_lock:
            self._fleet_subscribed = self._fleet_wanted()
        topics: list[tuple[str, Any]] = [
            (topic, SubscribeOptions(qos=qos) if self._v5 else qos) for topic in self.subscriptions
        ]
        self._session_present = bool(flags.session_present)
        if not self._accepting:
            self._ready()
            return
        # Ready only once the broker has acknowledged the subscriptions: a request sent
        # before that would find nobody subscribed.
        _, self._subscribe_mid = client.subscribe(topics)

    def _guard_against_poison(self, client: mqtt.Client) -> None:
        """Drop unacknowledged publications after repeated short-lived connections.

        paho resends every unacknowledged QoS 1 publication on reconnect; one the broker
        refuses (it disconnects the client) would take the agent offline forever. Replies
        are checked before they are published, so this is the last line of defence.
        """
        if not self._connected_at:
            return
        lasted = self._disconnected_at - self._connected_at
        self._short_sessions = self._short_sessions + 1 if 0 <= lasted < 3.0 else 0
        if self._short_sessions >= POISON_RECONNECTS:
            dropped = client.drop_out_messages()
            self._short_sessions = 0
            if dropped:
                log.warning(
                    "unsent_publications_dropped",
                    count=len(dropped),
                    topics=sorted({m.topic for m in dropped})[:5],
                    reason="the broker closed the connection soon after connecting, repeatedly",
                )

    def _on_subscribe(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        _properties: Properties | None,
    ) -> None:
        if mid != self._subscribe_mid:
            return
        for topic, reason in zip(self.subscriptions, reasons, strict=False):
            if reason.is_failure:
                self._events.emit("subscription_refused", topic=topic, reason=str(reason))
        self._ready()

    def _ready(self) -> None:
        self._connected.set()
        self._client.publish(self.status_topic, self._state_payload("online"), qos=1, retain=True)
        self._events.attach(self._publish_event)
        self._events.emit(
            "broker_connected",
            host=self._config.host,
            port=self._config.port,
            session_present=self._session_present,
        )
        rtt.check_in_background(self._config, self._password)  # warns of a slow broker (Nagle)

    def _on_disconnect(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._disconnected_at = time.monotonic()
        if was_connected and not self._stopping:
            self.broker_state = f"disconnected: {reason}; reconnecting"
        self._events.attach(None)
        if self._stopping:
            log.info("broker_disconnected", reason="agent stopping")
        elif was_connected:
            self._events.emit("broker_disconnected", reason=str(reason))

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        received = time.monotonic()
        self._last_loop = received
        topic = msg.topic
        try:
            if topic == self._echo.topic:
                self._echo.returned(msg.payload, received)
            elif topic.startswith(self._infer_prefix):
                self._infer(topic[len(self._infer_prefix) :], msg, received)
            elif topic.startswith(self._fleet_prefix):
                self._infer(topic[len(self._fleet_prefix) :], msg, received)
            elif topic.startswith(self._control_prefix):
                self._command(topic[len(self._control_prefix) :], msg)
            else:
                log.warning("unexpected_topic", topic=topic[:200])
        except Exception:  # one bad message must never stop the network loop
            log.exception("message_handler_failed", topic=topic[:200])

    # --- Inference: decoded here when small, by the decode workers when large ---

    def _infer(self, rest: str, msg: mqtt.MQTTMessage, received: float) -> None:
        model, _, user = rest.partition("/")
        props = _properties(msg)
        payload = msg.payload
        if len(payload) <= self._config.inline_decode_bytes:
            self._serve(model, user or None, payload, props, msg.qos, received)
            return
        if not self._decoder.offer(
            len(payload),
            lambda: self._serve(model, user or None, payload, props, msg.qos, received),
        ):
            # Behind: answer now, from what can be read without parsing the request.
            request_id, reply_to = (None, None)
            if props.get("ResponseTopic") is None:
                request_id, reply_to = peek_reply_fields(payload)
            address = self._address(
                props.get("ResponseTopic") or reply_to,
                props.get("CorrelationData"),
                msg.qos,
                user or None,
            )
            self._fail(address, model, request_id, overloaded("decoding requests"))

    def _serve(
        self,
        model: str,
        user: str | None,
        payload: bytes | bytearray,
        props: dict[str, Any],
        qos: int,
        received: float,
    ) -> None:
        """Decode, check and submit one request; every failure is answered if it can be."""
        response_topic: str | None = props.get("ResponseTopic")
        correlation: bytes | None = props.get("CorrelationData")
        address = self._address(response_topic, correlation, qos, user) if response_topic else None
        request_id: str | int | None = None
        try:
            try:
                header_length = _header_length(props.get("UserProperty", ()))
                request = self._plane.decode(payload, header_length, user)
            except RequestError as exc:
                if address is None and exc.reply_to:
                    address = self._address(exc.reply_to, correlation, qos, user)
                self._fail(address, model, exc.request_id, exc)
                return
            request_id = request.id
            if address is None and request.reply_to:
                address = self._address(request.reply_to, correlation, qos, user)
            if address is None:
                log.warning("request_without_reply_address", model=model, id=request.id)
                return
            expiry: int | None = props.get("MessageExpiryInterval")
            self._plane.infer(
                model,
                request,
                self._responder(address, model),
                deadline=received + expiry if expiry is not None else None,
                reply_limit=self._payload_limit(address),
                received=received,
            )
        except Exception as exc:  # whatever failed, a known address gets an answer
            if not isinstance(exc, EdgeAgentError):
                log.exception("request_handler_failed", model=model[:200])
            self._fail(address, model, request_id, exc)

    def _responder(self, address: ReplyAddress, model: str) -> Callable[[Response], None]:
        def respond(response: Response) -> None:
            if response.code != 200:
                log.warning(
                    "request_failed", model=model, code=response.code, reply_topic=address.topic
                )
            self._send(address, response.payload, response.header_length)

        return respond

    # --- Control commands: their own thread, a bounded backlog ---

    def _command(self, rest: str, msg: mqtt.MQTTMessage) -> None:
        command, _, user = rest.partition("/")
        props = _properties(msg)
        response_topic: str | None = props.get("ResponseTopic")
        correlation: bytes | None = props.get("CorrelationData")
        label = f"control/{command[:200]}"
        address = (
            self._address(response_topic, correlation, msg.qos, user or None)
            if response_topic
            else None
        )
        try:
            if len(msg.payload) > MAX_COMMAND_BYTES:
                raise PayloadTooLarge(
                    f"a control request of {len(msg.payload)} bytes exceeds the limit of "
                    f"{MAX_COMMAND_BYTES}"
                )
            body = load_json(msg.payload) if msg.payload.strip() else {}
            if not isinstance(body, dict):
                raise InvalidRequest("a control request body must be a JSON object")
        except Exception as exc:  # malformed, too deep, not UTF-8: all answered
            self._fail(address, label, None, exc)
            return
        reply_to = body.pop("reply_to", None)
        if address is None and isinstance(reply_to, str):
            address = self._address(reply_to, correlation, msg.qos, user or None)
        with self._pending_lock:
            full = self._pending_commands >= self._config.max_pending_commands
            if not full:
                self._pending_commands += 1
        if full:
            self._fail(address, label, None, overloaded("control commands"))
            return
        # A command may load a model (a pin): that must not stall the network loop. One
        # thread runs them in the order they came.
        try:
            self._commands.submit(self._run_command, command, body, address, user or None)
        except RuntimeError:  # stopping: the executor takes no more work
            with self._pending_lock:
                self._pending_commands -= 1
            self._fail(address, label, None, overloaded("control commands (stopping)"))

    def _run_command(
        self,
        command: str,
        body: dict[str, Any],
        address: ReplyAddress | None,
        user: str | None = None,
    ) -> None:
        label = f"control/{command[:200]}"
        try:
            result = self._control.handle(command, body, user)
            payload = _json(result)
        except Exception as exc:  # a bug in a command still gets its caller an answer
            if not isinstance(exc, EdgeAgentError):
                log.exception("control_command_failed", command=command[:200])
            self._fail(address, label, None, exc)
            return
        finally:
            with self._pending_lock:
                self._pending_commands -= 1
        log.info("control_command", command=command)
        if address is not None:
            self._send(address, payload, None)

    # --- Replies ---

    def _address(
        self, topic: str | None, correlation: bytes | None, qos: int, user: str | None = None
    ) -> ReplyAddress | None:
        """Where to reply, or None when `topic` is not one the agent may publish to.

        Never the agent's own topics (a client could make it publish on its status), and
        with mqtt.reply_prefix only that namespace: under <prefix>/<user>/ when the
        request came on a topic ending in the user name the broker's ACL enforces.
        """
        if not topic:
            return None
        problem = topic_problem(topic) or self._namespace_problem(topic, user)
        if problem is not None:
            log.warning("reply_topic_refused", topic=ascii(topic[:200]), reason=problem)
            return None
        return ReplyAddress(topic, correlation, qos)

    def _namespace_problem(self, topic: str, user: str | None) -> str | None:
        root = self._config.device_topic
        if topic == root or topic.startswith(f"{root}/") or topic.startswith(self._fleet_prefix):
            return "one of the agent's own topics"
        prefix = self._config.reply_prefix
        if prefix is None:
            return None
        required = f"{prefix}/{user}/" if user else f"{prefix}/"
        if not topic.startswith(required):
            return f"not under {required}"
        return None

    def _payload_limit(self, address: ReplyAddress) -> int:
        """The largest reply payload the broker accepts on `address`."""
        return self._max_packet - publish_overhead(address.topic, address.correlation, self._v5)

    def _fail(
        self,
        address: ReplyAddress | None,
        model: str,
        request_id: str | int | None,
        error: BaseException,
    ) -> None:
        response = error_response(error, request_id, model)
        log.warning(
            "request_failed",
            model=model[:200],
            id=request_id if not isinstance(request_id, str) else request_id[:200],
            code=response.code,
            error=str(error)[:1000],
            reply_topic=address.topic if address else None,
        )
        if address is not None:
            self._send(address, response.payload, None)

    def _send(self, address: ReplyAddress, payload: bytes, header_length: int | None) -> None:
        if len(payload) > self._payload_limit(address):
            # Even an error reply can be too large for a tiny broker limit: never publish
            # what the broker would answer by disconnecting us.
            log.warning(
                "reply_dropped",
                topic=address.topic,
                bytes=len(payload),
                max_packet=self._max_packet,
            )
            return
        properties = None
        if self._v5 and (address.correlation is not None or header_length is not None):
            user = None if header_length is None else [(HEADER_LENGTH_PROPERTY, str(header_length))]
            properties = ReplyProperties(address.correlation, user)
        try:
            self._client.publish(address.topic, payload, qos=address.qos, properties=properties)
        except (ValueError, TypeError) as exc:  # paho's own checks: never let one escape
            log.warning("reply_not_published", topic=address.topic, error=str(exc)[:200])

    # --- Health: is the network loop turning? (for the systemd watchdog) ---

    def _on_publish(
        self,
        _client: mqtt.Client,
        _userdata: Any,
        _mid: int,
        _reason: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        # paho runs this on its network thread once a publication has been written (QoS 0)
        # or acknowledged (QoS 1/2): proof that the loop turns.
        self._last_loop = time.monotonic()

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        # paho does not say why (DNS, refused, TLS); it retries with backoff.
        self.broker_state = "broker unreachable; retrying"
        log.warning(
            "broker_unreachable",
            host=self._config.host,
            port=self._config.port,
            tls=self._config.tls.enabled,
        )

    def probe_loop(self, idle_after: float) -> None:
        """When the loop has been silent for `idle_after` s, make it show it still turns.

        A QoS 0 publication on the heartbeat topic is written by paho's network thread,
        whose `on_publish` then stamps the time; a busy agent never needs one.
        """
        if self.connected and time.monotonic() - self._last_loop > idle_after:
            self._client.publish(self.heartbeat_topic, b"", qos=0)

    def loop_problem(self, stale_after: float) -> str | None:
        """Why the MQTT loop looks dead, or None when it is alive."""
        if self._stopping:
            return None
        # paho keeps its network thread private; it is None once the thread has ended.
        thread: threading.Thread | None = getattr(self._client, "_thread", None)
        if thread is None or not thread.is_alive():
            return "the MQTT network thread is not running"
        silence = time.monotonic() - self._last_loop
        if self.connected and silence > stale_after:
            return f"the MQTT network loop has been silent for {silence:.0f} s"
        return None


def _refusal_hint(reason: ReasonCode) -> str | None:
    text = str(reason).lower()
    if "not authorized" in text or "user name or password" in text:
        return "check mqtt.username and the password (file or systemd credential)"
    if "identifier" in text:
        return "another client may use this client id; set mqtt.client_id"
    return None


def _properties(msg: mqtt.MQTTMessage) -> dict[str, Any]:
    """A message's MQTT 5 properties by name (empty for 3.1.1).

    Read from the instance's dict: getattr() on an absent property raises and catches an
    AttributeError, a measurable cost on every request.
    """
    props = msg.properties
    return vars(props) if props is not None else {}


def _header_length(user_properties: list[tuple[str, str]]) -> int | None:
    for key, value in user_properties:
        if key == HEADER_LENGTH_PROPERTY:
            try:
                return int(value)
            except ValueError:
                raise RequestError(
                    f"{HEADER_LENGTH_PROPERTY} {value!r} is not an integer"
                ) from None
    return None


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), default=str).encode()
