"""Fixtures for the service tests: a NOTIFY_SOCKET of our own that records what the agent
tells systemd, and agents started without the shared fixture's wait for the broker."""

from __future__ import annotations

import gc
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.service import Agent
from tests.conftest import agent_config


@dataclass(frozen=True)
class Notification:
    """One datagram received on the notify socket."""

    at: float  # monotonic
    fields: dict[str, str]


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's; records every notification."""

    def __init__(self) -> None:
        # The abstract namespace: no path-length limit, nothing to clean up.
        self.address = f"@edge-agent-test-{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.address[1:])
        self._sock.settimeout(0.1)
        self.received: list[Notification] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            with self._lock:
                self.received.append(Notification(time.monotonic(), fields))

    def all(self) -> list[Notification]:
        with self._lock:
            return list(self.received)

    def with_key(self, key: str, value: str | None = None) -> list[Notification]:
        return [
            n for n in self.all() if key in n.fields and (value is None or n.fields[key] == value)
        ]

    def wait_for(
        self, key: str, value: str | None = None, timeout: float = 10.0, after: float = 0.0
    ) -> Notification:
        """The first notification setting `key` (to `value`) received after `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n in self.with_key(key, value):
                if n.at > after:
                    return n
            time.sleep(0.02)
        raise AssertionError(f"no {key}={value or '*'} within {timeout} s; got {self.all()}")

    def statuses(self) -> list[str]:
        return [n.fields["STATUS"] for n in self.with_key("STATUS")]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2)
        self._sock.close()


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """NOTIFY_SOCKET pointing at a socket the test reads; no watchdog unless a test sets one."""
    sock = NotifySocket()
    monkeypatch.setenv("NOTIFY_SOCKET", sock.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


@pytest.fixture
def make_agent(models_dir: Path) -> Iterator[Callable[..., Agent]]:
    """Build and start agents that may not reach a broker; each is stopped after the test."""
    started: list[Agent] = []

    def make(
        port: int,
        models: Path | None = None,
        reload_config: Callable[[], AgentConfig] | None = None,
        **sections: dict[str, Any],
    ) -> Agent:
        """`sections` override the config; the `models` section is `models_section` here,
        `models` being the folder."""
        if "models_section" in sections:
            sections["models"] = sections.pop("models_section")
        sections.setdefault("mqtt", {})
        sections["mqtt"].setdefault("reconnect_min_s", 1)
        sections["mqtt"].setdefault("reconnect_max_s", 2)
        agent = Agent(agent_config(port, models or models_dir, **sections), reload_config)
        started.append(agent)
        agent.start()
        return agent

    yield make
    for agent in started:
        agent.request_stop()
        agent.stop(drain_timeout=5)


@pytest.fixture(autouse=True)
def _collect_paho_sockets() -> Iterator[None]:
    """Collect clients of this test now, quietly.

    paho closes its internal wake-up socket pair only when a client is collected; inside
    a reference cycle the sockets may be finalised first and warn, which the strict
    warning filter would turn into an error charged to whichever test runs then.
    """
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def wait_subscribed(probe: Any, device_topic: str, timeout: float = 5.0) -> None:
    """Return once the broker has the agent's subscriptions.

    `wait_connected` returns when CONNACK arrives, before the broker has handled the
    SUBSCRIBE that follows it; the agent publishes its `online` status after that
    SUBSCRIBE on the same connection, so seeing the status means requests will be routed.
    """
    topic = f"{device_topic}/status"
    probe.subscribe(topic)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = probe.expect(topic, timeout=max(0.05, deadline - time.monotonic()))
        if b'"state":"online"' in msg.payload:
            return
    raise AssertionError(f"no online status on {topic}")
