"""The broker echo the policy counts in a client's round trip: blind to whatever else lands
on its topic, and counted only when asked for (through the real broker: test_adapt)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.adapt.loop import Adapter
from agent.adapt.policy import two_trips, with_trips_p95
from agent.config import AdaptConfig
from agent.mqtt.echo import STALE_S, BrokerEcho


def test_an_echo_is_timed_from_its_own_send_time_and_strangers_are_ignored() -> None:
    sent: list[tuple[str, bytes]] = []
    echo = BrokerEcho("edge/reply/dev/echo", lambda topic, payload: sent.append((topic, payload)))
    echo.send(now=100.0)
    topic, payload = sent[0]
    assert topic == "edge/reply/dev/echo"
    echo.returned(payload, now=100.002)
    for stranger in (b"", b"garbage", b"\xff\xfe", b"someone 100.0", payload.split()[0] + b" x"):
        echo.returned(stranger, now=100.003)
    echo.returned(payload, now=100.0 + STALE_S + 1.0)  # a reconnect's resend, long after
    echo.returned(payload, now=99.0)  # from the future: not ours to count
    trips = echo.trips(10.0, now=100.01)
    assert len(trips) == 1 and abs(trips[0] - 2.0) < 1e-6
    assert echo.trips(10.0, now=200.0) == []  # out of the window


def test_count_transport_off_counts_nothing_and_a_missing_echo_counts_nothing() -> None:
    """The adapter hands the policy the echoes of the window, at least a few of them; none
    with `adapt.count_transport` off."""
    trips: list[list[float]] = [[1.0, 3.0, 2.0]]

    def adapter(**cfg: object) -> Adapter:
        return Adapter(
            None,  # type: ignore[arg-type]  (only _transport is called)
            AdaptConfig(**cfg),  # type: ignore[arg-type]
            lambda: [],
            pinned=lambda _m: None,
            emit=lambda *_a, **_k: None,
            round_trip=lambda _w: trips[0],
        )

    got = adapter()._transport()
    assert got is not None and got.tolist() == [1.0, 3.0, 2.0]
    assert adapter(count_transport=False)._transport() is None
    trips[0] = [1.0, 3.0]
    assert adapter()._transport() is None


def test_two_trips_are_added_as_distributions_not_as_p95s() -> None:
    """Requests of 2 ms in the agent, echoes of 1 ms but one in ten of 11 ms: p95s added
    (2 + 11 + 11) make every request as unlucky as the worst echo twice; drawn
    independently, a request meets a slow trip one time in five, and the p95 is one slow
    trip: 2 + 11 + 1 = 14 ms."""
    in_agent = np.full(200, 2.0)
    trips = np.array([1.0] * 90 + [11.0] * 10)
    assert with_trips_p95(in_agent, two_trips(trips)) == pytest.approx(14.0, abs=0.5)
    assert with_trips_p95(in_agent, two_trips(np.full(50, 1.0))) == pytest.approx(4.0)
