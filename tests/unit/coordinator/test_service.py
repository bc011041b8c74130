"""The coordinator service on a fake clock: MemoryStore, MemoryBroker, ``tick()`` by hand.

Members are simulated by calling the service the way the member library does (heartbeat,
release the units it is asked to give up). No background thread is started, except in the
long-poll tests, which need a second caller and therefore the real clock.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from pubsub_canary.coordinator.broker import MemoryBroker
from pubsub_canary.coordinator.service import Clock, Coordinator
from pubsub_canary.coordinator.store import MemoryStore
from pubsub_canary.core.machine import Phase
from pubsub_canary.core.model import RolloutSpec, parse_rollout_spec
from pubsub_canary.core.observations import CohortObservations
from pubsub_canary.errors import ConfigError, LeaseExpired, NotFound, TransitionError

KEY = "kafka:orders/billing"
UNITS = 12
LEASE = 6.0
MARGIN = 2.0
EPS = 0.001


class FakeClock:
    """Both clocks under the test's control; they move together."""

    def __init__(self) -> None:
        self.mono = 5_000.0
        self.now = 1_700_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def _coordinator(store: MemoryStore, clock: Any, lease: float = LEASE) -> Coordinator:
    return Coordinator(
        store,
        MemoryBroker(topics={"orders": UNITS}),
        clock=clock,
        lease_seconds=lease,
        margin_seconds=MARGIN,
    )


@pytest.fixture
def coord(store: MemoryStore, clock: FakeClock) -> Coordinator:
    return _coordinator(store, clock)


def spec(name: str = "r1", **overrides: Any) -> RolloutSpec:
    doc: dict[str, Any] = {
        "name": name,
        "target": {"topic": "orders", "group": "billing"},
        "canary_version": "v2",
        # Long holds: no step passes on its own in these tests.
        "steps": [{"share": 25, "hold_seconds": 3600}, {"share": 50, "hold_seconds": 3600}],
        "slo": {"max_error_rate": 0.05},
    }
    doc.update(overrides)
    return parse_rollout_spec(doc)


def register(c: Coordinator, mid: str, cohort: str = "stable") -> None:
    version = "v1" if cohort == "stable" else "v2"
    c.register(
        transport="kafka",
        topic="orders",
        group_id="billing",
        units=UNITS,
        cohort=cohort,
        version=version,
        member_id=mid,
    )


def owners(c: Coordinator) -> dict[int, str | None]:
    return {u: s.owner for u, s in sorted(c.groups[KEY].units.items())}


def units_of(c: Coordinator, mid: str) -> set[int]:
    return {u for u, owner in owners(c).items() if owner == mid}


def offset_for(unit: int) -> int:
    return 1000 + unit


def release_revoked(c: Coordinator, mid: str) -> list[tuple[int, int, int | None]]:
    """What a member does on a heartbeat: finish and release what it is asked to give up."""
    view = c.heartbeat(mid)
    released = [
        (u["unit"], u["epoch"], offset_for(u["unit"]))
        for u in view["units"]
        if u["status"] == "revoking"
    ]
    if released:
        c.release(mid, released)
    return released


def settle(c: Coordinator, members: list[str]) -> None:
    """Let the members follow the protocol until no unit is moving."""
    for _ in range(10):
        moved = [release_revoked(c, m) for m in members]
        c.tick()
        if not any(moved) and all(s.status.value == "owned" for s in c.groups[KEY].units.values()):
            return
    raise AssertionError(f"the group did not settle: {c.groups[KEY].units}")


@pytest.fixture
def running(coord: Coordinator) -> Coordinator:
    """Two stable members, one canary, rollout r1 at its first step (25%), settled."""
    register(coord, "s1")
    register(coord, "s2")
    register(coord, "c1", "canary")
    settle(coord, ["s1", "s2", "c1"])
    coord.apply_rollout(spec())
    settle(coord, ["s1", "s2", "c1"])
    return coord


# --- planning -------------------------------------------------------------------------------


