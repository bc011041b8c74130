"""The coordinator: performs what the pure core decides.

It keeps live state in memory (member leases, long-polling heartbeats, observations) and writes
every durable change through to the :class:`~pubsub_canary.coordinator.store.Store`, so that a
restarted coordinator resumes where it was. A background tick (every ``tick_seconds``) expires
leases, analyses each active rollout's step, plans the assignment and moves units one protocol
step (:func:`~pubsub_canary.core.handoff.reconcile`); a member's release triggers the next step
at once so that handoffs do not wait for the tick.

Clocks: leases use the monotonic clock (never persisted: after a restart every member gets a
fresh full lease, so no unit is reassigned before its holder must have stopped); rollout times
use the wall clock (persisted).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pubsub_canary.coordinator.broker import BrokerPort
from pubsub_canary.coordinator.records import (
    Decision,
    GroupRecord,
    MemberRecord,
    RolloutRecord,
)
from pubsub_canary.coordinator.store import Store
from pubsub_canary.coordinator.views import judgement_dict
from pubsub_canary.core import machine
from pubsub_canary.core.analysis import analyse_step, hold_elapsed
from pubsub_canary.core.compat import FormatSupport, state_format_problems
from pubsub_canary.core.handoff import (
    Grant,
    Released,
    Revoke,
    UnitState,
    apply_release,
    is_settled,
    reconcile,
)
from pubsub_canary.core.machine import Phase, RolloutState
from pubsub_canary.core.model import RolloutSpec
from pubsub_canary.core.observations import (
    Cohort,
    CohortObservations,
    Judgement,
    LagSample,
    Verdict,
)
from pubsub_canary.core.planner import MemberView, plan_assignment
from pubsub_canary.errors import (
    CanaryError,
    ConfigError,
    ConflictError,
    FencedError,
    LeaseExpired,
    NotFound,
)

log = logging.getLogger("pubsub_canary.coordinator")

#: Lag samples kept per cohort and step (at one a second: ten minutes).
MAX_LAG_SAMPLES = 600


class Clock:
    """The coordinator's clocks; tests pass a fake one."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


@dataclass
class LiveMember:
    record: MemberRecord
    lease_expires: float
    positions: dict[int, int] = field(default_factory=dict)
    #: unit -> changelog records this member is still behind on, for units it is warming up.
    warm: dict[int, int] = field(default_factory=dict)


@dataclass
class LiveGroup:
    record: GroupRecord
    units: dict[int, UnitState]
    target: dict[int, str | None] = field(default_factory=dict)
    offsets: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: Totals per cohort since the coordinator started (for status and metrics).
    totals: dict[str, CohortObservations] = field(default_factory=dict)
    #: unit -> the last position a presumed-dead owner reported: the next owner counts the
    #: messages below it as redeliveries (duplicates after a crash are counted, I3).
    redeliver: dict[int, int] = field(default_factory=dict)
    #: (rollout, step, cohort) -> the units its current lag samples were summed over.
    lag_units: dict[tuple[str, int, str], frozenset[int]] = field(default_factory=dict)
    #: (unit, next owner) -> when the move was first planned, for the warm-up timeout.
    warm_since: dict[tuple[int, str], float] = field(default_factory=dict)
    #: unit -> the stable member a rollback would give it to, for units the canary holds or
    #: is about to hold (stateful groups during a rollout): it keeps their state warm.
    standby: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HandoffEvent:
    """A grant, as seen by listeners (metrics, benchmarks)."""

    group: str
    unit: int
    member: str
    epoch: int
    seconds: float | None
    graceful: bool


