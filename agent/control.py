"""Control commands (`<prefix>/<device>/control/<command>`): what they do, without MQTT.

Each command takes the decoded JSON body of the request and returns the JSON body of the
reply, or raises an `EdgeAgentError` that the transport turns into an error reply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.errors import InvalidRequest, ModelNotFound
from agent.models import ModelManager

Command = Callable[[dict[str, Any]], dict[str, Any]]


class ControlCommands:
    """The commands an operator (or a fleet manager) can send to the device."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager
        self._commands: dict[str, Command] = {"models": self.models}

    @property
    def names(self) -> list[str]:
        return sorted(self._commands)

    def handle(self, command: str, body: dict[str, Any]) -> dict[str, Any]:
        """Run `command`; unknown commands and bad bodies raise InvalidRequest."""
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
