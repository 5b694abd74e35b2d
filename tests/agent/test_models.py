"""The model manager and its batching queues, driven directly (no MQTT)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.batching import INLINE_EVIDENCE, Completed, Outcome
from agent.config import ModelsConfig
from agent.datatypes import datatype_of
from agent.errors import (
    InferenceError,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    RequestExpired,
)
from agent.manifest import Variant, VariantMetrics, by_quality
from agent.models import ModelManager, ServedModel
from agent.protocol import InferenceRequest, RequestedOutput
from agent.repository import scan
from agent.session import SessionSettings
from tests import onnx_models
from tests.service.busy_model import busy_model


class Recorder:
    """Collects emitted events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


class Outcomes:
    """Done-callbacks that record outcomes, optionally holding the worker until released."""

    def __init__(self) -> None:
        self.results: list[Outcome] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)

    def record(self, outcome: Outcome) -> None:
        with self._arrived:
            self.results.append(outcome)
            self._arrived.notify_all()

    def blocking(self, outcome: Outcome) -> None:
        self.record(outcome)
        self.release.wait(10)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Outcome]:
        with self._arrived:
            assert self._arrived.wait_for(lambda: len(self.results) >= count, timeout), (
                f"{len(self.results)} of {count} outcomes"
            )
            return list(self.results)


@pytest.fixture
def make_manager(tmp_path: Path) -> Iterator[Callable[..., tuple[ModelManager, Recorder]]]:
    managers: list[ModelManager] = []

    def make(
        models: Path | None = None, quality_first: bool = False, **config: Any
    ) -> tuple[ModelManager, Recorder]:
        # Workers unless a test asks otherwise: the tests hold a worker to shape the queue.
        config.setdefault("inline_max_ms", 0.0)
        directory = models or tmp_path
        recorder = Recorder()
        manager = ModelManager(
            ModelsConfig(dir=directory, **config), SessionSettings(threads=1), recorder
        )
        manager.quality_first = quality_first
        sources, _ = scan(directory)
        manager.load_all(sources)
        managers.append(manager)
        return manager, recorder

    yield make
    for manager in managers:
        manager.close(5)


def req(**inputs: np.ndarray) -> InferenceRequest:
    return InferenceRequest(
        id=None, inputs=dict(inputs), datatypes={k: datatype_of(v) for k, v in inputs.items()}
    )


def x(rows: int, value: float = 1.0, width: int = 4) -> np.ndarray:
    return np.full((rows, width), value, dtype=np.float32)


def test_a_broken_rung_falls_back_to_the_next(
    tmp_path: Path, make_manager: Callable[..., Any]
) -> None:
    """When the richest variant fails its hash, the next rung serves and both are reported."""
    good = onnx_models.scale_model(tmp_path / "build" / "a.onnx", factor=3.0)
    folder = onnx_models.ladder_folder(
        tmp_path / "models" / "m",
        [("fp32", good), ("int8", good)],
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
    )
    (folder / "fp32.onnx").write_bytes(b"tampered")
    manager, recorder = make_manager(tmp_path / "models")
    assert manager.get("m").active.name == "int8"
    assert recorder.names() == ["variant_rejected", "model_loaded"]
    assert "sha256" in recorder.events[0][1]["reason"]


