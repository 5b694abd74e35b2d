"""The shared-memory stage of `edge-agent bench --shm`: a client on the same board that
passes its tensors through regions of /dev/shm (the agent's `[shm]` feature, agent/shm.py)
instead of the MQTT payload, timed round trip by round trip beside its floors.

The client is what a Triton client does with tritonclient's shared-memory helpers (which
tests/agent/test_shm.py runs unchanged against the agent), written here on the standard
library so that the bench needs nothing the agent does not: a POSIX shared-memory object per
tensor, registered once with `shm_register`, then per request a JSON body that names the
regions; the reply says where the outputs were written and the client reads them out.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.datatypes import NUMPY_DTYPES, datatype_of
from agent.protocol import SharedMemoryRef, decode_response, tensor_buffer
from agent.session import LoadedVariant
from agent.shm import SHM_DIR

GAP_S = 0.005
"""The untimed pause after each request: a camera's frames come at a cadence, and a loop
that never sleeps would be scheduled as a CPU hog where one that waits would not."""
WARM_UP = 20
"""Requests per target before timing; the first ones also check every path's answer."""

# The targets, in the order the report lists them.
ONNXRUNTIME = "onnxruntime"
ECHO = "echo"
IN_PLACE = "shm_in_place"
WRITES = "shm_writes_inputs"


@dataclass(frozen=True)
class ShmRun:
    """What `measure` measured."""

    latencies_ms: dict[str, list[float]]
    """Each target's round trips."""
    cpu_s: dict[str, float]
    """The CPU seconds each server ("agent", "echo") spent over them."""
    request_bytes: int
    """The request's payload: JSON that names the regions, whatever the tensors' size."""


class ClientRegion:
    """A region as a client creates it: a POSIX shared-memory object of its own (0600, a
    fresh name), mapped; unlinked on close, which also tells the agent it is gone."""

    def __init__(self, name: str, byte_size: int) -> None:
        self.name, self.byte_size = name, byte_size
        self.key = f"/edge-bench-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._path = SHM_DIR / self.key[1:]
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, byte_size)
            self._map = mmap.mmap(fd, byte_size)
        except BaseException:
            self._path.unlink()
            raise
        finally:
            os.close(fd)

    def write(self, array: np.ndarray) -> None:
        """Put `array`'s bytes at the start of the region."""
        data = tensor_buffer(array)
        memoryview(self._map)[: len(data)] = data

    def read(self, datatype: str, shape: list[int], byte_size: int) -> np.ndarray:
        """A copy of the tensor the agent wrote at the start of the region."""
        dtype = np.dtype(NUMPY_DTYPES[datatype])
        if byte_size != math.prod(shape) * dtype.itemsize or byte_size > self.byte_size:
            raise RuntimeError(f"region {self.name!r}: {byte_size} bytes for {shape} {datatype}")
        return np.frombuffer(self._map, dtype, math.prod(shape)).reshape(shape).copy()

    def close(self) -> None:
        self._map.close()
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    def __enter__(self) -> ClientRegion:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class ShmClient:
    """Inference through shared memory: a region per input and per output, registered with
    the agent once; `infer` sends the request that names them and reads the outputs out."""

    def __init__(
        self,
        requester: Any,
        device_topic: str,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
    ) -> None:
        """`requester` is a connected agent.mqtt.requester.Requester; `device_topic` the
        agent's topic root (`edge/<device>`); `outputs` are arrays of the outputs' shapes."""
        self._requester, self._device_topic = requester, device_topic
        self._topic = f"{device_topic}/infer/{model}"
        self._stack = contextlib.ExitStack()
        with self._stack:
            self.inputs = self._regions("in", inputs)
            self.outputs = self._regions("out", outputs)
            for region in (*self.inputs.values(), *self.outputs.values()):
                self._command("shm_register", {
                    "name": region.name, "key": region.key, "byte_size": region.byte_size,
                })  # fmt: skip
            self._stack.callback(self._command, "shm_unregister", {})
            self.body = self._body(inputs, outputs)
            self._stack = self._stack.pop_all()

    def write_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        for name, array in inputs.items():
            self.inputs[name].write(array)

    def infer(self) -> tuple[str, dict[str, np.ndarray]]:
        """One request on the inputs in the regions: the variant that answered, the outputs."""
        reply = self._requester.request(self._topic, self.body)
        header, _ = decode_response(reply.payload, reply.header_length)
        if "error" in header:
            raise RuntimeError(f"the agent answered with an error: {header['error']}")
        outputs = {}
        for entry in header["outputs"]:
            size = (entry.get("parameters") or {}).get("shared_memory_byte_size")
            if size is None:
                raise RuntimeError(f"output {entry['name']!r} came back outside shared memory")
            region = self.outputs[entry["name"]]
            outputs[entry["name"]] = region.read(entry["datatype"], entry["shape"], size)
        return str(header.get("model_version")), outputs

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> ShmClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _regions(self, kind: str, arrays: Mapping[str, np.ndarray]) -> dict[str, ClientRegion]:
        return {
            name: self._stack.enter_context(ClientRegion(f"bench-{kind}-{i}", array.nbytes))
            for i, (name, array) in enumerate(arrays.items())
        }

    def _body(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> bytes:
        """The request tritonclient builds for inputs and outputs in shared memory."""
        request = {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype_of(array),
                    "shape": list(array.shape),
                    "parameters": self._place(self.inputs[name], array),
                }
                for name, array in inputs.items()
            ],
            "outputs": [
                {"name": name, "parameters": self._place(self.outputs[name], array)}
                for name, array in outputs.items()
            ],
        }
        return json.dumps(request).encode()

    @staticmethod
    def _place(region: ClientRegion, array: np.ndarray) -> dict[str, Any]:
        return SharedMemoryRef(region.name, 0, array.nbytes).parameters()

    def _command(self, name: str, body: dict[str, Any]) -> None:
        topic = f"{self._device_topic}/control/{name}"
        reply = json.loads(self._requester.request(topic, json.dumps(body).encode()).payload)
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error']}")