def test_members_share_the_units_and_the_canary_gets_its_share(running: Coordinator) -> None:
    canary = units_of(running, "c1")
    s1, s2 = units_of(running, "s1"), units_of(running, "s2")

    assert len(canary) == 3  # 25% of 12
    assert sorted([len(s1), len(s2)]) == [4, 5]
    assert canary | s1 | s2 == set(range(UNITS))
    # Spread over the range rather than a block at its start.
    assert max(canary) - min(canary) >= UNITS // 2
    status = running.status("r1")
    assert (status["phase"], status["step"], status["share"]) == ("progressing", 1, 25.0)
    assert status["cohorts"]["canary"]["units"] == 3


def test_without_a_rollout_the_canary_gets_nothing(coord: Coordinator) -> None:
    register(coord, "s1")
    register(coord, "c1", "canary")
    settle(coord, ["s1", "c1"])

    assert units_of(coord, "s1") == set(range(UNITS))
    assert coord.heartbeat("c1")["idle"] is True


def test_first_grants_start_at_the_committed_offset_with_epoch_one(coord: Coordinator) -> None:
    register(coord, "s1")

    view = coord.heartbeat("s1")

    assert [u["unit"] for u in view["units"]] == list(range(UNITS))
    assert {(u["epoch"], u["offset"], u["status"]) for u in view["units"]} == {(1, None, "owned")}


def test_bad_registration_is_a_config_error(coord: Coordinator) -> None:
    with pytest.raises(ConfigError) as info:
        coord.register(
            transport="kafka",
            topic="orders",
            group_id="billing",
            units=UNITS,
            cohort="blue",
            version="v1",
        )
    assert info.value.fields["field"] == "cohort"
    assert coord.members == {}


# --- I1: leases, margin, fencing ------------------------------------------------------------


def test_silent_member_keeps_its_units_until_lease_plus_margin(
    coord: Coordinator, clock: FakeClock
) -> None:
    register(coord, "s1")
    register(coord, "s2")
    settle(coord, ["s1", "s2"])
    held = {u: coord.groups[KEY].units[u] for u in units_of(coord, "s1")}
    assert len(held) == UNITS // 2
    last_heartbeat = clock.monotonic()  # s1 goes silent now (crash or cut off)

    # Just before lease + margin on the coordinator's clock: nobody else may have them.
    for at in (LEASE / 2, LEASE, LEASE + MARGIN - EPS):
        clock.mono = last_heartbeat + at
        clock.now += 0.5
        coord.heartbeat("s2")
        coord.tick()
        assert units_of(coord, "s1") == set(held), f"moved {at}s after s1's last heartbeat"
        assert units_of(coord, "s2").isdisjoint(held)

    clock.mono = last_heartbeat + LEASE + MARGIN + EPS
    coord.heartbeat("s2")
    coord.tick()

    view = {u["unit"]: u for u in coord.heartbeat("s2")["units"]}
    assert set(view) == set(range(UNITS))
    for u, before in held.items():
        # Regranted from the group's committed offset (no release came), under a new epoch.
        assert view[u]["offset"] is None
        assert view[u]["epoch"] == before.epoch + 1
        assert view[u]["status"] == "owned"
    assert "s1" not in coord.members
    with pytest.raises(LeaseExpired):
        coord.heartbeat("s1")


def test_heartbeat_after_lease_plus_margin_is_refused_before_any_tick(
    coord: Coordinator, clock: FakeClock
) -> None:
    register(coord, "s1")
    clock.advance(LEASE + MARGIN)

    with pytest.raises(LeaseExpired) as info:
        coord.heartbeat("s1")

    assert info.value.http_status == 410


def test_heartbeat_within_the_margin_renews_the_lease(coord: Coordinator, clock: FakeClock) -> None:
    register(coord, "s1")
    register(coord, "s2")
    settle(coord, ["s1", "s2"])
    mine = units_of(coord, "s1")
    clock.advance(LEASE + MARGIN - EPS)
    coord.heartbeat("s2")

    coord.heartbeat("s1")
    clock.advance(LEASE - EPS)
    coord.heartbeat("s2")
    coord.tick()

    assert units_of(coord, "s1") == mine