def test_adapting_starts_on_the_most_accurate_rung_by_measured_quality(
    tmp_path: Path, make_manager: Callable[..., Any]
) -> None:
    """A compressed rung that measured more accurate than the original is where an adapting
    agent starts (then falls back in quality order, the cheaper of two equally accurate
    rungs first); without adapting, the ladder's first."""
    good = onnx_models.scale_model(tmp_path / "build" / "a.onnx", factor=3.0)
    folder = onnx_models.ladder_folder(
        tmp_path / "models" / "m",
        [("fp32", good), ("int8", good), ("pruned", good), ("tiny", good)],
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    measured = ((0.97, 4.0), (0.97, 1.5), (0.99, 1.0), (0.90, 0.5))
    for variant, (accuracy, latency) in zip(manifest["variants"], measured, strict=True):
        variant["metrics"] = {"accuracy": accuracy, "latency_ms": latency}
    (folder / "manifest.json").write_text(json.dumps(manifest))

    plain, _ = make_manager(tmp_path / "models")
    assert plain.get("m").active_name == "fp32"
    adapting, _ = make_manager(tmp_path / "models", quality_first=True)
    assert adapting.get("m").active_name == "pruned"

    (folder / "pruned.onnx").write_bytes(b"tampered")
    fallback, recorder = make_manager(tmp_path / "models", quality_first=True)
    # The next by quality, not "tiny"; of fp32 and int8, as accurate, the cheaper.
    assert fallback.get("m").active_name == "int8"
    assert recorder.names() == ["variant_rejected", "model_loaded"]


def test_of_equally_accurate_rungs_only_a_clearly_cheaper_one_goes_first() -> None:
    """A tie in accuracy goes to a rung at least 15% cheaper than the ladder's first of
    them (int8 at a third of fp32's time); a few percent is timing noise and keeps ladder
    order; the more accurate rung still goes first."""

    def rung(name: str, accuracy: float, latency: float) -> Variant:
        metrics = VariantMetrics(accuracy=accuracy, latency_ms=latency)
        return Variant(name=name, file=f"{name}.onnx", metrics=metrics)

    clear = [rung("fp32", 0.98, 5.5), rung("int8", 0.98, 1.6), rung("tiny", 0.9, 0.2)]
    assert [v.name for v in by_quality(clear)] == ["int8", "fp32", "tiny"]
    noise = [rung("fp32", 0.975, 0.0089), rung("pruned50", 0.975, 0.0081)]
    assert [v.name for v in by_quality(noise)] == ["fp32", "pruned50"]
    better = [rung("fp32", 0.97, 5.5), rung("pruned", 0.99, 1.0), rung("int8", 0.99, 0.3)]
    assert [v.name for v in by_quality(better)] == ["int8", "pruned", "fp32"]


def test_a_model_without_any_loadable_variant_is_rejected_and_others_serve(
    tmp_path: Path, make_manager: Callable[..., Any]
) -> None:
    """A model whose every variant fails is not served; the other models are."""
    (tmp_path / "broken.onnx").write_bytes(b"junk")
    onnx_models.scale_model(tmp_path / "scale.onnx")
    manager, recorder = make_manager()
    assert manager.names() == ["scale"]
    assert ("model_rejected", {"model": "broken", "reason": "no variant could be loaded"}) in (
        recorder.events
    )
    with pytest.raises(ModelNotFound):
        manager.get("broken")


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "missing input(s) ['x']"),
        ({"x": x(1), "z": x(1)}, "unknown input(s) ['z']"),
        ({"x": x(1).astype(np.float64)}, "input 'x' is FP32, got FP64"),
        ({"x": np.ones(4, np.float32)}, "has shape [-1, 4] (-1 is free), got [4]"),
        ({"x": x(2, width=5)}, "got [2, 5]"),
    ],
)
def test_requests_that_do_not_fit_the_signature_are_refused(
    tmp_path: Path, make_manager: Callable[..., Any], inputs: dict[str, np.ndarray], message: str
) -> None:
    """Names, datatype, rank and fixed dimensions are checked before onnxruntime sees them."""
    onnx_models.scale_model(tmp_path / "scale.onnx")
    manager, _ = make_manager()
    model: ServedModel = manager.get("scale")
    with pytest.raises(InvalidRequest) as info:
        model.submit(req(**inputs), lambda _o: None)
    assert message in str(info.value)
    assert model.stats.snapshot().errors == 1


def test_inputs_must_agree_on_the_batch_dimension(
    tmp_path: Path, make_manager: Callable[..., Any]
) -> None:
    """Two inputs with different row counts are refused for a batchable model."""
    onnx_models.lookup_model(tmp_path / "lookup.onnx")
    manager, _ = make_manager()
    with pytest.raises(InvalidRequest, match="disagree on the batch dimension"):
        manager.get("lookup").submit(req(x=x(2), idx=np.zeros((3, 1), np.int64)), print)


