"""Benchmark: partition handoff latency, rollback time, and Kafka's own rebalance beside them.

One run on one broker (the embedded test broker unless ``--bootstrap-servers`` is given):

1. **Our handoffs.** The coordinator (FastAPI app under uvicorn in a thread of this process,
   SQLite store) and ``--stable`` + ``--canary`` member processes (KafkaMember over
   HttpTransport, the real control plane), on a ``--partitions`` topic that a producer process
   fills at ``--rate-per-partition`` messages/s per partition. Each cycle applies a rollout
   25% (approval gate) -> approve -> 50% (approval gate) -> abort, so units move stable ->
   canary -> stable. A handoff's latency runs from the coordinator's decision to move the unit
   (the revoke: the unit's ``move_started_at``, wall clock) to the new owner's first processed
   message of that partition (from its ledger, wall clock, same machine).
2. **Rollback of a 50% share.** Each cycle's abort: from the decision (the rollout's
   ``rollback_started_at``) to the moment stable processed its first message of every
   partition the canary held; also to the coordinator's "settled" (``rollback_finished_at``).
3. **Member leave / join under the coordinator.** A stable member gets SIGTERM (graceful
   leave); then a new stable member starts. Time until every moved partition has its first
   message processed by its new owner.
4. **Kafka's own rebalance.** Plain confluent-kafka ``subscribe()`` consumers (threads, same
   handler, same topic, their own group.id) with ``session.timeout.ms`` 6000 and (unless
   ``--quick``) the default 45000: one closes gracefully (leave), then one subscribes (join).

Steps 1-3 run once per ``--fetch-wait-max-ms`` value (members' ``fetch.wait.max.ms``; by
default librdkafka's own, then 10 ms), each with a fresh coordinator and group on the same
topic: the test broker does not answer a waiting fetch when data arrives, so a consumer sees
up to ``fetch.wait.max.ms`` of delivery delay there that a real broker does not add. The run
has no randomness (no ``--seed``).

Prints figures as it goes (stderr: progress), then with ``--json`` one JSON object as the last
line of stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common as C

TARGET_HANDOFF_P99_MS = 500.0
TARGET_ROLLBACK_S = 2.0


@dataclass
class GrantRecord:
    phase: str
    unit: int
    member: str
    epoch: int
    offset: int | None
    decided_at: float | None  # wall clock: the revoke that started this move
    granted_at: float
    graceful: bool


class GrantRecorder:
    """A coordinator handoff listener: every grant, tagged with the benchmark's phase."""

    def __init__(self, coordinator: Any) -> None:
        self.c = coordinator
        self.phase = "startup"
        self.grants: list[GrantRecord] = []
        self._lock = threading.Lock()
        coordinator.handoff_listeners.append(self._on_grant)

    def _on_grant(self, ev: Any) -> None:
        # Called under the coordinator's lock, right after the grant: the unit's state holds
        # the offset the new owner starts at.
        now = time.time()
        st = self.c.groups[ev.group].units[ev.unit]
        with self._lock:
            self.grants.append(
                GrantRecord(
                    self.phase,
                    ev.unit,
                    ev.member,
                    ev.epoch,
                    st.offset,
                    now - ev.seconds if ev.seconds is not None else None,
                    now,
                    ev.graceful,
                )
            )

    def of(self, phase: str) -> list[GrantRecord]:
        with self._lock:
            return [g for g in self.grants if g.phase == phase]


