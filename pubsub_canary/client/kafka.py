"""The Kafka member: a consumer that processes exactly the partitions the coordinator grants.

It never calls ``subscribe()``: the coordinator assigns partitions, the member calls
``incremental_assign()`` at the handed-over offset and commits under the group's ``group.id``
(so kafka-consumer-groups, Burrow and lag exporters keep working). Processing is at least once:
an offset is committed only after its message was handled or dead-lettered, and a dead letter
is flushed to the broker before the commit that passes it (I2).

On a revoke it stops taking messages of that partition, finishes the message in hand, commits
synchronously and releases the partition with the next offset, which is where the new owner
starts (I3). If it cannot renew its lease it stops processing and committing before the
coordinator may reassign its partitions (I1).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from pubsub_canary.client.member import Handler, Member
from pubsub_canary.client.processing import (
    MetricsAccumulator,
    Outcome,
    Record,
    RetryPolicy,
    run_handler,
)
from pubsub_canary.client.session import MemberSession, UnitGrant
from pubsub_canary.client.transport import CoordinatorTransport
from pubsub_canary.errors import BrokerError, CanaryError, ConfigError

log = logging.getLogger("pubsub_canary.member.kafka")

#: Keys the member must set itself; a user's value for them is refused.
FORCED = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "enable.partition.eof": False,
}


class KafkaMember(Member):
    """A consumer-group member under the coordinator's control.

    Args:
        handler: called once per message with a :class:`Record`; raise to fail it.
        coordinator: the coordinator's URL, or a transport.
        bootstrap_servers: Kafka brokers.
        topic, group_id: what to consume, and the group whose offsets are committed.
        cohort: ``stable`` or ``canary``; version: this program's version.
        dead_letter_topic: where poison messages go (default ``<topic>.dlq``).
        retry: how often to retry a failing handler.
        consumer_config / producer_config: extra librdkafka settings.
        commit_interval_seconds: how often processed offsets are committed between handoffs;
            the window of messages a crash may process twice.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        coordinator: str | CoordinatorTransport,
        bootstrap_servers: str,
        topic: str,
        group_id: str,
        cohort: str,
        version: str,
        dead_letter_topic: str | None = None,
        retry: RetryPolicy | None = None,
        member_id: str | None = None,
        consumer_config: dict[str, Any] | None = None,
        producer_config: dict[str, Any] | None = None,
        commit_interval_seconds: float = 0.5,
        batch_size: int = 200,
        long_poll_seconds: float = 1.0,
    ) -> None:
        super().__init__(
            handler,
            coordinator=coordinator,
            cohort=cohort,
            version=version,
            retry=retry,
            member_id=member_id,
            long_poll_seconds=long_poll_seconds,
            metrics=MetricsAccumulator(),
        )
        for k in FORCED:
            if consumer_config and k in consumer_config:
                raise ConfigError(
                    f"consumer_config may not set {k!r}: the member manages commits itself",
                    field=k,
                )
        self.topic = topic
        self.group_id = group_id
        self.dlq_topic = dead_letter_topic or f"{topic}.dlq"
        self.commit_interval = commit_interval_seconds
        self.batch_size = batch_size
        self._consumer_config = {
            "bootstrap.servers": bootstrap_servers,
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "client.id": f"pubsub-canary-{cohort}",
            # librdkafka's 500 ms default can hold a newly assigned partition's first fetch
            # behind a waiting one; handoffs are faster with a shorter wait.
            "fetch.wait.max.ms": 100,
            **(consumer_config or {}),
            **FORCED,
        }
        self._producer_config = {
            "bootstrap.servers": bootstrap_servers,
            "enable.idempotence": True,
            "linger.ms": 5,
            **(producer_config or {}),
        }
        self._consumer: Any = None
        self._producer: Any = None
        self._held: dict[int, UnitGrant] = {}  # partitions assigned to the consumer
        self._next: dict[int, int] = {}  # next offset to process, per held partition
        self._committed: dict[int, int] = {}
        self._resume: dict[int, tuple[int, int | None]] = {}  # unit -> (epoch, offset)
        #: (unit, epoch) pairs already released: a stale view must not release them again.
        self._released: set[tuple[int, int]] = set()
        self._redeliver: dict[int, int] = {}  # unit -> offset below which a crash re-delivers
        self._seen_generation = -1
        self._dlq_failed: str | None = None
        self._last_commit = 0.0
        self._last_report = 0.0

    # --- public -------------------------------------------------------------------------------

    @property
    def partitions(self) -> list[int]:
        return sorted(self._held)

    # --- the loop -----------------------------------------------------------------------------

    def _open(self) -> None:
        from confluent_kafka import Consumer, KafkaException, Producer

        try:
            self._consumer = Consumer(self._consumer_config)
            self._producer = Producer(self._producer_config)
            md = self._consumer.list_topics(self.topic, timeout=10)
        except KafkaException as exc:
            raise BrokerError(f"cannot reach Kafka: {exc}") from None
        t = md.topics.get(self.topic)
        if t is None or t.error is not None or not t.partitions:
            raise ConfigError(
                f"topic {self.topic!r} does not exist on "
                f"{self._consumer_config['bootstrap.servers']}",
                field="topic",
            )
        self.session = MemberSession(
            self._transport,
            transport_kind="kafka",
            topic=self.topic,
            group_id=self.group_id,
            units=len(t.partitions),
            cohort=self.cohort,
            version=self.version,
            member_id=self._member_id,
            long_poll_seconds=self._long_poll,
            meta=self._registration_meta(),
        )
        self.session.start()

    def _step(self) -> None:
        s = self.session
        assert s is not None
        if s.generation != self._seen_generation:
            self._sync()
        if s.lease_ending():
            if self._held:
                self._stop_for_lease()
            s.changed.wait(0.1)
            s.changed.clear()
            return
        if not self._held:
            s.changed.wait(0.1)
            s.changed.clear()
            self._report()
            return
        # Take what is already fetched; wait (at most 50 ms) only when nothing is, and then
        # only for the first message, so a new partition's first message is not held back.
        consume = self._consumer.consume
        msgs = consume(num_messages=self.batch_size, timeout=0)
        if not msgs:
            msgs = consume(num_messages=1, timeout=0.05)
        held, nxt_of = self._held, self._next
        soft_deadline = s.soft_deadline
        now = time.monotonic
        ok: list[float] = []  # latencies of first-attempt successes, counted once per batch
        for i, msg in enumerate(msgs):
            if msg.error() is not None:
                self._broker_error(msg.error())
                continue
            p = msg.partition()
            if p not in held:
                continue  # revoked while buffered; the new owner starts at our final offset
            off = msg.offset()
            nxt = nxt_of.get(p)
            if nxt is not None and off < nxt:
                continue  # already processed (a re-fetch after seek)
            if now() >= soft_deadline:
                # The lease is ending: stop here. The rest of the batch was fetched but not
                # processed; fetch it again, in case the lease is renewed before we stop.
                self._rewind(msgs[i:])
                break
            self._process(msg, p, off, ok)
        if ok:
            self.metrics.add_ok(ok)
        t = now()
        if t - self._last_report >= 0.1:
            self._report()
        if t - self._last_commit >= self.commit_interval:
            self._commit(asynchronous=True)

    def _rewind(self, unprocessed: list[Any]) -> None:
        """Seek each partition back to its first fetched-but-unprocessed message."""
        from confluent_kafka import KafkaException, TopicPartition

        first: dict[int, int] = {}
        for msg in unprocessed:
            if msg.error() is None and msg.partition() in self._held:
                first.setdefault(msg.partition(), msg.offset())
        for p, off in first.items():
            try:
                self._consumer.seek(TopicPartition(self.topic, p, off))
            except KafkaException as exc:
                # Without the seek the partition must not go on: drop it and take it again
                # from our own next offset once the view is read again.
                log.warning("cannot seek partition %s back to %s (%s); restarting it", p, off, exc)
                self._seen_generation = -1
                self._resume[p] = (self._held[p].epoch, self._next.get(p, off))
                self._consumer.incremental_unassign([TopicPartition(self.topic, p)])
                self._held.pop(p)

    def _process(self, msg: Any, p: int, off: int, ok: list[float]) -> None:
        ts_type, ts = msg.timestamp()
        record = Record(
            self.topic,
            p,
            off,
            msg.key(),
            msg.value(),
            msg.headers(),
            ts / 1000.0 if ts_type else None,
        )
        # Fast path: the first attempt here; the retry machinery only when it fails.
        started = time.perf_counter()
        try:
            self._call(record)
        except Exception as exc:
            outcome = run_handler(self._call, record, self.retry, first_error=exc, started=started)
            dead = not outcome.ok
            if dead:
                self._dead_letter(record, outcome)
            self.metrics.add(outcome, dead)
        else:
            elapsed = time.perf_counter() - started
            ok.append(elapsed)
            dead = False
            outcome = None
        until = self._redeliver.get(p)
        if until is not None:
            if off < until:
                self.metrics.add_redelivery()
            else:
                del self._redeliver[p]
        self._next[p] = off + 1
        if self.on_processed is not None:
            self.on_processed(record, outcome or Outcome(True, 1, None, elapsed), dead)

    def _dead_letter(self, record: Record, outcome: Outcome) -> None:
        headers = [
            ("pubsub_canary.original_topic", record.topic.encode()),
            ("pubsub_canary.original_partition", str(record.partition).encode()),
            ("pubsub_canary.original_offset", str(record.offset).encode()),
            ("pubsub_canary.cohort", self.cohort.encode()),
            ("pubsub_canary.version", self.version.encode()),
            ("pubsub_canary.error", (outcome.error or "").encode()[:1000]),
            ("pubsub_canary.attempts", str(outcome.attempts).encode()),
        ]

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                self._dlq_failed = str(err)

        self._producer.produce(
            self.dlq_topic,
            value=record.value,
            key=record.key,
            headers=headers,
            on_delivery=delivered,
        )
        self._producer.poll(0)

    def _report(self) -> None:
        assert self.session is not None
        self._last_report = time.monotonic()
        self.session.report(self.metrics.drain(), dict(self._next))

    def _broker_error(self, err: Any) -> None:
        if err.fatal():
            raise BrokerError(f"fatal Kafka error: {err}")
        log.warning("Kafka: %s", err)

    # --- assignment changes -------------------------------------------------------------------

    def _sync(self) -> None:
        """Apply the coordinator's view: release what is revoked, assign what is granted."""
        from confluent_kafka import OFFSET_STORED, TopicPartition

        s = self.session
        assert s is not None
        self._seen_generation = s.generation
        view = s.view()
        self._view_changed(view)
        to_release = [
            g
            for p, g in self._held.items()
            if p not in view or view[p].status != "owned" or view[p].epoch != g.epoch
        ]
        if to_release:
            self._release(to_release)
        # Revoked while we did not hold them (we stopped when our lease was ending): hand them
        # back at the offset we committed then, or the group's committed offset.
        orphans = [
            g
            for p, g in view.items()
            if g.status == "revoking" and p not in self._held and (p, g.epoch) not in self._released
        ]
        if orphans and s.lease_valid():
            released = []
            for g in orphans:
                epoch, offset = self._resume.pop(g.unit, (None, None))
                released.append((g.unit, g.epoch, offset if epoch == g.epoch else None))
                self._released.add((g.unit, g.epoch))
            try:
                s.release(released)
                log.info("released partitions %s we had stopped", [r[0] for r in released])
            except CanaryError as exc:
                s.queue_release(released)
                log.warning("release not acknowledged (%s); resent with heartbeats", exc.message)
        grants = [g for p, g in view.items() if g.status == "owned" and p not in self._held]
        if grants and s.lease_ending():
            self._seen_generation = -1  # take them once the lease is renewed
        elif grants:
            starts: dict[int, int | None] = {}
            for g in grants:
                epoch, resume_at = self._resume.pop(g.unit, (None, None))
                starts[g.unit] = resume_at if epoch == g.epoch else g.offset
            # Offsets known to be committed: the releasing owner's (it committed before it
            # released) or our own resume point. A start restored from a checkpoint may be
            # past the committed offset, and must be committed by us.
            committed = dict(starts)
            starts = self._prepare_grants(grants, starts)
            tps = [
                TopicPartition(self.topic, u, off if off is not None else OFFSET_STORED)
                for u, off in starts.items()
            ]
            self._consumer.incremental_assign(tps)
            for g in grants:
                self._held[g.unit] = g
                if g.redeliver_until is not None:
                    self._redeliver[g.unit] = g.redeliver_until
                off = starts[g.unit]
                if off is not None:
                    self._next[g.unit] = off
                    if committed.get(g.unit) == off:
                        self._committed[g.unit] = off
            log.info(
                "granted partitions %s (epochs %s)",
                [g.unit for g in grants],
                [g.epoch for g in grants],
            )

    def _release(self, grants: list[UnitGrant]) -> None:
        from confluent_kafka import TopicPartition

        s = self.session
        assert s is not None
        parts = [g.unit for g in grants]
        can_commit = s.lease_valid()
        if can_commit:
            self._commit(asynchronous=False, only=parts)
        self._consumer.incremental_unassign([TopicPartition(self.topic, p) for p in parts])
        released = []
        for g in grants:
            # The new owner starts at our next offset; None: the group's committed offset.
            nxt = self._next.pop(g.unit, None) if can_commit else None
            self._held.pop(g.unit, None)
            self._committed.pop(g.unit, None)
            released.append((g.unit, g.epoch, nxt))
            self._released.add((g.unit, g.epoch))
        self._forget(parts)
        self._report()
        if can_commit:
            try:
                s.release(released)
            except CanaryError as exc:
                # Resent with every heartbeat until one gets through (releases are fenced by
                # epoch, so a repeat is harmless); the unit waits for it, nothing is lost.
                s.queue_release(released)
                log.warning("release not acknowledged (%s); resent with heartbeats", exc.message)
        log.info("released partitions %s at %s", parts, [r[2] for r in released])

    def _stop_for_lease(self) -> None:
        """The lease is about to run out unrenewed: commit while it still holds, then stop."""
        assert self.session is not None
        if self.session.lease_valid():
            try:
                self._commit(asynchronous=False)
                log.warning("cannot renew the lease: committed and stopped all partitions")
            except CanaryError as exc:
                log.warning("cannot renew the lease; final commit failed: %s", exc.message)
        else:
            log.warning("lease ran out: stopped all partitions without committing")
        self._drop_all()

    def _drop_all(self) -> None:
        from confluent_kafka import TopicPartition

        parts = list(self._held)
        self._consumer.incremental_unassign([TopicPartition(self.topic, p) for p in parts])
        # If the coordinator still names us owner at the same epoch once we can renew (it was
        # down, or we were cut off only briefly), we resume from where we committed.
        self._resume = {p: (g.epoch, self._committed.get(p)) for p, g in self._held.items()}
        self._forget(parts)
        self._held.clear()
        self._next.clear()
        self._committed.clear()
        self._seen_generation = -1  # re-read the view once the lease is renewed

    def _commit(self, *, asynchronous: bool, only: list[int] | None = None) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        self._last_commit = time.monotonic()
        parts = [
            p
            for p in (only if only is not None else list(self._next))
            if p in self._next and self._next[p] != self._committed.get(p)
        ]
        if not parts:
            return
        assert self.session is not None
        if not self.session.lease_valid():
            return
        self._before_commit(parts)
        if self._producer is not None and self._producer.flush(30) > 0:
            raise BrokerError("writes not delivered within 30 s; not committing past them")
        if self._dlq_failed:
            raise BrokerError(f"a dead letter could not be written: {self._dlq_failed}")
        self._after_flush()
        offsets = [TopicPartition(self.topic, p, self._next[p]) for p in parts]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as exc:
            raise BrokerError(f"commit failed: {exc}") from None
        for p in parts:
            self._committed[p] = self._next[p]

    # --- hooks for subclasses (the stateful member) -------------------------------------------

    def _call(self, record: Record) -> object:
        """Run the user's handler on one record (one attempt)."""
        return self.handler(record)

    def _registration_meta(self) -> dict[str, Any]:
        return {}

    def _prepare_grants(
        self, grants: list[UnitGrant], starts: dict[int, int | None]
    ) -> dict[int, int | None]:
        """Before newly granted partitions are assigned: may change where each starts."""
        return starts

    def _view_changed(self, view: dict[int, UnitGrant]) -> None:
        """The coordinator's view of this member changed (before grants and releases)."""

    def _before_commit(self, parts: list[int]) -> None:
        """Before offsets of ``parts`` are committed (after the producer flush, they are)."""

    def _after_flush(self) -> None:
        """Every write before the commit is on the broker: raise if one of them failed."""

    def _forget(self, parts: list[int]) -> None:
        """These partitions are no longer ours."""

    # --- shutdown -----------------------------------------------------------------------------

    def _shutdown(self, timeout: float) -> None:
        """Graceful: ask for no more work, release every partition as it is revoked."""
        s = self.session
        assert s is not None
        try:
            s.leave()
        except CanaryError as exc:
            log.warning("leave failed (%s); committing and exiting", exc.message)
        deadline = time.monotonic() + timeout
        while self._held and time.monotonic() < deadline and s.lease_valid():
            self._sync()
            if self._held:
                s.changed.wait(0.05)
                s.changed.clear()
        if self._held:
            self._commit(asynchronous=False)
        self._report()
        with contextlib.suppress(CanaryError):
            s.heartbeat_once()  # deliver the last metric deltas

    def _close(self) -> None:
        if self.session is not None:
            self.session.stop()
        if self._producer is not None:
            self._producer.flush(10)
        if self._consumer is not None:
            self._consumer.close()
