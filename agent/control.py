"""Control commands (`<prefix>/<device>/control/<command>`): what they do, without MQTT.

Each command takes the decoded JSON body of the request and returns the JSON body of the
reply, or raises an `EdgeAgentError` that the transport turns into an error reply. The
shared-memory commands also take the requester's user (the topic's last level, which the
broker's ACL enforces): each user sees and uses only the regions it registered.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.errors import InvalidRequest, ModelNotFound, SharedMemoryError
from agent.models import ModelManager
from agent.protocol import MAX_SHARED_BYTES
from agent.shm import SharedMemoryRegistry, region_name
from agent.state import StateStore

if TYPE_CHECKING:
    from agent.adapt.loop import Adapter

Command = Callable[[dict[str, Any]], dict[str, Any]]
OwnedCommand = Callable[[dict[str, Any], str | None], dict[str, Any]]

# How long control/adapt waits for an adapter that the agent is still starting.
ADAPTER_WAIT_S = 10.0


class ControlCommands:
    """The commands an operator (or a fleet manager) can send to the device."""

    def __init__(
        self,
        manager: ModelManager,
        state: StateStore | None = None,
        shared_memory: SharedMemoryRegistry | None = None,
    ) -> None:
        self._manager = manager
        self._commands: dict[str, Command] = {"models": self.models, "adapt": self.adapt}
        self.shared_memory = shared_memory
        self._owned: dict[str, OwnedCommand] = {}
        if shared_memory is not None:
            self._owned.update(
                shm_register=self.shm_register,
                shm_unregister=self.shm_unregister,
                shm_status=self.shm_status,
            )
        # Set by the agent when the policy runs (adapt.enabled).
        self._adapter: Adapter | None = None
        self._adapter_set = threading.Event()
        self._adapter_set.set()  # none is expected until expect_adapter()
        self._state = state
        if state is not None:
            self._commands.update(pin=self.pin, unpin=self.unpin)

    @property
    def adapter(self) -> Adapter | None:
        return self._adapter

    @adapter.setter
    def adapter(self, adapter: Adapter | None) -> None:
        self._adapter = adapter
        self._adapter_set.set()

    def expect_adapter(self) -> None:
        """The policy runs but its adapter comes a moment later (the agent starts it once
        it serves): until it is set, control/adapt waits for it instead of answering that
        adapting is off."""
        self._adapter_set.clear()

    @property
    def names(self) -> list[str]:
        return sorted([*self._commands, *self._owned])

    def handle(self, command: str, body: dict[str, Any], user: str | None = None) -> dict[str, Any]:
        """Run `command` for `user`; unknown commands and bad bodies raise InvalidRequest."""
        if command in self._owned:
            return self._owned[command](body, user)
        try:
            run = self._commands[command]
        except KeyError:
            raise InvalidRequest(
                f"unknown control command {command!r}; known: {self.names}"
            ) from None
        return run(body)

    def models(self, body: dict[str, Any]) -> dict[str, Any]:
        """Every loaded model (or the one named in `model`): variants, signature, active."""
        name = body.get("model")
        if name is None:
            return {"models": self._manager.describe()}
        if not isinstance(name, str):
            raise InvalidRequest("'model' must be a string")
        if name not in self._manager.names():
            raise ModelNotFound(f"model {name!r} is not loaded")
        return {"models": {name: self._manager.get(name).describe()}}

    def adapt(self, body: dict[str, Any]) -> dict[str, Any]:
        """The policy's view: per model the active and desired variant, the reason, the
        figures behind it, the time since the last swap and each variant's predicted p95
        (or only the model named in `model`)."""
        self._adapter_set.wait(ADAPTER_WAIT_S)
        if self.adapter is None:
            return {"enabled": False, "models": {}}
        view = self.adapter.view()
        name = body.get("model")
        if name is not None:
            if not isinstance(name, str):
                raise InvalidRequest("'model' must be a string")
            if name not in view["models"]:
                raise ModelNotFound(f"model {name!r} is not loaded")
            view["models"] = {name: view["models"][name]}
        return view

    # --- Pins: an operator fixes a model's variant; remembered across restarts ---

    def pin(self, body: dict[str, Any]) -> dict[str, Any]:
        """Switch `model` to `variant` and keep it there (also after a restart)."""
        assert self._state is not None  # registered only with a state store
        name, variant = _string(body, "model"), _string(body, "variant")
        # Under the model's lock: a reload cannot slip between the switch and the record.
        with self._manager.owner(name):
            served = self._manager.switch(name, variant, reason="pinned")
            self._state.pin(name, variant)
        return {"model": name, "pinned": variant, "active": served.active_name}

    def unpin(self, body: dict[str, Any]) -> dict[str, Any]:
        """Forget the pin of `model`; the active variant stays until something changes it."""
        assert self._state is not None
        name = _string(body, "model")
        served = self._manager.get(name)
        was_pinned = self._state.unpin(name)
        return {
            "model": name,
            "pinned": None,
            "was_pinned": was_pinned,
            "active": served.active_name,
        }

    # --- Shared-memory regions (Triton's system shared-memory extension) ---

    def shm_register(self, body: dict[str, Any], user: str | None) -> dict[str, Any]:
        """Register region `name`: `byte_size` bytes from `offset` (0) of the shared-memory
        object `key` (as shm_open names it, `/input0`)."""
        assert self.shared_memory is not None  # registered only with a registry
        name = region_name(body, required=True)
        assert name is not None
        unknown = set(body) - {"name", "key", "offset", "byte_size"}
        if unknown:
            raise SharedMemoryError(f"unknown fields {sorted(unknown)[:8]}")
        offset, byte_size = body.get("offset", 0), body.get("byte_size")
        if type(offset) is not int or not 0 <= offset <= MAX_SHARED_BYTES:
            raise SharedMemoryError(f"'offset' must be an integer from 0 to {MAX_SHARED_BYTES}")
        if type(byte_size) is not int or not 0 < byte_size <= MAX_SHARED_BYTES:
            raise SharedMemoryError(f"'byte_size' must be an integer from 1 to {MAX_SHARED_BYTES}")
        key = body.get("key")
        if not isinstance(key, str):
            raise SharedMemoryError("'key' must be a string: the shared-memory object's name")
        region = self.shared_memory.register(name, key, offset, byte_size, user)
        return {"registered": region.status()}

    def shm_unregister(self, body: dict[str, Any], user: str | None) -> dict[str, Any]:
        """Unregister region `name`, or every region of the user without one. A name not
        registered is no error (as in Triton): the reply lists what was dropped."""
        assert self.shared_memory is not None
        name = region_name(body, required=False)
        return {"unregistered": self.shared_memory.unregister(name, user)}

    def shm_status(self, body: dict[str, Any], user: str | None) -> dict[str, Any]:
        """The user's regions (or region `name`): name, key, offset, byte_size."""
        assert self.shared_memory is not None
        name = region_name(body, required=False)
        return {"regions": self.shared_memory.status(name, user)}


def _string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{key!r} must be a non-empty string")
    return value
