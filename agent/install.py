"""`edge-agent install-service`: install the agent as a hardened systemd service.

Writes the unit (`/etc/systemd/system/edge-agent.service`), a commented configuration
(`/etc/edge-agent/config.toml`), the credentials folder, mosquitto's low-latency settings
when a local mosquitto is installed (`/etc/mosquitto/conf.d/`), and uses (or creates) the
virtual environment the unit runs. The state and model directories are systemd's to create
(`StateDirectory=`, owned by the service's dynamic user). Running it again changes nothing
that is already right; an operator's edited config.toml or broker snippet is never
overwritten. `--root DIR` stages the same layout under DIR (images, tests); `--dry-run`
only shows.

The unit below is the one shipped as `systemd/edge-agent.service` (a test keeps the two
identical); edit it here, then `edge-agent install-service --print-unit`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from agent.config import example_toml

UNIT_NAME = "edge-agent.service"
UNIT_DIR = Path("/etc/systemd/system")
CONFIG_DIR = Path("/etc/edge-agent")
CONFIG_FILE = CONFIG_DIR / "config.toml"
CREDENTIALS_DIR = CONFIG_DIR / "credentials"
PASSWORD_CREDENTIAL = "mqtt-password"
STATE_DIR = Path("/var/lib/edge-agent")
MODELS_DIR = STATE_DIR / "models"
MOSQUITTO_CONF_D = Path("/etc/mosquitto/conf.d")
MOSQUITTO_SNIPPET_NAME = "edge-agent-tuning.conf"
DEFAULT_PREFIX = Path("/opt/edge-agent")
# ProtectHome=yes hides these from the service.
_HIDDEN_BY_PROTECT_HOME = (Path("/home"), Path("/root"), Path("/run/user"))

UNIT_TEMPLATE = """\
# edge-agent: ONNX model inference over MQTT, as a hardened systemd service.
# Installed by `edge-agent install-service`. Change settings with a drop-in
# (`systemctl edit edge-agent`) rather than here, so that a reinstall keeps them.
# `systemd-analyze security edge-agent` rates this unit about 1.1 ("OK").

[Unit]
Description=edge-agent: ONNX model inference over MQTT
Wants=network-online.target
# Ordering only: with a local mosquitto, start after it (and stop before it).
After=network-online.target mosquitto.service
# Five failed starts within ten minutes and systemd stops trying (the unit is "failed").
StartLimitIntervalSec=10min
StartLimitBurst=5

[Service]
# READY=1 comes once the models are loaded and the broker has accepted the agent, or 10 s
# after the models are loaded without a broker: then STATUS= says "waiting for the broker"
# and the agent retries with backoff (a missing broker never looks like a hung start).
Type=notify
NotifyAccess=main
ExecStart={exec_start} run --config {config}
# SIGHUP: re-read the config, apply the live sections, rescan the model directory.
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5s
# 78 (EX_CONFIG): the configuration is invalid; restarting would not fix it.
RestartPreventExitStatus=78
# Loading large models on a small board takes time.
TimeoutStartSec=120s
# Must exceed service.stop_timeout_s (20 s): in-flight requests finish before the exit.
TimeoutStopSec=45s
KillMode=mixed
# Pings come from a health check of the MQTT loop and every model worker: a hung worker
# stops them and systemd restarts the agent.
WatchdogSec=30s

# Identity and files: a transient user; state, models and config in systemd's folders.
# systemd creates the state and model directories at the first start, for that user.
DynamicUser=yes
StateDirectory=edge-agent edge-agent/models
StateDirectoryMode=0750
ConfigurationDirectory=edge-agent
ConfigurationDirectoryMode=0755
# The broker password, as a credential: readable by this service only, never in the
# environment or on the command line. Config: mqtt.password_credential = "mqtt-password".
LoadCredential=mqtt-password:/etc/edge-agent/credentials/mqtt-password
# A TLS client key the dynamic user could not read from /etc; then set mqtt.tls.key_file =
# "/run/credentials/edge-agent.service/mqtt-client-key".
#LoadCredential=mqtt-client-key:/etc/edge-agent/credentials/client.key
UMask=0077

