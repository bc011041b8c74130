"""An in-process rig for stateful scenarios: coordinator, members as threads, a keyed producer.

"Crashing" a member stops it the way SIGKILL would: no final checkpoint, no commit, no release,
no more heartbeats; the coordinator reclaims its partitions after lease + margin. ``crash``
kills between two steps of the member's loop, ``crash_in_commit`` inside a commit (before the
checkpoint marker, or between the marker and the offset commit).

Members reach the coordinator through a transport that fails as HTTP would while the
coordinator restarts (``restart_coordinator(downtime)``) or while a member is cut off from it
(``cut_off``). Exceptions raised in member threads are kept in ``errors``.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from pubsub_canary.client.state import (
    H_EPOCH,
    H_THROUGH,
    ChangelogReader,
    StateFormats,
    decode_record,
    is_marker,
)
from pubsub_canary.client.stateful import StatefulKafkaMember
from pubsub_canary.client.transport import MemoryTransport
from pubsub_canary.coordinator.broker import KafkaBroker
from pubsub_canary.coordinator.service import Coordinator
from pubsub_canary.coordinator.store import open_store
from pubsub_canary.demo.totals import add_to_total, amount_of, read_topic, recompute
from pubsub_canary.errors import CoordinatorUnavailable

LEASE = 1.5


class Killed(BaseException):
    """Ends a member's thread the way SIGKILL ends its process (see ``crash_in_commit``)."""


class _KillAtMarker:
    """A changelog producer that dies at the first checkpoint marker, after the batch's records."""

    def __init__(self, producer: Any, name: str) -> None:
        self._producer = producer
        self._name = name

    def produce(self, topic: str, *args: Any, key: bytes | None = None, **kw: Any) -> None:
        if is_marker(key):
            self._producer.flush(30)  # the batch's records reach the broker, the marker never
            raise Killed(self._name)
        self._producer.produce(topic, *args, key=key, **kw)

    def __len__(self) -> int:
        return len(self._producer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._producer, name)


class _RigTransport:
    """The in-process transport to whichever coordinator the rig runs now."""

    def __init__(self, rig: StatefulRig) -> None:
        self.rig = rig
        #: Until then (monotonic) this member cannot reach the coordinator (see ``cut_off``).
        self.cut_until = 0.0

    @contextmanager
    def _coordinator(self, retry: bool) -> Iterator[Coordinator]:
        gate = self.rig._gate
        deadline = time.monotonic() + (5.0 if retry else 0.0)
        while time.monotonic() < self.cut_until:
            if time.monotonic() >= deadline:
                raise CoordinatorUnavailable("cut off from the coordinator")
            time.sleep(0.05)
        with gate:
            while self.rig._down:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CoordinatorUnavailable("the coordinator is restarting")
                gate.wait(left)
            self.rig._inflight += 1
            c = self.rig.coordinator
        try:
            yield c
        finally:
            with gate:
                self.rig._inflight -= 1
                gate.notify_all()

    def register(self, **request: Any) -> dict[str, Any]:
        with self._coordinator(retry=True) as c:
            return MemoryTransport(c).register(**request)

    def heartbeat(self, member_id: str, request: dict[str, Any]) -> dict[str, Any]:
        with self._coordinator(retry=False) as c:
            return MemoryTransport(c).heartbeat(member_id, request)

    def release(self, member_id: str, released: list[tuple[int, int, int | None]]) -> None:
        with self._coordinator(retry=True) as c:
            MemoryTransport(c).release(member_id, released)

    def leave(self, member_id: str) -> None:
        with self._coordinator(retry=True) as c:
            MemoryTransport(c).leave(member_id)

    def close(self) -> None:
        pass


