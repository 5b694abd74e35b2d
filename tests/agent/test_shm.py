"""Shared-memory tensors (Triton's system shared-memory extension) over a real mosquitto,
with regions made by tritonclient's own helpers in /dev/shm.

Every region this module creates has a unique key and is destroyed at the end of its test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as oip
import tritonclient.utils.shared_memory as shm

from agent.broker import MosquittoBroker
from agent.config import SharedMemoryConfig
from agent.errors import SharedMemoryError
from agent.protocol import SharedMemoryRef
from agent.shm import SHM_DIR, Region, SharedMemoryRegistry, key_name
from tests import onnx_models
from tests.conftest import Probe, RunningAgent, agent_config, body

ROW = 4 * 4  # one FP32 row of the scale model: x [-1, 4]
MAX_REGIONS = 6


def _agent_with_shm(
    broker: MosquittoBroker, factory: pytest.TempPathFactory, **shm_config: Any
) -> Iterator[RunningAgent]:
    models = factory.mktemp("models")
    onnx_models.scale_model(models / "scale.onnx")
    limits = {"enabled": True, "max_regions": MAX_REGIONS, "max_bytes": 1 << 20}
    running = RunningAgent(agent_config(broker.port, models, shm={**limits, **shm_config}))
    yield running.start()
    running.stop()


@pytest.fixture(scope="module")
def shm_agent(
    broker: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningAgent]:
    """One agent for the module, shared memory on, small limits to reach them quickly."""
    yield from _agent_with_shm(broker, tmp_path_factory)


@pytest.fixture(scope="module")
def zero_copy_agent(
    broker: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningAgent]:
    """The same with shm.zero_copy: inputs are views of the mapping."""
    yield from _agent_with_shm(broker, tmp_path_factory, zero_copy=True)


@pytest.fixture
def regions() -> Iterator[Callable[[int], Any]]:
    """Create tritonclient regions with unique keys; all destroyed after the test."""
    made: list[Any] = []

    def create(byte_size: int) -> Any:
        handle = shm.create_shared_memory_region(
            f"r{uuid.uuid4().hex[:8]}", f"/edge-test-{uuid.uuid4().hex}", byte_size
        )
        made.append(handle)
        return handle

    yield create
    for handle in made:
        if (SHM_DIR / handle._shm_key.lstrip("/")).exists():
            shm.destroy_shared_memory_region(handle)


def command(probe: Probe, agent: RunningAgent, name: str, payload: dict[str, Any]) -> Any:
    return body(probe.request(f"{agent.topic}/control/{name}", json.dumps(payload)))


def register(probe: Probe, agent: RunningAgent, handle: Any, size: int, **change: Any) -> Any:
    request = {"name": handle._triton_shm_name, "key": handle._shm_key, "byte_size": size}
    return command(probe, agent, "shm_register", {**request, **change})


def infer_shm(
    probe: Probe,
    agent: RunningAgent,
    region_in: str,
    region_out: str | None,
    rows: int = 1,
    in_size: int | None = None,
    out_size: int | None = None,
    user: str = "",
) -> Any:
    """A request built by tritonclient: input (and output) in shared memory."""
    inp = oip.InferInput("x", [rows, 4], "FP32")
    inp.set_shared_memory(region_in, in_size if in_size is not None else rows * ROW)
    out = oip.InferRequestedOutput("y", binary_data=False)
    if region_out is not None:
        out.set_shared_memory(region_out, out_size if out_size is not None else rows * ROW)
    payload, header_length = oip.InferenceServerClient.generate_request_body([inp], outputs=[out])
    assert header_length is None  # no bytes travel: all of it is in shared memory
    topic = f"{agent.topic}/infer/scale" + (f"/{user}" if user else "")
    return probe.request(topic, payload)


def test_tritonclient_regions_carry_inputs_and_outputs(
    shm_agent: RunningAgent, probe: Probe, regions: Callable[[int], Any]
) -> None:
    """A client using tritonclient's helpers unchanged registers regions, infers with its
    input read from one and its output written into another, and the reply has only the
    output's metadata; status lists the regions, unregister drops them."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    handle_in, handle_out = regions(2 * ROW), regions(2 * ROW)
    shm.set_shared_memory_region(handle_in, [x])
    for handle in (handle_in, handle_out):
        assert "registered" in register(probe, shm_agent, handle, 2 * ROW)
    reply = infer_shm(probe, shm_agent, handle_in._triton_shm_name, handle_out._triton_shm_name, 2)
    result = oip.InferResult.from_response_body(reply.payload)
    output = result.get_output("y")
    assert output["shape"] == [2, 4] and "data" not in output
    assert output["parameters"]["shared_memory_region"] == handle_out._triton_shm_name
    y = shm.get_contents_as_numpy(handle_out, np.float32, output["shape"])
    np.testing.assert_allclose(y, x * 2 + 1)
    status = command(probe, shm_agent, "shm_status", {})
    assert {r["name"] for r in status["regions"]} >= {handle_in._triton_shm_name}
    named = command(probe, shm_agent, "shm_status", {"name": handle_in._triton_shm_name})
    assert named["regions"] == [
        {
            "name": handle_in._triton_shm_name,
            "key": handle_in._shm_key,
            "offset": 0,
            "byte_size": 2 * ROW,
        }
    ]
    dropped = command(probe, shm_agent, "shm_unregister", {"name": handle_in._triton_shm_name})
    assert dropped == {"unregistered": [handle_in._triton_shm_name]}
    command(probe, shm_agent, "shm_unregister", {"name": handle_out._triton_shm_name})


