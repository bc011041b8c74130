"""A stateless Kafka consumer under the canary coordinator: order totals.

One file plays every role of the example so that it runs without two builds:

    python orders.py produce --bootstrap-servers "$KAFKA"          # 300 orders/s, 1% malformed
    python orders.py consume --bootstrap-servers "$KAFKA" --cohort stable --version 1.0.0
    python orders.py dead-letters --bootstrap-servers "$KAFKA"     # what was dead-lettered, why

In your code the version is your build; here ``--version`` picks the behaviour (1.1.0 adds tax).
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

from confluent_kafka import Consumer, Producer, TopicPartition

from pubsub_canary import CanaryError, KafkaMember, PoisonMessage, Record

TOPIC, GROUP, DLQ = "orders", "orders-consumer", "orders.dlq"
COORDINATOR = os.environ.get("PUBSUB_CANARY_COORDINATOR", "http://127.0.0.1:8470")


def handle(record: Record, version: str) -> float:
    """Price one order. Raise to fail it (retried); PoisonMessage dead-letters it at once."""
    try:
        order = json.loads(record.value or b"")
        items = order["items"]
    except (ValueError, KeyError) as exc:
        raise PoisonMessage(f"not an order: {exc}") from None
    total = sum(i["qty"] * i["price"] for i in items)
    if tuple(int(x) for x in version.split(".")[:2]) >= (1, 1):
        total *= 1.2  # the new version adds tax
    return total


def consume(args: argparse.Namespace) -> None:
    member = KafkaMember(
        lambda record: handle(record, args.version),
        coordinator=args.coordinator,
        bootstrap_servers=args.bootstrap_servers,
        topic=TOPIC,
        group_id=GROUP,
        cohort=args.cohort,
        version=args.version,
        dead_letter_topic=DLQ,
        member_id=args.member_id,
    )
    member.run()  # until SIGTERM or Ctrl-C: then it hands its partitions back and returns


def produce(args: argparse.Namespace) -> None:
    producer = Producer({"bootstrap.servers": args.bootstrap_servers, "linger.ms": 5})
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    start, sent = time.monotonic(), 0
    rng = random.Random(1)  # the same orders every run
    try:
        while not stop:
            while sent < (time.monotonic() - start) * args.rate:
                order = {
                    "order_id": sent,
                    "items": [{"sku": "A1", "qty": 1 + sent % 3, "price": 9}],
                }
                bad = rng.random() < 0.01  # 1% cannot be parsed
                value = b"{oops" if bad else json.dumps(order).encode()
                producer.produce(TOPIC, key=f"customer-{sent % 500}".encode(), value=value)
                sent += 1
            producer.poll(0)
            time.sleep(0.01)
    except KeyboardInterrupt:
        pass
    producer.flush(10)
    print(f"produced {sent} orders", flush=True)


def dead_letters(args: argparse.Namespace) -> None:
    consumer = Consumer({"bootstrap.servers": args.bootstrap_servers, "group.id": "dlq-reader"})
    consumer.assign([TopicPartition(DLQ, 0, 0)])
    shown = 0
    for msg in consumer.consume(num_messages=args.max, timeout=5):
        if msg.error() is None:
            headers = {k: v.decode() for k, v in msg.headers() or []}
            print(f"{msg.value()!r} {json.dumps(headers)}")
            shown += 1
    consumer.close()
    print(f"{shown} dead letters shown")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("produce", "consume", "dead-letters"):
        s = sub.add_parser(name)
        s.add_argument("--bootstrap-servers", required=True)
    sub.choices["produce"].add_argument("--rate", type=int, default=300, help="orders/s")
    c = sub.choices["consume"]
    c.add_argument("--cohort", required=True, choices=["stable", "canary"])
    c.add_argument("--version", required=True)
    c.add_argument("--member-id", help="a readable name (default: cohort + random suffix)")
    c.add_argument("--coordinator", default=COORDINATOR)
    sub.choices["dead-letters"].add_argument("--max", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise
    try:
        {"produce": produce, "consume": consume, "dead-letters": dead_letters}[args.command](args)
    except CanaryError as exc:  # one line an operator can act on, not a traceback
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
