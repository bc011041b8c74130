"""Benchmark: Pub/Sub routing throughput beside a plain subscriber, and the rollback drain time.

One run on one Pub/Sub emulator (``PUBSUB_EMULATOR_HOST`` if set, else the local one):

1. **Throughput.** Each round publishes ``--messages`` messages to a fresh subscription, then
   consumes them with, in turn:

   * ``plain``: google-cloud-pubsub's streaming pull, callback = the handler + ``ack()``;
   * ``member``: one stable :class:`~pubsub_canary.client.pubsub.PubSubMember` (the same
     handler, the same flow control) under a coordinator with a rollout at ``--share``
     percent: it hashes every message to its bucket, processes stable's buckets and relays
     the canary's to the canary topic (acked after the publish), where a canary member
     process consumes them;
   * ``member-0``: the same member with no rollout: the routing decision on every message,
     nothing relayed.

   Both run in this process; the coordinator and the canary run as processes. A run's rate is
   messages from its first to its last handled message (processed or relayed) over that
   time, so registration and stream set-up are not counted. ``throughput_ratio`` is the
   median ``member`` rate over the median ``plain`` rate (target >= 0.9).
2. **Rollback drain.** ``--stable`` stable member processes and one canary process whose
   handler takes ``--canary-work-ms`` per message, a rollout at 50%; messages are published
   until ``--backlog`` messages of the canary's buckets wait for it (distinct users; on the
   ordered subscription, 500 users as ordering keys). Then the rollout is aborted.
   ``drain_seconds``: from the decision to the last of those messages processed (the
   members' ledgers; target <= 5 s). Also the coordinator's ``rollback_seconds``
   (decision to every bucket owned by stable, which waits for the drain).

Prints figures as it goes (progress on stderr), then with ``--json`` one JSON object as the
last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from pubsub_canary.client.processing import Record  # noqa: E402
from pubsub_canary.client.pubsub import ROUTE_ACK_DEADLINE, PubSubMember  # noqa: E402
from pubsub_canary.client.routing import bucket_of  # noqa: E402
from pubsub_canary.demo.pubsub_harness import PubSubHarness, SteadyPublisher  # noqa: E402
from pubsub_canary.demo.pubsub_runner import create_subscription  # noqa: E402

TARGET_RATIO = 0.9
TARGET_DRAIN_S = 5.0


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def work(value: bytes | None) -> int:
    """The handler both sides run: decode JSON, a little arithmetic."""
    body = json.loads(value or b"{}")
    return (int(body.get("seq", 0)) * 31) % 1_000_003


class Rate:
    """Times the first and the n-th handled message."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.done = threading.Event()
        self._lock = threading.Lock()

    def tick(self, k: int = 1) -> None:
        with self._lock:
            now = time.monotonic()
            if self.count == 0:
                self.first = now
            self.count += k
            if self.count >= self.n and not self.done.is_set():
                self.last = now
                self.done.set()

    @property
    def per_second(self) -> float:
        return (self.count - 1) / (self.last - self.first) if self.last > self.first else 0.0


def flow_control(pubsub_v1: Any, max_messages: int) -> Any:
    # The member's own settings, so that both read the stream the same way.
    return pubsub_v1.types.FlowControl(
        max_messages=max_messages,
        max_duration_per_lease_extension=ROUTE_ACK_DEADLINE,
        max_lease_duration=600,
    )


def run_plain(subscription: str, n: int, max_messages: int) -> float:
    from google.cloud import pubsub_v1

    rate = Rate(n)

    def callback(message: Any) -> None:
        work(message.data)
        message.ack()
        rate.tick()

    subscriber = pubsub_v1.SubscriberClient()
    future = subscriber.subscribe(
        subscription,
        callback,
        flow_control=flow_control(pubsub_v1, max_messages),
        await_callbacks_on_shutdown=True,
    )
    try:
        if not rate.done.wait(300):
            raise RuntimeError(f"plain subscriber handled {rate.count} of {n}")
    finally:
        future.cancel()
        future.result(timeout=30)
        subscriber.close()
    return rate.per_second


def run_member(coordinator: str, subscription: str, n: int, max_messages: int) -> float:
    rate = Rate(n)

    def handler(rec: Record) -> None:
        work(rec.value)

    member = PubSubMember(
        handler,
        coordinator=coordinator,
        subscription=subscription,
        cohort="stable",
        version="1.4.0",
        routing_attribute="user",
        max_outstanding=max_messages,
    )
    member.on_processed = lambda *_: rate.tick()
    thread = threading.Thread(
        target=member.run, kwargs={"install_signal_handlers": False}, daemon=True
    )
    thread.start()
    relayed = 0
    try:
        while not rate.done.is_set():
            now = member.counts()["relayed_canary"]
            if now > relayed:
                rate.tick(now - relayed)
                relayed = now
            time.sleep(0.002)
        if rate.count < n:
            raise RuntimeError(f"member handled {rate.count} of {n}")
    finally:
        member.stop()
        thread.join(60)
    return rate.per_second


