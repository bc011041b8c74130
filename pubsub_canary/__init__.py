"""pubsub-canary: canary rollouts for Kafka consumer groups and Pub/Sub subscriptions."""

from pubsub_canary.errors import CanaryError, ConfigError, TransitionError

__version__ = "0.1.0"

__all__ = [
    # errors
    "CanaryError",
    "ConfigError",
    "TransitionError",
    "__version__",
]
