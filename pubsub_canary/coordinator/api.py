"""The coordinator's HTTP API (FastAPI), with its OpenAPI document at ``/openapi.json``.

Members: register, heartbeat (long-poll: revocations are pushed as soon as they are decided),
release, leave. Operators: apply a rollout, read status, approve / promote / pause / resume /
abort. This module is also the one place where errors become HTTP status codes: every
:class:`~pubsub_canary.errors.CanaryError` carries its ``http_status``.
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from pubsub_canary.coordinator.gates import gates_router
from pubsub_canary.coordinator.metrics import build_registry
from pubsub_canary.coordinator.service import Coordinator
from pubsub_canary.coordinator.web import add_web_routes
from pubsub_canary.core.model import parse_rollout_spec, rollout_json_schema
from pubsub_canary.core.observations import CohortObservations
from pubsub_canary.errors import CanaryError, ConfigError
from pubsub_canary.wire import obs_from_dict


class RegisterRequest(BaseModel):
    transport: Literal["kafka", "pubsub"] = "kafka"
    topic: str = Field(min_length=1)
    group_id: str = Field(min_length=1)
    units: int = Field(ge=1, description="partitions (Kafka) or buckets (Pub/Sub)")
    cohort: Literal["stable", "canary"]
    version: str = Field(min_length=1)
    member_id: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


class HeartbeatRequest(BaseModel):
    known: str | None = Field(default=None, description="digest of the view the member has")
    wait: float = Field(default=0.0, ge=0, le=30, description="long-poll seconds")
    metrics: dict[str, Any] | None = Field(default=None, description="observation deltas")
    positions: dict[int, int] = Field(default_factory=dict)
    released: list[tuple[int, int, int | None]] = Field(default_factory=list)
    warm: dict[int, int] | None = Field(
        default=None, description="unit -> changelog records still to read, for units warming up"
    )


class ReleaseRequest(BaseModel):
    released: list[tuple[int, int, int | None]]


Action = Literal["approve", "promote", "pause", "resume", "abort"]


class Unauthorized(CanaryError):
    """An operator endpoint was called without the coordinator's operator token, or a wrong one.

    Send ``Authorization: Bearer <token>`` with the token the coordinator was started with.
    """

    http_status = 401


# Module level: the dependency's annotation below is resolved against this module's globals.
_BEARER = HTTPBearer(auto_error=False, description="the coordinator's operator token")


def _operator_guard(token: str | None) -> list[Any]:
    """Dependencies of the mutating operator endpoints: none, or a bearer-token check."""
    if token is None:
        return []
    if not token:
        raise ConfigError("operator_token is empty; pass None to leave operator endpoints open")

    def check(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]) -> None:
        if creds is None:
            raise Unauthorized(
                "this coordinator needs an operator token for this action: "
                "send 'Authorization: Bearer <token>'"
            )
        if not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise Unauthorized("the operator token is wrong; nothing was changed")

    return [Depends(check)]


def _metrics(data: dict[str, Any]) -> CohortObservations:
    """A heartbeat's observation deltas; malformed ones are the member's error, not a 500."""
    try:
        return obs_from_dict(data)
    except (TypeError, ValueError, IndexError, AttributeError) as exc:
        raise ConfigError(
            f"metrics: not valid observation deltas ({type(exc).__name__}: {exc}); expected "
            "counts (processed, errors, dead_lettered, redeliveries), latency {bucket: count}, "
            "kpis {name: [count, sum, sum_sq]} and lag [[at, lag, produced], ...]",
            field="metrics",
        ) from None


def create_app(
    coordinator: Coordinator, *, manage_lifecycle: bool = True, operator_token: str | None = None
) -> FastAPI:
    """The ASGI app for ``coordinator``; starts and stops its background threads.

    With ``operator_token``, applying a rollout and the operator actions need
    ``Authorization: Bearer <operator_token>``; member endpoints and reads stay open.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        import anyio.to_thread

        # Heartbeats long-poll in worker threads; allow many members at once.
        anyio.to_thread.current_default_thread_limiter().total_tokens = 512
        if manage_lifecycle:
            coordinator.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                coordinator.stop()

    app = FastAPI(
        title="pubsub-canary coordinator",
        version="1",
        description="Canary rollouts for Kafka consumer groups and Pub/Sub subscriptions.",
        lifespan=lifespan,
    )
    registry = build_registry(coordinator)
    c = coordinator
    operator = _operator_guard(operator_token)
    app.state.operator_token_required = operator_token is not None

    @app.exception_handler(CanaryError)
    async def canary_error(request: Request, exc: CanaryError) -> JSONResponse:
        challenge = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
        return JSONResponse(status_code=exc.http_status, content=exc.to_dict(), headers=challenge)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse(status_code=422, content={"error": "ConfigError", "message": problems})

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", tags=["ops"])
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/members", tags=["members"])
    def register(req: RegisterRequest) -> dict[str, Any]:
        return c.register(**req.model_dump())

    @app.post("/v1/members/{member_id}/heartbeat", tags=["members"])
    def heartbeat(member_id: str, req: HeartbeatRequest) -> dict[str, Any]:
        return c.heartbeat(
            member_id,
            known=req.known,
            wait=req.wait,
            metrics=_metrics(req.metrics) if req.metrics else None,
            positions=req.positions,
            released=req.released,
            warm=req.warm,
        )

    @app.post("/v1/members/{member_id}/release", tags=["members"])
    def release(member_id: str, req: ReleaseRequest) -> dict[str, str]:
        c.release(member_id, req.released)
        return {"status": "ok"}

    @app.post("/v1/members/{member_id}/leave", tags=["members"])
    def leave(member_id: str) -> dict[str, str]:
        c.leave(member_id)
        return {"status": "ok"}

    @app.get("/v1/rollouts", tags=["rollouts"])
    def list_rollouts() -> list[dict[str, Any]]:
        return c.list_rollouts()

    @app.post("/v1/rollouts", status_code=201, tags=["rollouts"], dependencies=operator)
    def apply(
        spec: Annotated[dict[str, Any], Body(description="a rollout file, as JSON")],
    ) -> Any:
        return c.apply_rollout(parse_rollout_spec(spec))

    @app.get("/v1/rollouts/{name}", tags=["rollouts"])
    def status(name: str) -> dict[str, Any]:
        return c.status(name)

    @app.post("/v1/rollouts/{name}/{action}", tags=["rollouts"], dependencies=operator)
    def act(name: str, action: Action, by: str = "operator") -> dict[str, Any]:
        return c.act(name, action, by=by)

    @app.get("/v1/schema/rollout", tags=["rollouts"])
    def schema() -> dict[str, Any]:
        return rollout_json_schema()

    add_web_routes(app)
    app.include_router(gates_router(c))
    return app
