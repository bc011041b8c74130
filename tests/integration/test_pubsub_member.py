"""The Pub/Sub member on the emulator, with an in-process coordinator and a ledger per message.

Members run as threads of the test process (the end-to-end tests run them as processes). Each
test checks what the issue asks of the route: the canary gets exactly its buckets without a
single nack, a rollback drains the canary's backlog into stable in key order, dead letters of
the subscription's policy are counted for the cohort that read the message, and a member cut
off from the coordinator stops processing before its lease runs out.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pubsub_canary.client.processing import Outcome, Record
from pubsub_canary.client.pubsub import PubSubMember
from pubsub_canary.client.routing import Route, bucket_of, route_names
from pubsub_canary.client.transport import MemoryTransport
from pubsub_canary.coordinator.service import Coordinator
from pubsub_canary.coordinator.store import MemoryStore
from pubsub_canary.core.model import parse_rollout_spec
from pubsub_canary.demo.pubsub_harness import order_violations
from pubsub_canary.errors import CoordinatorUnavailable
from pubsub_canary.testing import PubSubFactory

pytestmark = [pytest.mark.pubsub, pytest.mark.timeout(120)]

LEASE = 3.0


@dataclass(frozen=True)
class Processed:
    message_id: str
    member: str
    cohort: str
    bucket: int
    key: str
    seq: int
    attempt: int
    at: float
    ok: bool


class Group:
    """A subscription, an in-process coordinator and member threads, with one ledger."""

    def __init__(self, factory: PubSubFactory, *, ordered: bool = False) -> None:
        self.factory = factory
        self.topic = factory.topic("orders")
        self.dlq = factory.topic("dlq")
        self.subscription = factory.subscription(
            self.topic,
            "orders",
            dead_letter_topic=self.dlq,
            enable_message_ordering=ordered,
        )
        self.sub_id = self.subscription.rsplit("/", 1)[-1]
        self.topic_id = self.topic.rsplit("/", 1)[-1]
        self.ordered = ordered
        self.coordinator = Coordinator(MemoryStore(), lease_seconds=LEASE)
        self.coordinator.start()
        self.ledger: list[Processed] = []
        self.members: dict[str, tuple[PubSubMember, threading.Thread]] = {}
        self._lock = threading.Lock()
        from google.cloud import pubsub_v1

        options = pubsub_v1.types.PublisherOptions(enable_message_ordering=ordered)
        self.publisher = factory.backend.publisher(publisher_options=options)
        self.seq = 0

    def start(
        self,
        cohort: str,
        name: str,
        *,
        handler: Callable[[Record], object] | None = None,
        transport: Any = None,
        **kwargs: Any,
    ) -> PubSubMember:
        member = PubSubMember(
            handler or (lambda r: None),
            coordinator=transport or MemoryTransport(self.coordinator),
            subscription=self.subscription,
            cohort=cohort,
            version="1.5" if cohort == "canary" else "1.4",
            member_id=name,
            routing_attribute="user",
            long_poll_seconds=0.5,
            **kwargs,
        )

        def on_processed(rec: Record, outcome: Outcome, dead: bool) -> None:
            h = rec.headers
            row = Processed(
                h["pubsub.message_id"].decode(),
                name,
                cohort,
                rec.partition,
                (rec.key or h.get("user") or b"").decode(),
                int(h.get("seq", b"-1")),
                int(h["pubsub.delivery_attempt"]),
                time.time(),
                not dead,
            )
            with self._lock:
                self.ledger.append(row)

        member.on_processed = on_processed
        thread = threading.Thread(
            target=member.run, kwargs={"install_signal_handlers": False}, daemon=True
        )
        thread.start()
        self.members[name] = (member, thread)
        return member

    def stop(self, name: str) -> None:
        member, thread = self.members.pop(name)
        member.stop()
        thread.join(30)
        assert not thread.is_alive(), f"{name} did not stop"

    def close(self) -> None:
        # All at once: each member's shutdown waits on its streaming pull for a second or two.
        members = [self.members.pop(name) for name in list(self.members)]
        for member, _ in members:
            member.stop()
        for member, thread in members:
            thread.join(30)
            assert not thread.is_alive(), f"{member.member_id} did not stop"
        self.coordinator.stop()
        self.publisher.stop()

    def apply(self, name: str, *shares: float) -> None:
        spec = {
            "name": name,
            "target": {"transport": "pubsub", "topic": self.topic_id, "group": self.sub_id},
            "stable_version": "1.4",
            "canary_version": "1.5",
            "steps": [
                {"share": s, "approval": True, "hold_seconds": 0.2, "min_messages": 1}
                for s in shares
            ],
            # These tests drive the share by hand; no judge in the way.
            "analysis": {
                "error_rate": None,
                "dead_letter_rate": None,
                "latency": None,
                "lag_growth": None,
            },
        }
        self.coordinator.apply_rollout(parse_rollout_spec(spec))
        self.wait_route(lambda r: r.generation == name and len(r.canary) > 0)

    def wait_route(self, ready: Callable[[Route], bool], timeout: float = 10.0) -> None:
        """Until every running member holds a route for which ``ready`` is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            routes = [m.route for m, _ in self.members.values()]
            if all(r is not None and ready(r) for r in routes):
                return
            time.sleep(0.05)
        raise AssertionError(f"members never got the route: {routes}")

    def publish(self, n: int, users: int = 400) -> list[str]:
        futures = []
        for _ in range(n):
            user = f"user-{self.seq % users}"
            extra = {"ordering_key": user} if self.ordered else {}
            futures.append(
                self.publisher.publish(self.topic, b"{}", user=user, seq=str(self.seq), **extra)
            )
            self.seq += 1
        return [f.result(timeout=60) for f in futures]

    def rows(self) -> list[Processed]:
        with self._lock:
            return list(self.ledger)

    def wait_processed(self, ids: list[str], timeout: float = 60.0) -> list[Processed]:
        want = set(ids)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.rows()
            if want <= {r.message_id for r in rows}:
                return rows
            time.sleep(0.1)
        missing = want - {r.message_id for r in self.rows()}
        raise AssertionError(f"{len(missing)} of {len(want)} never processed")