class StatefulRig:
    def __init__(self, bootstrap: str, topic: str, group: str, changelog: str, db: Path) -> None:
        self.bootstrap, self.topic, self.group, self.changelog = bootstrap, topic, group, changelog
        self.store_url = f"sqlite:///{db}"
        #: Guards the coordinator's restarts: members' calls in flight, and whether it is down.
        self._gate = threading.Condition()
        self._inflight = 0
        self._down = False
        self.coordinator = self._new_coordinator()
        self.members: dict[str, tuple[StatefulKafkaMember, threading.Thread]] = {}
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2})
        self.sent = 0
        self._n = 0
        #: (member name, exception) raised in a member thread; the thread re-raises it too.
        self.errors: list[tuple[str, BaseException]] = []
        self._started: list[tuple[StatefulKafkaMember, threading.Thread]] = []

    def _new_coordinator(self) -> Coordinator:
        c = Coordinator(
            open_store(self.store_url),
            KafkaBroker(self.bootstrap),
            lease_seconds=LEASE,
            margin_seconds=0.5,
            tick_seconds=0.05,
        )
        c.start()
        return c

    def restart_coordinator(self, downtime: float = 0.0) -> None:
        """Kill and restart: a new Coordinator on the same SQLite file, ``downtime`` s later.

        While it is down, members' calls fail as over HTTP (``CoordinatorUnavailable``;
        register, release and leave retry for up to 5 s first, as HttpTransport does), and a
        call already inside the old coordinator finishes before its store closes.
        """
        with self._gate:
            self._down = True
        old = self.coordinator
        old._stop.set()
        with old._changed:
            old._changed.notify_all()  # long-polling heartbeats answer now
        with self._gate:
            self._gate.wait_for(lambda: self._inflight == 0, timeout=10)
        for t in old._threads:
            t.join(5)
        old.store.close()
        if old.broker is not None:
            old.broker.close()
        time.sleep(downtime)
        self.coordinator = self._new_coordinator()
        with self._gate:
            self._down = False
            self._gate.notify_all()

    def cut_off(self, name: str, seconds: float) -> None:
        """``name`` cannot reach the coordinator for ``seconds`` (it keeps running)."""
        m, _ = self.members[name]
        m._transport.cut_until = time.monotonic() + seconds

    def produce(self, n: int) -> None:
        for _ in range(n):
            seq = self.sent
            self.producer.produce(
                self.topic,
                key=f"user-{seq % 50}".encode(),
                value=f'{{"seq": {seq}, "amount": {amount_of(seq)}}}'.encode(),
            )
            self.sent += 1
        self.producer.flush(30)

    def start_member(self, cohort: str, version: str, handler: Any = None, **kw: Any) -> str:
        self._n += 1
        name = f"{cohort}-{self._n}"
        m = StatefulKafkaMember(
            handler or add_to_total,
            coordinator=_RigTransport(self),
            bootstrap_servers=self.bootstrap,
            topic=self.topic,
            group_id=self.group,
            changelog_topic=self.changelog,
            cohort=cohort,
            version=version,
            member_id=name,
            commit_interval_seconds=0.2,
            long_poll_seconds=0.3,
            **kw,
        )

        def run() -> None:
            try:
                m.run(install_signal_handlers=False)
            except Killed:
                pass
            except BaseException as exc:
                self.errors.append((name, exc))
                raise

        t = threading.Thread(target=run, name=f"member-{name}", daemon=True)
        t.start()
        self.members[name] = (m, t)
        self._started.append((m, t))
        return name

    def crash(self, name: str) -> None:
        """Stop ``name`` as SIGKILL would, between two steps of its loop.

        The step in progress finishes (as if the kill came just after it); no later step, no
        final checkpoint, commit or release runs. Replacing ``_commit`` instead could cut a step
        in half (a release whose offset no checkpoint covers), which no real process can do.
        """
        m, t = self.members.pop(name)
        m._shutdown = lambda timeout: None  # type: ignore[method-assign]
        m._step = lambda: None  # type: ignore[method-assign]
        m.stop()
        t.join(20)

    def crash_in_commit(
        self, name: str, timeout: float = 3.0, *, stage: str = "before_offsets"
    ) -> bool:
        """Kill ``name`` inside its next commit, at ``stage``:

        - ``before_offsets``: the checkpoint (batch and marker) is on the broker, the input
          offsets are not committed;
        - ``before_marker``: the batch's records are on the broker, its marker is not.

        Points a SIGKILL can hit and :meth:`crash` cannot reach. If the member commits nothing
        within ``timeout`` (it is idle), it is crashed between steps instead; returns whether
        the kill came inside a commit.
        """
        m, t = self.members[name]
        checkpoint = m._before_commit
        deadline = time.monotonic() + timeout
        while m._writer is None and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)  # a member just started opens its changelog writer after registering
        writer = m._writer

        def before_commit(parts: list[int]) -> None:
            checkpoint(parts)
            if m._producer.flush(30) == 0:
                raise Killed(name)

        if stage == "before_offsets":
            m._before_commit = before_commit  # type: ignore[method-assign]
        elif stage == "before_marker":
            if writer is None:
                self.crash(name)
                return False
            writer.producer = _KillAtMarker(writer.producer, name)
        else:
            raise ValueError(f"stage {stage!r} is not before_offsets or before_marker")
        m._shutdown = lambda timeout: None  # type: ignore[method-assign]
        m.commit_interval = 0.0  # the next step commits, if it has anything to commit
        t.join(timeout)
        if t.is_alive():
            m._before_commit = checkpoint  # type: ignore[method-assign]
            if writer is not None:
                writer.producer = m._producer
            self.crash(name)
            return False
        self.members.pop(name)
        return True

    def stop(self, name: str) -> None:
        m, t = self.members.pop(name)
        m.stop()
        t.join(30)

    def stop_all(self) -> None:
        for name in list(self.members):
            self.stop(name)

    def wait_caught_up(self, timeout: float = 30.0) -> bool:
        b = KafkaBroker(self.bootstrap)
        try:
            n = b.partitions(self.topic) or 0
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                offs = b.offsets(self.topic, self.group, n)
                if all(c >= h for c, h in offs.values()):
                    return True
                time.sleep(0.2)
            return False
        finally:
            b.close()

    def check_state(
        self, migrations: dict[int, Any] | None = None
    ) -> tuple[int, dict[int, tuple[int | None, int]]]:
        """(mismatching keys, partition -> (changelog checkpoint, committed offset))."""
        diff, agree = self.state_diff(migrations)
        return sum(len(d) for d in diff.values()), agree

    def state_diff(
        self, migrations: dict[int, Any] | None = None
    ) -> tuple[dict[int, dict[str, tuple[Any, Any]]], dict[int, tuple[int | None, int]]]:
        """(partition -> {key: (one owner's value, restored value)} for the keys that differ,
        partition -> (changelog checkpoint, committed offset))."""
        expected = recompute(read_topic(self.bootstrap, self.topic))
        reader = ChangelogReader(
            {"bootstrap.servers": self.bootstrap, "group.id": self.group},
            self.changelog,
            StateFormats(migrations=migrations or {}),
        )
        b = KafkaBroker(self.bootstrap)
        try:
            n = b.partitions(self.topic) or 0
            committed = b.offsets(self.topic, self.group, n)
        finally:
            b.close()
        diff: dict[int, dict[str, tuple[Any, Any]]] = {}
        agree: dict[int, tuple[int | None, int]] = {}
        for p in range(n):
            restored = reader.restore(p)
            want = expected.get(p, {})
            keys = set(want) | set(restored.data)
            bad = {k: (want.get(k), restored.data.get(k)) for k in sorted(keys)}
            diff[p] = {k: v for k, v in bad.items() if v[0] != v[1]}
            agree[p] = (restored.through, committed[p][0])
        return {p: d for p, d in diff.items() if d}, agree

    def changelog_records(self, partition: int) -> list[tuple[int, str, int, int, Any]]:
        """Changelog ``partition`` as (offset, key, epoch, through, value) records."""
        from confluent_kafka import Consumer, TopicPartition

        c = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": "rig-dump", "enable.auto.commit": 0}
        )
        try:
            tp = TopicPartition(self.changelog, partition)
            _, high = c.get_watermark_offsets(tp, timeout=10)
            c.assign([TopicPartition(self.changelog, partition, 0)])
            out: list[tuple[int, str, int, int, Any]] = []
            deadline = time.monotonic() + 30
            while (out[-1][0] if out else -1) < high - 1 and time.monotonic() < deadline:
                for m in c.consume(num_messages=10_000, timeout=1.0):
                    if m.error() is not None:
                        continue
                    h = dict(m.headers() or [])
                    if is_marker(m.key()):
                        epoch, value = int(h.get(H_EPOCH, b"0")), m.value()
                    else:
                        epoch, _, value = decode_record(m.value(), m.headers())
                    out.append(
                        (
                            m.offset(),
                            (m.key() or b"").decode(),
                            epoch,
                            int(h.get(H_THROUGH, b"-1")),
                            (value or b"").decode(),
                        )
                    )
            return out
        finally:
            c.close()

    def close(self) -> None:
        for name in list(self.members):
            self.crash(name)
        self.coordinator.stop()
        if self.coordinator.broker is not None:
            self.coordinator.broker.close()
        self.producer = None  # type: ignore[assignment]
        # Kafka clients go now, not after the broker has stopped (a failed test's traceback
        # keeps members alive; their clients would then log connection errors at exit).
        for m, t in self._started:
            if t.is_alive():
                continue
            if m._writer is not None:
                m._writer.producer = None
            m._producer = None
        gc.collect()
