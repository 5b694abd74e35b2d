"""Configuration: TOML, environment and flags, and the errors an operator sees."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.adapt.monitor import usable_cpus
from agent.config import (
    AgentConfig,
    MqttConfig,
    example_toml,
    load_config,
    read_password,
)
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_serve_a_first_run(tmp_path: Path) -> None:
    """Without a file, the agent talks to a local broker and reads ./models."""
    config = load_config(None, env={})
    assert config.mqtt.host == "127.0.0.1"
    assert config.mqtt.port == 1883
    assert config.models.dir == Path("models")
    assert config.mqtt.device_id  # the host name
    assert config.mqtt.effective_client_id == f"edge-agent-{config.mqtt.device_id}"


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    """Each source overrides the one before: file < environment < command line."""
    path = tmp_path / "config.toml"
    path.write_text(
        '[mqtt]\nhost = "broker.local"\nport = 1884\ndevice_id = "a"\n[models]\nworkers = 2\n'
    )
    env = {"EDGE_AGENT_MQTT__PORT": "1885", "EDGE_AGENT_MODELS__WORKERS": "3"}
    config = load_config(path, env=env, overrides={"mqtt.port": 1886, "models.dir": None})
    assert config.mqtt.host == "broker.local"
    assert config.mqtt.port == 1886
    assert config.models.workers == 3
    assert config.mqtt.device_id == "a"
    assert config.models.dir == Path("models")


def test_nested_sections_from_the_environment() -> None:
    """`__` separates levels, so TLS settings can come from the environment too."""
    env = {"EDGE_AGENT_MQTT__TLS__ENABLED": "true", "EDGE_AGENT_MQTT__TLS__CA_FILE": "/ca.pem"}
    config = load_config(None, env=env)
    assert config.mqtt.tls.enabled is True
    assert config.mqtt.tls.ca_file == Path("/ca.pem")


def test_config_path_from_environment(tmp_path: Path) -> None:
    """EDGE_AGENT_CONFIG names the file when --config is not given."""
    path = tmp_path / "c.toml"
    path.write_text('[mqtt]\ndevice_id = "from-env-file"\n')
    assert load_config(None, env={"EDGE_AGENT_CONFIG": str(path)}).mqtt.device_id == (
        "from-env-file"
    )


# Files opened while `_opened` is recording (an audit hook sees every open() of the process).
_recording: list[list[str]] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and _recording:
        _recording[-1].append(str(args[0]))


sys.addaudithook(_audit)


def test_no_config_file_is_read_unless_one_is_named(tmp_path: Path) -> None:
    """Without --config or EDGE_AGENT_CONFIG no file is opened, not even the service's
    /etc/edge-agent/config.toml: a run by hand never picks up an installed service's
    configuration or state directory."""
    named = tmp_path / "named.toml"
    named.write_text('[mqtt]\ndevice_id = "named"\n')
    _recording.append([])
    try:
        config = load_config(None, env={"EDGE_AGENT_MQTT__PORT": "1884"})
        opened_unnamed = list(_recording[-1])
        _recording[-1].clear()
        assert load_config(None, env={"EDGE_AGENT_CONFIG": str(named)}).mqtt.device_id == "named"
        opened_named = list(_recording[-1])
    finally:
        _recording.pop()
    assert config.mqtt.port == 1884
    assert config.state.dir is None
    assert opened_unnamed == []
    assert opened_named == [str(named)]


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("[mqtt]\nport = 70000\n", {}, "mqtt.port = 70000: Input should be less than or equal"),
        ("[mqtt]\nprot = 1\n", {}, "mqtt.prot: unknown key (from file"),
        ("", {"EDGE_AGENT_MQTT__PORT": "abc"}, "from environment EDGE_AGENT_MQTT__PORT"),
        ("[models]\nworkers = 0\n", {}, "models.workers = 0"),
        ('[mqtt]\ndevice_id = "a/#"\n', {}, "mqtt.device_id = 'a/#'"),
        (
            "[mqtt]\nreconnect_min_s = 9\nreconnect_max_s = 2\n",
            {},
            "reconnect_max_s must not be below reconnect_min_s",
        ),
        ('[mqtt.tls]\ncert_file = "/c.pem"\n', {}, "cert_file and key_file go together"),
        ('[log]\nlevel = "loud"\n', {}, "log.level = 'loud'"),
    ],
)
def test_invalid_values_name_key_value_source_and_reason(
    tmp_path: Path, text: str, env: dict[str, str], expected: str
) -> None:
    """A bad value is refused with its key, its value, where it came from and why."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)
    assert expected in str(info.value)


def test_unreadable_and_malformed_files_are_refused(tmp_path: Path) -> None:
    """A missing file or broken TOML is a ConfigError naming the file."""
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_config(tmp_path / "nope.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt\nport=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})


def test_password_comes_from_a_file_or_a_systemd_credential(tmp_path: Path) -> None:
    """The broker password is read from its file or $CREDENTIALS_DIRECTORY, never the config."""
    (tmp_path / "pw").write_text("s3cret\n")
    assert read_password(MqttConfig(password_file=tmp_path / "pw"), env={}) == "s3cret"
    config = MqttConfig(password_credential="broker-password")
    (tmp_path / "broker-password").write_text("cred")
    assert read_password(config, env={"CREDENTIALS_DIRECTORY": str(tmp_path)}) == "cred"
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY is not set"):
        read_password(config, env={})
    with pytest.raises(ConfigError, match="missing"):
        read_password(MqttConfig(password_file=tmp_path / "missing"), env={})


def test_usable_cpus_is_within_the_machine() -> None:
    """Session threads default to the CPUs this process may use, at least one."""
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)


def test_example_config_is_current_and_loads(tmp_path: Path) -> None:
    """systemd/config.example.toml is what example_toml() writes, and it parses to defaults."""
    committed = (REPO / "systemd" / "config.example.toml").read_text()
    assert committed == example_toml(), (
        "regenerate: python -c 'from agent.config import "
        'example_toml; print(example_toml(), end="")\' > systemd/config.example.toml'
    )
    path = tmp_path / "c.toml"
    path.write_text(committed)
    loaded = load_config(path, env={})
    assert loaded.model_dump(exclude={"mqtt": {"device_id"}}) == AgentConfig().model_dump(
        exclude={"mqtt": {"device_id"}}
    )


def test_run_refuses_an_invalid_config_with_exit_78(tmp_path: Path) -> None:
    """`edge-agent run` with a bad value exits 78 (EX_CONFIG) and says which key is wrong."""
    path = tmp_path / "config.toml"
    path.write_text("[models]\nmax_queue = -1\n")
    result = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 78
    assert "models.max_queue = -1" in result.stderr
