"""What the coordinator persists: plain records, and their JSON codecs.

The store keeps these; the service keeps live state (leases, long-polls) in memory and writes
records through on every change, so a restarted coordinator resumes from them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pubsub_canary.core.handoff import UnitState, UnitStatus
from pubsub_canary.core.machine import Phase, RolloutState
from pubsub_canary.core.model import RolloutSpec
from pubsub_canary.wire import obs_from_dict, obs_to_dict

__all__ = ["obs_from_dict", "obs_to_dict"]


@dataclass(frozen=True)
class GroupRecord:
    key: str
    transport: str
    topic: str
    group_id: str
    units: int


@dataclass(frozen=True)
class MemberRecord:
    member_id: str
    group_key: str
    cohort: str
    version: str
    registered_at: float
    leaving: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RolloutRecord:
    name: str
    group_key: str
    spec: RolloutSpec
    state: RolloutState
    active: bool
    created_at: float
    updated_at: float
    #: Optimistic-concurrency version; the store bumps it on every update.
    version: int = 0


@dataclass(frozen=True)
class Decision:
    rollout: str
    at: float
    kind: str
    reason: str
    data: dict[str, Any] = field(default_factory=dict)


def state_to_json(s: RolloutState) -> str:
    d = asdict(s)
    d["phase"] = s.phase.value
    d["paused_from"] = s.paused_from.value if s.paused_from else None
    d["rollback_to"] = s.rollback_to.value if s.rollback_to else None
    return json.dumps(d)


def state_from_json(text: str) -> RolloutState:
    d = json.loads(text)
    d["phase"] = Phase(d["phase"])
    d["paused_from"] = Phase(d["paused_from"]) if d.get("paused_from") else None
    d["rollback_to"] = Phase(d["rollback_to"]) if d.get("rollback_to") else None
    return RolloutState(**d)


def unit_to_row(u: UnitState) -> dict[str, Any]:
    return {
        "unit": u.unit,
        "owner": u.owner,
        "epoch": u.epoch,
        "status": u.status.value,
        "next_offset": u.offset,
        "move_started_at": u.move_started_at,
        "graceful": u.graceful,
    }


def unit_from_row(r: dict[str, Any]) -> UnitState:
    return UnitState(
        unit=int(r["unit"]),
        owner=r["owner"],
        epoch=int(r["epoch"]),
        status=UnitStatus(r["status"]),
        offset=None if r["next_offset"] is None else int(r["next_offset"]),
        since=None,
        move_started_at=r["move_started_at"],
        # A row written before the column existed reads as graceful (the old behaviour).
        graceful=bool(r.get("graceful", True)),
    )
