"""The coordinator's state store: the port, its in-memory twin, and the SQL implementation.

One schema serves SQLite (the default: one file, embedded) and PostgreSQL (several coordinator
replicas). ``open_store(url)`` picks the implementation from the URL:
``memory://``, ``sqlite:///path/to/file.db``, ``postgresql://user@host:port/db``.

Rules every implementation keeps (checked by one contract test suite against all of them):

* at most one *active* rollout per group; creating a second raises ConflictError;
* rollout names are unique; updates carry the version read and raise VersionConflict if
  someone else wrote first;
* ``load()`` returns exactly what was written, so a restarted coordinator resumes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from pubsub_canary.coordinator.records import (
    Decision,
    GroupRecord,
    MemberRecord,
    RolloutRecord,
    obs_from_dict,
    obs_to_dict,
    state_from_json,
    state_to_json,
    unit_from_row,
    unit_to_row,
)
from pubsub_canary.core.handoff import UnitState
from pubsub_canary.core.model import RolloutSpec
from pubsub_canary.core.observations import CohortObservations
from pubsub_canary.errors import ConfigError, ConflictError, StoreError, VersionConflict


@dataclass
class Snapshot:
    """Everything a coordinator needs to resume."""

    groups: dict[str, GroupRecord] = field(default_factory=dict)
    members: dict[str, MemberRecord] = field(default_factory=dict)
    units: dict[str, dict[int, UnitState]] = field(default_factory=dict)
    rollouts: dict[str, RolloutRecord] = field(default_factory=dict)
    #: (rollout, step, cohort) -> observations
    observations: dict[tuple[str, int, str], CohortObservations] = field(default_factory=dict)


class Store(Protocol):
    """Durable coordinator state. Implementations are thread-safe."""

    def load(self) -> Snapshot: ...
    def put_group(self, group: GroupRecord) -> None: ...
    def put_member(self, member: MemberRecord) -> None: ...
    def delete_member(self, member_id: str) -> None: ...
    def put_units(self, group_key: str, units: Iterable[UnitState]) -> None: ...
    def create_rollout(self, rollout: RolloutRecord) -> RolloutRecord: ...
    def update_rollout(self, rollout: RolloutRecord) -> RolloutRecord:
        """Write ``rollout`` if the stored version equals ``rollout.version``; bump it."""
        ...

    def append_decision(self, decision: Decision) -> None: ...
    def decisions(self, rollout: str, limit: int = 100) -> list[Decision]:
        """The latest ``limit`` decisions of a rollout, oldest first."""
        ...

    def put_observations(
        self, rollout: str, step: int, cohort: str, obs: CohortObservations
    ) -> None: ...
    def close(self) -> None: ...


def _busy(rollout: RolloutRecord, other: str) -> ConflictError:
    return ConflictError(
        f"group {rollout.group_key} already has an active rollout {other!r}; "
        "finish, promote or abort it first",
        rollout=rollout.name,
        group=rollout.group_key,
    )


def _exists(name: str) -> ConflictError:
    return ConflictError(
        f"a rollout named {name!r} exists already; choose another name", rollout=name
    )


class MemoryStore:
    """In-memory twin of the SQL store, for unit tests and ``memory://``."""

    def __init__(self) -> None:
        self._snap = Snapshot()
        self._decisions: list[Decision] = []
        self._lock = threading.Lock()

    def load(self) -> Snapshot:
        with self._lock:
            s = self._snap
            return Snapshot(
                dict(s.groups),
                dict(s.members),
                {k: dict(v) for k, v in s.units.items()},
                dict(s.rollouts),
                dict(s.observations),
            )

    def put_group(self, group: GroupRecord) -> None:
        with self._lock:
            self._snap.groups[group.key] = group

    def put_member(self, member: MemberRecord) -> None:
        with self._lock:
            self._snap.members[member.member_id] = member

    def delete_member(self, member_id: str) -> None:
        with self._lock:
            self._snap.members.pop(member_id, None)

    def put_units(self, group_key: str, units: Iterable[UnitState]) -> None:
        with self._lock:
            table = self._snap.units.setdefault(group_key, {})
            for u in units:
                table[u.unit] = u

    def create_rollout(self, rollout: RolloutRecord) -> RolloutRecord:
        with self._lock:
            if rollout.name in self._snap.rollouts:
                raise _exists(rollout.name)
            for other in self._snap.rollouts.values():
                if other.active and rollout.active and other.group_key == rollout.group_key:
                    raise _busy(rollout, other.name)
            stored = replace(rollout, version=1)
            self._snap.rollouts[rollout.name] = stored
            return stored

    def update_rollout(self, rollout: RolloutRecord) -> RolloutRecord:
        with self._lock:
            cur = self._snap.rollouts.get(rollout.name)
            if cur is None or cur.version != rollout.version:
                raise VersionConflict(
                    f"rollout {rollout.name!r} changed since it was read",
                    rollout=rollout.name,
                )
            stored = replace(rollout, version=rollout.version + 1)
            self._snap.rollouts[rollout.name] = stored
            return stored

    def append_decision(self, decision: Decision) -> None:
        with self._lock:
            self._decisions.append(decision)

    def decisions(self, rollout: str, limit: int = 100) -> list[Decision]:
        with self._lock:
            return [d for d in self._decisions if d.rollout == rollout][-limit:]

    def put_observations(
        self, rollout: str, step: int, cohort: str, obs: CohortObservations
    ) -> None:
        with self._lock:
            self._snap.observations[(rollout, step, cohort)] = obs

    def close(self) -> None:
        pass


