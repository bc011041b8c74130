"""Per-test resource factories: unique Kafka topics, Pub/Sub topics and subscriptions.

Each name starts with the test's name and ends with a random suffix, so tests never share a
topic even on a long-lived external broker, and a leftover resource says which test made it.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from pubsub_canary.testing._config import unique_name

if TYPE_CHECKING:
    from google.cloud import pubsub_v1

    from pubsub_canary.testing.kafka import KafkaBackend
    from pubsub_canary.testing.pubsub import PubSubBackend


class KafkaTopicFactory:
    """Creates uniquely named topics on a Kafka backend: ``factory(partitions, suffix)``."""

    def __init__(self, backend: KafkaBackend, prefix: str) -> None:
        self.backend = backend
        self.prefix = prefix
        #: Topics created so far, in order.
        self.topics: list[str] = []

    def __call__(self, partitions: int = 1, suffix: str = "") -> str:
        """Create a topic with ``partitions`` partitions and return its name."""
        name = unique_name(self.prefix, suffix)
        self.backend.create_topic(name, partitions)
        self.topics.append(name)
        return name


class PubSubFactory:
    """Creates uniquely named Pub/Sub topics and subscriptions, deleted again by :meth:`close`.

    ``publisher`` and ``subscriber`` are clients on the backend, made on first use.
    """

    def __init__(self, backend: PubSubBackend, prefix: str) -> None:
        self.backend = backend
        self.prefix = prefix
        self._publisher: pubsub_v1.PublisherClient | None = None
        self._subscriber: pubsub_v1.SubscriberClient | None = None
        self._topics: list[str] = []
        self._subscriptions: list[str] = []

    @property
    def project(self) -> str:
        return self.backend.project

    @property
    def publisher(self) -> pubsub_v1.PublisherClient:
        if self._publisher is None:
            self._publisher = self.backend.publisher()
        return self._publisher

    @property
    def subscriber(self) -> pubsub_v1.SubscriberClient:
        if self._subscriber is None:
            self._subscriber = self.backend.subscriber()
        return self._subscriber

    def name(self, suffix: str = "") -> str:
        """A fresh id (not a path) for something this test creates itself."""
        return unique_name(self.prefix, suffix)

    def topic(self, suffix: str = "") -> str:
        """Create a topic; returns its path ``projects/P/topics/ID``."""
        path = self.backend.topic_path(self.name(suffix))
        self.publisher.create_topic(name=path)
        self._topics.append(path)
        return path

    def subscription(
        self,
        topic: str,
        suffix: str = "",
        *,
        ack_deadline_seconds: int = 10,
        dead_letter_topic: str | None = None,
        max_delivery_attempts: int = 5,
        enable_message_ordering: bool = False,
        **fields: Any,
    ) -> str:
        """Create a pull subscription on ``topic``; returns its path.

        Args:
            topic: topic path.
            suffix: readable part of the id.
            ack_deadline_seconds: the subscription's ack deadline.
            dead_letter_topic: topic path to dead-letter into after ``max_delivery_attempts``
                (5 to 100) deliveries; None for no dead-letter policy.
            max_delivery_attempts: used only with ``dead_letter_topic``.
            enable_message_ordering: deliver messages of one ordering key in order.
            **fields: other ``Subscription`` fields (``retry_policy``, ``filter``...).
        """
        request: dict[str, Any] = {
            "name": self.backend.subscription_path(self.name(suffix)),
            "topic": topic,
            "ack_deadline_seconds": ack_deadline_seconds,
            "enable_message_ordering": enable_message_ordering,
            **fields,
        }
        if dead_letter_topic is not None:
            request["dead_letter_policy"] = {
                "dead_letter_topic": dead_letter_topic,
                "max_delivery_attempts": max_delivery_attempts,
            }
        self.subscriber.create_subscription(request=request)
        self._subscriptions.append(request["name"])
        return str(request["name"])

    def close(self) -> None:
        """Delete what this factory created (best effort) and close its clients."""
        if self._subscriber is not None:
            for path in reversed(self._subscriptions):
                with contextlib.suppress(Exception):
                    self._subscriber.delete_subscription(subscription=path, timeout=5)
            self._subscriber.close()
            self._subscriber = None
        if self._publisher is not None:
            for path in reversed(self._topics):
                with contextlib.suppress(Exception):
                    self._publisher.delete_topic(topic=path, timeout=5)
            with contextlib.suppress(Exception):
                self._publisher.stop()
            self._publisher = None
        self._subscriptions.clear()
        self._topics.clear()
