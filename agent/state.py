"""What the agent remembers across restarts: the pinned variant and the last known good
variant of each model.

One small JSON file, `state.json`, in the state directory (systemd's StateDirectory=). It is
replaced atomically (temporary file, fsync, rename, fsync of the directory), so a power
cut leaves either the old state or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.manifest import Name

log = structlog.get_logger(__name__)

STATE_FILE = "state.json"


class ModelState(BaseModel):
    """One model's remembered choices."""

    model_config = ConfigDict(extra="forbid")

    pinned: Name | None = Field(None, description="Variant an operator pinned.")
    last_good: Name | None = Field(None, description="Variant that last loaded and served.")


class SavedState(BaseModel):
    """The whole state file."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = Field(1, description="State file format version.")
    models: dict[str, ModelState] = Field(default_factory=dict)


class StateStore:
    """The state file: read once at start, rewritten on every change (changes are rare)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._state = SavedState()
        self._lock = threading.Lock()

    @property
    def path(self) -> Path | None:
        return self.directory / STATE_FILE if self.directory is not None else None

    @property
    def persistent(self) -> bool:
        return self.directory is not None

    def load(self) -> None:
        """Read the state file; a missing one is a first start, an unreadable one is kept
        aside (as state.json.corrupt) and the agent starts afresh."""
        path = self.path
        if path is None:
            log.info("state_not_persisted", reason="no state directory configured")
            return
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            log.info("state_fresh", path=str(path))
            return
        except OSError as exc:
            log.error("state_unreadable", path=str(path), error=exc.strerror)
            return
        try:
            state = SavedState.model_validate_json(raw)
        except ValidationError as exc:
            aside = path.with_name(f"{STATE_FILE}.corrupt")
            with contextlib.suppress(OSError):
                os.replace(path, aside)
            log.error("state_invalid", path=str(path), kept_as=str(aside), error=str(exc))
            return
        with self._lock:
            self._state = state
        log.info("state_restored", path=str(path), models=self.describe())

    def describe(self) -> dict[str, dict[str, str | None]]:
        with self._lock:
            return {name: m.model_dump() for name, m in sorted(self._state.models.items())}

    def pinned(self, model: str) -> str | None:
        with self._lock:
            entry = self._state.models.get(model)
            return entry.pinned if entry else None

    def last_good(self, model: str) -> str | None:
        with self._lock:
            entry = self._state.models.get(model)
            return entry.last_good if entry else None

    def preferred(self, model: str) -> str | None:
        """The variant to load first at start: the pin, else the last known good one."""
        return self.pinned(model) or self.last_good(model)

    def pin(self, model: str, variant: str) -> None:
        self._update(model, pinned=variant)

    def unpin(self, model: str) -> bool:
        """Forget the pin; False when there was none."""
        if self.pinned(model) is None:
            return False
        self._update(model, pinned=None)
        return True

    def record_good(self, model: str, variant: str) -> None:
        if self.last_good(model) != variant:
            self._update(model, last_good=variant)

    def _update(self, model: str, **changes: str | None) -> None:
        with self._lock:
            entry = self._state.models.get(model, ModelState())
            self._state.models[model] = entry.model_copy(update=changes)
            payload = self._state.model_dump_json(indent=2) + "\n"
            self._save(payload)

    def _save(self, payload: str) -> None:
        path = self.path
        if path is None or self.directory is None:
            return
        start = time.monotonic()
        tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tmp.open("w") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            # The rename itself is only durable once the directory entry is on disk.
            directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except OSError as exc:
            # Serving goes on; only the memory of this change is at risk.
            log.error("state_not_saved", path=str(path), error=exc.strerror)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        log.debug("state_saved", path=str(path), ms=round((time.monotonic() - start) * 1000, 2))
