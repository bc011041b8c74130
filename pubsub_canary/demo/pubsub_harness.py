"""Processes and bookkeeping for the Pub/Sub demo and end-to-end tests.

:class:`PubSubHarness` starts the coordinator and member processes (the example consumer of
:mod:`pubsub_canary.demo.pubsub_consumer`) on a Pub/Sub emulator, and reads the members'
ledgers back: every published message processed or dead-lettered by its handler (I2), none
processed twice, the canary's measured share at each step, keys seen by both cohorts while
the share was constant, per-key order, and dead letters that no handler wrote (the
subscription's policy: with this design, none).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pubsub_canary.client.routing import ATTR_ERROR
from pubsub_canary.demo.harness import Harness


@dataclass(frozen=True)
class Row:
    """One line of a member's ledger."""

    message_id: str
    bucket: int
    member: str
    cohort: str
    outcome: str
    at: float
    publish_ms: int
    seq: int
    key: str
    attempt: int
    source: str


@dataclass
class PubSubReport:
    """What the ledgers say about every published message."""

    produced: int
    processed_ok: int
    dead_lettered: int
    lost: int
    duplicates: int
    #: Messages in the dead-letter topic that no handler failure put there (the policy's).
    routing_dead_letters: int
    #: Messages a handler failed, as found in the dead-letter topic.
    handler_dead_letters: int
    by_cohort: dict[str, int] = field(default_factory=dict)
    #: Messages delivered more than once by Pub/Sub (delivery attempt > 1) when processed.
    redelivered: int = 0
    #: target share -> measured canary share (percent), over messages published while it held.
    shares: dict[float, float] = field(default_factory=dict)
    share_messages: dict[float, int] = field(default_factory=dict)
    #: target share -> share of those messages whose bucket the canary held: what the routing
    #: should give with these keys (the gap to the target is the keys' sample, not routing).
    bucket_shares: dict[float, float] = field(default_factory=dict)
    #: Messages processed by the cohort that did not hold their bucket (known sets only).
    misrouted: int = 0
    #: Keys processed by both cohorts while the share was constant.
    keys_in_both: int = 0
    #: Messages processed before an earlier message of the same key.
    order_violations: int = 0
    lost_ids: list[str] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)

    @property
    def canary_share_error(self) -> float | None:
        """Largest gap, in percentage points, between a step's share and the measured one."""
        gaps = [abs(self.shares[s] - s) for s in self.shares]
        return round(max(gaps), 3) if gaps else None


