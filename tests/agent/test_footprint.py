"""What `edge-agent run` imports and keeps resident: only what serving needs (agent/launch.py,
agent/logs.py, agent/adapt/procstat.py)."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import structlog

from agent.adapt.procstat import _clean_file_spans
from agent.broker import MosquittoBroker
from agent.launch import defer_import, import_without
from agent.logs import configure_logging
from agent.protocol import encode_request
from tests.conftest import Probe, body

# `python -m agent run ...` that writes the names in sys.modules to a file on SIGUSR2: the
# import set of a real serving agent, read without changing how it starts.
_DUMPING_AGENT = textwrap.dedent(
    """
    import os, runpy, signal, sys
    out = sys.argv[1]
    def dump(*_):
        with open(out + ".tmp", "w") as f:
            f.write("\\n".join(sorted(k for k, v in sys.modules.items() if v is not None)))
        os.replace(out + ".tmp", out)
    signal.signal(signal.SIGUSR2, dump)
    sys.argv = ["edge-agent", *sys.argv[2:]]
    runpy.run_module("agent", run_name="__main__")
    """
)

# Installed in the dev environment, never needed to serve ONNX models over MQTT.
NOT_NEEDED = (
    "rich",
    "pygments",
    "better_exceptions",
    "greenlet",
    "compressor",
    "onnx",
    "torch",
    "sklearn",
    "skl2onnx",
    "matplotlib",
    "scipy",
    "amqtt",
    "cryptography",
    "ai_edge_litert",
    "tritonclient",
    "agent.litert",
    "agent.bench",
    "agent.broker",  # only with --embedded-broker
    "tomllib",  # only with a configuration file
    "importlib.metadata",  # pydantic's plugin loader, with plugins disabled (agent/launch.py)
    "asyncio.base_events",  # asyncio is deferred: only structlog's async methods use it
)


def test_run_imports_only_what_serving_needs(
    broker: MosquittoBroker, models_dir: Path, probe: Probe, tmp_path: Path
) -> None:
    """A real `edge-agent run` that has answered a request holds none of the installed
    packages it does not need (rich, the compressor, onnx, torch...) nor the modules that
    only other commands or options use in sys.modules, and released its start-up pages
    once ready."""
    dump = tmp_path / "modules.txt"
    device = f"lean-{uuid.uuid4().hex[:6]}"
    process = subprocess.Popen(
        [
            *(sys.executable, "-c", _DUMPING_AGENT, str(dump), "run"),
            *("--mqtt-port", str(broker.port), "--device-id", device),
            *("--models-dir", str(models_dir), "--log-format", "json"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "EDGE_AGENT_METRICS__INTERVAL_S": "0"},
    )
    try:
        lines = _lines_until(process, '"startup_pages_released"', timeout=60)
        payload, header_length = encode_request(
            {"input": np.zeros((1, 64), np.float32)}, "x", binary=False, binary_outputs=False
        )
        reply = probe.request(
            f"edge/{device}/infer/digits", payload, header_length=header_length, timeout=10
        )
        assert "outputs" in body(reply), body(reply)
        process.send_signal(signal.SIGUSR2)
        modules = _read_when_written(dump, timeout=10)
    finally:
        process.terminate()
        process.wait(30)
        assert process.stderr is not None
        process.stderr.close()
    assert {"onnxruntime", "paho.mqtt.client", "structlog", "pydantic"} <= modules
    assert sorted(name for name in NOT_NEEDED if name in modules) == []
    released = json.loads(next(line for line in lines if "startup_pages_released" in line))
    assert released["rss_mb"] > 0


def test_import_without_hides_packages_only_while_importing(tmp_path: Path) -> None:
    """A module imported with `json` hidden sees it missing, and `json` stays importable
    (and the same module object) for everyone else afterwards."""
    (tmp_path / "probe_optional.py").write_text(
        "try:\n    import json\nexcept ImportError:\n    json = None\n"
    )
    sys.path.insert(0, str(tmp_path))
    saved = sys.modules.pop("json")
    try:
        import_without("probe_optional", ("json",))
        import probe_optional  # noqa: PLC0415  (the module the call above imported)

        assert probe_optional.json is None
        import json as again  # noqa: PLC0415

        assert again.dumps([1]) == "[1]"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("probe_optional", None)
        sys.modules["json"] = saved


def test_a_deferred_module_is_imported_at_its_first_attribute_read(tmp_path: Path) -> None:
    """`import` of a deferred module runs none of its code; the first attribute read (or
    `from ... import`) imports it, once, and reads the attribute there; attributes given
    as known are answered without importing it, and a plain module has no __path__."""
    (tmp_path / "probe_deferred.py").write_text("RUNS = []\nRUNS.append(1)\nVALUE = 42\n")
    (tmp_path / "probe_deferred_pkg").mkdir()
    (tmp_path / "probe_deferred_pkg" / "__init__.py").write_text("")
    (tmp_path / "probe_deferred_pkg" / "inner.py").write_text("NAME = 'inner'\n")
    sys.path.insert(0, str(tmp_path))
    try:
        defer_import("probe_deferred", known=lambda: "answered")
        defer_import("probe_deferred_pkg", package=True)
        import probe_deferred  # noqa: PLC0415  (the stand-in the call above installed)

        assert probe_deferred.known() == "answered"
        assert sys.modules["probe_deferred"] is probe_deferred
        assert not hasattr(probe_deferred, "__path__")
        assert sys.modules["probe_deferred"] is probe_deferred  # still not imported
        from probe_deferred import VALUE  # noqa: PLC0415

        real = sys.modules["probe_deferred"]
        assert VALUE == 42 and real is not probe_deferred
        assert probe_deferred.RUNS == [1] and real.RUNS == [1]
        from probe_deferred_pkg.inner import NAME  # noqa: PLC0415  (needs the real __path__)

        assert NAME == "inner"
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("probe_deferred", "probe_deferred_pkg", "probe_deferred_pkg.inner"):
            sys.modules.pop(name, None)


def test_console_logs_render_plain_tracebacks_when_rich_is_installed() -> None:
    """The console renderer writes Python's own traceback, not rich's boxed one, although
    rich is installed here and structlog found it."""
    stream = io.StringIO()
    # As the test found them: tests after this one read what structlog prints to stdout.
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    configure_logging("info", "console", stream)
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger("test").exception("failed")
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)
    text = stream.getvalue()
    assert "Traceback (most recent call last)" in text
    assert "ValueError: boom" in text
    assert "╭" not in text


def test_release_file_pages_shrinks_rss_and_inference_still_runs() -> None:
    """In a fresh python that loaded an onnxruntime session, releasing the read-only file
    pages lowers RSS by megabytes, and the session answers the same afterwards."""
    program = textwrap.dedent(
        """
        import json, sys, numpy as np, onnxruntime as ort
        from agent.adapt.procstat import process_rss_mb, release_file_pages
        session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
        x = {"input": np.arange(64, dtype=np.float32).reshape(1, 64) / 64}
        before_out = session.run(None, x)[0]
        before = process_rss_mb()
        released = release_file_pages()
        after = process_rss_mb()
        same = bool(np.array_equal(session.run(None, x)[0], before_out))
        print(json.dumps({"before": before, "after": after, "released": released, "same": same}))
        """
    )
    model = Path(__file__).resolve().parents[2] / "models" / "digits" / "fp32.onnx"
    result = subprocess.run(
        [sys.executable, "-c", program, str(model)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    figures = json.loads(result.stdout)
    assert figures["same"]
    assert figures["released"] > 5
    assert figures["after"] < figures["before"] - 5


def test_only_private_read_only_file_mappings_without_own_pages_are_released() -> None:
    """Of a process's mappings, only private, non-writable file mappings holding no
    anonymous page are chosen: not relocated data, writable data, the heap, shared or
    deleted files."""
    smaps = textwrap.dedent(
        """\
        00400000-00401000 r-xp 00000000 08:01 1 /usr/lib/libcode.so
        Rss:                   4 kB
        Anonymous:             0 kB
        VmFlags: rd ex mr mw me
        00401000-00402000 r--p 00001000 08:01 1 /usr/lib/libcode.so
        Rss:                   4 kB
        Anonymous:             4 kB
        00402000-00403000 rw-p 00002000 08:01 1 /usr/lib/libcode.so
        Rss:                   4 kB
        Anonymous:             0 kB
        00500000-00600000 rw-p 00000000 00:00 0 [heap]
        Rss:                 512 kB
        Anonymous:           512 kB
        7f0000000000-7f0000001000 r--s 00000000 00:05 2 /dev/shm/region
        Rss:                   4 kB
        Anonymous:             0 kB
        7f0000001000-7f0000002000 r--p 00000000 08:01 3 /tmp/gone.so (deleted)
        Rss:                   4 kB
        Anonymous:             0 kB
        7f0000002000-7f0000004000 r--p 00000000 08:01 4 /usr/lib/libconst.so
        Rss:                   8 kB
        Anonymous:             0 kB
        7ffd00000000-7ffd00001000 r-xp 00000000 00:00 0 [vdso]
        Rss:                   4 kB
        Anonymous:             0 kB
        """
    ).encode()
    assert _clean_file_spans(smaps) == [(0x00400000, 0x00401000), (0x7F0000002000, 0x7F0000004000)]


def test_a_load_after_the_release_measures_its_weights_not_the_code_it_faults_in() -> None:
    """After release_file_pages, loading a second CNN makes the RSS jump by the library
    code the load maps back in; the anonymous memory the model manager measures grows by
    far less, about the variant's own weights and buffers."""
    program = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        from agent.adapt.procstat import (
            process_anon_mb, process_rss_mb, release_file_pages, return_free_memory,
        )
        from agent.session import LoadedVariant, SessionSettings
        settings = SessionSettings(threads=1)
        first = LoadedVariant.load("m", "a", Path(sys.argv[1]), settings)
        release_file_pages()
        return_free_memory()
        rss, anon = process_rss_mb(), process_anon_mb()
        second = LoadedVariant.load("m", "b", Path(sys.argv[2]), settings)
        return_free_memory()
        print(json.dumps({"rss": process_rss_mb() - rss, "anon": process_anon_mb() - anon}))
        """
    )
    cnn = Path(__file__).resolve().parents[2] / "models" / "digits-cnn"
    files = [v["file"] for v in json.loads((cnn / "manifest.json").read_text())["variants"]]
    result = subprocess.run(
        [sys.executable, "-c", program, str(cnn / files[0]), str(cnn / files[-1])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    added = json.loads(result.stdout)
    assert 0 <= added["anon"] < added["rss"] / 2, added


def _lines_until(process: subprocess.Popen[str], marker: str, timeout: float) -> list[str]:
    """The process's log lines up to the first holding `marker`; fails on exit or timeout."""
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    for line in process.stderr:
        lines.append(line)
        if marker in line:
            return lines
        assert time.monotonic() < deadline, "".join(lines[-20:])
    raise AssertionError(f"the agent exited before logging {marker}: {''.join(lines[-20:])}")


def _read_when_written(path: Path, timeout: float) -> set[str]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "the agent did not write its module list"
        time.sleep(0.05)
    return set(path.read_text().split())
