"""Watches the model directory, so that a pushed, replaced or removed model is picked up
without a restart.

Pushes are often not atomic (scp and rsync write in chunks, and may pause between files):
an entry is acted on once it has been quiet for `settle_s` and looks complete — a folder
when its manifest parses and every variant file it lists is there with the manifest's
sha256; a bare .onnx file when it stopped changing. A rename into place is complete at
once. Past `max_wait_s` an entry is acted on anyway, so that a broken push is reported
(as a rejection) instead of being waited for forever. Entries whose name starts with a dot
are staging areas and are never looked at.

This thread only notices and settles: it reads nothing but regular files (a FIFO manifest
would block it for good), and `on_change` must hand the loading to a thread of its own.
"""

from __future__ import annotations

import contextlib
import json
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from watchdog.events import (
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_OPENED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from agent.files import RefusedFile, read_regular
from agent.manifest import MANIFEST_FILE
from agent.repository import MAX_MANIFEST_BYTES, sha256_of

log = structlog.get_logger(__name__)

# Reading a model (hashing it, onnxruntime opening it) must not look like a change.
_READS = frozenset({EVENT_TYPE_OPENED, EVENT_TYPE_CLOSED_NO_WRITE})


class ModelWatcher:
    """Calls `on_change(entries)` when entries of the model directory have settled."""

    def __init__(
        self,
        directory: Path,
        on_change: Callable[[set[str]], None],
        *,
        settle_s: float = 1.0,
        max_wait_s: float = 120.0,
    ) -> None:
        self._directory = directory
        self._on_change = on_change
        self._settle_s = settle_s
        self._max_wait_s = max_wait_s
        self._lock = threading.Lock()
        # entry name -> (first event, last event, last completeness check), monotonic
        self._pending: dict[str, tuple[float, float, float]] = {}
        self._waiting_for: dict[str, str] = {}  # entry -> why it is incomplete, as last logged
        self._wake = threading.Event()
        self._stopping = False
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._thread = threading.Thread(target=self._settle_loop, name="model-watcher", daemon=True)

    def start(self) -> bool:
        """Start watching; False (and a log line) when the directory cannot be watched."""
        if not self._directory.is_dir():
            log.warning(
                "models_not_watched", directory=str(self._directory), reason="not a directory"
            )
            return False
        observer = Observer()
        observer.schedule(_Handler(self), str(self._directory), recursive=True)
        try:
            observer.start()
        except OSError as exc:  # inotify watch limit reached, for one
            log.warning("models_not_watched", directory=str(self._directory), reason=str(exc))
            return False
        self._observer = observer
        self._thread.start()
        log.info("models_watched", directory=str(self._directory), settle_s=self._settle_s)
        return True

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
        if self._thread.is_alive():
            self._thread.join(5)

    def unsettled(self) -> set[str]:
        """Entries changed lately that have not been handed to `on_change` yet."""
        with self._lock:
            return set(self._pending)

    def touched(self, path: str) -> None:
        """Something changed at `path`: note which top-level entry it belongs to."""
        try:
            relative = Path(path).relative_to(self._directory)
        except ValueError:
            return
        if not relative.parts or relative.parts[0].startswith("."):
            return
        entry = relative.parts[0]
        now = time.monotonic()
        with self._lock:
            first, _, checked = self._pending.get(entry, (now, now, 0.0))
            self._pending[entry] = (first, now, checked)
        self._wake.set()

    def _settle_loop(self) -> None:
        while not self._stopping:
            self._wake.wait(self._settle_s / 4)
            self._wake.clear()
            ready = self._settled()
            if ready and not self._stopping:
                try:
                    self._on_change(ready)
                except Exception:  # a failed reload must not end the watching
                    log.exception("models_reload_failed", entries=sorted(ready))

    def _settled(self) -> set[str]:
        now = time.monotonic()
        with self._lock:
            quiet = {
                entry: times
                for entry, times in self._pending.items()
                if now - times[1] >= self._settle_s and now - times[2] >= self._settle_s
            }
        ready = set()
        for entry, (first, last, _) in quiet.items():
            complete, why = _complete(self._directory / entry)
            overdue = now - first >= self._max_wait_s
            with self._lock:
                if self._pending.get(entry, (0.0, 0.0, 0.0))[1] != last:
                    continue  # touched again while we looked
                if complete or overdue:
                    del self._pending[entry]
                    ready.add(entry)
                    if not complete:
                        log.warning(
                            "model_push_incomplete",
                            entry=entry,
                            reason=why,
                            waited_s=round(now - first, 1),
                        )
                else:
                    self._pending[entry] = (first, last, now)
                    if self._waiting_for.get(entry) != why:  # once per reason, not per look
                        self._waiting_for[entry] = why
                        log.info("model_push_waiting", entry=entry, reason=why)
                if entry not in self._pending:
                    self._waiting_for.pop(entry, None)
        return ready


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: ModelWatcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _READS:
            return
        self._watcher.touched(str(event.src_path))
        if event.dest_path:
            self._watcher.touched(str(event.dest_path))


def _complete(path: Path) -> tuple[bool, str]:
    """Whether a pushed entry looks whole, and if not, why."""
    if not path.exists() or not path.is_dir():
        return True, ""  # removed, or a bare file that has stopped changing
    manifest = path / MANIFEST_FILE
    try:
        data = json.loads(read_regular(manifest, MAX_MANIFEST_BYTES))
    except RefusedFile:
        return True, ""  # a FIFO, a device, too large: never readable, loading will say why
    except OSError:
        return False, f"no readable {MANIFEST_FILE} yet"
    except ValueError:
        return False, f"{MANIFEST_FILE} is not valid JSON yet"
    variants = data.get("variants") if isinstance(data, dict) else None
    if not isinstance(variants, list):
        return True, ""  # malformed for good: loading will say why
    missing = _first_unfinished(path, variants)
    return missing is None, missing or ""


def _first_unfinished(folder: Path, variants: list[object]) -> str | None:
    """Why the first variant file that is not there (or not whole) yet is not, or None."""
    root = folder.parent.resolve()  # the model directory
    for variant in variants:
        if not isinstance(variant, dict) or not isinstance(variant.get("file"), str):
            continue
        file = folder / variant["file"]
        try:
            info = file.stat()
        except OSError:
            return f"{variant['file']} is not there yet"
        if not stat.S_ISREG(info.st_mode):
            continue  # a FIFO or a device will not become a model: loading rejects it
        if root not in file.resolve().parents:
            continue  # a link out of the model directory: loading rejects it, unread
        size = variant.get("size_bytes")
        if isinstance(size, int) and size > 0:
            # Copies grow until whole: the size says it without reading the file, which
            # loading will hash anyway.
            if info.st_size != size:
                return f"{variant['file']} does not have its {size} bytes yet"
            continue
        expected = variant.get("sha256")
        if isinstance(expected, str):
            with contextlib.suppress(OSError):
                if sha256_of(file) != expected:
                    return f"{variant['file']} does not match its sha256 yet"
    return None
