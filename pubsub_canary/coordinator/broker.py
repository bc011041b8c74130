"""What the coordinator asks of the broker: does a topic exist, and how far behind is a group.

The port (:class:`BrokerPort`), its in-memory twin, and the Kafka adapter. The adapter is lazy
(no network in ``__init__``) and turns librdkafka errors into :class:`BrokerError`.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from pubsub_canary.errors import BrokerError


class BrokerPort(Protocol):
    def partitions(self, topic: str) -> int | None:
        """Partition count of ``topic``, or None when it does not exist."""
        ...

    def offsets(self, topic: str, group_id: str, partitions: int) -> dict[int, tuple[int, int]]:
        """Per partition: (committed offset of the group or the low watermark, high watermark)."""
        ...

    def close(self) -> None: ...


class MemoryBroker:
    """In-memory twin for unit tests: topics with partition counts and offsets set by the test."""

    def __init__(self, topics: dict[str, int] | None = None) -> None:
        self.topics = dict(topics or {})
        self.watermarks: dict[tuple[str, int], tuple[int, int]] = {}

    def partitions(self, topic: str) -> int | None:
        return self.topics.get(topic)

    def offsets(self, topic: str, group_id: str, partitions: int) -> dict[int, tuple[int, int]]:
        return {p: self.watermarks.get((topic, p), (0, 0)) for p in range(partitions)}

    def close(self) -> None:
        pass


class KafkaBroker:
    """The broker port on Kafka (confluent-kafka)."""

    def __init__(self, bootstrap_servers: str, extra_config: dict[str, Any] | None = None) -> None:
        self._config = {
            "bootstrap.servers": bootstrap_servers,
            "client.id": "pubsub-canary-coordinator",
            **(extra_config or {}),
        }
        self._consumers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _consumer(self, group_id: str) -> Any:
        from confluent_kafka import Consumer

        c = self._consumers.get(group_id)
        if c is None:
            # Never subscribes or commits: only reads committed offsets and watermarks.
            c = Consumer({**self._config, "group.id": group_id, "enable.auto.commit": False})
            self._consumers[group_id] = c
        return c

    def partitions(self, topic: str) -> int | None:
        from confluent_kafka import KafkaException

        with self._lock:
            try:
                md = self._consumer("pubsub-canary-metadata").list_topics(topic, timeout=10)
            except KafkaException as exc:
                raise BrokerError(f"cannot read metadata of topic {topic!r}: {exc}") from None
        t = md.topics.get(topic)
        if t is None or t.error is not None or not t.partitions:
            return None
        return len(t.partitions)

    def offsets(self, topic: str, group_id: str, partitions: int) -> dict[int, tuple[int, int]]:
        from confluent_kafka import KafkaException, TopicPartition

        with self._lock:
            c = self._consumer(group_id)
            try:
                committed = c.committed(
                    [TopicPartition(topic, p) for p in range(partitions)], timeout=10
                )
                out: dict[int, tuple[int, int]] = {}
                for tp in committed:
                    low, high = c.get_watermark_offsets(
                        TopicPartition(topic, tp.partition), timeout=5, cached=False
                    )
                    done = tp.offset if tp.offset >= 0 else low
                    out[tp.partition] = (done, high)
            except KafkaException as exc:
                raise BrokerError(
                    f"cannot read offsets of {topic!r} for group {group_id!r}: {exc}"
                ) from None
        return out

    def close(self) -> None:
        with self._lock:
            for c in self._consumers.values():
                c.close()
            self._consumers.clear()
