"""Per-model request queue and workers, with adaptive batching.

Requests wait in a bounded queue (a full queue is an immediate `Overloaded`, never an
unbounded backlog). A batch runs under a lease on the model's active variant: a swap
switches the reference between batches and the old variant is released once its batches
are done; while a model has no active variant (a swap that must unload first), workers
wait and the requests stay queued.

Each worker takes the oldest request. When more are waiting and the variant's measured
profile says stacking pays at that size (agent/stacking.py), it adds the compatible ones
(up to `max_batch_size`, waiting `batch_delay` for more only where stacking has paid),
stacks them along dimension 0 and runs the model once; otherwise it runs the oldest alone
and leaves the rest queued, for itself or another worker. A failing batch is retried
request by request, so one bad request cannot fail its neighbours.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import structlog

from agent.errors import EdgeAgentError, InferenceError, ModelNotReady, Overloaded, RequestExpired
from agent.metrics import ModelStats
from agent.session import RunControl
from agent.stacking import StackingProfile
from agent.variant import VariantHandle

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Completed:
    """A finished request: which variant answered, its outputs and where the time went."""

    variant: str
    outputs: dict[str, np.ndarray]
    queue_ms: float
    infer_ms: float
    batch_size: int


Outcome = Completed | EdgeAgentError


@dataclass(slots=True, eq=False)
class Job:
    """One request waiting to run: validated feeds and whom to tell when it is done."""

    feeds: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    done: Callable[[Outcome], None]
    deadline: float | None = None  # monotonic; past it the client has given up
    enqueued: float = field(default_factory=time.monotonic)
    notified: bool = False
    ahead: int = 0
    """Requests that had to finish before this one could start, when it joined the queue:
    the backlog part of its wait (the rest is the time a worker took to take it up)."""

    def batch_key(self) -> tuple[object, ...]:
        """Jobs with equal keys can be stacked along dimension 0."""
        return (
            self.outputs,
            tuple(sorted((name, arr.shape[1:]) for name, arr in self.feeds.items())),
        )


INLINE_MAX_ROWS = 8
"""Requests with more rows than this always go to a worker."""
INLINE_EVIDENCE = 20
"""Small runs a model must have shown (on workers) before any request runs inline."""
INLINE_STRIKE = 10.0
"""An inline run that keeps the network thread busy (CPU time) this many times inline_max_ms
suspends inline runs for the model."""
INLINE_SUSPEND_S = 30.0
"""The first suspension; each further strike doubles it (a model whose cost depends on its
data blocks the network thread once per suspension at most, and ever more rarely)."""
INLINE_PROBE_EVERY = 16
"""One in this many requests that could run inline goes through the queue instead: under
load the next ones then queue behind it (see INLINE_QUIET_S); when idle, it costs one
hand-off in sixteen, which leaves the median alone."""
INLINE_QUIET_S = 0.05
"""Inline runs resume only once no request has queued behind another for this long. Under
load, the network thread running every model run itself is the bottleneck, and a worker
stacking what queued meanwhile serves more: measured, 1.0x the echo's throughput against
0.7x all inline, on the demo model with 64 in flight (back-to-back runs, load 10)."""
INLINE_RUNNER = "the MQTT thread (inline run)"


def _rows(job: Job) -> int:
    first = next(iter(job.feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


class _Stop:
    """Tells a worker to exit once the jobs queued before it are done."""


def _deadline_of(batch: Sequence[Job]) -> float | None:
    """How long a batch may wait for a variant: until its most patient client gives up."""
    deadlines = [job.deadline for job in batch]
    if any(d is None for d in deadlines):
        return None
    return max(d for d in deadlines if d is not None)


Lease = Callable[[float | None, bool], VariantHandle]
"""`lease(deadline, wait)`: a lease on the model's active variant, waiting (until the
monotonic `deadline`, or for good with None) while it has none; RequestExpired past it,
ModelNotReady when the model is closed or `wait` is False."""


class BatchingQueue:
    """The bounded queue and worker threads of one model."""

    def __init__(
        self,
        model: str,
        lease: Lease,
        stats: ModelStats,
        *,
        workers: int,
        max_queue: int,
        max_batch_size: int,
        batch_delay_s: float,
        batchable: bool,
        inline_max_ms: float = 0.0,
    ) -> None:
        self.model = model
        self._inline_max_ms = inline_max_ms
        self._recent_ms: float | None = None
        self._observed = 0
        self._strikes = 0
        self._inline_off_until = 0.0
        self._eligible = 0  # requests that could have run inline (for the probes)
        self._contended_at = float("-inf")  # when a request last queued behind another
        self._lease = lease
        self._stats = stats
        # Unbounded underneath: the bound is checked in submit(), under the same lock as
        # `_closed`, so that close() can always queue its stop markers behind the jobs.
        self._queue: queue.Queue[Job | _Stop] = queue.Queue()
        self._max_queue = max_queue
        self._intake = threading.Lock()
        self._max_batch = max_batch_size if batchable else 1
        self._delay = batch_delay_s
        self._profiles: dict[str, StackingProfile] = {}  # per variant name
        self._serving = ""  # the variant of the latest run: whose profile decides
        self._closed = False
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._running_since: dict[str, float] = {}  # worker name -> when its batch started
        self._local = threading.local()  # each worker's RunControl
        self._controls: list[RunControl] = []
        self._alarm: tuple[int, Callable[[], None]] | None = None
        self._threads = [
            threading.Thread(target=self._work, name=f"model-{model}-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting, not counting those running."""
        return max(0, self._queue.qsize() - (len(self._threads) if self._closed else 0))

    def watch_depth(self, depth: int, alarm: Callable[[], None]) -> None:
        """Call `alarm` for every request that joins `depth` or more waiting (0: never):
        the adapter's cue that the queue is swamping the model, not to wait for its next
        tick. It runs on the submitting thread: it must only set a flag."""
        self._alarm = (depth, alarm) if depth > 0 else None

    @property
    def workers(self) -> int:
        """Worker threads running batches of this model."""
        return len(self._threads)

    @property
    def busy(self) -> int:
        """Workers running a batch right now."""
        return self._busy

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, job: Job) -> None:
        """Queue a job, or raise Overloaded at once when the queue is full.

        Raises ModelNotReady once close() has begun: the caller then hands the job to the
        model's successor, or answers it.
        """
        with self._intake:
            if self._closed:
                raise ModelNotReady(f"model {self.model} is shutting down")
            waiting = self._queue.qsize()
            if waiting >= self._max_queue:
                self._stats.record_rejected()
                raise Overloaded(f"model {self.model}: {self._max_queue} requests already waiting")
            if waiting:  # it waits behind another: load (one at a time never does)
                self._contended_at = job.enqueued
            job.ahead = max(0, waiting + self._busy - len(self._threads) + 1)
            self._queue.put_nowait(job)
        self._stats.arrived(job.enqueued)
        alarm = self._alarm
        if alarm is not None and waiting + 1 >= alarm[0]:
            alarm[1]()

    def close(self, timeout: float) -> bool:
        """Stop taking jobs, finish the queued ones, stop the workers; False when they did
        not all stop within `timeout` (see abandon())."""
        with self._intake:
            if not self._closed:
                self._closed = True
                for _ in self._threads:
                    self._queue.put_nowait(_Stop())
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def abandon(self, error: EdgeAgentError) -> int:
        """Answer every job still queued with `error` (a stop past its bound); how many.

        Batches already running answer when they finish.
        """
        answered = 0
        with self._busy_lock:
            controls = list(self._controls)
        for control in controls:  # running batches stop between kernels, and say why
            control.cancel()
        stops = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Stop):
                stops += 1
            elif not item.notified:
                self._notify(item, error)
                answered += 1
        for _ in range(stops):  # the workers still need theirs, to end
            self._queue.put_nowait(_Stop())
        return answered

    def _work(self) -> None:
        control = RunControl()
        self._local.control = control
        with self._busy_lock:
            self._controls.append(control)
        while True:
            first = self._queue.get()
            if isinstance(first, _Stop):
                return
            batch, stop = self._gather(first)
            self._execute(batch)
            if stop:
                return

    def try_inline(self, job: Job) -> bool:
        """Run a small request on the calling thread when that is cheaper than a hand-off.

        Only when the model is idle (nothing queued, no worker busy, and no request found
        it busy lately), the request is small and the model's recent small runs took under
        `inline_max_ms`: handing such a request to a worker and its reply back to the
        network thread costs more than the inference itself. Everything else goes through
        the queue, and so does one in INLINE_PROBE_EVERY, to find out whether load came.
        """
        start = time.monotonic()
        if (
            self._observed < INLINE_EVIDENCE
            or start < self._inline_off_until
            or start - self._contended_at < INLINE_QUIET_S
            or self._recent_ms is None
            or self._recent_ms > self._inline_max_ms
            or self._busy
            or self._closed
            or not self._queue.empty()
            or _rows(job) > INLINE_MAX_ROWS
        ):
            return False
        self._eligible += 1
        if self._eligible % INLINE_PROBE_EVERY == 0:
            return False
        if job.deadline is not None and start > job.deadline:
            return False  # expired already: the queue's path says so and counts it
        cpu_start = time.thread_time()
        if not self._execute([job], who=INLINE_RUNNER, single=True):
            return False  # no active variant right now (a swap): the queue waits for one
        self._stats.arrived(start)
        # The network thread's own CPU time, not the wall clock: on a loaded machine a
        # fast run that was merely preempted must not turn inline runs off. (The calling
        # thread computes its share of every parallel kernel: a slow run still shows.)
        took_ms = (time.thread_time() - cpu_start) * 1000.0
        if took_ms > INLINE_STRIKE * self._inline_max_ms:
            # One large request, or a cost that depends on the data (a Loop, a search):
            # workers only for a while, and fresh evidence before inline runs again.
            suspend = INLINE_SUSPEND_S * 2.0 ** min(self._strikes, 10)
            self._strikes += 1
            self._inline_off_until = time.monotonic() + suspend
            self._observed = 0
            log.warning(
                "inline_suspended", model=self.model, cpu_ms=round(took_ms, 3), for_s=suspend
            )
        return True

    def _execute(self, batch: list[Job], who: str | None = None, single: bool = False) -> bool:
        """Run a batch under a lease; False (nothing run) when inline finds no variant."""
        name = who or f"worker {threading.current_thread().name}"
        try:
            # An inline run must not wait: the network thread is serving everyone.
            handle = self._lease(_deadline_of(batch), not single)
        except (ModelNotReady, RequestExpired) as exc:
            if single:
                return False
            for job in batch:
                if isinstance(exc, RequestExpired):
                    self._stats.record_expired()
                    self._notify(job, exc)
                else:
                    self._finish(job, exc)
            return True
        with self._busy_lock:
            self._busy += 1
            self._running_since[name] = time.monotonic()
        try:
            if single:  # an inline request: known live and alone
                self._run_one(handle, batch[0])
            else:
                self._run_batch(handle, batch)
        except Exception as exc:  # a bug here must not strand the batch or kill the worker
            log.exception("batch_failed", model=self.model, size=len(batch))
            for job in batch:
                if not job.notified:
                    self._finish(job, InferenceError(f"model {self.model}: {exc!r}"))
        finally:
            handle.release()
            with self._busy_lock:
                self._busy -= 1
                del self._running_since[name]
        return True

    def _observe(self, variant: str, infer_ms: float, rows: int) -> None:
        """Track what runs cost: by size for the stacking decision, small ones for inline.

        Wall time, not the worker's CPU time: onnxruntime spreads a batch over its intra-op
        threads, whose CPU the calling thread's clock does not see (measured, a 3x64x64 CNN
        looked twice as cheap per row stacked by that clock, and was slower)."""
        self._serving = variant
        self.profile(variant).observe(rows, infer_ms)
        if rows <= INLINE_MAX_ROWS:
            recent = self._recent_ms
            self._recent_ms = infer_ms if recent is None else 0.8 * recent + 0.2 * infer_ms
            self._observed += 1

    def stalled(self, longer_than: float) -> list[str]:
        """Workers that stopped answering: dead, or on one batch for over `longer_than` s."""
        if self._closed:
            return []
        now = time.monotonic()
        with self._busy_lock:
            running = dict(self._running_since)
        problems = [f"worker {t.name} has died" for t in self._threads if not t.is_alive()]
        problems += [
            f"{name} has been running one batch for {now - since:.0f} s"
            for name, since in sorted(running.items())
            if now - since > longer_than
        ]
        return problems

    def profile(self, variant: str) -> StackingProfile:
        """What stacking costs and saves on `variant`, as measured so far."""
        profile = self._profiles.get(variant)
        if profile is None:
            profile = self._profiles.setdefault(variant, StackingProfile())
        return profile

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """`first`, and the requests to stack with it when stacking pays (see module doc)."""
        batch = [first]
        if self._max_batch == 1:
            return batch, False
        profile = self.profile(self._serving)
        waiting = min(self._queue.qsize(), self._max_batch - 1)
        wait = self._delay > 0 and profile.pays_somewhere()
        rows = _rows(first)
        if not (waiting or wait) or not profile.choose(rows, rows * (1 + max(1, waiting))):
            return batch, False
        until = time.monotonic() + (self._delay if wait else 0.0)
        while len(batch) < self._max_batch:
            try:
                remaining = until - time.monotonic()
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else (self._queue.get_nowait())
                )
            except queue.Empty:
                break
            if isinstance(item, _Stop):
                return batch, True
            batch.append(item)
        return batch, False

    def _run_batch(self, handle: VariantHandle, jobs: list[Job]) -> None:
        now = time.monotonic()
        live: list[Job] = []
        for job in jobs:
            if job.deadline is not None and now > job.deadline:
                self._stats.record_expired()
                self._notify(job, RequestExpired(f"model {self.model}: expired while queued"))
            else:
                live.append(job)
        if len(live) == 1:  # the common case when traffic is light: nothing to group
            self._run_one(handle, live[0])
            return
        live = self._run_urgent(handle, live, now)
        groups: dict[tuple[object, ...], list[Job]] = {}
        for job in live:
            groups.setdefault(job.batch_key(), []).append(job)
        for group in groups.values():
            if len(group) == 1 or not self._run_stacked(handle, group):
                for job in group:
                    self._run_one(handle, job)

    def _run_urgent(self, handle: VariantHandle, jobs: list[Job], now: float) -> list[Job]:
        """Run alone, first, the jobs whose deadline the whole batch's run would miss; the
        others (to stack) are returned."""
        per_row = self.profile(handle.name).per_row_ms(sum(_rows(job) for job in jobs))
        if per_row is None or all(job.deadline is None for job in jobs):
            return jobs
        finish = now + per_row * sum(_rows(job) for job in jobs) / 1000.0
        urgent = [job for job in jobs if job.deadline is not None and job.deadline < finish]
        urgent.sort(key=lambda job: job.deadline or 0.0)
        for job in urgent:
            self._run_one(handle, job)
        return [job for job in jobs if job not in urgent]

    def _run_one(self, handle: VariantHandle, job: Job) -> None:
        variant = handle.runtime
        names = job.outputs or variant.output_names
        start = time.monotonic()
        try:
            results = variant.run(job.feeds, names, self._control())
        except InferenceError as exc:
            control = self._control()
            if control is not None and control.cancelled:
                self._finish(job, ModelNotReady(f"model {self.model}: stopping"))
            else:
                self._finish(job, exc)
            return
        end = time.monotonic()
        self._observe(handle.name, (end - start) * 1000.0, _rows(job))
        self._finish(
            job,
            Completed(
                variant=variant.name,
                outputs=dict(zip(names, results, strict=True)),
                queue_ms=(start - job.enqueued) * 1000.0,
                infer_ms=(end - start) * 1000.0,
                batch_size=1,
            ),
        )

    def _run_stacked(self, handle: VariantHandle, group: Sequence[Job]) -> bool:
        """Run a group as one batch; False when it must be retried job by job."""
        variant = handle.runtime
        names = group[0].outputs or variant.output_names
        rows = [_rows(job) for job in group]
        start = time.monotonic()
        feeds = {
            name: np.concatenate([job.feeds[name] for job in group], axis=0)
            for name in group[0].feeds
        }
        try:
            results = variant.run(feeds, names, self._control())
        except InferenceError:
            return False  # one of them is bad: isolate it by running each alone
        total = sum(rows)
        if any(result.ndim == 0 or result.shape[0] != total for result in results):
            log.warning("batching_disabled", model=self.model, reason="outputs not per row")
            self._max_batch = 1
            return False
        offsets = np.cumsum([0, *rows]).tolist()
        replies = [
            {n: r[lo:hi] for n, r in zip(names, results, strict=True)}
            for lo, hi in itertools.pairwise(offsets)
        ]
        end = time.monotonic()  # the stacking's own cost is part of what it must save
        self._observe(handle.name, (end - start) * 1000.0, total)
        for job, outputs in zip(group, replies, strict=True):
            self._finish(
                job,
                Completed(
                    variant=variant.name,
                    outputs=outputs,
                    queue_ms=(start - job.enqueued) * 1000.0,
                    infer_ms=(end - start) * 1000.0,
                    batch_size=len(group),
                ),
            )
        return True

    def _control(self) -> RunControl | None:
        """The calling worker's RunControl (None on the network thread: inline runs)."""
        control: RunControl | None = getattr(self._local, "control", None)
        return control

    def _finish(self, job: Job, outcome: Outcome) -> None:
        latency_ms = (time.monotonic() - job.enqueued) * 1000.0
        # Recorded before the reply: whoever holds a reply can read its figures.
        if isinstance(outcome, Completed):
            self._stats.record(
                latency_ms,
                ok=True,
                variant=outcome.variant,
                infer_ms=outcome.infer_ms,
                queue_ms=outcome.queue_ms,
                rows=_rows(job),
                ahead=job.ahead,
            )
        else:
            self._stats.record(latency_ms, ok=False)
        self._notify(job, outcome)

    def _notify(self, job: Job, outcome: Outcome) -> None:
        job.notified = True
        try:
            job.done(outcome)
        except Exception:  # a broken callback must not kill the worker serving everyone else
            log.exception("reply_callback_failed", model=self.model)
