"""Warm handoffs for stateful groups: revoke a unit only once its next owner has its state."""

from __future__ import annotations

from typing import Any

import pytest

from pubsub_canary.coordinator.service import Coordinator
from tests.unit.coordinator.test_service import KEY, UNITS, FakeClock, _coordinator, spec
from tests.unit.coordinator.test_service import clock as clock

STATEFUL = {"state_formats": {"writes": 1, "reads": [1], "migrates": []}}


def reg(c: Coordinator, mid: str, cohort: str, meta: dict[str, Any] | None) -> None:
    c.register(
        transport="kafka",
        topic="orders",
        group_id="billing",
        units=UNITS,
        cohort=cohort,
        version="v1" if cohort == "stable" else "v2",
        member_id=mid,
        meta=meta,
    )


def revoking(c: Coordinator) -> set[int]:
    return {u for u, s in c.groups[KEY].units.items() if s.status.value == "revoking"}


def view_units(c: Coordinator, mid: str, status: str) -> set[int]:
    return {u["unit"] for u in c.heartbeat(mid)["units"] if u["status"] == status}


@pytest.fixture
def stateful(clock: FakeClock) -> Coordinator:
    from pubsub_canary.coordinator.store import MemoryStore

    c = _coordinator(MemoryStore(), clock)
    reg(c, "s1", "stable", STATEFUL)
    reg(c, "c1", "canary", STATEFUL)
    c.tick()
    return c


def test_revoke_waits_until_the_next_owner_has_warmed_up(stateful: Coordinator) -> None:
    c = stateful
    c.apply_rollout(spec())
    c.tick()
    moving = view_units(c, "c1", "warming")
    assert len(moving) == 3  # 25% of 12, told to warm up
    assert revoking(c) == set()  # s1 keeps processing meanwhile
    c.heartbeat("c1", warm=dict.fromkeys(moving, 50_000))  # far from the changelog's end
    c.tick()
    assert revoking(c) == set()
    c.heartbeat("c1", warm=dict.fromkeys(moving, 10))  # caught up
    c.tick()
    assert revoking(c) == moving


def test_a_stuck_warm_up_does_not_block_the_move_forever(
    stateful: Coordinator, clock: FakeClock
) -> None:
    c = stateful
    c.warm_timeout_seconds = 3.0  # shorter than the lease, so everyone stays alive
    c.apply_rollout(spec())
    c.tick()
    assert revoking(c) == set()
    clock.advance(2.0)
    c.heartbeat("s1")
    c.heartbeat("c1")
    c.tick()
    assert revoking(c) == set()
    clock.advance(1.5)
    c.heartbeat("s1")
    c.heartbeat("c1")
    c.tick()
    assert len(revoking(c)) == 3


def test_a_rollback_does_not_wait_for_stable_to_warm_up(stateful: Coordinator) -> None:
    c = stateful
    c.apply_rollout(spec())
    c.tick()
    moving = view_units(c, "c1", "warming")
    c.heartbeat("c1", warm=dict.fromkeys(moving, 0))
    c.tick()
    for u, e, _ in [(u, s.epoch, None) for u, s in c.groups[KEY].units.items() if u in moving]:
        c.release("s1", [(u, e, 100)])
    c.tick()
    assert {u for u, s in c.groups[KEY].units.items() if s.owner == "c1"} == moving
    c.act("r1", "abort")
    c.tick()
    assert revoking(c) == moving  # at once, although s1 never reported any warm-up


def test_stateless_groups_never_wait(clock: FakeClock) -> None:
    from pubsub_canary.coordinator.store import MemoryStore

    c = _coordinator(MemoryStore(), clock)
    reg(c, "s1", "stable", None)
    reg(c, "c1", "canary", None)
    c.tick()
    c.apply_rollout(spec())
    c.tick()
    assert len(revoking(c)) == 3
    assert view_units(c, "c1", "warming") == set()