class Members:
    """Member processes and their ledgers."""

    def __init__(self, workdir: Path, url: str, bootstrap: str, topic: str, group: str) -> None:
        self.workdir = workdir
        self.common = [
            "--coordinator",
            url,
            "--bootstrap-servers",
            bootstrap,
            "--topic",
            topic,
            "--group",
            group,
        ]
        self.consumer_config: dict[str, Any] = {}
        self.trace = False
        self.procs: dict[str, Any] = {}
        self._ledgers: dict[str, dict[tuple[int, int], float]] = {}

    def start(self, member_id: str, cohort: str) -> None:
        version = "1.0.0" if cohort == "stable" else "1.1.0"
        self.procs[member_id] = C.spawn_worker(
            [
                "member",
                *self.common,
                "--cohort",
                cohort,
                "--version",
                version,
                "--member-id",
                member_id,
                "--ledger",
                str(self.ledger_path(member_id)),
                *(
                    ["--consumer-config", json.dumps(self.consumer_config)]
                    if self.consumer_config
                    else []
                ),
                *(["--trace"] if self.trace else []),
            ],
            self.workdir / f"member-{member_id}.log",
        )

    def ledger_path(self, member_id: str) -> Path:
        return self.workdir / f"ledger-{member_id}.txt"

    def started_at(self, member_id: str) -> float:
        return float(Path(str(self.ledger_path(member_id)) + ".started").read_text())

    def stop(self, member_id: str, timeout: float = 30.0) -> None:
        C.stop_worker(self.procs[member_id], timeout)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(15)
        for mid in self.procs:
            self.stop(mid)

    def check_alive(self) -> None:
        for mid, p in self.procs.items():
            if p.poll() is not None and p.returncode not in (0, -15):
                log = (self.workdir / f"member-{mid}.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"member {mid} exited with {p.returncode}:\n{log}")

    def ledger(self, member_id: str) -> dict[tuple[int, int], float]:
        if member_id not in self._ledgers:
            self._ledgers[member_id] = C.read_ledger(self.ledger_path(member_id))
        return self._ledgers[member_id]


def first_processed(members: Members, g: GrantRecord) -> float | None:
    """When the new owner processed the first message of its grant (None: it never did)."""
    if g.offset is None:
        return None
    return members.ledger(g.member).get((g.unit, g.offset))


# --- our side ---------------------------------------------------------------------------------


def rollout_spec(name: str, topic: str, group: str, shares: list[float]) -> dict[str, Any]:
    off = {"error_rate": None, "dead_letter_rate": None, "latency": None, "lag_growth": None}
    return {
        "name": name,
        "target": {"transport": "kafka", "topic": topic, "group": group},
        "stable_version": "1.0.0",
        "canary_version": "1.1.0",
        # Each step waits for an operator: the benchmark moves the share itself.
        "steps": [{"share": s, "hold_seconds": 0, "approval": True} for s in shares],
        "analysis": off,
    }


class Bench:
    """Our side of the benchmark for one consumer configuration: its own coordinator, members
    and group on the shared topic."""

    def __init__(
        self, args: argparse.Namespace, bootstrap: str, topic: str, workdir: Path, label: str
    ) -> None:
        self.args = args
        self.bootstrap = bootstrap
        self.topic = topic
        self.label = label
        self.workdir = workdir / label
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.group = f"{topic}-{label}"

    def ensure_processing(self, rec: GrantRecorder, phase: str, timeout: float = 20.0) -> None:
        """Wait until the last grant of each unit in ``phase`` was processed past its offset.

        Positions come with the members' heartbeats (about once per long-poll).
        """
        c = rec.c
        last = {g.unit: g for g in rec.of(phase)}  # earlier grants of a unit were superseded

        def done() -> bool:
            with c._lock:
                for g in last.values():
                    m = c.members.get(g.member)
                    pos = m.positions.get(g.unit) if m else None
                    if g.offset is not None and (pos is None or pos <= g.offset):
                        return False
            return True

        C.wait_until(done, timeout, f"the new owners of phase {phase} to process", 0.1)

    def wait_units(self, ops: Any, name: str, canary_units: int, timeout: float = 30.0) -> None:
        def ok() -> bool:
            s = ops.status(name)
            units = s["units"].values()
            owned = all(u["status"] == "owned" for u in units)
            return owned and s["cohorts"]["canary"]["units"] == canary_units

        C.wait_until(ok, timeout, f"{canary_units} canary units of {name}", 0.05)

    def wait_phase(self, ops: Any, name: str, phases: tuple[str, ...], timeout: float = 30.0):
        out: dict[str, Any] = {}

        def ok() -> bool:
            out.update(ops.status(name))
            return out["phase"] in phases

        C.wait_until(ok, timeout, f"rollout {name} to reach {phases}", 0.05)
        return out

    def run(self, consumer_config: dict[str, Any]) -> dict[str, Any]:
        from pubsub_canary.client.operator import OperatorClient
        from pubsub_canary.coordinator.broker import KafkaBroker
        from pubsub_canary.coordinator.service import Coordinator
        from pubsub_canary.coordinator.store import open_store

        a = self.args
        bootstrap = self.bootstrap
        store = open_store(f"sqlite:///{self.workdir / 'coordinator.db'}")
        broker = KafkaBroker(bootstrap)
        coordinator = Coordinator(store, broker, lease_seconds=a.lease_seconds)
        rec = GrantRecorder(coordinator)
        out: dict[str, Any] = {}
        with C.HttpCoordinator(coordinator) as http:
            C.progress(f"coordinator at {http.url} (SQLite store, lease {a.lease_seconds:g} s)")
            members = Members(self.workdir, http.url, bootstrap, self.topic, self.group)
            members.consumer_config = consumer_config
            members.trace = a.trace
            ops = OperatorClient(http.url)
            try:
                out = self._cycles(rec, members, ops, coordinator)
            finally:
                ops.close()
                members.stop_all()
                broker.close()
                store.close()
        # Ledgers are complete once the members have exited.
        figures = self._figures(rec, members, out)
        with open(self.workdir / "grants.jsonl", "w") as f:
            for g in rec.grants:
                first = first_processed(members, g)
                f.write(json.dumps({**vars(g), "first_processed_at": first}) + "\n")
        if a.trace:
            figures["breakdown_ms"] = breakdown(rec.grants, members)
        return figures

    def _cycles(self, rec: GrantRecorder, members: Members, ops: Any, c: Any) -> dict[str, Any]:
        a = self.args
        for i in range(a.stable):
            members.start(f"stable-{i + 1}", "stable")
        for i in range(a.canary):
            members.start(f"canary-{i + 1}", "canary")
        n = a.stable + a.canary
        C.progress(f"started {a.stable} stable + {a.canary} canary member processes")

        def registered() -> bool:
            members.check_alive()
            with c._lock:
                return len(c.members) >= n

        C.wait_until(registered, 60, f"{n} members to register", 0.1)
        self.ensure_processing(rec, "startup", 60)
        time.sleep(a.dwell)
        out: dict[str, Any] = {"rollbacks": [], "cycles": a.cycles}
        from pubsub_canary.core.planner import canary_unit_count

        half = canary_unit_count(a.partitions, 50.0, True)
        quarter = canary_unit_count(a.partitions, 25.0, True)
        for k in range(a.cycles):
            name = f"bench-{k + 1}"
            rec.phase = f"cycle{k}-25"
            ops.apply(rollout_spec(name, self.topic, self.group, [25.0, 50.0]))
            self.wait_units(ops, name, quarter)
            self.ensure_processing(rec, rec.phase)
            self.wait_phase(ops, name, ("awaiting_approval",))
            time.sleep(a.dwell)

            rec.phase = f"cycle{k}-50"
            ops.act(name, "approve")
            self.wait_units(ops, name, half)
            self.ensure_processing(rec, rec.phase)
            self.wait_phase(ops, name, ("awaiting_approval",))
            time.sleep(a.dwell)

            rec.phase = f"cycle{k}-abort"
            s = ops.status(name)
            canary_held = [int(u) for u, v in s["units"].items() if v["cohort"] == "canary"]
            ops.act(name, "abort")
            s = self.wait_phase(ops, name, ("aborted",))
            out["rollbacks"].append(
                {
                    "decided_at": s["rollback_started_at"],
                    "settled_seconds": s["rollback_seconds"],
                    "canary_units": canary_held,
                }
            )
            self.ensure_processing(rec, rec.phase)
            time.sleep(a.dwell)
            C.progress(
                f"cycle {k + 1}/{a.cycles}: 25% -> 50% -> abort; "
                f"{len(rec.of(f'cycle{k}-25')) + len(rec.of(f'cycle{k}-50'))} + "
                f"{len(rec.of(f'cycle{k}-abort'))} handoffs, coordinator settled the rollback "
                f"{s['rollback_seconds']:.3f} s after the decision"
            )
        members.check_alive()

        # A stable member leaves gracefully, then a new one joins.
        rec.phase = "leave"
        leaver = "stable-1"
        out["leave_at"] = time.time()
        members.procs[leaver].send_signal(15)
        members.procs[leaver].wait(30)
        self.ensure_processing(rec, "leave")
        time.sleep(a.dwell)
        rec.phase = "join"
        joiner = f"stable-{a.stable + 1}"
        members.start(joiner, "stable")
        out["joiner"] = joiner
        C.wait_until(lambda: len(rec.of("join")) > 0, 30, "grants to the joining member", 0.05)
        C.wait_until(lambda: _settled(c), 30, "the join to settle", 0.05)
        self.ensure_processing(rec, "join")
        time.sleep(a.dwell)
        rec.phase = "shutdown"
        return out

    def _figures(self, rec: GrantRecorder, members: Members, out: dict[str, Any]) -> dict[str, Any]:
        lat: list[float] = []
        to_grant: list[float] = []  # decision -> grant: revoke, old owner's commit and release
        unmatched = 0
        non_graceful = 0
        for g in rec.grants:
            if not g.phase.startswith("cycle"):  # only the cycles' share changes count
                continue
            if not g.graceful:
                non_graceful += 1
            t = first_processed(members, g)
            if t is None or g.decided_at is None:
                unmatched += 1
                continue
            lat.append((t - g.decided_at) * 1000.0)
            to_grant.append((g.granted_at - g.decided_at) * 1000.0)
        rollbacks = []
        for k, rb in enumerate(out["rollbacks"]):
            grants = {g.unit: g for g in rec.of(f"cycle{k}-abort")}
            firsts = [
                first_processed(members, grants[u]) if u in grants else None
                for u in rb["canary_units"]
            ]
            done = None if any(t is None for t in firsts) else max(firsts)  # type: ignore[type-var]
            rollbacks.append(
                {
                    "units": len(rb["canary_units"]),
                    "to_first_message_seconds": None if done is None else done - rb["decided_at"],
                    "settled_seconds": rb["settled_seconds"],
                }
            )
        leave = [first_processed(members, g) for g in rec.of("leave")]
        join = [first_processed(members, g) for g in rec.of("join")]
        joiner_started = members.started_at(out["joiner"])
        return {
            "handoff_ms": lat,
            "to_grant_ms": to_grant,
            "handoff_unmatched": unmatched,
            "handoff_non_graceful": non_graceful,
            "rollbacks": rollbacks,
            "leave_seconds": (max(leave) - out["leave_at"])  # type: ignore[type-var]
            if leave and None not in leave
            else None,
            "leave_units": len(leave),
            "join_seconds": (max(join) - joiner_started)  # type: ignore[type-var]
            if join and None not in join
            else None,
            "join_units": len(join),
        }


def _settled(c: Any) -> bool:
    from pubsub_canary.core.handoff import is_settled

    with c._lock:
        return all(is_settled(g.units, g.target) for g in c.groups.values())


# --- Kafka's own rebalance: plain subscribe() consumers ------------------------------------------


class SubscribeGroup:
    """Plain ``subscribe()`` consumers in threads, recording when each partition flows again."""

    def __init__(self, bootstrap: str, topic: str, group: str, session_timeout_ms: int) -> None:
        self.config = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "session.timeout.ms": session_timeout_ms,
            # A fresh group starts at the end: only the handoffs matter, not the backlog.
            "auto.offset.reset": "latest",
        }
        self.topic = topic
        self._lock = threading.Lock()
        #: (consumer, partition, assigned_at, first_message_at)
        self.firsts: list[tuple[int, int, float, float]] = []
        self.assignment: dict[int, list[int]] = {}
        self._stop: dict[int, threading.Event] = {}
        self._threads: dict[int, threading.Thread] = {}
        self.closed_at: dict[int, float] = {}

    def start(self, i: int) -> float:
        t0 = time.time()
        self._stop[i] = threading.Event()
        th = threading.Thread(target=self._run, args=(i,), name=f"subscribe-{i}", daemon=True)
        self._threads[i] = th
        th.start()
        return t0

    def leave(self, i: int) -> float:
        """Close consumer ``i`` gracefully (LeaveGroup); returns when that was asked."""
        t0 = time.time()
        self._stop[i].set()
        self._threads[i].join(60)
        return t0

    def stop_all(self) -> None:
        for ev in self._stop.values():
            ev.set()
        for th in self._threads.values():
            th.join(60)

    def _run(self, i: int) -> None:
        from confluent_kafka import Consumer

        c = Consumer(self.config)
        pending: dict[int, float] = {}  # partition -> assigned at, until its first message

        def on_assign(_c: Any, parts: list[Any]) -> None:
            now = time.time()
            with self._lock:
                self.assignment[i] = [p.partition for p in parts]
            for p in parts:
                pending[p.partition] = now

        def on_revoke(_c: Any, parts: list[Any]) -> None:
            with self._lock:
                self.assignment[i] = []
            pending.clear()

        c.subscribe([self.topic], on_assign=on_assign, on_revoke=on_revoke)
        try:
            while not self._stop[i].is_set():
                for m in c.consume(200, 0.05):
                    if m.error() is not None:
                        continue
                    C.work(m.value())
                    p = m.partition()
                    if p in pending:
                        at = pending.pop(p)
                        with self._lock:
                            self.firsts.append((i, p, at, time.time()))
        finally:
            c.close()
            self.closed_at[i] = time.time()

    def flowing_since(
        self, t0: float, parts: list[int], exclude: int | None = None
    ) -> float | None:
        """Latest, over ``parts``, of the first message consumed after an assignment made after
        ``t0`` (by a consumer other than ``exclude``); None while some partition has none."""
        with self._lock:
            firsts = list(self.firsts)
        latest = t0
        for p in parts:
            ts = [f for (i, q, at, f) in firsts if q == p and at >= t0 and i != exclude]
            if not ts:
                return None
            latest = max(latest, min(ts))
        return latest


