"""A variant in service: its runtime session, the leases of the batches running on it, and
its release once it is retired and the last of them is done.

A worker takes a lease for the duration of one batch. A swap retires the old variant after
switching the reference; the old session is closed when its last lease ends (at once when
none is held), so that in-flight requests finish on the variant they started on and the
memory comes back without waiting for the garbage collector.
"""

from __future__ import annotations

import threading
import time

import structlog

from agent.manifest import Variant
from agent.runtime import Runtime

log = structlog.get_logger(__name__)


class VariantHandle:
    """One loaded variant of a model, shared by the batches that hold a lease on it."""

    def __init__(
        self, runtime: Runtime, variant: Variant, rss_added_mb: float | None
    ) -> None:
        self.runtime = runtime
        self.variant = variant
        self.name = variant.name
        self.rss_added_mb = rss_added_mb
        """Resident memory the process gained while loading and warming it up (measured)."""
        self.loaded_at = time.monotonic()
        self._lock = threading.Lock()
        self._leases = 0
        self._retired = False
        self._closed = False
        self._drained = threading.Event()

    @property
    def leases(self) -> int:
        return self._leases

    @property
    def retired(self) -> bool:
        return self._retired

    @property
    def closed(self) -> bool:
        return self._closed

    def take(self) -> None:
        """A batch starts on this variant. Callers take leases only on the active variant,
        under their model's lock, so a retired variant never gains a lease."""
        with self._lock:
            self._leases += 1

    def release(self) -> None:
        """A batch on this variant is done; the last one out of a retired variant closes it."""
        with self._lock:
            self._leases -= 1
            last = self._retired and self._leases == 0
        if last:
            self._close()

    def retire(self) -> None:
        """No new batch will start here; close once the running ones are done."""
        with self._lock:
            self._retired = True
            idle = self._leases == 0
        if idle:
            self._close()

    def wait_drained(self, timeout: float) -> bool:
        """Wait until retired and closed; False when leases are still held after `timeout`."""
        return self._drained.wait(timeout)

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.runtime.close()
        self._drained.set()
        log.debug("variant_released", variant=self.name)
