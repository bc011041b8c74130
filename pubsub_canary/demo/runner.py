"""``pubsub-canary demo``: a canary rollout end to end.

Starts the embedded Kafka test broker (unless ``--bootstrap-servers`` names a broker), the
coordinator with a SQLite store, a steady producer, stable and canary member processes of the
example consumer, and applies a rollout 10% -> 25% -> 50% -> 100%. With ``--scenario
regression`` the canary version starts failing a share of its messages during step 2. The
outcome is whatever the coordinator decided from what the members reported; the demo only
reads it, then checks the ledgers for lost and duplicate messages.
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

from pubsub_canary.demo.harness import Harness, SteadyProducer
from pubsub_canary.errors import ConfigError

STABLE_VERSION = "1.4.0"
CANARY_VERSION = "1.5.0"
TERMINAL = ("promoted", "rolled_back", "aborted")


def rollout_spec(name: str, topic: str, group: str, dlq: str, hold: float) -> dict[str, Any]:
    return {
        "name": name,
        "target": {"transport": "kafka", "topic": topic, "group": group, "dead_letter_topic": dlq},
        "stable_version": STABLE_VERSION,
        "canary_version": CANARY_VERSION,
        "steps": [
            {"share": 10, "hold_seconds": hold, "min_messages": 50},
            {"share": 25, "hold_seconds": hold, "min_messages": 50},
            {"share": 50, "hold_seconds": hold, "min_messages": 50},
            {"share": 100, "hold_seconds": min(hold, 2.0)},
        ],
        "slo": {"max_error_rate": 0.05, "max_dead_letter_rate": 0.05, "min_messages": 50},
        # Short holds for a demo: fewer samples before a verdict, and a step without enough
        # evidence is held longer rather than paused for a person.
        "analysis": {
            "on_inconclusive": "extend",
            "max_extensions": 10,
            "latency": {"min_sample": 100},
            # Lag is read from committed offsets, which saw-tooth with the 0.5 s commit
            # interval: eight samples let the rule see past a few commits' worth of lag.
            "lag_growth": {"min_sample": 8, "absolute_tolerance": 0.1},
        },
    }


def check_state(
    bootstrap: str, topic: str, group: str, changelog: str, h: Harness
) -> dict[str, Any]:
    """Final state (rebuilt from the changelog) against a recomputation from the topic.

    The recomputation is what one owner processing every message once would hold: the sum of
    the amounts per key of every message the ledgers say was processed (not dead-lettered).
    """
    from pubsub_canary.client.state import ChangelogReader, StateFormats
    from pubsub_canary.demo.totals import read_topic_with_offsets, recompute

    dead = {(p, o) for p, o, _, outcome, _ in h.ledger() if outcome == "dlq"}
    messages = read_topic_with_offsets(bootstrap, topic)
    expected = recompute((p, k, v) for p, o, k, v in messages if (p, o) not in dead)
    reader = ChangelogReader(
        {"bootstrap.servers": bootstrap, "group.id": group}, changelog, StateFormats()
    )
    mismatches = keys = 0
    partitions = {p for p, *_ in messages}
    committed = h.watermarks()
    disagree = 0
    for p in sorted(partitions):
        restored = reader.restore(p)
        want = expected.get(p, {})
        keys += len(want)
        mismatches += sum(
            1 for k in set(want) | set(restored.data) if want.get(k) != restored.data.get(k)
        )
        if restored.through != committed[p][0]:
            disagree += 1
    return {
        "state_keys": keys,
        "state_mismatches": mismatches,
        "state_offset_disagreements": disagree,
    }


def _line(t0: float, s: dict[str, Any]) -> str:
    parts = [
        f"[{time.monotonic() - t0:6.1f}s] {s['phase']:<13} step {s['step']}/{s['steps']}"
        f" share {s['share']:>5g}%"
    ]
    for c in ("stable", "canary"):
        h = s["cohorts"][c]["step"]
        err = h["error_rate"]
        parts.append(
            f"{c} {s['cohorts'][c]['members']}m {s['cohorts'][c]['units']:>2}u "
            f"{h['processed']:>6} msg {(err or 0):6.2%} err {h['dead_lettered']:>4} dlq"
        )
    return " | ".join(parts)


def run_demo(args: argparse.Namespace) -> int:
    if getattr(args, "transport", "kafka") == "pubsub":
        from pubsub_canary.demo.pubsub_runner import run_pubsub_demo

        return run_pubsub_demo(args)
    if args.partitions < 2:
        raise ConfigError(f"--partitions {args.partitions}: need at least 2", field="partitions")
    if args.stable < 1 or args.canary < 1:
        raise ConfigError("--stable and --canary need at least 1 member each", field="members")
    if args.rate < 1:
        raise ConfigError(f"--rate {args.rate}: need at least 1 message/s", field="rate")
    quiet = args.json
    log = logging.getLogger("pubsub_canary.demo")

    def say(msg: str) -> None:
        if not quiet:
            print(msg, flush=True)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    topic, group = f"demo-orders-{stamp}", f"demo-consumer-{stamp}"
    dlq = f"{topic}.dlq"
    name = f"demo-{args.scenario}-{stamp}"
    with ExitStack() as stack:
        workdir = Path(args.workdir or stack.enter_context(tempfile.TemporaryDirectory()))
        if args.bootstrap_servers:
            from pubsub_canary.testing._config import parse_bootstrap
            from pubsub_canary.testing.kafka import ExternalKafka

            kafka: Any = stack.enter_context(
                ExternalKafka(parse_bootstrap(args.bootstrap_servers, source="--bootstrap-servers"))
            )
            say(f"Kafka: {kafka.bootstrap_servers} (topics stay there afterwards)")
        else:
            from pubsub_canary.testing.embedded_kafka import EmbeddedKafka

            kafka = stack.enter_context(EmbeddedKafka(brokers=3))
            say(f"Kafka: embedded test broker (librdkafka mock) at {kafka.bootstrap_servers}")
        kafka.create_topic(topic, args.partitions)
        kafka.create_topic(dlq, 1)
        changelog = f"{group}.changelog" if args.stateful else None
        if changelog:
            kafka.create_topic(changelog, args.partitions)
        h = Harness(
            workdir,
            bootstrap=kafka.bootstrap_servers,
            topic=topic,
            group=group,
            dlq_topic=dlq,
            lease_seconds=3.0,
        )
        stack.callback(h.close)
        h.start_coordinator()
        say(f"coordinator: {h.url} (SQLite store in {workdir}); API docs {h.url}/docs")
        say(f"status page: {h.url}/  (open it to watch the rollout live)")
        producer = SteadyProducer(kafka.bootstrap_servers, topic, args.rate).start()
        stack.callback(producer.stop)
        for _ in range(args.stable):
            h.start_member("stable", STABLE_VERSION, changelog_topic=changelog)
        onset: float | None = None
        spec = rollout_spec(name, topic, group, dlq, args.hold)
        if args.scenario == "regression":
            # The new version breaks during step 2: after about 1.5 holds of the rollout.
            onset = time.time() + 3.0 + 1.5 * args.hold
        for _ in range(args.canary):
            h.start_member(
                "canary",
                CANARY_VERSION,
                fail_rate=0.3 if onset else 0.0,
                fail_after=onset,
                changelog_topic=changelog,
            )
        time.sleep(2.0)  # members register and stable starts consuming
        status = h.client.apply(spec)
        say(f"rollout {name}: {STABLE_VERSION} -> {CANARY_VERSION}, steps 10/25/50/100%")
        t0 = time.monotonic()
        max_share = 0.0
        deadline = t0 + 60 + 8 * args.hold
        while status["phase"] not in TERMINAL and time.monotonic() < deadline:
            time.sleep(1.0)
            status = h.client.status(name)
            max_share = max(max_share, float(status["share"]))
            say(_line(t0, status))
        produced = producer.stop()
        drained = h.wait_drained(timeout=60)
        final = h.client.status(name)
        h.stop_members()
        report = h.report()
        h.stop_coordinator()
        state = (
            check_state(kafka.bootstrap_servers, topic, group, changelog, h) if changelog else {}
        )
        decisions = final["decisions"]
        rollback_at = final.get("rollback_started_at")
        summary = {
            "outcome": final["phase"],
            "scenario": args.scenario,
            "transport": "kafka",
            "broker": kafka.kind,
            "topic": topic,
            "group": group,
            "dlq_topic": dlq,
            "rollout": name,
            "produced": produced,
            "processed_ok": report.processed_ok,
            "dead_lettered": report.dead_lettered,
            "lost": report.lost,
            "duplicates": report.duplicates,
            "drained": drained,
            "detection_seconds": (round(rollback_at - onset, 3) if onset and rollback_at else None),
            "rollback_seconds": final.get("rollback_seconds"),
            "max_canary_share": max_share,
            "decisions": [d["reason"] for d in decisions],
            "workdir": str(workdir) if args.workdir else None,
            "status_page": f"{h.url}/",
            **state,
        }
        if report.produced != produced:
            log.warning("producer sent %d, topic holds %d", produced, report.produced)
        expected = "promoted" if args.scenario == "healthy" else "rolled_back"
        ok = final["phase"] == expected and report.lost == 0 and report.duplicates == 0
        ok = ok and state.get("state_mismatches", 0) == 0
        if quiet:
            print(json.dumps(summary))
        else:
            print()
            for d in decisions:
                print(f"  decision: {d['reason']}")
            print(
                f"\noutcome: {final['phase']} (expected {expected}); produced {produced}, "
                f"processed ok {report.processed_ok}, dead-lettered {report.dead_lettered}, "
                f"lost {report.lost}, duplicates {report.duplicates}"
            )
            if summary["detection_seconds"] is not None:
                print(
                    f"regression detected {summary['detection_seconds']:.2f}s after onset; "
                    f"stable owned everything {final['rollback_seconds']:.2f}s after the decision"
                )
        return 0 if ok else 1
    return 1  # pragma: no cover