def test_an_input_in_shared_memory_may_come_back_as_json(
    shm_agent: RunningAgent, probe: Probe, regions: Callable[[int], Any]
) -> None:
    """An input at an offset of a region, with the output asked for as usual, is answered
    with the output's data in the reply."""
    handle = regions(3 * ROW)
    shm.set_shared_memory_region(handle, [np.full((1, 4), 5, np.float32)], offset=2 * ROW)
    register(probe, shm_agent, handle, ROW, offset=2 * ROW)
    reply = body(infer_shm(probe, shm_agent, handle._triton_shm_name, None))
    assert reply["outputs"][0]["data"] == [11.0] * 4
    command(probe, shm_agent, "shm_unregister", {"name": handle._triton_shm_name})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"key": "/edge-test-absent"}, "not found"),
        ({"key": "/a/b"}, "not a shared-memory name"),
        ({"key": ".."}, "not a shared-memory name"),
        ({"key": "../../etc/passwd"}, "not a shared-memory name"),
        ({"key": 3}, "'key' must be a string"),
        ({"byte_size": 0}, "'byte_size' must be an integer from 1"),
        ({"byte_size": True}, "'byte_size' must be an integer from 1"),
        ({"byte_size": 2 * ROW}, "needs 32"),
        ({"offset": ROW}, "needs 32"),
        ({"offset": -1}, "'offset' must be an integer"),
        ({"name": ""}, "'name' must be a string"),
        ({"path": "/dev/shm/x"}, "unknown fields"),
        ({"byte_size": 2 << 20}, "over shm.max_bytes"),
    ],
)
def test_bad_registrations_are_refused_with_the_reason(
    shm_agent: RunningAgent,
    probe: Probe,
    regions: Callable[[int], Any],
    change: dict[str, Any],
    message: str,
) -> None:
    """Each bad registration gets a 400 that says what is wrong, and registers nothing."""
    handle = regions(ROW)
    reply = register(probe, shm_agent, handle, ROW, **change)
    assert reply["code"] == 400 and message in reply["error"], reply
    assert command(probe, shm_agent, "shm_status", {})["regions"] == []


def test_links_fifos_and_duplicates_are_refused(
    shm_agent: RunningAgent, probe: Probe, regions: Callable[[int], Any], tmp_path: Path
) -> None:
    """A key that is a symbolic link or a FIFO is never opened as a region, and a name
    cannot be registered twice."""
    target = tmp_path / "secret"
    target.write_bytes(b"x" * ROW)
    link, fifo = f"edge-test-{uuid.uuid4().hex}", f"edge-test-{uuid.uuid4().hex}"
    (SHM_DIR / link).symlink_to(target)
    os.mkfifo(SHM_DIR / fifo)
    try:
        for key, message in ((link, "symbolic link"), (fifo, "not a shared-memory object")):
            reply = command(
                probe, shm_agent, "shm_register", {"name": "n", "key": key, "byte_size": ROW}
            )
            assert reply["code"] == 400 and message in reply["error"], reply
    finally:
        (SHM_DIR / link).unlink()
        (SHM_DIR / fifo).unlink()
    handle = regions(ROW)
    register(probe, shm_agent, handle, ROW)
    again = register(probe, shm_agent, handle, ROW)
    assert again["code"] == 400 and "already registered" in again["error"]
    command(probe, shm_agent, "shm_unregister", {})


def test_registrations_are_bounded_in_number(
    shm_agent: RunningAgent, probe: Probe, regions: Callable[[int], Any]
) -> None:
    """Past shm.max_regions a registration is refused; unregistering all frees the places."""
    for _ in range(MAX_REGIONS):
        assert "registered" in register(probe, shm_agent, regions(ROW), ROW)
    reply = register(probe, shm_agent, regions(ROW), ROW)
    assert reply["code"] == 400 and "shm.max_regions" in reply["error"]
    assert len(command(probe, shm_agent, "shm_unregister", {})["unregistered"]) == MAX_REGIONS


