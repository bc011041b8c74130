"""An in-process rig for stateful scenarios: coordinator, members as threads, a keyed producer.

"Crashing" a member stops it the way SIGKILL would: no final checkpoint, no commit, no release,
no more heartbeats; the coordinator reclaims its partitions after lease + margin.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from pubsub_canary.client.state import ChangelogReader, StateFormats
from pubsub_canary.client.stateful import StatefulKafkaMember
from pubsub_canary.client.transport import MemoryTransport
from pubsub_canary.coordinator.broker import KafkaBroker
from pubsub_canary.coordinator.service import Coordinator
from pubsub_canary.coordinator.store import open_store
from pubsub_canary.demo.totals import add_to_total, amount_of, read_topic, recompute

LEASE = 1.5


class StatefulRig:
    def __init__(self, bootstrap: str, topic: str, group: str, changelog: str, db: Path) -> None:
        self.bootstrap, self.topic, self.group, self.changelog = bootstrap, topic, group, changelog
        self.store_url = f"sqlite:///{db}"
        self.coordinator = self._new_coordinator()
        self.members: dict[str, tuple[StatefulKafkaMember, threading.Thread]] = {}
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2})
        self.sent = 0
        self._n = 0

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

    def restart_coordinator(self) -> None:
        """Kill and restart: a new Coordinator on the same SQLite file."""
        old = self.coordinator
        old._stop.set()
        for t in old._threads:
            t.join(5)
        old.store.close()
        if old.broker is not None:
            old.broker.close()
        self.coordinator = self._new_coordinator()
        for m, _ in self.members.values():
            m._transport = MemoryTransport(self.coordinator)  # the same URL, a new process
            if m.session is not None:
                m.session.transport = m._transport

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
            coordinator=MemoryTransport(self.coordinator),
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
        t = threading.Thread(target=m.run, kwargs={"install_signal_handlers": False}, daemon=True)
        t.start()
        self.members[name] = (m, t)
        return name

    def crash(self, name: str) -> None:
        m, t = self.members.pop(name)
        m._commit = lambda **kw: None  # type: ignore[method-assign]
        m._shutdown = lambda timeout: None  # type: ignore[method-assign]
        m.stop()
        t.join(20)

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
        mismatches = 0
        agree: dict[int, tuple[int | None, int]] = {}
        for p in range(n):
            restored = reader.restore(p)
            want = expected.get(p, {})
            keys = set(want) | set(restored.data)
            mismatches += sum(1 for k in keys if want.get(k) != restored.data.get(k))
            agree[p] = (restored.through, committed[p][0])
        return mismatches, agree

    def close(self) -> None:
        for name in list(self.members):
            self.crash(name)
        self.coordinator.stop()
        if self.coordinator.broker is not None:
            self.coordinator.broker.close()
        self.producer = None  # type: ignore[assignment]