SCHEMA = [
    """CREATE TABLE IF NOT EXISTS pc_groups (
        key TEXT PRIMARY KEY, transport TEXT NOT NULL, topic TEXT NOT NULL,
        group_id TEXT NOT NULL, units INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS pc_members (
        member_id TEXT PRIMARY KEY, group_key TEXT NOT NULL, cohort TEXT NOT NULL,
        version TEXT NOT NULL, registered_at DOUBLE PRECISION NOT NULL,
        leaving INTEGER NOT NULL DEFAULT 0, meta TEXT NOT NULL DEFAULT '{}')""",
    """CREATE TABLE IF NOT EXISTS pc_units (
        group_key TEXT NOT NULL, unit INTEGER NOT NULL, owner TEXT, epoch INTEGER NOT NULL,
        status TEXT NOT NULL, next_offset BIGINT, move_started_at DOUBLE PRECISION,
        graceful INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (group_key, unit))""",
    """CREATE TABLE IF NOT EXISTS pc_rollouts (
        name TEXT PRIMARY KEY, group_key TEXT NOT NULL, spec TEXT NOT NULL, state TEXT NOT NULL,
        active INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL, version INTEGER NOT NULL)""",
    # One active rollout per group, enforced by the database itself.
    """CREATE UNIQUE INDEX IF NOT EXISTS pc_rollouts_one_active
        ON pc_rollouts (group_key) WHERE active = 1""",
    """CREATE TABLE IF NOT EXISTS pc_decisions (
        rollout TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL,
        reason TEXT NOT NULL, data TEXT NOT NULL DEFAULT '{}')""",
    "CREATE INDEX IF NOT EXISTS pc_decisions_rollout ON pc_decisions (rollout, at)",
    """CREATE TABLE IF NOT EXISTS pc_observations (
        rollout TEXT NOT NULL, step INTEGER NOT NULL, cohort TEXT NOT NULL, data TEXT NOT NULL,
        PRIMARY KEY (rollout, step, cohort))""",
]