def run_subscribe(
    bootstrap: str, topic: str, partitions: int, consumers: int, session_ms: int, dwell: float
) -> dict[str, float]:
    g = SubscribeGroup(bootstrap, topic, f"{topic}-subscribe-{session_ms}", session_ms)
    every = list(range(partitions))
    limit = 2 * session_ms / 1000.0 + 60
    try:
        t_start = min(g.start(i) for i in range(consumers))
        C.wait_until(
            lambda: g.flowing_since(t_start, every) is not None, limit, "the group to form", 0.05
        )
        time.sleep(dwell)
        C.progress(f"subscribe() group of {consumers} formed (session.timeout.ms={session_ms})")

        leaver = 0
        with g._lock:
            leaver_parts = list(g.assignment.get(leaver, []))
        t_leave = g.leave(leaver)
        C.wait_until(
            lambda: g.flowing_since(t_leave, every, exclude=leaver) is not None,
            limit,
            "the group to rebalance after a leave",
            0.05,
        )
        moved = g.flowing_since(t_leave, leaver_parts, exclude=leaver)
        all_back = g.flowing_since(t_leave, every, exclude=leaver)
        assert moved is not None and all_back is not None
        time.sleep(dwell)

        joiner = consumers
        t_join = g.start(joiner)

        def joined() -> bool:
            with g._lock:
                mine = list(g.assignment.get(joiner, []))
            return bool(mine) and g.flowing_since(t_join, every) is not None

        C.wait_until(joined, limit, "the group to rebalance after a join", 0.05)
        with g._lock:
            mine = list(g.assignment.get(joiner, []))
        join_first = g.flowing_since(t_join, mine)
        join_all = g.flowing_since(t_join, every)
        assert join_first is not None and join_all is not None
        return {
            "leave_moved_seconds": moved - t_leave,
            "leave_all_flowing_seconds": all_back - t_leave,
            "leave_units": len(leaver_parts),
            "join_seconds": join_first - t_join,
            "join_all_flowing_seconds": join_all - t_join,
            "join_units": len(mine),
        }
    finally:
        g.stop_all()