def publish(backend: Any, topic: str, n: int, start: int) -> list[str]:
    return SteadyPublisher(backend.publisher(), topic, 1, start_seq=start).publish(n)


def throughput(args: argparse.Namespace, backend: Any, workdir: Path) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"plain": [], "member": [], "member-0": []}
    for rnd in range(args.rounds):
        for mode in ("plain", "member", "member-0"):
            stamp = f"tp{rnd}-{mode}-{os.getpid()}-{int(time.time())}"
            topic, sub, dlq = create_subscription(backend, stamp)
            publish(backend, topic, args.messages, rnd * args.messages)
            if mode == "plain":
                r = run_plain(sub, args.messages, args.max_outstanding)
            else:
                h = PubSubHarness(
                    workdir / stamp,
                    backend=backend,
                    topic=topic,
                    subscription=sub,
                    dead_letter_topic=dlq,
                    lease_seconds=6.0,
                )
                try:
                    h.start_coordinator()
                    if mode == "member":
                        h.start_member("canary", "1.5.0")
                        apply_when_registered(h, rollout(h, f"tp-{rnd}", args.share))
                    r = run_member(h.url, sub, args.messages, args.max_outstanding)
                finally:
                    h.close()
            rates[mode].append(r)
            progress(f"round {rnd + 1}: {mode:8} {r:8.0f} msg/s")
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "plain_msgs_per_s": round(med["plain"], 1),
        "member_msgs_per_s": round(med["member"], 1),
        "member_no_rollout_msgs_per_s": round(med["member-0"], 1),
        "throughput_ratio": round(med["member"] / med["plain"], 3),
        "throughput_ratio_no_rollout": round(med["member-0"] / med["plain"], 3),
        "rates": {k: [round(x, 1) for x in v] for k, v in rates.items()},
    }


def rollout(h: PubSubHarness, name: str, share: float) -> dict[str, Any]:
    return {
        "name": name,
        "target": {"transport": "pubsub", "topic": h.topic, "group": h.group},
        "stable_version": "1.4.0",
        "canary_version": "1.5.0",
        "steps": [{"share": share, "hold_seconds": 3600}],
        # The drain's canary is slow on purpose: nothing may roll it back but us.
        "analysis": {
            "error_rate": None,
            "dead_letter_rate": None,
            "latency": None,
            "lag_growth": None,
        },
    }