@pytest.fixture
def group(pubsub_factory: PubSubFactory, pubsub_env: dict[str, str]) -> Iterator[Group]:
    g = Group(pubsub_factory)
    yield g
    g.close()


@pytest.fixture
def ordered_group(pubsub_factory: PubSubFactory, pubsub_env: dict[str, str]) -> Iterator[Group]:
    g = Group(pubsub_factory, ordered=True)
    yield g
    g.close()


def test_the_canary_gets_exactly_its_buckets_without_a_single_nack(group: Group) -> None:
    group.start("stable", "stable-1")
    group.start("stable", "stable-2")
    canary = group.start("canary", "canary-1")
    group.wait_route(lambda r: True)
    group.apply("share-25", 25)
    route = canary.route
    assert route is not None and len(route.canary) == 250
    ids = group.publish(3_000)
    rows = group.wait_processed(ids)
    time.sleep(0.5)  # room for a duplicate to show up
    rows = group.rows()
    assert collections.Counter(r.message_id for r in rows).most_common(1)[0][1] == 1
    # Exactly the canary's buckets reached the canary, and only they did.
    for r in rows:
        assert (r.cohort == "canary") == (r.bucket in route.canary), r
        assert r.bucket == bucket_of(r.key)
    # Every message was delivered once by Pub/Sub: nothing was declined with a nack.
    assert {r.attempt for r in rows} == {1}
    share = 100 * sum(r.cohort == "canary" for r in rows) / len(rows)
    assert 20 < share < 30, share
    relayed = sum(group.members[n][0].counts()["relayed_canary"] for n in ("stable-1", "stable-2"))
    assert relayed == sum(r.cohort == "canary" for r in rows) == canary.counts()["settled_canary"]
    # Per-cohort health: lag as the age of the oldest unprocessed message (ms), delivery
    # latency from the publish time as a KPI, sampled and reported like Kafka's.
    time.sleep(2.5)
    cohorts = group.coordinator.status("share-25")["cohorts"]
    for c in ("stable", "canary"):
        step = cohorts[c]["step"]
        assert step["processed"] > 0
        assert step["lag"] is not None and 0 <= step["lag"] < 10_000
        assert step["kpis"]["delivery_seconds"]["count"] == step["processed"]
        assert 0 < step["kpis"]["delivery_seconds"]["mean"] < 30
        assert step["dead_lettered"] == 0 and step["redeliveries"] == 0


