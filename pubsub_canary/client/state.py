"""Per-partition state for stateful consumers, kept in memory and in a Kafka changelog topic.

A handler gets a :class:`PartitionState` (a small key-value map) beside each record. The member
keeps each partition's state in memory and, at every commit, writes the keys that changed since
the last one to the group's changelog topic (one changelog partition per input partition) as a
**batch closed by a checkpoint marker**. Every record of a batch carries the writer's fencing
epoch and the input offset the batch reflects; the marker is written last, flushed, and only
then is the input offset committed.

Restoring a partition reads its changelog from the start and applies a batch only when its
marker arrives (records of a batch whose writer crashed before writing its marker carry an older
epoch and are dropped). The restored state therefore reflects *exactly* the messages before the
last marker's offset, and the new owner starts there: state and offsets agree (I4).

State values are JSON. Each record carries the writer's state format version; a reader applies
a migration for a format it cannot read, and the coordinator refuses a rollout whose stable
version could not read what the canary writes (checked before any partition moves).

**Record encoding.** A key's record carries its stamps in a short value prefix,
``<format>,<epoch>;<JSON value>``, and no headers: 27 bytes for a 12-byte key and a small value
instead of 66 with three headers, so restores read and decode less. Records that cannot carry
a prefix carry headers instead: a deletion (its value must stay null for compaction) has
``pc.epoch`` and ``pc.format``, and the marker has those and ``pc.through``. Readers also take
records stamped with headers only (the encoding before the prefix).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from pubsub_canary.errors import BrokerError, ConfigError

MARKER_KEY = b"__pubsub_canary_checkpoint__"


def marker_key(epoch: int) -> bytes:
    """The key of an owner's markers: one per epoch, so compaction keeps each owner's last.

    With one key for every marker, compaction would keep only the newest, and a reader would
    find earlier owners' surviving records with no marker of their epoch and drop them.
    """
    return MARKER_KEY + b":" + str(epoch).encode()


def is_marker(key: bytes | None) -> bool:
    return key is not None and (key == MARKER_KEY or key.startswith(MARKER_KEY + b":"))


H_EPOCH = "pc.epoch"
H_THROUGH = "pc.through"
H_FORMAT = "pc.format"

#: The changelog record encoding this library writes (2: stamps in a value prefix) and those it
#: reads (1: stamps in headers). Members declare both, and the coordinator refuses a rollout
#: whose versions could not read each other's changelog records.
ENCODING = 2
READS_ENCODINGS = (1, 2)

#: A migration turns a value written in one format into one the reader understands.
Migration = Callable[[Any], Any]


class StateFormatError(ConfigError):
    """A changelog record has a state format this member cannot read and no migration covers."""


@dataclass(frozen=True)
class StateFormats:
    """The state format versions a member reads and the one it writes."""

    writes: int = 1
    reads: frozenset[int] = frozenset({1})
    #: from_format -> function turning such a value into one in a format this member reads.
    migrations: Mapping[int, Migration] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.writes not in self.reads:
            raise ConfigError(
                f"state format {self.writes} is written but not in reads {sorted(self.reads)}; "
                "a member must read what it writes",
                field="state_formats",
            )

    def as_meta(self) -> dict[str, Any]:
        return {
            "writes": self.writes,
            "reads": sorted(self.reads),
            "migrates": sorted(self.migrations),
            "encoding": {"writes": ENCODING, "reads": list(READS_ENCODINGS)},
        }


class PartitionState(MutableMapping[str, Any]):
    """The state of one partition, as a handler sees it: a map of str -> JSON value."""

    def __init__(self, partition: int, data: dict[str, Any] | None = None) -> None:
        self.partition = partition
        self._data: dict[str, Any] = data if data is not None else {}
        #: Keys changed since the last checkpoint, in the order of their first change (a dict
        #: keeps it): the changelog gets them in a reproducible order, which also compresses
        #: better than a set's hash order when keys are written in sequence.
        self._dirty: dict[str, None] = {}
        #: Old values of the keys the current message changed, to undo a failed attempt.
        self._undo: dict[str, tuple[bool, Any]] = {}

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def _remember(self, key: str) -> None:
        if key not in self._undo:
            self._undo[key] = (key in self._data, self._data.get(key))

    def __setitem__(self, key: str, value: Any) -> None:
        if value is None:  # None is a deletion in the changelog: the same here
            self.pop(key, None)
            return
        self._remember(key)
        self._data[key] = value
        self._dirty[key] = None

    def __delitem__(self, key: str) -> None:
        self._remember(key)
        del self._data[key]
        self._dirty[key] = None

    def message_done(self) -> None:
        """The current message succeeded: keep its changes."""
        self._undo.clear()

    def message_failed(self) -> None:
        """The current attempt raised: put back what it changed, so a retry starts clean."""
        for key, (existed, old) in self._undo.items():
            if existed:
                self._data[key] = old
            else:
                self._data.pop(key, None)
        self._undo.clear()

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def take_dirty(self) -> list[tuple[str, Any]]:
        """The changed keys since the last call, in order, with their values (None: deleted)."""
        out = [(k, self._data.get(k)) for k in self._dirty]
        self._dirty.clear()
        return out

    def snapshot(self) -> dict[str, Any]:
        return dict(self._data)

    def is_clean(self) -> bool:
        """Every change has been taken for the changelog, and no attempt is half done."""
        return not self._dirty and not self._undo

    def detach(self) -> dict[str, Any]:
        """Hand the data over (this object must not be used afterwards)."""
        data, self._data = self._data, {}
        return data


class ChangelogWriter:
    """Writes checkpoint batches to the changelog; flushes before the caller commits."""

    def __init__(self, producer: Any, topic: str, formats: StateFormats) -> None:
        self.producer = producer
        self.topic = topic
        self.formats = formats
        self._failed: str | None = None
        #: partition -> (input offset, changelog offset) of its last marker on the broker, when
        #: every record of that marker's batch got there too.
        self.last_marker: dict[int, tuple[int, int]] = {}
        #: Partitions whose current batch lost a record.
        self._batch_failed: set[int] = set()

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._failed = str(err)
            self._batch_failed.add(msg.partition())
        elif is_marker(msg.key()) and msg.partition() not in self._batch_failed:
            self.last_marker[msg.partition()] = (int(msg.value()), msg.offset())

    def checkpoint(self, partition: int, epoch: int, through: int, state: PartitionState) -> None:
        """Queue the changed keys of ``state`` and a marker saying it reflects ``< through``."""
        # Until this batch's marker is delivered, no marker vouches for the state in memory.
        self.last_marker.pop(partition, None)
        self._batch_failed.discard(partition)
        fmt = self.formats.writes
        stamps = [(H_EPOCH, str(epoch).encode()), (H_FORMAT, str(fmt).encode())]
        prefix = stamp_prefix(fmt, epoch)
        produce = self.producer.produce
        for key, value in state.take_dirty():
            # A deletion stays a null value (compaction drops the key): its stamps go in headers.
            stamped = {"headers": stamps} if value is None else {}
            produce(
                self.topic,
                key=key.encode(),
                value=None if value is None else prefix + json.dumps(value).encode(),
                partition=partition,
                on_delivery=self._delivered,
                **stamped,
            )
            if len(self.producer) > 50_000:
                self.producer.poll(0)
        produce(
            self.topic,
            key=marker_key(epoch),
            value=str(through).encode(),
            partition=partition,
            headers=[*stamps, (H_THROUGH, str(through).encode())],
            on_delivery=self._delivered,
        )

    def flush(self, timeout: float = 30.0) -> None:
        """Block until every queued write is on the broker; raise if one failed."""
        if self.producer.flush(timeout) > 0:
            raise BrokerError(f"changelog writes to {self.topic} not delivered in {timeout} s")
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        """A write failed since the last call: the state in memory is ahead of the changelog,
        so no offset may be committed past it (the caller stops; a new owner restores)."""
        if self._failed:
            failed, self._failed = self._failed, None
            raise BrokerError(
                f"a changelog write to {self.topic} failed: {failed}; not committing past it"
            )


@dataclass
class Restored:
    """A partition's state as of its last checkpoint marker."""

    partition: int
    data: dict[str, Any]
    #: The input offset the state reflects (the next one to process); None: no checkpoint yet.
    through: int | None
    records: int
    seconds: float
    #: Of ``records``, how many were read by this catch-up (the rest while warming up).
    caught_up: int = 0


