"""Fuzzing the request and control paths over a real mosquitto: every payload with a reply
address is answered, no handler fails, and valid requests keep being served."""

from __future__ import annotations

import pytest

from tests.conftest import Probe, RunningAgent
from tests.fuzzing import FuzzReport, run_fuzz

# Internal failures: each is caught and answered, but means a gap in the checks.
BUG_EVENTS = (
    "message_handler_failed",
    "request_handler_failed",
    "request_undecodable",
    "decode_job_failed",
    "submit_failed",
    "reply_callback_failed",
    "batch_failed",
    "control_command_failed",
)


def _check(report: FuzzReport, agent: RunningAgent, output: str) -> None:
    assert report.unanswered == [], report.unanswered[:3]
    assert report.valid_wrong == 0
    found = [line for line in output.splitlines() if any(e in line for e in BUG_EVENTS)]
    assert found == [], found[:5]
    frontend = agent.agent.frontend
    assert frontend is not None and frontend.connected
    assert frontend.loop_problem(stale_after=60.0) is None


def test_a_short_fuzz_run_is_answered_in_full(
    agent: RunningAgent, probe: Probe, capsys: pytest.CaptureFixture[str]
) -> None:
    """600 seeded hostile payloads: each gets exactly a reply, no handler fails, and the
    valid requests interleaved with them are answered correctly."""
    report = run_fuzz(probe, agent.topic, seed=12, count=600, budget_s=25.0)
    output = capsys.readouterr().out
    assert report.sent == 600, "the run did not finish within its time budget"
    _check(report, agent, output)


@pytest.mark.soak
@pytest.mark.timeout(2000)
def test_a_long_fuzz_run_never_stalls_the_mqtt_thread(
    agent: RunningAgent, probe: Probe, capsys: pytest.CaptureFixture[str]
) -> None:
    """100,000 seeded hostile payloads: 0 crashes, a reply for each, and no valid request
    waiting over 1 s (the MQTT thread never stalled)."""
    report = run_fuzz(probe, agent.topic, seed=2026, count=100_000, budget_s=1800.0)
    with capsys.disabled():
        worst = f"{report.worst_valid_s:.3f}"
        print(f"\nfuzz: {report.sent} sent, codes {report.codes}, worst valid {worst} s")
    assert report.sent == 100_000
    _check(report, agent, capsys.readouterr().out)
    assert report.worst_valid_s < 1.0, report.worst_valid_s