@pytest.mark.parametrize(
    ("request_args", "message"),
    [
        ({"region_in": "nowhere"}, "no shared-memory region 'nowhere'"),
        ({"in_size": 2 * ROW}, "beyond region"),
        ({"rows": 1, "in_size": ROW - 4}, "needs 16"),
        ({"region_out": "nowhere"}, "output 'y': no shared-memory region"),
        ({"out_size": ROW - 4}, "do not fit"),
        ({"user": "someone-else"}, "no shared-memory region"),
    ],
)
def test_bad_references_get_an_error_reply(
    shm_agent: RunningAgent,
    probe: Probe,
    regions: Callable[[int], Any],
    request_args: dict[str, Any],
    message: str,
) -> None:
    """An unknown region, one of another user, a place beyond the region, a size that is
    not the tensor's, an output region too small: each a 400 with the reason."""
    handle = regions(ROW)
    shm.set_shared_memory_region(handle, [np.ones((1, 4), np.float32)])
    register(probe, shm_agent, handle, ROW)
    args: dict[str, Any] = {
        "region_in": handle._triton_shm_name,
        "region_out": handle._triton_shm_name,
    }
    reply = body(infer_shm(probe, shm_agent, **{**args, **request_args}))
    assert reply["code"] == 400 and message in reply["error"], reply
    command(probe, shm_agent, "shm_unregister", {})


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"shared_memory_byte_size": ROW}, "shared_memory_byte_size without shared_memory_region"),
        ({"shared_memory_region": "r"}, "shared_memory_byte_size (required)"),
        ({"shared_memory_region": 7, "shared_memory_byte_size": ROW}, "must be a string"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": -1}, "integers from 0"),
        ({"shared_memory_region": "r", "shared_memory_byte_size": ROW, "binary_data_size": ROW},
         "cannot also carry"),
    ],
)  # fmt: skip
def test_malformed_shared_memory_parameters_are_refused(
    shm_agent: RunningAgent, probe: Probe, tensor: dict[str, Any], message: str
) -> None:
    """Parameters that do not name a place in a region properly are a 400 that says why."""
    request = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": tensor}]}
    reply = body(probe.request(f"{shm_agent.topic}/infer/scale", json.dumps(request)))
    assert reply["code"] == 400 and message in reply["error"], reply


@pytest.mark.parametrize("agent_fixture", ["shm_agent", "zero_copy_agent"])
def test_a_truncated_region_is_refused_and_the_agent_serves_on(
    request: pytest.FixtureRequest,
    agent_fixture: str,
    probe: Probe,
    regions: Callable[[int], Any],
) -> None:
    """A client that shrinks its region after registering it gets a 400, not a crash of
    the agent (SIGBUS), which answers the next request normally (copy and zero-copy)."""
    shm_agent: RunningAgent = request.getfixturevalue(agent_fixture)
    handle = regions(ROW)
    register(probe, shm_agent, handle, ROW)
    os.truncate(SHM_DIR / handle._shm_key.lstrip("/"), 0)
    reply = body(infer_shm(probe, shm_agent, handle._triton_shm_name, None))
    assert reply["code"] == 400 and "holds 0 bytes" in reply["error"]
    os.truncate(SHM_DIR / handle._shm_key.lstrip("/"), ROW)
    assert body(infer_shm(probe, shm_agent, handle._triton_shm_name, None))["outputs"]
    command(probe, shm_agent, "shm_unregister", {})


def test_a_region_whose_key_was_removed_is_dropped_at_its_next_use(
    shm_agent: RunningAgent, probe: Probe, regions: Callable[[int], Any]
) -> None:
    """A request on a region its client has destroyed (unlinked) gets a 400 saying so, and
    the region is no longer registered."""
    handle = regions(ROW)
    register(probe, shm_agent, handle, ROW)
    shm.destroy_shared_memory_region(handle)
    reply = body(infer_shm(probe, shm_agent, handle._triton_shm_name, None))
    assert reply["code"] == 400 and "was removed" in reply["error"], reply
    assert command(probe, shm_agent, "shm_status", {})["regions"] == []


