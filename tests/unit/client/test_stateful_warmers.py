"""Which units a stateful member keeps warm, and how eagerly it reports on them."""

from __future__ import annotations

import time
from typing import Any

from pubsub_canary.client import stateful
from pubsub_canary.client.session import UnitGrant
from pubsub_canary.client.stateful import StatefulKafkaMember


class FakeTail:
    def __init__(self, unit: int) -> None:
        self.partition = unit
        self.ages: list[float] = []
        self.closed = False

    def poll(self, timeout: float) -> int:
        time.sleep(timeout)
        return 0

    def behind(self, max_age: float = 0.2) -> int:
        self.ages.append(max_age)
        return 0

    def close(self) -> None:
        self.closed = True


class FakeSession:
    state_migrations: list[dict[str, Any]] = []

    def __init__(self) -> None:
        self.warm: dict[int, int | None] = {}

    def report_warm(self, unit: int, behind: int | None) -> None:
        self.warm[unit] = behind


def member() -> tuple[StatefulKafkaMember, dict[int, FakeTail]]:
    m = StatefulKafkaMember(
        lambda record, state: None,
        coordinator="http://127.0.0.1:1",
        bootstrap_servers="127.0.0.1:1",
        topic="t",
        group_id="g",
        cohort="stable",
        version="1",
    )
    tails: dict[int, FakeTail] = {}

    def tail(unit: int, seed: Any = None) -> FakeTail:
        tails[unit] = FakeTail(unit)
        return tails[unit]

    m._reader.tail = tail  # type: ignore[method-assign,assignment]
    m.session = FakeSession()  # type: ignore[assignment]
    return m, tails


def view(**statuses: str) -> dict[int, UnitGrant]:
    return {int(u[1:]): UnitGrant(int(u[1:]), 1, None, s) for u, s in statuses.items()}


def test_standbys_and_warm_ups_are_kept_warm_and_dropped_when_the_view_drops_them() -> None:
    m, tails = member()
    try:
        m._view_changed(view(u0="owned", u1="warming", u2="standby"))
        assert set(m._warmers) == {1, 2}
        assert m._warmers[1].refresh_seconds == stateful.WARMING_REFRESH_SECONDS
        assert m._warmers[2].refresh_seconds == stateful.STANDBY_REFRESH_SECONDS
        time.sleep(0.1)
        assert set(tails[2].ages) == {stateful.STANDBY_REFRESH_SECONDS}
        # A rollback: the standby becomes a warm-up, and the same tail goes on, eagerly.
        m._view_changed(view(u0="owned", u1="warming", u2="warming"))
        assert m._warmers[2].tail is tails[2]
        assert m._warmers[2].refresh_seconds == stateful.WARMING_REFRESH_SECONDS
        # The canary gave unit 1 up: nothing to keep warm.
        m._view_changed(view(u0="owned", u2="warming"))
        assert set(m._warmers) == {2} and tails[1].closed
    finally:
        for w in m._warmers.values():
            w.discard()