def test_graceful_release_regrants_at_the_released_offset_with_next_epoch(
    coord: Coordinator,
) -> None:
    register(coord, "s1")
    settle(coord, ["s1"])
    register(coord, "s2")  # half of s1's units must move to s2
    revoking = [u for u in coord.heartbeat("s1")["units"] if u["status"] == "revoking"]
    assert len(revoking) == UNITS // 2
    # Nothing is granted before the owner lets go.
    assert coord.heartbeat("s2")["units"] == []
    coord.tick()
    assert coord.heartbeat("s2")["units"] == []

    coord.release("s1", [(u["unit"], u["epoch"], 5000 + u["unit"]) for u in revoking])

    granted = {u["unit"]: u for u in coord.heartbeat("s2")["units"]}
    assert set(granted) == {u["unit"] for u in revoking}
    for u in revoking:
        assert granted[u["unit"]]["offset"] == 5000 + u["unit"]
        assert granted[u["unit"]]["epoch"] == u["epoch"] + 1
        assert granted[u["unit"]]["status"] == "owned"


def test_stale_release_is_ignored(coord: Coordinator) -> None:
    register(coord, "s1")
    settle(coord, ["s1"])
    register(coord, "s2")
    unit = next(u for u in coord.heartbeat("s1")["units"] if u["status"] == "revoking")
    u, epoch = unit["unit"], unit["epoch"]

    # An older epoch (a release from before a previous grant), or a future one: fenced.
    coord.release("s1", [(u, epoch - 1, 1), (u, epoch + 1, 2)])
    coord.tick()
    state = coord.groups[KEY].units[u]
    assert (state.owner, state.epoch, state.status.value) == ("s1", epoch, "revoking")

    coord.release("s1", [(u, epoch, 777)])
    coord.release("s1", [(u, epoch, 999)])  # a retried release arrives again
    coord.tick()
    state = coord.groups[KEY].units[u]
    assert (state.owner, state.epoch, state.offset) == ("s2", epoch + 1, 777)


def test_release_from_a_member_that_is_not_the_owner_is_ignored(coord: Coordinator) -> None:
    register(coord, "s1")
    register(coord, "s2")
    settle(coord, ["s1", "s2"])
    theirs = min(units_of(coord, "s1"))
    epoch = coord.groups[KEY].units[theirs].epoch

    coord.release("s2", [(theirs, epoch, 1)])
    coord.tick()

    assert coord.groups[KEY].units[theirs].owner == "s1"
    assert coord.groups[KEY].units[theirs].status.value == "owned"


def test_leave_hands_the_units_over_gracefully(coord: Coordinator) -> None:
    register(coord, "s1")
    register(coord, "s2")
    settle(coord, ["s1", "s2"])
    leaving = {u: coord.groups[KEY].units[u].epoch for u in units_of(coord, "s1")}

    coord.leave("s1")
    # A leaving member takes no new work, but keeps what it has until it releases it.
    assert units_of(coord, "s1") == set(leaving)
    settle(coord, ["s1", "s2"])

    view = {u["unit"]: u for u in coord.heartbeat("s2")["units"]}
    assert set(view) == set(range(UNITS))
    for u, epoch in leaving.items():
        assert (view[u]["offset"], view[u]["epoch"]) == (offset_for(u), epoch + 1)
    assert coord.heartbeat("s1")["idle"] is True


# --- restart --------------------------------------------------------------------------------


def test_restart_resumes_the_rollout_and_ownership_and_waits_a_full_lease(
    running: Coordinator, store: MemoryStore, clock: FakeClock
) -> None:
    before = running.rollouts["r1"]
    units_before = dict(running.groups[KEY].units)
    s1_units = units_of(running, "s1")
    # The coordinator crashes a while after s1's last heartbeat; s1 never comes back.
    clock.advance(LEASE - 1)

    restarted = _coordinator(store, clock)
    restart = clock.monotonic()

    r = restarted.rollouts["r1"]
    assert (r.state.phase, r.state.step, r.state.share) == (Phase.PROGRESSING, 0, 25.0)
    assert r.state == before.state and r.version == before.version
    assert {u: (s.owner, s.epoch) for u, s in restarted.groups[KEY].units.items()} == {
        u: (s.owner, s.epoch) for u, s in units_before.items()
    }
    status = restarted.status("r1")
    assert (status["phase"], status["step"], status["share"]) == ("progressing", 1, 25.0)

    # A full lease + margin from the restart, not from s1's last heartbeat before it.
    for at in (0.0, LEASE / 2, LEASE, LEASE + MARGIN - EPS):
        clock.mono = restart + at
        restarted.heartbeat("s2")
        restarted.heartbeat("c1")
        restarted.tick()
        assert units_of(restarted, "s1") == s1_units, f"moved {at}s after the restart"

    clock.mono = restart + LEASE + MARGIN + EPS
    restarted.heartbeat("s2")
    restarted.heartbeat("c1")
    restarted.tick()

    assert units_of(restarted, "s1") == set()
    for u in s1_units:
        state = restarted.groups[KEY].units[u]
        assert state.owner == "s2" and state.epoch == units_before[u].epoch + 1
        assert state.offset is None
    assert len(units_of(restarted, "c1")) == 3  # the canary's share is untouched


