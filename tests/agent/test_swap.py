"""The one owner of variant changes: leases, make-before-break and break-before-make swaps,
failed loads, and the races it closes (issue 7, defects a and b), on real onnxruntime
sessions of small ladders."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.batching import BatchingQueue, Completed, Job, Outcome
from agent.config import ModelsConfig
from agent.errors import EdgeAgentError, ModelNotReady, VariantRejected
from agent.metrics import ModelStats
from agent.models import ModelManager
from agent.protocol import InferenceRequest
from agent.repository import read_model, scan
from agent.session import SessionSettings
from tests import onnx_models
from tests.service.busy_model import busy_model
from tests.swapping import swap_under_load

SIGNATURE = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}
FACTORS = {"a": 2.0, "b": 3.0, "c": 5.0}


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.seen.append((event, fields))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [f for e, f in self.seen if e == name]


def scale_ladder(root: Path, name: str = "lad", memory: float | None = None) -> Path:
    """A ladder whose variants compute x * factor + 1 with a factor of their own: every
    output says which variant computed it."""
    build = root / "build"
    variants = [
        (v, onnx_models.scale_model(build / f"{v}.onnx", factor=f)) for v, f in FACTORS.items()
    ]
    folder = onnx_models.ladder_folder(root / "models" / name, variants, **SIGNATURE)
    if memory is not None:
        manifest = json.loads((folder / "manifest.json").read_text())
        for entry in manifest["variants"]:
            entry["metrics"] = {"peak_rss_mb": memory}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return root / "models"


@pytest.fixture
def manager_for(tmp_path: Path) -> Iterator[Callable[..., tuple[ModelManager, Events]]]:
    managers: list[ModelManager] = []

    def make(models: Path, **config: Any) -> tuple[ModelManager, Events]:
        config.setdefault("inline_max_ms", 0.0)
        events = Events()
        manager = ModelManager(
            ModelsConfig(dir=models, **config), SessionSettings(threads=1), events
        )
        manager.drain_timeout_s = 5.0
        sources, _ = scan(models)
        manager.load_all(sources)
        managers.append(manager)
        return manager, events

    yield make
    for manager in managers:
        manager.close(5)


def request(value: float = 1.0, rows: int = 1) -> InferenceRequest:
    x = np.full((rows, 4), value, dtype=np.float32)
    return InferenceRequest(id=None, inputs={"x": x}, datatypes={"x": "FP32"})


class Answers:
    """Collects outcomes, counting how often each request was answered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_id: dict[int, list[Outcome]] = {}
        self.done = threading.Condition(self._lock)

    def callback(self, key: int) -> Callable[[Outcome], None]:
        def done(outcome: Outcome) -> None:
            with self.done:
                self.by_id.setdefault(key, []).append(outcome)
                self.done.notify_all()

        return done

    def wait(self, count: int, timeout: float = 30.0) -> None:
        with self.done:
            assert self.done.wait_for(lambda: len(self.by_id) >= count, timeout), (
                f"{len(self.by_id)} of {count} answered"
            )