class SqlStore:
    """The store on SQLite or PostgreSQL (same schema, same statements).

    Statements are written with ``?`` placeholders; the PostgreSQL driver gets ``%s``.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.RLock()
        if url.startswith("sqlite:///"):
            path = url[len("sqlite:///") :]
            if path != ":memory:":
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            try:
                self._conn: Any = sqlite3.connect(
                    path, check_same_thread=False, isolation_level=None, timeout=30
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open SQLite store {path!r}: {exc}") from None
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._pg = False
            self._integrity: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)
        elif url.startswith(("postgresql://", "postgres://")):
            try:
                import psycopg
            except ImportError:  # pragma: no cover - depends on extras
                raise ConfigError(
                    "the PostgreSQL store needs psycopg: pip install 'pubsub-canary[coordinator]'"
                ) from None
            try:
                self._conn = psycopg.connect(url, autocommit=True)
            except psycopg.Error as exc:
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise StoreError(f"cannot connect to PostgreSQL store {url!r}: {msg}") from None
            self._pg = True
            self._integrity = (psycopg.errors.UniqueViolation,)
        else:
            raise ConfigError(
                f"store URL {url!r} is not supported; use sqlite:///PATH, "
                "postgresql://USER@HOST:PORT/DB or memory://",
                field="store",
            )
        with self._tx() as cur:
            for stmt in SCHEMA:
                cur.execute(stmt)
            self._migrate(cur)

    def _migrate(self, cur: _Cursor) -> None:
        """Add columns that ``CREATE TABLE IF NOT EXISTS`` leaves out of older tables."""
        graceful = "graceful INTEGER NOT NULL DEFAULT 1"
        if self._pg:
            cur.execute(f"ALTER TABLE pc_units ADD COLUMN IF NOT EXISTS {graceful}")
            # Insertion order of decisions (SQLite has it as rowid): timestamps can be equal.
            cur.execute(
                "ALTER TABLE pc_decisions ADD COLUMN IF NOT EXISTS seq BIGINT "
                "GENERATED ALWAYS AS IDENTITY"
            )
        elif "graceful" not in {row[1] for row in cur.all("PRAGMA table_info(pc_units)")}:
            cur.execute(f"ALTER TABLE pc_units ADD COLUMN {graceful}")

    def _sql(self, stmt: str) -> str:
        return stmt.replace("?", "%s") if self._pg else stmt

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN")
            try:
                yield _Cursor(cur, self._sql)
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            else:
                cur.execute("COMMIT")
            finally:
                cur.close()

    def load(self) -> Snapshot:
        snap = Snapshot()
        with self._tx() as cur:
            for key, transport, topic, group_id, units in cur.all(
                "SELECT key, transport, topic, group_id, units FROM pc_groups"
            ):
                snap.groups[key] = GroupRecord(key, transport, topic, group_id, int(units))
            for mid, gk, cohort, version, reg, leaving, meta in cur.all(
                "SELECT member_id, group_key, cohort, version, registered_at, leaving, meta "
                "FROM pc_members"
            ):
                snap.members[mid] = MemberRecord(
                    mid, gk, cohort, version, float(reg), bool(leaving), json.loads(meta)
                )
            for gk, unit, owner, epoch, status, off, moved, graceful in cur.all(
                "SELECT group_key, unit, owner, epoch, status, next_offset, move_started_at, "
                "graceful FROM pc_units"
            ):
                snap.units.setdefault(gk, {})[int(unit)] = unit_from_row(
                    {
                        "unit": unit,
                        "owner": owner,
                        "epoch": epoch,
                        "status": status,
                        "next_offset": off,
                        "move_started_at": moved,
                        "graceful": graceful,
                    }
                )
            for name, gk, spec, state, active, created, updated, version in cur.all(
                "SELECT name, group_key, spec, state, active, created_at, updated_at, version "
                "FROM pc_rollouts"
            ):
                snap.rollouts[name] = RolloutRecord(
                    name,
                    gk,
                    RolloutSpec.model_validate_json(spec),
                    state_from_json(state),
                    bool(active),
                    float(created),
                    float(updated),
                    int(version),
                )
            for rollout, step, cohort, data in cur.all(
                "SELECT rollout, step, cohort, data FROM pc_observations"
            ):
                snap.observations[(rollout, int(step), cohort)] = obs_from_dict(json.loads(data))
        return snap

    def put_group(self, group: GroupRecord) -> None:
        with self._tx() as cur:
            cur.run(
                "INSERT INTO pc_groups (key, transport, topic, group_id, units) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET units = excluded.units",
                (group.key, group.transport, group.topic, group.group_id, group.units),
            )

    def put_member(self, member: MemberRecord) -> None:
        with self._tx() as cur:
            cur.run(
                "INSERT INTO pc_members (member_id, group_key, cohort, version, registered_at, "
                "leaving, meta) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (member_id) DO UPDATE "
                "SET group_key = excluded.group_key, cohort = excluded.cohort, "
                "version = excluded.version, registered_at = excluded.registered_at, "
                "leaving = excluded.leaving, meta = excluded.meta",
                (
                    member.member_id,
                    member.group_key,
                    member.cohort,
                    member.version,
                    member.registered_at,
                    int(member.leaving),
                    json.dumps(member.meta),
                ),
            )

    def delete_member(self, member_id: str) -> None:
        with self._tx() as cur:
            cur.run("DELETE FROM pc_members WHERE member_id = ?", (member_id,))

    def put_units(self, group_key: str, units: Iterable[UnitState]) -> None:
        rows = [unit_to_row(u) for u in units]
        if not rows:
            return
        with self._tx() as cur:
            cur.many(
                "INSERT INTO pc_units (group_key, unit, owner, epoch, status, next_offset, "
                "move_started_at, graceful) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (group_key, unit) DO UPDATE SET owner = excluded.owner, "
                "epoch = excluded.epoch, status = excluded.status, "
                "next_offset = excluded.next_offset, move_started_at = excluded.move_started_at, "
                "graceful = excluded.graceful",
                [
                    (
                        group_key,
                        r["unit"],
                        r["owner"],
                        r["epoch"],
                        r["status"],
                        r["next_offset"],
                        r["move_started_at"],
                        int(r["graceful"]),
                    )
                    for r in rows
                ],
            )

    def create_rollout(self, rollout: RolloutRecord) -> RolloutRecord:
        stored = replace(rollout, version=1)
        try:
            with self._tx() as cur:
                if cur.all("SELECT 1 FROM pc_rollouts WHERE name = ?", (rollout.name,)):
                    raise _exists(rollout.name)
                cur.run(
                    "INSERT INTO pc_rollouts (name, group_key, spec, state, active, created_at, "
                    "updated_at, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    self._rollout_row(stored),
                )
        except self._integrity:
            busy = [
                r
                for r in self.load().rollouts.values()
                if r.active and r.group_key == rollout.group_key
            ]
            raise _busy(rollout, busy[0].name if busy else "?") from None
        return stored

    @staticmethod
    def _rollout_row(r: RolloutRecord) -> tuple[Any, ...]:
        return (
            r.name,
            r.group_key,
            r.spec.model_dump_json(),
            state_to_json(r.state),
            int(r.active),
            r.created_at,
            r.updated_at,
            r.version,
        )

    def update_rollout(self, rollout: RolloutRecord) -> RolloutRecord:
        stored = replace(rollout, version=rollout.version + 1)
        with self._tx() as cur:
            n = cur.run(
                "UPDATE pc_rollouts SET state = ?, active = ?, updated_at = ?, version = ? "
                "WHERE name = ? AND version = ?",
                (
                    state_to_json(stored.state),
                    int(stored.active),
                    stored.updated_at,
                    stored.version,
                    stored.name,
                    rollout.version,
                ),
            )
            if n != 1:
                raise VersionConflict(
                    f"rollout {rollout.name!r} changed since it was read", rollout=rollout.name
                )
        return stored

    def append_decision(self, decision: Decision) -> None:
        with self._tx() as cur:
            cur.run(
                "INSERT INTO pc_decisions (rollout, at, kind, reason, data) VALUES (?, ?, ?, ?, ?)",
                (
                    decision.rollout,
                    decision.at,
                    decision.kind,
                    decision.reason,
                    json.dumps(decision.data),
                ),
            )

    def decisions(self, rollout: str, limit: int = 100) -> list[Decision]:
        # In the order they were taken (as the twin keeps them), whatever their timestamps.
        seq = "seq" if self._pg else "rowid"
        with self._tx() as cur:
            rows = cur.all(
                "SELECT rollout, at, kind, reason, data FROM pc_decisions WHERE rollout = ? "
                f"ORDER BY {seq} DESC LIMIT ?",
                (rollout, limit),
            )
        return [Decision(r, float(a), k, why, json.loads(d)) for r, a, k, why, d in reversed(rows)]

    def put_observations(
        self, rollout: str, step: int, cohort: str, obs: CohortObservations
    ) -> None:
        with self._tx() as cur:
            cur.run(
                "INSERT INTO pc_observations (rollout, step, cohort, data) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (rollout, step, cohort) DO UPDATE SET data = excluded.data",
                (rollout, step, cohort, json.dumps(obs_to_dict(obs))),
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _Cursor:
    """A DB-API cursor that rewrites placeholders for the dialect."""

    def __init__(self, cur: Any, sql: Any) -> None:
        self._cur, self._sql = cur, sql

    def execute(self, stmt: str) -> None:
        self._cur.execute(stmt)

    def run(self, stmt: str, params: tuple[Any, ...] = ()) -> int:
        self._cur.execute(self._sql(stmt), params)
        return int(self._cur.rowcount)

    def many(self, stmt: str, rows: list[tuple[Any, ...]]) -> None:
        self._cur.executemany(self._sql(stmt), rows)

    def all(self, stmt: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        self._cur.execute(self._sql(stmt), params)
        return list(self._cur.fetchall())


def open_store(url: str) -> Store:
    """The store for ``url``: memory://, sqlite:///PATH or postgresql://..."""
    if url in ("memory://", "memory:"):
        return MemoryStore()
    return SqlStore(url)