def test_regions_of_a_client_that_exits_are_dropped(shm_agent: RunningAgent, probe: Probe) -> None:
    """A client process that dies without unregistering: its keys are unlinked (Python's
    resource tracker) and the agent drops its regions."""
    key = f"/edge-test-{uuid.uuid4().hex}"
    script = (
        "import sys, time, tritonclient.utils.shared_memory as shm\n"
        f"shm.create_shared_memory_region('gone', {key!r}, {ROW})\n"
        "print('ready', flush=True)\ntime.sleep(60)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as client:
        try:
            assert client.stdout is not None and client.stdout.readline() == "ready\n"
            assert "registered" in command(
                probe, shm_agent, "shm_register", {"name": "gone", "key": key, "byte_size": ROW}
            )
        finally:
            client.kill()
    deadline = time.monotonic() + 10
    while (SHM_DIR / key[1:]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert command(probe, shm_agent, "shm_status", {})["regions"] == []


def test_shared_memory_is_refused_when_off(agent: RunningAgent, probe: Probe) -> None:
    """By default (shm.enabled = false) the commands and shared-memory inputs say it is off."""
    reply = command(probe, agent, "shm_register", {"name": "a", "key": "/k", "byte_size": 4})
    assert reply["code"] == 400 and "shm.enabled" in reply["error"]
    reply = body(infer_shm(probe, agent, "a", None))
    assert reply["code"] == 400 and "shm.enabled" in reply["error"]


@pytest.mark.parametrize("zero_copy", [False, True])
def test_each_mode_checks_the_file_at_every_use(
    regions: Callable[[int], Any], zero_copy: bool
) -> None:
    """Read by pread or through the mapping (from a region past the first page), a region
    whose file shrank or whose key was removed is refused before it is touched; a
    read-only view is what zero-copy lends."""
    page = 4096
    handle = regions(page + 2 * ROW)
    shm.set_shared_memory_region(handle, [np.arange(8, dtype=np.float32)], offset=page)
    region = Region("r", handle._shm_key, page, 2 * ROW, None, zero_copy=zero_copy)
    ref = SharedMemoryRef("r", ROW, ROW)
    view = np.frombuffer(region.read("input", ref), np.float32)
    np.testing.assert_array_equal(view, [4, 5, 6, 7])
    assert view.flags.writeable is not zero_copy
    region.write("output", ref, memoryview(np.zeros(4, np.float32)).cast("B"))
    contents = shm.get_contents_as_numpy(handle, np.float32, [8], offset=page)
    assert contents.tolist() == [0, 1, 2, 3, 0, 0, 0, 0]
    os.truncate(SHM_DIR / key_name(handle._shm_key), page + ROW)
    with pytest.raises(SharedMemoryError, match=f"holds {page + ROW} bytes"):
        region.read("input", ref)
    with pytest.raises(SharedMemoryError, match=f"holds {page + ROW} bytes"):
        region.write("output", ref, memoryview(b"\0" * ROW))
    shm.destroy_shared_memory_region(handle)
    with pytest.raises(SharedMemoryError, match="was removed"):
        region.read("input", ref)
    del view
    region.close()


def test_registry_sweep_drops_removed_keys(regions: Callable[[int], Any]) -> None:
    """A region whose key was unlinked leaves the registry at the next sweep."""
    registry = SharedMemoryRegistry(SharedMemoryConfig(enabled=True))
    handle = regions(ROW)
    registry.register("a", handle._shm_key, 0, ROW, "alice")
    assert registry.status(None, "bob") == []
    shm.destroy_shared_memory_region(handle)
    registry.sweep()
    assert registry.status(None, "alice") == []


def _as_another_user(probe: Callable[[], str]) -> str:
    """What `probe` returns in a forked child that holds no privilege over the region's
    file: as root, the child becomes nobody (root itself would bypass file permissions)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no logging, only the probe, then _exit
        os.close(read_end)
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            said = probe()
        except BaseException as exc:  # reported to the parent, whatever it is
            said = f"{type(exc).__name__}: {exc}"
        os.write(write_end, said.encode()[:4000])
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        said = pipe.read().decode()
    os.waitpid(pid, 0)
    return said


@pytest.mark.parametrize("zero_copy", [False, True])
def test_file_permissions_make_a_region_read_only_or_refuse_it(
    regions: Callable[[int], Any], zero_copy: bool
) -> None:
    """A key the agent's user may only read becomes a read-only region (inputs yes, outputs
    refused with the reason); one it may not read is refused at registration."""
    handle = regions(ROW)
    shm.set_shared_memory_region(handle, [np.full(4, 3, np.float32)])
    path = SHM_DIR / key_name(handle._shm_key)
    ref = SharedMemoryRef("r", 0, ROW)

    def read_then_write() -> str:
        region = Region("r", handle._shm_key, 0, ROW, None, zero_copy=zero_copy)
        values = np.frombuffer(region.read("input", ref), np.float32).tolist()
        try:
            region.write("output", ref, memoryview(b"\0" * ROW))
        except SharedMemoryError as exc:
            return f"{region.writable} {values} {exc}"
        return "written"

    path.chmod(0o444)
    said = _as_another_user(read_then_write)
    assert said.startswith("False [3.0, 3.0, 3.0, 3.0]") and "read-only to the agent" in said
    path.chmod(0o000)
    said = _as_another_user(
        lambda: str(Region("r", handle._shm_key, 0, ROW, None, zero_copy=zero_copy))
    )
    assert "permission denied" in said, said
    path.chmod(0o600)
