"""The batching queue under load: every request answered once, stacking only where the
variant's measured profile says it pays, expiry and deadlines inside a burst."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.batching import Completed, Outcome
from agent.config import ModelsConfig
from agent.errors import Overloaded, RequestExpired
from agent.models import ModelManager, ServedModel
from agent.protocol import encode_request
from agent.repository import scan
from agent.session import SessionSettings
from agent.stacking import MIN_SAMPLES, RECHECK_EVERY, StackingProfile
from tests import onnx_models
from tests.agent.test_models import Outcomes, req
from tests.conftest import Probe, RunningAgent, body

BURST = 8


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServedModel]]:
    """A model folder served by a real manager (workers only unless asked otherwise)."""
    managers: list[ModelManager] = []

    def make(build: Callable[[Path], Path], **config: Any) -> ServedModel:
        config.setdefault("inline_max_ms", 0.0)
        path = build(tmp_path / "models" / "m.onnx")
        manager = ModelManager(
            ModelsConfig(dir=path.parent, **config),
            SessionSettings(threads=1),
            lambda *_a, **_k: None,
        )
        manager.load_all(scan(path.parent)[0])
        managers.append(manager)
        return manager.get("m")

    yield make
    for manager in managers:
        manager.close(5)


class Burst:
    """Holds the only worker on one request while a burst queues behind it, then lets go:
    the worker finds the whole burst waiting, as under load."""

    def __init__(self, model: ServedModel, width: int) -> None:
        self.model, self.width = model, width
        self.outcomes = Outcomes()
        self.order: list[float] = []

    def send(self, size: int = BURST, deadline: float | None = None) -> list[Outcome]:
        held = Outcomes()
        self.model.submit(req(x=self._rows(-1.0)), held.blocking)
        held.wait_for(1)
        seen = len(self.outcomes.results)
        for n in range(size):
            self.model.submit(req(x=self._rows(float(n))), self._note, deadline)
        held.release.set()
        return self.outcomes.wait_for(seen + size)[seen:]

    def _rows(self, value: float) -> np.ndarray:
        return np.full((1, self.width), value, dtype=np.float32)

    def _note(self, outcome: Outcome) -> None:
        if isinstance(outcome, Completed):
            self.order.append(float(next(iter(outcome.outputs.values()))[0, 0]))
        self.outcomes.record(outcome)


def test_every_request_is_answered_once_with_its_own_rows_under_concurrent_load(
    serve: Callable[..., ServedModel],
) -> None:
    """Eight threads submitting at once, with inline runs, two workers and stacking on:
    each request gets exactly one outcome (or an immediate Overloaded when the queue is
    full), and an outcome holds that request's own result."""
    model = serve(onnx_models.scale_model, workers=2, inline_max_ms=50.0)
    lock = threading.Lock()
    answers: Counter[int] = Counter()
    wrong: list[int] = []
    done = threading.Semaphore(0)

    def submit(value: int) -> None:
        def note(outcome: Outcome) -> None:
            ok = isinstance(outcome, Completed) and outcome.outputs["y"].tolist() == [
                [value * 2.0 + 1.0] * 4
            ]
            with lock:
                answers[value] += 1
                if not ok:
                    wrong.append(value)
            done.release()

        try:
            model.submit(req(x=np.full((1, 4), float(value), np.float32)), note)
        except Overloaded:  # a full queue answers at once, and then never calls back
            with lock:
                answers[value] += 1
            done.release()

    def client(first: int) -> None:
        for value in range(first, first + 150):
            submit(value)

    threads = [threading.Thread(target=client, args=(n * 1000,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for _ in range(8 * 150):
        assert done.acquire(timeout=30), f"{sum(answers.values())} of {8 * 150} answered"
    time.sleep(0.1)  # a second answer would come right after the first
    assert wrong == []
    assert len(answers) == 8 * 150 and set(answers.values()) == {1}


def test_a_model_that_gains_from_stacking_gets_its_bursts_stacked(
    serve: Callable[..., ServedModel],
) -> None:
    """A model whose cost is all per run (a tiny one) measures cheaper rows when stacked,
    and from then on a burst of waiting requests runs as one batch."""
    model = serve(onnx_models.scale_model)
    burst = Burst(model, 4)
    for _ in range(MIN_SAMPLES + 2):  # learn: single runs (the holders) and bursts
        burst.send()
    profile = model.queue.profile(model.active_name or "")
    assert profile.pays(1, BURST) is True
    outcomes = burst.send()
    assert all(isinstance(o, Completed) for o in outcomes)
    assert max(o.batch_size for o in outcomes if isinstance(o, Completed)) > 1


def test_a_model_that_does_not_gain_runs_a_burst_one_by_one_in_order(
    serve: Callable[..., ServedModel],
) -> None:
    """A model whose cost is all per element measures no cheaper rows when stacked: after
    trying, a burst runs request by request, oldest first, with no batch formed."""
    model = serve(onnx_models.rowwise_model)
    burst = Burst(model, 262144)
    for _ in range(MIN_SAMPLES + 2):
        burst.send()
    profile = model.queue.profile(model.active_name or "")
    assert profile.pays(1, BURST) is False
    assert not profile.pays_somewhere()  # so no worker would wait for a batch to fill
    burst.order.clear()
    outcomes = burst.send()
    assert [o.batch_size for o in outcomes if isinstance(o, Completed)] == [1] * BURST
    expected = np.arange(BURST, dtype=np.float32)  # the burst's values, oldest first
    for _ in range(4):
        expected = np.sin(expected)
    assert burst.order == pytest.approx(expected.tolist(), rel=1e-5)


def test_expired_requests_in_a_burst_are_answered_as_expired_and_not_run(
    serve: Callable[..., ServedModel],
) -> None:
    """Requests whose client gave up while they waited behind a busy worker get
    RequestExpired; a burst of patient requests after them is served."""
    model = serve(onnx_models.scale_model)
    burst = Burst(model, 4)
    expired = burst.send(deadline=time.monotonic())  # already past when the worker looks
    assert all(isinstance(o, RequestExpired) for o in expired)
    served = burst.send()
    assert all(isinstance(o, Completed) for o in served)
    assert model.stats.snapshot().expired == BURST


def test_a_request_the_stacked_run_would_make_late_runs_first_alone(
    serve: Callable[..., ServedModel],
) -> None:
    """When stacking pays but the batch is predicted to end after a waiting request's
    deadline, that request runs alone first and the others are stacked after it."""
    model = serve(onnx_models.scale_model)
    profile = model.queue.profile(model.active_name or "")
    for _ in range(7):  # figures as a very slow machine would measure them: stacking pays,
        profile.observe(1, 30_000.0)  # and a batch of four takes 80 s
        profile.observe(4, 4 * 20_000.0)
    held = Outcomes()
    model.submit(req(x=np.full((1, 4), -1.0, np.float32)), held.blocking)
    held.wait_for(1)
    finished: list[str] = []
    outcomes = Outcomes()

    def note(name: str) -> Callable[[Outcome], None]:
        def record(outcome: Outcome) -> None:
            finished.append(name)
            outcomes.record(outcome)

        return record

    for _ in range(3):
        model.submit(req(x=np.full((1, 4), 1.0, np.float32)), note("patient"))
    model.submit(req(x=np.full((1, 4), 2.0, np.float32)), note("hurried"), time.monotonic() + 30)
    held.release.set()
    results = outcomes.wait_for(4)
    assert finished == ["hurried", "patient", "patient", "patient"]
    assert [o.batch_size for o in results if isinstance(o, Completed)] == [1, 3, 3, 3]


def test_the_profile_tries_each_size_then_stacks_only_where_it_pays() -> None:
    """Unmeasured sizes are tried, measured ones decide, and the option not chosen is run
    again every RECHECK_EVERY decisions; a size below one that did not pay is not tried."""
    profile = StackingProfile()
    assert profile.choose(1, 8) is True  # nothing known: try it
    for _ in range(MIN_SAMPLES):
        profile.observe(1, 1.0)
        profile.observe(8, 8 * 0.2)
    assert profile.pays(1, 8) is True and profile.pays_somewhere()
    decisions = [profile.choose(1, 8) for _ in range(RECHECK_EVERY)]
    assert decisions.count(False) == 1 and decisions[-1] is False

    flat = StackingProfile()
    for _ in range(MIN_SAMPLES):
        flat.observe(1, 1.0)
        flat.observe(8, 8 * 0.9)  # 10 % is within the noise: no gain
    assert flat.pays(1, 8) is False and not flat.pays_somewhere()
    assert flat.choose(1, 8) is False
    assert flat.choose(1, 4) is False  # smaller than a size that did not pay: not tried
    assert flat.choose(1, 16) is True  # larger: tried
    assert flat.figures() == {1: 1.0, 8: 0.9}


def test_requests_in_flight_over_mqtt_are_each_answered_once(
    agent: RunningAgent, broker: Any
) -> None:
    """Two hundred requests published at once to the agent, which replies from workers
    and inline: each correlation gets exactly one reply, carrying its own result."""
    probe = Probe(broker.port)
    replies: Counter[bytes] = Counter()
    wrong: list[bytes] = []
    expected: dict[bytes, float] = {}
    lock = threading.Lock()
    all_in = threading.Event()
    count = 200

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        key = msg.properties.CorrelationData
        value = body(msg)["outputs"][0]["data"][0]
        with lock:
            replies[key] += 1
            if value != expected.get(key):
                wrong.append(key)
            if sum(replies.values()) >= count:
                all_in.set()

    probe.client.on_message = on_message
    try:
        for n in range(count):
            key = uuid.uuid4().bytes
            expected[key] = n * 2.0 + 1.0
            payload, _ = encode_request(
                {"x": np.full((1, 4), float(n), np.float32)}, binary=False, binary_outputs=False
            )
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = probe.reply_topic
            props.CorrelationData = key
            probe.client.publish(f"{agent.topic}/infer/scale", payload, qos=1, properties=props)
        assert all_in.wait(30), f"{sum(replies.values())} of {count} replies"
        time.sleep(0.2)  # a duplicate would follow its first closely
        assert wrong == []
        assert len(replies) == count and set(replies.values()) == {1}
    finally:
        probe.close()


def test_the_depth_alarm_rings_for_each_request_that_finds_the_queue_that_deep(
    serve: Callable[..., ServedModel],
) -> None:
    """With the only worker held, the alarm set at depth 3 stays quiet for the first two
    requests that wait and rings for the third and each one after; depth 0 silences it."""
    model = serve(onnx_models.scale_model)
    rings: list[int] = []
    model.queue.watch_depth(3, lambda: rings.append(model.queue.depth))
    held, waiting = Outcomes(), Outcomes()
    model.submit(req(x=np.ones((1, 4), np.float32)), held.blocking)
    held.wait_for(1)
    for n in range(5):
        model.submit(req(x=np.full((1, 4), float(n), np.float32)), waiting.record)
    assert rings == [3, 4, 5]
    model.queue.watch_depth(0, lambda: rings.append(-1))
    model.submit(req(x=np.ones((1, 4), np.float32)), waiting.record)
    assert rings == [3, 4, 5]
    held.release.set()
    assert len(waiting.wait_for(6)) == 6
