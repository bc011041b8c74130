"""A stateful Kafka consumer under the canary coordinator: running totals per customer.

The state of each partition maps a customer to what they paid so far. It lives in the member's
memory and in the changelog topic ``payments-totals.changelog``, and moves with the partition.
One file plays every role of the example:

    python totals.py produce --bootstrap-servers "$KAFKA"        # 300 payments/s, 5% refunds
    python totals.py consume --bootstrap-servers "$KAFKA" --cohort stable --version 1.0.0
    python totals.py check --bootstrap-servers "$KAFKA"          # state == a recount of the topic

Version 1.0.0 keeps a number of cents per customer (state format 1). Version 2.0.0 keeps
``{"cents": ..., "payments": ...}`` (format 2, and reads format 1), and has a bug: it refuses
refunds. :func:`v2_to_v1` lets 1.0.0 read what 2.0.0 wrote; the rollout file names it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import time
from collections import defaultdict
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from pubsub_canary import CanaryError, PartitionState, PoisonMessage, Record, StatefulKafkaMember
from pubsub_canary.client.state import ChangelogReader, StateFormats

TOPIC, GROUP, DLQ = "payments", "payments-totals", "payments.dlq"
CHANGELOG = f"{GROUP}.changelog"
COORDINATOR = os.environ.get("PUBSUB_CANARY_COORDINATOR", "http://127.0.0.1:8470")


def add_v1(record: Record, state: PartitionState) -> None:
    payment = json.loads(record.value or b"")
    customer = payment["customer"]
    state[customer] = state.get(customer, 0) + payment["cents"]


def add_v2(record: Record, state: PartitionState) -> None:
    payment = json.loads(record.value or b"")
    if payment["cents"] < 0:
        raise PoisonMessage("negative amount")  # the bug the canary has to be caught with
    old = state.get(payment["customer"], {"cents": 0, "payments": 0})
    if isinstance(old, int):  # written by 1.0.0 (format 1)
        old = {"cents": old, "payments": 0}
    state[payment["customer"]] = {
        "cents": old["cents"] + payment["cents"],
        "payments": old["payments"] + 1,
    }


def v2_to_v1(value: dict[str, int]) -> int:
    """State format 2 -> 1, for 1.0.0 members restoring what 2.0.0 wrote (after a rollback)."""
    return value["cents"]


VERSIONS = {"1.0.0": (add_v1, 1, {1}), "2.0.0": (add_v2, 2, {1, 2})}


def consume(args: argparse.Namespace) -> None:
    handler, writes, reads = VERSIONS[args.version]
    StatefulKafkaMember(
        handler,
        state_format=writes,
        reads=reads,
        changelog_topic=CHANGELOG,
        coordinator=args.coordinator,
        bootstrap_servers=args.bootstrap_servers,
        topic=TOPIC,
        group_id=GROUP,
        cohort=args.cohort,
        version=args.version,
        dead_letter_topic=DLQ,
        member_id=args.member_id,
    ).run()


def produce(args: argparse.Namespace) -> None:
    producer = Producer({"bootstrap.servers": args.bootstrap_servers, "linger.ms": 5})
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    rng, start, sent = random.Random(2), time.monotonic(), 0
    try:
        while not stop:
            while sent < (time.monotonic() - start) * args.rate:
                cents = -rng.randint(100, 900) if rng.random() < 0.05 else rng.randint(100, 9000)
                customer = f"customer-{rng.randrange(300)}"
                value = json.dumps({"payment": sent, "customer": customer, "cents": cents})
                producer.produce(TOPIC, key=customer.encode(), value=value.encode())
                sent += 1
            producer.poll(0)
            time.sleep(0.01)
    except KeyboardInterrupt:
        pass
    producer.flush(10)
    print(f"produced {sent} payments", flush=True)


def read_all(consumer: Any, tps: list[TopicPartition], highs: dict[int, int]) -> list[Any]:
    """Every message of ``tps`` below ``highs``."""
    consumer.assign([TopicPartition(tp.topic, tp.partition, 0) for tp in tps])
    messages, left = [], {tp.partition for tp in tps if highs[tp.partition] > 0}
    deadline = time.monotonic() + 60
    while left:
        if time.monotonic() > deadline:
            raise SystemExit(f"could not read {tps[0].topic} to its end in 60 s")
        for m in consumer.consume(num_messages=5000, timeout=1.0):
            if m.error() is None and m.offset() < highs[m.partition()]:
                messages.append(m)
                if m.offset() == highs[m.partition()] - 1:
                    left.discard(m.partition())
    return messages


def check(args: argparse.Namespace) -> int:
    """Wait until the group has committed everything, then recount the topic and compare."""
    config = {"bootstrap.servers": args.bootstrap_servers, "group.id": GROUP}
    c = Consumer({**config, "enable.auto.commit": False})
    parts = sorted(c.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions)
    tps = [TopicPartition(TOPIC, p) for p in parts]
    deadline = time.monotonic() + 60
    while True:
        highs = {p: c.get_watermark_offsets(TopicPartition(TOPIC, p), timeout=10)[1] for p in parts}
        committed = {tp.partition: tp.offset for tp in c.committed(tps, timeout=10)}
        if all(committed[p] >= highs[p] for p in parts):
            break
        if time.monotonic() > deadline:
            print("the group did not commit everything within 60 s: are the members running?")
            return 1
        time.sleep(0.5)
    dlq_high = c.get_watermark_offsets(TopicPartition(DLQ, 0), timeout=10)[1]
    dead = set()
    for m in read_all(c, [TopicPartition(DLQ, 0)], {0: dlq_high}):
        h = {k: v.decode() for k, v in m.headers() or []}
        dead.add(
            (int(h["pubsub_canary.original_partition"]), int(h["pubsub_canary.original_offset"]))
        )
    expected: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for m in read_all(c, tps, highs):
        if (m.partition(), m.offset()) not in dead:
            payment = json.loads(m.value())
            expected[m.partition()][payment["customer"]] += payment["cents"]
    c.close()
    migrated = 0

    def count_v2_to_v1(value: dict[str, int]) -> int:
        nonlocal migrated
        migrated += 1
        return v2_to_v1(value)

    formats = StateFormats(writes=1, reads=frozenset({1}), migrations={2: count_v2_to_v1})
    reader = ChangelogReader(config, CHANGELOG, formats)
    wrong = []
    for p in parts:
        restored = reader.restore(p)
        through = committed[p] if committed[p] >= 0 else None
        if restored.data != dict(expected[p]) or restored.through != through:
            wrong.append(p)
    customers = sum(len(e) for e in expected.values())
    print(f"{len(dead)} payments dead-lettered; {migrated} values of state format 2 migrated")
    if wrong:
        print(f"state differs from a recount of the topic in partitions {wrong}")
        return 1
    n = len(parts)
    print(f"state matches a recount of the topic: {customers} customer totals, {n} partitions")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("produce", "consume", "check"):
        sub.add_parser(name).add_argument("--bootstrap-servers", required=True)
    sub.choices["produce"].add_argument("--rate", type=int, default=300, help="payments/s")
    c = sub.choices["consume"]
    c.add_argument("--cohort", required=True, choices=["stable", "canary"])
    c.add_argument("--version", required=True, choices=sorted(VERSIONS))
    c.add_argument("--member-id", help="a readable name (default: cohort + random suffix)")
    c.add_argument("--coordinator", default=COORDINATOR)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise
    try:
        if args.command == "check":
            return check(args)
        produce(args) if args.command == "produce" else consume(args)
    except CanaryError as exc:  # one line an operator can act on, not a traceback
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
