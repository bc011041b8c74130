"""A Pub/Sub subscriber under the canary coordinator: welcome e-mails for new sign-ups.

Messages carry a ``user`` attribute; the members route by it, so each user's messages go to one
cohort and the canary's share is exact (a hash of the user into 1,000 buckets). One file plays
every role of the example:

    python welcome.py setup                        # topics and subscriptions
    python welcome.py publish                      # 200 sign-ups/s, 10% of them at example.org
    python welcome.py consume --cohort stable --version 1.0.0
    python welcome.py dead-letters                 # what was dead-lettered, by whom, why

It talks to the emulator named by ``PUBSUB_EMULATOR_HOST`` in project ``PUBSUB_PROJECT_ID``.
Version 2.0.0 checks e-mail domains against an allow-list that forgot ``example.org``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time

from google.api_core.exceptions import AlreadyExists
from google.cloud import pubsub_v1

from pubsub_canary import CanaryError, PoisonMessage, Record
from pubsub_canary.client.pubsub import PubSubMember

TOPIC, DLQ, SUBSCRIPTION = "signups", "signups.dlq", "welcome-emails"
DLQ_READER = "signups.dlq-reader"  # so that the example can show its dead letters
COORDINATOR = os.environ.get("PUBSUB_CANARY_COORDINATOR", "http://127.0.0.1:8470")
VERSIONS = ("1.0.0", "2.0.0")


def path(kind: str, name: str) -> str:
    return f"projects/{os.environ['PUBSUB_PROJECT_ID']}/{kind}/{name}"


def handle(record: Record, version: str) -> None:
    """Send one welcome e-mail (simulated). Raise to fail: retried, then dead-lettered."""
    signup = json.loads(record.value or b"{}")
    email = signup.get("email", "")
    if "@" not in email:
        raise PoisonMessage("no e-mail address")  # never retried
    if version == "2.0.0" and not email.endswith("@example.com"):
        raise ValueError(f"domain of {email} not allowed")  # the canary's bug


def setup(args: argparse.Namespace) -> None:
    """The subscription needs a dead-letter policy: the members dead-letter through it."""
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    for topic in (TOPIC, DLQ):
        with contextlib.suppress(AlreadyExists):
            publisher.create_topic(name=path("topics", topic))
    policy = {"dead_letter_topic": path("topics", DLQ), "max_delivery_attempts": 5}
    request = {
        "name": path("subscriptions", SUBSCRIPTION),
        "topic": path("topics", TOPIC),
        "ack_deadline_seconds": 10,
        "dead_letter_policy": policy,
    }
    reader = {"name": path("subscriptions", DLQ_READER), "topic": path("topics", DLQ)}
    for r in (request, reader):
        with contextlib.suppress(AlreadyExists):
            subscriber.create_subscription(request=r)
    print(f"topic {TOPIC}, dead-letter topic {DLQ}, subscription {SUBSCRIPTION}: ready")


def publish(args: argparse.Namespace) -> None:
    publisher = pubsub_v1.PublisherClient()
    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    start, sent = time.monotonic(), 0
    try:
        while not stop:
            while sent < (time.monotonic() - start) * args.rate:
                user = f"user-{sent * 7919 % 10_000}"
                domain = "example.org" if sent % 10 == 3 else "example.com"
                data = json.dumps({"user": user, "email": f"{user}@{domain}"}).encode()
                publisher.publish(path("topics", TOPIC), data, user=user)
                sent += 1
            time.sleep(0.01)
    except KeyboardInterrupt:
        pass
    publisher.stop()  # sends what is batched
    print(f"published {sent} sign-ups", flush=True)


def consume(args: argparse.Namespace) -> None:
    PubSubMember(
        lambda record: handle(record, args.version),
        coordinator=args.coordinator,
        subscription=SUBSCRIPTION,
        routing_attribute="user",
        cohort=args.cohort,
        version=args.version,
        member_id=args.member_id,
    ).run()  # until SIGTERM or Ctrl-C: then it hands its work back and returns


def dead_letters(args: argparse.Namespace) -> None:
    subscriber = pubsub_v1.SubscriberClient()
    sub = path("subscriptions", DLQ_READER)
    response = subscriber.pull(subscription=sub, max_messages=args.max, timeout=10)
    for m in response.received_messages:
        attributes = {k: v for k, v in m.message.attributes.items() if k.startswith("pubsub_")}
        print(f"{m.message.data.decode()} {json.dumps(attributes, sort_keys=True)}")
    print(f"{len(response.received_messages)} dead letters shown")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("setup")
    sub.add_parser("publish").add_argument("--rate", type=int, default=200, help="messages/s")
    c = sub.add_parser("consume")
    c.add_argument("--cohort", required=True, choices=["stable", "canary"])
    c.add_argument("--version", required=True, choices=VERSIONS)
    c.add_argument("--member-id", help="a readable name (default: cohort + random suffix)")
    c.add_argument("--coordinator", default=COORDINATOR)
    sub.add_parser("dead-letters").add_argument("--max", type=int, default=3)
    args = p.parse_args()
    if not os.environ.get("PUBSUB_EMULATOR_HOST") or not os.environ.get("PUBSUB_PROJECT_ID"):
        print("error: set PUBSUB_EMULATOR_HOST and PUBSUB_PROJECT_ID (step 1)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat otherwise
    try:
        commands = {"setup": setup, "publish": publish, "consume": consume}
        commands["dead-letters"] = dead_letters
        commands[args.command](args)
    except CanaryError as exc:  # one line an operator can act on, not a traceback
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
