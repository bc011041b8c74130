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
    assert view_units(c, "s1", "standby") == set()  # no state to keep warm for a rollback


def _move_to_canary(c: Coordinator) -> set[int]:
    """Apply the rollout and let the canary warm up and take its 3 units."""
    c.apply_rollout(spec())
    c.tick()
    moving = view_units(c, "c1", "warming")
    c.heartbeat("c1", warm=dict.fromkeys(moving, 0))
    c.tick()
    for u in moving:
        s = c.groups[KEY].units[u]
        assert s.owner is not None
        c.release(s.owner, [(u, s.epoch, 100)])
    c.tick()
    assert {u for u, s in c.groups[KEY].units.items() if s.owner == "c1"} == moving
    return moving


def test_stable_keeps_the_canarys_units_warm_for_a_rollback(clock: FakeClock) -> None:
    from pubsub_canary.coordinator.store import MemoryStore

    c = _coordinator(MemoryStore(), clock)
    reg(c, "s1", "stable", STATEFUL)
    reg(c, "s2", "stable", STATEFUL)
    reg(c, "c1", "canary", STATEFUL)
    c.tick()
    assert view_units(c, "s1", "standby") | view_units(c, "s2", "standby") == set()
    moving = _move_to_canary(c)
    standby = {mid: view_units(c, mid, "standby") for mid in ("s1", "s2")}
    # Every canary unit has exactly one standby, and no member stands by for its own units.
    assert standby["s1"] | standby["s2"] == moving
    assert standby["s1"].isdisjoint(standby["s2"])
    assert view_units(c, "c1", "standby") == set()
    # Operators see it in the status: who stands by for which unit, and how far behind.
    keeper = "s1" if standby["s1"] else "s2"
    c.heartbeat(keeper, warm=dict.fromkeys(standby[keeper], 7))
    status = c.status("r1")
    assert {int(u) for u, x in status["units"].items() if x["standby"] is not None} == moving
    for u in standby[keeper]:
        assert status["units"][str(u)]["standby"] == keeper
        assert status["units"][str(u)]["standby_behind"] == 7
    by_member = {m["member_id"]: set(m["standby"]) for m in status["members"]}
    assert by_member == {**standby, "c1": set()}
    from pubsub_canary.render import render_status, unit_ranges

    text = render_status(status)
    for mid in ("s1", "s2"):
        if standby[mid]:
            assert "standby " + unit_ranges(sorted(standby[mid])) in text, text
    # The rollback gives each unit to the member that kept it warm.
    c.act("r1", "abort")
    c.tick()
    for mid in ("s1", "s2"):
        assert view_units(c, mid, "standby") == set()
        assert {u for u, t in c.groups[KEY].target.items() if t == mid} >= standby[mid]


def test_no_standby_once_the_rollout_is_over(clock: FakeClock) -> None:
    from pubsub_canary.coordinator.store import MemoryStore

    s = _coordinator(MemoryStore(), clock)
    reg(s, "s1", "stable", STATEFUL)
    reg(s, "c1", "canary", STATEFUL)
    s.tick()
    moving = _move_to_canary(s)
    assert view_units(s, "s1", "standby") == moving
    s.act("r1", "abort")
    s.tick()
    for u in moving:
        st = s.groups[KEY].units[u]
        s.release("c1", [(u, st.epoch, 200)])
    s.tick()
    assert not s.rollouts["r1"].active  # aborted: nothing left to roll back
    assert view_units(s, "s1", "standby") == set()
    assert view_units(s, "s1", "owned") == set(range(12))
