"""The handoff protocol, driven by a simulated coordinator loop.

A hypothesis state machine plays the coordinator (random targets, reconcile rounds) and the
members (join, die, process messages, release revoked units, send stale or duplicated
releases), keeping its own model of what each member believes it owns and where each unit's
log stands. After every step it checks the invariants: I1 (one owner), I2 (nothing skipped),
I3 (a graceful handoff starts exactly at the released offset), epochs and handoff timing.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pubsub_canary.core.handoff import (
    Grant,
    Released,
    Revoke,
    UnitState,
    UnitStatus,
    apply_release,
    is_settled,
    reconcile,
)
from pubsub_canary.errors import CanaryError, FencedError

# --- example-based cases ------------------------------------------------------------------


def _free(n: int) -> dict[int, UnitState]:
    return {u: UnitState(u) for u in range(n)}


def test_first_grant_starts_at_the_committed_offset() -> None:
    units, changes = reconcile(_free(2), {0: "a", 1: "b"}, {"a", "b"}, now=5.0)

    assert changes == [
        Grant(0, 1, "a", None, handoff_seconds=None, graceful=True),
        Grant(1, 1, "b", None, handoff_seconds=None, graceful=True),
    ]
    assert units[0] == UnitState(0, "a", 1, UnitStatus.OWNED, None, since=5.0)
    assert is_settled(units, {0: "a", 1: "b"})


def test_graceful_move_revoke_release_grant() -> None:
    units, _ = reconcile(_free(1), {0: "a"}, {"a", "b"}, now=0.0)

    units, changes = reconcile(units, {0: "b"}, {"a", "b"}, now=10.0)
    assert changes == [Revoke(0, 1, "a")]
    assert units[0].status is UnitStatus.REVOKING and units[0].owner == "a"
    assert not is_settled(units, {0: "b"})

    # Nothing moves until the owner releases, however often the coordinator reconciles.
    again, changes = reconcile(units, {0: "b"}, {"a", "b"}, now=11.0)
    assert changes == [] and again == units

    units = apply_release(units, Released(0, 1, "a", offset=42))
    assert units[0].status is UnitStatus.FREE and units[0].owner is None

    units, changes = reconcile(units, {0: "b"}, {"a", "b"}, now=12.5)
    assert changes == [Grant(0, 2, "b", 42, handoff_seconds=2.5, graceful=True)]
    assert is_settled(units, {0: "b"})


def test_dead_owner_is_replaced_without_a_release() -> None:
    units, _ = reconcile(_free(1), {0: "a"}, {"a"}, now=0.0)

    units, changes = reconcile(units, {0: "b"}, {"b"}, now=30.0)

    assert changes == [Grant(0, 2, "b", None, handoff_seconds=0.0, graceful=False)]


def test_dead_owner_of_a_revoked_unit_times_from_the_revoke() -> None:
    units, _ = reconcile(_free(1), {0: "a"}, {"a", "b"}, now=0.0)
    units, _ = reconcile(units, {0: "b"}, {"a", "b"}, now=0.0)  # revoke at t=0

    units, changes = reconcile(units, {0: "b"}, {"b"}, now=9.0)

    assert changes == [Grant(0, 2, "b", None, handoff_seconds=9.0, graceful=False)]


def test_unit_of_a_dead_owner_with_no_target_is_regranted_later_as_not_graceful() -> None:
    """Duplicates are counted on non-graceful grants (I3); the flag must survive a wait."""
    units, _ = reconcile(_free(1), {0: "a"}, {"a"}, now=0.0)
    units, changes = reconcile(units, {0: None}, set(), now=10.0)  # a died, nobody to take it
    assert changes == [] and units[0].status is UnitStatus.FREE

    units, changes = reconcile(units, {0: "b"}, {"b"}, now=15.0)

    assert changes == [Grant(0, 2, "b", None, handoff_seconds=5.0, graceful=False)]


def test_no_grant_to_a_member_presumed_dead() -> None:
    units, _ = reconcile(_free(1), {0: "a"}, {"a", "b"}, now=0.0)
    units, _ = reconcile(units, {0: "b"}, {"a", "b"}, now=1.0)
    units = apply_release(units, Released(0, 1, "a", offset=7))

    # A stale target names b, whose lease has just run out.
    units, changes = reconcile(units, {0: "b"}, {"a"}, now=2.0)

    assert changes == []
    assert units[0].status is UnitStatus.FREE and units[0].offset == 7


@pytest.mark.parametrize(
    "release",
    [
        Released(0, 0, "a", 5),  # old epoch
        Released(0, 2, "a", 5),  # future epoch
        Released(0, 1, "b", 5),  # someone else
        Released(9, 1, "a", 5),  # unknown unit
    ],
    ids=["old-epoch", "future-epoch", "other-member", "unknown-unit"],
)
def test_stale_release_is_fenced_and_changes_nothing(release: Released) -> None:
    units, _ = reconcile(_free(1), {0: "a"}, {"a", "b"}, now=0.0)
    units, _ = reconcile(units, {0: "b"}, {"a", "b"}, now=1.0)
    before = dict(units)

    with pytest.raises(FencedError) as info:
        apply_release(units, release)

    assert units == before
    assert info.value.fields["epoch"] == release.epoch
    assert isinstance(info.value, CanaryError)


def test_duplicate_release_is_fenced() -> None:
    units, _ = reconcile(_free(1), {0: "a"}, {"a", "b"}, now=0.0)
    units, _ = reconcile(units, {0: "b"}, {"a", "b"}, now=1.0)
    released = apply_release(units, Released(0, 1, "a", 5))

    with pytest.raises(FencedError):
        apply_release(released, Released(0, 1, "a", 5))


@pytest.mark.parametrize(
    ("state", "target", "settled"),
    [
        (UnitState(0, "a", 1, UnitStatus.OWNED), "a", True),
        (UnitState(0, "a", 1, UnitStatus.OWNED), "b", False),
        (UnitState(0, "a", 1, UnitStatus.REVOKING), "a", False),
        (UnitState(0, None, 1, UnitStatus.FREE), "a", False),
        (UnitState(0, None, 1, UnitStatus.FREE), None, True),
        (UnitState(0, "a", 1, UnitStatus.OWNED), None, False),
        (UnitState(0, "a", 1, UnitStatus.REVOKING), None, False),
    ],
)
def test_is_settled(state: UnitState, target: str | None, settled: bool) -> None:
    assert is_settled({0: state}, {0: target}) is settled


# --- the simulated coordinator loop -------------------------------------------------------


@dataclass
class Held:
    """What a member believes: it owns ``unit`` at ``epoch`` and has processed up to ``pos``."""

    epoch: int
    pos: int


@dataclass
class Log:
    """One unit's log as seen by every owner so far."""

    committed: int = 0
    #: One past the highest offset any owner processed.
    high: int = 0
    duplicates: int = 0
    #: Duplicates the crashes so far allow: the uncommitted window at each non-graceful grant.
    allowed_duplicates: int = 0


