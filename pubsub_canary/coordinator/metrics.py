"""Prometheus metrics of the coordinator, served at ``/metrics``.

Gauges and cohort counters are read from the coordinator's state at scrape time (a custom
collector, so they can never drift from what ``rollout status`` shows); handoff durations are a
histogram fed by the coordinator's handoff listener. Names follow
``pubsub_canary_<noun>_<unit>``; labels are small and fixed (group, rollout, cohort, outcome).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from pubsub_canary.coordinator.records import RolloutRecord
from pubsub_canary.core.machine import Phase
from pubsub_canary.core.observations import LATENCY_BUCKETS, LatencyHistogram, Verdict

#: Bucket bounds exposed for processing latency. Members count latencies in the finer
#: LATENCY_BUCKETS; each exposed bucket counts the samples of the member buckets whose upper
#: bound is at or below it, so counts are exact for those bounds and never overstated.
EXPOSED_LATENCY_BOUNDS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def _histogram_buckets(h: LatencyHistogram) -> list[tuple[str, float]]:
    out, total, i = [], 0, 0
    for bound in EXPOSED_LATENCY_BOUNDS:
        while i < len(LATENCY_BUCKETS) and LATENCY_BUCKETS[i] <= bound:
            total += h.counts[i]
            i += 1
        out.append((repr(bound), float(total)))
    out.append(("+Inf", float(h.total)))
    return out


if TYPE_CHECKING:
    from pubsub_canary.coordinator.service import Coordinator, HandoffEvent

PHASE_CODES = {p: i for i, p in enumerate(Phase)}


class CoordinatorCollector(Collector):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        c = self.c
        phase = GaugeMetricFamily(
            "pubsub_canary_rollout_phase",
            "1 for the rollout's current phase",
            labels=["group", "rollout", "phase"],
        )
        step = GaugeMetricFamily(
            "pubsub_canary_rollout_step", "current step (1-based)", labels=["group", "rollout"]
        )
        share = GaugeMetricFamily(
            "pubsub_canary_rollout_share_ratio",
            "canary share of the work the rollout asks for (0..1)",
            labels=["group", "rollout"],
        )
        units = GaugeMetricFamily(
            "pubsub_canary_units", "work units owned per cohort", labels=["group", "cohort"]
        )
        members = GaugeMetricFamily(
            "pubsub_canary_members", "members with a live lease", labels=["group", "cohort"]
        )
        lag = GaugeMetricFamily(
            "pubsub_canary_lag_messages", "consumer lag per cohort", labels=["group", "cohort"]
        )
        processed = CounterMetricFamily(
            "pubsub_canary_messages",
            "messages finished by members, by outcome",
            labels=["group", "cohort", "outcome"],
        )
        latency = HistogramMetricFamily(
            "pubsub_canary_processing_latency_seconds",
            "handler latency per message, per cohort (since the coordinator started)",
            labels=["group", "cohort"],
        )
        verdict = GaugeMetricFamily(
            "pubsub_canary_verdict",
            "1 for the current verdict of each metric of a step ('step': the overall verdict)",
            labels=["group", "rollout", "metric", "verdict"],
        )
        evidence = GaugeMetricFamily(
            "pubsub_canary_verdict_evidence",
            "numeric evidence behind each metric's verdict (e-values, rates, bounds)",
            labels=["group", "rollout", "metric", "name"],
        )
        lease_min = GaugeMetricFamily(
            "pubsub_canary_member_lease_remaining_seconds",
            "shortest lease left among a cohort's members (negative: expired, not reclaimed)",
            labels=["group", "cohort"],
        )
        with c._lock:
            # Active rollouts, and each group's latest finished one (however it ended), so the
            # last outcome stays visible and the series do not grow with every rollout ever run.
            latest: dict[str, RolloutRecord] = {}
            for r in c.rollouts.values():
                if not r.active:
                    seen = latest.get(r.group_key)
                    if seen is None or (r.updated_at, r.name) > (seen.updated_at, seen.name):
                        latest[r.group_key] = r
            for r in c.rollouts.values():
                if not r.active and latest.get(r.group_key) is not r:
                    continue
                for p in Phase:
                    phase.add_metric(
                        [r.group_key, r.name, p.value], 1.0 if r.state.phase is p else 0
                    )
                step.add_metric([r.group_key, r.name], r.state.step + 1)
                share.add_metric([r.group_key, r.name], r.state.share / 100.0)
                j = c.judgements.get(r.name)
                if j is not None and r.active:
                    for name, v in [("step", j.verdict)] + [
                        (m.metric, m.verdict) for m in j.metrics
                    ]:
                        for option in Verdict:
                            verdict.add_metric(
                                [r.group_key, r.name, name, option.value], 1.0 if v is option else 0
                            )
                    for m in j.metrics:
                        for key, value in m.evidence.items():
                            if isinstance(value, int | float) and not isinstance(value, bool):
                                evidence.add_metric([r.group_key, r.name, m.metric, key], value)
            cohort_of = {mid: m.record.cohort for mid, m in c.members.items()}
            for key, g in c.groups.items():
                counts = {"stable": 0, "canary": 0}
                lags = {"stable": 0, "canary": 0}
                for u, s in g.units.items():
                    co = cohort_of.get(s.owner or "")
                    if co in counts:
                        counts[co] += 1
                        if u in g.offsets:
                            lags[co] += max(0, g.offsets[u][1] - g.offsets[u][0])
                for co, n in counts.items():
                    units.add_metric([key, co], n)
                    members.add_metric(
                        [key, co],
                        sum(
                            1
                            for m in c.members.values()
                            if m.record.group_key == key and m.record.cohort == co
                        ),
                    )
                    if g.offsets:
                        lag.add_metric([key, co], lags[co])
                now = c.clock.monotonic()
                for co in ("stable", "canary"):
                    leases = [
                        m.lease_expires - now
                        for m in c.members.values()
                        if m.record.group_key == key and m.record.cohort == co
                    ]
                    if leases:
                        lease_min.add_metric([key, co], min(leases))
                for co, o in g.totals.items():
                    latency.add_metric([key, co], _histogram_buckets(o.latency), None)
                    ok = o.processed - o.dead_lettered
                    processed.add_metric([key, co, "ok"], ok)
                    processed.add_metric([key, co, "dead_lettered"], o.dead_lettered)
                    processed.add_metric([key, co, "error"], o.errors)
        yield from (
            phase,
            step,
            share,
            units,
            members,
            lag,
            processed,
            latency,
            verdict,
            evidence,
            lease_min,
        )


def build_registry(coordinator: Coordinator) -> CollectorRegistry:
    """A registry with the coordinator's collector and handoff histogram."""
    registry = CollectorRegistry()
    registry.register(CoordinatorCollector(coordinator))
    handoffs = Histogram(
        "pubsub_canary_handoff_seconds",
        "time from the decision to move a unit to its grant to the new owner",
        ["group", "outcome"],
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        registry=registry,
    )

    def on_handoff(ev: HandoffEvent) -> None:
        if ev.seconds is not None:
            outcome = "graceful" if ev.graceful else "lease_expired"
            handoffs.labels(ev.group, outcome).observe(ev.seconds)

    coordinator.handoff_listeners.append(on_handoff)
    return registry
