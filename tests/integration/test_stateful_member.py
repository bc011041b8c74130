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


def assert_state_agrees(r: StatefulRig) -> None:
    """Every key's state is what one owner processing each message once holds, and each
    partition's last checkpoint reflects exactly its committed offset."""
    r.stop_all()
    mismatches, agree = r.check_state()
    assert mismatches == 0
    assert all(t == c for t, c in agree.values()), agree


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
    assert_state_agrees(rig)


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
    assert_state_agrees(rig)


def _changelog_ends(r: StatefulRig, partitions: set[int]) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": r.bootstrap, "group.id": f"{r.group}-watermarks"})
    try:
        return {
            p: c.get_watermark_offsets(TopicPartition(r.changelog, p), timeout=10)[1]
            for p in partitions
        }
    finally:
        c.close()


@pytest.mark.parametrize("keep_released_state", [True, False])
def test_a_rollback_finds_stable_already_warm(
    rig: StatefulRig, keep_released_state: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # While the canary holds a partition, the stable member a rollback would give it back to
    # keeps its state warm (from the state it had when it released it, or, if it kept none,
    # read from the changelog's start in the background), so the rollback reads only the
    # canary's last batches, not the whole changelog.
    if not keep_released_state:
        monkeypatch.setattr("pubsub_canary.client.stateful.RETIRED_SECONDS", -1.0)
    name = rig.start_member("stable", "1")
    stable, _ = rig.members[name]
    rig.start_member("canary", "2")
    rig.produce(1500)
    assert rig.wait_caught_up()
    rig.coordinator.apply_rollout(spec(rig, "r6", 50))
    wait_settled(rig, "r6", 3)
    moved = {
        int(u) for u, x in rig.coordinator.status("r6")["units"].items() if x["cohort"] == "canary"
    }
    for _ in range(6):
        rig.produce(300)
        time.sleep(0.3)  # several canary checkpoints per partition
    assert rig.wait_caught_up()
    ends = _changelog_ends(rig, moved)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(
        w.tail.position >= ends[p] for p, w in list(stable._warmers.items())
    ):
        time.sleep(0.05)
    # Stable tails exactly the partitions the canary holds, caught up with what it wrote.
    assert set(stable._warmers) == moved
    assert all(w.tail.position >= ends[p] for p, w in stable._warmers.items())
    started_from = {p: ends[p] - w.tail.records for p, w in stable._warmers.items()}
    if keep_released_state:  # from the marker it wrote when it released the partition
        assert all(0 < off < ends[p] for p, off in started_from.items()), (started_from, ends)
    else:
        assert all(off == 0 for off in started_from.values()), started_from
    stable.restore_records.clear()
    rig.coordinator.act("r6", "abort")
    wait_settled(rig, "r6", 0)
    deadline = time.monotonic() + 10
    while set(stable.restore_records) < moved and time.monotonic() < deadline:
        time.sleep(0.05)  # the grant reached the coordinator; the member restores next
    assert set(stable.restore_records) == moved
    for p in moved:
        # Cold, a restore would read the partition's whole changelog (ends[p] records).
        assert stable.restore_records[p] * 4 < ends[p], (p, stable.restore_records, ends)
    rig.produce(500)
    assert rig.wait_caught_up()
    assert_state_agrees(rig)


def test_crashed_member_state_is_rebuilt_from_the_last_checkpoint(rig: StatefulRig) -> None:
    rig.start_member("stable", "1")
    victim = rig.start_member("stable", "1")
    rig.produce(2000)
    time.sleep(1.5)
    rig.crash(victim)  # no final checkpoint or commit: the survivor rebuilds from the changelog
    rig.produce(1000)
    assert rig.wait_caught_up(timeout=40)
    assert_state_agrees(rig)


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


def test_a_tail_seeded_at_a_marker_reads_only_what_follows(
    kafka_backend: Any, kafka_topic_factory: Any
) -> None:
    # The state a member kept when it released a partition, plus the changelog after its last
    # marker, is the state a reader from the partition's start gets.
    from confluent_kafka import Producer

    from pubsub_canary.client.state import (
        ChangelogReader,
        ChangelogWriter,
        PartitionState,
        Seed,
        StateFormats,
    )

    topic = kafka_topic_factory(partitions=1, suffix="changelog")
    boot = kafka_backend.bootstrap_servers
    writer = ChangelogWriter(Producer({"bootstrap.servers": boot}), topic, StateFormats())
    mine = PartitionState(0)
    for i in range(300):  # the old owner: 3 batches
        mine[f"k{i % 40}"] = i
        mine.message_done()
        if i % 100 == 99:
            writer.checkpoint(0, 1, i + 1, mine)
            writer.flush()
    assert mine.is_clean()
    through, marker = writer.last_marker[0]
    assert through == 300
    kept = mine.snapshot()
    theirs = PartitionState(0, dict(kept))  # the next owner goes on from the same state
    for i in range(300, 360):
        theirs[f"k{i % 70}"] = i
        theirs.message_done()
        if i % 20 == 19:
            writer.checkpoint(0, 2, i + 1, theirs)
            writer.flush()
    del theirs["k3"]
    writer.checkpoint(0, 2, 361, theirs)
    writer.flush()

    reader = ChangelogReader({"bootstrap.servers": boot, "group.id": "seed"}, topic, StateFormats())
    full = reader.restore(0)
    tail = reader.tail(0, Seed(kept, through, marker))
    try:
        seeded = tail.catch_up()
    finally:
        tail.close()
    assert seeded.data == full.data == theirs.snapshot()
    assert seeded.through == full.through == 361
    assert seeded.records == full.records - (marker + 1)
