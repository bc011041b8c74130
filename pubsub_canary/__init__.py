"""pubsub-canary: canary rollouts for Kafka consumer groups and Pub/Sub subscriptions.

The public API is this facade; everything else is internal and may change. Members (the
library inside each consumer) and rollout files are what most users need::

    from pubsub_canary import KafkaMember, PoisonMessage

    def handle(record):
        ...

    KafkaMember(handle, coordinator="http://coordinator:8470", bootstrap_servers="kafka:9092",
                topic="orders", group_id="orders-consumer", cohort="canary", version="1.5.0").run()
"""

from pubsub_canary.client.kafka import KafkaMember
from pubsub_canary.client.processing import PoisonMessage, Record, RetryPolicy
from pubsub_canary.client.pubsub import PubSubMember
from pubsub_canary.client.state import PartitionState
from pubsub_canary.client.stateful import StatefulKafkaMember
from pubsub_canary.core.judge.policy import AnalysisPolicy
from pubsub_canary.core.model import RolloutSpec, load_rollout_spec, rollout_json_schema
from pubsub_canary.errors import (
    BrokerError,
    CanaryError,
    ConfigError,
    ConflictError,
    CoordinatorUnavailable,
    LeaseExpired,
    NotFound,
    TransitionError,
)

__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 - grouped by use, not sorted
    # Members: the library inside each consumer
    "KafkaMember",
    "StatefulKafkaMember",
    "PubSubMember",
    "Record",
    "PartitionState",
    "RetryPolicy",
    "PoisonMessage",
    # Rollout files
    "RolloutSpec",
    "AnalysisPolicy",
    "load_rollout_spec",
    "rollout_json_schema",
    # Errors
    "CanaryError",
    "ConfigError",
    "ConflictError",
    "NotFound",
    "TransitionError",
    "BrokerError",
    "CoordinatorUnavailable",
    "LeaseExpired",
    "__version__",
]