# --- main ---------------------------------------------------------------------------------------


def breakdown(grants: list[GrantRecord], members: Members) -> dict[str, float]:
    """Medians of each leg of a handoff, from the members' ``--trace`` files (ms).

    The old owner of a grant is the member of the unit's previous grant.
    """
    legs: dict[str, list[float]] = {
        "decision_to_old_owner_view": [],
        "old_owner_view_to_unassigned": [],
        "unassigned_to_grant": [],
        "grant_to_new_owner_view": [],
        "new_owner_view_to_assigned": [],
        "assigned_to_first_message": [],
    }
    traces = {
        mid: C.read_trace(Path(str(members.ledger_path(mid)) + ".trace")) for mid in members.procs
    }
    previous: dict[int, GrantRecord] = {}
    for g in grants:
        old, previous[g.unit] = previous.get(g.unit), g
        first = first_processed(members, g)
        if g.decided_at is None or first is None or old is None or not g.phase.startswith("cycle"):
            continue
        d = g.decided_at
        new_tr, old_tr = traces.get(g.member) or [], traces.get(old.member) or []
        gen0 = next((gen for t, gen, _ in reversed(old_tr) if t < d), None)
        old_seen = next((t for t, gen, _ in old_tr if t >= d and gen != gen0), None)
        unassigned = next((t for t, _, held in old_tr if t >= d and g.unit not in held), None)
        new_seen = next((t for t, _, _ in new_tr if t >= g.granted_at), None)
        assigned = next((t for t, _, held in new_tr if t >= g.granted_at and g.unit in held), None)
        if old_seen is None or unassigned is None or new_seen is None or assigned is None:
            continue
        legs["decision_to_old_owner_view"].append(old_seen - d)
        legs["old_owner_view_to_unassigned"].append(unassigned - old_seen)
        legs["unassigned_to_grant"].append(g.granted_at - unassigned)
        legs["grant_to_new_owner_view"].append(new_seen - g.granted_at)
        legs["new_owner_view_to_assigned"].append(assigned - new_seen)
        legs["assigned_to_first_message"].append(first - assigned)
    return {k: round(C.median(v) * 1000, 1) for k, v in legs.items() if v}


