"""Pub/Sub routing, pure: a message's bucket, the group's route, and what a member does.

Standard library only: no clock, no I/O. See ``docs/pubsub.md`` for the design and its proof.

* :func:`routing_key` and :func:`bucket_of`: a message's bucket is a stable hash (blake2b, never
  Python's salted ``hash()``) of its routing key (the ordering key, else a configured attribute
  such as a user id, else the message id) modulo the bucket count. All messages of one key fall
  in one bucket, so they go to one cohort.
* :func:`route_view` (coordinator side): from the units' owners and targets and the members'
  route counters, the group-wide map that every Pub/Sub member receives: which buckets are
  routed to the canary, which are returning to stable, and whether the canary route of the
  current rollout (the *generation*) is drained.
* :class:`Route` and :func:`decide` (member side): process, relay to the canary route, relay
  back to stable, or hold a message, given the member's cohort, where the message came from
  and its bucket's state.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

#: Buckets per subscription: 1000, so that every whole and half percent is exact.
DEFAULT_BUCKETS = 1000

#: Attributes the member library sets on messages it relays or dead-letters.
ATTR_PREFIX = "pubsub_canary."
ATTR_BUCKET = "pubsub_canary.bucket"
ATTR_MESSAGE_ID = "pubsub_canary.message_id"
ATTR_PUBLISH_MS = "pubsub_canary.publish_ms"
ATTR_GENERATION = "pubsub_canary.generation"
ATTR_ORDERING_KEY = "pubsub_canary.ordering_key"
ATTR_RELAYED_BY = "pubsub_canary.relayed_by"
ATTR_ERROR = "pubsub_canary.error"
#: Set by Pub/Sub on messages its dead-letter policy forwarded.
ATTR_DEAD_LETTER_SOURCE = "CloudPubSubDeadLetterSourceSubscription"

#: Heartbeat ``positions`` keys of Pub/Sub members (Kafka members use partitions >= 0):
#: the age in ms of the oldest message the member holds unprocessed ...
POSITION_AGE_MS = -1
#: ... and per generation ``counter_key(gen, kind)`` <= -9 (see :class:`Counter`).
_COUNTER_STRIDE = 8


class Counter(StrEnum):
    """Cumulative per-member counts of the canary route of one generation."""

    RELAYED_CANARY = "relayed_canary"  # published to the canary topic
    SETTLED_CANARY = "settled_canary"  # acked on the canary subscription (any outcome)
    RELAYED_RETURN = "relayed_return"  # published to the return topic
    SETTLED_RETURN = "settled_return"  # acked on the return subscription
    PULLING = "pulling"  # 1 while a canary member pulls the canary subscription


_COUNTER_INDEX = {c: i + 1 for i, c in enumerate(Counter)}


def generation_id(generation: str) -> int:
    """A small positive number for a generation (rollout) name, for position keys."""
    return 1 + zlib.crc32(generation.encode()) % (1 << 22)


def counter_key(generation: str, kind: Counter) -> int:
    """The ``positions`` key a member reports ``kind`` of ``generation`` under (<= -9)."""
    return -(generation_id(generation) * _COUNTER_STRIDE + _COUNTER_INDEX[kind])


# --- buckets ----------------------------------------------------------------------------------


def routing_key(
    message_id: str,
    ordering_key: str = "",
    attributes: Mapping[str, str] | None = None,
    attribute: str | None = None,
) -> str:
    """The key a message is routed by: ordering key, else ``attributes[attribute]``, else id."""
    if ordering_key:
        return ordering_key
    if attribute and attributes:
        value = attributes.get(attribute)
        if value:
            return value
    return message_id


def bucket_of(key: str, buckets: int = DEFAULT_BUCKETS) -> int:
    """The bucket (0..buckets-1) of a routing key: blake2b, stable across processes."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % buckets


