"""The stateful Kafka member: per-partition state that moves with the partition.

The handler is ``handler(record, state)`` where ``state`` is the
:class:`~pubsub_canary.client.state.PartitionState` of the record's partition. On a grant the
member rebuilds the partition's state from the changelog and starts at the offset the state
reflects; at every commit it writes the changed keys and a checkpoint marker to the changelog,
flushes, and only then commits the input offset. See :mod:`pubsub_canary.client.state`.

The member registers the state formats it reads and writes, so that the coordinator can refuse
a rollout whose stable version could not read the canary's state before any partition moves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from pubsub_canary.client.kafka import KafkaMember
from pubsub_canary.client.processing import Record
from pubsub_canary.client.session import MemberSession, UnitGrant
from pubsub_canary.client.state import (
    ChangelogReader,
    ChangelogTail,
    ChangelogWriter,
    Migration,
    PartitionState,
    Seed,
    StateFormatError,
    StateFormats,
)
from pubsub_canary.errors import ConfigError

log = logging.getLogger("pubsub_canary.member.state")

StatefulHandler = Callable[[Record, PartitionState], object]


#: How long the state of a released partition is kept for a standby warm-up that may follow.
RETIRED_SECONDS = 30.0
#: A warm-up's longest wait for the next record: a grant that stops it waits at most this.
WARMER_POLL_SECONDS = 0.02
#: How often a warm-up asks the broker for the changelog's end, to report how far behind it
#: is: often while a move waits for it, rarely for a standby (many per member, none urgent).
WARMING_REFRESH_SECONDS = 0.2
STANDBY_REFRESH_SECONDS = 2.0


class StatefulKafkaMember(KafkaMember):
    """A :class:`KafkaMember` whose handler keeps per-partition state.

    Args:
        handler: ``handler(record, state)``; changes to ``state`` made by an attempt that
            raises are undone, so a retry or a dead letter leaves no partial state.
        changelog_topic: the compacted changelog, one partition per input partition
            (default ``<group_id>.changelog``). It must exist.
        state_format: the state format version this version writes (default 1).
        reads: the formats it can read (default: only the one it writes).
        migrations: ``{from_format: function}`` turning a value of an unreadable format into
            a readable one.
        Other arguments: as :class:`KafkaMember`.
    """

    def __init__(
        self,
        handler: StatefulHandler,
        *,
        changelog_topic: str | None = None,
        state_format: int = 1,
        reads: set[int] | frozenset[int] | None = None,
        migrations: Mapping[int, Migration] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(self._unused, **kwargs)
        self.state_handler = handler
        self.changelog_topic = changelog_topic or f"{self.group_id}.changelog"
        self.formats = StateFormats(
            writes=state_format,
            reads=frozenset(reads) if reads is not None else frozenset({state_format}),
            migrations=dict(migrations or {}),
        )
        self.states: dict[int, PartitionState] = {}
        self._writer: ChangelogWriter | None = None
        self._reader = ChangelogReader(self._consumer_config, self.changelog_topic, self.formats)
        #: Per partition: seconds spent restoring state on the last grant (after warm-up).
        self.restore_seconds: dict[int, float] = {}
        #: Per partition: changelog records read on the last grant (after warm-up).
        self.restore_records: dict[int, int] = {}
        self._warmers: dict[int, Warmer] = {}
        #: States of partitions just released, as of their final marker, with when: the
        #: coordinator may name this member their standby (it would get them back on a
        #: rollback), and then the warm-up starts from here instead of the changelog's start.
        self._retired: dict[int, tuple[Seed, float]] = {}

    @staticmethod
    def _unused(record: Record) -> object:  # pragma: no cover - replaced by _call
        raise AssertionError("stateful members call state_handler")

    def _open(self) -> None:
        super()._open()
        md = self._consumer.list_topics(self.changelog_topic, timeout=10)
        t = md.topics.get(self.changelog_topic)
        inputs = len(
            self._consumer.list_topics(self.topic, timeout=10).topics[self.topic].partitions
        )
        if t is None or t.error is not None or len(t.partitions) < inputs:
            have = 0 if t is None or t.error is not None else len(t.partitions)
            raise ConfigError(
                f"changelog topic {self.changelog_topic!r} needs {inputs} partitions (one per "
                f"partition of {self.topic!r}), it has {have}; create it compacted "
                "(cleanup.policy=compact), e.g. with pubsub_canary.client.state.ensure_changelog",
                field="changelog_topic",
            )
        self._writer = ChangelogWriter(self._producer, self.changelog_topic, self.formats)

    def _registration_meta(self) -> dict[str, Any]:
        return {"state_formats": self.formats.as_meta(), "changelog": self.changelog_topic}

    def _call(self, record: Record) -> object:
        state = self.states[record.partition]
        try:
            result = self.state_handler(record, state)
        except BaseException:
            state.message_failed()
            raise
        state.message_done()
        return result

    def _prepare_grants(
        self, grants: list[UnitGrant], starts: dict[int, int | None]
    ) -> dict[int, int | None]:
        assert self.session is not None
        self._reader.add_rollout_migrations(self.session.state_migrations)
        for g in grants:
            if self._writer is not None:  # a marker of an earlier ownership vouches for nothing
                self._writer.last_marker.pop(g.unit, None)
            want = starts[g.unit]
            # A graceful handoff names the offset the old owner's last marker reflects: read
            # the changelog up to that marker. After a crash (no offset) take the last
            # complete checkpoint, whatever the committed offset says. A unit warmed up in
            # the background only has the last few batches left to read.
            warmer = self._warmers.pop(g.unit, None)
            tail = warmer.finish() if warmer is not None else None
            if tail is None:  # never warmed, or the warm-up failed: read from the start,
                # or from our own last marker if we held the partition moments ago
                tail = self._reader.tail(g.unit, self._take_seed(g.unit))
            self.session.report_warm(g.unit, None)
            try:
                restored = tail.catch_up(until=want)
            finally:
                tail.close()
            self.states[g.unit] = PartitionState(g.unit, restored.data)
            self.restore_seconds[g.unit] = restored.seconds
            self.restore_records[g.unit] = restored.caught_up
            if restored.through is not None:
                starts[g.unit] = restored.through
            log.info(
                "partition %s: state of %d keys restored from %d changelog records (%d of them "
                "on the grant, the rest warmed up before) in %.3fs, starting at offset %s",
                g.unit,
                len(restored.data),
                restored.records,
                restored.caught_up,
                restored.seconds,
                starts[g.unit],
            )
        return starts

    def _before_commit(self, parts: list[int]) -> None:
        assert self._writer is not None
        for p in parts:
            if p in self.states and p in self._held:
                self._writer.checkpoint(p, self._held[p].epoch, self._next[p], self.states[p])

    def _after_flush(self) -> None:
        assert self._writer is not None
        self._writer.raise_if_failed()

    def _view_changed(self, view: dict[int, UnitGrant]) -> None:
        # "warming": this member is about to own the unit; "standby": it would get the unit
        # back if the rollout were rolled back now. Both keep the unit's state warm.
        wanted = {u for u, g in view.items() if g.status in ("warming", "standby")}
        assert self.session is not None
        # Moves called off (or a rollout over): stop them all first, then wait for each, so
        # dropping many standbys costs one poll, not one per unit.
        dropped = [
            self._warmers.pop(u)
            for u in list(self._warmers)
            if u not in wanted and not (u in view and view[u].status == "owned")
        ]
        for w in dropped:
            w.request_stop()
        for w in dropped:
            w.discard()
            self.session.report_warm(w.tail.partition, None)
        if wanted - set(self._warmers):
            # State the canary wrote may need the rollout's migrations to be read.
            try:
                self._reader.add_rollout_migrations(self.session.state_migrations)
            except StateFormatError as exc:
                # Not fatal here: the warm-up starts anyway, and a grant that needs the
                # migration fails then, naming it (a standby may never be granted).
                log.warning("%s", exc.message)
        for u in sorted(wanted - set(self._warmers)):
            self._warmers[u] = Warmer(self._reader.tail(u, self._take_seed(u)), self.session)
        for u, w in self._warmers.items():
            standby = u in view and view[u].status == "standby"
            w.refresh_seconds = STANDBY_REFRESH_SECONDS if standby else WARMING_REFRESH_SECONDS
        self._drop_old_seeds()

    def _drop_old_seeds(self) -> None:
        now = time.monotonic()
        for u, (_, since) in list(self._retired.items()):
            if now - since > RETIRED_SECONDS:
                del self._retired[u]

    def _take_seed(self, unit: int) -> Seed | None:
        self._drop_old_seeds()
        seed, _ = self._retired.pop(unit, (None, 0.0))
        return seed

    def _close(self) -> None:
        for w in self._warmers.values():
            w.request_stop()
        for w in self._warmers.values():
            w.discard()
        self._warmers.clear()
        super()._close()

    def _forget(self, parts: list[int]) -> None:
        markers = self._writer.last_marker if self._writer is not None else {}
        for p in parts:
            state = self.states.pop(p, None)
            marker = markers.pop(p, None)
            # Kept only if it is exactly what the changelog holds up to our last marker: every
            # change was written (none dirty) and that marker is on the broker.
            if state is not None and marker is not None and state.is_clean():
                self._retired[p] = (Seed(state.detach(), *marker), time.monotonic())


class Warmer:
    """Reads a changelog partition in the background while another member still owns it.

    It reports how far it is from the changelog's end with every heartbeat; the coordinator
    revokes the partition from its owner once this is small, so the handoff only waits for the
    last few batches instead of the whole state. A stable member keeps standby units warm the
    same way, for as long as a rollback would give them back to it.
    """

    def __init__(self, tail: ChangelogTail, session: MemberSession) -> None:
        self.tail = tail
        self.session = session
        self.failed: str | None = None
        #: How often to ask the broker for the changelog's end (set by the member).
        self.refresh_seconds = WARMING_REFRESH_SECONDS
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"warm-{tail.partition}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                # Short, so that a grant stopping the warm-up waits at most this long.
                self.tail.poll(WARMER_POLL_SECONDS)
                behind = self.tail.behind(max_age=self.refresh_seconds)
                if not self._stop.is_set():  # once stopped, the member reports for the unit
                    self.session.report_warm(self.tail.partition, behind)
        except Exception as exc:  # the grant reads the partition from the start instead
            self.failed = str(exc)
            log.warning("warming partition %s failed: %s", self.tail.partition, exc)

    def request_stop(self) -> None:
        """Ask the thread to stop after its current poll (``finish`` waits for it)."""
        self._stop.set()

    def finish(self) -> ChangelogTail | None:
        """Stop reading in the background; the caller continues with the tail.

        None when the warm-up failed (a batch may be half applied) or did not stop: the caller
        reads the partition from the start instead.
        """
        self._stop.set()
        self._thread.join(10)
        if self._thread.is_alive():
            log.warning("warming partition %s did not stop; reading it anew", self.tail.partition)
            return None  # its consumer is still in use by the thread: leave it
        if self.failed is not None:
            self.tail.close()
            return None
        return self.tail

    def discard(self) -> None:
        """Stop and drop the warm-up."""
        tail = self.finish()
        if tail is not None:
            tail.close()