def test_a_swap_under_load_from_several_threads_answers_each_request_once_on_one_variant(
    tmp_path: Path, manager_for: Callable[..., tuple[ModelManager, Events]]
) -> None:
    """100 swaps while four threads keep submitting: every request is answered exactly
    once, none fails, and each answer was computed entirely by the variant it names."""
    manager, events = manager_for(scale_ladder(tmp_path), max_batch_size=8)
    answers = Answers()
    stop = threading.Event()
    submitted = [0] * 4

    def client(slot: int) -> None:
        while not stop.is_set():
            key = slot * 1_000_000 + submitted[slot]
            try:
                manager.submit("lad", request(float(slot)), answers.callback(key))
            except EdgeAgentError:
                time.sleep(0.001)  # a full queue: the client retries later
                continue
            submitted[slot] += 1
            time.sleep(0.0002)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    order = ["b", "c", "a"]
    for i in range(100):
        manager.switch("lad", order[i % 3], reason="test")
    stop.set()
    for thread in threads:
        thread.join(10)
    total = sum(submitted)
    answers.wait(total)
    assert total > 100
    assert len(events.named("variant_swapped")) == 100
    for key, outcomes in answers.by_id.items():
        assert len(outcomes) == 1, f"request {key} answered {len(outcomes)} times"
        outcome = outcomes[0]
        assert isinstance(outcome, Completed), outcome
        value = float(key // 1_000_000)
        expected = value * FACTORS[outcome.variant] + 1.0
        assert np.all(outcome.outputs["y"] == expected), (outcome.variant, outcome.outputs)


def test_the_old_variant_is_released_once_its_batches_are_done(
    tmp_path: Path, manager_for: Callable[..., tuple[ModelManager, Events]]
) -> None:
    """A swap retires the old variant and closes its session after the drain: the old
    handle reports closed and cannot run any more."""
    manager, events = manager_for(scale_ladder(tmp_path))
    old = manager.get("lad").active
    assert old is not None and old.name == "a"
    manager.switch("lad", "b", reason="test")
    assert old.retired and old.closed
    with pytest.raises(EdgeAgentError, match="released"):
        old.runtime.run({"x": np.ones((1, 4), np.float32)})
    swap = events.named("variant_swapped")[0]
    assert swap["from"] == "a" and swap["to"] == "b" and swap["mode"] == "make-before-break"
    assert swap["drain_ms"] is not None and swap["gap_ms"] == 0.0


def test_break_before_make_when_memory_cannot_hold_both_requests_wait_and_are_answered(
    tmp_path: Path, manager_for: Callable[..., tuple[ModelManager, Events]]
) -> None:
    """With less headroom than the new variant needs beside the old, the old one is drained
    and released first; requests sent meanwhile wait in the queue and are all answered by
    the new variant, none with an error."""
    manager, events = manager_for(scale_ladder(tmp_path, memory=50.0))
    manager.headroom_mb = lambda: 40.0
    answers = Answers()
    served = manager.get("lad")
    # Hold the model without a variant while requests arrive, as a slow load would.
    previous = served.clear()
    assert previous is not None
    for key in range(20):
        manager.submit("lad", request(1.0), answers.callback(key))
    time.sleep(0.2)
    assert not answers.by_id, "a request was answered while the model had no variant"
    served.install(previous)
    manager.switch("lad", "c", reason="test")
    for key in range(20, 40):
        manager.submit("lad", request(1.0), answers.callback(key))
    answers.wait(40)
    assert all(isinstance(o[0], Completed) for o in answers.by_id.values())
    swap = events.named("variant_swapped")[-1]
    assert swap["mode"] == "break-before-make"
    assert swap["gap_ms"] > 0 and swap["need_mb"] == 50.0 and swap["headroom_mb"] == 40.0


def test_requests_queued_during_a_break_before_make_gap_are_served_after_it(
    tmp_path: Path, manager_for: Callable[..., tuple[ModelManager, Events]]
) -> None:
    """Requests flowing during 20 unload-first swaps: every one is answered, none fails."""
    manager, events = manager_for(scale_ladder(tmp_path, memory=50.0))
    manager.headroom_mb = lambda: 0.0  # no room at all: measured or not, unload first
    answers = Answers()

    def send(n: int) -> None:
        manager.submit("lad", request(2.0), answers.callback(n))

    answers.wait(swap_under_load(manager, "lad", ["b", "a"], 20, send, 0.0005))
    assert all(isinstance(o[0], Completed) and len(o) == 1 for o in answers.by_id.values())
    assert {s["mode"] for s in events.named("variant_swapped")} == {"break-before-make"}


def test_a_failed_load_keeps_the_old_variant_and_says_why(
    tmp_path: Path, manager_for: Callable[..., tuple[ModelManager, Events]]
) -> None:
    """A variant whose file no longer matches its hash is refused; the model keeps serving
    the variant it had, the failure is an event and is remembered for the policy."""
    models = scale_ladder(tmp_path)
    manager, events = manager_for(models)
    (models / "lad" / "b.onnx").write_bytes(b"corrupt")
    with pytest.raises(VariantRejected, match="sha256"):
        manager.switch("lad", "b", reason="test")
    assert manager.get("lad").active_name == "a"
    failed = events.named("variant_swap_failed")
    assert failed and failed[0]["to"] == "b" and "sha256" in failed[0]["error"]
    assert manager.failures[("lad", "b")].count == 1
    answers = Answers()
    manager.submit("lad", request(1.0), answers.callback(0))
    answers.wait(1)
    outcome = answers.by_id[0][0]
    assert isinstance(outcome, Completed) and outcome.variant == "a"


def test_a_failed_load_after_unloading_first_restores_the_old_variant(
    tmp_path: Path, manager_for: Callable[..., tuple[ModelManager, Events]]
) -> None:
    """Break-before-make, and the new variant fails: the old one is loaded back and serves."""
    models = scale_ladder(tmp_path, memory=50.0)
    manager, events = manager_for(models)
    manager.headroom_mb = lambda: 10.0
    (models / "lad" / "c.onnx").write_bytes(b"corrupt")
    with pytest.raises(VariantRejected):
        manager.switch("lad", "c", reason="test")
    assert manager.get("lad").active_name == "a"
    assert events.named("variant_restored")[0]["variant"] == "a"
    answers = Answers()
    manager.submit("lad", request(1.0), answers.callback(0))
    answers.wait(1)
    assert isinstance(answers.by_id[0][0], Completed)


def test_a_pin_racing_a_reload_of_the_same_model_is_not_lost(
    tmp_path: Path, manager_for: Callable[..., tuple[ModelManager, Events]]
) -> None:
    """Defect a: a pin made while the watcher reloads the model (its new files loading) is
    applied to the model that serves once the reload is in, never lost with the replaced
    one; the pin is made as control/pin makes it, under the model's lock."""
    models = scale_ladder(tmp_path)
    manager, _events = manager_for(models)
    pins: dict[str, str] = {}
    reloading = threading.Event()

    def preference(name: str) -> str | None:
        if not reloading.is_set():
            reloading.set()
            time.sleep(0.3)  # the reload is busy loading while the pin comes in
        return pins.get(name)

    manager.preferred = preference
    source = read_model(models / "lad", models)
    reload = threading.Thread(target=manager.load, args=(source,), kwargs={"reason": "reload"})
    reload.start()
    assert reloading.wait(5)
    with manager.owner("lad"):  # what ControlCommands.pin does
        manager.switch("lad", "c", reason="pinned")
        pins["lad"] = "c"
    reload.join(10)
    assert manager.get("lad").active_name == "c"
    assert manager.get("lad").source is source  # the reloaded model, not the replaced one


def test_a_stale_load_overtaken_by_a_newer_one_is_discarded(
    tmp_path: Path, manager_for: Callable[..., tuple[ModelManager, Events]]
) -> None:
    """Two loads of one model: the one started later wins even when the earlier one ends
    last; the earlier result is released, not installed over it."""
    models = scale_ladder(tmp_path)
    manager, _events = manager_for(models)
    source = read_model(models / "lad", models)
    slow = threading.Event()
    calls = [0]

    def preference(_name: str) -> str | None:
        calls[0] += 1
        if calls[0] == 1:
            slow.wait(5)  # the first load is held up until the second has installed
        return None

    manager.preferred = preference
    first = threading.Thread(target=manager.load, args=(source,), kwargs={"prefer": None})
    first.start()
    time.sleep(0.1)
    newer = manager.load(source, prefer="b")
    assert newer is not None and newer.active_name == "b"
    slow.set()
    first.join(10)
    assert manager.get("lad") is newer and newer.active_name == "b"


def test_submit_racing_close_never_strands_a_request(tmp_path: Path) -> None:
    """Defect b: requests submitted while the queue closes are either refused at once or
    answered; none is left in a queue no worker will ever read."""
    path = onnx_models.scale_model(tmp_path / "s.onnx")
    source = read_model(path, tmp_path)
    manager = ModelManager(
        ModelsConfig(dir=tmp_path, inline_max_ms=0.0), SessionSettings(threads=1), Events()
    )
    served = manager.load(source)
    assert served is not None
    handle = served.active
    assert handle is not None
    for _round in range(150):
        stats = ModelStats()
        queue = BatchingQueue(
            "s",
            served.lease,
            stats,
            workers=1,
            max_queue=64,
            max_batch_size=4,
            batch_delay_s=0.0,
            batchable=True,
        )
        answers = Answers()
        accepted: list[int] = []
        go = threading.Event()

        def submitter(
            base: int,
            queue: BatchingQueue = queue,
            answers: Answers = answers,
            accepted: list[int] = accepted,
            go: threading.Event = go,
        ) -> None:
            go.wait()
            for i in range(20):
                job = Job({"x": np.ones((1, 4), np.float32)}, (), answers.callback(base + i))
                try:
                    queue.submit(job)
                except ModelNotReady:
                    return
                accepted.append(base + i)

        threads = [threading.Thread(target=submitter, args=(k * 100,)) for k in range(3)]
        for thread in threads:
            thread.start()
        go.set()
        queue.close(5.0)
        for thread in threads:
            thread.join(5)
        answers.wait(len(accepted), timeout=5)
        assert set(answers.by_id) == set(accepted)
    manager.close(5)


def test_close_on_a_full_queue_reports_it_and_still_stops_the_workers(tmp_path: Path) -> None:
    """Defect b: close() on a full queue no longer gives up silently: it says the workers
    are still busy, the queued requests are answered once the worker is free, and the
    worker thread then ends."""
    models = tmp_path / "models"
    busy_model(models / "busy.onnx")
    manager = ModelManager(
        ModelsConfig(dir=models, inline_max_ms=0.0, max_queue=4, max_batch_size=1),
        SessionSettings(threads=1),
        Events(),
    )
    sources, _ = scan(models)
    manager.load_all(sources)
    served = manager.get("busy")
    answers = Answers()

    def job(steps: int, key: int) -> Job:
        feeds = {
            "x": np.zeros((1, 1), np.float32),
            "steps": np.full((1, 1), steps, np.int64),
        }
        return Job(feeds, (), answers.callback(key))

    served.queue.submit(job(3_000_000, 0))  # about a second or more on one thread
    time.sleep(0.1)
    for key in range(1, 5):
        served.queue.submit(job(1, key))
    assert served.queue.close(0.05) is False
    answers.wait(5, timeout=60)
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in served.queue._threads) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.is_alive() for t in served.queue._threads)
    manager.close(5)


