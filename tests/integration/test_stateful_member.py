"""Stateful consumers on the Kafka test backend: state follows the partition (I4)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from pubsub_canary.core.model import parse_rollout_spec
from pubsub_canary.errors import ConflictError
from tests.integration.migrations import add_to_total_v2, total_v2_to_v1
from tests.integration.stateful_rig import StatefulRig

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(180)]


@pytest.fixture
def rig(kafka_backend: Any, kafka_topic_factory: Any, kafka_group_id: str, tmp_path: Path):
    topic = kafka_topic_factory(partitions=6)
    changelog = kafka_topic_factory(partitions=6, suffix="changelog")
    r = StatefulRig(
        kafka_backend.bootstrap_servers,
        topic,
        kafka_group_id,
        changelog,
        tmp_path / "coordinator.db",
    )
    try:
        yield r
    finally:
        r.close()


def spec(r: StatefulRig, name: str, *shares: float, **extra: Any):
    return parse_rollout_spec(
        {
            "name": name,
            "target": {"topic": r.topic, "group": r.group},
            "stable_version": "1",
            "canary_version": "2",
            "steps": [{"share": s, "hold_seconds": 3600} for s in shares],
            "analysis": {"latency": None, "lag_growth": None},
            **extra,
        }
    )


def wait_settled(r: StatefulRig, name: str, canary_units: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = r.coordinator.status(name)
        owners = [u["cohort"] for u in s["units"].values()]
        if owners.count("canary") == canary_units and None not in owners:
            return
        time.sleep(0.1)
    raise AssertionError(f"not settled at {canary_units} canary units: {s['units']}")


def test_state_follows_partitions_through_promotion_and_rollback(rig: StatefulRig) -> None:
    rig.start_member("stable", "1")
    rig.start_member("stable", "1")
    rig.start_member("canary", "2")
    rig.produce(1500)
    time.sleep(1.0)
    rig.coordinator.apply_rollout(spec(rig, "r1", 50, 100))
    wait_settled(rig, "r1", 3)
    rig.produce(1500)
    rig.coordinator.act("r1", "promote")  # every partition moves to the canary, with state
    wait_settled(rig, "r1", 6)
    rig.produce(1500)
    assert rig.wait_caught_up()
    rig.stop_all()
    mismatches, agree = rig.check_state()
    assert mismatches == 0
    for p, (through, committed) in agree.items():
        assert through == committed, f"partition {p}: state at {through}, committed {committed}"


def test_rollback_hands_canary_state_back_to_stable(rig: StatefulRig) -> None:
    rig.start_member("stable", "1")
    rig.start_member("canary", "2")
    rig.produce(1000)
    time.sleep(1.0)
    rig.coordinator.apply_rollout(spec(rig, "r2", 50))
    wait_settled(rig, "r2", 3)
    rig.produce(1500)
    assert rig.wait_caught_up()
    rig.coordinator.act("r2", "abort")
    wait_settled(rig, "r2", 0)
    rig.produce(1000)
    assert rig.wait_caught_up()
    rig.stop_all()
    mismatches, agree = rig.check_state()
    assert mismatches == 0
    assert all(t == c for t, c in agree.values()), agree


def test_crashed_member_state_is_rebuilt_from_the_last_checkpoint(rig: StatefulRig) -> None:
    rig.start_member("stable", "1")
    victim = rig.start_member("stable", "1")
    rig.produce(2000)
    time.sleep(1.5)
    rig.crash(victim)  # no final checkpoint or commit: the survivor rebuilds from the changelog
    rig.produce(1000)
    assert rig.wait_caught_up(timeout=40)
    rig.stop_all()
    mismatches, agree = rig.check_state()
    assert mismatches == 0
    assert all(t == c for t, c in agree.values()), agree


def _formats(reads: set[int], writes: int) -> dict[str, Any]:
    return {"state_format": writes, "reads": reads}


def test_rollout_refused_when_stable_cannot_read_canary_state(rig: StatefulRig) -> None:
    rig.start_member("stable", "1", **_formats({1}, 1))
    rig.start_member("canary", "2", **_formats({1, 2}, 2))
    rig.produce(300)
    time.sleep(1.5)
    with pytest.raises(ConflictError) as info:
        rig.coordinator.apply_rollout(spec(rig, "r3", 50))
    assert "stable version 1 cannot read state format 2" in info.value.message
    # Refused before anything moved: no rollout, no canary partition.
    assert "r3" not in rig.coordinator.rollouts
    s = rig.coordinator.groups[f"kafka:{rig.topic}/{rig.group}"]
    owners = {
        m.record.cohort
        for m in rig.coordinator.members.values()
        if any(u.owner == m.record.member_id for u in s.units.values())
    }
    assert owners == {"stable"}


def test_refused_the_other_way_when_canary_cannot_read_stable_state(rig: StatefulRig) -> None:
    rig.start_member("stable", "1", **_formats({1, 2}, 2))
    rig.start_member("canary", "2", **_formats({1}, 1))
    time.sleep(1.5)
    with pytest.raises(ConflictError) as info:
        rig.coordinator.apply_rollout(spec(rig, "r4", 50))
    assert "canary version 2 cannot read state format 2" in info.value.message


def test_migration_in_the_rollout_file_allows_rollback_with_state(rig: StatefulRig) -> None:
    # The canary writes totals as {"total": n} (format 2); stable reads plain numbers (1).
    rig.start_member("stable", "1", **_formats({1}, 1))
    rig.start_member("canary", "2", handler=add_to_total_v2, **_formats({1, 2}, 2))
    rig.produce(500)
    time.sleep(1.5)
    migration = {
        "from_format": 2,
        "to_format": 1,
        "function": "tests.integration.migrations:total_v2_to_v1",
    }
    rig.coordinator.apply_rollout(spec(rig, "r5", 50, state_migrations=[migration]))
    wait_settled(rig, "r5", 3)
    rig.produce(1000)
    assert rig.wait_caught_up()
    rig.coordinator.act("r5", "abort")
    wait_settled(rig, "r5", 0)
    rig.produce(500)
    assert rig.wait_caught_up()
    rig.stop_all()
    mismatches, _ = rig.check_state(migrations={2: total_v2_to_v1})
    assert mismatches == 0
