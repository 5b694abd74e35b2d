"""Endurance: hours of a device's life compressed into minutes. Run with
`tools/test.sh --soak` (EDGE_SOAK_SECONDS sets the length, 120 by default)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest

from agent.broker import MosquittoBroker
from agent.protocol import decode_response, encode_request
from tests import onnx_models
from tests.conftest import HEADER, Probe, RunningAgent, body

SECONDS = float(os.environ.get("EDGE_SOAK_SECONDS", "120"))
SCALE = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 1, 1, 1]}]}
)


class SoakClient(threading.Thread):
    """Sends one kind of request, one at a time, until stopped; keeps what went wrong."""

    def __init__(self, kind: str, port: int, topic: str, stop: threading.Event) -> None:
        super().__init__(name=f"soak-{kind}")
        self.kind, self.port, self.topic, self.stop = kind, port, topic, stop
        self.images, self.labels = onnx_models.digits_samples(8)
        self.answered = 0
        self.failures: list[str] = []

    def run(self) -> None:
        probe = Probe(self.port)
        try:
            n = 0
            while not self.stop.is_set():
                n += 1
                ok, reply = self.once(probe, n)
                self.answered += 1
                if not ok:
                    self.failures.append(f"{self.kind} #{n}: {reply}")
        except AssertionError as exc:  # a reply that never came
            self.failures.append(f"{self.kind}: {exc}")
        finally:
            probe.close()

    def once(self, probe: Probe, n: int) -> tuple[bool, object]:
        row = n % len(self.images)
        label = self.labels[row]
        digits = f"{self.topic}/infer/digits"
        if self.kind == "malformed":
            reply = body(probe.request(digits, b"{broken", timeout=30))
            return reply.get("code") == 400, reply
        if self.kind == "replaced":
            reply = body(probe.request(f"{self.topic}/infer/scale", SCALE, timeout=30))
            data = reply.get("outputs", [{}])[0].get("data", [])
            return len(data) == 4 and data[0] in (3.0, 4.0, 5.0), reply
        if self.kind == "binary":
            payload, length = encode_request({"input": self.images[row : row + 1]})
            msg = probe.request(digits, payload, header_length=length, timeout=30)
            lengths = [
                int(v) for k, v in getattr(msg.properties, "UserProperty", []) if k == HEADER
            ]
            header, outputs = decode_response(msg.payload, lengths[0] if lengths else None)
            probabilities = outputs.get("probabilities", np.zeros(10))
            return int(probabilities.argmax()) == label, header
        request = {
            "id": str(n),
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "data": self.images[row].tolist(),
                }
            ],
        }
        reply = body(probe.request(digits, json.dumps(request), timeout=30))
        data = reply.get("outputs", [{}])[0].get("data", [0.0])
        return int(np.argmax(data)) == label, reply


@pytest.mark.soak
@pytest.mark.timeout(SECONDS + 180)
def test_sustained_load_with_reloads_answers_everything_without_growing(
    start_agent: Callable[..., RunningAgent], broker: MosquittoBroker, tmp_path: Path
) -> None:
    """Four clients (JSON, binary, malformed, and one on a model replaced every five
    seconds) keep requests flowing: every request is answered, good ones correctly, and
    the process's memory stays flat."""
    directory = tmp_path / "soak"
    directory.mkdir()
    onnx_models.copy_demo(directory)
    onnx_models.scale_model(directory / "scale.onnx")
    agent = start_agent(directory, models={"settle_s": 0.2}, metrics={"interval_s": 1.0})
    stop = threading.Event()
    clients = [
        SoakClient(kind, broker.port, agent.topic, stop)
        for kind in ("json", "binary", "malformed", "replaced")
    ]
    for client in clients:
        client.start()
    process = psutil.Process()
    time.sleep(min(10.0, SECONDS / 4))
    rss_start = process.memory_info().rss
    deadline = time.monotonic() + SECONDS
    replaced = 0
    while time.monotonic() < deadline:
        time.sleep(5)
        staged = onnx_models.scale_model(
            directory / f".scale-{replaced}.onnx", factor=2.0 + replaced % 3
        )
        os.replace(staged, directory / "scale.onnx")
        replaced += 1
    stop.set()
    for client in clients:
        client.join(60)
    rss_end = process.memory_info().rss
    assert [f for c in clients for f in c.failures] == []
    assert sum(c.answered for c in clients) > 1000
    growth_mb = (rss_end - rss_start) / 2**20
    assert growth_mb < 50, f"RSS grew by {growth_mb:.1f} MB over {SECONDS:.0f} s"
    assert agent.agent.manager.get("scale").stats.snapshot().errors == 0
