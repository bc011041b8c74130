"""The assignment planner: which member should own each work unit.

Pure and deterministic. Given the work units (Kafka partitions or Pub/Sub buckets), the members
that may take work, the current owners and the canary's share, :func:`plan_assignment` returns
the target owner of every unit:

* the canary gets ``round(share% of units)`` units, at least one while its share is above 0
  and a canary member exists;
* the canary's units are spread over the unit range (a nested bit-reversal order, so 4 of 16
  partitions are 0, 8, 4, 12 rather than 0..3) and are sticky: widening the share keeps the
  units the canary has and adds the next ones in that order; narrowing drops the last ones;
* within each cohort units are balanced (counts differ by at most one) and sticky: a member
  keeps what it owns unless it holds more than its fair count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

from pubsub_canary.core.observations import Cohort


@dataclass(frozen=True, order=True)
class MemberView:
    """A member that may be given work."""

    member_id: str
    cohort: Cohort


@cache
def spread_rank(n: int) -> tuple[int, ...]:
    """``rank[u]``: position of unit ``u`` in the spread order of ``n`` units.

    The order is the bit-reversal permutation of ``0..2^k-1`` restricted to ``0..n-1``; every
    prefix of it is spread evenly over the range, and a longer prefix contains a shorter one.
    """
    bits = max(1, (n - 1).bit_length())
    order = [u for u in (int(format(i, f"0{bits}b")[::-1], 2) for i in range(1 << bits)) if u < n]
    rank = [0] * n
    for pos, u in enumerate(order):
        rank[u] = pos
    return tuple(rank)


def canary_unit_count(n_units: int, share: float, has_canary: bool) -> int:
    """How many of ``n_units`` the canary should own at ``share`` percent."""
    if n_units == 0 or share <= 0 or not has_canary:
        return 0
    if share >= 100:
        return n_units
    # Half up, not banker's rounding: 25% of 10 units is 3, not 2.
    return min(n_units, max(1, int(n_units * share / 100.0 + 0.5)))


def _pick_canary_units(units: Sequence[int], current_canary: set[int], count: int) -> set[int]:
    rank = spread_rank(max(units) + 1) if units else ()
    keep = sorted(current_canary & set(units), key=lambda u: rank[u])[:count]
    chosen = set(keep)
    for u in sorted(units, key=lambda u: rank[u]):
        if len(chosen) >= count:
            break
        chosen.add(u)
    return chosen


def _balance(
    units: set[int], members: list[str], current: Mapping[int, str | None]
) -> dict[int, str]:
    """Sticky, balanced assignment of ``units`` over ``members`` (sorted ids)."""
    if not members or not units:
        return {}
    held: dict[str, list[int]] = {m: [] for m in members}
    for u in sorted(units):
        owner = current.get(u)
        if owner in held:
            held[owner].append(u)
    base, extra = divmod(len(units), len(members))
    # Members already holding more get the "+1" slots first, so fewer units move.
    by_holding = sorted(members, key=lambda m: (-len(held[m]), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_holding)}
    plan: dict[int, str] = {}
    free: list[int] = [u for u in sorted(units) if current.get(u) not in held]
    for m in members:
        mine = held[m]
        for u in mine[: quota[m]]:
            plan[u] = m
        free.extend(mine[quota[m] :])
    free.sort()
    it = iter(free)
    for m in members:
        for _ in range(quota[m] - sum(1 for owner in plan.values() if owner == m)):
            plan[next(it)] = m
    return plan


def plan_assignment(
    units: Sequence[int],
    members: Sequence[MemberView],
    current: Mapping[int, str | None],
    share: float,
) -> dict[int, str | None]:
    """Target owner of each unit (None: no member can take it now).

    Args:
        units: the work units of the group.
        members: members that may be given work (live lease, not leaving).
        current: current owner of each unit (absent or None: unowned).
        share: the canary's share in percent, 0..100.
    """
    canaries = sorted(m.member_id for m in members if m.cohort is Cohort.CANARY)
    stables = sorted(m.member_id for m in members if m.cohort is Cohort.STABLE)
    cohort_of = {m.member_id: m.cohort for m in members}
    count = canary_unit_count(len(units), share, bool(canaries))
    current_canary = {u for u in units if cohort_of.get(current.get(u) or "") is Cohort.CANARY}
    canary_units = _pick_canary_units(units, current_canary, count)
    stable_units = set(units) - canary_units
    plan: dict[int, str | None] = dict.fromkeys(units)
    plan.update(_balance(canary_units, canaries, current))
    plan.update(_balance(stable_units, stables, current))
    return plan
