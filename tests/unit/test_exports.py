"""The public facade: exactly these names, each importable; changing it is an API change."""

from __future__ import annotations

import pubsub_canary

EXPECTED = {
    "KafkaMember", "StatefulKafkaMember", "PubSubMember", "Record", "PartitionState", "RetryPolicy",
    "PoisonMessage", "RolloutSpec", "AnalysisPolicy", "load_rollout_spec", "rollout_json_schema",
    "CanaryError", "ConfigError", "ConflictError", "NotFound", "TransitionError", "BrokerError",
    "CoordinatorUnavailable", "LeaseExpired", "__version__",
}  # fmt: skip


def test_public_names_are_pinned() -> None:
    assert set(pubsub_canary.__all__) == EXPECTED
    for name in pubsub_canary.__all__:
        assert getattr(pubsub_canary, name) is not None


def test_every_error_inherits_the_root() -> None:
    from pubsub_canary import errors

    for name in dir(errors):
        obj = getattr(errors, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, Exception)
            and obj.__module__ == errors.__name__
        ):
            assert issubclass(obj, pubsub_canary.CanaryError), name