def test_restart_continues_a_handoff_in_flight(
    coord: Coordinator, store: MemoryStore, clock: FakeClock
) -> None:
    register(coord, "s1")
    settle(coord, ["s1"])
    register(coord, "s2")
    revoking = [u for u in coord.heartbeat("s1")["units"] if u["status"] == "revoking"]

    restarted = _coordinator(store, clock)
    restarted.tick()
    restarted.release("s1", [(u["unit"], u["epoch"], 42) for u in revoking])

    granted = {u["unit"]: u for u in restarted.heartbeat("s2")["units"]}
    assert set(granted) == {u["unit"] for u in revoking}
    assert {(u["offset"], u["epoch"]) for u in granted.values()} == {(42, revoking[0]["epoch"] + 1)}


# --- rollout lifecycle ----------------------------------------------------------------------


def test_regression_rolls_back_and_measures_the_rollback(
    running: Coordinator, clock: FakeClock
) -> None:
    canary_units = units_of(running, "c1")
    running.heartbeat("s1", metrics=CohortObservations(processed=200, errors=1))
    running.heartbeat("c1", metrics=CohortObservations(processed=100, errors=30))
    decided_at = clock.wall()

    running.tick()

    status = running.status("r1")
    assert status["phase"] == "rolling_back" and status["share"] == 0.0
    assert "error_rate" in status["reason"]
    assert status["judgement"]["verdict"] == "fail"
    assert status["rollback_started_at"] == decided_at
    # The canary still holds its units until it releases them: no double ownership.
    assert units_of(running, "c1") == canary_units
    assert {u["status"] for u in running.heartbeat("c1")["units"]} == {"revoking"}
    clock.advance(1.5)
    running.tick()
    assert running.status("r1")["phase"] == "rolling_back"

    released = release_revoked(running, "c1")

    assert {u for u, _, _ in released} == canary_units
    status = running.status("r1")
    assert status["phase"] == "rolled_back" and status["active"] is False
    assert status["rollback_seconds"] == pytest.approx(1.5)
    assert units_of(running, "c1") == set()
    assert status["cohorts"]["stable"]["units"] == UNITS
    for u in canary_units:  # stable resumes exactly where the canary stopped
        assert running.groups[KEY].units[u].offset == offset_for(u)
    kinds = [d["kind"] for d in status["decisions"]]
    assert kinds[-2:] == ["rollback", "rolled_back"]


def test_rollback_with_a_crashed_canary_ends_after_lease_plus_margin(
    running: Coordinator, clock: FakeClock
) -> None:
    running.heartbeat("c1", metrics=CohortObservations(processed=100, errors=30))
    running.tick()  # the canary crashes here and never releases
    assert running.status("r1")["phase"] == "rolling_back"
    canary_units = units_of(running, "c1")

    steps = 0
    while running.status("r1")["phase"] == "rolling_back":
        assert steps < 20, "the rollback never finished"
        # Until then the canary's units are nobody else's.
        assert units_of(running, "c1") == canary_units
        clock.advance(0.5)
        steps += 1
        running.heartbeat("s1")
        running.heartbeat("s2")
        running.tick()

    status = running.status("r1")
    assert status["phase"] == "rolled_back"
    # Bounded by the lease and the margin (the last heartbeat was at the decision).
    assert status["rollback_seconds"] == pytest.approx(LEASE + MARGIN, abs=0.5)
    for u in canary_units:
        assert running.groups[KEY].units[u].owner in ("s1", "s2")
        assert running.groups[KEY].units[u].offset is None  # from the committed offset