def encode_buckets(buckets: Iterable[int], n: int) -> str:
    """A set of buckets as a hex bitmap (bucket 0 is the lowest bit)."""
    bits = 0
    for b in buckets:
        bits |= 1 << b
    return format(bits, "x").zfill((n + 3) // 4) if n else ""


def decode_buckets(text: str) -> frozenset[int]:
    """The inverse of :func:`encode_buckets`."""
    bits = int(text, 16) if text else 0
    out = []
    b = 0
    while bits:
        if bits & 1:
            out.append(b)
        bits >>= 1
        b += 1
    return frozenset(out)


# --- names ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteNames:
    """Topic and subscription ids of one generation's canary route (same id for both)."""

    canary: str
    back: str


def _resource_id(subscription_id: str, kind: str, generation: str) -> str:
    name = f"{subscription_id}.{kind}.{generation}"
    if len(name) <= 255:
        return name
    crc = zlib.crc32(name.encode())
    return f"{subscription_id[:100]}.{kind}.{generation[:100]}.{crc:08x}"


def route_names(subscription_id: str, generation: str) -> RouteNames:
    """Deterministic ids: ``<sub>.canary.<rollout>`` and ``<sub>.return.<rollout>``."""
    return RouteNames(
        _resource_id(subscription_id, "canary", generation),
        _resource_id(subscription_id, "return", generation),
    )


def observer_id(subscription_id: str, cohort: str) -> str:
    """Subscription on the dead-letter topic through which ``cohort`` counts policy letters."""
    return _resource_id(subscription_id, "dead-letters", cohort)


def dead_letter_cohort(source_subscription: str, subscription_id: str) -> str | None:
    """Which cohort a message the dead-letter policy forwarded from ``source`` belongs to."""
    if source_subscription.startswith(f"{subscription_id}.canary."):
        return "canary"
    if source_subscription == subscription_id or source_subscription.startswith(
        f"{subscription_id}.return."
    ):
        return "stable"
    return None


# --- the route (coordinator side) -------------------------------------------------------------


@dataclass(frozen=True)
class MemberRoute:
    """What the coordinator knows of one member of a Pub/Sub group."""

    member_id: str
    cohort: str
    alive: bool
    positions: Mapping[int, int]
    leaving: bool = False


def route_view(
    *,
    buckets: int,
    generation: str | None,
    target_cohort: Mapping[int, str | None],
    owner_cohort: Mapping[int, str | None],
    members: Iterable[MemberRoute],
    retired: Iterable[Mapping[int, int]] = (),
) -> dict[str, object]:
    """The group-wide route every member of a Pub/Sub group receives with its view.

    A bucket is routed to the canary when the planner targets a canary member for it; it is
    *returning* when it is targeted elsewhere but a canary member still owns it (a canary
    releases such a unit only once the route is drained). The canary route of ``generation``
    is drained when every live canary has stopped pulling it, the return topic holds nothing
    the canaries handed back, and everything relayed to the canary topic was settled.

    Args:
        buckets: the group's bucket count.
        generation: the rollout whose canary route applies (the group's latest), or None.
        target_cohort: bucket -> cohort of the planner's target (None: no target).
        owner_cohort: bucket -> cohort of the current owner (None: unowned).
        members: registered members with their last reported positions.
        retired: positions of members that left, so their counts still add up.
    """
    canary = [b for b in range(buckets) if target_cohort.get(b) == "canary"]
    returning = [
        b
        for b in range(buckets)
        if target_cohort.get(b) != "canary" and owner_cohort.get(b) == "canary"
    ]
    members = list(members)
    live_canaries = [m for m in members if m.alive and m.cohort == "canary"]
    drainers = sum(1 for m in members if m.alive and not m.leaving and m.cohort == "stable")
    backlog = handback = 0
    pulling = False
    if generation is not None:
        key = {c: counter_key(generation, c) for c in Counter}
        totals = dict.fromkeys(Counter, 0)
        for positions in [m.positions for m in members] + list(retired):
            for c in totals:
                totals[c] += int(positions.get(key[c], 0))
        handback = totals[Counter.RELAYED_RETURN] - totals[Counter.SETTLED_RETURN]
        backlog = totals[Counter.RELAYED_CANARY] - totals[Counter.SETTLED_CANARY] + handback
        pulling = any(m.positions.get(key[Counter.PULLING], 0) for m in live_canaries)
    handback_done = not live_canaries or (not pulling and not canary and handback <= 0)
    drained = generation is None or (handback_done and backlog <= 0)
    canary_hex = encode_buckets(canary, buckets)
    returning_hex = encode_buckets(returning, buckets)
    digest = "r{}:{:x}:{:x}:{}{}{}{}".format(
        generation or "",
        zlib.crc32(canary_hex.encode()),
        zlib.crc32(returning_hex.encode()),
        int(drained),
        int(handback_done),
        int(bool(live_canaries)),
        int(bool(drainers)),
    )
    return {
        "generation": generation,
        "buckets": buckets,
        "canary": canary_hex,
        "returning": returning_hex,
        "canary_count": len(canary),
        "backlog": backlog,
        "handback": handback,
        "handback_done": handback_done,
        "drained": drained,
        "canary_members": len(live_canaries),
        "stable_members": drainers,
        "digest": digest,
    }


# --- the route (member side) ------------------------------------------------------------------


class BucketState(StrEnum):
    STABLE = "stable"
    CANARY = "canary"
    RETURNING = "returning"


class Source(StrEnum):
    """Where a member got a message from."""

    MAIN = "main"  # the user's subscription
    CANARY = "canary"  # the canary subscription of a generation
    RETURN = "return"  # the return subscription of a generation


class Action(StrEnum):
    PROCESS = "process"
    RELAY_CANARY = "relay_canary"
    RELAY_RETURN = "relay_return"
    HOLD = "hold"


@dataclass(frozen=True)
class Route:
    """A member's copy of the group-wide route (from the coordinator's view)."""

    generation: str | None = None
    buckets: int = DEFAULT_BUCKETS
    canary: frozenset[int] = frozenset()
    returning: frozenset[int] = frozenset()
    drained: bool = True
    handback_done: bool = True
    canary_members: int = 0
    stable_members: int = 1
    backlog: int = 0

    @classmethod
    def from_view(cls, view: Mapping[str, object]) -> Route:
        return cls(
            generation=view.get("generation"),  # type: ignore[arg-type]
            buckets=int(view.get("buckets", DEFAULT_BUCKETS)),  # type: ignore[call-overload]
            canary=decode_buckets(str(view.get("canary", ""))),
            returning=decode_buckets(str(view.get("returning", ""))),
            drained=bool(view.get("drained", True)),
            handback_done=bool(view.get("handback_done", True)),
            canary_members=int(view.get("canary_members", 0)),  # type: ignore[call-overload]
            stable_members=int(view.get("stable_members", 1)),  # type: ignore[call-overload]
            backlog=int(view.get("backlog", 0)),  # type: ignore[call-overload]
        )

    def state(self, bucket: int) -> BucketState:
        if bucket in self.canary:
            return BucketState.CANARY
        if bucket in self.returning:
            return BucketState.RETURNING
        return BucketState.STABLE


def decide(
    cohort: str,
    source: Source,
    state: BucketState,
    *,
    ordered: bool,
    drained: bool,
) -> Action:
    """What a member of ``cohort`` does with a message of a bucket in ``state``.

    Canary members process their buckets and hand everything else back (relay to the return
    topic). Stable members relay canary buckets to the canary topic and process the rest; on
    an ordered subscription they hold new messages of returning buckets until the canary route
    is drained, so a key's older messages (still on the canary route) are processed first.
    """
    if cohort == "canary":
        return Action.PROCESS if state is BucketState.CANARY else Action.RELAY_RETURN
    if state is BucketState.CANARY:
        return Action.RELAY_CANARY
    if state is BucketState.RETURNING and source is Source.MAIN and ordered and not drained:
        return Action.HOLD
    return Action.PROCESS


def canary_pulls(route: Route) -> bool:
    """A canary member pulls the canary subscription while any bucket is routed to it."""
    return route.generation is not None and bool(route.canary)


def stable_pulls_canary(route: Route, *, ordered: bool) -> bool:
    """Stable drains the canary subscription once no bucket is routed to the canary.

    On an ordered subscription it waits until the canaries handed back what they held (their
    relays to the return topic were processed), so a key is never on both paths at once.
    """
    if route.generation is None or route.canary:
        return False
    return not ordered or route.handback_done


def canary_releases(state: BucketState, route: Route) -> bool:
    """A canary member releases a revoked unit at once unless it is returning to stable;
    then only when the canary route is drained (the rollback is complete only then), or when
    no stable member is there to drain it (waiting would change nothing)."""
    return state is not BucketState.RETURNING or route.drained or route.stable_members == 0
