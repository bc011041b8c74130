"""Kafka test backends: an external broker, a testcontainers broker, or the embedded one.

:func:`start_kafka` picks the first that applies:

1. ``PUBSUB_CANARY_KAFKA_BOOTSTRAP`` (a ``host:port`` list): a broker someone else runs;
2. a Docker engine answers: a single-node KRaft broker from testcontainers;
3. otherwise :class:`~pubsub_canary.testing.embedded_kafka.EmbeddedKafka`, librdkafka's mock
   cluster in a child process.

All three satisfy :class:`KafkaBackend`. Topics are created through the backend
(:meth:`KafkaBackend.create_topic`) because the embedded broker does not implement the
CreateTopics API; on real brokers that method uses the AdminClient.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from pubsub_canary.errors import BackendUnavailable, BrokerError, ConfigError
from pubsub_canary.testing._config import (
    KAFKA_BOOTSTRAP_ENV,
    check_topic_name,
    kafka_bootstrap_from_env,
)
from pubsub_canary.testing._docker import docker_status
from pubsub_canary.testing.embedded_kafka import EmbeddedKafka

log = logging.getLogger(__name__)

#: Image of the testcontainers broker; override with ``PUBSUB_CANARY_KAFKA_IMAGE``.
DEFAULT_KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
KAFKA_IMAGE_ENV = "PUBSUB_CANARY_KAFKA_IMAGE"


@runtime_checkable
class KafkaBackend(Protocol):
    """A running Kafka (or Kafka-compatible test) cluster that tests can use.

    Attributes:
        kind: ``"external"``, ``"docker"`` or ``"embedded"``.
        bootstrap_servers: value for the clients' ``bootstrap.servers``.
        description: one line for test reports.
    """

    kind: str

    @property
    def bootstrap_servers(self) -> str: ...

    @property
    def description(self) -> str: ...

    def create_topic(self, name: str, partitions: int) -> None:
        """Create a topic and return once clients can use it."""
        ...

    def close(self) -> None:
        """Release what the backend started (nothing for an external broker)."""
        ...


def client_config(backend: KafkaBackend, **extra: Any) -> dict[str, Any]:
    """confluent-kafka configuration for ``backend``: its bootstrap list plus ``extra``.

    ``extra`` uses the dotted librdkafka names; pass them as a dict splat, e.g.
    ``client_config(b, **{"group.id": "g"})``.
    """
    return {"bootstrap.servers": backend.bootstrap_servers, **extra}


class _AdminTopics:
    """Topic creation through the AdminClient, for real brokers."""

    bootstrap_servers: str

    def create_topic(self, name: str, partitions: int, *, timeout: float = 30.0) -> None:
        check_topic_name(name)
        if partitions < 1:
            raise ConfigError(f"partitions={partitions} for topic {name!r}; use 1 or more")
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        # replication_factor=-1: the broker's default (Kafka >= 2.4), right for 1 or 3 brokers.
        future = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=-1)],
            request_timeout=timeout,
        )[name]
        try:
            future.result(timeout=timeout + 5)
        except KafkaException as exc:
            error = exc.args[0]
            hint = ""
            if error.code() in (KafkaError._TIMED_OUT, KafkaError.REQUEST_TIMED_OUT):
                hint = (
                    "; if this is librdkafka's mock cluster (pubsub-canary dev kafka), it cannot"
                    " create topics: pass --topic NAME:PARTITIONS to it instead"
                )
            raise BrokerError(
                f"creating topic {name!r} on {self.bootstrap_servers} failed: {error.str()}{hint}",
                topic=name,
            ) from exc
        self._wait_for_metadata(admin, name, partitions, timeout)

    @staticmethod
    def _wait_for_metadata(admin: Any, name: str, partitions: int, timeout: float) -> None:
        # CreateTopics returns when the controller has it; other brokers learn it a bit later.
        deadline = time.monotonic() + timeout
        while True:
            metadata = admin.list_topics(topic=name, timeout=5)
            topic = metadata.topics.get(name)
            if topic is not None and topic.error is None and len(topic.partitions) == partitions:
                leaders = all(p.leader >= 0 for p in topic.partitions.values())
                if leaders:
                    return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"topic {name!r} was created but its {partitions} partitions did not appear"
                    f" in metadata within {timeout:g} s",
                    topic=name,
                )
            time.sleep(0.1)


def _probe(bootstrap: str, timeout: float, source: str) -> None:
    """Raise BackendUnavailable unless a broker answers a metadata request."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    errors: list[str] = []
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "error_cb": lambda err: errors.append(err.str()),
        "log_level": 0,
    }
    admin = AdminClient(config)
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        detail = errors[-1] if errors else exc.args[0].str()
        raise BackendUnavailable(
            f"no Kafka broker answered at {bootstrap} ({source}) within {timeout:g} s:"
            f" {detail}; start it, or unset {KAFKA_BOOTSTRAP_ENV} to use the embedded broker",
            backend="kafka",
        ) from exc