def test_unknown_requested_output_is_refused(
    tmp_path: Path, make_manager: Callable[..., Any]
) -> None:
    """Asking for an output the model lacks names the outputs it has."""
    onnx_models.scale_model(tmp_path / "scale.onnx")
    manager, _ = make_manager()
    request = req(x=x(1))
    request.outputs = (RequestedOutput("nope", False),)
    with pytest.raises(
        InvalidRequest, match="unknown output\\(s\\) \\['nope'\\]; it has \\['y'\\]"
    ):
        manager.get("scale").submit(request, print)


def test_queued_requests_are_stacked_into_one_run(
    tmp_path: Path, make_manager: Callable[..., Any]
) -> None:
    """Requests that wait together run as one batch, and each gets exactly its own rows."""
    onnx_models.scale_model(tmp_path / "scale.onnx", factor=2.0)
    manager, _ = make_manager(workers=1, max_batch_size=16)
    model = manager.get("scale")
    outcomes = Outcomes()
    model.submit(req(x=x(1, 0.0)), outcomes.blocking)  # holds the only worker
    outcomes.wait_for(1)
    for i in range(1, 9):
        model.submit(req(x=x(i % 3 + 1, float(i))), outcomes.record)
    outcomes.release.set()
    results = outcomes.wait_for(9)
    stacked = [r for r in results[1:] if isinstance(r, Completed)]
    assert len(stacked) == 8
    assert {r.batch_size for r in stacked} == {8}
    for i, result in enumerate(stacked, start=1):
        assert result.outputs["y"].tolist() == (x(i % 3 + 1, float(i)) * 2 + 1).tolist()


def test_one_bad_request_does_not_fail_its_batch(
    tmp_path: Path, make_manager: Callable[..., Any]
) -> None:
    """When a stacked run raises, each request is retried alone: only the culprit fails."""
    onnx_models.lookup_model(tmp_path / "lookup.onnx")
    manager, _ = make_manager(workers=1)
    model = manager.get("lookup")
    outcomes = Outcomes()
    values = np.arange(4, dtype=np.float32)[None, :]
    model.submit(req(x=values, idx=np.array([[0]])), outcomes.blocking)
    outcomes.wait_for(1)
    for index in (1, 9, 3):  # 9 is out of range
        model.submit(req(x=values, idx=np.array([[index]])), outcomes.record)
    outcomes.release.set()
    results = outcomes.wait_for(4)[1:]
    assert isinstance(results[0], Completed) and results[0].outputs["y"].tolist() == [[1.0]]
    assert isinstance(results[1], InferenceError)
    assert isinstance(results[2], Completed) and results[2].outputs["y"].tolist() == [[3.0]]


def test_models_that_mix_rows_are_not_stacked(
    tmp_path: Path, make_manager: Callable[..., Any]
) -> None:
    """If a stacked run's outputs are not per row, requests run alone and batching stops."""
    onnx_models.pooling_model(tmp_path / "pool.onnx")
    manager, _ = make_manager(workers=1)
    model = manager.get("pool")
    outcomes = Outcomes()
    model.submit(req(x=x(1)), outcomes.blocking)
    outcomes.wait_for(1)
    model.submit(req(x=x(2, 1.0)), outcomes.record)
    model.submit(req(x=x(3, 2.0)), outcomes.record)
    outcomes.release.set()
    first, second = outcomes.wait_for(3)[1:]
    assert isinstance(first, Completed) and first.outputs["y"].tolist() == [[2.0] * 4]
    assert isinstance(second, Completed) and second.outputs["y"].tolist() == [[6.0] * 4]
    assert first.batch_size == second.batch_size == 1


