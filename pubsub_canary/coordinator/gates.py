"""Read-only gates for progressive-delivery controllers: Argo Rollouts and Flagger.

Teams that already drive releases with Argo Rollouts or Flagger gate their steps on the
coordinator's verdict through these endpoints. They only read the coordinator's state (no
approve, promote or abort), so they need no operator credentials.

- ``GET /v1/gates/rollouts/{name}``: for Argo Rollouts' *web* metric provider. Always 200 for
  a known rollout, with ``healthy`` (``jsonPath: "{$.healthy}"``, ``successCondition:
  result == true``) and ``verdict``; 404 for an unknown one (a measurement error to Argo).
- ``POST /v1/gates/flagger/start``: for Flagger's confirm-rollout hook. 200 once the rollout
  exists, whatever its phase; 404 until then (Flagger waits). Flagger calls this hook on every
  analysis cycle and runs no other hook while it answers no, so it must not turn to "no" when
  the canary fails: the hooks below fail the Canary.
- ``POST /v1/gates/flagger``: for the pre-rollout, rollout and confirm-traffic-increase hooks.
  200 while the canary is healthy, 412 once it is judged worse (a failed check to Flagger).
- ``POST /v1/gates/flagger/promotion``: for confirm-promotion. 200 only once the coordinator
  has promoted the canary (it owns all the work), 412 until then: Flagger keeps waiting.
- ``POST /v1/gates/flagger/rollback``: for the rollback hook, whose meaning Flagger inverts:
  200 *asks Flagger to roll back*, so it answers 200 only when the coordinator has judged the
  canary worse (or it was aborted), 412 otherwise.

Flagger names the rollout in the hook's ``metadata.rollout``, else the Canary's ``name`` is
taken as the rollout's name. Rollout names are unique, so a release updates
``metadata.rollout`` together with the Deployment it changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from pubsub_canary.coordinator.service import Coordinator
from pubsub_canary.core.machine import Phase

GateVerdict = Literal["pass", "fail", "continue", "inconclusive", "none"]

#: Phases in which the canary has been judged worse, or taken out by an operator.
FAILED_PHASES = frozenset({Phase.ROLLING_BACK, Phase.ROLLED_BACK, Phase.ABORTED})

#: Status code of a Flagger hook that says "not now / no": any non-2xx halts Flagger.
HALT = 412


@dataclass(frozen=True)
class Gate:
    """What a delivery controller needs to know about one rollout, decided from its status."""

    rollout: str
    group: str
    phase: str
    step: int
    steps: int
    share: float
    verdict: GateVerdict
    healthy: bool
    promoted: bool
    done: bool
    reason: str


def gate_of(status: dict[str, Any]) -> Gate:
    """The gate of a rollout from its status (``Coordinator.status``); pure.

    ``healthy`` is false once the canary is judged worse: a failed verdict, a rollback in
    progress or done, or an abort. A paused rollout (waiting for a person, for example after an
    inconclusive step) stays healthy with verdict ``inconclusive``.
    """
    phase = Phase(status["phase"])
    judgement = status.get("judgement") or {}
    judged: GateVerdict = judgement.get("verdict") or "none"
    verdict: GateVerdict
    if phase in FAILED_PHASES:
        verdict = "fail"
    elif phase in (Phase.PROMOTING, Phase.PROMOTED, Phase.AWAITING_APPROVAL):
        verdict = "pass"
    elif phase is Phase.PAUSED and judged != "fail":
        verdict = "inconclusive"
    else:
        verdict = judged
    reason = status.get("reason") or judgement.get("reason") or ""
    if not reason:
        reason = {
            Phase.PENDING: "the rollout has not started",
            Phase.PROMOTING: "all steps passed; moving all work to the canary",
            Phase.PROMOTED: "the canary owns all work",
        }.get(phase, "no verdict yet")
    return Gate(
        rollout=status["name"],
        group=status["group"],
        phase=phase.value,
        step=status["step"],
        steps=status["steps"],
        share=status["share"],
        verdict=verdict,
        healthy=verdict != "fail",
        promoted=phase is Phase.PROMOTED,
        done=phase.terminal,
        reason=reason,
    )


class GateStatus(BaseModel):
    """The gate's answer (the same body for Argo Rollouts and Flagger)."""

    rollout: str
    group: str
    phase: str
    step: int = Field(description="current step, 1-based")
    steps: int
    share: float = Field(description="canary share of the work, percent")
    verdict: GateVerdict
    healthy: bool = Field(description="false once the canary is judged worse or aborted")
    promoted: bool
    done: bool = Field(description="the rollout is over (promoted, rolled back or aborted)")
    reason: str


