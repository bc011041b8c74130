"""The Kafka test backend, through the plugin's fixtures and through EmbeddedKafka directly.

The fixture tests use only what a real broker offers (topics through the backend, assign(),
commits, AdminClient reads), so they pass unchanged with PUBSUB_CANARY_KAFKA_BOOTSTRAP set.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from pubsub_canary.errors import BackendUnavailable, BrokerError, ConfigError
from pubsub_canary.testing import EmbeddedKafka, ExternalKafka, KafkaBackend

pytestmark = [pytest.mark.kafka]

MESSAGES = 10_000
PARTITIONS = 12
KEYS = 1_000


def _produce(bootstrap: str, topic: str) -> dict[str, tuple[int, int]]:
    """Produce MESSAGES keyed messages; returns value -> (partition, offset) from delivery."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    delivered: dict[str, tuple[int, int]] = {}
    errors: list[str] = []

    def on_delivery(err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            errors.append(err.str())
        else:
            delivered[msg.value().decode()] = (msg.partition(), msg.offset())

    for i in range(MESSAGES):
        producer.produce(topic, key=f"key-{i % KEYS}", value=f"value-{i}", on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(30) == 0
    assert errors == []
    return delivered


def _consume_partitions(
    bootstrap: str, topic: str, group_id: str, partitions: list[int], out: str
) -> None:
    """Child process: assign() the partitions, read each to its high watermark, commit."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    high = {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
        for p in partitions
    }
    consumer.assign([TopicPartition(topic, p) for p in partitions])
    seen: list[tuple[int, int, str, str]] = []
    next_offset = {p: 0 for p in partitions}
    deadline = time.monotonic() + 60
    while any(next_offset[p] < high[p] for p in partitions):
        if time.monotonic() > deadline:
            raise TimeoutError(f"stuck at {next_offset}, high watermarks {high}")
        for msg in consumer.consume(num_messages=500, timeout=1.0):
            if msg.error():
                raise KafkaException(msg.error())
            seen.append((msg.partition(), msg.offset(), msg.key().decode(), msg.value().decode()))
            next_offset[msg.partition()] = msg.offset() + 1
    consumer.commit(
        offsets=[TopicPartition(topic, p, next_offset[p]) for p in partitions], asynchronous=False
    )
    consumer.close()
    Path(out).write_text(json.dumps({"seen": seen, "high": high}))


@pytest.mark.timeout(120)
def test_two_processes_consume_every_message_exactly_once_and_commit_the_watermark(
    kafka_backend: KafkaBackend, kafka_topic_factory: Any, kafka_group_id: str, tmp_path: Path
) -> None:
    bootstrap = kafka_backend.bootstrap_servers
    topic = kafka_topic_factory(partitions=PARTITIONS)
    delivered = _produce(bootstrap, topic)
    assert len(delivered) == MESSAGES

    halves = [list(range(0, PARTITIONS, 2)), list(range(1, PARTITIONS, 2))]
    outs = [tmp_path / f"consumer-{i}.json" for i in range(2)]
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=_consume_partitions, args=(bootstrap, topic, kafka_group_id, half, str(out))
        )
        for half, out in zip(halves, outs, strict=True)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(90)
        assert worker.exitcode == 0, f"consumer process exit code {worker.exitcode}"
    results = [json.loads(out.read_text()) for out in outs]

    # Each process saw only its own partitions; together, every message exactly once.
    for half, result in zip(halves, results, strict=True):
        assert {p for p, *_ in result["seen"]} <= set(half)
    seen = [tuple(row) for result in results for row in result["seen"]]
    values = Counter(value for *_, value in seen)
    assert len(seen) == MESSAGES
    assert set(values) == {f"value-{i}" for i in range(MESSAGES)}
    assert max(values.values()) == 1
    # ...at the partition and offset the producer was told, with one partition per key.
    assert all(delivered[value] == (p, offset) for p, offset, _, value in seen)
    partitions_of_key: dict[str, set[int]] = defaultdict(set)
    for p, _, key, _ in seen:
        partitions_of_key[key].add(p)
    assert len(partitions_of_key) == KEYS
    assert all(len(ps) == 1 for ps in partitions_of_key.values())

    # The broker agrees: per-partition counts add up, committed == high watermark.
    admin = AdminClient({"bootstrap.servers": bootstrap})
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    latest = {
        tp.partition: future.result().offset
        for tp, future in admin.list_offsets(
            {tp: OffsetSpec.latest() for tp in tps}, request_timeout=10
        ).items()
    }
    earliest = {
        tp.partition: future.result().offset
        for tp, future in admin.list_offsets(
            {tp: OffsetSpec.earliest() for tp in tps}, request_timeout=10
        ).items()
    }
    counts = Counter(p for p, *_ in seen)
    assert all(counts[p] > 0 for p in range(PARTITIONS))
    assert {p: latest[p] - earliest[p] for p in range(PARTITIONS)} == dict(counts)
    assert sum(latest[p] - earliest[p] for p in range(PARTITIONS)) == MESSAGES

    group = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(kafka_group_id, tps)])
    committed = {
        tp.partition: tp.offset for tp in group[kafka_group_id].result(timeout=10).topic_partitions
    }
    assert committed == latest
    # The consumer API reads the same commits.
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": kafka_group_id})
    try:
        assert {tp.partition: tp.offset for tp in reader.committed(tps, timeout=10)} == latest
    finally:
        reader.close()


def test_topic_factory_creates_named_topics_with_the_partitions_asked(
    kafka_backend: KafkaBackend, kafka_topic_factory: Any, request: pytest.FixtureRequest
) -> None:
    counts = {kafka_topic_factory(partitions=n, suffix=f"p{n}"): n for n in (1, 7, 64)}
    assert len(counts) == 3
    admin = AdminClient({"bootstrap.servers": kafka_backend.bootstrap_servers})
    metadata = admin.list_topics(timeout=10)
    for name, partitions in counts.items():
        assert name.startswith(request.node.name[:20])
        assert len(metadata.topics[name].partitions) == partitions
    assert ("kafka_backend", f"{kafka_backend.kind}: {kafka_backend.description}") in (
        request.node.user_properties
    )


def test_creating_an_existing_topic_is_a_broker_error(
    kafka_backend: KafkaBackend, kafka_topic_factory: Any
) -> None:
    topic = kafka_topic_factory(partitions=2)
    with pytest.raises(BrokerError, match="already exists"):
        kafka_backend.create_topic(topic, 2)
    with pytest.raises(ConfigError, match="partitions=0"):
        kafka_backend.create_topic(topic + "-x", 0)
    with pytest.raises(ConfigError, match="not valid"):
        kafka_backend.create_topic("no spaces allowed", 1)


# -- the embedded broker itself ---------------------------------------------------------------


def test_embedded_broker_fault_injection_reaches_clients(tmp_path: Path) -> None:
    with EmbeddedKafka(brokers=1) as kafka:
        kafka.create_topic("faults", 1)
        consumer = Consumer({"bootstrap.servers": kafka.bootstrap_servers, "group.id": "g"})
        try:
            # OffsetCommit is Kafka API key 8; the next commit fails with the error we pushed.
            kafka.push_request_errors(8, KafkaError.GROUP_AUTHORIZATION_FAILED)
            with pytest.raises(KafkaException) as info:
                consumer.commit(offsets=[TopicPartition("faults", 0, 0)], asynchronous=False)
            assert info.value.args[0].code() == KafkaError.GROUP_AUTHORIZATION_FAILED
            consumer.commit(offsets=[TopicPartition("faults", 0, 0)], asynchronous=False)
        finally:
            consumer.close()
        kafka.set_broker_rtt(1, 5)
        kafka.set_broker_down(1)
        kafka.set_broker_up(1)
        with pytest.raises(BrokerError, match="embedded Kafka broker"):
            kafka.set_broker_down(99)
    assert kafka.pid is None
    with pytest.raises(BackendUnavailable, match="not running"):
        kafka.create_topic("after-close", 1)


_HOST_AND_WAIT = """
import sys, time
from pubsub_canary.testing import EmbeddedKafka
kafka = EmbeddedKafka(brokers=1).start()
print(kafka.pid, flush=True)
time.sleep(60)
"""


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.timeout(30)
def test_embedded_broker_dies_with_a_parent_killed_by_sigkill() -> None:
    with subprocess.Popen([sys.executable, "-c", _HOST_AND_WAIT], stdout=subprocess.PIPE) as parent:
        try:
            assert parent.stdout is not None
            child = int(parent.stdout.readline())
            assert not _gone(child, 0.2), "the broker process should be running"
            parent.send_signal(signal.SIGKILL)
            parent.wait(5)
            assert _gone(child, 5), f"broker process {child} outlived its parent"
        finally:
            parent.kill()


def test_external_broker_that_does_not_answer_is_unavailable_in_one_line() -> None:
    with pytest.raises(BackendUnavailable) as info:
        ExternalKafka("127.0.0.1:1").start(timeout=1)
    assert "\n" not in info.value.message
    assert "no Kafka broker answered at 127.0.0.1:1" in info.value.message
    assert "unset PUBSUB_CANARY_KAFKA_BOOTSTRAP" in info.value.message


def test_admin_topic_creation_on_the_mock_names_its_limit() -> None:
    # The AdminClient path used for real brokers, aimed at the mock, which lacks CreateTopics.
    with EmbeddedKafka(brokers=1) as kafka:
        external = ExternalKafka(kafka.bootstrap_servers).start()
        with pytest.raises(BrokerError) as info:
            external.create_topic("needs-create-topics", 3, timeout=1)
    assert "\n" not in info.value.message
    assert "mock cluster" in info.value.message and "--topic NAME:PARTITIONS" in info.value.message


# -- pubsub-canary dev kafka -------------------------------------------------------------------


def _cli(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pubsub_canary.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.mark.timeout(60)
def test_dev_kafka_prints_the_address_serves_topics_and_stops_on_sigint() -> None:
    process = _cli("dev", "kafka", "--brokers", "2", "--topic", "orders:12")
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("Kafka test broker (librdkafka mock, 2 brokers) at 127.0.0.1:")
        bootstrap = first.rsplit(" ", 1)[1].strip()
        metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
        assert len(metadata.brokers) == 2
        assert len(metadata.topics["orders"].partitions) == 12
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=15)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "Traceback" not in err
    assert "stopping the embedded Kafka broker" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--topic", "orders:abc"], "--topic 'orders:abc' is not valid"),
        (["--brokers", "0"], "brokers=0 is not valid"),
    ],
)
def test_dev_kafka_bad_input_is_one_line_and_exit_2(args: list[str], expected: str) -> None:
    process = _cli("dev", "kafka", *args)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
