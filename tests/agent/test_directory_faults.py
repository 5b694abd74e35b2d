"""Fault injection on the model directory: while a client keeps sending requests, hostile
and broken pushes land (FIFOs, a symlink to one, a directory named like a model, garbage
bytes, a manifest too large or not JSON, a variant missing or with the wrong hash, .tflite
files truncated, bit-flipped, random or crashing LiteRT's interpreter, slow warm-ups past
the load bound), each round followed by good pushes, an ONNX and a TFLite one. Every
request is answered, every bad entry is reported once, every good push loads. One round
in the suite; `tools/test.sh --soak` runs rounds for EDGE_SOAK_SECONDS."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.broker import MosquittoBroker
from agent.repository import MAX_MANIFEST_BYTES
from tests import onnx_models, tflite_models
from tests.agent.test_watcher import REQUEST, SCALE_IO, events_named, recording, wait_until
from tests.conftest import Probe, RunningAgent, body
from tests.stuck_model import loop_model, trips_for_seconds

SOAK_SECONDS = float(os.environ.get("EDGE_SOAK_SECONDS", "120"))
# A load bound well above what a normal load takes on a busy machine, well below the slow
# warm-ups.
LIMITS = {"settle_s": 0.1, "settle_max_s": 2.0, "load_timeout_s": 1.0}

Push = Callable[[Path, Path, str], None]


def fifo_manifest(models: Path, scratch: Path, name: str) -> None:
    (models / name).mkdir()
    os.mkfifo(models / name / "manifest.json")


def fifo_variant(models: Path, scratch: Path, name: str) -> None:
    staged = _ladder(scratch, name)
    (staged / "fp32.onnx").unlink()
    os.mkfifo(staged / "fp32.onnx")
    os.rename(staged, models / name)


def fifo_bare(models: Path, scratch: Path, name: str) -> None:
    os.mkfifo(models / f"{name}.onnx")


def link_to_fifo(models: Path, scratch: Path, name: str) -> None:
    os.mkfifo(models / f".pipe-{name}")
    os.symlink(models / f".pipe-{name}", models / f"{name}.onnx")


def directory_named_onnx(models: Path, scratch: Path, name: str) -> None:
    staged = _ladder(scratch, name)
    (staged / "fp32.onnx").unlink()
    (staged / "fp32.onnx").mkdir()
    os.rename(staged, models / name)


def garbage_bytes(models: Path, scratch: Path, name: str) -> None:
    (scratch / f"{name}.onnx").write_bytes(b"\x08\x07not a protobuf at all")
    os.rename(scratch / f"{name}.onnx", models / f"{name}.onnx")


def manifest_not_json(models: Path, scratch: Path, name: str) -> None:
    (scratch / name).mkdir()
    (scratch / name / "manifest.json").write_text('{"name": ')
    os.rename(scratch / name, models / name)


def manifest_too_large(models: Path, scratch: Path, name: str) -> None:
    (scratch / name).mkdir()
    (scratch / name / "manifest.json").write_bytes(b" " * (MAX_MANIFEST_BYTES + 1))
    os.rename(scratch / name, models / name)


def variant_missing(models: Path, scratch: Path, name: str) -> None:
    staged = _ladder(scratch, name)
    (staged / "fp32.onnx").unlink()
    os.rename(staged, models / name)


def wrong_hash(models: Path, scratch: Path, name: str) -> None:
    staged = _ladder(scratch, name)
    with (staged / "fp32.onnx").open("ab") as f:
        f.write(b"\0")
    manifest = json.loads((staged / "manifest.json").read_text())
    manifest["variants"][0]["size_bytes"] += 1  # complete by size: only the hash is wrong
    (staged / "manifest.json").write_text(json.dumps(manifest))
    os.rename(staged, models / name)


def tflite_truncated(models: Path, scratch: Path, name: str) -> None:
    built = tflite_models.scale_tflite(scratch / f"{name}.tflite")
    built.write_bytes(built.read_bytes()[: built.stat().st_size // 2])
    os.rename(built, models / built.name)


def tflite_bit_flipped(models: Path, scratch: Path, name: str) -> None:
    built = tflite_models.scale_tflite(scratch / f"{name}.tflite")
    data = bytearray(built.read_bytes())
    data[3] ^= 0x40  # the root table's offset, now a gigabyte past the end
    built.write_bytes(bytes(data))
    os.rename(built, models / built.name)


def tflite_random(models: Path, scratch: Path, name: str) -> None:
    data = bytearray(np.random.default_rng(len(name)).integers(0, 256, 2048, np.uint8))
    data[4:8] = b"TFL3"
    (scratch / f"{name}.tflite").write_bytes(bytes(data))
    os.rename(scratch / f"{name}.tflite", models / f"{name}.tflite")


def tflite_crashing(models: Path, scratch: Path, name: str) -> None:
    """A well-formed file on which LiteRT 2.3.0's interpreter dies of SIGSEGV."""
    built = tflite_models.constant_input_tflite(scratch / f"{name}.tflite")
    os.rename(built, models / built.name)


def _ladder(scratch: Path, name: str) -> Path:
    built = onnx_models.scale_model(scratch / f"{name}-build.onnx")
    return onnx_models.ladder_folder(scratch / name, [("fp32", built)], **SCALE_IO)


