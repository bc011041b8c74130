"""The read-only gates for Argo Rollouts (web metric provider) and Flagger (webhooks).

The verdict mapping is a pure function of a rollout's status: a table test. The endpoints run
on the real app (``create_app``) with a MemoryStore and MemoryBroker on a fake clock; the
rollout is driven through the service the way members and operators do, and the gates are
only read.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest

with warnings.catch_warnings():
    # Starlette 1.x wants httpx2 for its TestClient and warns (an error here) on httpx, which
    # is what the project depends on; the client works the same with either.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

from pubsub_canary.coordinator.api import create_app
from pubsub_canary.coordinator.broker import MemoryBroker
from pubsub_canary.coordinator.gates import gate_of
from pubsub_canary.coordinator.service import Coordinator
from pubsub_canary.coordinator.store import MemoryStore
from pubsub_canary.core.model import parse_rollout_spec
from pubsub_canary.core.observations import CohortObservations

from .test_service import KEY, UNITS, FakeClock

MEMBERS = ("s1", "s2", "c1")
HOOKS = ("/v1/gates/flagger/start", "/v1/gates/flagger", "/v1/gates/flagger/promotion")


# --- the verdict, from a status ---------------------------------------------------------------


def status(phase: str, verdict: str | None = None, reason: str = "") -> dict[str, Any]:
    return {
        "name": "r1",
        "group": KEY,
        "phase": phase,
        "step": 2,
        "steps": 3,
        "share": 25.0,
        "reason": reason,
        "judgement": {"verdict": verdict, "reason": f"judged {verdict}"} if verdict else None,
    }


@pytest.mark.parametrize(
    ("phase", "judged", "verdict", "healthy", "promoted", "done"),
    [
        ("pending", None, "none", True, False, False),
        ("progressing", None, "none", True, False, False),
        ("progressing", "continue", "continue", True, False, False),
        ("progressing", "pass", "pass", True, False, False),
        ("progressing", "inconclusive", "inconclusive", True, False, False),
        # The tick that saw the failure has not rolled back yet: already unhealthy.
        ("progressing", "fail", "fail", False, False, False),
        ("awaiting_approval", "pass", "pass", True, False, False),
        ("paused", "continue", "inconclusive", True, False, False),
        ("paused", None, "inconclusive", True, False, False),
        ("paused", "fail", "fail", False, False, False),
        ("promoting", "pass", "pass", True, False, False),
        ("promoted", "pass", "pass", True, True, True),
        ("rolling_back", "fail", "fail", False, False, False),
        ("rolled_back", "fail", "fail", False, False, True),
        # An operator's abort is no failed verdict, but the canary is out: unhealthy.
        ("rolling_back", "continue", "fail", False, False, False),
        ("aborted", None, "fail", False, False, True),
    ],
)
def test_gate_verdict_table(
    phase: str, judged: str | None, verdict: str, healthy: bool, promoted: bool, done: bool
) -> None:
    g = gate_of(status(phase, judged))

    assert (g.verdict, g.healthy, g.promoted, g.done) == (verdict, healthy, promoted, done)
    assert (g.rollout, g.group, g.phase, g.step, g.steps, g.share) == (
        "r1",
        KEY,
        phase,
        2,
        3,
        25.0,
    )
    assert g.reason


def test_gate_reason_prefers_the_rollouts_own_reason() -> None:
    g = gate_of(status("rolled_back", "fail", reason="step 1 failed: error rate 40%"))
    assert g.reason == "step 1 failed: error rate 40%"
    assert gate_of(status("progressing", "continue")).reason == "judged continue"


# --- the endpoints ----------------------------------------------------------------------------


@pytest.fixture
def coord() -> Coordinator:
    return Coordinator(
        MemoryStore(),
        MemoryBroker(topics={"orders": UNITS}),
        clock=FakeClock(),
        lease_seconds=6.0,
        margin_seconds=2.0,
    )


@pytest.fixture
def client(coord: Coordinator) -> Iterator[TestClient]:
    with TestClient(create_app(coord, manage_lifecycle=False), raise_server_exceptions=False) as c:
        yield c


def settle(c: Coordinator) -> None:
    """Members release what they are asked to give up until nothing moves."""
    for _ in range(10):
        moved = False
        for mid in MEMBERS:
            revoking = [u for u in c.heartbeat(mid)["units"] if u["status"] == "revoking"]
            if revoking:
                moved = True
                c.release(mid, [(u["unit"], u["epoch"], 100 + u["unit"]) for u in revoking])
        c.tick()
        if not moved:
            return
    raise AssertionError("the group did not settle")


@pytest.fixture
def running(coord: Coordinator) -> Coordinator:
    """Two stable members, one canary, rollout r1 at 25%, settled."""
    for mid in MEMBERS:
        cohort = "canary" if mid.startswith("c") else "stable"
        coord.register(
            transport="kafka",
            topic="orders",
            group_id="billing",
            units=UNITS,
            cohort=cohort,
            version="v2" if cohort == "canary" else "v1",
            member_id=mid,
        )
    settle(coord)
    spec = {
        "name": "r1",
        "target": {"topic": "orders", "group": "billing"},
        "canary_version": "v2",
        "steps": [{"share": 25, "hold_seconds": 3600}, {"share": 100}],
        "slo": {"max_error_rate": 0.05},
    }
    coord.apply_rollout(parse_rollout_spec(spec))
    settle(coord)
    return coord


def regress(c: Coordinator) -> None:
    """The canary fails 40% of its messages: the next tick rolls back."""
    c.heartbeat("s1", metrics=CohortObservations(processed=400, errors=2))
    c.heartbeat("c1", metrics=CohortObservations(processed=100, errors=40, dead_lettered=40))
    c.tick()


def hook(client: TestClient, path: str, **metadata: str) -> Any:
    body = {
        "name": "orders-consumer",
        "namespace": "orders",
        "phase": "Progressing",
        "checksum": "6d5f8c",
        "metadata": {"rollout": "r1", **metadata},
    }
    return client.post(path, json=body)


def test_argo_gate_of_a_healthy_rollout(client: TestClient, running: Coordinator) -> None:
    r = client.get("/v1/gates/rollouts/r1")

    assert r.status_code == 200, r.text
    body = r.json()
    assert body["healthy"] is True
    assert body["verdict"] in ("none", "continue")
    assert (body["rollout"], body["group"], body["phase"]) == ("r1", KEY, "progressing")
    assert (body["step"], body["steps"], body["share"]) == (1, 2, 25.0)
    assert (body["promoted"], body["done"]) == (False, False)


def test_argo_gate_turns_unhealthy_on_a_regression_and_stays_so(
    client: TestClient, running: Coordinator
) -> None:
    regress(running)
    body = client.get("/v1/gates/rollouts/r1").json()
    assert (body["phase"], body["verdict"], body["healthy"]) == ("rolling_back", "fail", False)
    assert "failed" in body["reason"]

    settle(running)
    body = client.get("/v1/gates/rollouts/r1").json()
    assert (body["phase"], body["healthy"], body["done"]) == ("rolled_back", False, True)


def test_argo_gate_of_an_unknown_rollout_is_404(client: TestClient, running: Coordinator) -> None:
    r = client.get("/v1/gates/rollouts/ghost")
    assert r.status_code == 404
    assert r.json()["error"] == "NotFound" and "'ghost'" in r.json()["message"]


def test_flagger_hooks_while_the_canary_is_healthy(
    client: TestClient, running: Coordinator
) -> None:
    assert hook(client, "/v1/gates/flagger/start").status_code == 200
    go = hook(client, "/v1/gates/flagger")
    assert go.status_code == 200 and go.json()["go"] is True

    wait = hook(client, "/v1/gates/flagger/promotion")
    assert wait.status_code == 412
    assert "waits until the coordinator has promoted" in wait.json()["message"]

    no = hook(client, "/v1/gates/flagger/rollback")
    assert no.status_code == 412 and no.json()["go"] is False


def test_flagger_hooks_after_a_regression(client: TestClient, running: Coordinator) -> None:
    regress(running)
    settle(running)

    halt = hook(client, "/v1/gates/flagger")
    assert halt.status_code == 412
    assert "rolled_back" in halt.json()["message"] and "failed" in halt.json()["message"]
    assert hook(client, "/v1/gates/flagger/promotion").status_code == 412
    # Flagger rolls back when its rollback hook answers 200.
    back = hook(client, "/v1/gates/flagger/rollback")
    assert back.status_code == 200 and "roll back" in back.json()["message"]
    # The start gate keeps answering yes: Flagger runs no other hook while it says no.
    assert hook(client, "/v1/gates/flagger/start").status_code == 200


def test_flagger_promotion_gate_opens_once_promoted(
    client: TestClient, running: Coordinator
) -> None:
    running.act("r1", "promote", by="alice")
    running.tick()
    assert hook(client, "/v1/gates/flagger/promotion").status_code == 412  # still moving

    settle(running)

    r = hook(client, "/v1/gates/flagger/promotion")
    assert r.status_code == 200, r.text
    assert r.json()["promoted"] is True
    assert hook(client, "/v1/gates/flagger").status_code == 200
    assert hook(client, "/v1/gates/flagger/rollback").status_code == 412


def test_flagger_aborted_rollout_is_a_rollback(client: TestClient, running: Coordinator) -> None:
    running.act("r1", "abort", by="alice")
    settle(running)

    assert client.get("/v1/gates/rollouts/r1").json()["phase"] == "aborted"
    assert hook(client, "/v1/gates/flagger").status_code == 412
    assert hook(client, "/v1/gates/flagger/rollback").status_code == 200


def test_flagger_paused_rollout_is_inconclusive_but_not_failed(
    client: TestClient, running: Coordinator
) -> None:
    running.act("r1", "pause", by="alice")

    r = hook(client, "/v1/gates/flagger")
    assert r.status_code == 200
    assert r.json()["verdict"] == "inconclusive" and "alice" in r.json()["reason"]


@pytest.mark.parametrize("path", [*HOOKS, "/v1/gates/flagger/rollback"])
def test_flagger_unknown_rollout_is_404(
    client: TestClient, running: Coordinator, path: str
) -> None:
    r = hook(client, path, rollout="orders-v9")
    assert r.status_code == 404
    assert "'orders-v9'" in r.json()["message"]


def test_flagger_without_metadata_takes_the_canary_name(
    client: TestClient, running: Coordinator
) -> None:
    r = client.post("/v1/gates/flagger", json={"name": "r1", "namespace": "orders"})
    assert r.status_code == 200 and r.json()["rollout"] == "r1"
    r = client.post("/v1/gates/flagger", json={"name": "orders-consumer"})
    assert r.status_code == 404


def test_flagger_payload_without_a_name_is_422(client: TestClient, running: Coordinator) -> None:
    r = client.post("/v1/gates/flagger", json={"namespace": "orders", "metadata": {}})
    assert r.status_code == 422
    assert "name" in r.json()["message"]


def test_gates_change_nothing(client: TestClient, running: Coordinator) -> None:
    def snapshot() -> dict[str, Any]:
        s = running.status("r1")
        return {k: s[k] for k in ("phase", "step", "share", "updated_at", "decisions", "units")}

    before = snapshot()
    client.get("/v1/gates/rollouts/r1")
    for path in (*HOOKS, "/v1/gates/flagger/rollback"):
        hook(client, path)

    assert snapshot() == before


def test_openapi_lists_the_gates(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]

    assert "get" in paths["/v1/gates/rollouts/{name}"]
    for path in (*HOOKS, "/v1/gates/flagger/rollback"):
        assert "post" in paths[path], path
    schema = paths["/v1/gates/rollouts/{name}"]["get"]["responses"]["200"]["content"]
    ref = schema["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    fields = client.get("/openapi.json").json()["components"]["schemas"][ref]["properties"]
    assert {"healthy", "verdict", "phase", "share", "reason"} <= set(fields)


def test_gates_need_no_operator_token(running: Coordinator) -> None:
    app = create_app(running, manage_lifecycle=False, operator_token="s3cret")
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/v1/rollouts/r1/pause").status_code == 401  # actions do
        assert client.get("/v1/gates/rollouts/r1").status_code == 200
        for path in (*HOOKS, "/v1/gates/flagger/rollback"):
            assert hook(client, path).status_code in (200, 412), path
