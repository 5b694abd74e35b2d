"""The watched model directory: pushes, atomic renames, slow copies, removals and
replacements, on a real directory with inotify and a real agent behind MQTT."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import ModelNotFound
from tests import onnx_models
from tests.conftest import Probe, RunningAgent, body

SETTLE = {"settle_s": 0.2}
SCALE_IO = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
}
REQUEST = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
)


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not true within {timeout} s")


def serves(agent: RunningAgent, name: str) -> bool:
    return name in agent.agent.manager.names()


def events_named(agent: RunningAgent, name: str) -> list[dict[str, object]]:
    return [e for e in agent.recorded_events if e["event"] == name]


def recording(agent: RunningAgent) -> RunningAgent:
    """Keep every event the agent emits in `agent.recorded_events`."""
    agent.recorded_events = []
    events = agent.agent.events
    original = events.emit

    def record(event: str, **fields: object) -> None:
        agent.recorded_events.append({"event": event, **fields})
        original(event, **fields)

    events.emit = record  # type: ignore[method-assign]
    return agent


@pytest.fixture
def watched(start_agent: Callable[..., RunningAgent], tmp_path: Path) -> RunningAgent:
    """An agent watching its own model directory, with a short settle time."""
    directory = tmp_path / "watched"
    directory.mkdir()
    onnx_models.scale_model(directory / "scale.onnx")
    return recording(start_agent(directory, models=SETTLE))


def chunked_copy(source: Path, target: Path, chunks: int = 5, pause: float = 0.05) -> None:
    data = source.read_bytes()
    step = len(data) // chunks + 1
    with target.open("wb") as f:
        for start in range(0, len(data), step):
            f.write(data[start : start + step])
            f.flush()
            time.sleep(pause)


def test_a_model_copied_in_chunks_is_served(
    watched: RunningAgent, probe: Probe, tmp_path: Path
) -> None:
    """A bare model written in chunks (as scp does) is loaded once it settles, and serves."""
    built = onnx_models.scale_model(tmp_path / "build" / "s.onnx", factor=3.0)
    chunked_copy(built, Path(watched.config.models.dir) / "triple.onnx")
    wait_until(lambda: serves(watched, "triple"))
    reply = body(probe.request(f"{watched.topic}/infer/triple", REQUEST))
    assert reply["outputs"][0]["data"] == [4.0] * 4
    assert [e["model"] for e in events_named(watched, "model_loaded")] == ["triple"]


def test_an_atomic_rename_of_a_staged_folder_is_picked_up(
    watched: RunningAgent, tmp_path: Path
) -> None:
    """A folder staged under a dot-name and renamed into place loads; staging is ignored."""
    models = Path(watched.config.models.dir)
    built = onnx_models.scale_model(tmp_path / "build" / "s.onnx")
    staged = onnx_models.ladder_folder(models / ".incoming-m", [("fp32", built)], **SCALE_IO)
    time.sleep(0.6)
    assert not serves(watched, "m") and not events_named(watched, "model_rejected")
    manifest = json.loads((staged / "manifest.json").read_text())
    manifest["name"] = "m"
    (staged / "manifest.json").write_text(json.dumps(manifest))
    os.rename(staged, models / "m")
    wait_until(lambda: serves(watched, "m"))


def test_a_slow_push_waits_for_its_files_and_hashes(watched: RunningAgent, tmp_path: Path) -> None:
    """Manifest first, variant file later and in pieces: nothing is rejected meanwhile,
    and the model loads once the file matches its sha256."""
    models = Path(watched.config.models.dir)
    built = onnx_models.scale_model(tmp_path / "build" / "fp32.onnx")
    staging = onnx_models.ladder_folder(tmp_path / "stage" / "slow", [("fp32", built)], **SCALE_IO)
    (models / "slow").mkdir()
    shutil.copyfile(staging / "manifest.json", models / "slow" / "manifest.json")
    time.sleep(0.8)
    half = built.read_bytes()[: built.stat().st_size // 2]
    (models / "slow" / "fp32.onnx").write_bytes(half)
    time.sleep(0.8)
    assert not serves(watched, "slow")
    assert events_named(watched, "variant_rejected") == []
    shutil.copyfile(built, models / "slow" / "fp32.onnx")
    wait_until(lambda: serves(watched, "slow"))
    assert events_named(watched, "variant_rejected") == []


def test_a_push_that_never_completes_is_reported(
    start_agent: Callable[..., RunningAgent], tmp_path: Path
) -> None:
    """Past settle_max_s an incomplete push is acted on, and rejected with its reason."""
    directory = tmp_path / "watched"
    directory.mkdir()
    agent = recording(start_agent(directory, models={"settle_s": 0.1, "settle_max_s": 1.0}))
    built = onnx_models.scale_model(tmp_path / "b" / "fp32.onnx")
    folder = onnx_models.ladder_folder(directory / "broken", [("fp32", built)], **SCALE_IO)
    (folder / "fp32.onnx").write_bytes(b"truncated")
    wait_until(lambda: bool(events_named(agent, "variant_rejected")))
    (rejected,) = events_named(agent, "variant_rejected")
    assert rejected["model"] == "broken"
    assert "sha256" in str(rejected["reason"])
    assert not serves(agent, "broken")


def test_removing_a_model_unloads_it(watched: RunningAgent, probe: Probe) -> None:
    """Deleting a model's file unloads it; later requests get 404."""
    assert serves(watched, "scale")
    (Path(watched.config.models.dir) / "scale.onnx").unlink()
    wait_until(lambda: not serves(watched, "scale"))
    with pytest.raises(ModelNotFound):
        watched.agent.manager.get("scale")
    reply = body(probe.request(f"{watched.topic}/infer/scale", REQUEST))
    assert reply["code"] == 404
    assert events_named(watched, "model_unloaded")[0]["model"] == "scale"


