"""The sd_notify protocol module on its own, against sockets the tests bind."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from agent.sdnotify import Notifier, watchdog_interval
from tests.service.conftest import NotifySocket


def test_notifications_reach_an_abstract_socket_as_key_value_lines(
    notify_socket: NotifySocket,
) -> None:
    """READY with a STATUS line arrives as one datagram of KEY=value assignments."""
    notifier = Notifier.from_environment()
    assert notifier.enabled
    assert notifier.ready("serving 2 models")
    got = notify_socket.wait_for("READY", "1")
    assert got.fields == {"READY": "1", "STATUS": "serving 2 models"}
    notifier.close()


def test_notifications_reach_a_filesystem_socket() -> None:
    """A plain socket path works too, and WATCHDOG/STOPPING/EXTEND_TIMEOUT have their syntax."""
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        path = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(path)
            server.settimeout(2)
            notifier = Notifier(path)
            notifier.watchdog()
            notifier.stopping("bye")
            notifier.extend_timeout(1.5)
            assert server.recv(1024) == b"WATCHDOG=1"
            assert server.recv(1024) == b"STOPPING=1\nSTATUS=bye"
            assert server.recv(1024) == b"EXTEND_TIMEOUT_USEC=1500000"
            notifier.close()


def test_reloading_carries_a_monotonic_timestamp(notify_socket: NotifySocket) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC, as systemd 253+ requires for reloads."""
    notifier = Notifier.from_environment()
    notifier.reloading()
    got = notify_socket.wait_for("RELOADING", "1")
    assert int(got.fields["MONOTONIC_USEC"]) > 0
    notifier.close()


def test_a_status_with_newlines_stays_one_assignment(notify_socket: NotifySocket) -> None:
    """A newline in a status text cannot inject another assignment such as READY=1."""
    notifier = Notifier.from_environment()
    notifier.status("line one\nREADY=1")
    got = notify_socket.wait_for("STATUS")
    assert got.fields == {"STATUS": "line one READY=1"}
    notifier.close()


def test_without_notify_socket_every_call_is_a_quiet_no_op() -> None:
    """Outside systemd nothing is sent and nothing fails."""
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.watchdog()


def test_a_vanished_socket_is_reported_not_raised() -> None:
    """A notify socket that no longer exists makes sends return False instead of raising."""
    notifier = Notifier("/nonexistent/edge-agent/notify")
    assert not notifier.watchdog()
    assert not notifier.watchdog()
    notifier.close()


def test_watchdog_interval_comes_from_systemd_variables() -> None:
    """WATCHDOG_USEC gives the timeout; a WATCHDOG_PID of another process disables it."""
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "nonsense"}) is None
    assert watchdog_interval({}) is None
