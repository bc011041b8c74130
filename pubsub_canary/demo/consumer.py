"""The demo's example consumer: one member process of a stable or canary cohort.

The handler does a little work per message (decode JSON, sum a field). With
``--fail-rate`` and ``--fail-after`` (a wall-clock time), this version starts failing that
share of messages at that moment, chosen by a hash of the message so retries fail too: the
regression the coordinator has to find on its own. Every processed message is appended to a
ledger file (``partition offset member outcome time``) with an unbuffered write, so the
ledger survives even a SIGKILL and the demo can check for lost and duplicate messages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import zlib
from typing import Any

from pubsub_canary.client.kafka import KafkaMember
from pubsub_canary.client.processing import Outcome, PoisonMessage, Record, RetryPolicy
from pubsub_canary.client.state import PartitionState
from pubsub_canary.client.stateful import StatefulKafkaMember
from pubsub_canary.demo.totals import add_to_total


class Ledger:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, member: str, rec: Record, ok: bool) -> None:
        line = f"{rec.partition} {rec.offset} {member} {'ok' if ok else 'dlq'} {time.time():.3f}\n"
        os.write(self.fd, line.encode())


def make_handler(fail_rate: float, fail_after: float | None, work_ms: float):  # type: ignore[no-untyped-def]
    def handler(rec: Record) -> None:
        body = json.loads(rec.value or b"{}")
        total = sum(int(c) for c in str(body.get("seq", 0)))
        if work_ms:
            time.sleep(work_ms / 1000.0)
        if fail_after is not None and time.time() >= fail_after:
            h = zlib.crc32(f"{rec.partition}:{rec.offset}".encode()) % 10_000
            if h < fail_rate * 10_000:
                raise PoisonMessage(f"cannot handle seq {body.get('seq')} (checksum {total})")

    return handler


def main() -> int:
    p = argparse.ArgumentParser(prog="pubsub-canary-demo-consumer")
    p.add_argument("--coordinator", required=True)
    p.add_argument("--bootstrap-servers", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--dlq-topic")
    p.add_argument("--cohort", required=True, choices=["stable", "canary"])
    p.add_argument("--version", required=True)
    p.add_argument("--member-id")
    p.add_argument("--ledger", required=True)
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--fail-after", type=float, help="wall-clock time the failures start")
    p.add_argument("--work-ms", type=float, default=0.0)
    p.add_argument(
        "--changelog-topic", help="keep per-key running totals as state, with this changelog"
    )
    args = p.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ledger = Ledger(args.ledger)
    work = make_handler(args.fail_rate, args.fail_after, args.work_ms)
    handler: Any = work
    member_class: Any = KafkaMember
    extra: dict[str, Any] = {}
    if args.changelog_topic:

        def stateful(rec: Record, state: PartitionState) -> None:
            work(rec)  # the work, and the injected failures
            add_to_total(rec, state)

        member_class, handler = StatefulKafkaMember, stateful
        extra = {"changelog_topic": args.changelog_topic}
    member = member_class(
        handler,
        coordinator=args.coordinator,
        bootstrap_servers=args.bootstrap_servers,
        topic=args.topic,
        group_id=args.group,
        cohort=args.cohort,
        version=args.version,
        dead_letter_topic=args.dlq_topic,
        member_id=args.member_id,
        retry=RetryPolicy(max_attempts=2, initial_backoff_seconds=0.001),
        long_poll_seconds=0.5,
        **extra,
    )

    def on_processed(rec: Record, outcome: Outcome, dead: bool) -> None:
        ledger.write(member.member_id or "?", rec, not dead)

    member.on_processed = on_processed
    member.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