def test_a_full_queue_answers_overloaded_at_once(
    tmp_path: Path, make_manager: Callable[..., Any]
) -> None:
    """Past max_queue waiting requests, submit raises Overloaded instead of queuing more."""
    onnx_models.scale_model(tmp_path / "scale.onnx")
    manager, _ = make_manager(workers=1, max_queue=2)
    model = manager.get("scale")
    outcomes = Outcomes()
    model.submit(req(x=x(1)), outcomes.blocking)
    outcomes.wait_for(1)
    model.submit(req(x=x(1)), outcomes.record)
    model.submit(req(x=x(1)), outcomes.record)
    with pytest.raises(Overloaded, match="2 requests already waiting"):
        model.submit(req(x=x(1)), outcomes.record)
    outcomes.release.set()
    assert all(isinstance(r, Completed) for r in outcomes.wait_for(3))
    assert model.stats.snapshot().rejected == 1


def test_expired_requests_are_dropped_not_computed(
    tmp_path: Path, make_manager: Callable[..., Any]
) -> None:
    """A request whose deadline passed while queued gets RequestExpired and no run."""
    onnx_models.scale_model(tmp_path / "scale.onnx")
    manager, _ = make_manager(workers=1)
    model = manager.get("scale")
    outcomes = Outcomes()
    model.submit(req(x=x(1)), outcomes.record, deadline=time.monotonic() - 0.001)
    model.submit(req(x=x(1)), outcomes.record, deadline=time.monotonic() + 60)
    expired, served = outcomes.wait_for(2)
    assert isinstance(expired, RequestExpired)
    assert isinstance(served, Completed)
    snapshot = model.stats.snapshot()
    assert (snapshot.expired, snapshot.errors) == (1, 0)


def test_unload_finishes_queued_requests_first(
    tmp_path: Path, make_manager: Callable[..., Any]
) -> None:
    """Unloading waits for requests already queued; later ones find no model."""
    onnx_models.scale_model(tmp_path / "scale.onnx")
    manager, recorder = make_manager(workers=1)
    model = manager.get("scale")
    outcomes = Outcomes()
    model.submit(req(x=x(1)), outcomes.blocking)
    outcomes.wait_for(1)
    for _ in range(3):
        model.submit(req(x=x(1)), outcomes.record)
    unloading = threading.Thread(target=manager.unload, args=("scale",))
    unloading.start()
    time.sleep(0.05)
    with pytest.raises(ModelNotFound):
        manager.get("scale")
    with pytest.raises(ModelNotReady):
        model.submit(req(x=x(1)), outcomes.record)
    outcomes.release.set()
    unloading.join(10)
    assert all(isinstance(r, Completed) for r in outcomes.wait_for(4))
    assert recorder.names()[-1] == "model_unloaded"


def test_a_failing_reply_callback_does_not_stop_the_worker(
    tmp_path: Path, make_manager: Callable[..., Any]
) -> None:
    """An exception in a done-callback is logged; the next request is still served."""
    onnx_models.scale_model(tmp_path / "scale.onnx")
    manager, _ = make_manager(workers=1)
    model = manager.get("scale")

    def explode(_outcome: Outcome) -> None:
        raise RuntimeError("callback bug")

    outcomes = Outcomes()
    model.submit(req(x=x(1)), explode)
    model.submit(req(x=x(1)), outcomes.record)
    assert isinstance(outcomes.wait_for(1)[0], Completed)


