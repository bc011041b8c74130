"""The assignment planner: property tests over random groups, plus the exact spread order."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pubsub_canary.core.observations import Cohort
from pubsub_canary.core.planner import (
    MemberView,
    canary_unit_count,
    plan_assignment,
    spread_rank,
)

Plan = dict[int, str | None]
#: units, members, current assignment, canary share
Group = tuple[list[int], list[MemberView], Plan, float]


def _members(n_canary: int, n_stable: int) -> list[MemberView]:
    return [MemberView(f"c{i}", Cohort.CANARY) for i in range(n_canary)] + [
        MemberView(f"s{i}", Cohort.STABLE) for i in range(n_stable)
    ]


def _canary_units(plan: Plan) -> set[int]:
    return {u for u, m in plan.items() if m is not None and m.startswith("c")}


def _counts(plan: Plan, members: list[MemberView], cohort: Cohort) -> list[int]:
    ids = [m.member_id for m in members if m.cohort is cohort]
    return [sum(1 for owner in plan.values() if owner == i) for i in ids]


def _scrambled(units: list[int], members: list[MemberView], rnd: random.Random) -> Plan:
    """A random current assignment, so the plan built on it is balanced in an arbitrary way."""
    owners = [m.member_id for m in members] + [None]
    return {u: rnd.choice(owners) for u in units}


@st.composite
def groups(draw: st.DrawFn) -> Group:
    """Units 0..n-1, members of both cohorts (possibly none), a random current assignment.

    Current owners include members that have since gone (``gone*``) and cross-cohort owners.
    """
    n = draw(st.integers(1, 128))
    members = _members(draw(st.integers(0, 4)), draw(st.integers(0, 8)))
    members = draw(st.permutations(members))
    owners = [m.member_id for m in members] + ["gone0", "gone1", None]
    current = {u: draw(st.sampled_from(owners)) for u in range(n)} if draw(st.booleans()) else {}
    share = draw(st.one_of(st.sampled_from([0.0, 0.1, 50.0, 99.9, 100.0]), st.floats(0, 100)))
    return list(range(n)), members, current, share


def _check_valid(units: list[int], members: list[MemberView], plan: Plan, share: float) -> None:
    cohort_of = {m.member_id: m.cohort for m in members}
    has_canary = any(m.cohort is Cohort.CANARY for m in members)
    has_stable = any(m.cohort is Cohort.STABLE for m in members)
    assert set(plan) == set(units)

    canary = _canary_units(plan)
    assert len(canary) == canary_unit_count(len(units), share, has_canary)
    if share > 0 and has_canary:
        assert canary, "a canary with a share above 0 owns at least one unit"
    for owner in plan.values():
        if owner is None:
            # Only a stable unit can be unowned, and only when no stable member exists.
            assert not has_stable
        else:
            assert owner in cohort_of
    for cohort in (Cohort.CANARY, Cohort.STABLE):
        counts = _counts(plan, members, cohort)
        if counts:
            assert max(counts) - min(counts) <= 1, f"{cohort} unbalanced: {counts}"


@settings(max_examples=300, deadline=None)
@given(groups())
def test_plan_is_valid_balanced_and_sized(group: Group) -> None:
    units, members, current, share = group
    _check_valid(units, members, plan_assignment(units, members, current, share), share)


@settings(max_examples=200, deadline=None)
@given(groups(), st.randoms(use_true_random=False))
def test_plan_is_deterministic_and_ignores_member_order(group: Group, rnd: random.Random) -> None:
    units, members, current, share = group
    plan = plan_assignment(units, members, current, share)
    shuffled = list(members)
    rnd.shuffle(shuffled)
    assert plan_assignment(units, members, current, share) == plan
    assert plan_assignment(units, shuffled, dict(reversed(current.items())), share) == plan


@settings(max_examples=200, deadline=None)
@given(groups())
def test_replanning_a_plan_moves_nothing(group: Group) -> None:
    units, members, current, share = group
    plan = plan_assignment(units, members, current, share)
    assert plan_assignment(units, members, plan, share) == plan


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 128),
    st.integers(1, 4),
    st.integers(1, 8),
    st.floats(0, 100),
    st.randoms(use_true_random=False),
)
def test_any_balanced_assignment_of_the_right_size_is_kept(
    n: int, n_canary: int, n_stable: int, share: float, rnd: random.Random
) -> None:
    """Stickiness does not depend on who made the assignment: a member keeps what it owns
    unless it holds more than its fair count."""
    units = list(range(n))
    members = _members(n_canary, n_stable)
    shuffled = rnd.sample(units, n)
    count = canary_unit_count(n, share, True)
    canary_ids = rnd.sample([f"c{i}" for i in range(n_canary)], n_canary)
    stable_ids = rnd.sample([f"s{i}" for i in range(n_stable)], n_stable)
    current: Plan = {u: canary_ids[i % n_canary] for i, u in enumerate(shuffled[:count])}
    current.update({u: stable_ids[i % n_stable] for i, u in enumerate(shuffled[count:])})

    assert plan_assignment(units, members, current, share) == current


@settings(max_examples=200, deadline=None)
@given(groups(), st.floats(0, 100), st.floats(0, 100))
def test_widening_keeps_canary_units_and_narrowing_never_adds(
    group: Group, a: float, b: float
) -> None:
    units, members, current, _ = group
    low, high = min(a, b), max(a, b)

    at_low = plan_assignment(units, members, current, low)
    widened = plan_assignment(units, members, at_low, high)
    assert _canary_units(at_low) <= _canary_units(widened)

    narrowed = plan_assignment(units, members, widened, low)
    assert _canary_units(narrowed) <= _canary_units(widened)
    # Both directions from the same starting point are nested as well.
    assert _canary_units(plan_assignment(units, members, current, low)) <= _canary_units(
        plan_assignment(units, members, current, high)
    )


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 128),
    st.integers(1, 6),
    st.integers(1, 6),
    st.floats(0, 100),
    st.sampled_from([Cohort.CANARY, Cohort.STABLE]),
    st.randoms(use_true_random=False),
)
def test_adding_a_member_moves_only_units_to_it(
    n: int, n_canary: int, n_stable: int, share: float, cohort: Cohort, rnd: random.Random
) -> None:
    """Joining a balanced cohort of k members moves at most ceil(units/(k+1)) units.

    The newcomer must end up with floor or ceil of units/(k+1) to keep the cohort balanced, so
    that is the least any balanced planner can move; every moved unit must go to the newcomer
    (no shuffling among the members already there).
    """
    units = list(range(n))
    members = _members(n_canary, n_stable)
    before = plan_assignment(units, members, _scrambled(units, members, rnd), share)
    newcomer = MemberView("c9" if cohort is Cohort.CANARY else "s9", cohort)

    after = plan_assignment(units, [*members, newcomer], before, share)

    moved = {u for u in units if after[u] != before[u]}
    assert all(after[u] == newcomer.member_id for u in moved)
    in_cohort = sum(1 for u in units if (after[u] or "").startswith(newcomer.member_id[0]))
    k = n_canary if cohort is Cohort.CANARY else n_stable
    assert len(moved) <= math.ceil(in_cohort / (k + 1))
    assert _canary_units(after) == _canary_units(before)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 128),
    st.integers(2, 6),
    st.integers(0, 5),
    st.floats(0, 100),
    st.randoms(use_true_random=False),
)
def test_losing_a_stable_member_moves_only_its_units(
    n: int, n_stable: int, n_canary: int, share: float, rnd: random.Random
) -> None:
    units = list(range(n))
    members = _members(n_canary, n_stable)
    before = plan_assignment(units, members, _scrambled(units, members, rnd), share)
    gone = "s0"

    after = plan_assignment(units, [m for m in members if m.member_id != gone], before, share)

    moved = {u for u in units if after[u] != before[u]}
    assert moved == {u for u in units if before[u] == gone}


def test_last_canary_gone_returns_every_unit_to_stable() -> None:
    units = list(range(8))
    members = _members(1, 2)
    before = plan_assignment(units, members, {}, 50)

    after = plan_assignment(units, members[1:], before, 50)

    assert _canary_units(after) == set()
    assert all(after[u] == before[u] for u in units if before[u] != "c0")


@pytest.mark.parametrize(
    ("n", "share", "expected"),
    [
        (16, 25, {0, 4, 8, 12}),
        (16, 12.5, {0, 8}),
        (16, 6.25, {0}),
        (16, 50, {0, 2, 4, 6, 8, 10, 12, 14}),
        (8, 50, {0, 2, 4, 6}),
        # 10 units: bit-reversal of 0..15 is 0 8 4 12 2 10 6 14 1 9 ...; 12 and 14 are skipped.
        (10, 30, {0, 8, 4}),
        (10, 50, {0, 8, 4, 2, 6}),
    ],
)
def test_canary_units_are_spread_over_the_range(n: int, share: float, expected: set[int]) -> None:
    plan = plan_assignment(list(range(n)), _members(1, 1), {}, share)
    assert _canary_units(plan) == expected


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 128])
def test_spread_rank_is_a_permutation_whose_prefixes_spread(n: int) -> None:
    rank = spread_rank(n)
    assert sorted(rank) == list(range(n))
    order = sorted(range(n), key=lambda u: rank[u])
    for k in range(1, n + 1):
        prefix = sorted(order[:k])
        # k units out of n: no gap between chosen units (cyclically) exceeds twice the even gap.
        gaps = [b - a for a, b in itertools.pairwise(prefix)] + [n - prefix[-1] + prefix[0]]
        assert max(gaps) <= max(1, 2 * math.ceil(n / k)), (k, prefix)


@pytest.mark.parametrize(
    ("n", "share", "has_canary", "expected"),
    [
        (16, 25, True, 4),
        (16, 0.1, True, 1),
        (16, 0, True, 0),
        (16, 50, False, 0),
        (16, 100, True, 16),
        (16, 99.9, True, 16),
        (3, 34, True, 1),
        (0, 50, True, 0),
        (1, 1, True, 1),
    ],
)
def test_canary_unit_count(n: int, share: float, has_canary: bool, expected: int) -> None:
    assert canary_unit_count(n, share, has_canary) == expected


def test_units_need_not_be_contiguous() -> None:
    units = [3, 7, 100, 101]
    plan = plan_assignment(units, _members(1, 2), {}, 50)
    assert set(plan) == set(units)
    assert len(_canary_units(plan)) == 2
    assert None not in plan.values()