class FlaggerPayload(BaseModel):
    """The body Flagger POSTs to a webhook (unknown fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, description="the Canary's name")
    namespace: str = ""
    phase: str = ""
    checksum: str = ""
    metadata: dict[str, str] = Field(
        default_factory=dict, description="the hook's metadata; `rollout` names the rollout"
    )


def _rollout_for(hook: FlaggerPayload) -> str:
    return hook.metadata.get("rollout") or hook.name


def _answer(gate: Gate, go: bool, why: str) -> JSONResponse:
    body = asdict(gate) | {"go": go, "message": why}
    return JSONResponse(status_code=200 if go else HALT, content=body)


def gates_router(coordinator: Coordinator) -> APIRouter:
    """The gate endpoints for ``coordinator`` (errors become responses in ``api.py``)."""
    c = coordinator
    router = APIRouter(prefix="/v1/gates", tags=["gates"])

    def gate(name: str) -> Gate:
        return gate_of(c.status(name))

    @router.get("/rollouts/{name}", response_model=GateStatus)
    def argo(name: str) -> dict[str, Any]:
        """The verdict on rollout ``name`` for Argo Rollouts' web metric provider."""
        return asdict(gate(name))

    hook_responses: dict[int | str, dict[str, Any]] = {
        200: {"description": "go"},
        HALT: {"description": "halt: the body's message says why"},
        404: {"description": "no such rollout"},
    }

    @router.post("/flagger/start", responses=hook_responses)
    def flagger_start(hook: FlaggerPayload) -> JSONResponse:
        """Flagger confirm-rollout hook: 200 once the rollout exists (404 until then)."""
        g = gate(_rollout_for(hook))
        return _answer(g, True, f"rollout {g.rollout} exists ({g.phase})")

    @router.post("/flagger", responses=hook_responses)
    def flagger(hook: FlaggerPayload) -> JSONResponse:
        """Flagger pre-rollout, rollout, confirm-traffic-increase hooks: 200 while healthy."""
        g = gate(_rollout_for(hook))
        if g.healthy:
            return _answer(g, True, f"rollout {g.rollout} is healthy ({g.phase})")
        return _answer(g, False, f"rollout {g.rollout} is {g.phase}: {g.reason}")

    @router.post("/flagger/promotion", responses=hook_responses)
    def flagger_promotion(hook: FlaggerPayload) -> JSONResponse:
        """Flagger confirm-promotion hook: 200 once the coordinator has promoted the canary."""
        g = gate(_rollout_for(hook))
        if g.promoted:
            return _answer(g, True, f"rollout {g.rollout} is promoted")
        if not g.healthy:
            return _answer(
                g, False, f"rollout {g.rollout} is {g.phase}, never promoted: {g.reason}"
            )
        return _answer(
            g,
            False,
            f"rollout {g.rollout} is {g.phase} (step {g.step}/{g.steps}, canary share "
            f"{g.share:g}%); promotion waits until the coordinator has promoted: {g.reason}",
        )

    @router.post("/flagger/rollback", responses=hook_responses)
    def flagger_rollback(hook: FlaggerPayload) -> JSONResponse:
        """Flagger rollback hook: 200 (roll back) only when the canary was judged worse."""
        g = gate(_rollout_for(hook))
        if not g.healthy:
            return _answer(g, True, f"roll back: rollout {g.rollout} is {g.phase}: {g.reason}")
        return _answer(g, False, f"no rollback: rollout {g.rollout} is healthy ({g.phase})")

    return router