class ThreadRecorder(Outcomes):
    """Outcomes, plus the name of the thread each callback ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def note(self, outcome: Outcome) -> None:
        self.threads.append(threading.current_thread().name)
        self.record(outcome)


def settle(model: ServedModel, count: int = INLINE_EVIDENCE) -> None:
    """Serve `count` small requests (on workers) so the model has shown how fast it is."""
    done = Outcomes()
    for n in range(count):
        model.submit(req(x=x(1)), done.record)
        done.wait_for(n + 1)


def test_small_requests_to_an_idle_fast_model_run_on_the_calling_thread(
    tmp_path: Path, make_manager: Callable[..., Any]
) -> None:
    """Once a model has shown it is fast, a small request skips the worker hand-off; a big
    one, or any request before that evidence, does not."""
    onnx_models.scale_model(tmp_path / "scale.onnx")
    manager, _ = make_manager(inline_max_ms=50.0)
    model = manager.get("scale")
    early = ThreadRecorder()
    model.submit(req(x=x(1)), early.note)
    early.wait_for(1)
    assert early.threads[0].startswith("model-scale-")
    settle(model)
    seen = ThreadRecorder()
    model.submit(req(x=x(1)), seen.note)
    model.submit(req(x=x(64)), seen.note)
    first, second = seen.wait_for(2)
    assert seen.threads[0] == threading.current_thread().name
    assert seen.threads[1].startswith("model-scale-")
    assert isinstance(first, Completed) and first.outputs["y"].tolist() == [[3.0] * 4]
    assert isinstance(second, Completed) and second.outputs["y"].shape == (64, 4)


def test_inline_is_off_when_the_model_is_busy_or_when_disabled(
    tmp_path: Path, make_manager: Callable[..., Any]
) -> None:
    """With a worker busy, or inline_max_ms = 0, requests go through the queue."""
    onnx_models.scale_model(tmp_path / "scale.onnx")
    manager, _ = make_manager(inline_max_ms=50.0, workers=1)
    model = manager.get("scale")
    settle(model)
    held = ThreadRecorder()

    def hold(outcome: Outcome) -> None:
        held.threads.append(threading.current_thread().name)
        held.blocking(outcome)

    model.submit(req(x=x(64)), hold)  # too big for inline: holds the only worker
    held.wait_for(1)
    model.submit(req(x=x(1)), held.note)  # small, but the model is busy: queued
    held.release.set()
    held.wait_for(2)
    assert held.threads == ["model-scale-0", "model-scale-0"]
    disabled, _ = make_manager(inline_max_ms=0.0)
    settle(disabled.get("scale"))
    off = ThreadRecorder()
    disabled.get("scale").submit(req(x=x(1)), off.note)
    off.wait_for(1)
    assert off.threads[0].startswith("model-scale-")


def test_a_slow_inline_run_suspends_inline_runs_and_they_come_back(
    tmp_path: Path, make_manager: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow inline run (one large request, or a cost that depends on the data) sends the
    next requests to workers; after the suspension and fresh evidence, small requests run
    inline again (one large request no longer turns inline off for good)."""
    monkeypatch.setattr("agent.batching.INLINE_SUSPEND_S", 0.3)
    busy_model(tmp_path / "busy.onnx")
    manager, _ = make_manager(inline_max_ms=1.0)
    model = manager.get("busy")

    def busy(steps: int) -> InferenceRequest:
        return req(x=np.zeros((1, 1), np.float32), steps=np.array([[steps]], np.int64))

    done = ThreadRecorder()
    for n in range(INLINE_EVIDENCE):
        model.submit(busy(1), done.note)
        done.wait_for(n + 1)
    model.submit(busy(200_000), done.note)  # fast so far: runs inline, and slowly
    model.submit(busy(1), done.note)
    done.wait_for(INLINE_EVIDENCE + 2)
    here = threading.current_thread().name
    assert done.threads[-2] == here
    assert done.threads[-1].startswith("model-busy-")

    time.sleep(0.4)  # the suspension (0.3 s) is over
    evidence = 2 * INLINE_EVIDENCE  # afresh, on workers; and the slow run's mark fades
    for n in range(evidence):
        model.submit(busy(1), done.note)
        done.wait_for(INLINE_EVIDENCE + 3 + n)
    for n in range(2):  # two: one in INLINE_PROBE_EVERY goes through the queue anyway
        deadline = time.monotonic() + 5
        while model.queue.busy and time.monotonic() < deadline:  # the worker lets go after
            time.sleep(0.01)  # replying
        model.submit(busy(1), done.note)
        done.wait_for(INLINE_EVIDENCE + 3 + evidence + n)
    assert here in done.threads[-2:]
