"""The agent's configuration: pydantic models, read from TOML, environment and flags.

Precedence, lowest to highest: built-in defaults, the TOML file, `EDGE_AGENT_<SECTION>__<KEY>`
environment variables, command-line flags. An invalid value is refused with its key, the
value, where it came from and why. A file is read only when named (`--config` or
`$EDGE_AGENT_CONFIG`): never found by looking, so that a run by hand or a test cannot pick
up an installed service's configuration (and with it the service's state directory).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.errors import ConfigError

ENV_PREFIX = "EDGE_AGENT_"
# Where `install-service` puts the service's file; its unit passes it with --config. Never
# read unless named.
SERVICE_CONFIG_PATH = Path("/etc/edge-agent/config.toml")
MIB = 1024 * 1024

# MQTT topic levels must not contain these; a device id or prefix is one or more levels.
_TOPIC_SAFE = r"^[^#+\s$][^#+\s]*$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, defer_build=True)


class TlsConfig(_Section):
    """TLS towards the broker."""

    enabled: bool = Field(False, description="Connect with TLS.")
    ca_file: Path | None = Field(None, description="CA bundle; unset uses the system's.")
    cert_file: Path | None = Field(None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(None, description="Client private key (mutual TLS).")
    verify_hostname: bool = Field(True, description="Check the broker's name in its cert.")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MqttConfig(_Section):
    """The broker link and the topic layout."""

    host: str = Field("127.0.0.1", min_length=1, description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port.")
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT version; 3.1.1 for brokers without MQTT 5 (replies via reply_to)."
    )
    device_id: str = Field(
        default_factory=socket.gethostname,
        pattern=_TOPIC_SAFE,
        max_length=128,
        description="This device's topic level; the host name by default.",
    )
    prefix: str = Field("edge", pattern=_TOPIC_SAFE, max_length=128, description="Topic root.")
    fleet_group: str = Field(
        "edge-agents",
        pattern=r"^[A-Za-z0-9._-]*$",
        max_length=128,
        description="Shared-subscription group for fleet requests; empty to not join a fleet.",
    )
    client_id: str | None = Field(
        None, max_length=128, description="MQTT client id; edge-agent-<device_id> by default."
    )
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keepalive interval.")
    qos: Literal[0, 1, 2] = Field(1, description="QoS of subscriptions and of our publications.")
    session_expiry_s: int = Field(
        0,
        ge=0,
        le=86400,
        description="How long the broker keeps our session (and queues our requests) across "
        "a disconnect. 0 (the default) never leaves requests with an agent that may not come "
        "back: with a fleet, a dead agent's session would keep taking its share of requests.",
    )
    reconnect_min_s: int = Field(1, ge=1, le=60, description="First reconnect delay.")
    reconnect_max_s: int = Field(30, ge=1, le=3600, description="Longest reconnect delay.")
    max_payload_bytes: int = Field(
        64 * MIB, ge=1024, le=256 * MIB, description="Largest request accepted."
    )
    max_packet_bytes: int = Field(
        268_435_455,
        ge=1024,
        le=268_435_455,
        description="Largest MQTT packet the broker accepts (mosquitto's max_packet_size); "
        "a reply that would not fit becomes an error reply. With MQTT 5 the broker's own "
        "Maximum Packet Size (CONNACK) applies when lower.",
    )
    reply_prefix: str | None = Field(
        None,
        pattern=r"^[^#+\s$/][^#+\s]*[^#+\s/]$",
        max_length=256,
        description="Reply only on topics under this prefix (e.g. 'edge/reply'); a request "
        "sent on .../infer/<model>/<user> is answered only under <reply_prefix>/<user>/, "
        "so with the shipped ACL no client can have replies delivered to another. Unset: "
        "any valid topic except the agent's own.",
    )
    inline_decode_bytes: int = Field(
        65536,
        ge=0,
        le=16 * MIB,
        description="Requests up to this size are decoded on the MQTT thread (the fast "
        "path); larger ones by the decode workers, so that they never hold up the loop.",
    )
    decode_workers: int = Field(
        1, ge=1, le=16, description="Threads decoding large requests (JSON parsing, checks)."
    )
    decode_backlog_bytes: int = Field(
        64 * MIB,
        ge=1024,
        le=1024 * MIB,
        description="Bytes of large requests waiting for a decode worker; a request beyond "
        "it is refused at once with 503 (the agent is behind), never left unanswered.",
    )
    max_pending_commands: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Control commands waiting to run; beyond it a command is refused with 503.",
    )
    tcp_nodelay: bool = Field(True, description="Disable Nagle on the broker socket.")
    username: str | None = Field(None, max_length=256, description="Broker user name.")
    password_file: Path | None = Field(
        None, description="File holding the broker password (never put it in the config)."
    )
    password_credential: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Name of a systemd credential ($CREDENTIALS_DIRECTORY) holding the password.",
    )
    tls: TlsConfig = Field(default_factory=TlsConfig)

    @model_validator(mode="after")
    def _rules(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must not be below reconnect_min_s")
        if self.password_file is not None and self.password_credential is not None:
            raise ValueError("set password_file or password_credential, not both")
        return self

    @property
    def effective_client_id(self) -> str:
        return self.client_id or f"edge-agent-{self.device_id}"

    @property
    def device_topic(self) -> str:
        """`<prefix>/<device_id>`: the root of every topic this device owns."""
        return f"{self.prefix}/{self.device_id}"


class ModelsConfig(_Section):
    """Where models come from and how they run."""

    dir: Path = Field(Path("models"), description="The watched model directory.")
    threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="onnxruntime intra-op threads per session; the CPUs this process may "
        "use by default.",
    )
    workers: int = Field(
        1, ge=1, le=64, description="Worker threads per model (concurrent session runs)."
    )
    max_queue: int = Field(
        256, ge=1, le=100_000, description="Requests waiting per model before 'overloaded'."
    )
    max_batch_size: int = Field(
        32, ge=1, le=4096, description="Requests stacked into one run; 1 disables batching."
    )
    batch_delay_ms: float = Field(
        0.0,
        ge=0.0,
        le=1000.0,
        description="How long a worker waits for more requests to fill a batch; 0 takes "
        "only what is already queued.",
    )
    inline_max_ms: float = Field(
        0.5,
        ge=0.0,
        le=100.0,
        description="Run a small request (up to 8 rows) on the MQTT thread instead of a worker "
        "when the model is idle and its recent small runs took less than this: the hand-off "
        "to a worker and back costs more than such a run. 0 always uses workers.",
    )
    spin: bool = Field(
        False,
        description="Let onnxruntime threads spin between runs: lower latency, more CPU burnt.",
    )
    warmup: bool = Field(True, description="Run one inference on load before serving.")
    watch: bool = Field(
        True, description="Load, reload and unload models as the model directory changes."
    )
    settle_s: float = Field(
        1.0,
        ge=0.05,
        le=60.0,
        description="Quiet time after the last change before a pushed model is looked at.",
    )
    settle_max_s: float = Field(
        120.0,
        ge=1.0,
        le=3600.0,
        description="Longest wait for a push to complete (files and hashes) before acting "
        "on it anyway and reporting what is wrong.",
    )
    load_timeout_s: float = Field(
        120.0,
        ge=0.1,
        le=3600.0,
        description="Longest a model's load (checks, session, warm-up) may take, at start "
        "and on a push. Past it the load is abandoned to its thread, reported "
        "(model_load_stuck) and shown by the health check; other models go on loading.",
    )


class MetricsConfig(_Section):
    """The periodic metrics publication."""

    interval_s: float = Field(10.0, ge=0.0, le=3600.0, description="0 disables metrics.")
    window: int = Field(
        2048, ge=16, le=1_000_000, description="Latest latencies kept for percentiles."
    )
    latency_window_s: float = Field(
        30.0, ge=1.0, le=3600.0, description="Per-variant figures cover the last this many s."
    )


class LogConfig(_Section):
    """Logging."""

    level: Literal["debug", "info", "warning", "error"] = Field("info")
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console on a terminal, JSON lines otherwise (journald)."
    )


# --- Running as a service: systemd, persisted state, model supply integrity (issue 4) ---


class ServiceConfig(_Section):
    """Running under systemd: health check, watchdog and shutdown."""

    stop_timeout_s: float = Field(
        20.0,
        ge=0.0,
        le=3600.0,
        description="On SIGTERM, how long queued and running requests may take to finish "
        "before the agent exits anyway; keep it below the unit's TimeoutStopSec.",
    )
    worker_stall_s: float = Field(
        60.0,
        ge=0.1,
        le=86400.0,
        description="A model worker busy on one batch for longer counts as hung: the "
        "watchdog pings stop and systemd restarts the agent. Above the slowest batch.",
    )


class StateConfig(_Section):
    """What the agent remembers across restarts (pins, last known good variants)."""

    dir: Path | None = Field(
        None,
        description="Directory of state.json; unset uses $STATE_DIRECTORY (systemd's "
        "StateDirectory=), and without it nothing is remembered.",
    )


class SecurityConfig(_Section):
    """Model supply integrity."""

    require_sha256: bool = Field(
        True, description="Refuse manifest variants that carry no sha256 to check."
    )
    manifest_public_key: Path | None = Field(
        None,
        description="Ed25519 public key (PEM). When set, a model folder is served only "
        "with a valid manifest.json.sig, and bare .onnx files are refused. Needs the "
        "`signing` extra (cryptography).",
    )


class SharedMemoryConfig(_Section):
    """Tensors in system shared memory, for clients on the same board.

    The Open Inference Protocol's system shared-memory extension, as Triton defines it
    (README, "Shared memory for local clients")."""

    enabled: bool = Field(
        False,
        description="Accept the shm_register/shm_unregister/shm_status commands and inputs "
        "and outputs in registered regions of /dev/shm. Off by default: whoever may publish "
        "on the control topic could make the agent read and write the shared memory its "
        "user can open.",
    )
    max_regions: int = Field(
        64, ge=1, le=4096, description="Regions registered at once, over all clients."
    )
    max_bytes: int = Field(
        512 * MIB,
        ge=1,
        le=2**40,
        description="Bytes of all registered regions together: what the agent may keep "
        "mapped (and so keep alive) for its clients.",
    )
    zero_copy: bool = Field(
        False,
        description="Run the model on a view of the mapping instead of a copy of the input "
        "(saves one copy of each input). Only for trusted clients: one that shrinks its "
        "region while its request runs makes the agent die of SIGBUS. Off: inputs are read "
        "with pread and outputs written with pwrite, which a truncated region cannot crash.",
    )


class ModelObjective(_Section):
    """One model's latency objective, overriding its manifest's."""

    slo_p95_ms: float = Field(
        gt=0.0,
        le=600_000.0,
        description="p95 latency this model must meet: its clients' round trip (the "
        "agent's time plus the broker's, see adapt.count_transport).",
    )


class AdaptConfig(_Section):
    """Adapting to the device: moving each model along its ladder as resources change."""

    enabled: bool = Field(
        True, description="Run the policy; off serves the pinned or richest loadable variant."
    )
    interval_s: float = Field(
        1.0, ge=0.05, le=60.0, description="How often resources are sampled and decided on."
    )
    history_s: float = Field(
        300.0, ge=10.0, le=86400.0, description="How much sampled history is kept."
    )
    down_after_s: float = Field(
        3.0, ge=0.0, le=600.0, description="Pressure must hold this long before a step down."
    )
    up_after_s: float = Field(
        20.0, ge=0.0, le=3600.0, description="Calm must hold this long before a step up."
    )
    cooldown_s: float = Field(
        10.0, ge=0.0, le=3600.0, description="No step up sooner than this after any swap."
    )
    latency_window_s: float = Field(
        8.0, ge=0.5, le=600.0, description="Window of the observed p95 the policy judges."
    )
    min_samples: int = Field(
        5, ge=1, le=10_000, description="Observations in the window before p95 is trusted."
    )
    slo_factor: float = Field(
        2.0,
        ge=1.0,
        le=1000.0,
        description="A model without an objective gets this many times its richest "
        "variant's latency (the manifest's, or this device's when lower)...",
    )
    slo_min_ms: float = Field(5.0, gt=0.0, le=600_000.0, description="...but never less than this.")
    count_transport: bool = Field(
        True,
        description="Judge the objective on the round trip a client sees: the agent's time "
        "plus what the broker adds now, which the agent measures with echoes through it "
        "(under CPU contention that grows by milliseconds). Off: the agent's time only.",
    )
    objectives: dict[str, ModelObjective] = Field(
        default_factory=dict, description="Per-model objectives: [adapt.objectives.NAME]."
    )
    down_margin: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="A step down picks a variant predicted within this share of the objective.",
    )
    up_margin: float = Field(
        0.75,
        gt=0.0,
        le=1.0,
        description="A step up needs the richer variant predicted within this share of it.",
    )
    min_gain: float = Field(
        0.15,
        ge=0.0,
        lt=1.0,
        description="When no variant meets the objective, step down only for at least this "
        "predicted cut in p95.",
    )
    cpu_busy_percent: float = Field(
        85.0,
        ge=1.0,
        le=100.0,
        description="CPU taken by others (all cores) above which the CPU counts as contended.",
    )
    psi_cpu_some: float = Field(
        40.0, ge=0.0, le=100.0, description="/proc/pressure/cpu some avg10 that means contended."
    )
    throttled_ratio: float = Field(
        0.2, ge=0.0, le=1.0, description="Share of throttled cgroup CPU periods that means short."
    )
    memory_low_mb: float = Field(
        64.0, ge=0.0, le=1e7, description="Memory headroom below which memory is short."
    )
    memory_calm_mb: float = Field(
        128.0,
        ge=0.0,
        le=1e7,
        description="Headroom a step up must leave (and a step down aims for).",
    )
    psi_memory_some: float = Field(
        25.0, ge=0.0, le=100.0, description="/proc/pressure/memory some avg10 that means short."
    )
    temperature_c: float | None = Field(
        None,
        ge=0.0,
        le=150.0,
        description="CPU temperature that means thermal pressure; unset uses the sensor's "
        "trip point minus 5 degrees, or 80.",
    )
    retry_after_s: float = Field(
        60.0,
        ge=0.0,
        le=86400.0,
        description="A variant that failed to load is not tried again for this long "
        "(doubling with each failure).",
    )
    probe_interval_s: float = Field(
        1.0,
        ge=0.1,
        le=3600.0,
        description="A model without traffic is timed on zeros this often while the CPU is "
        "contended (five times as seldom when calm), so that its latency under today's load "
        "is measured, not guessed.",
    )
    fleet_shed: bool = Field(
        True,
        description="Leave a model's fleet subscription while even its lightest variant "
        "misses the objective; rejoin after calm.",
    )
    drain_timeout_s: float = Field(
        10.0, ge=0.0, le=600.0, description="How long a swap waits for the old variant's batches."
    )

    @model_validator(mode="after")
    def _rules(self) -> AdaptConfig:
        if self.memory_calm_mb < self.memory_low_mb:
            raise ValueError("memory_calm_mb must not be below memory_low_mb")
        return self


class AgentConfig(_Section):
    """The whole configuration file."""

    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    shm: SharedMemoryConfig = Field(default_factory=SharedMemoryConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Build the configuration from a TOML file, the environment and flag overrides.

    `path` None reads the file `EDGE_AGENT_CONFIG` names, when set, and no file otherwise
    (not even /etc/edge-agent/config.toml: the service's unit names it); a named file must
    exist. `overrides` maps dotted keys (`"mqtt.port"`) to values from the command line;
    None values are ignored.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}

    if path is None and env.get(f"{ENV_PREFIX}CONFIG"):
        path = Path(env[f"{ENV_PREFIX}CONFIG"])
    if path is not None:
        import tomllib  # noqa: PLC0415  (only a file needs the parser)

        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML: {exc}") from exc
        _record_sources(data, (), f"file {path}", sources)

    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = tuple(k.lower() for k in name[len(ENV_PREFIX) :].split("__"))
        if not all(keys):
            raise ConfigError(f"environment variable {name}: empty key level")
        _set_path(data, keys, value)
        sources[keys] = f"environment {name}"

    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        keys = tuple(dotted.split("."))
        _set_path(data, keys, value)
        sources[keys] = "command line"

    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, sources)) from exc


def _record_sources(
    data: Mapping[str, Any], prefix: tuple[str, ...], source: str, out: dict[tuple[str, ...], str]
) -> None:
    for key, value in data.items():
        if isinstance(value, Mapping):
            _record_sources(value, (*prefix, key), source, out)
        else:
            out[(*prefix, key)] = source


def _set_path(data: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys)}: {key} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _explain(exc: ValidationError, sources: Mapping[tuple[str, ...], str]) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "<root>"
        where = sources.get(loc, "default")
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (from {where})")
            continue
        value = err.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        lines.append(f"  {key} = {shown}: {err['msg']} (from {where})")
    return "\n".join(lines)


def read_password(mqtt: MqttConfig, env: Mapping[str, str] | None = None) -> str | None:
    """The broker password from its file or systemd credential, never from the config itself."""
    env = os.environ if env is None else env
    if mqtt.password_credential is not None:
        directory = env.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                f"mqtt.password_credential = {mqtt.password_credential!r}: "
                "$CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)"
            )
        path = Path(directory) / mqtt.password_credential
    elif mqtt.password_file is not None:
        path = mqtt.password_file
    else:
        return None
    try:
        return path.read_text().rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"broker password file {path}: {exc.strerror}") from exc


def example_toml() -> str:
    """Every key with its default and description, as a commented TOML file."""
    lines = [
        "# edge-agent configuration. Every key is optional; shown with its default.",
        "# Each can be overridden by EDGE_AGENT_<SECTION>__<KEY> in the environment.",
    ]
    _example_section(AgentConfig, (), lines)
    return "\n".join(lines) + "\n"


def _example_section(model: type[BaseModel], path: tuple[str, ...], lines: list[str]) -> None:
    nested: list[tuple[str, type[BaseModel]]] = []
    if path:
        lines += ["", f"[{'.'.join(path)}]"]
        doc = (model.__doc__ or "").strip().splitlines()
        if doc:
            lines.insert(len(lines) - 1, f"# {doc[0]}")
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((name, annotation))
            continue
        if field.description:
            lines.append(f"# {field.description}")
        default = field.get_default(call_default_factory=True)
        if name == "device_id":
            lines.append('# device_id = "<host name>"')
        elif default is None:
            lines.append(f"# {name} =   (unset)")
        else:
            lines.append(f"# {name} = {_toml_value(default)}")
    for name, sub in nested:
        _example_section(sub, (*path, name), lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
