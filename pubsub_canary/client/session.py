"""A member's session with the coordinator: registration, lease, instructions, metric deltas.

A background thread long-polls the coordinator's heartbeat. The lease deadline is computed from
the moment each heartbeat was *sent* (``t_send + lease``): the coordinator renews from the
moment it *received* it, which is later, and then waits a safety margin more before it may
reassign anything, so the member always stops first (I1). The processing loop asks
:meth:`MemberSession.lease_valid` before every message and commit.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from pubsub_canary.client.transport import CoordinatorTransport
from pubsub_canary.core.observations import CohortObservations
from pubsub_canary.errors import CanaryError, LeaseExpired
from pubsub_canary.wire import obs_to_dict

log = logging.getLogger("pubsub_canary.member")

#: The long poll while a unit is warming up: its progress reaches the coordinator this often,
#: so a move waits for the warm-up itself rather than for the next heartbeat.
WARMING_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class UnitGrant:
    """A unit this member holds (``status`` owned) or must release (``revoking``)."""

    unit: int
    epoch: int
    offset: int | None
    status: str
    #: After a crash of the previous owner: offsets below this were probably processed
    #: already; they are counted as redeliveries.
    redeliver_until: int | None = None


class MemberSession:
    """Registration, lease and the coordinator's view of this member."""

    def __init__(
        self,
        transport: CoordinatorTransport,
        *,
        transport_kind: str,
        topic: str,
        group_id: str,
        units: int,
        cohort: str,
        version: str,
        member_id: str | None = None,
        long_poll_seconds: float = 1.0,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.transport = transport
        self._registration = {
            "transport": transport_kind,
            "topic": topic,
            "group_id": group_id,
            "units": units,
            "cohort": cohort,
            "version": version,
            "member_id": member_id,
            "meta": meta or {},
        }
        self.cohort = cohort
        self.version = version
        self.member_id: str | None = member_id
        self.long_poll_seconds = long_poll_seconds
        self.lease_seconds = 0.0
        self._deadline = 0.0  # monotonic; 0: no lease
        self._lock = threading.Lock()
        self._view: dict[int, UnitGrant] = {}
        self._digest: str | None = None
        self._idle = False
        #: Migrations the active rollout's file declares (stateful members load them).
        self.state_migrations: list[dict[str, Any]] = []
        self.generation = 0  # bumped whenever the view changes
        self._pending = CohortObservations()
        self._positions: dict[int, int] = {}
        self._warm: dict[int, int] = {}  # unit -> changelog records still to read
        #: Releases the coordinator has not acknowledged: resent with every heartbeat.
        self._unacked: list[tuple[int, int, int | None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.changed = threading.Event()

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._register()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name=f"heartbeat-{self.member_id}", daemon=True
        )
        self._thread.start()

    def _register(self) -> None:
        t_send = time.monotonic()
        resp = self.transport.register(**self._registration)
        with self._lock:
            self.member_id = resp["member_id"]
            self._registration["member_id"] = self.member_id
            self.lease_seconds = float(resp["lease_seconds"])
            self._deadline = t_send + self.lease_seconds
        log.info("registered as %s (%s %s)", self.member_id, self.cohort, self.version)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.long_poll_seconds + 6)

    def leave(self) -> None:
        """Ask the coordinator for no more work; it then revokes what this member holds."""
        if self.member_id is not None:
            self.transport.leave(self.member_id)

    # --- the heartbeat loop -------------------------------------------------------------------

    def _loop(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                self.heartbeat_once(wait=self._poll_wait())
                backoff = 0.05
            except LeaseExpired as exc:
                log.warning("%s; registering again", exc.message)
                self._drop_view()
                try:
                    self._register()
                except CanaryError as exc2:
                    log.warning("register failed: %s", exc2.message)
                    self._stop.wait(backoff)
                    backoff = min(1.0, backoff * 2)
            except CanaryError as exc:
                log.warning("heartbeat failed: %s", exc.message)
                self._stop.wait(backoff)
                backoff = min(1.0, backoff * 2)

    def _poll_wait(self) -> float:
        with self._lock:
            warming = any(g.status == "warming" for g in self._view.values())
        return (
            min(self.long_poll_seconds, WARMING_POLL_SECONDS) if warming else self.long_poll_seconds
        )

    def heartbeat_once(self, wait: float = 0.0) -> None:
        assert self.member_id is not None
        with self._lock:
            metrics, self._pending = self._pending, CohortObservations()
            positions = dict(self._positions)
            warm = dict(self._warm)
            unacked = list(self._unacked)
            known = self._digest

        request = {
            "known": known,
            "wait": wait,
            "metrics": obs_to_dict(metrics) if metrics.processed or metrics.kpis else None,
            "positions": positions,
            "warm": warm,
            "released": unacked,
        }
        t_send = time.monotonic()
        try:
            resp = self.transport.heartbeat(self.member_id, request)
        except BaseException:
            with self._lock:  # nothing reported is lost: put the deltas back
                self._pending = metrics.merge(self._pending)
            raise
        view = {
            int(u["unit"]): UnitGrant(
                int(u["unit"]), int(u["epoch"]), u["offset"], u["status"], u.get("redeliver_until")
            )
            for u in resp["units"]
        }
        with self._lock:
            self._unacked = [r for r in self._unacked if r not in unacked]
            self.lease_seconds = float(resp["lease_seconds"])
            self._deadline = t_send + self.lease_seconds
            if resp["digest"] != self._digest:
                self._digest = resp["digest"]
                self._view = view
                self.generation += 1
                self.changed.set()
            self._idle = bool(resp.get("idle"))
            self.state_migrations = list(resp.get("state_migrations") or [])

    def _drop_view(self) -> None:
        with self._lock:
            self._unacked.clear()  # the coordinator took those units back with our lease
            self._deadline = 0.0
            self._view = {}
            self._digest = None
            self.generation += 1
            self.changed.set()

    # --- what the processing loop reads -------------------------------------------------------

    def lease_valid(self) -> bool:
        return time.monotonic() < self._deadline

    def lease_ending(self) -> bool:
        """The lease has under a quarter of its length (at most 1 s) left and was not renewed.

        The processing loop then commits what it processed and stops, while the lease still
        protects the commit, so a member cut off from the coordinator causes no duplicates.
        """
        return time.monotonic() >= self.soft_deadline

    @property
    def soft_deadline(self) -> float:
        """The monotonic time at which :meth:`lease_ending` turns true (read per message)."""
        return self._deadline - min(1.0, self.lease_seconds / 4)

    def view(self) -> dict[int, UnitGrant]:
        with self._lock:
            return dict(self._view)

    @property
    def idle(self) -> bool:
        return self._idle

    def report(self, delta: CohortObservations, positions: dict[int, int]) -> None:
        with self._lock:
            self._pending = self._pending.merge(delta)
            self._positions.update(positions)

    def queue_release(self, released: list[tuple[int, int, int | None]]) -> None:
        """A release that did not get through: send it again with the next heartbeats."""
        with self._lock:
            self._unacked.extend(released)

    def report_warm(self, unit: int, behind: int | None) -> None:
        """How far a unit being warmed up is from the changelog's end (None: not warming)."""
        with self._lock:
            if behind is None:
                self._warm.pop(unit, None)
            else:
                self._warm[unit] = behind

    def release(self, released: list[tuple[int, int, int | None]]) -> None:
        assert self.member_id is not None
        self.transport.release(self.member_id, released)
