"""Pub/Sub routing, pure: buckets, the group-wide route and the per-message decision."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pubsub_canary.client.routing import (
    DEFAULT_BUCKETS,
    Action,
    BucketState,
    Counter,
    MemberRoute,
    Route,
    Source,
    bucket_of,
    canary_pulls,
    canary_releases,
    counter_key,
    dead_letter_cohort,
    decide,
    decode_buckets,
    encode_buckets,
    observer_id,
    route_names,
    route_view,
    routing_key,
    stable_pulls_canary,
)
from pubsub_canary.core.observations import Cohort
from pubsub_canary.core.planner import MemberView, plan_assignment

# --- buckets ----------------------------------------------------------------------------------


def test_routing_key_prefers_ordering_key_then_attribute_then_message_id() -> None:
    attrs = {"user": "u-7"}
    assert routing_key("m1", "order-1", attrs, "user") == "order-1"
    assert routing_key("m1", "", attrs, "user") == "u-7"
    assert routing_key("m1", "", {"user": ""}, "user") == "m1"
    assert routing_key("m1", "", attrs, None) == "m1"
    assert routing_key("m1", "", None, "user") == "m1"


def test_bucket_is_a_stable_hash_not_pythons_salted_one() -> None:
    # Pinned values: a change here re-routes every key of every running group.
    pinned = {"user-1": 768, "user-2": 864, "order-42": 587}
    assert {k: bucket_of(k) for k in pinned} == pinned
    code = (
        "from pubsub_canary.client.routing import bucket_of;"
        "print([bucket_of(k) for k in ('user-1', 'user-2', 'order-42')])"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip() == str(list(pinned.values()))


def test_buckets_are_uniform() -> None:
    counts = [0] * 100
    for i in range(100_000):
        counts[bucket_of(f"key-{i}", 100)] += 1
    # Expected 1000 per bucket, sd ~31.5: 5 sd either way.
    assert min(counts) > 840 and max(counts) < 1160, (min(counts), max(counts))


@pytest.mark.parametrize("share", [5, 25, 50])
def test_planned_share_of_messages_is_within_one_point_over_20000_messages(share: int) -> None:
    """The coordinator's buckets at a share carry that share of messages, to within 1 pp."""
    members = [MemberView("c", Cohort.CANARY), MemberView("s", Cohort.STABLE)]
    plan = plan_assignment(range(DEFAULT_BUCKETS), members, {}, share)
    canary = {b for b, m in plan.items() if m == "c"}
    assert len(canary) == DEFAULT_BUCKETS * share // 100  # exact with 1000 buckets
    ids = [uuid.UUID(int=i * 7_919 + 1).hex for i in range(20_000)]
    measured = 100 * sum(bucket_of(k) in canary for k in ids) / len(ids)
    assert abs(measured - share) < 1.0, measured


@given(st.sets(st.integers(0, 999)))
@settings(max_examples=200)
def test_bucket_bitmaps_round_trip(buckets: set[int]) -> None:
    assert decode_buckets(encode_buckets(buckets, 1000)) == buckets


def test_bitmap_of_nothing_is_empty() -> None:
    assert decode_buckets(encode_buckets([], 1000)) == frozenset()
    assert decode_buckets("") == frozenset()


# --- names ------------------------------------------------------------------------------------

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}$")


def test_route_names_are_deterministic_valid_ids() -> None:
    names = route_names("orders-sub", "release-1.5")
    assert names.canary == "orders-sub.canary.release-1.5"
    assert names.back == "orders-sub.return.release-1.5"
    assert route_names("orders-sub", "release-1.5") == names
    long = route_names("s" * 250, "r" * 200)
    for name in (*names.__dict__.values(), *long.__dict__.values(), observer_id("s", "canary")):
        assert _ID.match(name), name
    assert long != route_names("s" * 250, "r" * 199 + "x")


