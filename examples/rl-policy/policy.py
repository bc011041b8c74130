"""An RL policy served by a Kafka consumer: the canary policy is judged on its reward.

Each message is a user's visit: ``{"event", "user", "segment", "hour"}``, keyed by user, so all
of a user's visits go to one partition and, during a step, to one cohort. The consumer picks an
offer with its policy (epsilon-greedy over a table), gets a reward in [0, 1] and reports it with
``member.report_kpi("reward", r)``; the rollout judges the canary on the mean reward of its users
against stable's users. The reward here is simulated, and deterministic in (event, offer), so a
run can be checked. One file plays every role:

    python policy.py produce --bootstrap-servers "$KAFKA"            # 400 visits/s
    python policy.py serve --bootstrap-servers "$KAFKA" --cohort stable --version 1.0.0

Versions: 1.0.0 picks the best offer per segment; 2.0.0 was trained with the segment labels
swapped (worse); 2.1.0 also knows that free shipping wins in the evening (better).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import signal
import sys
import time

from confluent_kafka import Producer

from pubsub_canary import CanaryError, KafkaMember, Record

TOPIC, GROUP, DLQ = "visits", "offer-policy", "visits.dlq"
COORDINATOR = os.environ.get("PUBSUB_CANARY_COORDINATOR", "http://127.0.0.1:8470")
OFFERS = ("discount", "bundle", "free_shipping")
#: Expected reward of each offer per segment (the environment the policies do not see).
MEAN = {
    "new": {"discount": 0.65, "bundle": 0.30, "free_shipping": 0.45},
    "returning": {"discount": 0.35, "bundle": 0.70, "free_shipping": 0.45},
}
EPSILON = 0.1  # share of visits where a policy explores a random offer


def uniform(*parts: object) -> float:
    """A number in [0, 1) fixed by ``parts``: the same visit always gets the same draw."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def reward(visit: dict[str, object], offer: str) -> float:
    """Simulated reward of ``offer`` on ``visit``: the offer's mean +- 0.25, clipped to [0, 1]."""
    mean = MEAN[str(visit["segment"])][offer]
    if offer == "free_shipping" and int(str(visit["hour"])) >= 18:
        mean += 0.4  # evening shoppers love free shipping
    return min(1.0, max(0.0, mean + (uniform(visit["event"], offer, "noise") - 0.5) / 2))


def table_policy(visit: dict[str, object]) -> str:  # 1.0.0
    return "discount" if visit["segment"] == "new" else "bundle"


def swapped_policy(visit: dict[str, object]) -> str:  # 2.0.0: segment labels swapped
    return "bundle" if visit["segment"] == "new" else "discount"


def evening_policy(visit: dict[str, object]) -> str:  # 2.1.0
    return "free_shipping" if int(str(visit["hour"])) >= 18 else table_policy(visit)


POLICIES = {"1.0.0": table_policy, "2.0.0": swapped_policy, "2.1.0": evening_policy}


def serve(args: argparse.Namespace) -> None:
    policy = POLICIES[args.version]

    def handle(record: Record) -> None:
        visit = json.loads(record.value or b"")
        explore = uniform(visit["event"], "explore") < EPSILON
        offer = OFFERS[int(uniform(visit["event"], "offer") * 3)] if explore else policy(visit)
        member.report_kpi("reward", reward(visit, offer))

    member = KafkaMember(
        handle,
        coordinator=args.coordinator,
        bootstrap_servers=args.bootstrap_servers,
        topic=TOPIC,
        group_id=GROUP,
        cohort=args.cohort,
        version=args.version,
        dead_letter_topic=DLQ,
        member_id=args.member_id,
    )
    member.run()


def produce(args: argparse.Namespace) -> None:
    producer = Producer({"bootstrap.servers": args.bootstrap_servers, "linger.ms": 5})
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    rng, start, sent = random.Random(3), time.monotonic(), 0
    try:
        while not stop:
            while sent < (time.monotonic() - start) * args.rate:
                user = rng.randrange(2000)
                segment = "new" if user % 5 < 2 else "returning"  # 40% new users
                visit = {"event": sent, "user": user, "segment": segment, "hour": rng.randrange(24)}
                producer.produce(
                    TOPIC, key=f"user-{user}".encode(), value=json.dumps(visit).encode()
                )
                sent += 1
            producer.poll(0)
            time.sleep(0.01)
    except KeyboardInterrupt:
        pass
    producer.flush(10)
    print(f"produced {sent} visits", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("produce", "serve"):
        sub.add_parser(name).add_argument("--bootstrap-servers", required=True)
    sub.choices["produce"].add_argument("--rate", type=int, default=400, help="visits/s")
    s = sub.choices["serve"]
    s.add_argument("--cohort", required=True, choices=["stable", "canary"])
    s.add_argument("--version", required=True, choices=sorted(POLICIES))
    s.add_argument("--member-id", help="a readable name (default: cohort + random suffix)")
    s.add_argument("--coordinator", default=COORDINATOR)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise
    try:
        produce(args) if args.command == "produce" else serve(args)
    except CanaryError as exc:  # one line an operator can act on, not a traceback
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
