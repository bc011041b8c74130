"""The JSON form of observations, shared by members (which send deltas) and the coordinator."""

from __future__ import annotations

from typing import Any

from pubsub_canary.core.observations import (
    CohortObservations,
    KpiStats,
    LagSample,
    LatencyHistogram,
)


def obs_to_dict(o: CohortObservations) -> dict[str, Any]:
    return {
        "processed": o.processed,
        "errors": o.errors,
        "dead_lettered": o.dead_lettered,
        "redeliveries": o.redeliveries,
        "latency": {str(i): c for i, c in enumerate(o.latency.counts) if c},
        "kpis": {k: [v.count, v.total, v.total_sq] for k, v in o.kpis.items()},
        "lag": [[s.at, s.lag, s.produced] for s in o.lag],
        "elapsed_seconds": o.elapsed_seconds,
    }


def obs_from_dict(d: dict[str, Any]) -> CohortObservations:
    counts = list(LatencyHistogram().counts)
    for i, c in (d.get("latency") or {}).items():
        counts[int(i)] += int(c)
    return CohortObservations(
        processed=int(d.get("processed", 0)),
        errors=int(d.get("errors", 0)),
        dead_lettered=int(d.get("dead_lettered", 0)),
        redeliveries=int(d.get("redeliveries", 0)),
        latency=LatencyHistogram(tuple(counts)),
        kpis={
            k: KpiStats(int(v[0]), float(v[1]), float(v[2])) for k, v in d.get("kpis", {}).items()
        },
        lag=tuple(LagSample(float(a), int(b), int(c)) for a, b, c in d.get("lag", [])),
        elapsed_seconds=float(d.get("elapsed_seconds", 0.0)),
    )