def test_policy_dead_letters_are_attributed_to_the_cohort_that_read_the_message() -> None:
    assert dead_letter_cohort("orders-sub", "orders-sub") == "stable"
    assert dead_letter_cohort("orders-sub.return.r1", "orders-sub") == "stable"
    assert dead_letter_cohort("orders-sub.canary.r1", "orders-sub") == "canary"
    assert dead_letter_cohort("payments-sub", "orders-sub") is None


def test_counter_keys_never_collide_with_units_or_each_other() -> None:
    keys = [counter_key(g, c) for g in ("r1", "r2", "a" * 200) for c in Counter]
    assert len(set(keys)) == len(keys)
    assert max(keys) <= -9


# --- the route (coordinator side) -------------------------------------------------------------


def _positions(gen: str, **counts: int) -> dict[int, int]:
    return {counter_key(gen, Counter(k)): v for k, v in counts.items()}


def _view(members: list[MemberRoute], *, canary: set[int], owned: set[int], gen: str = "r1"):
    target = {b: ("canary" if b in canary else "stable") for b in range(10)}
    owner = {b: ("canary" if b in owned else "stable") for b in range(10)}
    return route_view(
        buckets=10,
        generation=gen,
        target_cohort=target,
        owner_cohort=owner,
        members=members,
    )


def test_route_lists_canary_and_returning_buckets() -> None:
    v = _view([MemberRoute("c", "canary", True, {})], canary={1, 5}, owned={1, 5, 7})
    r = Route.from_view(v)
    assert r.canary == {1, 5}
    assert r.returning == {7}
    assert [r.state(b) for b in (1, 7, 0)] == [
        BucketState.CANARY,
        BucketState.RETURNING,
        BucketState.STABLE,
    ]
    assert v["canary_count"] == 2


def test_route_is_drained_only_when_canaries_stopped_and_everything_relayed_was_settled() -> None:
    stable = MemberRoute("s", "stable", True, _positions("r1", relayed_canary=100))
    canary = MemberRoute(
        "c", "canary", True, _positions("r1", settled_canary=60, relayed_return=10, pulling=1)
    )
    v = _view([stable, canary], canary=set(), owned={1})
    assert (v["drained"], v["handback_done"], v["backlog"]) == (False, False, 40 + 10)
    # The canary stopped pulling; the 10 it handed back are not yet processed by stable.
    canary = MemberRoute(
        "c", "canary", True, _positions("r1", settled_canary=60, relayed_return=10)
    )
    v = _view([stable, canary], canary=set(), owned={1})
    assert (v["drained"], v["handback_done"]) == (False, False)
    stable = MemberRoute(
        "s", "stable", True, _positions("r1", relayed_canary=100, settled_return=10)
    )
    v = _view([stable, canary], canary=set(), owned={1})
    assert (v["drained"], v["handback_done"], v["backlog"]) == (False, True, 40)
    # Stable drained the canary subscription: 40 more settled there.
    stable = MemberRoute(
        "s",
        "stable",
        True,
        _positions("r1", relayed_canary=100, settled_return=10, settled_canary=40),
    )
    v = _view([stable, canary], canary=set(), owned={1})
    assert (v["drained"], v["backlog"]) == (True, 0)


def test_members_that_left_still_count() -> None:
    stable = MemberRoute("s", "stable", True, _positions("r1", relayed_canary=100))
    v = route_view(
        buckets=10,
        generation="r1",
        target_cohort={},
        owner_cohort={},
        members=[stable],
        retired=[_positions("r1", settled_canary=100)],
    )
    assert v["drained"] is True


def test_counts_of_other_generations_do_not_mix() -> None:
    stable = MemberRoute(
        "s", "stable", True, {**_positions("r1", relayed_canary=5), **_positions("r2")}
    )
    v = _view([stable], canary=set(), owned=set(), gen="r2")
    assert v["drained"] is True


