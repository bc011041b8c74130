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
from collections.abc import Callable, Mapping
from typing import Any

from pubsub_canary.client.kafka import KafkaMember
from pubsub_canary.client.processing import Record
from pubsub_canary.client.session import UnitGrant
from pubsub_canary.client.state import (
    ChangelogReader,
    ChangelogWriter,
    Migration,
    PartitionState,
    StateFormats,
)
from pubsub_canary.errors import ConfigError

log = logging.getLogger("pubsub_canary.member.state")

StatefulHandler = Callable[[Record, PartitionState], object]


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
        #: Per partition: seconds spent restoring state on the last grant.
        self.restore_seconds: dict[int, float] = {}

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
            want = starts[g.unit]
            # A graceful handoff names the offset the old owner's last marker reflects: read
            # the changelog up to that marker. After a crash (no offset) take the last
            # complete checkpoint, whatever the committed offset says.
            restored = self._reader.restore(g.unit, until=want)
            self.states[g.unit] = PartitionState(g.unit, restored.data)
            self.restore_seconds[g.unit] = restored.seconds
            if restored.through is not None:
                starts[g.unit] = restored.through
            log.info(
                "partition %s: state of %d keys restored from %d changelog records in %.3fs, "
                "starting at offset %s",
                g.unit,
                len(restored.data),
                restored.records,
                restored.seconds,
                starts[g.unit],
            )
        return starts

    def _before_commit(self, parts: list[int]) -> None:
        assert self._writer is not None
        for p in parts:
            if p in self.states and p in self._held:
                self._writer.checkpoint(p, self._held[p].epoch, self._next[p], self.states[p])

    def _forget(self, parts: list[int]) -> None:
        for p in parts:
            self.states.pop(p, None)
