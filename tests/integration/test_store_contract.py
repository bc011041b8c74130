"""One contract for every Store: the in-memory twin, SQLite and PostgreSQL.

Each backend is its own fixture parameter, so a PostgreSQL server that does not answer skips
(or, with ``CI`` set, fails) only its own cases. PostgreSQL runs get a schema of their own,
dropped afterwards, so that runs never see each other's rows.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pubsub_canary.coordinator.records import Decision, GroupRecord, MemberRecord, RolloutRecord
from pubsub_canary.coordinator.store import MemoryStore, SqlStore, Store, open_store
from pubsub_canary.core.handoff import UnitState, UnitStatus
from pubsub_canary.core.machine import Phase, RolloutState
from pubsub_canary.core.model import RolloutSpec, parse_rollout_spec
from pubsub_canary.core.observations import (
    CohortObservations,
    KpiStats,
    LagSample,
    LatencyHistogram,
)
from pubsub_canary.errors import CanaryError, ConflictError, VersionConflict

PG_URL = os.environ.get("PUBSUB_CANARY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
GROUP = "kafka:orders/billing"

#: Opens a store on the fixture's backing storage; each call gives a new connection.
Opener = Callable[[], Store]


def _is_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def _unavailable(reason: str) -> None:
    if _is_ci():
        pytest.fail(f"{reason} (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


def _pg(statement: str) -> None:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(statement)


def _pg_create_schema() -> str:
    """A fresh schema for this test; unavailable server -> skip (or fail on CI)."""
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - psycopg is a test dependency
        _unavailable(f"psycopg is not installed: {exc}")
        raise
    schema = f"pc_test_{uuid.uuid4().hex[:12]}"
    try:
        _pg(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as exc:
        _unavailable(f"PostgreSQL at {PG_URL} does not answer: {str(exc).strip().splitlines()[0]}")
    return schema


def _openers(kind: str, tmp_path: Path) -> Iterator[Opener]:
    """Opens stores on one backing storage (each call a new connection, as after a restart)."""
    if kind == "memory":
        twin = MemoryStore()
        yield lambda: twin
        return
    schema = None
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'state' / 'coordinator.db'}"
    else:
        schema = _pg_create_schema()
        # Unqualified pc_* names resolve to this test's own schema.
        url = f"{PG_URL}?options=-c%20search_path%3D{schema}"
    opened: list[Store] = []

    def open_sql() -> Store:
        store = open_store(url)
        assert isinstance(store, SqlStore)
        opened.append(store)
        return store

    try:
        yield open_sql
    finally:
        for s in opened:
            with contextlib.suppress(Exception):  # closed by the test already
                s.close()
        if schema is not None:
            _pg(f"DROP SCHEMA {schema} CASCADE")


POSTGRES = pytest.param("postgres", marks=pytest.mark.postgres)


@pytest.fixture(params=["memory", "sqlite", POSTGRES])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    yield from _openers(request.param, tmp_path)


@pytest.fixture(params=["sqlite", POSTGRES])
def durable_opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """The stores that outlive the process (the in-memory twin keeps nothing by design)."""
    yield from _openers(request.param, tmp_path)


@pytest.fixture
def store(opener: Opener) -> Store:
    return opener()


def _spec(name: str, group: str = "billing") -> RolloutSpec:
    return parse_rollout_spec(
        {
            "name": name,
            "target": {"topic": "orders", "group": group},
            "canary_version": "v2",
            "steps": [{"share": 10, "hold_seconds": 30}, {"share": 50, "approval": True}],
            "slo": {"max_error_rate": 0.05},
        }
    )


def _rollout(name: str, *, group: str = "billing", active: bool = True) -> RolloutRecord:
    spec = _spec(name, group)
    state = RolloutState(Phase.PROGRESSING, step=0, share=10.0, step_started_at=1000.5)
    return RolloutRecord(name, f"kafka:orders/{group}", spec, state, active, 1000.0, 1000.5)


def _obs() -> CohortObservations:
    return CohortObservations(
        processed=120,
        errors=7,
        dead_lettered=2,
        redeliveries=1,
        latency=LatencyHistogram.of([0.001, 0.02, 0.02, 3.5]),
        kpis={"reward": KpiStats.of([1.0, 0.5, -0.25])},
        lag=(LagSample(10.0, 5, 100), LagSample(11.0, 3, 140)),
        elapsed_seconds=12.5,
    )


def _units() -> list[UnitState]:
    return [
        UnitState(0, "stable-a", 3, UnitStatus.OWNED, 1234, None, None),
        UnitState(1, "canary-b", 1, UnitStatus.REVOKING, None, None, 99.25),
        # Taken from an owner presumed dead and not granted yet: its next grant is not
        # graceful (duplicates after a crash are counted), and that must survive a restart.
        UnitState(2, None, 7, UnitStatus.FREE, None, None, 98.0, graceful=False),
        UnitState(3, None, 2, UnitStatus.FREE, 2**40, None, 97.0),
    ]


def _fill(store: Store) -> None:
    store.put_group(GroupRecord(GROUP, "kafka", "orders", "billing", 4))
    store.put_member(
        MemberRecord("stable-a", GROUP, "stable", "v1", 1000.25, False, {"host": "h1", "pid": 7})
    )
    store.put_member(MemberRecord("canary-b", GROUP, "canary", "v2", 1001.5, True))
    store.put_units(GROUP, _units())
    store.create_rollout(_rollout("r1"))
    store.put_observations("r1", 0, "canary", _obs())
    store.put_observations("r1", 0, "stable", CohortObservations(processed=3))
    for i, kind in enumerate(["start", "step", "rollback"]):
        store.append_decision(Decision("r1", 1000.0 + i, kind, f"reason {i}", {"i": i}))


def _assert_filled(store: Store) -> None:
    snap = store.load()
    assert snap.groups == {GROUP: GroupRecord(GROUP, "kafka", "orders", "billing", 4)}
    assert snap.members == {
        "stable-a": MemberRecord(
            "stable-a", GROUP, "stable", "v1", 1000.25, False, {"host": "h1", "pid": 7}
        ),
        "canary-b": MemberRecord("canary-b", GROUP, "canary", "v2", 1001.5, True, {}),
    }
    # ``since`` is in-memory timing only; everything else a restart needs must come back.
    assert {u: replace(s, since=None) for u, s in snap.units[GROUP].items()} == {
        u.unit: u for u in _units()
    }
    assert snap.rollouts == {"r1": replace(_rollout("r1"), version=1)}
    assert snap.observations == {
        ("r1", 0, "canary"): _obs(),
        ("r1", 0, "stable"): CohortObservations(processed=3),
    }
    assert store.decisions("r1") == [
        Decision("r1", 1000.0 + i, kind, f"reason {i}", {"i": i})
        for i, kind in enumerate(["start", "step", "rollback"])
    ]


def test_empty_store_loads_empty(store: Store) -> None:
    snap = store.load()
    assert (snap.groups, snap.members, snap.units, snap.rollouts, snap.observations) == (
        {},
        {},
        {},
        {},
        {},
    )
    assert store.decisions("r1") == []


def test_round_trip_through_load(store: Store) -> None:
    _fill(store)
    _assert_filled(store)


def test_state_survives_close_and_reopen(durable_opener: Opener) -> None:
    first = durable_opener()
    _fill(first)
    first.close()
    _assert_filled(durable_opener())


def test_second_active_rollout_for_a_group_conflicts(store: Store) -> None:
    first = store.create_rollout(_rollout("r1"))

    with pytest.raises(ConflictError) as info:
        store.create_rollout(_rollout("r2"))

    assert info.value.fields["group"] == GROUP
    assert "'r1'" in info.value.message
    assert store.load().rollouts == {"r1": first}


def test_rollout_on_another_group_is_independent(store: Store) -> None:
    store.create_rollout(_rollout("r1"))
    store.create_rollout(_rollout("r2", group="shipping"))
    assert set(store.load().rollouts) == {"r1", "r2"}


def test_duplicate_name_conflicts_even_when_terminal(store: Store) -> None:
    done = store.create_rollout(_rollout("r1", active=False))

    with pytest.raises(ConflictError) as info:
        store.create_rollout(_rollout("r1", group="shipping"))

    assert info.value.fields["rollout"] == "r1"
    assert store.load().rollouts == {"r1": done}


def test_terminal_rollout_does_not_block_a_new_one(store: Store) -> None:
    r1 = store.create_rollout(_rollout("r1"))
    finished = replace(r1, state=replace(r1.state, phase=Phase.PROMOTED, share=100.0), active=False)
    store.update_rollout(finished)

    r2 = store.create_rollout(_rollout("r2"))

    rollouts = store.load().rollouts
    assert rollouts["r2"] == r2 and r2.active
    assert rollouts["r1"].state.phase is Phase.PROMOTED and not rollouts["r1"].active


def test_create_starts_at_version_one_and_update_bumps_it(store: Store) -> None:
    created = store.create_rollout(_rollout("r1"))
    assert created.version == 1
    moved = replace(created, state=replace(created.state, step=1, share=50.0), updated_at=2000.0)

    updated = store.update_rollout(moved)

    assert updated.version == 2
    assert store.load().rollouts["r1"] == updated
    assert updated.state.share == 50.0 and updated.updated_at == 2000.0


def test_stale_update_raises_version_conflict_and_changes_nothing(store: Store) -> None:
    created = store.create_rollout(_rollout("r1"))
    winner = store.update_rollout(replace(created, state=replace(created.state, share=25.0)))
    stale = replace(created, state=replace(created.state, phase=Phase.ROLLING_BACK, share=0.0))

    with pytest.raises(VersionConflict) as info:
        store.update_rollout(stale)

    assert info.value.retriable
    assert store.load().rollouts["r1"] == winner


def test_update_of_unknown_rollout_raises_version_conflict(store: Store) -> None:
    with pytest.raises(VersionConflict):
        store.update_rollout(replace(_rollout("ghost"), version=1))
    assert store.load().rollouts == {}


def test_decisions_come_back_oldest_first_and_limited(store: Store) -> None:
    for i in range(6):
        store.append_decision(Decision("r1", 100.0 + i, "step", f"d{i}"))
        store.append_decision(Decision("other", 100.0 + i, "step", f"o{i}"))

    assert [d.reason for d in store.decisions("r1")] == [f"d{i}" for i in range(6)]
    # The latest ``limit``, still oldest first.
    assert [d.reason for d in store.decisions("r1", limit=3)] == ["d3", "d4", "d5"]


def test_decisions_taken_at_the_same_instant_keep_their_order(store: Store) -> None:
    # One transition can record several decisions with one timestamp (and a coarse clock
    # gives equal ones too); the history must still read in the order they were taken.
    for i in range(5):
        store.append_decision(Decision("r1", 100.0, "step", f"d{i}"))

    assert [d.reason for d in store.decisions("r1")] == [f"d{i}" for i in range(5)]
    assert [d.reason for d in store.decisions("r1", limit=2)] == ["d3", "d4"]


def test_put_units_upserts(store: Store) -> None:
    store.put_units(GROUP, [UnitState(0), UnitState(1), UnitState(2)])
    store.put_units(GROUP, [UnitState(1, "m1", 1, UnitStatus.OWNED, 42, None, 5.0)])
    store.put_units(GROUP, [])

    units = store.load().units[GROUP]
    assert units == {
        0: UnitState(0),
        1: UnitState(1, "m1", 1, UnitStatus.OWNED, 42, None, 5.0),
        2: UnitState(2),
    }


def test_units_of_groups_are_kept_apart(store: Store) -> None:
    store.put_units(GROUP, [UnitState(0, "a", 1, UnitStatus.OWNED)])
    store.put_units("kafka:orders/other", [UnitState(0, "b", 4, UnitStatus.OWNED)])

    units = store.load().units
    assert units[GROUP][0].owner == "a" and units["kafka:orders/other"][0].owner == "b"


def test_put_member_overwrites_every_field(store: Store) -> None:
    # A member re-registering under its id (after a restart) may come back in another
    # cohort or version; the stored record must be the latest one, as in the twin.
    store.put_member(MemberRecord("m1", GROUP, "stable", "v1", 1.0, True, {"a": 1}))
    latest = MemberRecord("m1", GROUP, "canary", "v2", 2.0, False, {"b": 2})
    store.put_member(latest)

    assert store.load().members == {"m1": latest}


def test_put_group_updates_unit_count(store: Store) -> None:
    store.put_group(GroupRecord(GROUP, "kafka", "orders", "billing", 4))
    store.put_group(GroupRecord(GROUP, "kafka", "orders", "billing", 8))
    assert store.load().groups[GROUP].units == 8


def test_delete_member(store: Store) -> None:
    store.put_member(MemberRecord("m1", GROUP, "stable", "v1", 1.0))
    store.put_member(MemberRecord("m2", GROUP, "canary", "v2", 1.0))

    store.delete_member("m1")
    store.delete_member("never-registered")  # no error

    assert set(store.load().members) == {"m2"}


def test_observations_upsert_per_rollout_step_cohort(store: Store) -> None:
    store.put_observations("r1", 0, "canary", CohortObservations(processed=1))
    store.put_observations("r1", 0, "canary", CohortObservations(processed=5, errors=1))
    store.put_observations("r1", 1, "canary", CohortObservations(processed=9))

    assert store.load().observations == {
        ("r1", 0, "canary"): CohortObservations(processed=5, errors=1),
        ("r1", 1, "canary"): CohortObservations(processed=9),
    }


def test_load_returns_a_copy(store: Store) -> None:
    store.put_units(GROUP, [UnitState(0)])
    snap = store.load()
    snap.units[GROUP][0] = UnitState(0, "intruder", 9, UnitStatus.OWNED)
    snap.groups["x"] = GroupRecord("x", "kafka", "x", "x", 1)

    again = store.load()
    assert again.units[GROUP][0] == UnitState(0) and "x" not in again.groups


def test_unsupported_url_is_a_clear_error() -> None:
    with pytest.raises(CanaryError) as info:
        open_store("mysql://root@localhost/db")
    assert "sqlite:///" in info.value.message and info.value.fields["field"] == "store"


def test_sqlite_file_from_before_the_graceful_column_opens_and_upgrades(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with contextlib.closing(sqlite3.connect(path)) as old:
        old.execute(
            "CREATE TABLE pc_units (group_key TEXT NOT NULL, unit INTEGER NOT NULL, owner TEXT, "
            "epoch INTEGER NOT NULL, status TEXT NOT NULL, next_offset BIGINT, "
            "move_started_at DOUBLE PRECISION, PRIMARY KEY (group_key, unit))"
        )
        old.execute(f"INSERT INTO pc_units VALUES ('{GROUP}', 0, 'm1', 3, 'owned', 17, NULL)")
        old.commit()

    store = open_store(f"sqlite:///{path}")
    try:
        assert store.load().units[GROUP] == {0: UnitState(0, "m1", 3, UnitStatus.OWNED, 17)}
        taken = UnitState(0, None, 3, UnitStatus.FREE, None, None, 5.0, graceful=False)
        store.put_units(GROUP, [taken])
        assert store.load().units[GROUP] == {0: taken}
    finally:
        store.close()
