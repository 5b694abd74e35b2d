"""The data plane: decode a request, check it, submit it, encode the reply, map failures.

It knows payload bytes, the Open Inference Protocol and the model manager, never the
transport: the MQTT front end hands it a payload and a function to answer with, and sends
whatever `Response` it gets back. Every failure, of any kind, becomes an error `Response`.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import structlog

from agent.batching import Completed, Outcome
from agent.errors import (
    EdgeAgentError,
    InferenceError,
    Overloaded,
    PayloadTooLarge,
    RequestExpired,
)
from agent.models import ModelManager
from agent.protocol import (
    MAX_ERROR_CHARS,
    InferenceRequest,
    RequestError,
    decode_request,
    encode_error,
    encode_response,
)
from agent.shm import SharedMemoryRegistry, attach

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Response:
    """A reply ready to send: its payload, JSON header length (binary tails) and code."""

    payload: bytes
    header_length: int | None
    code: int = 200


Respond = Callable[[Response], None]


def error_response(
    error: BaseException, request_id: str | int | None = None, model: str | None = None
) -> Response:
    """The error reply for `error`: its code and message, or a 500 that echoes nothing.

    Anything that is not an EdgeAgentError is a bug or an unforeseen input: the client
    learns only its type, the log gets the rest.
    """
    if isinstance(error, EdgeAgentError):
        code, message = error.code, str(error)
    elif isinstance(error, RecursionError):
        code, message = 400, "the request is nested too deeply"
    else:
        code, message = 500, f"internal error ({type(error).__name__}); see the agent's log"
    return Response(encode_error(message[:MAX_ERROR_CHARS], code, request_id, model), None, code)


class DataPlane:
    """Decodes requests, hands them to the model manager and encodes what comes back."""

    def __init__(
        self,
        manager: ModelManager,
        max_payload_bytes: int,
        shared_memory: SharedMemoryRegistry | None = None,
    ) -> None:
        self._manager = manager
        self._max_payload = max_payload_bytes
        self._shared_memory = shared_memory

    def decode(
        self, payload: bytes | bytearray, header_length: int | None, owner: str | None = None
    ) -> InferenceRequest:
        """The request in `payload`; RequestError (with what is known of its address) if not.

        Inputs in shared memory are read from `owner`'s regions (agent/shm.py).

        Only RequestError and PayloadTooLarge leave: any other failure while decoding a
        hostile payload is turned into a RequestError too.
        """
        if len(payload) > self._max_payload:
            raise PayloadTooLarge(
                f"payload of {len(payload)} bytes exceeds the limit of {self._max_payload}"
            )
        try:
            request = decode_request(payload, header_length)
        except RequestError:
            raise
        except Exception as exc:  # a decoder gap must still give its client an answer
            log.warning(
                "request_undecodable", error=type(exc).__name__, detail=str(exc)[:MAX_ERROR_CHARS]
            )
            raise RequestError(f"cannot decode the request ({type(exc).__name__})") from None
        if request.uses_shared_memory:
            attach(self._shared_memory, request, owner)
        _strings_as_text(request)
        return request

    def infer(
        self,
        model: str,
        request: InferenceRequest,
        respond: Respond,
        *,
        deadline: float | None = None,
        reply_limit: int | None = None,
        received: float | None = None,
    ) -> None:
        """Run `request` on `model`; `respond` gets its Response exactly once.

        It is not called for a request whose deadline passed in the queue (its client gave
        up). A reply larger than `reply_limit` bytes is answered with a 413 instead.
        """
        start = time.monotonic() if received is None else received
        once = _Once(respond)
        try:
            self._manager.submit(
                model, request, self._on_outcome(model, request, once, reply_limit, start), deadline
            )
        except Exception as exc:  # any failure of the hand-off is still answered
            if not isinstance(exc, EdgeAgentError):
                log.exception("submit_failed", model=model)
            once(error_response(exc, request.id, model))

    def _on_outcome(
        self,
        model: str,
        request: InferenceRequest,
        respond: _Once,
        reply_limit: int | None,
        received: float,
    ) -> Callable[[Outcome], None]:
        binary = {o.name: o.binary for o in request.outputs or ()}
        default_binary = request.binary_output

        def done(outcome: Outcome) -> None:
            if isinstance(outcome, RequestExpired):
                respond.cancel()
                log.info("request_expired", model=model, id=request.id)
                return
            if not isinstance(outcome, Completed):
                respond(error_response(outcome, request.id, model))
                return
            parameters = {
                "queue_ms": round(outcome.queue_ms, 3),
                "inference_ms": round(outcome.infer_ms, 3),
                "total_ms": round((time.monotonic() - received) * 1000.0, 3),
                "batch_size": outcome.batch_size,
            }
            tensors = [
                (name, array, binary.get(name, default_binary))
                for name, array in outcome.outputs.items()
            ]
            placed = None
            if request.shared_memory is not None:
                try:
                    placed = request.shared_memory.write(outcome.outputs)
                except EdgeAgentError as exc:  # the region is gone, too small, read-only
                    respond(error_response(exc, request.id, model))
                    return
            try:
                payload, header_length = encode_response(
                    model, outcome.variant, request.id, tensors, parameters, placed
                )
            except Exception as exc:  # an output the protocol cannot carry
                log.warning("reply_unencodable", model=model, error=str(exc)[:MAX_ERROR_CHARS])
                error = InferenceError(f"cannot encode the outputs: {exc}")
                respond(error_response(error, request.id, model))
                return
            if reply_limit is not None and len(payload) > reply_limit:
                too_large = PayloadTooLarge(
                    f"the reply of {len(payload)} bytes exceeds the {reply_limit} bytes the "
                    "broker accepts in one message; ask for binary outputs or fewer outputs"
                )
                respond(error_response(too_large, request.id, model))
                return
            respond(Response(payload, header_length))

        return done


class _Once:
    """Calls `respond` at most once, whatever path the outcome takes."""

    __slots__ = ("_done", "_lock", "_respond")

    def __init__(self, respond: Respond) -> None:
        self._respond = respond
        self._done = False
        self._lock = threading.Lock()

    def cancel(self) -> None:
        with self._lock:
            self._done = True

    def __call__(self, response: Response) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._respond(response)


def _strings_as_text(request: InferenceRequest) -> None:
    """BYTES inputs as Python str: onnxruntime turns a bytes element into its repr."""
    for name, datatype in request.datatypes.items():
        if datatype != "BYTES":
            continue
        array = request.inputs[name]
        texts = np.empty(array.size, dtype=object)
        try:
            texts[:] = [item.decode("utf-8") for item in array.reshape(-1)]
        except UnicodeDecodeError:
            raise RequestError(
                f"input {name!r}: a BYTES element is not UTF-8 text (string models take text)"
            ) from None
        request.inputs[name] = texts.reshape(array.shape)


class DecodeBacklog:
    """Threads that decode large requests off the network thread, bounded by bytes.

    `offer` never blocks: when the bytes waiting would pass the bound, it returns False
    and the caller answers 503 at once, so an agent that is behind sheds load instead of
    falling behind without bound.
    """

    def __init__(self, workers: int, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._waiting = 0
        self._jobs: collections.deque[tuple[int, Callable[[], None]]] = collections.deque()
        self._ready = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"decode-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def waiting_bytes(self) -> int:
        return self._waiting

    def offer(self, size: int, job: Callable[[], None]) -> bool:
        """Queue `job` (decoding `size` bytes); False when the backlog is full or closed."""
        with self._ready:
            if self._closed or (self._waiting and self._waiting + size > self._max_bytes):
                return False
            self._waiting += size
            self._jobs.append((size, job))
            self._ready.notify()
        return True

    def close(self, timeout: float) -> None:
        """Finish what is queued, then stop the threads."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._jobs and not self._closed:
                    self._ready.wait()
                if not self._jobs:
                    return
                size, job = self._jobs.popleft()
            try:
                job()
            except Exception:  # a failing job must not end the worker
                log.exception("decode_job_failed")
            finally:
                with self._ready:
                    self._waiting -= size


def overloaded(what: str) -> Overloaded:
    """The 503 for a request shed because the agent is behind."""
    return Overloaded(f"the agent is behind on {what}; retry later or elsewhere")


__all__ = [
    "DataPlane",
    "DecodeBacklog",
    "Respond",
    "Response",
    "error_response",
    "overloaded",
]