# Resource limits: size them for the board. The agent reads the cgroup's memory.max.
#MemoryMax=1G
#MemoryHigh=900M
#CPUQuota=200%

# Hardening. See README "Hardening choices" for what each costs and how to relax it.
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
PrivateIPC=yes
PrivateMounts=yes
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
# A refused call fails with EPERM instead of killing the process.
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


MOSQUITTO_SNIPPET = """\
# mosquitto settings for edge-agent's request/reply traffic. Placed by
# `edge-agent install-service` (yours to edit: a reinstall keeps it); then
# `systemctl restart mosquitto`. Global options only: Debian's listener is unchanged.

# Without it mosquitto holds back each small packet written right after another (Nagle)
# until the client's delayed ACK: ~40 ms more for every request/reply round trip.
set_tcp_nodelay true
# Replies to a burst of requests should not wait on each other's PUBACKs.
max_inflight_messages 100
# Requests waiting for a busy agent.
max_queued_messages 10000
# Above mqtt.max_payload_bytes (64 MiB) plus room for the topic and properties, so an
# oversized request reaches the agent and gets its 413 reply. (mosquitto 2 replaced
# message_size_limit with this.)
max_packet_size 67174400
"""


def render_unit(executable: Path, config: Path = CONFIG_FILE) -> str:
    """The unit text, running `executable` with `config`."""
    return UNIT_TEMPLATE.format(
        exec_start=shlex.quote(str(executable)), config=shlex.quote(str(config))
    )


def service_config() -> str:
    """The example configuration with the values a service install needs set."""
    text = example_toml()
    for section, key, value in (
        ("models", "dir", f'"{MODELS_DIR}"'),
        ("state", "dir", f'"{STATE_DIR}"'),
        ("log", "format", '"json"'),
    ):
        text = _set_example_key(text, section, key, value)
    header = (
        "# Written by `edge-agent install-service`; yours to edit (a reinstall keeps it).\n"
        "# Reload after a change: systemctl reload edge-agent (some sections need a restart).\n"
        f"# Broker password: write it to {CREDENTIALS_DIR / PASSWORD_CREDENTIAL} (root, 0600),\n"
        '# then set [mqtt] username = "..." and password_credential = '
        f'"{PASSWORD_CREDENTIAL}".\n'
    )
    return header + text


def _set_example_key(text: str, section: str, key: str, value: str) -> str:
    lines = text.splitlines()
    current = None
    for index, line in enumerate(lines):
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and line.startswith(f"# {key} ="):
            lines[index] = f"{key} = {value}"
            return "\n".join(lines) + "\n"
    raise ValueError(f"no [{section}] {key} in the example configuration")


@dataclass(frozen=True)
class Step:
    """One thing the installer does: a directory or a file, with its mode."""

    path: Path  # as on the target system (without --root)
    mode: int
    content: str | None = None  # None: a directory
    overwrite: bool = True  # False: an existing file is the operator's and stays


@dataclass(frozen=True)
class Plan:
    """Everything install-service would do."""

    root: Path
    venv: Path
    create_venv: list[list[str]]
    steps: list[Step]
    warnings: list[str]


class InstallError(Exception):
    """install-service cannot proceed; the message says what to do."""