def test_a_rollback_drains_the_canary_backlog_into_stable_in_key_order(
    ordered_group: Group,
) -> None:
    g = ordered_group
    g.start("stable", "stable-1")
    g.start("stable", "stable-2")
    g.start("canary", "canary-1", handler=lambda r: time.sleep(0.05), lanes=2)
    g.wait_route(lambda r: True)
    g.apply("slow-canary", 50)
    ids = g.publish(2_000, users=200)
    time.sleep(1.0)
    canary_done = sum(r.cohort == "canary" for r in g.rows())
    assert canary_done < 300, "the canary should still have a backlog"
    decided = time.monotonic()
    g.coordinator.act("slow-canary", "abort")
    ids += g.publish(500, users=200)  # new messages of the same keys, during the drain
    rows = g.wait_processed(ids, timeout=60)
    drained_after = time.monotonic() - decided
    deadline = time.monotonic() + 10
    while g.coordinator.status("slow-canary")["phase"] != "aborted":
        assert time.monotonic() < deadline, "the rollback never completed"
        time.sleep(0.1)
    status = g.coordinator.status("slow-canary")
    # The rollback is complete only once the canary route is drained: it includes the drain.
    assert status["rollback_seconds"] is not None and status["rollback_seconds"] > 0.5
    assert collections.Counter(r.message_id for r in rows).most_common(1)[0][1] == 1
    assert order_violations(rows) == 0  # type: ignore[arg-type]
    assert {r.attempt for r in rows} == {1}
    stable = [g.members[n][0].counts() for n in ("stable-1", "stable-2")]
    canary = g.members["canary-1"][0].counts()
    # The canary handed back what it held; stable drained the canary subscription.
    assert canary["relayed_return"] > 0
    assert sum(c["settled_return"] for c in stable) == canary["relayed_return"]
    assert sum(c["settled_canary"] for c in stable) > 0
    assert sum(c["order_risks"] for c in stable) == 0
    assert drained_after < 30


def test_route_topics_copy_the_subscriptions_dead_letter_policy_and_ordering(
    ordered_group: Group,
) -> None:
    g = ordered_group
    g.start("stable", "stable-1")
    g.start("canary", "canary-1")
    g.wait_route(lambda r: True)
    g.apply("policy", 10)
    names = route_names(g.sub_id, "policy")
    main = g.factory.subscriber.get_subscription(subscription=g.subscription)
    for sub_id in (names.canary, names.back):
        sub = g.factory.subscriber.get_subscription(
            subscription=g.factory.backend.subscription_path(sub_id)
        )
        assert sub.enable_message_ordering is True
        assert sub.dead_letter_policy == main.dead_letter_policy
        assert sub.ack_deadline_seconds == 10


def _pull(factory: PubSubFactory, subscription: str, wait: float) -> list[Any]:
    """Pull until something comes or ``wait`` seconds passed (an empty pull returns early)."""
    from google.api_core.exceptions import DeadlineExceeded

    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            resp = factory.subscriber.pull(
                request={"subscription": subscription, "max_messages": 10}, timeout=1
            )
        except DeadlineExceeded:
            continue
        if resp.received_messages:
            return list(resp.received_messages)
        time.sleep(0.05)
    return []


def _nack_until_dead_lettered(factory: PubSubFactory, subscription: str) -> None:
    """Nack the one message on ``subscription`` until its 5th delivery; the next pull forwards
    it. (Its first delivery may have gone to the stream of a member that stopped: the emulator
    keeps routing to a closed stream for a while.)"""
    attempt = 0
    while attempt < 5:
        got = _pull(factory, subscription, 15)
        assert len(got) == 1 and got[0].delivery_attempt > attempt
        attempt = got[0].delivery_attempt
        factory.subscriber.modify_ack_deadline(
            request={
                "subscription": subscription,
                "ack_ids": [m.ack_id for m in got],
                "ack_deadline_seconds": 0,
            }
        )
    assert _pull(factory, subscription, 1.5) == []  # moved to the dead-letter topic