BAD_PUSHES: tuple[Push, ...] = (
    fifo_manifest,
    fifo_variant,
    fifo_bare,
    link_to_fifo,
    directory_named_onnx,
    garbage_bytes,
    manifest_not_json,
    manifest_too_large,
    variant_missing,
    wrong_hash,
    tflite_truncated,
    tflite_bit_flipped,
    tflite_random,
    tflite_crashing,
)


class Requester(threading.Thread):
    """Sends requests to the `scale` model one after another; keeps what went wrong."""

    def __init__(self, port: int, topic: str) -> None:
        super().__init__(name="fault-requester", daemon=True)
        self._probe = Probe(port)
        self._topic = f"{topic}/infer/scale"
        self.stop = threading.Event()
        self.answered = 0
        self.failures: list[str] = []

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    reply = body(self._probe.request(self._topic, REQUEST, timeout=5.0))
                except AssertionError as exc:  # no reply within 5 s
                    self.failures.append(str(exc))
                    continue
                if reply.get("outputs", [{}])[0].get("data") != [3.0] * 4:
                    self.failures.append(json.dumps(reply)[:300])
                self.answered += 1
        finally:
            self._probe.close()


def reported(agent: RunningAgent, name: str) -> list[dict[str, object]]:
    """Rejections that name the entry `name` (by path or model)."""
    # A variant_rejected is followed by its model's model_rejected: one report per entry.
    return [
        e
        for e in events_named(agent, "model_rejected")
        if e.get("model") == name
        or Path(str(e.get("path", ""))).name in (name, f"{name}.onnx", f"{name}.tflite")
    ]


def inject(
    start_agent: Callable[..., RunningAgent],
    broker: MosquittoBroker,
    tmp_path: Path,
    seconds: float,
) -> None:
    directory = tmp_path / "faults"
    directory.mkdir()
    onnx_models.scale_model(directory / "scale.onnx")
    agent = recording(start_agent(directory, models=LIMITS))
    slow_trips = trips_for_seconds(tmp_path, 3.0)
    client = Requester(broker.port, agent.topic)
    client.start()
    deadline = time.monotonic() + seconds
    bad: list[str] = []
    good: list[str] = []
    slow: list[str] = []
    round_ = 0
    try:
        while True:
            scratch = tmp_path / f"scratch-{round_}"
            scratch.mkdir()
            for push in BAD_PUSHES:
                name = f"{push.__name__.replace('_', '-')}-{round_}"
                push(directory, scratch, name)
                bad.append(name)
            slow.append(f"slow-{round_}")
            loop_model(scratch / f"{slow[-1]}.onnx", slow_trips)
            os.rename(scratch / f"{slow[-1]}.onnx", directory / f"{slow[-1]}.onnx")
            good.append(f"good-{round_}")
            onnx_models.scale_model(directory / f"good-{round_}.onnx", factor=float(round_))
            good.append(f"good-lite-{round_}")
            lite = tflite_models.scale_tflite(scratch / f"{good[-1]}.tflite")
            os.rename(lite, directory / lite.name)
            wait_until(lambda: set(good[-2:]) <= set(agent.agent.manager.names()), timeout=30)
            for name in bad:
                wait_until(lambda n=name: bool(reported(agent, n)), timeout=30)
            wait_until(lambda: slow[-1] in agent.agent.manager.names(), timeout=60)
            round_ += 1
            if time.monotonic() >= deadline:
                break
            # The next round starts from a clean directory; links before what they point to.
            for entry in sorted(directory.iterdir(), key=lambda e: e.name.startswith(".")):
                if entry.name != "scale.onnx":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            wait_until(lambda: agent.agent.manager.names() == ["scale"], timeout=30)
    finally:
        client.stop.set()
        client.join(10)
    assert client.failures == []
    assert client.answered > 0
    for name in bad:
        assert len(reported(agent, name)) == 1, [
            (e["event"], str(e.get("reason"))[-80:])
            for e in agent.recorded_events
            if name in json.dumps(e, default=str)
        ]
    # Each slow warm-up (3 s or more) outlasted the 1 s bound, then ended and served.
    assert set(slow) <= {s["model"] for s in events_named(agent, "model_load_stuck")}
    wait_until(lambda: agent.agent.loader.stuck() == [], timeout=30)
    assert agent.agent.health_problems(60.0) == []


def test_requests_are_answered_while_hostile_pushes_land(
    start_agent: Callable[..., RunningAgent], broker: MosquittoBroker, tmp_path: Path
) -> None:
    """One round of every bad push and a slow warm-up: requests keep being answered, each
    bad entry is reported once, the good push loads."""
    inject(start_agent, broker, tmp_path, seconds=0)


@pytest.mark.soak
@pytest.mark.timeout(SOAK_SECONDS + 180)
def test_requests_are_answered_through_many_rounds_of_hostile_pushes(
    start_agent: Callable[..., RunningAgent], broker: MosquittoBroker, tmp_path: Path
) -> None:
    """Rounds of every bad push, slow warm-ups and removals for EDGE_SOAK_SECONDS:
    every request answered, every bad entry reported once, every good push loaded."""
    inject(start_agent, broker, tmp_path, seconds=SOAK_SECONDS)
