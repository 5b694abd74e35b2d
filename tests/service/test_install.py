"""install-service and the unit it writes: an installed layout in a temporary root passes
`systemd-analyze verify` and scores at most 2.0 in `systemd-analyze security`."""

from __future__ import annotations

import getpass
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.broker import free_port, mosquitto_binary, port_in_use
from agent.cli import main
from agent.config import load_config
from agent.install import MOSQUITTO_SNIPPET, render_unit, systemctl_lines
from agent.mqtt import rtt

REPO = Path(__file__).resolve().parents[2]
SHIPPED_UNIT = REPO / "systemd" / "edge-agent.service"
SHIPPED_SNIPPET = REPO / "systemd" / "mosquitto-edge-agent-tuning.conf"
SNIPPET = "/etc/mosquitto/conf.d/edge-agent-tuning.conf"
UNIT = "/etc/systemd/system/edge-agent.service"
PREFIX = "/opt/edge-agent"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def os_layer(root: Path) -> Path:
    """What the target system brings: systemd's own units and /bin/kill (ExecReload)."""
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    for unit in Path("/usr/lib/systemd/system").glob("*"):
        if unit.suffix in (".target", ".slice") and unit.is_file() and not unit.is_symlink():
            shutil.copy(unit, units)
    # verify only needs an executable there; a machine without procps has no /bin/kill.
    kill = root / "bin" / "kill"
    kill.parent.mkdir()
    kill.write_text('#!/bin/sh\nexec kill "$@"\n')
    kill.chmod(0o755)
    return root


def venv_in(root: Path) -> Path:
    """An installed virtual environment at PREFIX in `root` (its entry point runs ours)."""
    executable = root / PREFIX.lstrip("/") / "bin" / "edge-agent"
    executable.parent.mkdir(parents=True)
    executable.write_text(f'#!/bin/sh\nexec {sys.prefix}/bin/edge-agent "$@"\n')
    executable.chmod(0o755)
    return executable


def install(root: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["install-service", "--root", str(root), "--prefix", PREFIX, *extra]) == 0
    return capsys.readouterr().out


@pytest.fixture
def root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A temporary root with the OS layer, a venv, and install-service run on it."""
    target = os_layer(tmp_path / "root")
    venv_in(target)
    install(target, capsys=capsys)
    return target


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


@needs_systemd_analyze
def test_the_installed_unit_verifies_clean(root: Path) -> None:
    """`systemd-analyze verify` accepts the unit with no warning at all."""
    result = analyze("verify", f"--root={root}", UNIT)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_systemd_analyze
def test_verify_fails_when_execstart_does_not_exist(root: Path) -> None:
    """The check has teeth: without the venv's entry point, verify fails and says why."""
    (root / PREFIX.lstrip("/") / "bin" / "edge-agent").unlink()
    result = analyze("verify", f"--root={root}", UNIT)
    assert result.returncode != 0
    assert f"Command {PREFIX}/bin/edge-agent is not executable" in result.stderr


@needs_systemd_analyze
def test_the_unit_exposure_is_at_most_2(root: Path) -> None:
    """`systemd-analyze security --offline=true` rates the unit 2.0 or better."""
    result = analyze("security", "--offline=true", f"--root={root}", UNIT)
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for edge-agent\.service: ([0-9.]+)", result.stdout)
    assert match is not None, result.stdout
    assert float(match.group(1)) <= 2.0, result.stdout


@needs_systemd_analyze
def test_the_shared_memory_drop_in_keeps_the_unit_clean_and_hardened(root: Path) -> None:
    """With systemd/edge-agent-shm.conf as a drop-in the unit still verifies without a
    warning and still rates 2.0 or better."""
    drop_ins = root / "etc/systemd/system/edge-agent.service.d"
    drop_ins.mkdir(parents=True)
    shutil.copy(REPO / "systemd" / "edge-agent-shm.conf", drop_ins / "shm.conf")
    verified = analyze("verify", f"--root={root}", UNIT)
    assert (verified.returncode, verified.stdout + verified.stderr) == (0, "")
    rated = analyze("security", "--offline=true", f"--root={root}", UNIT)
    match = re.search(r"Overall exposure level for edge-agent\.service: ([0-9.]+)", rated.stdout)
    assert match is not None and float(match.group(1)) <= 2.0, rated.stdout


