"""What the coordinator asks of the broker: does a topic exist, and how far behind is a group.

The port (:class:`BrokerPort`), its in-memory twin, and the Kafka adapter. The adapter is lazy
(no network in ``__init__``) and turns librdkafka errors into :class:`BrokerError`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

from pubsub_canary.errors import BrokerError, ConfigError


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


#: librdkafka settings the coordinator sets itself: its consumers only read offsets.
OWN_SETTINGS = ("bootstrap.servers", "group.id", "enable.auto.commit")


def _setting(text: str) -> tuple[str, str] | None:
    """``"key = value"`` -> ``("key", "value")``; None when it is not that."""
    key, sep, value = text.partition("=")
    return (key.strip(), value.strip()) if sep and key.strip() else None


def read_client_config(path: str) -> dict[str, str]:
    """A Kafka client properties file (``key=value`` lines, ``#`` comments), as librdkafka keys.

    The usual place for ``security.protocol``, ``sasl.*`` and ``ssl.*`` settings: a file keeps a
    password off the command line.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read Kafka client config {path!r}: {exc.strerror}", field="kafka_config_file"
        ) from None
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        setting = _setting(line)
        if setting is None:
            raise ConfigError(
                f"{path}:{n}: {line[:60]!r} is not key=value", field="kafka_config_file"
            )
        out[setting[0]] = setting[1]
    return out


def parse_client_settings(pairs: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` (repeated command-line options) as a dict."""
    out: dict[str, str] = {}
    for pair in pairs:
        setting = _setting(pair)
        if setting is None:
            raise ConfigError(
                f"--kafka-config {pair!r} is not KEY=VALUE (for example security.protocol=SSL)",
                field="kafka_config",
            )
        out[setting[0]] = setting[1]
    return out


class KafkaBroker:
    """The broker port on Kafka (confluent-kafka).

    ``extra_config``: librdkafka settings for the coordinator's clients (security, timeouts);
    :data:`OWN_SETTINGS` are refused, and an unknown or invalid setting is a ConfigError here
    rather than at the first lag read.
    """

    def __init__(self, bootstrap_servers: str, extra_config: dict[str, Any] | None = None) -> None:
        from confluent_kafka import Consumer, KafkaException

        own = sorted(set(extra_config or {}) & set(OWN_SETTINGS))
        if own:
            raise ConfigError(
                f"the coordinator sets {', '.join(own)} itself; remove it from the Kafka client "
                "config (use --bootstrap-servers for the brokers)",
                field="kafka_config",
            )
        self._config = {
            "bootstrap.servers": bootstrap_servers,
            "client.id": "pubsub-canary-coordinator",
            **(extra_config or {}),
        }
        try:  # librdkafka checks every setting when a client is created
            Consumer({**self._config, "group.id": "pubsub-canary-config-check"}).close()
        except (KafkaException, ValueError, TypeError) as exc:
            err = exc.args[0] if exc.args else None
            detail = err.str() if hasattr(err, "str") else str(exc)
            raise ConfigError(f"Kafka client config: {detail}", field="kafka_config") from None
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
