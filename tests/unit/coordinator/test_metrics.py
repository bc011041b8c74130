"""/metrics: per-cohort latency histograms, verdicts with evidence, member leases."""

from __future__ import annotations

from prometheus_client import generate_latest

from pubsub_canary.coordinator.broker import MemoryBroker
from pubsub_canary.coordinator.metrics import build_registry
from pubsub_canary.coordinator.service import Coordinator
from pubsub_canary.coordinator.store import MemoryStore
from pubsub_canary.core.model import parse_rollout_spec
from pubsub_canary.core.observations import CohortObservations, LatencyHistogram

G = 'group="kafka:orders/g"'


def scrape() -> str:
    c = Coordinator(MemoryStore(), MemoryBroker({"orders": 4}), lease_seconds=6.0)
    registry = build_registry(c)
    for mid, cohort in (("s1", "stable"), ("c1", "canary")):
        c.register(
            transport="kafka",
            topic="orders",
            group_id="g",
            units=4,
            cohort=cohort,
            version="1" if cohort == "stable" else "2",
            member_id=mid,
        )
    c.apply_rollout(
        parse_rollout_spec(
            {
                "name": "r",
                "target": {"topic": "orders", "group": "g"},
                "stable_version": "1",
                "canary_version": "2",
                "steps": [{"share": 50, "hold_seconds": 100}],
            }
        )
    )
    slow = LatencyHistogram.of([0.003] * 150 + [0.2] * 50)
    c.heartbeat("c1", metrics=CohortObservations(processed=200, errors=2, latency=slow))
    fast = LatencyHistogram.of([0.003] * 200)
    c.heartbeat("s1", metrics=CohortObservations(processed=200, latency=fast))
    c.tick()
    return generate_latest(registry).decode()


def value(text: str, prefix: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, (prefix, lines)
    return float(lines[0].rsplit(" ", 1)[1])


def test_latency_histograms_per_cohort() -> None:
    text = scrape()
    name = "pubsub_canary_processing_latency_seconds_bucket"
    assert value(text, f'{name}{{cohort="canary",{G},le="0.005"}}') == 150
    assert value(text, f'{name}{{cohort="canary",{G},le="0.1"}}') == 150
    assert value(text, f'{name}{{cohort="canary",{G},le="0.25"}}') == 200
    assert value(text, f'{name}{{cohort="stable",{G},le="0.005"}}') == 200
    assert value(text, f'{name}{{cohort="canary",{G},le="+Inf"}}') == 200


def test_verdicts_and_evidence() -> None:
    text = scrape()
    v = "pubsub_canary_verdict"
    assert value(text, f'{v}{{{G},metric="error_rate",rollout="r",verdict="continue"}}') == 1
    assert value(text, f'{v}{{{G},metric="error_rate",rollout="r",verdict="fail"}}') == 0
    e = "pubsub_canary_verdict_evidence"
    assert value(text, f'{e}{{{G},metric="error_rate",name="canary_messages",rollout="r"}}') == 200


def test_member_leases() -> None:
    text = scrape()
    left = value(text, f'pubsub_canary_member_lease_remaining_seconds{{cohort="canary",{G}}}')
    assert 0 < left <= 6.0


def test_finished_rollouts_leave_the_phase_series_but_the_latest_stays() -> None:
    c = Coordinator(MemoryStore(), MemoryBroker({"orders": 4}), lease_seconds=6.0)
    registry = build_registry(c)
    c.register(
        transport="kafka",
        topic="orders",
        group_id="g",
        units=4,
        cohort="stable",
        version="1",
        member_id="s1",
    )
    c.tick()
    for i in range(3):  # three rollouts of the same group, each aborted before the next
        c.apply_rollout(
            parse_rollout_spec(
                {
                    "name": f"r{i}",
                    "target": {"topic": "orders", "group": "g"},
                    "stable_version": "1",
                    "canary_version": "2",
                    "steps": [{"share": 50, "hold_seconds": 100}],
                }
            )
        )
        c.act(f"r{i}", "abort")
        c.tick()
    text = generate_latest(registry).decode()
    phases = [ln for ln in text.splitlines() if ln.startswith("pubsub_canary_rollout_phase{")]
    assert {ln.split('rollout="')[1].split('"')[0] for ln in phases} == {"r2"}
    assert value(text, f'pubsub_canary_rollout_phase{{{G},phase="aborted",rollout="r2"}}') == 1
