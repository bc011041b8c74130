"""The rollout state machine: ``transition(state, event, spec) -> (state, effects)``.

Pure: no I/O, no clock (every event carries ``now``). The coordinator feeds it events (start,
verdicts, operator actions, handoffs finished) and performs the effects it returns (set the
canary's share, record a decision). Phases and the actions each allows are written down once,
in :class:`Phase` and :data:`ALLOWED`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from pubsub_canary.core.model import RolloutSpec
from pubsub_canary.core.observations import Judgement, Verdict
from pubsub_canary.errors import TransitionError


class Phase(StrEnum):
    """Phases of a rollout, in order from worst to best outcome.

    ``PENDING`` -> ``PROGRESSING`` (step k) [-> ``AWAITING_APPROVAL``] -> ... -> ``PROMOTING``
    -> ``PROMOTED``; a failed verdict or an abort goes ``ROLLING_BACK`` -> ``ROLLED_BACK`` /
    ``ABORTED``; ``PAUSED`` holds the current share until resumed.
    """

    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"
    ROLLING_BACK = "rolling_back"
    PAUSED = "paused"
    PENDING = "pending"
    AWAITING_APPROVAL = "awaiting_approval"
    PROGRESSING = "progressing"
    PROMOTING = "promoting"
    PROMOTED = "promoted"

    @property
    def terminal(self) -> bool:
        return self in (Phase.ABORTED, Phase.ROLLED_BACK, Phase.PROMOTED)

    @property
    def judged(self) -> bool:
        """Whether the canary is being analysed (it holds a share at a step)."""
        return self in (Phase.PROGRESSING, Phase.AWAITING_APPROVAL, Phase.PAUSED)


# --- events -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    now: float


@dataclass(frozen=True)
class Judged:
    """The analysis of the current step (SLO guards + judge) concluded ``judgement``."""

    now: float
    judgement: Judgement


@dataclass(frozen=True)
class Approve:
    now: float
    by: str = "operator"


@dataclass(frozen=True)
class Pause:
    now: float
    reason: str = "paused by operator"


@dataclass(frozen=True)
class Resume:
    now: float


@dataclass(frozen=True)
class Promote:
    """Skip the remaining steps and give the canary everything."""

    now: float
    by: str = "operator"


@dataclass(frozen=True)
class Abort:
    now: float
    reason: str = "aborted by operator"


@dataclass(frozen=True)
class HandoffsDone:
    """Every work unit is owned as the current share asks."""

    now: float


@dataclass(frozen=True)
class CanaryGone:
    """No canary member is alive while the canary should hold a share."""

    now: float


Event = Start | Judged | Approve | Pause | Resume | Promote | Abort | HandoffsDone | CanaryGone

# --- effects ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetShare:
    """Give the canary ``share`` percent of the work (0: none, 100: all)."""

    share: float


@dataclass(frozen=True)
class Decide:
    """A decision to record and show: what happened and why."""

    kind: str
    reason: str


Effect = SetShare | Decide

# --- state ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutState:
    phase: Phase = Phase.PENDING
    step: int = 0
    share: float = 0.0
    step_started_at: float | None = None
    #: Phase to return to on resume.
    paused_from: Phase | None = None
    extensions: int = 0
    #: When the decision to roll back was taken, and when stable owned everything again.
    rollback_started_at: float | None = None
    rollback_finished_at: float | None = None
    #: Where a rollback ends: ROLLED_BACK (verdict) or ABORTED (operator).
    rollback_to: Phase | None = None
    reason: str = ""


#: Operator actions each phase accepts (checked before any state changes).
ALLOWED: dict[type, frozenset[Phase]] = {
    Start: frozenset({Phase.PENDING}),
    Approve: frozenset({Phase.AWAITING_APPROVAL}),
    Pause: frozenset({Phase.PROGRESSING, Phase.AWAITING_APPROVAL}),
    Resume: frozenset({Phase.PAUSED}),
    Promote: frozenset({Phase.PENDING, Phase.PROGRESSING, Phase.AWAITING_APPROVAL, Phase.PAUSED}),
    Abort: frozenset(
        {
            Phase.PENDING,
            Phase.PROGRESSING,
            Phase.AWAITING_APPROVAL,
            Phase.PAUSED,
            Phase.PROMOTING,
        }
    ),
}

_ACTION_NAMES = {
    Start: "start",
    Approve: "approve",
    Pause: "pause",
    Resume: "resume",
    Promote: "promote",
    Abort: "abort",
}


def _check_allowed(state: RolloutState, event: Event) -> None:
    allowed = ALLOWED.get(type(event))
    if allowed is not None and state.phase not in allowed:
        name = _ACTION_NAMES[type(event)]
        hint = " (no approval gate is pending)" if isinstance(event, Approve) else ""
        raise TransitionError(
            f"cannot {name} a rollout that is {state.phase.value}{hint}; "
            f"{name} is allowed when {', '.join(sorted(p.value for p in allowed))}",
            phase=state.phase.value,
            action=name,
        )


def _enter_step(state: RolloutState, spec: RolloutSpec, step: int, now: float) -> RolloutState:
    return replace(
        state,
        phase=Phase.PROGRESSING,
        step=step,
        share=spec.steps[step].share,
        step_started_at=now,
        extensions=0,
        paused_from=None,
    )


def _advance(
    state: RolloutState, spec: RolloutSpec, now: float, why: str
) -> tuple[RolloutState, list[Effect]]:
    nxt = state.step + 1
    if nxt < len(spec.steps) and spec.steps[state.step].share < 100:
        new = _enter_step(state, spec, nxt, now)
        return new, [
            SetShare(new.share),
            Decide(
                "step",
                f"step {state.step + 1} passed ({why}); step {nxt + 1}: "
                f"canary share {new.share:g}%",
            ),
        ]
    new = replace(state, phase=Phase.PROMOTING, share=100.0, paused_from=None)
    return new, [SetShare(100.0), Decide("promote", f"all steps passed ({why}); promoting")]


def _roll_back(
    state: RolloutState, now: float, reason: str, to: Phase
) -> tuple[RolloutState, list[Effect]]:
    new = replace(
        state,
        phase=Phase.ROLLING_BACK,
        share=0.0,
        rollback_started_at=now,
        rollback_to=to,
        paused_from=None,
        reason=reason,
    )
    kind = "abort" if to is Phase.ABORTED else "rollback"
    return new, [SetShare(0.0), Decide(kind, reason)]


def transition(
    state: RolloutState, event: Event, spec: RolloutSpec
) -> tuple[RolloutState, list[Effect]]:
    """Apply ``event`` to ``state``. Raises TransitionError for an action the phase forbids."""
    _check_allowed(state, event)
    match event:
        case Start(now=now):
            new = _enter_step(state, spec, 0, now)
            return new, [
                SetShare(new.share),
                Decide("start", f"rollout started; step 1: canary share {new.share:g}%"),
            ]
        case Judged(now=now, judgement=j):
            return _judged(state, spec, now, j)
        case Approve(now=now, by=by):
            return _advance(state, spec, now, f"approved by {by}")
        case Pause(now=now, reason=reason):
            new = replace(state, phase=Phase.PAUSED, paused_from=state.phase, reason=reason)
            return new, [Decide("pause", reason)]
        case Resume(now=now):
            back = state.paused_from or Phase.PROGRESSING
            new = replace(state, phase=back, paused_from=None, step_started_at=now, reason="")
            return new, [Decide("resume", f"resumed; hold of step {state.step + 1} restarts")]
        case Promote(now=now, by=by):
            new = replace(state, phase=Phase.PROMOTING, share=100.0, paused_from=None)
            return new, [SetShare(100.0), Decide("promote", f"promoted by {by}")]
        case Abort(now=now, reason=reason):
            return _roll_back(state, now, reason, Phase.ABORTED)
        case HandoffsDone(now=now):
            if state.phase is Phase.PROMOTING:
                return replace(state, phase=Phase.PROMOTED), [
                    Decide("promoted", "canary owns all work; stable members are idle")
                ]
            if state.phase is Phase.ROLLING_BACK:
                to = state.rollback_to or Phase.ROLLED_BACK
                new = replace(state, phase=to, rollback_finished_at=now)
                started = state.rollback_started_at
                took = now - started if started is not None else 0.0
                return new, [
                    Decide(
                        "rolled_back", f"stable owns all work again, {took:.2f}s after the decision"
                    )
                ]
            return state, []
        case CanaryGone(now=now):
            if state.phase in (Phase.PROGRESSING, Phase.AWAITING_APPROVAL):
                reason = "no canary member is alive; paused until one registers"
                return replace(state, phase=Phase.PAUSED, paused_from=state.phase, reason=reason), [
                    Decide("pause", reason)
                ]
            return state, []
    raise AssertionError(f"unknown event {event!r}")


def _judged(
    state: RolloutState, spec: RolloutSpec, now: float, j: Judgement
) -> tuple[RolloutState, list[Effect]]:
    if not state.phase.judged:
        return state, []
    if j.verdict is Verdict.FAIL:
        return _roll_back(
            state, now, f"step {state.step + 1} failed: {j.reason}", Phase.ROLLED_BACK
        )
    if state.phase is not Phase.PROGRESSING:
        return state, []  # paused or waiting for a person: only a failure changes anything
    if j.verdict is Verdict.PASS:
        if spec.steps[state.step].approval:
            new = replace(state, phase=Phase.AWAITING_APPROVAL)
            return new, [
                Decide("gate", f"step {state.step + 1} passed ({j.reason}); waiting for approval")
            ]
        return _advance(state, spec, now, j.reason)
    if j.verdict is Verdict.INCONCLUSIVE:
        policy = spec.analysis
        on_inconclusive = getattr(policy, "on_inconclusive", "pause")
        max_ext = int(getattr(policy, "max_extensions", 3))
        if on_inconclusive == "extend" and state.extensions < max_ext:
            new = replace(state, step_started_at=now, extensions=state.extensions + 1)
            return new, [
                Decide(
                    "extend",
                    f"step {state.step + 1} inconclusive ({j.reason}); hold "
                    f"extended ({new.extensions}/{max_ext})",
                )
            ]
        reason = f"step {state.step + 1} inconclusive ({j.reason}); waiting for a person"
        return replace(state, phase=Phase.PAUSED, paused_from=Phase.PROGRESSING, reason=reason), [
            Decide("pause", reason)
        ]
    return state, []