class Coordinator:
    """The canary coordinator for any number of groups."""

    def __init__(
        self,
        store: Store,
        broker: BrokerPort | None = None,
        *,
        clock: Clock | None = None,
        lease_seconds: float = 6.0,
        margin_seconds: float | None = None,
        tick_seconds: float = 0.1,
        lag_seconds: float = 1.0,
        warm_ready_records: int = 1000,
        warm_timeout_seconds: float = 30.0,
    ) -> None:
        if lease_seconds <= 0:
            raise ConfigError(f"lease_seconds must be > 0, got {lease_seconds}")
        self.store = store
        self.broker = broker
        self.clock = clock or Clock()
        self.lease_seconds = lease_seconds
        #: Extra wait after a lease runs out before its units are reassigned (clock drift,
        #: in-flight commits). Default: a third of the lease, at least 0.5 s.
        self.margin_seconds = (
            margin_seconds if margin_seconds is not None else max(0.5, lease_seconds / 3)
        )
        self.tick_seconds = tick_seconds
        self.lag_seconds = lag_seconds
        #: A stateful next owner is ready when it is this close to the changelog's end ...
        self.warm_ready_records = warm_ready_records
        #: ... or when it has been warming this long (a stuck warm-up must not block a move).
        self.warm_timeout_seconds = warm_timeout_seconds
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._generation = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.groups: dict[str, LiveGroup] = {}
        self.members: dict[str, LiveMember] = {}
        self.rollouts: dict[str, RolloutRecord] = {}
        self.observations: dict[tuple[str, int, str], CohortObservations] = {}
        self.judgements: dict[str, Judgement] = {}
        self._obs_dirty: set[tuple[str, int, str]] = set()
        #: Rollouts that have had a live canary member (in this coordinator's lifetime).
        self._canary_seen: set[str] = set()
        self.handoff_listeners: list[Callable[[HandoffEvent], None]] = []
        #: Pub/Sub groups: route counters of members that left (group -> member -> positions),
        #: and the last route digest per group (a change wakes long-polling members).
        self._pubsub_retired: dict[str, dict[str, dict[int, int]]] = {}
        self._pubsub_digests: dict[str, str] = {}
        self._load()

    # --- lifecycle ----------------------------------------------------------------------------

    def _load(self) -> None:
        snap = self.store.load()
        now = self.clock.monotonic()
        for key, g in snap.groups.items():
            units = snap.units.get(key, {})
            for u in range(g.units):
                units.setdefault(u, UnitState(u))
            self.groups[key] = LiveGroup(g, units)
        for mid, m in snap.members.items():
            # A fresh full lease: the member's own lease ran out at most lease_seconds after
            # its last heartbeat, which was before we stopped.
            self.members[mid] = LiveMember(m, now + self.lease_seconds)
        self.rollouts = dict(snap.rollouts)
        self.observations = dict(snap.observations)
        active = [r.name for r in self.rollouts.values() if r.active]
        if snap.groups:
            log.info(
                "resumed %d group(s), %d member(s), active rollouts: %s",
                len(snap.groups),
                len(snap.members),
                ", ".join(active) or "none",
            )

    def start(self) -> None:
        """Start the background tick and lag threads."""
        self._stop.clear()
        for target, name in ((self._tick_loop, "tick"), (self._lag_loop, "lag")):
            t = threading.Thread(target=target, name=f"coordinator-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        with self._lock:
            self._flush_observations()

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            try:
                self.tick()
            except Exception:  # keep coordinating; the next tick retries
                log.exception("tick failed")

    def _lag_loop(self) -> None:
        while not self._stop.wait(self.lag_seconds):
            try:
                self.sample_lag()
            except CanaryError as exc:
                log.warning("lag sampling failed: %s", exc.message)
            except Exception:
                log.exception("lag sampling failed")

    def _bump(self) -> None:
        self._generation += 1
        self._changed.notify_all()

    # --- members ------------------------------------------------------------------------------

    def register(
        self,
        *,
        transport: str,
        topic: str,
        group_id: str,
        units: int,
        cohort: str,
        version: str,
        member_id: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Register a member (or renew one that lost its lease). Returns its id and lease."""
        try:
            c = Cohort(cohort)
        except ValueError:
            raise ConfigError(
                f"cohort {cohort!r} is not one of stable, canary", field="cohort"
            ) from None
        if units < 1:
            raise ConfigError(f"units must be >= 1, got {units}", field="units")
        key = f"{transport}:{topic}/{group_id}"
        with self._lock:
            group = self._ensure_group(key, transport, topic, group_id, units)
            mid = member_id or f"{c.value}-{uuid.uuid4().hex[:10]}"
            rec = MemberRecord(mid, key, c.value, version, self.clock.wall(), False, meta or {})
            active = self._active_rollout(key)
            if active is not None:
                self._check_state_formats(key, active.spec, extra=rec)
            self.store.put_member(rec)
            self.members[mid] = LiveMember(rec, self.clock.monotonic() + self.lease_seconds)
            self._pubsub_retired.get(key, {}).pop(mid, None)  # it reports its counts again
            log.info("member %s registered: %s %s version %s", mid, key, c.value, version)
            self._reconcile_group(group, self.clock.monotonic())
            return {"member_id": mid, "group": key, "lease_seconds": self.lease_seconds}

    def _ensure_group(
        self, key: str, transport: str, topic: str, group_id: str, units: int
    ) -> LiveGroup:
        g = self.groups.get(key)
        if g is None:
            rec = GroupRecord(key, transport, topic, group_id, units)
            self.store.put_group(rec)
            g = LiveGroup(rec, {u: UnitState(u) for u in range(units)})
            self.store.put_units(key, g.units.values())
            self.groups[key] = g
        elif units > g.record.units:  # partitions were added
            g.record = replace(g.record, units=units)
            self.store.put_group(g.record)
            new = {u: UnitState(u) for u in range(len(g.units), units)}
            g.units.update(new)
            self.store.put_units(key, new.values())
        return g

    def _member(self, member_id: str) -> LiveMember:
        m = self.members.get(member_id)
        if m is None:
            raise LeaseExpired(
                f"member {member_id} is not registered (its lease ran out or the coordinator "
                "forgot it); stop processing and register again",
                member=member_id,
            )
        return m

    def heartbeat(
        self,
        member_id: str,
        *,
        known: str | None = None,
        wait: float = 0.0,
        metrics: CohortObservations | None = None,
        positions: dict[int, int] | None = None,
        released: list[tuple[int, int, int | None]] | None = None,
        warm: dict[int, int] | None = None,
    ) -> dict[str, Any]:
        """Renew the lease, take metric deltas and releases; return the member's instructions.

        With ``wait`` > 0 and ``known`` equal to the current view's digest, the call waits (up
        to ``wait`` seconds) until the view changes: revocations are pushed this way.
        """
        with self._lock:
            m = self._member(member_id)
            now = self.clock.monotonic()
            if m.lease_expires + self.margin_seconds <= now:
                raise LeaseExpired(
                    f"member {member_id}'s lease ran out; register again", member=member_id
                )
            m.lease_expires = now + self.lease_seconds
            if positions:
                m.positions.update(positions)
            if warm is not None:
                m.warm = dict(warm)
            if metrics is not None:
                self._add_metrics(m, metrics)
            if released:
                self._release_locked(member_id, released)
            deadline = now + max(0.0, min(wait, self.lease_seconds / 3))
            view = self._view(m)
            while view["digest"] == known and not self._stop.is_set():
                left = deadline - self.clock.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
                if member_id not in self.members:
                    raise LeaseExpired(f"member {member_id} was removed", member=member_id)
                view = self._view(m)
            return view

    def release(self, member_id: str, released: list[tuple[int, int, int | None]]) -> None:
        """A member stopped these (unit, epoch, next_offset); hand them on at once."""
        with self._lock:
            self._member(member_id)
            self._release_locked(member_id, released)

    def _release_locked(self, member_id: str, released: list[tuple[int, int, int | None]]) -> None:
        m = self.members[member_id]
        g = self.groups[m.record.group_key]
        for unit, epoch, offset in released:
            try:
                g.units = apply_release(g.units, Released(unit, epoch, member_id, offset))
            except FencedError as exc:
                log.warning("%s", exc.message)
                continue
            self.store.put_units(g.record.key, [g.units[unit]])
            log.debug("unit %s released by %s at offset %s", unit, member_id, offset)
        self._reconcile_group(g, self.clock.monotonic())

    def leave(self, member_id: str) -> None:
        """Graceful shutdown: take no new work; the member then releases what it holds."""
        with self._lock:
            m = self._member(member_id)
            m.record = replace(m.record, leaving=True)
            self.store.put_member(m.record)
            log.info("member %s is leaving", member_id)
            self._reconcile_group(self.groups[m.record.group_key], self.clock.monotonic())

    def _view(self, m: LiveMember) -> dict[str, Any]:
        g = self.groups[m.record.group_key]
        units = [
            {
                "unit": u.unit,
                "epoch": u.epoch,
                "offset": u.offset,
                "status": u.status.value,
                "redeliver_until": g.redeliver.get(u.unit) if u.offset is None else None,
            }
            for u in sorted(g.units.values(), key=lambda u: u.unit)
            if u.owner == m.record.member_id
        ]
        if self._stateful(g):
            # Units this member is about to own: it warms their state up from the changelog
            # while the current owner still processes them.
            mid = m.record.member_id
            units += [
                {"unit": u, "epoch": st.epoch, "offset": None, "status": "warming"}
                for u, st in sorted(g.units.items())
                if g.target.get(u) == mid and st.owner not in (None, mid)
            ]
            # Units the canary holds that this member would get back on a rollback: it keeps
            # their state warm too, so that a rollback does not restore from the changelog's
            # start while the partition stands still.
            units += [
                {"unit": u, "epoch": g.units[u].epoch, "offset": None, "status": "standby"}
                for u, owner in sorted(g.standby.items())
                if owner == mid
            ]
        digest = ";".join(f"{x['unit']}:{x['epoch']}:{x['status']}" for x in units)
        rollout = self._active_rollout(g.record.key)
        # Every rollout's migrations, not only the active one's: state the canary wrote stays
        # in the changelog (and must stay readable) after its rollout ended.
        migrations = {
            m.model_dump_json(): m.model_dump()
            for r in self.rollouts.values()
            if r.group_key == g.record.key
            for m in r.spec.state_migrations
        }
        route = self._pubsub_route(g) if g.record.transport == "pubsub" else None
        if route is not None:
            digest = f"{digest}|{route['digest']}"
        return {
            "state_migrations": list(migrations.values()),
            "digest": digest,
            **({"route": route} if route is not None else {}),
            "units": units,
            "lease_seconds": self.lease_seconds,
            "idle": not units,
            "rollout": rollout.name if rollout else None,
        }

    def _add_metrics(self, m: LiveMember, delta: CohortObservations) -> None:
        key = m.record.group_key
        g = self.groups[key]
        cohort = m.record.cohort
        g.totals[cohort] = g.totals.get(cohort, CohortObservations()).merge(delta)
        r = self._active_rollout(key)
        if r is not None and r.state.phase.judged:
            k = (r.name, r.state.step, cohort)
            self.observations[k] = self.observations.get(k, CohortObservations()).merge(delta)
            self._obs_dirty.add(k)

    # --- rollouts -----------------------------------------------------------------------------

    def _active_rollout(self, group_key: str) -> RolloutRecord | None:
        for r in self.rollouts.values():
            if r.active and r.group_key == group_key:
                return r
        return None

    def _share(self, group_key: str) -> float:
        r = self._active_rollout(group_key)
        if r is not None:
            return r.state.share
        done = [x for x in self.rollouts.values() if x.group_key == group_key]
        if done and max(done, key=lambda x: x.updated_at).state.phase is Phase.PROMOTED:
            return 100.0
        return 0.0

    def apply_rollout(self, spec: RolloutSpec) -> dict[str, Any]:
        """Create and start a rollout. Errors leave every running rollout untouched."""
        t = spec.target
        with self._lock:
            if spec.name in self.rollouts:
                raise ConflictError(
                    f"a rollout named {spec.name!r} exists already; choose another name",
                    rollout=spec.name,
                )
            busy = self._active_rollout(t.key)
            if busy is not None:
                raise ConflictError(
                    f"group {t.key} already has an active rollout {busy.name!r} "
                    f"({busy.state.phase.value}); promote or abort it first",
                    rollout=spec.name,
                    group=t.key,
                )
        units = self._units_for(spec)
        with self._lock:
            self._check_state_formats(t.key, spec)
            self._ensure_group(t.key, t.transport.value, t.topic, t.group, units)
            now = self.clock.wall()
            state, effects = machine.transition(RolloutState(), machine.Start(now), spec)
            rec = RolloutRecord(spec.name, t.key, spec, state, True, now, now)
            rec = self.store.create_rollout(rec)
            self.rollouts[spec.name] = rec
            self._record(spec.name, effects, now, state)
            self._reconcile_group(self.groups[t.key], self.clock.monotonic())
            return self.status(spec.name)

    def _check_state_formats(
        self, group_key: str, spec: RolloutSpec, extra: MemberRecord | None = None
    ) -> None:
        """Refuse what would hand state to a version that cannot read it (I4)."""
        records = [m.record for m in self.members.values() if m.record.group_key == group_key]
        if extra is not None:
            records = [r for r in records if r.member_id != extra.member_id] + [extra]
        support = {
            c: [
                f
                for r in records
                if r.cohort == c and not r.leaving
                for f in [FormatSupport.from_meta(r.version, r.meta)]
                if f is not None
            ]
            for c in (Cohort.STABLE.value, Cohort.CANARY.value)
        }
        migrations = [(m.from_format, m.to_format) for m in spec.state_migrations]
        problems = state_format_problems(support["stable"], support["canary"], migrations)
        if problems:
            raise ConflictError(
                f"rollout {spec.name!r} refused before any partition moves: " + "; ".join(problems),
                rollout=spec.name,
                field="state_formats",
            )

    def _units_for(self, spec: RolloutSpec) -> int:
        t = spec.target
        if t.transport.value == "kafka":
            if self.broker is not None:
                n = self.broker.partitions(t.topic)
                if n is None:
                    raise NotFound(
                        f"topic {t.topic!r} does not exist on the broker; create it or fix "
                        "target.topic",
                        field="target.topic",
                        topic=t.topic,
                    )
                return n
            g = self.groups.get(t.key)
            if g is None:
                raise NotFound(
                    f"group {t.key} is unknown and the coordinator has no broker to look the "
                    "topic up; start a member of the group first or run the coordinator "
                    "with --bootstrap-servers",
                    field="target",
                )
            return g.record.units
        g = self.groups.get(t.key)
        if g is None:
            raise NotFound(f"group {t.key} has no registered member yet", field="target")
        return g.record.units

    def act(self, name: str, action: str, *, by: str = "operator") -> dict[str, Any]:
        """An operator action: approve, promote, pause, resume or abort."""
        events: dict[str, Callable[[float], machine.Event]] = {
            "approve": lambda now: machine.Approve(now, by),
            "promote": lambda now: machine.Promote(now, by),
            "pause": lambda now: machine.Pause(now, f"paused by {by}"),
            "resume": lambda now: machine.Resume(now),
            "abort": lambda now: machine.Abort(now, f"aborted by {by}"),
        }
        if action not in events:
            raise ConfigError(
                f"action {action!r} is not one of {', '.join(sorted(events))}", field="action"
            )
        with self._lock:
            r = self._rollout(name)
            self._apply(r, events[action](self.clock.wall()))
            self._reconcile_group(self.groups[r.group_key], self.clock.monotonic())
            return self.status(name)

    def _rollout(self, name: str) -> RolloutRecord:
        r = self.rollouts.get(name)
        if r is None:
            raise NotFound(f"no rollout named {name!r}", rollout=name)
        return r

    def _apply(self, r: RolloutRecord, event: machine.Event) -> RolloutRecord:
        state, effects = machine.transition(r.state, event, r.spec)
        if state == r.state and not effects:
            return r
        now = self.clock.wall()
        nr = replace(r, state=state, active=not state.phase.terminal, updated_at=now)
        nr = self.store.update_rollout(nr)
        self.rollouts[r.name] = nr
        # A verdict that moved the rollout is kept with its evidence, for status and audits.
        evidence = judgement_dict(event.judgement) if isinstance(event, machine.Judged) else None
        self._record(r.name, effects, now, state, evidence)
        if state.phase is not r.state.phase or state.step != r.state.step:
            self._bump()
        return nr

    def _record(
        self,
        rollout: str,
        effects: list[machine.Effect],
        now: float,
        state: RolloutState,
        judgement: dict[str, Any] | None = None,
    ) -> None:
        # Each decision carries where it left the rollout: the share-over-time timeline.
        data: dict[str, Any] = {
            "phase": state.phase.value,
            "step": state.step + 1,
            "share": state.share,
        }
        if judgement is not None:
            data["judgement"] = judgement
        for e in effects:
            if isinstance(e, machine.Decide):
                log.info("rollout %s: %s", rollout, e.reason)
                self.store.append_decision(Decision(rollout, now, e.kind, e.reason, data))

    # --- the tick -----------------------------------------------------------------------------

    def tick(self) -> None:
        """Expire leases, judge active rollouts, move units. Called by the background thread."""
        with self._lock:
            for r in [r for r in self.rollouts.values() if r.active]:
                self._judge(r)
            now = self.clock.monotonic()
            for g in self.groups.values():
                self._reconcile_group(g, now)
            self._expire_members(now)
            self._pubsub_tick()
            self._flush_observations(every=1.0)

    def cohort_observations(
        self, r: RolloutRecord
    ) -> tuple[CohortObservations, CohortObservations]:
        step = r.state.step
        elapsed = self.clock.wall() - (r.state.step_started_at or self.clock.wall())
        obs = []
        for c in (Cohort.STABLE, Cohort.CANARY):
            o = self.observations.get((r.name, step, c.value), CohortObservations())
            obs.append(replace(o, elapsed_seconds=max(0.0, elapsed)))
        return obs[0], obs[1]

    def _judge(self, r: RolloutRecord) -> None:
        if not r.state.phase.judged:
            return
        stable, canary = self.cohort_observations(r)
        now = self.clock.wall()
        held = hold_elapsed(
            r.spec, r.state.step, r.state.step_started_at or now, now, stable, canary
        )
        j = analyse_step(r.spec, r.state.step, stable, canary, held=held)
        if j.verdict is not Verdict.FAIL and not self._canary_alive(r.group_key):
            # A step never passes on the data of a canary that has gone: pause for a person
            # if one was here in this rollout, otherwise wait for the first to register.
            if r.name in self._canary_seen and r.state.phase is Phase.PROGRESSING:
                self._apply(r, machine.CanaryGone(now))
            else:
                self.judgements[r.name] = Judgement(
                    Verdict.CONTINUE, "waiting for a canary member", j.metrics
                )
            return
        self._canary_seen.add(r.name)
        self.judgements[r.name] = j
        if j.verdict is not Verdict.CONTINUE:
            self._apply(r, machine.Judged(now, j))

    def _canary_alive(self, group_key: str) -> bool:
        now = self.clock.monotonic()
        return any(
            m.record.group_key == group_key
            and m.record.cohort == Cohort.CANARY.value
            and m.lease_expires > now
            and not m.record.leaving
            for m in self.members.values()
        )

    def _expire_members(self, now: float) -> None:
        for mid, m in list(self.members.items()):
            if m.lease_expires + self.margin_seconds <= now:
                g = self.groups.get(m.record.group_key)
                if g is not None and any(u.owner == mid for u in g.units.values()):
                    continue  # reclaimed by the reconcile above first
                log.warning("member %s lost its lease; its work was reassigned", mid)
                self._pubsub_retire(m)
                del self.members[mid]
                self.store.delete_member(mid)
                self._bump()

    def _reconcile_group(self, g: LiveGroup, now: float) -> None:
        key = g.record.key
        live = [m for m in self.members.values() if m.record.group_key == key]
        alive = {m.record.member_id for m in live if m.lease_expires + self.margin_seconds > now}
        takers = [
            MemberView(m.record.member_id, Cohort(m.record.cohort))
            for m in live
            if m.lease_expires > now and not m.record.leaving
        ]
        current = {u: s.owner for u, s in g.units.items()}
        for u, owner in current.items():
            if owner is not None and owner not in alive and owner in self.members:
                pos = self.members[owner].positions.get(u)
                if pos is not None:
                    g.redeliver[u] = pos
        g.target = plan_assignment(sorted(g.units), takers, current, self._share(key))
        r = self._active_rollout(key)
        # Stateful groups move state warm, except on a rollback, which never waits.
        warm = self._stateful(g) and not (r is not None and r.state.phase is Phase.ROLLING_BACK)
        standby = self._standby(g, takers, current) if warm and r is not None else {}
        if standby != g.standby:
            g.standby = standby
            self._bump()
        gate = self._warm_gate(g, now) if warm else None
        units, changes = reconcile(g.units, g.target, alive, self.clock.wall(), gate)
        if changes:
            g.units = units
            self.store.put_units(key, [units[c.unit] for c in changes])
            for c in changes:
                if isinstance(c, Grant):
                    log.debug(
                        "grant unit %s to %s (epoch %s, offset %s)",
                        c.unit,
                        c.member,
                        c.epoch,
                        c.offset,
                    )
                    ev = HandoffEvent(key, c.unit, c.member, c.epoch, c.handoff_seconds, c.graceful)
                    for listener in self.handoff_listeners:
                        listener(ev)
                elif isinstance(c, Revoke):
                    log.debug("revoke unit %s from %s (epoch %s)", c.unit, c.member, c.epoch)
            self._bump()
        settling = r is not None and r.state.phase in (Phase.PROMOTING, Phase.ROLLING_BACK)
        if settling and is_settled(g.units, g.target) and self._settled_for_share(g, r.state.share):
            assert r is not None
            self._apply(r, machine.HandoffsDone(self.clock.wall()))

    def _stateful(self, g: LiveGroup) -> bool:
        return any(
            m.record.group_key == g.record.key and "state_formats" in m.record.meta
            for m in self.members.values()
        )

    def _standby(
        self, g: LiveGroup, takers: list[MemberView], current: dict[int, str | None]
    ) -> dict[int, str]:
        """Who would get each canary unit back if the rollout were rolled back now.

        The same planner at share 0 decides it, so the standby is the member the rollback will
        really grant the unit to (as long as the members stay the same). A member that owns
        the unit, or is about to, is no standby for it.
        """
        canary = {v.member_id for v in takers if v.cohort is Cohort.CANARY}
        if not canary:
            return {}
        back = plan_assignment(sorted(g.units), takers, current, 0.0)
        return {
            u: owner
            for u, owner in back.items()
            if owner is not None
            and owner not in (current.get(u), g.target.get(u))
            and (current.get(u) in canary or g.target.get(u) in canary)
        }

    def _warm_gate(self, g: LiveGroup, now: float) -> Callable[[int, str], bool]:
        """For stateful groups: revoke a unit only once its next owner has warmed up.

        Not used on a rollback, which never waits: the canary is stopped at once, and the
        stable member it goes back to has kept it warm as its standby.
        """

        def ready(unit: int, next_owner: str) -> bool:
            m = self.members.get(next_owner)
            if m is None or "state_formats" not in m.record.meta:
                return True
            since = g.warm_since.setdefault((unit, next_owner), now)
            behind = m.warm.get(unit)
            if (behind is not None and behind <= self.warm_ready_records) or (
                now - since >= self.warm_timeout_seconds
            ):
                g.warm_since.pop((unit, next_owner), None)
                return True
            return False

        return ready

    def _settled_for_share(self, g: LiveGroup, share: float) -> bool:
        """The share is really in place: no unit is left with the cohort that should have none."""
        cohort_of = {mid: m.record.cohort for mid, m in self.members.items()}
        owners = {cohort_of.get(u.owner or "") for u in g.units.values()}
        if share <= 0:
            return Cohort.CANARY.value not in owners and None not in owners
        if share >= 100:
            return Cohort.STABLE.value not in owners and None not in owners
        return True

    def _flush_observations(self, every: float = 0.0) -> None:
        now = self.clock.monotonic()
        if every and now - getattr(self, "_last_flush", 0.0) < every:
            return
        self._last_flush = now
        for k in list(self._obs_dirty):
            self.store.put_observations(k[0], k[1], k[2], self.observations[k])
        self._obs_dirty.clear()

    def sample_lag(self) -> None:
        """Read committed offsets and watermarks; add a lag sample per cohort of each rollout."""
        self._sample_pubsub_lag()
        if self.broker is None:
            return
        with self._lock:
            groups = [(g.record.key, g.record) for g in self.groups.values()]
        for key, rec in groups:
            if rec.transport != "kafka":
                continue
            offsets = self.broker.offsets(rec.topic, rec.group_id, rec.units)
            with self._lock:
                g = self.groups[key]
                g.offsets = offsets
                r = self._active_rollout(key)
                if r is None or not r.state.phase.judged:
                    continue
                cohort_of = {mid: m.record.cohort for mid, m in self.members.items()}
                at = self.clock.wall()
                for c in (Cohort.STABLE, Cohort.CANARY):
                    mine = [u for u, s in g.units.items() if cohort_of.get(s.owner or "") == c]
                    lag = sum(max(0, offsets[u][1] - offsets[u][0]) for u in mine if u in offsets)
                    produced = sum(offsets[u][1] for u in mine if u in offsets)
                    k = (r.name, r.state.step, c.value)
                    o = self.observations.get(k, CohortObservations())
                    # Lag and produced are sums over the cohort's units: samples taken over
                    # another set of units do not compare, so a changed set restarts the window.
                    units_now = frozenset(mine)
                    previous = o.lag if g.lag_units.get(k) == units_now else ()
                    g.lag_units[k] = units_now
                    samples = (*previous, LagSample(at, lag, produced))[-MAX_LAG_SAMPLES:]
                    self.observations[k] = replace(o, lag=samples)
                    self._obs_dirty.add(k)

    # --- Pub/Sub groups -----------------------------------------------------------------------
    # Buckets are shared by a cohort, not owned by a member: every Pub/Sub member gets the
    # group-wide route (client/routing.py, docs/pubsub.md). Members report route counters and
    # the age of their oldest unprocessed message in ``positions`` under negative keys.

    def _pubsub_route(self, g: LiveGroup) -> dict[str, Any]:
        from pubsub_canary.client.routing import MemberRoute, route_view

        key = g.record.key
        now = self.clock.monotonic()
        cohort_of = {mid: m.record.cohort for mid, m in self.members.items()}
        rollouts = [r for r in self.rollouts.values() if r.group_key == key]
        latest = max(rollouts, key=lambda r: r.created_at, default=None)
        return route_view(
            buckets=g.record.units,
            generation=latest.name if latest is not None else None,
            target_cohort={u: cohort_of.get(t or "") for u, t in g.target.items()},
            owner_cohort={u: cohort_of.get(s.owner or "") for u, s in g.units.items()},
            members=[
                MemberRoute(
                    mid,
                    m.record.cohort,
                    m.lease_expires + self.margin_seconds > now,
                    m.positions,
                    m.record.leaving,
                )
                for mid, m in self.members.items()
                if m.record.group_key == key
            ],
            retired=self._pubsub_retired.get(key, {}).values(),
        )

    def _pubsub_retire(self, m: LiveMember) -> None:
        if m.record.group_key.startswith("pubsub:"):
            counts = {k: v for k, v in m.positions.items() if k < 0}
            self._pubsub_retired.setdefault(m.record.group_key, {})[m.record.member_id] = counts

    def _pubsub_tick(self) -> None:
        """Wake members when a route changed through counters alone (a drain completed)."""
        for g in self.groups.values():
            if g.record.transport == "pubsub":
                digest = str(self._pubsub_route(g)["digest"])
                if self._pubsub_digests.get(g.record.key, digest) != digest:
                    self._bump()
                self._pubsub_digests[g.record.key] = digest

    def _sample_pubsub_lag(self) -> None:
        """Per cohort, the age of the oldest unprocessed message its live members hold.

        ``lag`` is that age in milliseconds and ``produced`` the sample's time in
        milliseconds, so the judge's lag growth reads as how fast the oldest message ages
        relative to the clock: 0 for a cohort that keeps up, 1 for one that processes nothing.
        """
        from pubsub_canary.client.routing import POSITION_AGE_MS

        with self._lock:
            now = self.clock.monotonic()
            at = self.clock.wall()
            for key, g in self.groups.items():
                r = self._active_rollout(key)
                if g.record.transport != "pubsub" or r is None or not r.state.phase.judged:
                    continue
                for c in (Cohort.STABLE, Cohort.CANARY):
                    ages = [
                        m.positions.get(POSITION_AGE_MS, 0)
                        for m in self.members.values()
                        if m.record.group_key == key
                        and m.record.cohort == c.value
                        and m.lease_expires > now
                    ]
                    if not ages:
                        continue
                    k = (r.name, r.state.step, c.value)
                    o = self.observations.get(k, CohortObservations())
                    sample = LagSample(at, max(ages), int(at * 1000))
                    self.observations[k] = replace(o, lag=(*o.lag, sample)[-MAX_LAG_SAMPLES:])
                    self._obs_dirty.add(k)

    # --- reads --------------------------------------------------------------------------------

    def list_rollouts(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                self._summary(r) for r in sorted(self.rollouts.values(), key=lambda r: r.created_at)
            ]

    def _summary(self, r: RolloutRecord) -> dict[str, Any]:
        s = r.state
        return {
            "name": r.name,
            "group": r.group_key,
            "phase": s.phase.value,
            "step": s.step + 1,
            "steps": len(r.spec.steps),
            "share": s.share,
            "active": r.active,
            "stable_version": r.spec.stable_version,
            "canary_version": r.spec.canary_version,
            "reason": s.reason,
            "created_at": r.created_at,
            "updated_at": r.updated_at,
            "rollback_seconds": (
                s.rollback_finished_at - s.rollback_started_at
                if s.rollback_finished_at is not None and s.rollback_started_at is not None
                else None
            ),
            "rollback_started_at": s.rollback_started_at,
            "rollback_finished_at": s.rollback_finished_at,
        }

    def status(self, name: str) -> dict[str, Any]:
        """Everything an operator needs about one rollout."""
        from pubsub_canary.coordinator.views import rollout_status

        with self._lock:
            r = self._rollout(name)
            return rollout_status(self, r)
