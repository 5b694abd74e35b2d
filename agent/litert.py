"""One loaded `.tflite` variant: LiteRT interpreters, the signature they serve, and running them.

The only module that imports ai_edge_litert (the optional `litert` extra), and only when a
`.tflite` variant loads, so an agent without the extra still serves ONNX. A file reaches the
interpreter only after agent/tflite_check.py has read it and, by default, after a child
process has opened and run it once: a file that crashes the interpreter kills the child.
"""

from __future__ import annotations

import ctypes
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from agent.adapt.procstat import process_rss_mb
from agent.datatypes import datatype_of
from agent.errors import InferenceError, VariantRejected
from agent.files import check_regular
from agent.manifest import DelegateSpec, RuntimeOptions, TensorSpec
from agent.session import RunControl, SessionSettings
from agent.signature import conform, zeros
from agent.tflite_check import check_tflite_file

log = structlog.get_logger(__name__)

FLOAT_IO_HINT = " (float_io serves quantized tensors as FP32)"

INSTALL_HINT = "install the litert extra: pip install 'edge-agent[litert]'"
DEFAULT_SIGNATURE = "serving_default"
# What a probe may take beyond the warm-up bound: a Python start and LiteRT's import.
PROBE_START_S = 30.0
_QUANTIZED = (np.dtype(np.int8), np.dtype(np.uint8))
_PROBE_REFUSED = 3
_POOL_POLL_S = 0.5  # how often a run waiting for an interpreter looks whether it was closed

# Run by the probe child: open, allocate and run once on zeros. An exception is the
# interpreter refusing the file (exit 3, its message on stderr); an invoke that raises is
# not, since a model may refuse synthetic input; only a crash (a signal) is what we guard.
_PROBE = """
import json, sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter, load_delegate
try:
    spec = json.loads(sys.argv[3])
    delegates = [load_delegate(spec["library"], spec["options"])] if spec else None
    it = Interpreter(
        model_path=sys.argv[1], num_threads=int(sys.argv[2]), experimental_delegates=delegates
    )
    it.allocate_tensors()
except Exception as exc:
    sys.stderr.write(" ".join(str(exc).split())[:500])
    sys.exit(3)
try:
    for d in it.get_input_details():
        it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    it.invoke()
except Exception:
    pass
"""


def _litert(variant: str) -> Any:
    """ai_edge_litert.interpreter, or VariantRejected saying how to get it."""
    try:
        from ai_edge_litert import interpreter  # noqa: PLC0415 - the extra is optional
    except ImportError as exc:
        raise VariantRejected(
            f"variant {variant}: a .tflite file needs LiteRT, which is not installed; "
            f"{INSTALL_HINT}"
        ) from exc
    return interpreter


@dataclass(frozen=True)
class _Affine:
    """A tensor's per-tensor quantization, to serve it as FP32 (`float_io`)."""

    scale: float
    zero_point: int
    dtype: np.dtype[Any]

    def quantize(self, real: np.ndarray) -> np.ndarray:
        info = np.iinfo(self.dtype)
        q = np.rint(np.asarray(real, dtype=np.float32) / self.scale) + self.zero_point
        quantized: np.ndarray = np.clip(q, info.min, info.max).astype(self.dtype)
        return quantized

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        real: np.ndarray = (q.astype(np.float32) - np.float32(self.zero_point)) * np.float32(
            self.scale
        )
        return real


@dataclass(frozen=True)
class _Tensor:
    """One input or output as the interpreter sees it, under the name the agent serves."""

    name: str
    index: int
    dtype: np.dtype[Any]
    shape: tuple[int, ...]  # -1 for a free dimension (the shape signature)
    affine: _Affine | None  # set when float_io serves this quantized tensor as FP32