def test_restart_during_a_rollback_finishes_it(
    running: Coordinator, store: MemoryStore, clock: FakeClock
) -> None:
    running.heartbeat("c1", metrics=CohortObservations(processed=100, errors=30))
    running.tick()
    clock.advance(1.0)

    restarted = _coordinator(store, clock)
    restarted.tick()
    assert restarted.status("r1")["phase"] == "rolling_back"
    settle(restarted, ["s1", "s2", "c1"])

    status = restarted.status("r1")
    assert status["phase"] == "rolled_back"
    assert status["rollback_seconds"] == pytest.approx(1.0)
    assert units_of(restarted, "c1") == set()


def test_release_carried_by_a_heartbeat_is_taken(coord: Coordinator) -> None:
    register(coord, "s1")
    settle(coord, ["s1"])
    register(coord, "s2")
    revoking = [u for u in coord.heartbeat("s1")["units"] if u["status"] == "revoking"]

    view = coord.heartbeat("s1", released=[(u["unit"], u["epoch"], 77) for u in revoking])

    assert {u["unit"] for u in view["units"]}.isdisjoint(u["unit"] for u in revoking)
    granted = coord.heartbeat("s2")["units"]
    assert {(u["unit"], u["offset"]) for u in granted} == {(u["unit"], 77) for u in revoking}


def test_a_step_does_not_pass_while_no_canary_is_alive(
    coord: Coordinator, clock: FakeClock
) -> None:
    for mid, cohort in (("s1", "stable"), ("s2", "stable"), ("c1", "canary")):
        register(coord, mid, cohort)
    # Judged on error rates alone, so that the canary's data is enough for the step to pass.
    coord.apply_rollout(spec(analysis={"latency": None, "lag_growth": None}))
    running = coord
    settle(running, ["s1", "s2", "c1"])
    running.heartbeat("s1", metrics=CohortObservations(processed=3000, errors=30))
    running.heartbeat("c1", metrics=CohortObservations(processed=1000, errors=10))
    # c1 dies; the step's hold (an hour) elapses with stable alone.
    for _ in range(0, 3700, 2):
        clock.advance(2)
        running.heartbeat("s1")
        running.heartbeat("s2")
        running.tick()

    status = running.status("r1")
    assert "c1" not in running.members
    assert (status["step"], status["share"]) == (1, 25.0)
    assert status["phase"] == "paused"
    assert "no canary member is alive" in status["reason"]


def test_errors_within_the_guard_do_not_fail_the_step(running: Coordinator) -> None:
    running.heartbeat("s1", metrics=CohortObservations(processed=300, errors=6))
    running.heartbeat("c1", metrics=CohortObservations(processed=100, errors=2))
    running.tick()
    assert running.status("r1")["phase"] == "progressing"


def test_approve_without_a_pending_gate_changes_nothing(running: Coordinator) -> None:
    before = running.rollouts["r1"]
    decisions = len(running.status("r1")["decisions"])

    with pytest.raises(TransitionError) as info:
        running.act("r1", "approve")

    assert "no approval gate" in info.value.message
    assert running.rollouts["r1"] == before
    assert running.store.load().rollouts["r1"] == before
    assert len(running.status("r1")["decisions"]) == decisions


def test_unknown_action_and_rollout(running: Coordinator) -> None:
    with pytest.raises(ConfigError) as bad:
        running.act("r1", "explode")
    assert "approve" in bad.value.message and bad.value.fields["field"] == "action"
    with pytest.raises(NotFound):
        running.act("nope", "pause")


def test_pause_holds_the_share_and_resume_continues(running: Coordinator) -> None:
    held = owners(running)

    paused = running.act("r1", "pause", by="alice")

    assert paused["phase"] == "paused" and paused["share"] == 25.0
    running.tick()
    assert owners(running) == held
    with pytest.raises(TransitionError):
        running.act("r1", "pause")

    resumed = running.act("r1", "resume")

    assert resumed["phase"] == "progressing" and resumed["step"] == 1
    assert owners(running) == held
    with pytest.raises(TransitionError):
        running.act("r1", "resume")


