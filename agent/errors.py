"""The agent's error hierarchy.

Every failure a client can cause or observe is one of these; the MQTT layer maps each to an
error reply with the `code` below (HTTP status numbers, as the Open Inference Protocol's REST
binding uses them), so callers can tell a bad request from an overloaded device.
"""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Base of every error the agent raises on purpose."""

    code = 500


class ConfigError(EdgeAgentError):
    """The configuration is invalid; the message names the key, the value and why."""


class ManifestError(EdgeAgentError):
    """A model folder's manifest.json is missing, unreadable or invalid."""


class VariantRejected(EdgeAgentError):
    """A variant cannot be served: missing file, wrong sha256, unsafe path or load failure."""


class InvalidRequest(EdgeAgentError):
    """The request cannot be decoded or does not match the model's signature."""

    code = 400


class PayloadTooLarge(InvalidRequest):
    """The request exceeds the configured payload limit."""

    code = 413


class SharedMemoryError(InvalidRequest):
    """A shared-memory region cannot be registered or used: unknown, out of bounds, gone."""


class ModelNotFound(EdgeAgentError):
    """No model of that name is loaded."""

    code = 404


class ModelNotReady(EdgeAgentError):
    """The model exists but has no variant that can serve right now."""

    code = 503


class Overloaded(EdgeAgentError):
    """The model's request queue is full; the caller should retry later or elsewhere."""

    code = 503


class RequestExpired(EdgeAgentError):
    """The request's MQTT 5 message expiry passed before it ran; its client has given up."""

    code = 504


class InferenceError(EdgeAgentError):
    """The runtime (onnxruntime or LiteRT) raised while running the model."""

    code = 500