class _Bound:
    """One interpreter and how to run it: on its primary subgraph's tensors directly (the
    cheapest path: LiteRT's SignatureRunner resizes and reallocates on every call), or
    through its signature runner when the signature's subgraph may be another one."""

    def __init__(
        self,
        interpreter: Any,
        signature: str | None,
        inputs: Sequence[_Tensor],
        outputs: Sequence[_Tensor],
    ) -> None:
        self.interpreter = interpreter
        direct = signature is None or interpreter.num_subgraphs() == 1
        self._runner = None if direct else interpreter.get_signature_runner(signature)
        self._inputs = {t.name: t for t in inputs}
        self._outputs = {t.name: t for t in outputs}
        self._float_outputs = any(t.affine for t in outputs)
        # Current input shapes: a request of another batch size resizes and reallocates.
        self._shapes = {
            d["index"]: tuple(int(x) for x in d["shape"]) for d in interpreter.get_input_details()
        }

    def run(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
        # Every input, each once: an input left out would run on the previous request's data.
        if len(feeds) != len(self._inputs) or not self._inputs.keys() >= feeds.keys():
            missing = sorted(set(self._inputs) - set(feeds))
            unknown = sorted(set(feeds) - set(self._inputs))
            raise ValueError(f"missing inputs {missing}, unknown inputs {unknown}")
        raw = self._invoke(feeds, names) if self._runner is None else self._signed(feeds, names)
        if not self._float_outputs:
            return raw
        return [
            spec.affine.dequantize(array) if (spec := self._outputs[name]).affine else array
            for name, array in zip(names, raw, strict=True)
        ]

    def _signed(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
        arrays = {}
        for name, value in feeds.items():
            affine = self._inputs[name].affine
            arrays[name] = affine.quantize(value) if affine else value
        assert self._runner is not None
        result = self._runner(**arrays)
        return [result[name] for name in names]

    def _invoke(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
        it = self.interpreter
        staged = []
        resized = False
        for name, value in feeds.items():
            spec = self._inputs[name]
            array = spec.affine.quantize(value) if spec.affine else value
            if self._shapes[spec.index] != array.shape:
                it.resize_tensor_input(spec.index, list(array.shape))
                self._shapes[spec.index] = array.shape
                resized = True
            staged.append((spec.index, array))
        if resized:  # reallocating drops tensors already set: set them after
            it.allocate_tensors()
        for index, array in staged:
            it.set_tensor(index, array)  # LiteRT copies, making the array C-contiguous
        it.invoke()
        # get_tensor copies: the next invoke may overwrite the interpreter's buffers.
        return [it.get_tensor(self._outputs[name].index) for name in names]


class LiteRTVariant:
    """A `.tflite` variant ready to run: a pool of interpreters and the signature served.

    A LiteRT interpreter must not run on two threads at once, so each run takes one
    interpreter from the pool and gives it back; with one interpreter (the default) runs
    take turns, with `interpreters = N` up to N run at once, each costing its own memory.
    """

    def __init__(
        self,
        model: str,
        name: str,
        path: Path,
        bound: Sequence[_Bound],
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        signature: str | None,
    ) -> None:
        self.model = model
        self.name = name
        self.path = path
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.output_names = tuple(spec.name for spec in self.outputs)
        self.signature = signature
        self.interpreters = len(bound)
        self.load_ms = 0.0
        self.warmed_up = False
        self.rss_mb: float | None = None
        self._closed = False
        self._pool: queue.SimpleQueue[_Bound] = queue.SimpleQueue()
        for each in bound:
            self._pool.put(each)

    @classmethod
    def load(
        cls,
        model: str,
        name: str,
        path: Path,
        settings: SessionSettings,
        expected_inputs: Sequence[TensorSpec] | None = None,
        expected_outputs: Sequence[TensorSpec] | None = None,
        options: RuntimeOptions | None = None,
    ) -> LiteRTVariant:
        """Check `path`, probe it in a child process, open its interpreters and check the
        signature against the manifest's; VariantRejected says why a variant cannot serve."""
        start = time.monotonic()
        opts = options or RuntimeOptions()
        lite = _litert(name)
        stamp = _stamp(path, name)
        check_tflite_file(path, variant=name, custom_ops=opts.custom_ops)
        threads = opts.threads or settings.threads
        if opts.delegate is not None:
            _check_delegate_library(opts.delegate.library, path, name)
        if opts.probe is not False:
            _probe_once(path, name, threads, opts.delegate, settings.warmup_timeout_s)
        try:
            check_regular(path)  # LiteRT's own open would block on a FIFO swapped in
        except OSError as exc:
            raise VariantRejected(f"variant {name}: refused {path.name}: {exc}") from exc
        before = process_rss_mb()
        interpreters = [
            _open(lite, path, name, threads, opts) for _ in range(opts.interpreters or 1)
        ]
        if _stamp(path, name) != stamp:
            # The interpreters must have opened the bytes that were checked and probed.
            raise VariantRejected(f"variant {name}: {path.name} changed while it loaded")
        signature = _signature(interpreters[0])
        ins, outs = _tensors(interpreters[0], signature, name, float_io=bool(opts.float_io))
        bound = [_Bound(it, signature, ins, outs) for it in interpreters]
        inputs = [_spec(t) for t in ins]
        outputs = [_spec(t) for t in outs]
        if expected_inputs is not None:
            inputs = conform(name, "input", inputs, expected_inputs, FLOAT_IO_HINT)
        if expected_outputs is not None:
            outputs = conform(name, "output", outputs, expected_outputs, FLOAT_IO_HINT)
        variant = cls(model, name, path, bound, inputs, outputs, signature)
        if settings.warmup:
            # Every interpreter once: each allocates its arena on its first run.
            variant.warmed_up = all(variant.warm_up() for _ in range(variant.interpreters))
        after = process_rss_mb()
        variant.rss_mb = max(0.0, after - before) if before is not None and after else None
        variant.load_ms = (time.monotonic() - start) * 1000.0
        log.info(
            "litert_variant_loaded",
            model=model,
            variant=name,
            signature=signature,
            interpreters=variant.interpreters,
            threads=threads,
            delegate=opts.delegate.library if opts.delegate else None,
            float_io=bool(opts.float_io),
            rss_mb=round(variant.rss_mb, 1) if variant.rss_mb is not None else None,
            ms=round(variant.load_ms, 1),
        )
        return variant

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        output_names: Sequence[str] | None = None,
        control: RunControl | None = None,
    ) -> list[np.ndarray]:
        """Run on a free interpreter (waiting for one); any failure is an InferenceError.

        LiteRT cannot stop a run once started: a cancelled `control` stops it before it
        starts, or while it waits for an interpreter.
        """
        names = tuple(output_names) if output_names else self.output_names
        bound = self._take(control)
        try:
            return bound.run(feeds, names)
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError/KeyError freely
            raise InferenceError(f"{self.model}/{self.name}: {_describe(exc)}") from exc
        finally:
            self._pool.put(bound)

    def _take(self, control: RunControl | None) -> _Bound:
        """A free interpreter, waiting while all are busy; InferenceError once closed or
        cancelled."""
        while not self._closed:
            if control is not None and control.cancelled:
                raise InferenceError(f"{self.model}/{self.name}: the run was cancelled")
            try:
                return self._pool.get(timeout=_POOL_POLL_S)
            except queue.Empty:
                continue
        raise InferenceError(f"{self.model}/{self.name}: the variant was unloaded")

    def warm_up(self, rows: int = 1, timeout_s: float | None = None) -> bool:
        """Run on zeros (free dimensions 1, the batch dimension `rows`) so that the first
        request is not slow; True when it ran.

        LiteRT cannot stop a run, so `timeout_s` is kept by the probe, which runs the model
        on zeros in a child process that is killed past it (the variant is then rejected);
        without the probe a warm-up is not bounded.
        """
        del timeout_s  # kept by the probe (see above)
        feeds = {spec.name: zeros(spec, rows) for spec in self.inputs}
        try:
            self.run(feeds)
        except InferenceError:
            return False
        return True

    def close(self) -> None:
        """Drop the interpreters (and their delegates); a run still waiting for one fails
        with InferenceError, and one in flight finishes on its interpreter."""
        self._closed = True
        for _ in range(self.interpreters):
            try:
                self._pool.get_nowait()
            except queue.Empty:
                break


def _stamp(path: Path, variant: str) -> tuple[int, int, int, int]:
    try:
        info = path.stat()
    except OSError as exc:
        raise VariantRejected(f"variant {variant}: cannot read {path.name}: {exc}") from exc
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


# Files that passed a probe, by identity and stamp (a rewrite changes the stamp): a policy
# that swaps between rungs reloads the same files, and each probe costs a Python start.
_probed: set[tuple[int, int, int, int, str]] = set()
_probed_lock = threading.Lock()


def _probe_once(
    path: Path, variant: str, threads: int, delegate: DelegateSpec | None, run_s: float
) -> None:
    spec = delegate.model_dump_json() if delegate else ""
    key = (*_stamp(path, variant), spec)
    with _probed_lock:
        if key in _probed:
            return
    start = time.monotonic()
    probe_file(path, variant, threads, delegate, timeout_s=run_s + PROBE_START_S)
    with _probed_lock:
        _probed.add(key)
    log.info("litert_probed", variant=variant, file=path.name, ms=round(
        (time.monotonic() - start) * 1000.0, 1))  # fmt: skip


def probe_file(
    path: Path,
    variant: str,
    threads: int = 1,
    delegate: DelegateSpec | None = None,
    timeout_s: float = 60.0,
) -> None:
    """Open and run the file once in a child process (with the variant's delegate, whose
    custom operators the model may need); VariantRejected if the child dies (a signal),
    cannot open it, or does not finish in time."""
    spec = json.dumps(delegate.model_dump(mode="json") if delegate else None)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, str(path), str(threads), spec],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise VariantRejected(
            f"variant {variant}: opening {path.name} in a probe process did not finish "
            f"in {timeout_s:g} s (a Python start, LiteRT's import, one run on zeros)"
        ) from exc
    except OSError as exc:
        raise VariantRejected(
            f"variant {variant}: cannot start a probe process for {path.name}: {exc}"
        ) from exc
    if done.returncode == 0:
        return
    reason = done.stderr.decode("utf-8", "replace").strip().splitlines()
    if done.returncode == _PROBE_REFUSED:
        raise VariantRejected(
            f"variant {variant}: LiteRT cannot load {path.name}: {reason[-1] if reason else ''}"
        )
    if done.returncode < 0:
        try:
            what = signal.Signals(-done.returncode).name
        except ValueError:
            what = f"signal {-done.returncode}"
        raise VariantRejected(
            f"variant {variant}: the LiteRT interpreter crashed ({what}) on {path.name} "
            "in a probe process; the agent does not open it"
        )
    raise VariantRejected(
        f"variant {variant}: the probe process for {path.name} failed "
        f"(exit {done.returncode}): {reason[-1] if reason else ''}"
    )


def _open(lite: Any, path: Path, variant: str, threads: int, opts: RuntimeOptions) -> Any:
    delegates = []
    if opts.delegate is not None:
        library = opts.delegate.library
        try:
            delegates.append(lite.load_delegate(library, dict(opts.delegate.options)))
        except (ValueError, RuntimeError, OSError) as exc:
            raise VariantRejected(
                f"variant {variant}: delegate {library} cannot load: {_describe(exc)}"
            ) from exc
    resolver = (
        lite.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        if opts.xnnpack is False
        else lite.OpResolverType.AUTO
    )
    try:
        interpreter = lite.Interpreter(
            model_path=str(path),
            num_threads=threads,
            experimental_delegates=delegates or None,
            experimental_op_resolver_type=resolver,
        )
        interpreter.allocate_tensors()
    except Exception as exc:  # LiteRT raises ValueError/RuntimeError with its reason
        raise VariantRejected(
            f"variant {variant}: LiteRT cannot load {path.name}: {_describe(exc)}"
        ) from exc
    return interpreter


def _check_delegate_library(library: str, path: Path, variant: str) -> None:
    """Reject a delegate shipped with the model, one the loader cannot find, or one that is
    no LiteRT delegate, before LiteRT tries it (its Delegate object fails untidily when the
    library is missing)."""
    if library.startswith("/") and path.parent.resolve() in Path(library).resolve().parents:
        raise VariantRejected(
            f"variant {variant}: delegate {library} lies in the model's folder; a delegate "
            "must be installed on the board, not pushed with a model"
        )
    try:
        handle = ctypes.CDLL(library)
    except OSError as exc:
        raise VariantRejected(
            f"variant {variant}: delegate {library} cannot load: {_describe(exc)}"
        ) from exc
    if not hasattr(handle, "tflite_plugin_create_delegate"):
        raise VariantRejected(
            f"variant {variant}: {library} is not a LiteRT delegate "
            "(it has no tflite_plugin_create_delegate)"
        )


def _signature(interpreter: Any) -> str | None:
    """The signature served: serving_default, else the only one; None for plain tensors."""
    keys = sorted(interpreter.get_signature_list())
    if not keys:
        return None
    return DEFAULT_SIGNATURE if DEFAULT_SIGNATURE in keys else keys[0]


def _tensors(
    interpreter: Any, signature: str | None, variant: str, *, float_io: bool
) -> tuple[list[_Tensor], list[_Tensor]]:
    if signature is not None:
        runner = interpreter.get_signature_runner(signature)
        ins = list(runner.get_input_details().items())
        outs = list(runner.get_output_details().items())
    else:
        ins = [(d["name"], d) for d in interpreter.get_input_details()]
        outs = [(d["name"], d) for d in interpreter.get_output_details()]
    return (
        [_tensor(n, d, variant, float_io) for n, d in ins],
        [_tensor(n, d, variant, float_io) for n, d in outs],
    )


def _tensor(name: str, details: Mapping[str, Any], variant: str, float_io: bool) -> _Tensor:
    dtype = np.dtype(details["dtype"])
    signature = details.get("shape_signature")
    dims = signature if signature is not None and len(signature) else details["shape"]
    affine = None
    if float_io and dtype in _QUANTIZED:
        params = details["quantization_parameters"]
        scales, zero_points = params["scales"], params["zero_points"]
        if len(scales) != 1:
            raise VariantRejected(
                f"variant {variant}: float_io needs per-tensor quantization, tensor {name} "
                f"has {len(scales)} scales"
            )
        if not float(scales[0]) > 0.0:
            raise VariantRejected(
                f"variant {variant}: float_io: tensor {name} is {dtype} without a scale"
            )
        affine = _Affine(float(scales[0]), int(zero_points[0]), dtype)
    return _Tensor(name, int(details["index"]), dtype, tuple(int(d) for d in dims), affine)


def _spec(tensor: _Tensor) -> TensorSpec:
    try:
        datatype = "FP32" if tensor.affine else datatype_of(np.empty(0, tensor.dtype))
    except ValueError as exc:
        raise VariantRejected(
            f"tensor {tensor.name} has type {tensor.dtype}, which is not served"
        ) from exc
    shape = tuple(d if d >= 0 else -1 for d in tensor.shape)
    return TensorSpec.model_validate({"name": tensor.name, "datatype": datatype, "shape": shape})


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:1000] if text else type(exc).__name__

