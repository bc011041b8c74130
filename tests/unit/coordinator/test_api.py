"""The HTTP API: status codes, clear errors for bad input, and the wire format of members.

FastAPI's TestClient on a coordinator with a MemoryStore and a MemoryBroker; the background
threads are not started (``manage_lifecycle=False``): tests call ``tick()`` themselves.
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
from pubsub_canary.coordinator.service import Coordinator
from pubsub_canary.coordinator.store import MemoryStore

from .test_service import KEY, UNITS, FakeClock

GROUP_LABEL = f'group="{KEY}"'


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
    app = create_app(coord, manage_lifecycle=False)
    # Errors the app does not turn into a response show up as 500s, as a real client sees them.
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    assert coord._threads == []  # manage_lifecycle=False: nothing was started


def rollout(name: str = "r1", **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name,
        "target": {"topic": "orders", "group": "billing"},
        "canary_version": "v2",
        "steps": [{"share": 25, "hold_seconds": 3600}, {"share": 100}],
        "slo": {"max_error_rate": 0.05},
    }
    doc.update(overrides)
    return doc


def register(client: TestClient, mid: str, cohort: str = "stable") -> dict[str, Any]:
    r = client.post(
        "/v1/members",
        json={
            "topic": "orders",
            "group_id": "billing",
            "units": UNITS,
            "cohort": cohort,
            "version": "v1" if cohort == "stable" else "v2",
            "member_id": mid,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()


def heartbeat(client: TestClient, mid: str, **body: Any) -> dict[str, Any]:
    r = client.post(f"/v1/members/{mid}/heartbeat", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def settle(client: TestClient, coord: Coordinator, members: list[str]) -> None:
    """Members release what they are asked to give up, over HTTP, until nothing moves."""
    for _ in range(10):
        moved = False
        for mid in members:
            revoking = [u for u in heartbeat(client, mid)["units"] if u["status"] == "revoking"]
            if revoking:
                moved = True
                r = client.post(
                    f"/v1/members/{mid}/release",
                    json={"released": [[u["unit"], u["epoch"], 100 + u["unit"]] for u in revoking]},
                )
                assert r.status_code == 200, r.text
        coord.tick()
        if not moved:
            return
    raise AssertionError("the group did not settle")


@pytest.fixture
def running(client: TestClient, coord: Coordinator) -> TestClient:
    """Two stable members, one canary, rollout r1 at 25%, settled."""
    for mid, cohort in (("s1", "stable"), ("s2", "stable"), ("c1", "canary")):
        register(client, mid, cohort)
    settle(client, coord, ["s1", "s2", "c1"])
    r = client.post("/v1/rollouts", json=rollout())
    assert r.status_code == 201, r.text
    settle(client, coord, ["s1", "s2", "c1"])
    return client


def assert_untouched(client: TestClient, before: dict[str, Any]) -> None:
    after = client.get("/v1/rollouts/r1").json()
    keys = ("phase", "step", "share", "active", "updated_at", "decisions", "units")
    assert {k: after[k] for k in keys} == {k: before[k] for k in keys}


def assert_error(r: Any, status: int, *needles: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error", "message"}, body
    for needle in needles:
        assert needle in body["message"], body["message"]
    assert "Traceback" not in r.text
    return body


# --- ops --------------------------------------------------------------------------------------


def test_openapi_document_lists_member_and_rollout_paths(client: TestClient) -> None:
    r = client.get("/openapi.json")

    assert r.status_code == 200
    doc = r.json()
    assert doc["info"]["title"] == "pubsub-canary coordinator"
    paths = doc["paths"]
    for path, method in [
        ("/v1/members", "post"),
        ("/v1/members/{member_id}/heartbeat", "post"),
        ("/v1/members/{member_id}/release", "post"),
        ("/v1/members/{member_id}/leave", "post"),
        ("/v1/rollouts", "post"),
        ("/v1/rollouts", "get"),
        ("/v1/rollouts/{name}", "get"),
        ("/v1/rollouts/{name}/{action}", "post"),
    ]:
        assert method in paths.get(path, {}), f"{method.upper()} {path} missing"
    action = next(
        p
        for p in paths["/v1/rollouts/{name}/{action}"]["post"]["parameters"]
        if p["name"] == "action"
    )
    assert set(action["schema"]["enum"]) == {"approve", "promote", "pause", "resume", "abort"}


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_rollout_schema_is_served(client: TestClient) -> None:
    r = client.get("/v1/schema/rollout")
    assert r.status_code == 200
    assert {"name", "target", "steps"} <= set(r.json()["properties"])


def test_metrics_expose_phase_and_units_of_the_group(running: TestClient) -> None:
    r = running.get("/metrics")

    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()

    def sample(name: str, *labels: str) -> float:
        hits = [ln for ln in lines if ln.startswith(name + "{") and all(lb in ln for lb in labels)]
        assert len(hits) == 1, (name, labels, hits)
        return float(hits[0].rsplit(" ", 1)[1])

    assert (
        sample("pubsub_canary_rollout_phase", GROUP_LABEL, 'rollout="r1"', 'phase="progressing"')
        == 1
    )
    assert (
        sample("pubsub_canary_rollout_phase", GROUP_LABEL, 'rollout="r1"', 'phase="promoted"') == 0
    )
    assert sample("pubsub_canary_units", GROUP_LABEL, 'cohort="canary"') == 3
    assert sample("pubsub_canary_units", GROUP_LABEL, 'cohort="stable"') == UNITS - 3
    assert sample("pubsub_canary_rollout_share_ratio", GROUP_LABEL, 'rollout="r1"') == 0.25


# --- rollouts ---------------------------------------------------------------------------------


def test_apply_valid_rollout_is_created(running: TestClient) -> None:
    status = running.get("/v1/rollouts/r1").json()

    assert status["phase"] == "progressing" and status["share"] == 25.0
    assert status["cohorts"]["canary"]["units"] == 3
    listed = running.get("/v1/rollouts").json()
    assert [r["name"] for r in listed] == ["r1"]


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ({"steps": [{"share": 0}]}, ("steps.0.share", "greater than 0")),
        ({"steps": [{"share": 150}]}, ("steps.0.share", "less than or equal to 100")),
        ({"steps": [{"share": 10}, {"share": "lots"}]}, ("steps.1.share", "'lots'")),
        ({"steps": []}, ("steps",)),
        ({"canary_version": None}, ("canary_version",)),
        ({"canary_version": "stable"}, ("equals stable_version",)),
        ({"target": {"topic": "orders"}}, ("target.group", "Field required")),
        ({"surprise": 1}, ("surprise", "Extra inputs")),
        ({"name": "has space"}, ("name",)),
    ],
    ids=[
        "share-0",
        "share-150",
        "share-not-a-number",
        "no-steps",
        "no-canary-version",
        "same-versions",
        "no-group",
        "unknown-field",
        "bad-name",
    ],
)
def test_invalid_rollout_is_422_naming_the_field(
    running: TestClient, change: dict[str, Any], needles: tuple[str, ...]
) -> None:
    before = running.get("/v1/rollouts/r1").json()
    body = rollout("r2") | change

    r = running.post("/v1/rollouts", json=body)

    assert_error(r, 422, *needles)
    assert r.json()["error"] == "ConfigError"
    assert running.get("/v1/rollouts/r2").status_code == 404
    assert_untouched(running, before)


def test_rollout_body_that_is_not_an_object_is_422(running: TestClient) -> None:
    r = running.post("/v1/rollouts", json=[1, 2])
    assert_error(r, 422)
    r = running.post(
        "/v1/rollouts", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_error(r, 422)


def test_rollout_for_a_missing_topic_is_404_naming_it(client: TestClient) -> None:
    r = client.post(
        "/v1/rollouts", json=rollout(target={"topic": "no-such-topic", "group": "billing"})
    )

    body = assert_error(r, 404, "'no-such-topic'")
    assert body["topic"] == "no-such-topic"
    assert client.get("/v1/rollouts").json() == []


def test_second_rollout_on_a_busy_group_is_409(running: TestClient) -> None:
    before = running.get("/v1/rollouts/r1").json()

    r = running.post("/v1/rollouts", json=rollout("r2"))

    assert_error(r, 409, "'r1'", "already has an active rollout")
    assert running.get("/v1/rollouts/r2").status_code == 404
    assert_untouched(running, before)


def test_reusing_a_rollout_name_is_409(running: TestClient) -> None:
    r = running.post("/v1/rollouts", json=rollout("r1", target={"topic": "orders", "group": "x"}))
    assert_error(r, 409, "'r1'")


def test_approve_without_a_pending_gate_is_409(running: TestClient) -> None:
    before = running.get("/v1/rollouts/r1").json()

    r = running.post("/v1/rollouts/r1/approve")

    body = assert_error(r, 409, "no approval gate")
    assert body["error"] == "TransitionError" and body["phase"] == "progressing"
    assert_untouched(running, before)


def test_unknown_rollout_is_404(running: TestClient) -> None:
    assert_error(running.get("/v1/rollouts/ghost"), 404, "'ghost'")
    assert_error(running.post("/v1/rollouts/ghost/pause"), 404, "'ghost'")


def test_unknown_action_is_422(running: TestClient) -> None:
    before = running.get("/v1/rollouts/r1").json()

    r = running.post("/v1/rollouts/r1/explode")

    assert_error(r, 422, "action", "approve")
    assert_untouched(running, before)


def test_pause_and_resume_over_http(running: TestClient) -> None:
    r = running.post("/v1/rollouts/r1/pause", params={"by": "alice"})
    assert r.status_code == 200 and r.json()["phase"] == "paused"
    assert "alice" in r.json()["reason"]

    assert_error(running.post("/v1/rollouts/r1/pause"), 409)

    r = running.post("/v1/rollouts/r1/resume")
    assert r.status_code == 200 and r.json()["phase"] == "progressing"


def test_regression_reported_over_http_rolls_back(running: TestClient, coord: Coordinator) -> None:
    heartbeat(running, "s1", metrics={"processed": 400, "errors": 2})
    heartbeat(running, "c1", metrics={"processed": 100, "errors": 40, "dead_lettered": 40})

    coord.tick()
    assert running.get("/v1/rollouts/r1").json()["phase"] == "rolling_back"
    settle(running, coord, ["s1", "s2", "c1"])

    status = running.get("/v1/rollouts/r1").json()
    assert status["phase"] == "rolled_back"
    assert status["rollback_seconds"] is not None
    assert status["cohorts"]["canary"]["units"] == 0
    assert heartbeat(running, "c1")["idle"] is True


# --- members ----------------------------------------------------------------------------------


def test_register_and_heartbeat_give_the_view(client: TestClient) -> None:
    reg = register(client, "s1")
    assert reg == {"member_id": "s1", "group": KEY, "lease_seconds": 6.0}

    view = heartbeat(client, "s1")

    assert [u["unit"] for u in view["units"]] == list(range(UNITS))
    assert view["idle"] is False and view["rollout"] is None and view["digest"]


def test_register_without_an_id_gets_one(client: TestClient) -> None:
    r = client.post(
        "/v1/members",
        json={"topic": "orders", "group_id": "b", "units": 2, "cohort": "canary", "version": "v"},
    )
    assert r.status_code == 200
    assert r.json()["member_id"].startswith("canary-")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"units": 0}, "units"),
        ({"cohort": "blue"}, "cohort"),
        ({"topic": ""}, "topic"),
        ({"transport": "mqtt"}, "transport"),
    ],
)
def test_bad_registration_is_422_naming_the_field(
    client: TestClient, coord: Coordinator, change: dict[str, Any], field: str
) -> None:
    body = {"topic": "orders", "group_id": "billing", "units": 4, "cohort": "stable"}
    body |= {"version": "v1", **change}

    r = client.post("/v1/members", json=body)

    assert_error(r, 422, field)
    assert coord.members == {}


def test_heartbeat_from_an_unknown_member_is_410(client: TestClient) -> None:
    r = client.post("/v1/members/ghost/heartbeat", json={})
    body = assert_error(r, 410, "ghost", "register again")
    assert body["error"] == "LeaseExpired"


def test_release_and_leave_from_an_unknown_member_are_410(client: TestClient) -> None:
    assert_error(client.post("/v1/members/ghost/release", json={"released": [[0, 1, 5]]}), 410)
    assert_error(client.post("/v1/members/ghost/leave"), 410)


@pytest.mark.parametrize(
    "metrics",
    [
        {"processed": "many"},
        {"processed": 10, "latency": {"999": 1}},
        {"processed": 10, "kpis": {"reward": 1.5}},
        {"processed": 10, "lag": [[1.0, 2]]},
    ],
    ids=["not-a-number", "latency-bucket-out-of-range", "kpi-not-a-triple", "lag-not-a-triple"],
)
def test_malformed_heartbeat_metrics_are_422_not_500(
    running: TestClient, metrics: dict[str, Any]
) -> None:
    r = running.post("/v1/members/c1/heartbeat", json={"metrics": metrics})

    assert_error(r, 422, "metrics")
    status = running.get("/v1/rollouts/r1").json()
    assert status["cohorts"]["canary"]["step"]["processed"] == 0


def test_release_over_http_regrants_at_the_offset(client: TestClient, coord: Coordinator) -> None:
    register(client, "s1")
    register(client, "s2")
    revoking = [u for u in heartbeat(client, "s1")["units"] if u["status"] == "revoking"]
    assert len(revoking) == UNITS // 2

    r = client.post(
        "/v1/members/s1/release",
        json={"released": [[u["unit"], u["epoch"], 9000] for u in revoking]},
    )

    assert r.status_code == 200
    granted = heartbeat(client, "s2")["units"]
    assert {(u["unit"], u["epoch"], u["offset"]) for u in granted} == {
        (u["unit"], u["epoch"] + 1, 9000) for u in revoking
    }