def _header(headers: list[tuple[str, bytes]] | None, name: str) -> bytes | None:
    for k, v in headers or ():
        if k == name:
            return v
    return None


def stamp_prefix(fmt: int, epoch: int) -> bytes:
    """The value prefix of a changelog record: ``<format>,<epoch>;``."""
    return f"{fmt},{epoch};".encode()


def decode_record(
    value: bytes | None, headers: list[tuple[str, bytes]] | None
) -> tuple[int, int, bytes | None]:
    """A key's changelog record as (epoch, format, JSON value or None for a deletion)."""
    stamped = _header(headers, H_EPOCH)
    if stamped is not None:  # a deletion, or the encoding before the prefix
        return int(stamped), int(_header(headers, H_FORMAT) or b"1"), value
    if value is None:
        return 0, 1, None
    end = value.find(b";")
    fmt, _, epoch = value[:end].partition(b",")
    if end < 0 or not fmt.isdigit() or not epoch.isdigit():
        raise BrokerError(
            f"a changelog record's value starts with {value[:20]!r}, not a "
            "'<format>,<epoch>;' stamp: is another program writing to the changelog topic?"
        )
    return int(epoch), int(fmt), value[end + 1 :]


class ChangelogReader:
    """Rebuilds a partition's state from the changelog (for a grant, or to warm up early)."""

    def __init__(self, consumer_config: dict[str, Any], topic: str, formats: StateFormats) -> None:
        self.config = {
            **consumer_config,
            "group.id": f"{consumer_config.get('group.id', 'pubsub-canary')}-restore",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.max.bytes": 52_428_800,
            # A restore reads as fast as it can; a broker that holds a waiting fetch for the
            # full wait (the test broker does) must not hold the first read for 500 ms.
            "fetch.wait.max.ms": 10,
        }
        self.topic = topic
        self.formats = formats
        #: Migrations declared by the active rollout (module:attr), loaded when first needed.
        self.rollout_migrations: dict[int, Migration] = {}

    def add_rollout_migrations(self, specs: list[dict[str, Any]]) -> None:
        """Load the rollout file's migrations that lead to a format this member reads."""
        import importlib

        for m in specs:
            src, dst = int(m["from_format"]), int(m["to_format"])
            if src in self.formats.reads or src in self.rollout_migrations:
                continue
            if dst not in self.formats.reads:
                continue
            module, _, attr = str(m["function"]).partition(":")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise StateFormatError(
                    f"cannot load state migration {m['function']!r}: {exc}",
                    field="state_migrations",
                ) from None
            self.rollout_migrations[src] = fn

    def _decode(self, value: bytes, fmt: int) -> Any:
        v = json.loads(value)
        if fmt in self.formats.reads:
            return v
        migrate = self.formats.migrations.get(fmt) or self.rollout_migrations.get(fmt)
        if migrate is None:
            raise StateFormatError(
                f"changelog {self.topic} holds state format {fmt}; this member reads "
                f"{sorted(self.formats.reads)} and has no migration from {fmt}",
                field="state_formats",
            )
        return migrate(v)

    def tail(self, partition: int, seed: Seed | None = None) -> ChangelogTail:
        """A reader of one changelog partition that can stop and resume (for warming up).

        With ``seed`` it starts from a state already known instead of the partition's start.
        """
        return ChangelogTail(self, partition, seed)

    def restore(
        self, partition: int, *, until: int | None = None, timeout: float = 60.0
    ) -> Restored:
        """Read the changelog partition to its end (and, with ``until``, to that marker)."""
        t = self.tail(partition)
        try:
            return t.catch_up(until=until, timeout=timeout)
        finally:
            t.close()


