"""The demo's example Pub/Sub consumer: one member process of a stable or canary cohort.

The same little handler as the Kafka consumer (decode JSON, sum a field). With ``--fail-rate``
and ``--fail-after`` (a wall-clock time) this version starts failing that share of messages,
chosen by a hash of the message id so retries fail too. Every processed message is appended to
a ledger file with an unbuffered write (it survives SIGKILL), one tab-separated line::

    message_id  bucket  member  cohort  ok|dlq  time  publish_ms  seq  key  attempt  source
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import zlib

from pubsub_canary.client.processing import Outcome, PoisonMessage, Record, RetryPolicy
from pubsub_canary.client.pubsub import PubSubMember


class PubSubLedger:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, member: str, cohort: str, rec: Record, ok: bool) -> None:
        h = rec.headers
        key = (rec.key or h.get("user") or b"").decode()
        fields = [
            h["pubsub.message_id"].decode(),
            str(rec.partition),
            member,
            cohort,
            "ok" if ok else "dlq",
            f"{time.time():.3f}",
            str(int((rec.timestamp or 0) * 1000)),
            h.get("seq", b"-1").decode(),
            key,
            h.get("pubsub.delivery_attempt", b"0").decode(),
            h.get("pubsub.source", b"").decode(),
        ]
        os.write(self.fd, ("\t".join(fields) + "\n").encode())


def make_handler(fail_rate: float, fail_after: float | None, work_ms: float):  # type: ignore[no-untyped-def]
    def handler(rec: Record) -> None:
        body = json.loads(rec.value or b"{}")
        total = sum(int(c) for c in str(body.get("seq", 0)))
        if work_ms:
            time.sleep(work_ms / 1000.0)
        if fail_after is not None and time.time() >= fail_after:
            h = zlib.crc32(rec.headers["pubsub.message_id"]) % 10_000
            if h < fail_rate * 10_000:
                raise PoisonMessage(f"cannot handle seq {body.get('seq')} (checksum {total})")

    return handler


def main() -> int:
    p = argparse.ArgumentParser(prog="pubsub-canary-demo-pubsub-consumer")
    p.add_argument("--coordinator", required=True)
    p.add_argument("--subscription", required=True, help="projects/P/subscriptions/S")
    p.add_argument("--cohort", required=True, choices=["stable", "canary"])
    p.add_argument("--version", required=True)
    p.add_argument("--member-id")
    p.add_argument("--ledger", required=True)
    p.add_argument("--routing-attribute", default="user")
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--fail-after", type=float, help="wall-clock time the failures start")
    p.add_argument("--work-ms", type=float, default=0.0)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    args = p.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ledger = PubSubLedger(args.ledger)
    member = PubSubMember(
        make_handler(args.fail_rate, args.fail_after, args.work_ms),
        coordinator=args.coordinator,
        subscription=args.subscription,
        cohort=args.cohort,
        version=args.version,
        member_id=args.member_id,
        routing_attribute=args.routing_attribute or None,
        retry=RetryPolicy(max_attempts=2, initial_backoff_seconds=0.001),
        drain_timeout_seconds=args.drain_timeout,
        long_poll_seconds=0.5,
    )

    def on_processed(rec: Record, outcome: Outcome, dead: bool) -> None:
        ledger.write(member.member_id or "?", args.cohort, rec, not dead)

    member.on_processed = on_processed
    member.run()
    logging.getLogger("pubsub_canary.demo").info("route counts: %s", member.counts())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
