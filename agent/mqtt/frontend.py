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

from agent.batching import Completed, Outcome
from agent.config import MqttConfig
from agent.control import ControlCommands
from agent.errors import (
    EdgeAgentError,
    InferenceError,
    InvalidRequest,
    PayloadTooLarge,
    RequestExpired,
)
from agent.events import Events
from agent.models import ModelManager
from agent.mqtt import rtt
from agent.mqtt.connection import (
    ReplyProperties,
    build_client,
    connect_properties,
    is_v5,
)
from agent.protocol import (
    HEADER_LENGTH_PROPERTY,
    InferenceRequest,
    RequestError,
    decode_request,
    encode_error,
    encode_response,
)

log = structlog.get_logger(__name__)

StatusSource = Callable[[], dict[str, Any]]


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
        self._subscribe_mid: int | None = None
        self._session_present = False
        self._accepting = True
        self._stopping = False
        self._last_loop = time.monotonic()
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

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def subscriptions(self) -> list[str]:
        topics = [f"{self._infer_prefix}+", f"{self._control_prefix}+"]
        return topics + [self._fleet_topic(name) for name in sorted(self._fleet_wanted())]

    # --- The fleet: one shared subscription per model, so that one can be given away ---

    def _fleet_topic(self, model: str) -> str:
        return f"$share/{self._config.fleet_group}/{self._fleet_prefix}{model}"

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
                (self._fleet_topic(n), SubscribeOptions(qos=qos) if self._v5 else qos)
                for n in added
            ]
            self._client.subscribe(topics)
        if removed:
            self._client.unsubscribe([self._fleet_topic(n) for n in removed])

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
            if topic.startswith(self._infer_prefix):
                self._infer(topic[len(self._infer_prefix) :], msg, received)
            elif topic.startswith(self._fleet_prefix):
                self._infer(topic[len(self._fleet_prefix) :], msg, received)
            elif topic.startswith(self._control_prefix):
                self._command(topic[len(self._control_prefix) :], msg)
            else:
                log.warning("unexpected_topic", topic=topic)
        except Exception:  # one bad message must never stop the network loop
            log.exception("message_handler_failed", topic=topic)

    def _infer(self, model: str, msg: mqtt.MQTTMessage, received: float) -> None:
        props = _properties(msg)
        response_topic: str | None = props.get("ResponseTopic")
        correlation: bytes | None = props.get("CorrelationData")
        expiry: int | None = props.get("MessageExpiryInterval")
        qos = msg.qos
        payload = msg.payload
        if len(payload) > self._config.max_payload_bytes:
            self._fail(
                self._address(response_topic, correlation, qos),
                model,
                None,
                PayloadTooLarge(
                    f"payload of {len(payload)} bytes exceeds the limit of "
                    f"{self._config.max_payload_bytes}"
                ),
            )
            return
        try:
            request = decode_request(payload, _header_length(props.get("UserProperty", ())))
        except RequestError as exc:
            address = self._address(response_topic or exc.reply_to, correlation, qos)
            self._fail(address, model, exc.request_id, exc)
            return
        address = self._address(response_topic or request.reply_to, correlation, qos)
        if address is None:
            log.warning("request_without_reply_address", model=model, id=request.id)
            return
        deadline = received + expiry if expiry is not None else None
        try:
            self._manager.submit(
                model, request, self._replier(address, model, request, received), deadline
            )
        except EdgeAgentError as exc:
            self._fail(address, model, request.id, exc)

    def _replier(
        self, address: ReplyAddress, model: str, request: InferenceRequest, received: float
    ) -> Callable[[Outcome], None]:
        binary = {o.name: o.binary for o in request.outputs or ()}
        default_binary = request.binary_output

        def reply(outcome: Outcome) -> None:
            if isinstance(outcome, RequestExpired):
                log.info("request_expired", model=model, id=request.id, topic=address.topic)
                return
            if not isinstance(outcome, Completed):
                self._fail(address, model, request.id, outcome)
                return
            parameters = {
                "queue_ms": round(outcome.queue_ms, 3),
                "inference_ms": round(outcome.infer_ms, 3),
                "total_ms": round((time.monotonic() - received) * 1000.0, 3),
                "batch_size": outcome.batch_size,
            }
            tensors = [
                (name, array, binary.get(name, default_binary))
                for name, array in outcome.outputs.items()
            ]
            try:
                payload, header_length = encode_response(
                    model, outcome.variant, request.id, tensors, parameters
                )
            except (ValueError, TypeError) as exc:
                error = InferenceError(f"cannot encode the outputs: {exc}")
                self._fail(address, model, request.id, error)
                return
            self._send(address, payload, header_length)

        return reply

    def _command(self, command: str, msg: mqtt.MQTTMessage) -> None:
        props = _properties(msg)
        response_topic: str | None = props.get("ResponseTopic")
        correlation: bytes | None = props.get("CorrelationData")
        reply_to: str | None = None
        try:
            body = json.loads(msg.payload) if msg.payload.strip() else {}
            if not isinstance(body, dict):
                raise InvalidRequest("a control request body must be a JSON object")
        except (ValueError, EdgeAgentError) as exc:
            error = (
                exc if isinstance(exc, EdgeAgentError) else InvalidRequest(f"malformed JSON: {exc}")
            )
            address = self._address(response_topic, correlation, msg.qos)
            self._fail(address, f"control/{command}", None, error)
            return
        if isinstance(body.get("reply_to"), str):
            reply_to = body.pop("reply_to")
        address = self._address(response_topic or reply_to, correlation, msg.qos)
        # A command may load a model (a pin): that must not stall the network loop. One
        # thread runs them in the order they came.
        self._commands.submit(self._run_command, command, body, address)

    def _run_command(
        self, command: str, body: dict[str, Any], address: ReplyAddress | None
    ) -> None:
        try:
            result = self._control.handle(command, body)
        except EdgeAgentError as exc:
            self._fail(address, f"control/{command}", None, exc)
            return
        except Exception as exc:  # a bug in a command still gets its caller an answer
            log.exception("control_command_failed", command=command)
            self._fail(address, f"control/{command}", None, EdgeAgentError(repr(exc)))
            return
        log.info("control_command", command=command)
        if address is not None:
            self._send(address, _json(result), None)

    def _address(
        self, topic: str | None, correlation: bytes | None, qos: int
    ) -> ReplyAddress | None:
        if not topic:
            return None
        if "+" in topic or "#" in topic or topic.startswith("$"):
            log.warning("reply_topic_refused", topic=topic, reason="wildcard or $ topic")
            return None
        return ReplyAddress(topic, correlation, qos)

    def _fail(
        self,
        address: ReplyAddress | None,
        model: str,
        request_id: str | int | None,
        error: EdgeAgentError,
    ) -> None:
        log.warning(
            "request_failed",
            model=model,
            id=request_id,
            code=error.code,
            error=str(error),
            reply_topic=address.topic if address else None,
        )
        if address is not None:
            self._send(address, encode_error(str(error), error.code, request_id, model), None)

    def _send(self, address: ReplyAddress, payload: bytes, header_length: int | None) -> None:
        properties = None
        if self._v5 and (address.correlation is not None or header_length is not None):
            user = None if header_length is None else [(HEADER_LENGTH_PROPERTY, str(header_length))]
            properties = ReplyProperties(address.correlation, user)
        self._client.publish(address.topic, payload, qos=address.qos, properties=properties)

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