class SteadyPublisher:
    """Publishes ``{"seq": n}`` at ``rate`` messages/s with a ``user`` attribute (and, when
    ``ordered``, the user as ordering key); remembers every message id it got back."""

    def __init__(
        self,
        publisher: Any,
        topic: str,
        rate: int,
        *,
        users: int = 50_000,
        ordered: bool = False,
        start_seq: int = 0,
    ) -> None:
        self._p = publisher
        self.topic = topic
        self.rate = rate
        self.users = users
        self.ordered = ordered
        self.sent = start_seq
        self._first = start_seq
        self.ids: set[str] = set()
        self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self._futures: list[Any] = []

    def _done(self, future: Any) -> None:
        try:
            mid = future.result()
        except Exception:
            with self._lock:
                self.failed += 1
            return
        with self._lock:
            self.ids.add(mid)

    def publish_one(self, seq: int) -> Any:
        user = f"user-{(seq * 7_919) % self.users}"
        extra = {"ordering_key": user} if self.ordered else {}
        data = f'{{"seq": {seq}}}'.encode()
        future = self._p.publish(self.topic, data, user=user, seq=str(seq), **extra)
        future.add_done_callback(self._done)
        return future

    def publish(self, n: int) -> list[str]:
        """Publish ``n`` messages as fast as possible; returns their ids."""
        futures = []
        for _ in range(n):
            futures.append(self.publish_one(self.sent))
            self.sent += 1
        return [f.result(timeout=120) for f in futures]

    def start(self) -> SteadyPublisher:
        self._thread.start()
        return self

    def _run(self) -> None:
        start = time.monotonic()
        first = self.sent
        while not self._stop.is_set():
            due = first + int((time.monotonic() - start) * self.rate)
            while self.sent < due:
                self._futures.append(self.publish_one(self.sent))
                self.sent += 1
            self._futures = [f for f in self._futures if not f.done()]
            time.sleep(0.01)

    def stop(self) -> int:
        """Stop and wait until every message is published; returns how many were sent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        for f in self._futures:
            with contextlib.suppress(Exception):
                f.result(timeout=60)
        deadline = time.monotonic() + 10
        while len(self.ids) + self.failed < self.sent - self._first:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)  # done-callbacks run just after the results are set
        return self.sent


class PubSubHarness(Harness):
    """Coordinator + Pub/Sub member processes on one subscription, ledgers in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        *,
        backend: Any,
        topic: str,
        subscription: str,
        dead_letter_topic: str,
        lease_seconds: float = 3.0,
        store_url: str | None = None,
        routing_attribute: str = "user",
    ) -> None:
        super().__init__(
            workdir,
            bootstrap="",
            topic=topic.rsplit("/", 1)[-1],
            group=subscription.rsplit("/", 1)[-1],
            dlq_topic=dead_letter_topic.rsplit("/", 1)[-1],
            lease_seconds=lease_seconds,
            store_url=store_url,
        )
        self.backend = backend
        self.topic_path = topic
        self.subscription_path = subscription
        self.dead_letter_path = dead_letter_topic
        self.routing_attribute = routing_attribute
        self.env = {**os.environ, **backend.environ(), "PYTHONUNBUFFERED": "1"}
        self._subscriber = backend.subscriber()
        # Our own window on the dead-letter topic: every dead letter, whoever wrote it.
        self.dead_letter_observer = backend.subscription_path(f"{self.group}.harness-dead-letters")
        self._subscriber.create_subscription(
            request={"name": self.dead_letter_observer, "topic": dead_letter_topic}
        )
        self._dead: dict[str, bool] = {}  # message id -> written by a handler failure

    def start_member(  # type: ignore[override]
        self,
        cohort: str,
        version: str,
        *,
        fail_rate: float = 0.0,
        fail_after: float | None = None,
        work_ms: float = 0.0,
        coordinator_url: str | None = None,
        drain_timeout: float = 30.0,
    ) -> Any:
        from pubsub_canary.demo.harness import MemberProc

        self._n += 1
        name = f"{cohort}-{self._n}"
        args = [
            "-m",
            "pubsub_canary.demo.pubsub_consumer",
            "--coordinator",
            coordinator_url or self.url,
            "--subscription",
            self.subscription_path,
            "--cohort",
            cohort,
            "--version",
            version,
            "--member-id",
            name,
            "--ledger",
            str(self.workdir / f"ledger-{name}.txt"),
            "--work-ms",
            str(work_ms),
            "--routing-attribute",
            self.routing_attribute,
            "--drain-timeout",
            str(drain_timeout),
        ]
        if fail_rate:
            args += ["--fail-rate", str(fail_rate)]
        if fail_after is not None:
            args += ["--fail-after", str(fail_after)]
        proc, log_path = self._spawn(args, f"member-{name}.log")
        m = MemberProc(name, cohort, version, proc, log_path)
        self.members[name] = m
        return m

    def close(self) -> None:
        super().close()
        with contextlib.suppress(Exception):
            self._subscriber.delete_subscription(subscription=self.dead_letter_observer, timeout=5)
        with contextlib.suppress(Exception):
            self._subscriber.close()

    # --- reading back -------------------------------------------------------------------------

    def rows(self) -> list[Row]:  # type: ignore[override]
        out = []
        for path in self.workdir.glob("ledger-*.txt"):
            for line in path.read_text().splitlines():
                f = line.split("\t")
                if len(f) != 11:
                    continue  # a line cut by SIGKILL
                conv = (str, int, str, str, str, float, int, int, str, int, str)
                out.append(Row(*(c(v) for c, v in zip(conv, f, strict=True))))
        out.sort(key=lambda r: r.at)
        return out

    def wait_processed(self, ids: set[str], timeout: float = 60.0) -> bool:
        """Wait until every id in ``ids`` is in some ledger (processed or dead-lettered)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ids <= {r.message_id for r in self.rows()}:
                return True
            time.sleep(0.3)
        return False

    def read_dead_letters(self) -> dict[str, bool]:
        """Everything in the dead-letter topic so far: message id -> written by a handler."""
        from google.api_core.exceptions import DeadlineExceeded

        while True:
            try:
                resp = self._subscriber.pull(
                    request={"subscription": self.dead_letter_observer, "max_messages": 1000},
                    timeout=2,
                )
            except DeadlineExceeded:
                break
            got = list(resp.received_messages)
            if not got:
                break
            for r in got:
                attrs = r.message.attributes
                mid = attrs.get("pubsub_canary.message_id") or r.message.message_id
                self._dead[mid] = ATTR_ERROR in attrs
            self._subscriber.acknowledge(
                request={
                    "subscription": self.dead_letter_observer,
                    "ack_ids": [r.ack_id for r in got],
                }
            )
        return dict(self._dead)

    def timeline(self, rollout: str) -> list[tuple[float, float]]:
        """(time, share) at each decision of the rollout, from its status."""
        status = self.client.status(rollout)
        return sorted((float(d["at"]), float(d["share"])) for d in status["decisions"])

    def report(  # type: ignore[override]
        self,
        published: set[str],
        timeline: list[tuple[float, float]] | None = None,
        *,
        margin: float = 1.0,
        canary_buckets: dict[float, set[int]] | None = None,
    ) -> PubSubReport:
        rows = self.rows()
        dead = self.read_dead_letters()
        seen = Counter(r.message_id for r in rows)
        first: dict[str, Row] = {}
        for r in rows:
            first.setdefault(r.message_id, r)
        lost = sorted(published - set(seen))
        dups = [m for m, n in seen.items() if n > 1]
        report = PubSubReport(
            produced=len(published),
            processed_ok=sum(1 for r in first.values() if r.outcome == "ok"),
            dead_lettered=sum(1 for r in first.values() if r.outcome == "dlq"),
            lost=len(lost),
            duplicates=sum(seen[m] - 1 for m in dups),
            routing_dead_letters=sum(1 for by_handler in dead.values() if not by_handler),
            handler_dead_letters=sum(1 for by_handler in dead.values() if by_handler),
            by_cohort=dict(Counter(r.cohort for r in first.values())),
            redelivered=sum(1 for r in first.values() if r.attempt > 1),
            lost_ids=lost[:20],
            duplicate_ids=dups[:20],
        )
        if timeline:
            measure_shares(report, list(first.values()), timeline, margin, canary_buckets or {})
        report.order_violations = order_violations(list(first.values()))
        return report


def measure_shares(
    report: PubSubReport,
    rows: list[Row],
    timeline: list[tuple[float, float]],
    margin: float,
    canary_buckets: dict[float, set[int]],
) -> None:
    """Per constant-share period: the canary's share of the messages published and handled in
    it (from ``margin`` seconds after the change, so members have the new route), and the keys
    seen by both cohorts."""
    times = [t for t, _ in timeline]
    counts: dict[float, list[int]] = defaultdict(lambda: [0, 0, 0])
    cohorts: dict[tuple[int, str], set[str]] = defaultdict(set)
    for r in rows:
        t = r.publish_ms / 1000.0
        i = bisect.bisect_right(times, t) - 1
        if i < 0 or t - times[i] < margin:
            continue
        if i + 1 < len(times) and (times[i + 1] - t < 0.2 or r.at >= times[i + 1]):
            continue  # published just before a change, or handled after it: routed by which?
        share = timeline[i][1]
        if share <= 0:
            continue
        counts[share][0] += r.cohort == "canary"
        counts[share][1] += 1
        held = canary_buckets.get(share)
        if held is not None:
            counts[share][2] += r.bucket in held
            report.misrouted += (r.bucket in held) != (r.cohort == "canary")
        cohorts[(i, r.key)].add(r.cohort)
    report.shares = {s: 100.0 * c / n for s, (c, n, _) in counts.items() if n}
    report.share_messages = {s: n for s, (_, n, _) in counts.items()}
    report.bucket_shares = {
        s: 100.0 * b / n for s, (_, n, b) in counts.items() if n and s in canary_buckets
    }
    report.keys_in_both = sum(1 for (_, key), cs in cohorts.items() if key and len(cs) > 1)


def order_violations(rows: list[Row]) -> int:
    """Messages processed after a later message (by ``seq``) of the same key."""
    latest: dict[str, int] = {}
    bad = 0
    for r in sorted(rows, key=lambda r: r.at):
        if not r.key or r.seq < 0:
            continue
        if latest.get(r.key, -1) > r.seq:
            bad += 1
        latest[r.key] = max(latest.get(r.key, -1), r.seq)
    return bad