def parse_configs(text: str) -> list[int | None]:
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip()
        out.append(None if part in ("", "default") else int(part))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="benchmarks/kafka_handoff.py",
        description="Handoff latency and rollback time of the coordinator, beside Kafka's own "
        "subscribe() rebalance, measured in one run on one broker.",
    )
    ap.add_argument("--bootstrap-servers", help="use this Kafka instead of the embedded broker")
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--stable", type=int, default=4, help="stable member processes")
    ap.add_argument("--canary", type=int, default=4, help="canary member processes")
    ap.add_argument("--cycles", type=int, default=4, help="25%% -> 50%% -> abort cycles")
    ap.add_argument("--rate-per-partition", type=float, default=50.0, help="messages/s")
    ap.add_argument("--lease-seconds", type=float, default=6.0)
    ap.add_argument(
        "--dwell", type=float, default=1.0, help="seconds to stay at each share and step"
    )
    ap.add_argument(
        "--fetch-wait-max-ms",
        default="default,10",
        help="members' fetch.wait.max.ms, one run of our side per value; 'default' is "
        "librdkafka's (500). The first value gives the headline figures. Default: %(default)s",
    )
    ap.add_argument(
        "--subscribe-session-timeouts-ms",
        default="6000,45000",
        help="session.timeout.ms of the subscribe() baseline, one run per value (45000 is "
        "Kafka's default). Default: %(default)s",
    )
    ap.add_argument(
        "--quick", action="store_true", help="same as --subscribe-session-timeouts-ms 6000"
    )
    ap.add_argument("--skip-subscribe", action="store_true", help="no subscribe() baseline")
    ap.add_argument(
        "--subscribe-consumers", type=int, default=None, help="default: --stable + --canary"
    )
    ap.add_argument("--trace", action="store_true", help="time each leg of a handoff (costs CPU)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--workdir", help="keep ledgers, grants and logs here")
    a = ap.parse_args(argv)
    if a.partitions < 2 or a.stable < 2 or a.canary < 1 or a.cycles < 1:
        ap.error("need --partitions >= 2, --stable >= 2, --canary >= 1, --cycles >= 1")
    configs = parse_configs(a.fetch_wait_max_ms)
    t_run = time.monotonic()
    load_before = C.load_average()
    with contextlib.ExitStack() as stack:
        workdir = C.workdir_with_log(stack, a.workdir)
        backend = stack.enter_context(C.kafka_broker(a.bootstrap_servers))
        bootstrap = backend.bootstrap_servers
        C.progress(f"broker: {backend.description}")
        topic = f"bench-handoff-{time.strftime('%Y%m%d%H%M%S')}"
        backend.create_topic(topic, a.partitions)
        C.wait_for_topic(bootstrap, topic, a.partitions)
        rate = a.rate_per_partition * a.partitions
        producer = C.spawn_worker(
            [
                "producer",
                *("--bootstrap-servers", bootstrap, "--topic", topic),
                *("--partitions", str(a.partitions), "--rate", str(rate)),
            ],
            workdir / "producer.log",
        )
        stack.callback(C.stop_worker, producer)
        C.progress(f"producing {rate:g} msg/s over {a.partitions} partitions of {topic}")
        ours: dict[str, dict[str, Any]] = {}
        for fw in configs:
            label = "fetch-wait-default" if fw is None else f"fetch-wait-{fw}ms"
            config = {} if fw is None else {"fetch.wait.max.ms": fw}
            C.progress(f"our side, members with {config or 'default consumer settings'}")
            ours[label] = Bench(a, bootstrap, topic, workdir, label).run(config)
        theirs: dict[int, dict[str, float]] = {}
        if not a.skip_subscribe:
            n = a.subscribe_consumers or (a.stable + a.canary)
            timeouts = (
                [6000] if a.quick else [int(x) for x in a.subscribe_session_timeouts_ms.split(",")]
            )
            for session_ms in timeouts:
                t = run_subscribe(bootstrap, topic, a.partitions, n, session_ms, a.dwell)
                theirs[session_ms] = t
                C.progress(
                    f"subscribe() with session.timeout.ms={session_ms}: leave "
                    f"{t['leave_moved_seconds']:.2f} s, join {t['join_seconds']:.2f} s"
                )
        desc = backend.description
    loads = f"{load_before} at the start, {C.load_average()} at the end"
    report(a, ours, theirs, desc, time.monotonic() - t_run, loads)
    return 0