def apply_when_registered(h: PubSubHarness, spec: dict[str, Any], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            h.client.apply(spec)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    while True:  # the canary's buckets are in place
        status = h.client.status(spec["name"])
        if status["cohorts"]["canary"]["units"] > 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the rollout's share never took effect")
        time.sleep(0.1)


def drain(args: argparse.Namespace, backend: Any, workdir: Path, ordered: bool) -> dict[str, Any]:
    stamp = f"drain-{'ordered' if ordered else 'plain'}-{os.getpid()}-{int(time.time())}"
    topic, sub, dlq = create_subscription(backend, stamp, ordered=ordered)
    h = PubSubHarness(
        workdir / stamp,
        backend=backend,
        topic=topic,
        subscription=sub,
        dead_letter_topic=dlq,
        lease_seconds=6.0,
    )
    try:
        h.start_coordinator()
        for _ in range(args.stable):
            h.start_member("stable", "1.4.0")
        h.start_member("canary", "1.5.0", work_ms=args.canary_work_ms)
        apply_when_registered(h, rollout(h, "drain", 50))
        time.sleep(1.0)
        status = h.client.status("drain")
        canary = {int(u) for u, v in status["units"].items() if v["cohort"] == "canary"}
        from google.cloud import pubsub_v1

        options = pubsub_v1.types.PublisherOptions(enable_message_ordering=ordered)
        # Ordered: 500 keys, each with a queue of messages (what ordering keys are for).
        publisher = SteadyPublisher(
            backend.publisher(publisher_options=options),
            topic,
            1,
            ordered=ordered,
            users=500 if ordered else 50_000,
        )
        waiting: set[str] = set()
        others: set[str] = set()
        while len(waiting) < args.backlog:
            start = publisher.sent
            ids = publisher.publish(max(100, min(1000, 2 * (args.backlog - len(waiting)))))
            for i, mid in enumerate(ids):
                user = f"user-{((start + i) * 7_919) % publisher.users}"
                (waiting if bucket_of(user) in canary else others).add(mid)
        progress(f"drain ({'ordered' if ordered else 'unordered'}): published {publisher.sent}")
        deadline = time.monotonic() + 120
        while not others <= {r.message_id for r in h.rows()}:  # stable is done with its own
            if time.monotonic() > deadline:
                raise RuntimeError("stable never processed its own buckets")
            time.sleep(0.2)
        time.sleep(1.0)  # its relays are written too
        done_by_canary = {r.message_id for r in h.rows() if r.cohort == "canary"}
        backlog = len(waiting - done_by_canary)
        h.client.act("drain", "abort")
        decided = float(h.client.status("drain")["rollback_started_at"])
        if not h.wait_processed(waiting, timeout=120):
            raise RuntimeError("the canary's backlog was never drained")
        rows = h.rows()
        first: dict[str, Any] = {}
        for r in rows:
            first.setdefault(r.message_id, r)
        end = max(first[m].at for m in waiting)
        deadline = time.monotonic() + 30
        status = h.client.status("drain")
        while status["phase"] != "aborted" and time.monotonic() < deadline:
            time.sleep(0.1)
            status = h.client.status("drain")
        by_stable = sum(1 for m in waiting if first[m].cohort == "stable")
        dups = len(rows) - len(first)
        return {
            "backlog": backlog,
            "drain_seconds": round(end - decided, 3),
            "rollback_seconds": status.get("rollback_seconds"),
            "drained_by_stable": by_stable,
            "duplicates": dups,
        }
    finally:
        h.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--messages", type=int, default=20_000, help="messages per throughput run")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds (each: all modes)")
    p.add_argument("--share", type=float, default=10.0, help="canary share in the member runs")
    p.add_argument("--max-outstanding", type=int, default=1000, help="flow control, messages")
    p.add_argument("--backlog", type=int, default=5_000, help="canary backlog at the rollback")
    p.add_argument("--stable", type=int, default=2, help="stable member processes (drain)")
    p.add_argument("--canary-work-ms", type=float, default=500.0, help="the slow canary")
    p.add_argument("--skip-ordered", action="store_true", help="no drain on an ordered sub")
    p.add_argument("--skip-throughput", action="store_true", help="only the drains")
    p.add_argument("--json", action="store_true", help="one JSON object as the last line")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from pubsub_canary.testing.pubsub import start_pubsub

    backend = start_pubsub()
    os.environ.update(backend.environ())  # our members build their own clients
    figures: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average": round(os.getloadavg()[0], 2),
        "emulator": backend.description,
    }
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            if not args.skip_throughput:
                figures.update(throughput(args, backend, workdir))
                ratio = figures["throughput_ratio"]
                progress(f"throughput ratio {ratio} (target >= {TARGET_RATIO})")
            d = drain(args, backend, workdir, ordered=False)
            figures.update(d)
            progress(f"drain of {d['backlog']}: {d['drain_seconds']} s (target <= 5 s)")
            if not args.skip_ordered:
                o = drain(args, backend, workdir, ordered=True)
                figures.update({f"ordered_{k}": v for k, v in o.items()})
                progress(f"ordered drain of {o['backlog']}: {o['drain_seconds']} s")
    finally:
        backend.close()
    figures["load_average_end"] = round(os.getloadavg()[0], 2)
    figures["targets_met"] = (
        figures.get("throughput_ratio", TARGET_RATIO) >= TARGET_RATIO
        and figures["drain_seconds"] <= TARGET_DRAIN_S
    )
    print()
    if not args.skip_throughput:
        print(f"plain subscriber            {figures['plain_msgs_per_s']:>9.1f} msg/s")
        print(f"member, {args.share:g}% to canary      {figures['member_msgs_per_s']:>9.1f} msg/s")
        print(f"member, no rollout          {figures['member_no_rollout_msgs_per_s']:>9.1f} msg/s")
        print(f"throughput ratio            {figures['throughput_ratio']:>9.3f} (target >= 0.9)")
    print(f"drain of {figures['backlog']} (unordered)  {figures['drain_seconds']:>9.3f} s")
    if "ordered_drain_seconds" in figures:
        print(
            f"drain of {figures['ordered_backlog']} (ordered)    "
            f"{figures['ordered_drain_seconds']:>9.3f} s"
        )
    if args.json:
        print(json.dumps(figures, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
