"""Test backends for pubsub-canary and for its users' CI: Kafka and Pub/Sub, local or Docker.

The pytest fixtures live in :mod:`pubsub_canary.testing.plugin`, loaded automatically when
pubsub-canary is installed. This package imports no Kafka or Google client at import time.
"""

from pubsub_canary.testing.embedded_kafka import EmbeddedKafka
from pubsub_canary.testing.factories import KafkaTopicFactory, PubSubFactory
from pubsub_canary.testing.kafka import (
    DockerKafka,
    ExternalKafka,
    KafkaBackend,
    client_config,
    start_kafka,
)
from pubsub_canary.testing.pubsub import (
    DockerPubSub,
    PubSubBackend,
    PubSubEmulator,
    start_pubsub,
)

__all__ = [  # noqa: RUF022 - grouped by backend
    # Kafka
    "DockerKafka",
    "EmbeddedKafka",
    "ExternalKafka",
    "KafkaBackend",
    "KafkaTopicFactory",
    "client_config",
    "start_kafka",
    # Pub/Sub
    "DockerPubSub",
    "PubSubBackend",
    "PubSubEmulator",
    "PubSubFactory",
    "start_pubsub",
]
