"""The exceptions pubsub-canary raises.

Every exception inherits :class:`CanaryError`. Each area has a sub-root so callers can catch
what they can handle; retry code looks at the ``retriable`` class attribute rather than at
types. The coordinator maps these to HTTP status codes in one place
(``pubsub_canary.coordinator.api``).
"""

from __future__ import annotations

from typing import Any


class CanaryError(Exception):
    """Root of every error raised by pubsub-canary."""

    retriable: bool = False
    #: HTTP status the coordinator answers with when this error reaches the API.
    http_status: int = 500

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        #: Structured context (rollout, group, epoch, field, ...), shown to operators.
        self.fields = {k: v for k, v in fields.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"error": type(self).__name__, "message": self.message, **self.fields}


class ConfigError(CanaryError):
    """Bad input: a rollout file, a setting or a command-line value.

    The message names the field, the value and what is allowed; fix the input and retry.
    """

    http_status = 422


class BackendUnavailable(CanaryError):
    """A test backend (Kafka broker, Pub/Sub emulator, PostgreSQL) could not be started or reached.

    The message says which backend and what to do (install it, free the port, set the env var).
    """

    http_status = 503


class StoreError(CanaryError):
    """The coordinator's state store failed."""

    retriable = True
    http_status = 503


class VersionConflict(StoreError):
    """Someone else changed the record first; re-read it and apply the change again."""

    retriable = True
    http_status = 409


class NotFound(CanaryError):
    """The rollout, group or member named does not exist."""

    http_status = 404


class TransitionError(CanaryError):
    """The rollout cannot take this action in its current phase (for example approve with no gate).

    Nothing was changed; check ``rollout status`` and pick an action the phase allows.
    """

    http_status = 409


class ConflictError(CanaryError):
    """The request conflicts with what is running (for example a second rollout on a busy group)."""

    http_status = 409


class TransportError(CanaryError):
    """A member could not talk to the coordinator."""

    retriable = True
    http_status = 502


class CoordinatorUnavailable(TransportError):
    """The coordinator did not answer. The member keeps its lease until it expires, then stops."""


class LeaseExpired(TransportError):
    """This member's lease ran out; it stopped processing and must register again."""

    http_status = 410


class FencedError(CanaryError):
    """An instruction or acknowledgement carried a stale epoch; it was ignored."""

    http_status = 409


class BrokerError(CanaryError):
    """Kafka or Pub/Sub returned an error; ``retriable`` says whether trying again may help."""

    http_status = 502