@needs_systemd_analyze
def test_the_unit_can_be_enabled_offline(root: Path) -> None:
    """The printed `systemctl --root=... enable` works: [Install] hooks into multi-user."""
    result = subprocess.run(
        ["systemctl", f"--root={root}", "enable", "edge-agent.service"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (root / "etc/systemd/system/multi-user.target.wants/edge-agent.service").is_symlink()


def test_the_shipped_unit_is_the_one_install_service_writes() -> None:
    """systemd/edge-agent.service is the rendered template (regenerate with --print-unit)."""
    assert SHIPPED_UNIT.read_text() == render_unit(Path(PREFIX) / "bin" / "edge-agent"), (
        "regenerate: edge-agent install-service --prefix /opt/edge-agent --print-unit "
        "> systemd/edge-agent.service"
    )


def test_the_unit_has_the_required_directives() -> None:
    """Type=notify, the watchdog, restart policy, identity, directories, credentials and
    the hardening the issue asks for are all there."""
    unit = SHIPPED_UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "StartLimitBurst=5",
        "RestartPreventExitStatus=78",
        "DynamicUser=yes",
        "StateDirectory=edge-agent edge-agent/models",
        "After=network-online.target mosquitto.service",
        "ConfigurationDirectory=edge-agent",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter=@system-service",
        "#MemoryMax=",
        "#CPUQuota=",
        "LoadCredential=mqtt-password:/etc/edge-agent/credentials/mqtt-password",
        f"ExecStart={PREFIX}/bin/edge-agent run --config /etc/edge-agent/config.toml",
    ):
        assert line in unit, line


def test_install_is_idempotent_and_keeps_an_edited_config(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second run changes nothing; an operator's config survives a reinstall, a damaged
    unit is put right."""
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    again = install(root, capsys=capsys)
    assert "create" not in again
    assert "update" not in again
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == files

    config = root / "etc/edge-agent/config.toml"
    config.write_text('[mqtt]\nhost = "broker.lan"\n')
    unit = root / UNIT.lstrip("/")
    unit.write_text(unit.read_text().replace("WatchdogSec=30s", "WatchdogSec=0"))
    third = install(root, capsys=capsys)
    assert "kept (yours)  /etc/edge-agent/config.toml" in third
    assert "update  /etc/systemd/system/edge-agent.service" in third
    assert config.read_text() == '[mqtt]\nhost = "broker.lan"\n'
    assert "WatchdogSec=30s" in unit.read_text()


def test_install_lays_out_config_credentials_state_and_models(root: Path) -> None:
    """The config is valid and points at the state directories; secrets are root-only."""
    config = load_config(root / "etc/edge-agent/config.toml", env={})
    assert config.models.dir == Path("/var/lib/edge-agent/models")
    assert config.state.dir == Path("/var/lib/edge-agent")
    assert config.log.format == "json"
    assert config.mqtt.password_credential is None  # until the operator sets a user
    credentials = root / "etc/edge-agent/credentials"
    assert credentials.stat().st_mode & 0o777 == 0o700
    assert (credentials / "mqtt-password").stat().st_mode & 0o777 == 0o600
    # systemd makes them at the first start, for the dynamic user (StateDirectory=): a plain
    # directory made beforehand would be migrated, with a warning in the journal.
    assert not (root / "var/lib/edge-agent").exists()


def test_dry_run_shows_everything_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--dry-run prints the venv commands, each file and the unit, and touches no file."""
    target = tmp_path / "empty-root"
    target.mkdir()
    out = install(target, "--dry-run", capsys=capsys)
    assert list(target.iterdir()) == []
    assert f"would run: {sys.executable} -m venv {target}{PREFIX}" in out
    assert "would create  /etc/edge-agent/config.toml" in out
    assert f"ExecStart={PREFIX}/bin/edge-agent run" in out
    assert f"systemctl --root={target} enable edge-agent.service" in out


def test_the_systemctl_lines_for_a_live_system() -> None:
    """On the real root the command prints how to reload, enable, start and follow it."""
    assert systemctl_lines(Path("/")) == [
        "systemctl daemon-reload",
        "systemctl enable --now edge-agent.service",
        "systemctl status edge-agent.service",
        "journalctl -u edge-agent.service -f",
    ]


def test_a_venv_under_a_home_directory_is_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ProtectHome=yes would hide a venv in /home or /root: install-service says so."""
    main(["install-service", "--root", str(tmp_path), "--prefix", "/root/venv", "--dry-run"])
    assert "ProtectHome=yes hides" in capsys.readouterr().err


@pytest.mark.soak
@needs_systemd_analyze
def test_install_service_creates_a_working_venv(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a venv at --prefix, install-service creates one with this checkout in it,
    and the unit then verifies clean against it."""
    target = os_layer(tmp_path / "root")
    out = install(target, capsys=capsys)
    assert f"running: {sys.executable} -m venv {target}{PREFIX}" in out
    executable = target / PREFIX.lstrip("/") / "bin" / "edge-agent"
    version = subprocess.run(
        [str(executable), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.startswith("edge-agent ")
    result = analyze("verify", f"--root={target}", UNIT)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # The installed copy knows where it came from (PEP 610), for the next venv it makes.
    again = subprocess.run(
        [str(executable), "install-service", "--root", str(tmp_path / "next"), "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"pip install --quiet {REPO}" in again.stdout


def test_the_venv_source_can_be_given_and_is_never_guessed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--source says what pip installs; with no known origin install-service refuses
    rather than fetch whatever the public index calls edge-agent."""
    wheel = "/srv/wheels/edge_agent-0.1.0-py3-none-any.whl"
    out = install(tmp_path, "--dry-run", "--source", wheel, capsys=capsys)
    assert f"pip install --quiet {wheel}" in out
    monkeypatch.setattr("agent.install._install_source", lambda: None)
    code = main(["install-service", "--root", str(tmp_path), "--prefix", PREFIX, "--dry-run"])
    assert code == 1
    assert "pass --source" in capsys.readouterr().err


def test_the_shipped_broker_snippet_is_the_one_install_service_places() -> None:
    """systemd/mosquitto-edge-agent-tuning.conf is what install-service writes, and it sets
    what the Nagle trap and mosquitto 2 need (max_packet_size, not message_size_limit)."""
    assert SHIPPED_SNIPPET.read_text() == MOSQUITTO_SNIPPET
    settings = [line.split()[0] for line in MOSQUITTO_SNIPPET.splitlines() if line[:1].isalpha()]
    assert "set_tcp_nodelay" in settings
    assert "max_packet_size" in settings
    assert "message_size_limit" not in settings


def test_the_broker_snippet_is_placed_only_where_mosquitto_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With /etc/mosquitto/conf.d the snippet is placed (and the broker restart printed),
    an edited one is kept, --no-broker-config leaves it out; without mosquitto there is
    a warning instead."""
    bare = os_layer(tmp_path / "bare")
    venv_in(bare)
    out = install(bare, capsys=capsys)
    assert SNIPPET not in out
    assert (
        "no /etc/mosquitto/conf.d" in capsys.readouterr().err
        or not (bare / SNIPPET.lstrip("/")).exists()
    )

    skipped = os_layer(tmp_path / "skipped")
    venv_in(skipped)
    (skipped / "etc/mosquitto/conf.d").mkdir(parents=True)
    install(skipped, "--no-broker-config", capsys=capsys)
    assert not (skipped / SNIPPET.lstrip("/")).exists()

    target = os_layer(tmp_path / "root")
    venv_in(target)
    (target / "etc/mosquitto/conf.d").mkdir(parents=True)
    dry = install(target, "--dry-run", capsys=capsys)
    assert f"would create  {SNIPPET}" in dry
    assert not (target / SNIPPET.lstrip("/")).exists()
    install(target, capsys=capsys)
    placed = target / SNIPPET.lstrip("/")
    assert placed.read_text() == MOSQUITTO_SNIPPET
    assert placed.stat().st_mode & 0o777 == 0o644
    placed.write_text("set_tcp_nodelay true\n")
    assert f"kept (yours)  {SNIPPET}" in install(target, capsys=capsys)
    assert placed.read_text() == "set_tcp_nodelay true\n"
    assert systemctl_lines(Path("/"), restart_broker=True)[0] == (
        "systemctl restart mosquitto.service"
    )


def _raw_mosquitto(tmp_path: Path, *lines: str) -> tuple[subprocess.Popen[bytes], int]:
    """mosquitto on a free loopback port with only `lines` besides the listener, as
    Debian's default configuration leaves it (no set_tcp_nodelay); it logs to stderr."""
    binary = mosquitto_binary()
    assert binary is not None
    port = free_port()
    conf = tmp_path / f"mosquitto-{port}.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
        "log_dest stderr\n" + "".join(f"{line}\n" for line in lines)
    )
    process = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        if port_in_use("127.0.0.1", port):
            return process, port
        time.sleep(0.02)
    process.kill()
    said = process.communicate()[1].decode()
    raise AssertionError(f"mosquitto did not listen on {port}: {said}")


def _stop(process: subprocess.Popen[bytes]) -> str:
    """Stop a mosquitto of `_raw_mosquitto`; what it logged."""
    process.terminate()
    return process.communicate(timeout=10)[1].decode()


def test_mosquitto_takes_the_snippet_without_a_complaint(tmp_path: Path) -> None:
    """A real mosquitto loads the snippet from a conf.d (include_dir) and logs no warning
    or deprecation about it."""
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    (conf_d / "edge-agent-tuning.conf").write_text(MOSQUITTO_SNIPPET)
    process, _port = _raw_mosquitto(tmp_path, f"include_dir {conf_d}")
    said = _stop(process)
    assert "edge-agent-tuning.conf" in said
    # (As root the tests keep mosquitto root, which it warns about: not the snippet's doing.)
    lines = [line for line in said.lower().splitlines() if "run as root" not in line]
    for word in ("warning", "deprecated", "recommended", "error", "unknown"):
        assert not [line for line in lines if word in line], said


def test_the_agent_warns_of_a_slow_broker_and_names_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Against mosquitto as Debian ships it (no set_tcp_nodelay) the round-trip probe finds
    it slow and the warning says how to fix it; with the snippet it is far faster."""
    plain, plain_port = _raw_mosquitto(tmp_path)
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    (conf_d / "edge-agent-tuning.conf").write_text(MOSQUITTO_SNIPPET)
    tuned, tuned_port = _raw_mosquitto(tmp_path, f"include_dir {conf_d}")
    try:
        slow = rtt.check(_mqtt(plain_port), None)
        fast = rtt.measure(_mqtt(tuned_port), None)
    finally:
        _stop(plain)
        _stop(tuned)
    assert slow is not None
    assert fast is not None
    assert slow.slow, slow
    assert fast.median_ms < slow.median_ms / 4, (fast, slow)
    out = capsys.readouterr().out
    assert "broker_round_trip_slow" in out
    assert "set_tcp_nodelay true" in out


def _mqtt(port: int) -> Any:
    return load_config(
        None, env={}, overrides={"mqtt.port": port, "mqtt.device_id": "rtt-test"}
    ).mqtt
