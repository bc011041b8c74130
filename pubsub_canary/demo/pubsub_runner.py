"""``pubsub-canary demo --transport pubsub``: a canary rollout on a Pub/Sub subscription.

Uses the Pub/Sub emulator (``PUBSUB_EMULATOR_HOST`` if set, else Docker, else the local
emulator), creates a topic, a dead-letter topic and a subscription with a dead-letter policy
(5 attempts), and runs the same rollout and scenarios as the Kafka demo: stable and canary
member processes, a steady publisher with a ``user`` attribute the members route by, 10% ->
25% -> 50% -> 100%. The ledgers then show whether anything was lost or processed twice, the
canary's measured share at each step, and whether any message was dead-lettered by the
subscription's policy rather than by a handler (``routing_dead_letters``).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pubsub_canary.demo.pubsub_harness import PubSubHarness, SteadyPublisher
from pubsub_canary.demo.runner import CANARY_VERSION, STABLE_VERSION, TERMINAL, _line
from pubsub_canary.demo.runner import rollout_spec as kafka_rollout_spec
from pubsub_canary.errors import ConfigError

log = logging.getLogger("pubsub_canary.demo")


def rollout_spec(name: str, topic: str, subscription: str, dlq: str, hold: float) -> dict[str, Any]:
    """The demo's rollout for a Pub/Sub subscription (ids, not paths)."""
    spec = kafka_rollout_spec(name, topic, subscription, dlq, hold)
    spec["target"] = {
        "transport": "pubsub",
        "topic": topic,
        "group": subscription,
        "dead_letter_topic": dlq,
    }
    return spec


def create_subscription(backend: Any, stamp: str, *, ordered: bool = False) -> tuple[str, ...]:
    """Topic, dead-letter topic and subscription (5 delivery attempts) for a demo or test."""
    publisher = backend.publisher()
    subscriber = backend.subscriber()
    try:
        topic = backend.topic_path(f"demo-orders-{stamp}")
        dlq = backend.topic_path(f"demo-orders-{stamp}.dlq")
        sub = backend.subscription_path(f"demo-consumer-{stamp}")
        publisher.create_topic(name=topic)
        publisher.create_topic(name=dlq)
        subscriber.create_subscription(
            request={
                "name": sub,
                "topic": topic,
                "ack_deadline_seconds": 10,
                "enable_message_ordering": ordered,
                "dead_letter_policy": {"dead_letter_topic": dlq, "max_delivery_attempts": 5},
            }
        )
    finally:
        subscriber.close()
    return topic, sub, dlq