def test_policy_dead_letters_count_for_the_cohort_that_read_the_message(group: Group) -> None:
    g = group
    f = g.factory
    # What the members would create: their observers on the dead-letter topic, and a route
    # subscription with the main one's policy. Made first, so that each message below is
    # nacked (by someone else: our members never nack) before any member reads it.
    from pubsub_canary.client.routing import observer_id

    for cohort in ("stable", "canary"):
        f.subscriber.create_subscription(
            request={
                "name": f.backend.subscription_path(observer_id(g.sub_id, cohort)),
                "topic": g.dlq,
            }
        )
    route = route_names(g.sub_id, "dead").canary
    f.publisher.create_topic(name=f.backend.topic_path(route))
    f.subscriber.create_subscription(
        request={
            "name": f.backend.subscription_path(route),
            "topic": f.backend.topic_path(route),
            "dead_letter_policy": {"dead_letter_topic": g.dlq, "max_delivery_attempts": 5},
        }
    )
    g.publisher.publish(f.backend.topic_path(route), b"{}", user="u").result(timeout=30)
    g.publisher.publish(g.topic, b"{}", user="u").result(timeout=30)
    _nack_until_dead_lettered(f, f.backend.subscription_path(route))
    _nack_until_dead_lettered(f, g.subscription)
    stable = g.start("stable", "stable-1")
    canary = g.start("canary", "canary-1")
    g.wait_route(lambda r: True)
    g.apply("dead", 10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if stable.policy_dead_letters and canary.policy_dead_letters:
            break
        time.sleep(0.2)
    assert (stable.policy_dead_letters, canary.policy_dead_letters) == (1, 1)
    time.sleep(1.5)  # reported with the next heartbeats
    totals = g.coordinator.status("dead")["cohorts"]
    assert totals["canary"]["total"]["dead_lettered"] == 1
    assert totals["stable"]["total"]["dead_lettered"] == 1


class Cuttable:
    """A transport whose calls fail while ``cut`` is set: a member cut off the coordinator."""

    def __init__(self, inner: MemoryTransport) -> None:
        self.inner = inner
        self.cut = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.cut:
                time.sleep(0.05)
                raise CoordinatorUnavailable("cut off")
            return attr(*args, **kwargs)

        return call


def test_a_member_cut_off_the_coordinator_stops_before_its_lease_runs_out(group: Group) -> None:
    g = group
    link = Cuttable(MemoryTransport(g.coordinator))
    g.start("stable", "stable-1", transport=link)
    g.wait_route(lambda r: True)
    ids = g.publish(200)
    g.wait_processed(ids)
    cut_at = time.time()
    link.cut = True
    publishing = threading.Event()

    def keep_publishing() -> None:
        while not publishing.is_set():
            g.publish(20)
            time.sleep(0.1)

    t = threading.Thread(target=keep_publishing, daemon=True)
    t.start()
    try:
        time.sleep(LEASE + 1.0)
        after = [r for r in g.rows() if r.at > cut_at]
        assert after, "it processed nothing at all after the cut"
        assert max(r.at for r in after) < cut_at + LEASE, "processed past its lease"
        link.cut = False  # back: it registers again and goes on, nothing lost
    finally:
        publishing.set()
        t.join(10)
    ids = g.publish(50)
    g.wait_processed(ids, timeout=30)
    published = g.seq
    deadline = time.monotonic() + 30
    while len({r.seq for r in g.rows()}) < published and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len({r.seq for r in g.rows()}) == published


@pytest.mark.slow
def test_a_stalled_canary_is_rolled_back_on_the_age_of_its_oldest_message(group: Group) -> None:
    g = group
    release = threading.Event()
    g.start("stable", "stable-1")
    g.start("canary", "canary-1", handler=lambda r: release.wait(60))
    g.wait_route(lambda r: True)
    spec = {
        "name": "stalled",
        "target": {"transport": "pubsub", "topic": g.topic_id, "group": g.sub_id},
        "stable_version": "1.4",
        "canary_version": "1.5",
        "steps": [{"share": 50, "hold_seconds": 120}],
        # Only the lag rule: the stalled canary reports nothing else.
        "analysis": {
            "error_rate": None,
            "dead_letter_rate": None,
            "latency": None,
            "lag_growth": {"min_sample": 4},
        },
    }
    g.coordinator.apply_rollout(parse_rollout_spec(spec))
    ids: list[str] = []
    deadline = time.monotonic() + 40
    try:
        while g.coordinator.status("stalled")["phase"] == "progressing":
            assert time.monotonic() < deadline, "a canary that processes nothing was not caught"
            ids += g.publish(20)
            time.sleep(0.5)
        status = g.coordinator.status("stalled")
        assert status["phase"] in ("rolling_back", "rolled_back"), status["decisions"]
        assert "lag_growth" in status["reason"], status["reason"]
    finally:
        release.set()
    g.wait_processed(ids, timeout=60)