def _fmt(x: float | None, unit: str = "s", digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f} {unit}"


def summarise(label: str, r: dict[str, Any], a: argparse.Namespace) -> tuple[list[str], dict]:
    """Text lines and JSON figures of one configuration of our side."""
    lat = r["handoff_ms"]
    p50, p99 = C.percentile(lat, 50), C.percentile(lat, 99)
    rb = [x["to_first_message_seconds"] for x in r["rollbacks"]]
    rb_ok = [x for x in rb if x is not None]
    rb_worst = max(rb_ok) if rb_ok and len(rb_ok) == len(rb) else None
    settled = [x["settled_seconds"] for x in r["rollbacks"] if x["settled_seconds"] is not None]
    to_grant = r["to_grant_ms"]
    lines = [
        f"[{label}] handoff latency (decision -> new owner's first processed message), "
        f"{len(lat)} handoffs in {a.cycles} cycles of 25% -> 50% -> abort:",
        f"  p50 {p50:.1f} ms   p99 {p99:.1f} ms   max {max(lat) if lat else float('nan'):.1f} ms"
        f"   (target p99 <= {TARGET_HANDOFF_P99_MS:g} ms: "
        f"{'met' if p99 <= TARGET_HANDOFF_P99_MS else 'NOT met'})",
        f"  of which decision -> grant (revoke, old owner commits and releases): "
        f"p50 {C.percentile(to_grant, 50):.1f} ms, p99 {C.percentile(to_grant, 99):.1f} ms",
        f"  handoffs without a first message: {r['handoff_unmatched']}, "
        f"not graceful: {r['handoff_non_graceful']}",
        f"[{label}] rollback of 50% ({r['rollbacks'][0]['units']} of {a.partitions} partitions, "
        f"{a.stable + a.canary} members), decision -> stable processed every one:",
        "  " + ", ".join(_fmt(x) for x in rb),
        f"  worst {_fmt(rb_worst)}, median {_fmt(C.median(rb_ok) if rb_ok else None)}"
        f"   (target <= {TARGET_ROLLBACK_S:g} s: "
        f"{'met' if rb_worst is not None and rb_worst <= TARGET_ROLLBACK_S else 'NOT met'})",
        "  decision -> coordinator settled: " + ", ".join(_fmt(x) for x in settled),
        f"[{label}] member leave (SIGTERM -> its {r['leave_units']} partitions processed by "
        f"their new owners): {_fmt(r['leave_seconds'])}",
        f"[{label}] member join (start -> first message on each of its {r['join_units']} "
        f"partitions): {_fmt(r['join_seconds'])}",
    ]
    if "breakdown_ms" in r:
        lines.append(f"[{label}] medians of each leg (ms): {r['breakdown_ms']}")
    figures = {
        "handoff_p50_ms": C.rounded(p50, 1),
        "handoff_p99_ms": C.rounded(p99, 1),
        "handoff_max_ms": C.rounded(max(lat), 1) if lat else None,
        "handoff_count": len(lat),
        "rollback_50pct_seconds": C.rounded(rb_worst),
        "rollback_50pct_median_seconds": C.rounded(C.median(rb_ok)) if rb_ok else None,
        "rollback_settled_seconds": C.rounded(max(settled)) if settled else None,
        "member_leave_seconds": C.rounded(r["leave_seconds"]),
        "member_join_seconds": C.rounded(r["join_seconds"]),
    }
    return lines, figures