def apply_when_registered(h: PubSubHarness, spec: dict[str, Any], timeout: float = 60) -> Any:
    """Apply the rollout once a member registered (a Pub/Sub group exists only then)."""
    from pubsub_canary.errors import NotFound

    deadline = time.monotonic() + timeout
    time.sleep(2.0)  # members start up and stable starts consuming
    while True:
        try:
            return h.client.apply(spec)
        except NotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def run_pubsub_demo(args: argparse.Namespace) -> int:
    if args.stable < 1 or args.canary < 1:
        raise ConfigError("--stable and --canary need at least 1 member each", field="members")
    if args.rate < 1:
        raise ConfigError(f"--rate {args.rate}: need at least 1 message/s", field="rate")
    if getattr(args, "stateful", False):
        raise ConfigError(
            "--stateful is for Kafka (state moves with a partition); Pub/Sub buckets have none",
            field="stateful",
        )
    quiet = args.json

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    from pubsub_canary.testing.pubsub import start_pubsub

    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"demo-{args.scenario}-{stamp}"
    with ExitStack() as stack:
        workdir = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory()))
        backend = start_pubsub()
        stack.callback(backend.close)
        say(f"Pub/Sub: {backend.kind} emulator, {backend.description}")
        topic, sub, dlq = create_subscription(backend, stamp)
        h = PubSubHarness(
            workdir,
            backend=backend,
            topic=topic,
            subscription=sub,
            dead_letter_topic=dlq,
            lease_seconds=3.0,
        )
        stack.callback(h.close)
        h.start_coordinator()
        say(f"coordinator: {h.url} (SQLite store in {workdir}); API docs {h.url}/docs")
        say(f"status page: {h.url}/  (open it to watch the rollout live)")
        publisher = SteadyPublisher(backend.publisher(), topic, args.rate).start()
        stack.callback(publisher.stop)
        for _ in range(args.stable):
            h.start_member("stable", STABLE_VERSION)
        onset: float | None = None
        spec = rollout_spec(name, h.topic, h.group, h.dlq_topic, args.hold)
        if args.scenario == "regression":
            onset = time.time() + 3.0 + 1.5 * args.hold
        for _ in range(args.canary):
            h.start_member(
                "canary", CANARY_VERSION, fail_rate=0.3 if onset else 0.0, fail_after=onset
            )
        status = apply_when_registered(h, spec)
        say(f"rollout {name}: {STABLE_VERSION} -> {CANARY_VERSION}, steps 10/25/50/100%")
        t0 = time.monotonic()
        max_share = 0.0
        deadline = t0 + 60 + 8 * args.hold
        held: dict[float, set[int]] = {}  # share -> the canary's buckets at it
        while status["phase"] not in TERMINAL and time.monotonic() < deadline:
            time.sleep(1.0)
            status = h.client.status(name)
            max_share = max(max_share, float(status["share"]))
            settled = all(v["status"] == "owned" for v in status["units"].values())
            if settled and status["phase"] in ("progressing", "awaiting_approval", "paused"):
                held[float(status["share"])] = {
                    int(u) for u, v in status["units"].items() if v["cohort"] == "canary"
                }
            say(_line(t0, status))
        publisher.stop()
        published = set(publisher.ids)
        drained = h.wait_processed(published, timeout=90)
        final = h.client.status(name)
        timeline = h.timeline(name)
        h.stop_members()
        report = h.report(published, timeline, canary_buckets=held)
        h.stop_coordinator()
        rollback_at = final.get("rollback_started_at")
        summary = {
            "outcome": final["phase"],
            "scenario": args.scenario,
            "transport": "pubsub",
            "broker": backend.kind,
            "topic": h.topic,
            "group": h.group,
            "dlq_topic": h.dlq_topic,
            "rollout": name,
            "produced": report.produced,
            "processed_ok": report.processed_ok,
            "dead_lettered": report.dead_lettered,
            "lost": report.lost,
            "duplicates": report.duplicates,
            "drained": drained,
            "detection_seconds": (round(rollback_at - onset, 3) if onset and rollback_at else None),
            "rollback_seconds": final.get("rollback_seconds"),
            "max_canary_share": max_share,
            "canary_share_error": report.canary_share_error,
            "measured_shares": {f"{k:g}": round(v, 3) for k, v in sorted(report.shares.items())},
            # The share these messages' keys give with the canary's buckets: the gap between
            # it and the target is the keys' sample; between it and the measured one, routing.
            "bucket_shares": {
                f"{k:g}": round(v, 3) for k, v in sorted(report.bucket_shares.items())
            },
            "misrouted": report.misrouted,
            "routing_dead_letters": report.routing_dead_letters,
            "keys_in_both_cohorts": report.keys_in_both,
            "redelivered": report.redelivered,
            "decisions": [d["reason"] for d in final["decisions"]],
            "workdir": str(workdir) if args.workdir else None,
            "status_page": f"{h.url}/",
        }
        expected = "promoted" if args.scenario == "healthy" else "rolled_back"
        ok = (
            final["phase"] == expected
            and report.lost == 0
            and report.duplicates == 0
            and report.routing_dead_letters == 0
        )
        if quiet:
            print(json.dumps(summary))
        else:
            print()
            for d in final["decisions"]:
                print(f"  decision: {d['reason']}")
            shares = ", ".join(
                f"{k:g}% -> {v:.2f}%" for k, v in sorted(report.shares.items()) if k < 100
            )
            print(
                f"\noutcome: {final['phase']} (expected {expected}); published "
                f"{report.produced}, processed ok {report.processed_ok}, dead-lettered "
                f"{report.dead_lettered} (by the subscription's policy: "
                f"{report.routing_dead_letters}), lost {report.lost}, duplicates "
                f"{report.duplicates}\ncanary share measured: {shares or 'n/a'}"
            )
            if summary["detection_seconds"] is not None:
                print(
                    f"regression detected {summary['detection_seconds']:.2f}s after onset; "
                    f"the canary's backlog was drained and stable owned everything "
                    f"{final['rollback_seconds']:.2f}s after the decision"
                )
        return 0 if ok else 1
    return 1  # pragma: no cover