def make_plan(
    root: Path, prefix: Path | None, source: str | None = None, *, broker_config: bool = True
) -> Plan:
    """What to do to install under `root` with the virtual environment at `prefix`.

    A missing venv is created and `source` (what pip installs: a checkout, a wheel, a
    requirement) installed into it; by default the source this copy was installed from.
    With `broker_config` and a local mosquitto (its conf.d exists), its settings snippet.
    """
    venv = prefix if prefix is not None else _default_venv()
    executable = venv / "bin" / "edge-agent"
    create: list[list[str]] = []
    if not _under(root, executable).exists():
        source = source or _install_source()
        if source is None:
            # Never fall back to the bare name: "edge-agent" on the public PyPI is an
            # unrelated project.
            raise InstallError(
                f"no venv at {venv} and no way to tell where this edge-agent came from: "
                "pass --source (this checkout, a wheel, or a requirement for your index)"
            )
        target = str(_under(root, venv))
        create = [
            [sys.executable, "-m", "venv", target],
            [f"{target}/bin/pip", "install", "--quiet", source],
        ]
    warnings = []
    if _hidden_by_protect_home(venv):
        warnings.append(
            f"{venv} is under a home directory, which ProtectHome=yes hides from the "
            "service: use --prefix /opt/edge-agent (or a drop-in with ProtectHome=read-only)"
        )
    interpreter = Path(sys.base_prefix)
    if create and _hidden_by_protect_home(interpreter):
        warnings.append(
            f"the new venv would run the Python in {interpreter}, under a home directory "
            "that ProtectHome=yes hides: run install-service with the system's python3"
        )
    if create and root != Path("/"):
        warnings.append(
            "a venv is not relocatable: the one created under --root only works at that "
            "path; create it at its final path (e.g. in a chroot of the image) instead"
        )
    steps = [
        Step(UNIT_DIR / UNIT_NAME, 0o644, render_unit(executable)),
        Step(CONFIG_DIR, 0o755),
        Step(CONFIG_FILE, 0o644, service_config(), overwrite=False),
        Step(CREDENTIALS_DIR, 0o700),
        # systemd refuses to start a unit whose LoadCredential= source is missing; an
        # empty password is ignored until mqtt.username is set.
        Step(CREDENTIALS_DIR / PASSWORD_CREDENTIAL, 0o600, "", overwrite=False),
        # No STATE_DIR nor MODELS_DIR: a plain directory made here would be migrated by
        # systemd at the first start (DynamicUser=); StateDirectory= makes both, owned right.
    ]
    if broker_config and _under(root, MOSQUITTO_CONF_D).is_dir():
        steps.append(
            Step(
                MOSQUITTO_CONF_D / MOSQUITTO_SNIPPET_NAME, 0o644, MOSQUITTO_SNIPPET, overwrite=False
            )
        )
    elif broker_config:
        warnings.append(
            f"no {MOSQUITTO_CONF_D}: no local mosquitto to tune; with one (apt-get install "
            "mosquitto) run install-service again, or give your broker the settings in "
            f"systemd/mosquitto-{MOSQUITTO_SNIPPET_NAME} (set_tcp_nodelay true above all)"
        )
    return Plan(root, venv, create, steps, warnings)


def apply(plan: Plan, *, dry_run: bool) -> list[str]:
    """Carry out `plan` (or, with dry_run, describe it); one report line per step."""
    report = []
    if plan.create_venv:
        for command in plan.create_venv:
            line = " ".join(shlex.quote(part) for part in command)
            report.append(f"{'would run' if dry_run else 'running'}: {line}")
            if not dry_run:
                subprocess.run(command, check=True)
    else:
        report.append(f"venv: using {plan.venv}")
    for step in plan.steps:
        target = _under(plan.root, step.path)
        if step.content is None:
            state = "exists" if target.is_dir() else "create"
            if not dry_run and state == "create":
                target.mkdir(parents=True, mode=step.mode)
                os.chmod(target, step.mode)  # mkdir's mode is filtered by the umask
        elif not target.exists():
            state = "create"
        elif target.read_text() == step.content:
            state = "unchanged"
        else:
            state = "update" if step.overwrite else "kept (yours)"
        if step.content is not None and state in ("create", "update") and not dry_run:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text(step.content)
            os.chmod(tmp, step.mode)
            os.replace(tmp, target)
        verb = {"create": "would create", "update": "would update"}.get(state, state)
        report.append(f"{verb if dry_run else state:>14}  {step.path}")
    return report


