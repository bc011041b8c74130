"""The statistical judge of one rollout step: canary against the stable cohort of the same step.

Pure: no I/O, no clock, no randomness. The coordinator calls :func:`judge_step` at every look
(every heartbeat if it likes: the tests are anytime-valid) with the cumulative observations of
the current step, and acts on the verdict.
"""

from __future__ import annotations

from pubsub_canary.core.judge.metrics import (
    Assessment,
    State,
    assess_kpi,
    assess_lag,
    assess_latency,
    assess_rate,
)
from pubsub_canary.core.judge.policy import AnalysisPolicy, Promotion
from pubsub_canary.core.observations import (
    CohortObservations,
    Judgement,
    MetricVerdict,
    Verdict,
)
from pubsub_canary.errors import ConfigError

__all__ = ["judge_step", "metric_alpha", "statistical_metric_count"]


def statistical_metric_count(policy: AnalysisPolicy) -> int:
    """How many metrics share the false-rollback budget (lag growth is a rule and spends none)."""
    built_in = (policy.error_rate, policy.dead_letter_rate, policy.latency)
    return sum(p is not None for p in built_in) + len(policy.kpis)


def metric_alpha(policy: AnalysisPolicy, *, step_count: int) -> float:
    """The false-rollback budget of one metric at one step: ``alpha / steps / metrics``.

    Every step gets the same share whatever its index, so the rollout-level bound holds
    however the steps end; extending a step's hold spends nothing more.
    """
    return policy.alpha / step_count / max(1, statistical_metric_count(policy))


def judge_step(
    policy: AnalysisPolicy,
    stable: CohortObservations,
    canary: CohortObservations,
    *,
    step_index: int,
    step_count: int,
    hold_elapsed: bool,
) -> Judgement:
    """Judge the canary against stable on the observations of the current step so far.

    Args:
        policy: The rollout's ``analysis:`` section.
        stable: Cumulative observations of the stable cohort since the step started.
        canary: Cumulative observations of the canary cohort since the step started.
        step_index: Index of the current step (0-based), for the alpha split.
        step_count: Number of steps in the rollout (each gets ``alpha / step_count``).
        hold_elapsed: Whether the step's hold (time and/or message count) is over.

    Returns:
        ``FAIL`` as soon as a critical metric shows the canary worse than tolerated (at any
        look); ``PASS`` with ``promotion="time"`` when the hold is over and nothing failed,
        with ``promotion="metric"`` as soon as every critical metric shows the canary no
        worse; ``INCONCLUSIVE`` when the hold is over without that; ``CONTINUE`` otherwise.

    Raises:
        ConfigError: ``step_count`` is not positive or ``step_index`` is outside the steps.
    """
    if step_count < 1:
        raise ConfigError(f"step_count must be at least 1, got {step_count}", field="step_count")
    if not 0 <= step_index < step_count:
        raise ConfigError(
            f"step_index must be in [0, {step_count - 1}], got {step_index}", field="step_index"
        )
    assessments = _assess(policy, stable, canary, step_count=step_count)
    return _decide(policy, assessments, hold_elapsed=hold_elapsed)


def _assess(
    policy: AnalysisPolicy,
    stable: CohortObservations,
    canary: CohortObservations,
    *,
    step_count: int,
) -> list[Assessment]:
    a_fail = metric_alpha(policy, step_count=step_count)
    # Promotion needs every critical metric to pass (an intersection), so a canary that is
    # worse on one of them passes only if that metric's test errs: no split across metrics.
    a_pass = policy.promotion_alpha
    out: list[Assessment] = []
    if policy.error_rate is not None:
        out.append(
            assess_rate(
                "error_rate",
                policy.error_rate,
                canary_events=canary.errors,
                canary_n=canary.processed,
                stable_events=stable.errors,
                stable_n=stable.processed,
                alpha_fail=a_fail,
                alpha_pass=a_pass,
            )
        )
    if policy.dead_letter_rate is not None:
        out.append(
            assess_rate(
                "dead_letter_rate",
                policy.dead_letter_rate,
                canary_events=canary.dead_lettered,
                canary_n=canary.processed,
                stable_events=stable.dead_lettered,
                stable_n=stable.processed,
                alpha_fail=a_fail,
                alpha_pass=a_pass,
            )
        )
    if policy.latency is not None:
        out.append(
            assess_latency(
                policy.latency,
                canary=canary.latency,
                stable=stable.latency,
                alpha_fail=a_fail,
                alpha_pass=a_pass,
            )
        )
    if policy.lag_growth is not None:
        out.append(assess_lag(policy.lag_growth, canary=canary.lag, stable=stable.lag))
    for name, kpi in sorted(policy.kpis.items()):
        out.append(
            assess_kpi(
                name,
                kpi,
                canary=canary.kpis.get(name),
                stable=stable.kpis.get(name),
                alpha_fail=a_fail,
                alpha_pass=a_pass,
            )
        )
    return out


def _metric_verdict(a: Assessment, promotion: Promotion, hold_elapsed: bool) -> MetricVerdict:
    verdict: Verdict
    reason = a.reason
    if a.state is State.FAIL:
        verdict = Verdict.FAIL
    elif a.state is State.PASS:
        verdict = Verdict.PASS
    elif not hold_elapsed:
        verdict = Verdict.CONTINUE
    elif a.state is State.UNDECIDED and promotion is Promotion.TIME:
        verdict = Verdict.PASS
        reason = f"{a.reason}; no regression detected over the hold"
    else:
        verdict = Verdict.INCONCLUSIVE
    return MetricVerdict(a.metric, verdict, reason, a.critical, dict(a.evidence))


def _decide(
    policy: AnalysisPolicy, assessments: list[Assessment], *, hold_elapsed: bool
) -> Judgement:
    metrics = tuple(_metric_verdict(a, policy.promotion, hold_elapsed) for a in assessments)
    critical = [a for a in assessments if a.critical]
    failed = [a for a in critical if a.state is State.FAIL]
    if failed:
        return Judgement(
            Verdict.FAIL,
            "canary worse than stable: " + "; ".join(a.reason for a in failed),
            metrics,
        )
    # A non-critical failure never rolls back; it holds back automatic promotion.
    blocking = [a for a in assessments if not a.critical and a.state is State.FAIL]
    blocked = "; ".join(f"non-critical {a.reason}" for a in blocking)

    if (
        policy.promotion is Promotion.METRIC
        and critical
        and not blocking
        and all(a.state is State.PASS for a in critical)
    ):
        names = ", ".join(a.metric for a in critical)
        return Judgement(
            Verdict.PASS,
            f"canary no worse than tolerated on every critical metric ({names})",
            metrics,
        )

    if not hold_elapsed:
        pending = [a for a in critical if a.state is State.WAITING]
        reason = "holding; no regression so far"
        if pending:
            reason += "; " + "; ".join(a.reason for a in pending)
        if blocking:
            reason += "; " + blocked
        return Judgement(Verdict.CONTINUE, reason, metrics)

    if policy.promotion is Promotion.TIME or not critical:
        missing = [a for a in critical if a.state is State.WAITING]
    else:
        missing = [a for a in critical if a.state is not State.PASS]
    if missing or blocking:
        parts = [a.reason for a in missing] + ([blocked] if blocking else [])
        return Judgement(
            Verdict.INCONCLUSIVE, "hold elapsed without a verdict: " + "; ".join(parts), metrics
        )
    checked = ", ".join(a.metric for a in assessments) or "no metrics configured"
    return Judgement(Verdict.PASS, f"hold elapsed with no regression detected ({checked})", metrics)
