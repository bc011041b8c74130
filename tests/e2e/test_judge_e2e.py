"""The statistical judge alone decides, on the Kafka test backend (SLO guards set loose).

Stable fails 2% of its messages throughout; a regressed canary fails 6% (3x stable) at a 10%
share and must be rolled back by the judge's verdict on the error rate; a canary that fails
like stable must be promoted.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from pubsub_canary.demo.harness import Harness, SteadyProducer
from pubsub_canary.demo.runner import rollout_spec

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(300)]

RATE = 600
TERMINAL = ("promoted", "rolled_back", "aborted")


@pytest.fixture
def cluster(kafka_backend: Any, kafka_topic_factory: Any, kafka_group_id: str, tmp_path: Path):
    topic = kafka_topic_factory(partitions=10)
    dlq = kafka_topic_factory(partitions=1, suffix="dlq")
    h = Harness(
        tmp_path,
        bootstrap=kafka_backend.bootstrap_servers,
        topic=topic,
        group=kafka_group_id,
        dlq_topic=dlq,
        lease_seconds=3.0,
    )
    h.start_coordinator()
    producer = SteadyProducer(kafka_backend.bootstrap_servers, topic, RATE).start()
    try:
        yield h
    finally:
        producer.stop()
        h.close()


def run(h: Harness, name: str, canary_fail: float, hold: float) -> dict[str, Any]:
    now = time.time()
    for _ in range(2):
        h.start_member("stable", "1.4.0", fail_rate=0.02, fail_after=now)
    h.start_member("canary", "1.5.0", fail_rate=canary_fail, fail_after=now)
    spec = rollout_spec(name, h.topic, h.group, h.dlq_topic, hold)
    spec["steps"] = [
        {"share": 10, "hold_seconds": hold},
        {"share": 50, "hold_seconds": hold},
        {"share": 100, "hold_seconds": 1},
    ]
    # Loose guards: only the judge can fail a step here.
    spec["slo"] = {"max_error_rate": 0.5, "max_dead_letter_rate": 0.5}
    spec["analysis"] = {"latency": None, "lag_growth": None, "on_inconclusive": "extend"}
    time.sleep(1.5)
    h.client.apply(spec)
    deadline = time.monotonic() + 150
    status = h.client.status(name)
    while status["phase"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = h.client.status(name)
    return status


def test_judge_alone_rolls_back_a_canary_failing_3x_stable(cluster: Harness) -> None:
    status = run(cluster, "worse", canary_fail=0.06, hold=600)
    assert status["phase"] == "rolled_back", status["decisions"]
    failed = [d for d in status["decisions"] if d["kind"] == "rollback"]
    assert failed and failed[0]["share"] == 0
    verdict = failed[0]["judgement"]
    assert verdict["verdict"] == "fail"
    judged = {m["metric"]: m for m in verdict["metrics"]}
    # The judge failed it, not an SLO guard (all guards passed).
    assert all(m["verdict"] == "pass" for k, m in judged.items() if k.startswith("slo:"))
    assert judged["error_rate"]["verdict"] == "fail"
    assert status["step"] == 1  # caught at the 10% step


def test_judge_promotes_a_canary_that_fails_like_stable(cluster: Harness) -> None:
    status = run(cluster, "same", canary_fail=0.02, hold=8)
    assert status["phase"] == "promoted", status["decisions"]