@dataclass(frozen=True)
class Seed:
    """A partition's state as of one of its markers, kept by the member that wrote it."""

    data: dict[str, Any]
    #: The input offset the marker reflects.
    through: int
    #: The changelog offset of the marker: reading resumes after it.
    marker_offset: int


class ChangelogTail:
    """Reads one changelog partition from the start, applying complete batches as they come.

    A member warming up a partition it is about to own polls it in the background; on the grant
    it catches up to the old owner's final marker, which is then only a short tail away.
    """

    def __init__(self, reader: ChangelogReader, partition: int, seed: Seed | None = None) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        self.reader = reader
        self.partition = partition
        self.data: dict[str, Any] = seed.data if seed is not None else {}
        self.through: int | None = seed.through if seed is not None else None
        self.records = 0
        self.position = seed.marker_offset + 1 if seed is not None else 0
        self._pending: list[tuple[bytes, bytes | None, int, int]] = []
        self._high = 0
        self._high_at = 0.0
        self._started = time.monotonic()
        self._tp = TopicPartition(reader.topic, partition)
        self._c = Consumer(reader.config)
        # Ask for the watermarks before assigning: with the partition assigned, the first
        # request can wait behind a fetch (measured: 0.5 s of every cold restore).
        self.high_watermark()
        start = self.position if seed is not None else OFFSET_BEGINNING
        self._c.assign([TopicPartition(reader.topic, partition, start)])

    def high_watermark(self, max_age: float = 0.0) -> int:
        now = time.monotonic()
        if now - self._high_at >= max_age:
            self._high = self._c.get_watermark_offsets(self._tp, timeout=10, cached=False)[1]
            self._high_at = now
        return self._high

    def behind(self, max_age: float = 0.2) -> int:
        """Changelog records not read yet (the end offset asked for at most every ``max_age``)."""
        return max(0, self.high_watermark(max_age=max_age) - self.position)

    def poll(self, timeout: float = 0.2) -> int:
        """Wait up to ``timeout`` for a record, then read what is there (up to 10,000).

        Returns how many records were read. ``consume()`` alone would wait the whole timeout
        unless 10,000 records came: a marker the grant waits for would be up to ``timeout``
        late.
        """
        from confluent_kafka import KafkaError

        if self.position + 10_000 <= self._high:  # far behind: full batches come at once
            batch = self._c.consume(num_messages=10_000, timeout=timeout)
        else:
            first = self._c.poll(timeout)
            if first is None:
                return 0
            batch = [first, *self._c.consume(num_messages=9_999, timeout=0)]
        n = 0
        for msg in batch:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self.position = max(self.position, msg.offset())
                    continue
                raise BrokerError(f"reading {self.reader.topic}[{self.partition}]: {err}")
            n += 1
            self.records += 1
            self.position = msg.offset() + 1
            key = msg.key()
            if is_marker(key):
                epoch = int(_header(msg.headers(), H_EPOCH) or b"0")
                # A batch counts only when its marker arrives, and only the records its writer
                # (same epoch) wrote: a crashed writer's partial batch is dropped.
                for key, value, e, f in self._pending:
                    if e != epoch:
                        continue
                    if value is None:
                        self.data.pop(key.decode(), None)
                    else:
                        self.data[key.decode()] = self.reader._decode(value, f)
                self._pending.clear()
                self.through = int(msg.value())
            else:
                epoch, fmt, value = decode_record(msg.value(), msg.headers())
                self._pending.append((key, value, epoch, fmt))
        return n

    def catch_up(self, *, until: int | None = None, timeout: float = 60.0) -> Restored:
        """Read to the end of the partition, and with ``until`` to that offset's marker."""
        started = time.monotonic()
        before = self.records
        deadline = started + timeout
        high = self.high_watermark()
        while self.position < high or (until is not None and self.through != until):
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"restoring {self.reader.topic}[{self.partition}] did not reach offset "
                    f"{until} within {timeout} s (at {self.through})"
                )
            if self.poll(0.1) == 0 and self.position >= high:
                high = self.high_watermark()  # the marker we wait for may still be on its way
        return Restored(
            self.partition,
            self.data,
            self.through,
            self.records,
            time.monotonic() - started,
            self.records - before,
        )

    def close(self) -> None:
        self._c.close()


def ensure_changelog(bootstrap: str, topic: str, partitions: int, admin_create: Any = None) -> None:
    """Create the compacted changelog topic if it is missing (AdminClient on a real broker).

    ``admin_create(name, partitions)`` overrides creation (the embedded test broker has no
    CreateTopics: pass its ``create_topic``).
    """
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    md = admin.list_topics(topic, timeout=10)
    t = md.topics.get(topic)
    if t is not None and t.error is None and len(t.partitions) >= partitions:
        return
    if admin_create is not None:
        admin_create(topic, partitions)
        return
    futures = admin.create_topics(
        [NewTopic(topic, partitions, config={"cleanup.policy": "compact"})]
    )
    for f in futures.values():
        try:
            f.result(30)
        except Exception as exc:  # the broker's error, shown to the operator
            raise BrokerError(f"cannot create changelog topic {topic!r}: {exc}") from None