def measure(
    requester: Any,
    device_topic: str,
    model: str,
    variant: LoadedVariant,
    inputs: dict[str, np.ndarray],
    echo_topic: str,
    requests: int,
    cpu_seconds: Callable[[str], float],
) -> ShmRun:
    """Round trips of each target and the servers' CPU time over them (`cpu_seconds(server)`
    reads the CPU time of "agent" or "echo" so far).

    The targets: raw onnxruntime on the same variant and inputs; the bare MQTT echo of the
    shared-memory request (the transport's floor); the agent through shared memory with the
    inputs already in their regions (a camera that decodes into it) and with the client
    writing them first. Request by request, every target in turn, the order rotating: with
    other loads coming and going, blocks of one target would measure the moment as much as
    the target.
    """
    expected = dict(
        zip(variant.output_names, variant.run(inputs, variant.output_names), strict=True)
    )
    with ShmClient(requester, device_topic, model, inputs, expected) as client:
        client.write_inputs(inputs)

        def echo() -> None:
            if bytes(requester.request(echo_topic, client.body).payload) != client.body:
                raise RuntimeError("the echo answered something else")

        def writes() -> None:
            client.write_inputs(inputs)
            client.infer()

        targets: dict[str, Callable[[], object]] = {
            ONNXRUNTIME: lambda: variant.run(inputs),
            ECHO: echo,
            IN_PLACE: client.infer,
            WRITES: writes,
        }
        _check(client.infer(), expected, variant.name)
        for _ in range(WARM_UP):
            for target in targets.values():
                target()
        latencies: dict[str, list[float]] = {name: [] for name in targets}
        order = list(targets.items())
        cpu = {server: cpu_seconds(server) for server in ("agent", "echo")}
        for _ in range(requests):
            order = order[1:] + order[:1]
            for name, target in order:
                t0 = time.perf_counter()
                target()
                latencies[name].append((time.perf_counter() - t0) * 1000.0)
                time.sleep(GAP_S)
        cpu = {server: cpu_seconds(server) - cpu[server] for server in cpu}
        _check(client.infer(), expected, variant.name)
        return ShmRun(latencies, cpu, len(client.body))


def _check(
    answer: tuple[str, dict[str, np.ndarray]], expected: dict[str, np.ndarray], variant: str
) -> None:
    """The outputs read from the regions are the expected ones: equal to raw onnxruntime's
    when the same variant answered, of the same shapes when another one did."""
    answered, outputs = answer
    for name, array in expected.items():
        if name not in outputs or outputs[name].shape != array.shape:
            raise RuntimeError(f"output {name!r} did not come back in its region as expected")
        if answered == variant and not np.allclose(outputs[name], array, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"output {name!r} read from its region differs from onnxruntime's")