def test_a_regression_while_paused_still_rolls_back(running: Coordinator) -> None:
    running.act("r1", "pause")
    running.heartbeat("c1", metrics=CohortObservations(processed=50, errors=25))
    running.tick()
    assert running.status("r1")["phase"] == "rolling_back"


def test_second_rollout_for_a_busy_group_is_refused(running: Coordinator) -> None:
    before = running.rollouts["r1"]
    with pytest.raises(Exception) as info:
        running.apply_rollout(spec("r2"))
    assert info.value.__class__.__name__ == "ConflictError"
    assert running.rollouts["r1"] == before and "r2" not in running.rollouts


def test_rollout_for_a_missing_topic_is_not_found(coord: Coordinator) -> None:
    bad = spec(target={"topic": "nope", "group": "billing"})
    with pytest.raises(NotFound) as info:
        coord.apply_rollout(bad)
    assert "'nope'" in info.value.message
    assert coord.rollouts == {}


def test_after_promotion_stable_members_are_idle(running: Coordinator) -> None:
    running.act("r1", "promote", by="bob")
    assert running.status("r1")["phase"] == "promoting"

    settle(running, ["s1", "s2", "c1"])

    status = running.status("r1")
    assert status["phase"] == "promoted" and status["active"] is False
    assert units_of(running, "c1") == set(range(UNITS))
    for mid in ("s1", "s2"):
        view = running.heartbeat(mid)
        assert view["idle"] is True and view["units"] == []
    # A stable member starting late gets nothing either.
    register(running, "s3")
    running.tick()
    assert running.heartbeat("s3")["idle"] is True


def test_abort_moves_everything_back_to_stable(running: Coordinator) -> None:
    running.act("r1", "abort")
    settle(running, ["s1", "s2", "c1"])

    status = running.status("r1")
    assert status["phase"] == "aborted"
    assert units_of(running, "c1") == set()
    assert status["rollback_seconds"] is not None


# --- long-poll heartbeats (real clock: the waiting caller needs a second thread) ------------


def _long_poll(c: Coordinator, mid: str, known: str, wait: float) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            out["view"] = c.heartbeat(mid, known=known, wait=wait)
        except Exception as exc:  # surfaced by the assertions below
            out["error"] = exc
        out["seconds"] = time.monotonic() - t0

    out["thread"] = threading.Thread(target=run, daemon=True)
    out["thread"].start()
    return out


def test_long_poll_returns_as_soon_as_the_view_changes(store: MemoryStore) -> None:
    c = _coordinator(store, Clock(), lease=30.0)  # long-polls may wait up to 10 s
    register(c, "s1")
    known = c.heartbeat("s1")["digest"]
    poll = _long_poll(c, "s1", known, wait=10.0)
    time.sleep(0.3)
    assert poll["thread"].is_alive(), "the long-poll returned without a change"

    register(c, "s2")  # half of s1's units are revoked: s1 must hear it now

    poll["thread"].join(timeout=5)
    assert not poll["thread"].is_alive()
    assert "error" not in poll
    assert poll["seconds"] < 3.0
    view = poll["view"]
    assert view["digest"] != known
    assert sum(u["status"] == "revoking" for u in view["units"]) == UNITS // 2


def test_long_poll_waits_until_its_deadline_when_nothing_changes(store: MemoryStore) -> None:
    c = _coordinator(store, Clock(), lease=30.0)
    register(c, "s1")
    known = c.heartbeat("s1")["digest"]

    t0 = time.monotonic()
    view = c.heartbeat("s1", known=known, wait=0.3)

    assert time.monotonic() - t0 >= 0.25
    assert view["digest"] == known


def test_heartbeat_with_an_outdated_digest_answers_at_once(store: MemoryStore) -> None:
    c = _coordinator(store, Clock(), lease=30.0)
    register(c, "s1")

    t0 = time.monotonic()
    view = c.heartbeat("s1", known="stale", wait=5.0)

    assert time.monotonic() - t0 < 1.0
    assert len(view["units"]) == UNITS
