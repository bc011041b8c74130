"""The member session's heartbeat loop: how long it long-polls."""

from __future__ import annotations

import threading
import time
from typing import Any

from pubsub_canary.client.session import WARMING_POLL_SECONDS, MemberSession


class ScriptedCoordinator:
    """Answers heartbeats with the units the test sets; records each request's ``wait``."""

    def __init__(self) -> None:
        self.units: list[dict[str, Any]] = []
        self.waits: list[float] = []
        self.lock = threading.Lock()

    def register(self, **request: Any) -> dict[str, Any]:
        return {"member_id": "m1", "lease_seconds": 6.0}

    def heartbeat(self, member_id: str, request: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.waits.append(request["wait"])
            units = list(self.units)
        time.sleep(0.01)  # a long poll that answers quickly, so the test runs fast
        digest = ";".join(f"{u['unit']}:{u['epoch']}:{u['status']}" for u in units)
        return {"units": units, "digest": digest, "lease_seconds": 6.0, "idle": not units}

    def release(self, member_id: str, released: list[tuple[int, int, int | None]]) -> None: ...
    def leave(self, member_id: str) -> None: ...
    def close(self) -> None: ...

    def waits_after(self, units: list[dict[str, Any]], n: int = 3) -> list[float]:
        with self.lock:
            self.units = units
            self.waits.clear()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.waits) > n:
                    return self.waits[1:]  # the first request may predate the change
            time.sleep(0.01)
        raise AssertionError("no heartbeats")


def unit(u: int, status: str) -> dict[str, Any]:
    return {"unit": u, "epoch": 1, "offset": None, "status": status}


def test_warming_units_shorten_the_long_poll_and_nothing_else_does() -> None:
    c = ScriptedCoordinator()
    s = MemberSession(
        c,
        transport_kind="kafka",
        topic="t",
        group_id="g",
        units=4,
        cohort="canary",
        version="2",
        long_poll_seconds=1.0,
    )
    s.start()
    try:
        assert set(c.waits_after([unit(0, "owned")])) == {1.0}
        # Warm-up progress goes out every WARMING_POLL_SECONDS while a move waits for it...
        assert set(c.waits_after([unit(0, "owned"), unit(1, "warming")])) == {WARMING_POLL_SECONDS}
        # ... but a standby (kept warm for a rollback that may never come) waits normally.
        assert set(c.waits_after([unit(0, "owned"), unit(1, "standby")])) == {1.0}
    finally:
        s.stop()