@dataclass
class Pending:
    """What the next grant of a unit must say, from the model's point of view."""

    kind: str = "fresh"  # fresh | released | dead
    offset: int | None = None
    move_started_at: float | None = None


class HandoffLoop(RuleBasedStateMachine):
    @initialize(n=st.integers(1, 6), n_members=st.integers(1, 3))
    def setup(self, n: int, n_members: int) -> None:
        self.now = 0.0
        self.units = _free(n)
        self.next_member = 0
        self.alive: set[str] = set()
        self.ever: list[str] = []
        self.held: dict[str, dict[int, Held]] = {}
        self.logs = {u: Log() for u in range(n)}
        self.pending = {u: Pending() for u in range(n)}
        self.last_epoch = dict.fromkeys(range(n), 0)
        self.sent: list[Released] = []
        for _ in range(n_members):
            self.join()
        self.target: dict[int, str | None] = {u: None for u in range(n)}

    # members

    @precondition(lambda self: len(self.ever) < 8)
    @rule()
    def join(self) -> None:
        m = f"m{self.next_member}"
        self.next_member += 1
        self.alive.add(m)
        self.ever.append(m)
        self.held[m] = {}

    @precondition(lambda self: self.alive)
    @rule(data=st.data())
    def die(self, data: st.DataObject) -> None:
        """Lease ran out on the member's side: it stops, losing uncommitted progress."""
        m = data.draw(st.sampled_from(sorted(self.alive)))
        self.alive.discard(m)
        self.held[m] = {}

    @precondition(lambda self: any(self.held[m] for m in self.alive))
    @rule(data=st.data(), k=st.integers(1, 5), commit=st.booleans())
    def process(self, data: st.DataObject, k: int, commit: bool) -> None:
        m = data.draw(st.sampled_from(sorted(m for m in self.alive if self.held[m])))
        u = data.draw(st.sampled_from(sorted(self.held[m])))
        h = self.held[m][u]
        log = self.logs[u]
        log.duplicates += max(0, min(log.high, h.pos + k) - h.pos)
        assert log.duplicates <= log.allowed_duplicates, "I3: duplicates without a crash"
        h.pos += k
        log.high = max(log.high, h.pos)
        if commit:
            log.committed = h.pos

    @precondition(lambda self: self._revoked_held())
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self._release(*data.draw(st.sampled_from(self._revoked_held())))

    def _release(self, m: str, u: int) -> None:
        h = self.held[m].pop(u)
        self.logs[u].committed = h.pos  # commit, then release
        rel = Released(u, h.epoch, m, h.pos)
        self.units = apply_release(self.units, rel)  # must not raise: m really owns it
        self.sent.append(rel)
        p = self.pending[u]
        p.kind, p.offset = "released", h.pos

    @precondition(lambda self: self.ever)
    @rule(data=st.data())
    def stale_release(self, data: st.DataObject) -> None:
        """Duplicated, delayed or forged releases: all fenced, none changes anything."""
        candidates = [
            *self.sent,
            *(
                Released(u, e, m, 0)
                for u in self.units
                for e in range(self.units[u].epoch + 2)
                for m in self.ever
            ),
        ]
        rel = data.draw(st.sampled_from(candidates))
        st_ = self.units[rel.unit]
        if st_.owner == rel.member and st_.epoch == rel.epoch:
            return  # that is the current owner's own release, not a stale one
        before = dict(self.units)
        with pytest.raises(FencedError):
            apply_release(self.units, rel)
        assert self.units == before

    # coordinator

    @rule(data=st.data())
    def set_target(self, data: st.DataObject) -> None:
        choices = [None, *sorted(self.alive)]
        self.target = {u: data.draw(st.sampled_from(choices)) for u in self.units}

    @rule(data=st.data())
    def set_stale_target(self, data: st.DataObject) -> None:
        """The planner ran before the latest deaths were noticed."""
        choices = [None, *self.ever]
        self.target = {u: data.draw(st.sampled_from(choices)) for u in self.units}

    @rule(dt=st.sampled_from([0.0, 0.25, 1.0, 7.5]))
    def reconcile_round(self, dt: float) -> None:
        self.now += dt
        self._reconcile()

    @rule()
    def settle(self) -> None:
        """With a target of live members and cooperative owners, two rounds settle it."""
        self.target = {u: (m if m in self.alive else None) for u, m in self.target.items()}
        for _ in range(2):
            self.now += 1.0
            self._reconcile()
            for m, u in self._revoked_held():
                self._release(m, u)
        self.now += 1.0
        self._reconcile()
        assert is_settled(self.units, self.target)

    def _reconcile(self) -> None:
        before = self.units
        for u, st_ in before.items():
            if st_.owner is not None and st_.owner not in self.alive:
                p = self.pending[u]
                p.kind, p.offset = "dead", None
                if p.move_started_at is None:
                    p.move_started_at = self.now
        self.units, changes = reconcile(before, self.target, self.alive, self.now)
        for change in changes:
            if isinstance(change, Revoke):
                self._check_revoke(before, change)
            else:
                self._check_grant(change)
        for u, st_ in self.units.items():
            if not any(c.unit == u for c in changes):
                # No change for this unit means it was already where it should be, waiting for
                # a release, or has no live member to go to.
                want = self.target.get(u)
                assert (
                    (st_.status is UnitStatus.OWNED and st_.owner == want)
                    or st_.status is UnitStatus.REVOKING
                    or (st_.status is UnitStatus.FREE and (want is None or want not in self.alive))
                ), (u, st_, want)

    def _check_revoke(self, before: dict[int, UnitState], r: Revoke) -> None:
        old = before[r.unit]
        assert old.status is UnitStatus.OWNED and old.owner == r.member and old.epoch == r.epoch
        assert r.member in self.alive and self.target.get(r.unit) != r.member
        self.pending[r.unit].move_started_at = self.now

    def _check_grant(self, g: Grant) -> None:
        u = g.unit
        assert g.member in self.alive, "granted to a member presumed dead"
        assert g.member == self.target[u]
        holders = [m for m in self.alive if u in self.held[m]]
        assert holders == [], f"I1: unit {u} granted to {g.member} while {holders} still hold it"
        assert g.epoch == self.last_epoch[u] + 1, "epochs go up by one on every grant"
        self.last_epoch[u] = g.epoch

        p = self.pending[u]
        log = self.logs[u]
        if p.kind == "released":
            assert (g.graceful, g.offset) == (True, p.offset), "I3: start where the last one ended"
        elif p.kind == "dead":
            assert (g.graceful, g.offset) == (False, None)
        else:
            assert (g.graceful, g.offset, g.handoff_seconds) == (True, None, None)
        if p.move_started_at is not None:
            assert g.handoff_seconds == pytest.approx(self.now - p.move_started_at)
        start = g.offset if g.offset is not None else log.committed
        assert start <= log.high, "I2: the new owner would skip messages"
        if not g.graceful:
            log.allowed_duplicates += log.high - start
        self.held[g.member][u] = Held(g.epoch, start)
        self.pending[u] = Pending()

    def _revoked_held(self) -> list[tuple[str, int]]:
        return [
            (m, u)
            for m in sorted(self.alive)
            for u, h in sorted(self.held[m].items())
            if self.units[u].status is UnitStatus.REVOKING and self.units[u].epoch == h.epoch
        ]

    # invariants

    @invariant()
    def one_owner_per_unit(self) -> None:
        for u, st_ in self.units.items():
            assert (st_.owner is None) == (st_.status is UnitStatus.FREE), st_
            holders = [m for m in self.alive if u in self.held[m]]
            # I1: at most one live member processes a unit, and it is the coordinator's owner.
            assert len(holders) <= 1, (u, holders)
            if holders:
                assert holders == [st_.owner] and self.held[holders[0]][u].epoch == st_.epoch

    @invariant()
    def settled_means_owned_by_target(self) -> None:
        expected = all(
            (st_.status is UnitStatus.FREE)
            if self.target.get(u) is None
            else (st_.status is UnitStatus.OWNED and st_.owner == self.target.get(u))
            for u, st_ in self.units.items()
        )
        assert is_settled(self.units, self.target) is expected


HandoffLoop.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_handoff_loop = HandoffLoop.TestCase