def report(
    a: argparse.Namespace,
    ours: dict[str, dict[str, Any]],
    theirs: dict[int, dict[str, float]],
    broker: str,
    runtime: float,
    loads: str,
) -> None:
    lines = [
        f"kafka_handoff  {time.strftime('%Y-%m-%d %H:%M')}  ({runtime:.0f} s)",
        f"machine: {C.machine_description()}; load average {loads}",
        f"broker: {broker}",
        f"setup: {a.partitions} partitions, {a.stable} stable + {a.canary} canary member "
        f"processes (KafkaMember, HttpTransport -> coordinator under uvicorn in the benchmark "
        f"process, SQLite store), {a.rate_per_partition:g} msg/s per partition",
        "",
    ]
    figures: dict[str, Any] = {}
    headline: dict[str, Any] = {}
    for i, (label, r) in enumerate(ours.items()):
        text, f = summarise(label, r, a)
        lines += text
        if i == 0:
            headline = f
            figures.update(f)
        else:
            suffix = label.replace("fetch-wait-", "_fetch_wait_").replace("-", "_")
            figures.update({f"{k}{suffix}": v for k, v in f.items()})
    for ms, t in theirs.items():
        s = f"{ms / 1000:g}"
        lines.append(
            f"subscribe() group of {a.subscribe_consumers or a.stable + a.canary}, "
            f"session.timeout.ms={ms}: leave {t['leave_moved_seconds']:.2f} s (every partition "
            f"flowing again {t['leave_all_flowing_seconds']:.2f} s), join "
            f"{t['join_seconds']:.2f} s (every partition flowing again "
            f"{t['join_all_flowing_seconds']:.2f} s)"
        )
        figures[f"subscribe_leave_seconds_{s}s"] = C.rounded(t["leave_moved_seconds"])
        figures[f"subscribe_join_seconds_{s}s"] = C.rounded(t["join_seconds"])
        ratios = []
        if headline.get("member_leave_seconds") is not None:
            r = headline["member_leave_seconds"] / t["leave_moved_seconds"]
            ratios.append(f"leave {r:.3f}")
            figures[f"leave_ratio_vs_subscribe_{s}s"] = C.rounded(r, 4)
        if headline.get("member_join_seconds") is not None:
            r = headline["member_join_seconds"] / t["join_seconds"]
            ratios.append(f"join {r:.3f}")
            figures[f"join_ratio_vs_subscribe_{s}s"] = C.rounded(r, 4)
        if headline.get("rollback_50pct_seconds") is not None:
            r = headline["rollback_50pct_seconds"] / t["leave_moved_seconds"]
            ratios.append(f"rollback of 50% / their leave {r:.3f}")
        lines.append(f"  ours ({next(iter(ours))}) / theirs: " + ", ".join(ratios))
    figures["runtime_seconds"] = round(runtime, 1)
    print("\n".join(lines), flush=True)
    if a.json:
        C.emit_json(figures)


if __name__ == "__main__":
    raise SystemExit(main())
