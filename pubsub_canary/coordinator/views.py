"""Read models: the rollout status an operator sees (API, CLI, status page)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pubsub_canary.coordinator.records import RolloutRecord
from pubsub_canary.core.observations import CohortObservations, Judgement

if TYPE_CHECKING:
    from pubsub_canary.coordinator.service import Coordinator


def cohort_health(o: CohortObservations) -> dict[str, Any]:
    p99 = o.latency.quantile(0.99)
    p50 = o.latency.quantile(0.5)
    return {
        "processed": o.processed,
        "errors": o.errors,
        "dead_lettered": o.dead_lettered,
        "redeliveries": o.redeliveries,
        "error_rate": o.error_rate,
        "dead_letter_rate": o.dead_letter_rate,
        "latency_p50_seconds": p50,
        "latency_p99_seconds": p99 if p99 != float("inf") else None,
        "lag": o.lag[-1].lag if o.lag else None,
        "kpis": {k: {"count": v.count, "mean": v.mean} for k, v in o.kpis.items()},
    }


def judgement_dict(j: Judgement | None) -> dict[str, Any] | None:
    if j is None:
        return None
    return {
        "verdict": j.verdict.value,
        "reason": j.reason,
        "metrics": [
            {
                "metric": m.metric,
                "verdict": m.verdict.value,
                "reason": m.reason,
                "critical": m.critical,
                "evidence": dict(m.evidence),
            }
            for m in j.metrics
        ],
    }


def last_judgement(c: Coordinator, rollout: str) -> dict[str, Any] | None:
    for d in reversed(c.store.decisions(rollout, limit=50)):
        if "judgement" in d.data:
            return dict(d.data["judgement"])
    return None


def rollout_status(c: Coordinator, r: RolloutRecord) -> dict[str, Any]:
    """The full status of a rollout; the caller holds the coordinator's lock."""
    out = c._summary(r)
    g = c.groups.get(r.group_key)
    members = [m for m in c.members.values() if m.record.group_key == r.group_key]
    cohort_of = {m.record.member_id: m.record.cohort for m in members}
    units: dict[str, Any] = {}
    per_member: dict[str, list[int]] = {m.record.member_id: [] for m in members}
    standing_by: dict[str, list[int]] = {m.record.member_id: [] for m in members}
    if g is not None:
        for u, s in sorted(g.units.items()):
            # Stateful groups: the stable member keeping the unit's state warm for a rollback,
            # and how many changelog records it still has to read.
            standby = g.standby.get(u)
            keeper = c.members.get(standby or "")
            units[str(u)] = {
                "owner": s.owner,
                "cohort": cohort_of.get(s.owner or ""),
                "epoch": s.epoch,
                "status": s.status.value,
                "lag": (g.offsets[u][1] - g.offsets[u][0]) if u in g.offsets else None,
                "standby": standby,
                "standby_behind": keeper.warm.get(u) if keeper is not None else None,
            }
            if s.owner in per_member:
                per_member[s.owner].append(u)
            if standby in standing_by:
                standing_by[standby].append(u)
    stable, canary = c.cohort_observations(r)
    out.update(
        {
            "target": asdict(g.record) if g is not None else None,
            "units": units,
            "members": [
                {
                    "member_id": m.record.member_id,
                    "cohort": m.record.cohort,
                    "version": m.record.version,
                    "leaving": m.record.leaving,
                    "units": per_member[m.record.member_id],
                    "standby": standing_by[m.record.member_id],
                    "lease_left_seconds": round(m.lease_expires - c.clock.monotonic(), 2),
                }
                for m in sorted(members, key=lambda m: (m.record.cohort, m.record.member_id))
            ],
            "cohorts": {
                "stable": {
                    "units": sum(1 for u in units.values() if u["cohort"] == "stable"),
                    "members": sum(1 for m in members if m.record.cohort == "stable"),
                    "step": cohort_health(stable),
                    "total": cohort_health(g.totals.get("stable", CohortObservations()))
                    if g
                    else None,
                },
                "canary": {
                    "units": sum(1 for u in units.values() if u["cohort"] == "canary"),
                    "members": sum(1 for m in members if m.record.cohort == "canary"),
                    "step": cohort_health(canary),
                    "total": cohort_health(g.totals.get("canary", CohortObservations()))
                    if g
                    else None,
                },
            },
            # The live judgement, or after a restart the last one that moved the rollout.
            "judgement": judgement_dict(c.judgements.get(r.name)) or last_judgement(c, r.name),
            "decisions": [
                {"at": d.at, "kind": d.kind, "reason": d.reason, **d.data}
                for d in c.store.decisions(r.name, limit=50)
            ],
            "steps_spec": [s.model_dump() for s in r.spec.steps],
        }
    )
    return out
