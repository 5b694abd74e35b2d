"""The broker echo the policy counts in a client's round trip: blind to whatever else lands
on its topic, and counted only when asked for (through the real broker: test_adapt)."""

from __future__ import annotations

from agent.adapt.loop import Adapter
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
    figures = echo.figures(10.0, now=100.01)
    assert figures is not None
    p50, p95, count = figures
    assert count == 1 and p50 == p95 and abs(p50 - 2.0) < 1e-6
    assert echo.figures(10.0, now=200.0) is None  # out of the window


def test_count_transport_off_counts_nothing_and_a_missing_echo_counts_nothing() -> None:
    """The figure is the p95 of one trip plus the median of the other, from at least a few
    echoes; without enough of them, or with `adapt.count_transport` off, it is 0."""
    trips: list[tuple[float, float, int] | None] = [(1.0, 3.0, 8)]

    def adapter(**cfg: object) -> Adapter:
        return Adapter(
            None,  # type: ignore[arg-type]  (only _transport is called)
            AdaptConfig(**cfg),  # type: ignore[arg-type]
            lambda: [],
            pinned=lambda _m: None,
            emit=lambda *_a, **_k: None,
            round_trip=lambda _w: trips[0],
        )

    assert adapter()._transport() == 4.0
    assert adapter(count_transport=False)._transport() == 0.0
    trips[0] = (1.0, 3.0, 2)
    assert adapter()._transport() == 0.0
    trips[0] = None
    assert adapter()._transport() == 0.0