class ExternalKafka(_AdminTopics):
    """A broker started by someone else, named by ``PUBSUB_CANARY_KAFKA_BOOTSTRAP``."""

    kind = "external"

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers

    @property
    def description(self) -> str:
        return f"{KAFKA_BOOTSTRAP_ENV}={self.bootstrap_servers}"

    def start(self, timeout: float = 10.0) -> ExternalKafka:
        _probe(self.bootstrap_servers, timeout, KAFKA_BOOTSTRAP_ENV)
        return self

    def close(self) -> None:
        pass

    def __enter__(self) -> ExternalKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class DockerKafka(_AdminTopics):
    """A single-node KRaft broker in a container, through testcontainers."""

    kind = "docker"

    def __init__(self, image: str | None = None) -> None:
        self.image = image or os.environ.get(KAFKA_IMAGE_ENV) or DEFAULT_KAFKA_IMAGE
        self._container: Any = None
        self.bootstrap_servers = ""

    @property
    def description(self) -> str:
        return f"testcontainers {self.image} at {self.bootstrap_servers or 'not started'}"

    def start(self, timeout: int = 120) -> DockerKafka:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # testcontainers deprecations are not ours
                try:
                    from testcontainers.community.kafka import KafkaContainer
                except ImportError:  # testcontainers < 4.14
                    from testcontainers.kafka import KafkaContainer
                container = KafkaContainer(image=self.image).with_kraft()
                container.start(timeout=timeout)
        except ImportError as exc:
            raise BackendUnavailable(
                f"testcontainers is not installed ({exc}); install pubsub-canary[testing]",
                backend="kafka",
            ) from exc
        except Exception as exc:
            raise BackendUnavailable(
                f"the Kafka container {self.image} did not start: {type(exc).__name__}: {exc}",
                backend="kafka",
            ) from exc
        self._container = container
        self.bootstrap_servers = container.get_bootstrap_server()
        _probe(self.bootstrap_servers, 30, "testcontainers")
        return self

    def close(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                container.stop()

    def __enter__(self) -> DockerKafka:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_kafka(*, brokers: int = 3) -> KafkaBackend:
    """Start (or connect to) a Kafka backend: external, then Docker, then embedded.

    Args:
        brokers: broker count of the embedded cluster (Docker and external are as they are).

    Returns:
        A running backend; call ``close()`` when done.

    Raises:
        ConfigError: ``PUBSUB_CANARY_KAFKA_BOOTSTRAP`` is malformed.
        BackendUnavailable: the chosen backend could not be reached or started.
    """
    bootstrap = kafka_bootstrap_from_env()
    if bootstrap is not None:
        return ExternalKafka(bootstrap).start()
    usable, reason = docker_status()
    if usable:
        try:
            return DockerKafka().start()
        except BackendUnavailable as exc:
            # Docker answered but could not give us a broker (offline image pull, say): the
            # embedded broker still lets the tests run; the log says why.
            log.warning("%s; using the embedded Kafka broker instead", exc.message)
    else:
        log.debug("not using Docker for Kafka: %s", reason)
    return EmbeddedKafka(brokers=brokers).start()