def systemctl_lines(root: Path, *, restart_broker: bool = False) -> list[str]:
    if root != Path("/"):
        return [f"systemctl --root={root} enable {UNIT_NAME}"]
    broker = ["systemctl restart mosquitto.service"] if restart_broker else []
    return [
        *broker,
        "systemctl daemon-reload",
        f"systemctl enable --now {UNIT_NAME}",
        f"systemctl status {UNIT_NAME}",
        f"journalctl -u {UNIT_NAME} -f",
    ]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "install-service",
        help="install the agent as a systemd service (unit, config, state directories)",
    )
    parser.add_argument(
        "--prefix",
        type=Path,
        help="the virtual environment the unit runs (created when missing); default: the "
        f"one running this command, else {DEFAULT_PREFIX}",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        help="install under this directory instead of / (images, tests)",
    )
    parser.add_argument(
        "--source",
        help="what pip installs into a new venv (a checkout, a wheel, a requirement); "
        "default: where this copy was installed from",
    )
    parser.add_argument(
        "--no-broker-config",
        dest="broker_config",
        action="store_false",
        help=f"do not place {MOSQUITTO_CONF_D / MOSQUITTO_SNIPPET_NAME} (mosquitto's "
        "low-latency settings) even when a local mosquitto is installed",
    )
    parser.add_argument("--dry-run", action="store_true", help="show what would be done")
    parser.add_argument("--print-unit", action="store_true", help="print the unit and exit")


def run(args: argparse.Namespace) -> int:
    """The install-service command."""
    root: Path = args.root.resolve()
    try:
        plan = make_plan(
            root,
            args.prefix.absolute() if args.prefix else None,
            args.source,
            broker_config=args.broker_config,
        )
    except InstallError as exc:
        print(f"edge-agent install-service: {exc}", file=sys.stderr)
        return 1
    if args.print_unit:
        print(next(s.content for s in plan.steps if s.path.name == UNIT_NAME), end="")
        return 0
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        report = apply(plan, dry_run=args.dry_run)
    except PermissionError as exc:
        print(
            f"edge-agent install-service: {exc.filename}: permission denied; run it as root, "
            "or stage the files with --root DIR",
            file=sys.stderr,
        )
        return 1
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"edge-agent install-service: {exc}", file=sys.stderr)
        return 1
    print("\n".join(report))
    if args.dry_run:
        unit = next(s for s in plan.steps if s.path.name == UNIT_NAME)
        print(f"\n--- {unit.path} ---\n{unit.content}", end="")
    snippet = str(MOSQUITTO_CONF_D / MOSQUITTO_SNIPPET_NAME)
    placed = any(line.split()[-1] == snippet and "create" in line for line in report)
    lines = systemctl_lines(root, restart_broker=placed)
    print("\nthen:\n" + "\n".join(f"  {line}" for line in lines))
    print(f"  and push models into {MODELS_DIR} (made at the first start), e.g. models/digits")
    return 0


def _hidden_by_protect_home(path: Path) -> bool:
    return any(path == hidden or hidden in path.parents for hidden in _HIDDEN_BY_PROTECT_HOME)


def _default_venv() -> Path:
    in_venv = sys.prefix != sys.base_prefix
    return Path(sys.prefix) if in_venv else DEFAULT_PREFIX


def _install_source() -> str | None:
    """Where this copy of the agent was installed from, for pip; None when unknown.

    A source checkout (editable installs run from one) is itself the source; an installed
    copy's PEP 610 record (direct_url.json) names the wheel, directory or URL it came from.
    """
    here = Path(__file__).resolve()
    checkout = here.parent.parent
    pyproject = checkout / "pyproject.toml"
    if pyproject.is_file() and 'name = "edge-agent"' in pyproject.read_text():
        return str(checkout)
    from importlib import metadata  # noqa: PLC0415  (`edge-agent run` builds this parser too)

    for distribution in metadata.distributions(name="edge-agent"):
        if Path(str(distribution.locate_file("agent/install.py"))).resolve() != here:
            continue  # another copy on the path, not the one running
        direct = distribution.read_text("direct_url.json")
        if not direct:
            return None  # from an index: which one is for the operator to say
        url = str(json.loads(direct).get("url", ""))
        return url[len("file://") :] if url.startswith("file://") else f"edge-agent @ {url}"
    return None


def _under(root: Path, path: Path) -> Path:
    return root / path.relative_to("/")
