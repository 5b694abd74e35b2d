"""A local broker for single-box use, the quick start, the tests and the benchmarks.

Two kinds, both bound to loopback only:
- `MosquittoBroker`: a private mosquitto child process (MQTT 5, fast), when the binary is
  installed;
- `AmqttBroker`: amqtt in this process (the `broker` extra; MQTT 3.1.1 only), when
  mosquitto is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import getpass
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Literal, Protocol

import structlog

log = structlog.get_logger(__name__)

BrokerKind = Literal["auto", "mosquitto", "amqtt"]


class BrokerError(RuntimeError):
    """The local broker could not start."""


class LocalBroker(Protocol):
    host: str
    port: int
    protocol: Literal["5", "3.1.1"]
    kind: str

    def start(self, timeout: float = 10.0) -> None: ...

    def stop(self) -> None: ...


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def local_broker(kind: BrokerKind, port: int, host: str = "127.0.0.1") -> LocalBroker:
    """The broker of `kind`; `auto` takes mosquitto when installed, amqtt otherwise."""
    if kind == "auto":
        kind = "mosquitto" if mosquitto_binary() else "amqtt"
    if kind == "mosquitto":
        return MosquittoBroker(port, host)
    return AmqttBroker(port, host)


def mosquitto_binary() -> str | None:
    """mosquitto on PATH, in sbin, or beside this Python: tools/_env.sh puts a launcher for
    Debian's package, unpacked without root, into the venv's bin."""
    beside = Path(sys.executable).parent / "mosquitto"
    return shutil.which("mosquitto") or next(
        (
            str(p)
            for p in (Path("/usr/sbin/mosquitto"), Path("/usr/local/sbin/mosquitto"), beside)
            if p.exists()
        ),
        None,
    )


def _wait_listening(host: str, port: int, timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_in_use(host, port):
            return
        if not alive():
            raise BrokerError(f"broker exited before listening on {host}:{port}")
        time.sleep(0.02)
    raise BrokerError(f"broker did not listen on {host}:{port} within {timeout} s")


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the agent dies, so a crash leaves no broker behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the broker may outlive a crashed agent


_PR_SET_PDEATHSIG = 1


class MosquittoBroker:
    """A private mosquitto on loopback, with TCP_NODELAY and no persistence."""

    protocol: Literal["5", "3.1.1"] = "5"
    kind = "mosquitto"

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        extra_config: str = "",
        max_packet_size: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.extra_config = extra_config
        # mosquitto's max_packet_size: larger packets from a client make it disconnect
        # that client (MQTT 5 clients learn the limit from the CONNACK).
        self.max_packet_size = max_packet_size
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def config_dir(self) -> Path:
        assert self._dir is not None, "start() first"
        return Path(self._dir.name)

    def start(self, timeout: float = 10.0) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
        if port_in_use(self.host, self.port):
            raise BrokerError(f"{self.host}:{self.port} is already in use")
        self._dir = tempfile.TemporaryDirectory(prefix="edge-agent-mosquitto-")
        conf = self.config_dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {self.host}\n"
            # Stay the user that started it: a switch of user (mosquitto drops root by
            # default) would clear the parent-death signal that ties it to the agent.
            f"user {getpass.getuser()}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            # Without it, small QoS 1 exchanges wait ~40 ms on Nagle + delayed ACK.
            "set_tcp_nodelay true\n"
            "max_queued_messages 10000\n"
            + (f"max_packet_size {self.max_packet_size}\n" if self.max_packet_size else "")
            + f"log_dest file {self.config_dir / 'mosquitto.log'}\n"
            + f"{self.extra_config}\n"
        )
        self._process = subprocess.Popen(
            [binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,  # noqa: PLW1509  (only calls prctl; no locks taken)
        )
        try:
            _wait_listening(
                self.host,
                self.port,
                timeout,
                lambda: self._process is not None and self._process.poll() is None,
            )
        except BrokerError as exc:
            detail = self._stderr()
            self.stop()
            raise BrokerError(f"{exc}: {detail}") from None
        log.info("broker_started", kind=self.kind, host=self.host, port=self.port)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process is not None and self._process.stderr is not None:
            self._process.stderr.close()
        self._process = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def _stderr(self) -> str:
        """What mosquitto said: its stderr when it died (a bad config), else its log file."""
        process = self._process
        if process is not None and process.poll() is not None and process.stderr is not None:
            said = process.stderr.read().decode(errors="replace").strip()
            if said:
                return said[-2000:]
        log_file = self.config_dir / "mosquitto.log"
        if log_file.exists():
            return log_file.read_text().strip()[-2000:]
        return ""


class AmqttBroker:
    """amqtt on loopback, run on an asyncio loop in a thread of this process."""

    protocol: Literal["5", "3.1.1"] = "3.1.1"
    kind = "amqtt"

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: object | None = None

    def start(self, timeout: float = 10.0) -> None:
        try:
            from amqtt.broker import Broker  # noqa: PLC0415  (optional extra, import on use)
        except ImportError:
            raise BrokerError(
                "the embedded broker needs the `broker` extra: pip install 'edge-agent[broker]'"
            ) from None
        if port_in_use(self.host, self.port):
            raise BrokerError(f"{self.host}:{self.port} is already in use")
        _quiet_mqtt5_refusals()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        loop = asyncio.new_event_loop()
        started: Future[None] = Future()

        async def run() -> None:
            broker = Broker(config, loop=loop)
            self._broker = broker
            await broker.start()

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(run())
            except BaseException as exc:  # report any start failure to the caller
                started.set_exception(exc)
                return
            started.set_result(None)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=main, name="amqtt-broker", daemon=True)
        self._thread.start()
        try:
            started.result(timeout)
        except Exception as exc:
            raise BrokerError(f"amqtt did not start on {self.host}:{self.port}: {exc}") from exc
        log.info("broker_started", kind=self.kind, host=self.host, port=self.port)

    def stop(self) -> None:
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or not loop.is_running():
            return
        shutdown = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):  # a broker that fails to stop is still abandoned
            shutdown.result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = self._broker = self._thread = None


class _Mqtt5Refusal(logging.Filter):
    """Drops amqtt's two warnings for a client that tried MQTT 5 first.

    `edge-agent infer` and `status` try MQTT 5 and fall back to 3.1.1 when refused, as
    designed; amqtt (3.1.1 only) answers with a CONNACK "unacceptable protocol version" and
    logs "Invalid connection from ..." then "Failed to initialize client session: Invalid
    protocol from ...: 5" each time. The first never says why (the second does, for any
    other refusal, and is kept).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if text.startswith("Invalid connection from"):
            return False
        return not (
            text.startswith("Failed to initialize client session: Invalid protocol")
            and text.rstrip().endswith(": 5")
        )


def _quiet_mqtt5_refusals() -> None:
    logger = logging.getLogger("amqtt.broker")
    if not any(isinstance(f, _Mqtt5Refusal) for f in logger.filters):
        logger.addFilter(_Mqtt5Refusal())