def test_a_dead_canary_does_not_block_the_handback() -> None:
    canary = MemberRoute("c", "canary", False, _positions("r1", pulling=1, relayed_return=3))
    v = _view([canary], canary=set(), owned=set())
    assert v["handback_done"] is True
    assert v["canary_members"] == 0


def test_route_digest_changes_with_what_members_act_on() -> None:
    m = [MemberRoute("c", "canary", True, {})]
    a = _view(m, canary={1}, owned={1})["digest"]
    assert _view(m, canary={1}, owned={1})["digest"] == a
    assert _view(m, canary={1, 2}, owned={1})["digest"] != a
    assert _view(m, canary={1}, owned={1}, gen="r2")["digest"] != a


def test_no_generation_means_nothing_to_drain() -> None:
    v = route_view(buckets=4, generation=None, target_cohort={}, owner_cohort={}, members=[])
    r = Route.from_view(v)
    assert r.drained and r.generation is None and not canary_pulls(r)


# --- the decision (member side) ---------------------------------------------------------------

S, C, R = BucketState.STABLE, BucketState.CANARY, BucketState.RETURNING


@pytest.mark.parametrize(
    ("cohort", "source", "state", "ordered", "drained", "action"),
    [
        ("stable", Source.MAIN, S, False, True, Action.PROCESS),
        ("stable", Source.MAIN, C, False, True, Action.RELAY_CANARY),
        ("stable", Source.MAIN, C, True, False, Action.RELAY_CANARY),
        ("stable", Source.MAIN, R, False, False, Action.PROCESS),
        ("stable", Source.MAIN, R, True, False, Action.HOLD),
        ("stable", Source.MAIN, R, True, True, Action.PROCESS),
        ("stable", Source.RETURN, R, True, False, Action.PROCESS),
        ("stable", Source.CANARY, R, True, False, Action.PROCESS),
        ("stable", Source.CANARY, C, True, False, Action.RELAY_CANARY),
        ("stable", Source.RETURN, C, False, True, Action.RELAY_CANARY),
        ("canary", Source.CANARY, C, True, False, Action.PROCESS),
        ("canary", Source.CANARY, R, True, False, Action.RELAY_RETURN),
        ("canary", Source.CANARY, S, False, True, Action.RELAY_RETURN),
    ],
)
def test_decide(
    cohort: str, source: Source, state: BucketState, ordered: bool, drained: bool, action: Action
) -> None:
    assert decide(cohort, source, state, ordered=ordered, drained=drained) is action


def test_who_pulls_the_canary_subscription() -> None:
    during = Route("r1", canary=frozenset({1}), drained=False, handback_done=False)
    after = Route("r1", returning=frozenset({1}), drained=False, handback_done=False)
    handed = Route("r1", returning=frozenset({1}), drained=False, handback_done=True)
    assert canary_pulls(during) and not canary_pulls(after)
    assert not stable_pulls_canary(during, ordered=False)
    assert stable_pulls_canary(after, ordered=False)
    assert not stable_pulls_canary(after, ordered=True)
    assert stable_pulls_canary(handed, ordered=True)
    assert not stable_pulls_canary(Route(None), ordered=False)


def test_canary_releases_returning_units_only_once_drained() -> None:
    assert canary_releases(C, Route("r1", drained=False))
    assert not canary_releases(R, Route("r1", drained=False))
    assert canary_releases(R, Route("r1", drained=True))
    # Nobody left to drain (every stable member leaving): waiting would change nothing.
    assert canary_releases(R, Route("r1", drained=False, stable_members=0))


def test_only_stable_members_that_stay_count_as_drainers() -> None:
    members = [
        MemberRoute("s1", "stable", True, {}, leaving=True),
        MemberRoute("s2", "stable", False, {}),
        MemberRoute("c", "canary", True, {}),
    ]
    v = _view(members, canary=set(), owned={1})
    assert v["stable_members"] == 0
    members.append(MemberRoute("s3", "stable", True, {}))
    assert _view(members, canary=set(), owned={1})["stable_members"] == 1
