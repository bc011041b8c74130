"""The analysis of one rollout step: absolute SLO guards first, then the statistical judge.

Pure. The guards are hard limits on the canary alone and fail a step at once; the judge
compares the canary with the stable cohort running at the same time.
"""

from __future__ import annotations

from pubsub_canary.core.judge import judge_step
from pubsub_canary.core.model import RolloutSpec, SloGuards
from pubsub_canary.core.observations import CohortObservations, Judgement, MetricVerdict, Verdict


def check_slo(guards: SloGuards, canary: CohortObservations) -> list[MetricVerdict]:
    """One verdict per configured guard: FAIL when the canary crosses the limit, else PASS."""
    out: list[MetricVerdict] = []
    enough = canary.processed >= guards.min_messages

    def rate_guard(metric: str, limit: float | None, count: int) -> None:
        if limit is None:
            return
        rate = count / canary.processed if canary.processed else 0.0
        failed = enough and rate > limit
        out.append(
            MetricVerdict(
                metric=f"slo:{metric}",
                verdict=Verdict.FAIL if failed else Verdict.PASS,
                reason=(
                    f"canary {metric} {rate:.2%} > limit {limit:.2%} "
                    f"over {canary.processed} messages"
                    if failed
                    else f"canary {metric} {rate:.2%} within limit {limit:.2%}"
                ),
                evidence={"rate": rate, "limit": limit, "messages": canary.processed},
            )
        )

    rate_guard("error_rate", guards.max_error_rate, canary.errors)
    rate_guard("dead_letter_rate", guards.max_dead_letter_rate, canary.dead_lettered)
    if guards.max_p99_latency_seconds is not None:
        p99 = canary.latency.quantile(0.99)
        failed = enough and p99 is not None and p99 > guards.max_p99_latency_seconds
        out.append(
            MetricVerdict(
                metric="slo:p99_latency",
                verdict=Verdict.FAIL if failed else Verdict.PASS,
                reason=f"canary p99 latency {p99 if p99 is not None else 'n/a'} s vs limit "
                f"{guards.max_p99_latency_seconds} s",
                evidence={"p99_seconds": p99, "limit": guards.max_p99_latency_seconds},
            )
        )
    if guards.max_lag_growth is not None and len(canary.lag) >= 2:
        growth = canary.lag[-1].lag - canary.lag[0].lag
        failed = growth > guards.max_lag_growth
        out.append(
            MetricVerdict(
                metric="slo:lag_growth",
                verdict=Verdict.FAIL if failed else Verdict.PASS,
                reason=f"canary lag grew by {growth} messages this step "
                f"(limit {guards.max_lag_growth})",
                evidence={"growth": growth, "limit": guards.max_lag_growth},
            )
        )
    return out


def hold_elapsed(
    spec: RolloutSpec,
    step: int,
    step_started_at: float,
    now: float,
    stable: CohortObservations,
    canary: CohortObservations,
) -> bool:
    """Whether the step's hold is over: its time has passed and each cohort saw enough messages.

    A cohort with no member (for example stable after all its units moved) is not waited for.
    """
    s = spec.steps[step]
    if now - step_started_at < s.hold_seconds:
        return False
    need = s.min_messages
    # A step never passes on no canary data at all.
    return canary.processed >= max(1, need) and (stable.processed >= need or s.share >= 100)


def analyse_step(
    spec: RolloutSpec,
    step: int,
    stable: CohortObservations,
    canary: CohortObservations,
    *,
    held: bool,
) -> Judgement:
    """The step's verdict: an SLO breach fails at once; otherwise the judge decides."""
    guards = check_slo(spec.slo, canary)
    broken = [g for g in guards if g.verdict is Verdict.FAIL]
    if broken:
        return Judgement(Verdict.FAIL, "; ".join(g.reason for g in broken), tuple(guards))
    if spec.steps[step].share >= 100:
        # No stable cohort runs beside the canary at 100%: nothing to compare, only the SLO
        # guards apply (the statistical comparison happened at the steps before).
        verdict = Verdict.PASS if held else Verdict.CONTINUE
        why = "canary owns all work; SLO guards met" if held else "holding at 100%"
        return Judgement(verdict, why, tuple(guards))
    j = judge_step(
        spec.analysis,
        stable,
        canary,
        step_index=step,
        step_count=len(spec.steps),
        hold_elapsed=held,
    )
    return Judgement(j.verdict, j.reason, tuple(guards) + tuple(j.metrics))
