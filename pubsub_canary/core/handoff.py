"""The handoff protocol, as data and pure functions.

A work unit moves between members in four steps, each stamped with the unit's fencing epoch::

    owner A holds (unit, epoch e)          status OWNED
    coordinator: revoke (unit, e) -> A     status REVOKING
    A: stop fetching, finish in-flight work, commit, release (unit, e, next_offset)
    coordinator: grant (unit, e+1, next_offset) -> B     status OWNED by B
    B starts exactly at next_offset

If A's lease runs out (plus the safety margin) before it releases, the coordinator takes the
unit back without a release and grants it from the last committed offset: only then may
messages be processed twice (bounded by A's uncommitted window).

:func:`reconcile` moves every unit one protocol step towards the planner's target;
:func:`apply_release` takes a member's release. Both return new states; nothing is mutated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from pubsub_canary.errors import FencedError


class UnitStatus(StrEnum):
    FREE = "free"
    OWNED = "owned"
    REVOKING = "revoking"


@dataclass(frozen=True)
class UnitState:
    """Where one work unit stands in the protocol."""

    unit: int
    owner: str | None = None
    epoch: int = 0
    status: UnitStatus = UnitStatus.FREE
    #: Offset the next owner starts at (set by a release); None: the group's committed offset.
    offset: int | None = None
    #: When the current status began (a grant or a revoke), for handoff timing.
    since: float | None = None
    #: When the unit was last asked to move (revoke, or a dead owner noticed).
    move_started_at: float | None = None
    #: False while a FREE unit was taken from an owner presumed dead (no release): its next
    #: grant is not graceful, however many rounds it waits for a target.
    graceful: bool = True


@dataclass(frozen=True)
class Grant:
    unit: int
    epoch: int
    member: str
    offset: int | None
    #: Seconds from the decision to move the unit to this grant (None: first grant).
    handoff_seconds: float | None
    #: Whether the previous owner released it (graceful) or was presumed dead.
    graceful: bool


@dataclass(frozen=True)
class Revoke:
    unit: int
    epoch: int
    member: str


@dataclass(frozen=True)
class Released:
    """A member stopped ``unit`` at ``epoch``; the next owner starts at ``offset``."""

    unit: int
    epoch: int
    member: str
    offset: int | None


Change = Grant | Revoke


def reconcile(
    units: Mapping[int, UnitState],
    target: Mapping[int, str | None],
    alive: Iterable[str],
    now: float,
    ready: Callable[[int, str], bool] | None = None,
) -> tuple[dict[int, UnitState], list[Change]]:
    """One protocol step for every unit towards ``target``.

    Args:
        units: current protocol state of each unit.
        target: the planner's owner for each unit.
        alive: members whose lease (plus the safety margin) has not run out. A unit whose
            owner is not in ``alive`` is taken back without a release, and no unit is granted
            to a member outside ``alive``.
        now: the coordinator's clock.
        ready: ``ready(unit, next_owner)``: whether an owned unit may be revoked for that next
            owner now (a stateful next owner first warms up its state). A unit with no next
            owner, or whose owner is gone, never waits.
    """
    alive = set(alive)
    out: dict[int, UnitState] = {}
    changes: list[Change] = []
    for u, st in units.items():
        want = target.get(u)
        if st.owner is not None and st.owner not in alive:
            # Presumed dead: its lease ran out on its side before ours, so it stopped.
            st = replace(
                st,
                owner=None,
                status=UnitStatus.FREE,
                offset=None,
                move_started_at=st.move_started_at if st.move_started_at is not None else now,
                graceful=False,
            )
        waits = want is not None and ready is not None and not ready(u, want)
        if st.status is UnitStatus.OWNED and st.owner != want and not waits:
            st = replace(st, status=UnitStatus.REVOKING, since=now, move_started_at=now)
            assert st.owner is not None
            changes.append(Revoke(u, st.epoch, st.owner))
        elif st.status is UnitStatus.FREE and want is not None and want in alive:
            # A target naming a member presumed dead (a plan older than this round) waits: a
            # grant would be taken back next round, losing the released offset.
            took = now - st.move_started_at if st.move_started_at is not None else None
            graceful = st.graceful
            st = UnitState(u, want, st.epoch + 1, UnitStatus.OWNED, st.offset, now, None)
            changes.append(Grant(u, st.epoch, want, st.offset, took, graceful))
        out[u] = st
    return out, changes


def apply_release(units: Mapping[int, UnitState], rel: Released) -> dict[int, UnitState]:
    """Take a member's release of a unit; raises FencedError for a stale or foreign one."""
    st = units.get(rel.unit)
    if st is None or st.owner != rel.member or st.epoch != rel.epoch:
        raise FencedError(
            f"release of unit {rel.unit} at epoch {rel.epoch} by {rel.member} ignored: "
            f"the unit is held by {st.owner if st else None} at epoch {st.epoch if st else None}",
            unit=rel.unit,
            epoch=rel.epoch,
        )
    out = dict(units)
    out[rel.unit] = replace(
        st,
        owner=None,
        status=UnitStatus.FREE,
        offset=rel.offset,
        since=None,
        move_started_at=st.move_started_at,
    )
    return out


def is_settled(units: Mapping[int, UnitState], target: Mapping[int, str | None]) -> bool:
    """Every unit is owned by its target (units with no target may stay free)."""
    for u, st in units.items():
        want = target.get(u)
        if want is None:
            if st.status is not UnitStatus.FREE:
                return False
        elif st.status is not UnitStatus.OWNED or st.owner != want:
            return False
    return True
