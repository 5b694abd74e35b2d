"""The `edge-agent` command: run the daemon, send a request, show a device's status.

Exit codes: 0 success, 1 an error reply or a failed operation, 2 bad usage, 3 no broker or
no reply in time, 78 invalid configuration (EX_CONFIG, so systemd does not restart on it).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from agent import __version__
from agent.config import AgentConfig, load_config, read_password
from agent.errors import ConfigError, InvalidRequest
from agent.logs import configure_logging
from agent.protocol import decode_response, encode_request

EX_CONFIG = 78
EX_NOREPLY = 3

log = structlog.get_logger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in _SERVICE_COMMANDS:
        # Neither needs (nor should fail on) the configuration of the agent.
        return _SERVICE_COMMANDS[args.command](args)
    try:
        config = _config(args)
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EX_CONFIG
    if args.command == "bench":
        from agent.bench import main as bench  # noqa: PLC0415  (only the bench needs it)

        return bench(args, config)
    handler = {"run": _run, "infer": _infer, "status": _status}[args.command]
    return handler(args, config)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-agent", description="Serve ONNX models over MQTT on an edge board."
    )
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            type=Path,
            help="TOML config (default: $EDGE_AGENT_CONFIG, else none; the service's is "
            "/etc/edge-agent/config.toml)",
        )
        p.add_argument("--mqtt-host", help="broker host")
        p.add_argument("--mqtt-port", type=int, help="broker port")
        p.add_argument("--device-id", help="device id (topic level); default: host name")

    run = sub.add_parser("run", help="run the agent in the foreground")
    common(run)
    run.add_argument("--models-dir", type=Path, help="model directory (default ./models)")
    run.add_argument(
        "--embedded-broker",
        nargs="?",
        const="auto",
        choices=["auto", "mosquitto", "amqtt"],
        help="start a broker on loopback for this agent: a private mosquitto when installed "
        "(MQTT 5), else amqtt in-process (MQTT 3.1.1)",
    )
    run.add_argument("--log-format", choices=["auto", "json", "console"])
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    infer = sub.add_parser("infer", help="send one inference request and print the reply")
    common(infer)
    infer.add_argument("model", help="model name")
    infer.add_argument(
        "file",
        type=Path,
        help="inputs: .npz (arrays named after inputs) or an Open Inference Protocol .json request",
    )
    infer.add_argument(
        "--fleet",
        action="store_true",
        help="send to the fleet topic (any agent of the group answers)",
    )
    infer.add_argument("--json", action="store_true", help="print the raw JSON reply")
    infer.add_argument("--timeout", type=float, default=10.0, help="seconds to wait")
    infer.add_argument("--protocol", choices=["auto", "5", "3.1.1"], default="auto")
    infer.add_argument(
        "--rate",
        type=float,
        default=None,
        help="send the request this many times a second, open-loop, and print a line a "
        "second: round trips and the variants that answered",
    )
    infer.add_argument(
        "--seconds", type=float, default=0.0, help="with --rate: for this long (0: until Ctrl-C)"
    )

    status = sub.add_parser("status", help="show the retained status of a device")
    common(status)
    status.add_argument("--all", action="store_true", help="every device under the prefix")
    status.add_argument("--json", action="store_true", help="print the raw status JSON")
    status.add_argument(
        "--wait", type=float, default=1.0, help="seconds to collect retained statuses"
    )
    status.add_argument("--protocol", choices=["auto", "5", "3.1.1"], default="auto")

    bench = sub.add_parser(
        "bench", help="latency and throughput beside raw onnxruntime and a bare MQTT echo"
    )
    bench.add_argument("--config", type=Path, help="agent config for the benchmarked agent")
    bench.add_argument(
        "--model-dir",
        type=Path,
        default=Path("models/digits"),
        help="model folder to serve (default models/digits)",
    )
    bench.add_argument("--requests", type=int, default=2000, help="sequential requests")
    bench.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    bench.add_argument("--duration", type=float, default=5.0, help="seconds with N in flight")
    bench.add_argument("--batch", type=int, default=1, help="rows per request")
    bench.add_argument(
        "--rounds", type=int, default=10, help="alternate echo and agent this many times"
    )
    bench.add_argument(
        "--start-rounds",
        type=int,
        default=5,
        help="start each server (echo, bare onnxruntime, agent) this many times",
    )
    bench.add_argument("--binary", action="store_true", help="binary tensors instead of JSON")
    bench.add_argument(
        "--shm",
        action="store_true",
        help="also time requests through shared memory beside raw onnxruntime",
    )
    bench.add_argument(
        "--shm-requests", type=int, default=200, help="requests to each target with --shm"
    )
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_service_commands(sub)
    return parser


def _config(args: argparse.Namespace) -> AgentConfig:
    overrides: dict[str, Any] = {
        "mqtt.host": getattr(args, "mqtt_host", None),
        "mqtt.port": getattr(args, "mqtt_port", None),
        "mqtt.device_id": getattr(args, "device_id", None),
        "models.dir": getattr(args, "models_dir", None),
        "log.format": getattr(args, "log_format", None),
        "log.level": getattr(args, "log_level", None),
    }
    return load_config(getattr(args, "config", None), overrides=overrides)


def _run(args: argparse.Namespace, config: AgentConfig) -> int:
    # Before onnxruntime is imported: its telemetry would otherwise try to persist a device
    # id under $XDG_CACHE_HOME or ~/.cache, and where it cannot (the unit's read-only file
    # system) print a coloured non-JSON warning into the journal at every start.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    from agent.service import Agent  # noqa: PLC0415  (keeps `infer`/`status` start-up light)

    configure_logging(config.log.level, config.log.format)
    # `kill -USR1 <pid>` writes every thread's stack to stderr (the journal): what a hung
    # agent is doing, without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    broker = None
    if args.embedded_broker:
        from agent.broker import BrokerError, local_broker  # noqa: PLC0415  (only for this)

        broker = local_broker(args.embedded_broker, config.mqtt.port, "127.0.0.1")
        try:
            broker.start()
        except BrokerError as exc:
            log.error("broker_failed", kind=broker.kind, port=config.mqtt.port, error=str(exc))
            return 1
        config = config.model_copy(
            update={
                "mqtt": config.mqtt.model_copy(
                    update={"host": broker.host, "protocol": broker.protocol}
                )
            }
        )
    embedded_mqtt = config.mqtt if broker is not None else None

    def reread() -> AgentConfig:
        # SIGHUP reads the same file, environment and flags again.
        fresh = _config(args)
        return fresh if embedded_mqtt is None else fresh.model_copy(update={"mqtt": embedded_mqtt})

    try:
        agent = Agent(config, reload_config=reread)
        agent.install_signal_handlers()
        agent.start()
        agent.run_until_stopped()
        agent.stop()
        # Stopped: a further stop signal has nothing left to stop. Ignored, it cannot kill
        # the interpreter while it finalises (Python puts back the default action of the
        # signals it handled then: SIGTERM in a storm of them would end us with -15).
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
    except ConfigError as exc:
        log.error("config_invalid", error=str(exc))
        return EX_CONFIG
    finally:
        if broker is not None:
            broker.stop()
    if agent.abandoned:
        # Workers are still inside onnxruntime: finalising the interpreter under them
        # aborts the process (SIGABRT, a "failed" unit). Leave without finalising.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _connect(args: argparse.Namespace, config: AgentConfig) -> Any:
    from agent.mqtt.requester import Requester  # noqa: PLC0415

    requester = Requester(config.mqtt, protocol=args.protocol, password=read_password(config.mqtt))
    requester.connect()
    return requester


def _infer(args: argparse.Namespace, config: AgentConfig) -> int:
    from agent.mqtt.requester import RequesterError  # noqa: PLC0415

    try:
        payload, header_length = _request_from_file(args.file, raw_json=args.json)
    except (OSError, ValueError, InvalidRequest) as exc:
        print(f"edge-agent infer: {args.file}: {exc}", file=sys.stderr)
        return 2
    root = f"{config.mqtt.prefix}/fleet" if args.fleet else config.mqtt.device_topic
    topic = f"{root}/infer/{args.model}"
    if args.rate is not None:
        return _infer_stream(args, config, topic, payload, header_length)
    try:
        with _connect(args, config) as requester:
            start = time.monotonic()
            reply = requester.request(
                requester.request_topic(topic), payload, header_length, timeout=args.timeout
            )
            elapsed_ms = (time.monotonic() - start) * 1000.0
    except RequesterError as exc:
        print(f"edge-agent infer: {exc}", file=sys.stderr)
        return EX_NOREPLY
    header, outputs = decode_response(reply.payload, reply.header_length)
    if args.json:
        print(
            reply.payload[: reply.header_length].decode()
            if reply.header_length
            else reply.payload.decode()
        )
        return 1 if "error" in header else 0
    if "error" in header:
        print(f"error {header.get('code')}: {header['error']}", file=sys.stderr)
        return 1
    print(_describe_reply(header, outputs, elapsed_ms))
    return 0


def _infer_stream(
    args: argparse.Namespace,
    config: AgentConfig,
    topic: str,
    payload: bytes,
    header_length: int | None,
) -> int:
    from agent.mqtt.requester import RequesterError  # noqa: PLC0415
    from agent.stream import stream  # noqa: PLC0415

    if not 0.0 < args.rate <= 10_000.0 or args.seconds < 0.0:
        print("edge-agent infer: --rate must be in (0, 10000], --seconds >= 0", file=sys.stderr)
        return 2
    try:
        with _connect(args, config) as requester:
            missing = stream(
                requester,
                requester.request_topic(topic),
                payload,
                header_length,
                rate=args.rate,
                seconds=args.seconds,
                timeout=args.timeout,
                out=lambda line: print(line, flush=True),
            )
    except RequesterError as exc:
        print(f"edge-agent infer: {exc}", file=sys.stderr)
        return EX_NOREPLY
    return 1 if missing else 0


def _request_from_file(path: Path, *, raw_json: bool) -> tuple[bytes, int | None]:
    if path.suffix == ".npz":
        with np.load(path) as data:
            inputs = {name: data[name] for name in data.files if name != "labels"}
        if not inputs:
            raise ValueError("the .npz file holds no arrays")
        # --json wants a reply it can print whole, so no binary outputs then.
        return encode_request(inputs, binary=True, binary_outputs=not raw_json)
    body = path.read_bytes()
    header = json.loads(body)
    if not isinstance(header, dict) or "inputs" not in header:
        raise ValueError("not an Open Inference Protocol request (no 'inputs')")
    return body, None


def _describe_reply(header: dict[str, Any], outputs: dict[str, np.ndarray], ms: float) -> str:
    params = header.get("parameters", {})
    lines = [
        f"{header.get('model_name')} answered by variant {header.get('model_version')} "
        f"in {ms:.1f} ms round trip (queue {params.get('queue_ms', '?')} ms, "
        f"inference {params.get('inference_ms', '?')} ms)"
    ]
    for name, array in outputs.items():
        lines.append(f"  {name}: {array.dtype} {list(array.shape)}")
        if array.ndim == 2 and array.dtype.kind == "f" and array.shape[1] > 1:
            for row, values in enumerate(array[:16]):
                top = np.argsort(values)[::-1][:3]
                ranked = ", ".join(f"{int(i)} ({values[i]:.3f})" for i in top)
                lines.append(f"    row {row}: top {ranked}")
        else:
            lines.append("    " + np.array2string(array, threshold=20, precision=4))
    return "\n".join(lines)


def _status(args: argparse.Namespace, config: AgentConfig) -> int:
    from agent.mqtt.requester import RequesterError  # noqa: PLC0415

    device = "+" if args.all else config.mqtt.device_id
    topic = f"{config.mqtt.prefix}/{device}/status"
    try:
        with _connect(args, config) as requester:
            found = requester.retained(topic, args.wait)
    except RequesterError as exc:
        print(f"edge-agent status: {exc}", file=sys.stderr)
        return EX_NOREPLY
    if not found:
        print(f"edge-agent status: no status retained on {topic}", file=sys.stderr)
        return 1
    statuses = {}
    for name, payload in sorted(found.items()):
        try:
            statuses[name] = json.loads(payload)
        except ValueError:
            statuses[name] = {"state": payload.decode(errors="replace")}
    if args.json:
        print(json.dumps(statuses if args.all else next(iter(statuses.values())), indent=2))
        return 0
    print("\n\n".join(_describe_status(status) for status in statuses.values()))
    return 0


def _describe_status(status: dict[str, Any]) -> str:
    lines = [
        f"device {status.get('device', '?')}: {status.get('state', '?')}"
        + (
            f"  (edge-agent {status['version']}, pid {status.get('pid')}, "
            f"since {status.get('started_at')})"
            if "version" in status
            else ""
        )
    ]
    models = status.get("models") or {}
    if models:
        width = max(len(name) for name in models)
        lines.append(f"  {'model':<{width}}  {'active':<12} ladder / inputs")
        for name, model in sorted(models.items()):
            ladder = " > ".join(v["name"] for v in model.get("variants", []))
            inputs = ", ".join(
                f"{t['name']} {t['datatype']}{t['shape']}" for t in model.get("inputs", [])
            )
            active = model.get("active") or "(swapping)"
            lines.append(f"  {name:<{width}}  {active:<12} {ladder}")
            lines.append(f"  {'':<{width}}  {'':<12} {inputs}")
            if model.get("reason"):
                why = f"{model['reason']}: {model['why']}" if model.get("why") else model["reason"]
                lines.append(f"  {'':<{width}}  {'':<12} why: {why}")
    elif status.get("state") == "online":
        lines.append("  no models loaded")
    return "\n".join(lines)


# --- Service set-up commands (issue 4): install-service, sign-manifest ---


def _add_service_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from agent import install  # noqa: PLC0415  (only these commands need it)

    install.add_parser(sub)
    sign = sub.add_parser(
        "sign-manifest",
        help="sign a model folder's manifest.json with an Ed25519 key (writes manifest.json.sig)",
    )
    sign.add_argument("folder", type=Path, help="the model folder")
    sign.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM)")


def _install_service(args: argparse.Namespace) -> int:
    from agent import install  # noqa: PLC0415  (as above)

    return install.run(args)


def _sign_manifest(args: argparse.Namespace) -> int:
    from agent.signing import sign_manifest  # noqa: PLC0415  (as above)

    try:
        target = sign_manifest(args.folder, args.key)
    except (OSError, ValueError, ConfigError) as exc:
        print(f"edge-agent sign-manifest: {exc}", file=sys.stderr)
        return 1
    print(f"signed: {target}")
    return 0


_SERVICE_COMMANDS = {"install-service": _install_service, "sign-manifest": _sign_manifest}


if __name__ == "__main__":
    raise SystemExit(main())