def test_stop_is_one_bound_for_all_models_and_answers_what_it_abandons(tmp_path: Path) -> None:
    """Three busy models and a 1 s stop: close returns within about the bound for all of
    them together, and every request still queued or running gets a 'stopping' error."""
    models = tmp_path / "models"
    for name in ("b1", "b2", "b3"):
        busy_model(models / f"{name}.onnx")
    manager = ModelManager(
        ModelsConfig(dir=models, inline_max_ms=0.0, max_batch_size=1),
        SessionSettings(threads=1),
        Events(),
    )
    sources, _ = scan(models)
    manager.load_all(sources)
    answers = Answers()
    key = 0
    for name in ("b1", "b2", "b3"):
        for steps in (5_000_000, 1, 1):
            feeds = {"x": np.zeros((1, 1), np.float32), "steps": np.full((1, 1), steps, np.int64)}
            manager.get(name).queue.submit(Job(feeds, (), answers.callback(key)))
            key += 1
    time.sleep(0.1)
    start = time.monotonic()
    manager.close(1.0)
    took = time.monotonic() - start
    assert took < 2.5, f"stop took {took:.1f} s for a 1 s bound"
    # The runs still going at the bound are stopped between kernels: every request, queued
    # or running, is answered 'stopping', and no worker is left inside onnxruntime.
    answers.wait(9, timeout=30)
    with answers.done:
        errors = [o[0] for o in answers.by_id.values() if isinstance(o[0], ModelNotReady)]
    assert len(errors) == 9
    assert all("stopping" in str(e) for e in errors)
    for name in ("b1", "b2", "b3"):
        for thread in manager.get(name).queue._threads:
            thread.join(10)
            assert not thread.is_alive()


def test_unloading_releases_the_workers_and_the_session(tmp_path: Path) -> None:
    """Issue 12 item 10: 100 models loaded and unloaded leave no worker thread behind, and
    each unloaded model's variant is closed."""
    models = tmp_path / "models"
    for i in range(100):
        onnx_models.scale_model(models / f"m{i}.onnx")
    manager = ModelManager(
        ModelsConfig(dir=models, inline_max_ms=0.0), SessionSettings(threads=1), Events()
    )
    before = threading.active_count()
    sources, _ = scan(models)
    manager.load_all(sources)
    assert threading.active_count() >= before + 100
    handles = [m.active for m in manager.served()]
    for name in manager.names():
        assert manager.unload(name, timeout=5)
    assert threading.active_count() <= before + 2
    assert all(h is not None and h.closed for h in handles)
    assert manager.served() == []