def test_replacing_a_model_under_load_drops_no_request(
    watched: RunningAgent, probe: Probe, tmp_path: Path
) -> None:
    """While requests flow, the model file is replaced three times (atomic renames): every
    request is answered, by the old or the new version, never with an error."""
    models = Path(watched.config.models.dir)
    answers: list[dict[str, object]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            answers.append(body(probe.request(f"{watched.topic}/infer/scale", REQUEST)))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        for factor in (3.0, 4.0, 5.0):
            time.sleep(0.3)
            staged = onnx_models.scale_model(models / f".next-{factor}.onnx", factor=factor)
            os.replace(staged, models / "scale.onnx")
            expected = [factor + 1.0] * 4
            wait_until(lambda e=expected: answers[-1].get("outputs", [{}])[0].get("data") == e)
    finally:
        stop.set()
        thread.join(10)
    errors = [a for a in answers if "error" in a]
    assert errors == []
    seen = {a["outputs"][0]["data"][0] for a in answers}  # type: ignore[index]
    assert {4.0, 5.0, 6.0} <= seen <= {3.0, 4.0, 5.0, 6.0}
    assert len(answers) > 20


def test_hidden_entries_and_disabled_watching_are_left_alone(
    start_agent: Callable[..., RunningAgent], tmp_path: Path
) -> None:
    """Dot-entries are never loaded; with models.watch = false nothing is picked up."""
    directory = tmp_path / "watched"
    directory.mkdir()
    agent = start_agent(directory, models={"watch": False})
    onnx_models.scale_model(directory / "late.onnx")
    onnx_models.scale_model(directory / ".hidden.onnx")
    time.sleep(1.0)
    assert agent.agent.manager.names() == []


# --- Hostile entries: FIFOs and other non-regular files never block the watcher (issue 12) ---


def fifo_manifest(models: Path, scratch: Path) -> str:
    """A model folder whose manifest.json is a FIFO (reading it would block for good)."""
    (models / "fifo-manifest").mkdir()
    os.mkfifo(models / "fifo-manifest" / "manifest.json")
    return "fifo-manifest"


def fifo_variant(models: Path, scratch: Path) -> str:
    """A model folder with a valid manifest whose variant file is a FIFO."""
    built = onnx_models.scale_model(scratch / "fp32.onnx")
    staged = onnx_models.ladder_folder(scratch / "fifo-variant", [("fp32", built)], **SCALE_IO)
    (staged / "fp32.onnx").unlink()
    os.mkfifo(staged / "fp32.onnx")
    os.rename(staged, models / "fifo-variant")
    return "fifo-variant"


def fifo_bare(models: Path, scratch: Path) -> str:
    """A bare model file that is a FIFO."""
    os.mkfifo(models / "fifo-bare.onnx")
    return "fifo-bare.onnx"


def link_to_fifo(models: Path, scratch: Path) -> str:
    """A bare model file that is a symlink to a FIFO inside the model directory."""
    os.mkfifo(models / ".pipe")
    os.symlink(models / ".pipe", models / "fifo-link.onnx")
    return "fifo-link.onnx"


def rejections_of(agent: RunningAgent, entry: str) -> list[dict[str, object]]:
    """model_rejected events about `entry` (by path, or by model name)."""
    name = entry.removesuffix(".onnx")
    return [
        e
        for e in events_named(agent, "model_rejected")
        if str(e.get("path", "")).endswith(f"/{entry}") or e.get("model") == name
    ]


@pytest.mark.parametrize("make", [fifo_manifest, fifo_variant, fifo_bare, link_to_fifo])
def test_a_fifo_entry_is_rejected_once_and_later_pushes_still_load(
    watched: RunningAgent, tmp_path: Path, make: Callable[[Path, Path], str]
) -> None:
    """A FIFO where a manifest or model file should be is rejected with a reason, once; a
    normal push after it loads, and removing the bad entry works."""
    models = Path(watched.config.models.dir)
    entry = make(models, tmp_path / "scratch")
    wait_until(lambda: bool(rejections_of(watched, entry)))
    reasons = " ".join(
        str(e["reason"])
        for e in events_named(watched, "model_rejected") + events_named(watched, "variant_rejected")
    )
    assert "FIFO" in reasons
    onnx_models.scale_model(models / "after.onnx", factor=3.0)
    wait_until(lambda: serves(watched, "after"))
    assert len(rejections_of(watched, entry)) == 1  # the rescan for `after` said nothing again
    target = models / entry
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    onnx_models.scale_model(models / "later.onnx")
    wait_until(lambda: serves(watched, "later"))
    assert len(rejections_of(watched, entry)) == 1
    assert serves(watched, "scale")


def test_a_push_elsewhere_does_not_judge_a_push_still_being_written(
    watched: RunningAgent, tmp_path: Path
) -> None:
    """While one folder is half-copied (manifest there, variant file short), another model
    pushed meanwhile loads, and the half-copied one is neither rejected nor loaded until
    its file is whole."""
    models = Path(watched.config.models.dir)
    built = onnx_models.scale_model(tmp_path / "build" / "fp32.onnx")
    staging = onnx_models.ladder_folder(tmp_path / "stage" / "slow", [("fp32", built)], **SCALE_IO)
    (models / "slow").mkdir()
    shutil.copyfile(staging / "manifest.json", models / "slow" / "manifest.json")
    (models / "slow" / "fp32.onnx").write_bytes(built.read_bytes()[:100])
    for index in range(8):  # keep the slow push unsettled while the other one lands
        if index == 1:
            onnx_models.scale_model(models / "other.onnx")
        with (models / "slow" / "fp32.onnx").open("ab") as f:
            f.write(b"\0")
        time.sleep(0.1)
    wait_until(lambda: serves(watched, "other"))
    assert not serves(watched, "slow")
    assert events_named(watched, "variant_rejected") == []
    assert events_named(watched, "model_rejected") == []
    shutil.copyfile(built, models / "slow" / "fp32.onnx")
    wait_until(lambda: serves(watched, "slow"))
    assert events_named(watched, "variant_rejected") == []


def test_a_bad_entry_is_reported_once_and_again_when_it_changes(watched: RunningAgent) -> None:
    """A folder with an invalid manifest is rejected once however many rescans follow, and
    again once its manifest is rewritten (still invalid, differently)."""
    models = Path(watched.config.models.dir)
    (models / "broken").mkdir()
    (models / "broken" / "manifest.json").write_text('{"name": "broken"}')
    wait_until(lambda: len(events_named(watched, "model_rejected")) == 1)
    for index in range(3):
        onnx_models.scale_model(models / f"push{index}.onnx")
        wait_until(lambda i=index: serves(watched, f"push{i}"))
    assert len(events_named(watched, "model_rejected")) == 1
    (models / "broken" / "manifest.json").write_text("[]")
    wait_until(lambda: len(events_named(watched, "model_rejected")) == 2)
    first, second = (e["reason"] for e in events_named(watched, "model_rejected"))
    assert first != second
