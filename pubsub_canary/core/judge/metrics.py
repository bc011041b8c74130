"""One assessment per metric: canary against stable, from the cumulative observations of a step.

Each function returns an :class:`Assessment` whose ``state`` says what the evidence shows
*now*; :mod:`pubsub_canary.core.judge.judge` turns the states into verdicts with the hold and
the promotion mode. ``alpha_fail`` and ``alpha_pass`` are this metric's share of the budgets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from pubsub_canary.core.judge.policy import (
    Direction,
    KpiPolicy,
    LagPolicy,
    LatencyPolicy,
    RatePolicy,
)
from pubsub_canary.core.judge.sequential import (
    log_e_rate_above,
    log_e_rate_below,
    log_e_two_rates,
    mean_cs_radius,
)
from pubsub_canary.core.observations import (
    LATENCY_BUCKETS,
    KpiStats,
    LagSample,
    LatencyHistogram,
)

Evidence = dict[str, float | int | str | None]

#: KPI confidence sequences are tightest around this many observations per cohort.
KPI_DESIGN_COUNT = 1000
#: Relative slack when comparing histogram bounds: the bucket table is rounded to 7 decimals,
#: so "one bucket up" is 1.25 within about 5e-5.
_BUCKET_SLACK = 1e-4
#: Largest log e-value shown (keeps evidence finite and JSON-friendly).
_MAX_LOG_E = 690.0


class State(Enum):
    """What the evidence on one metric shows at this look."""

    FAIL = "fail"
    PASS = "pass"
    UNDECIDED = "undecided"
    WAITING = "waiting"


@dataclass(frozen=True)
class Assessment:
    metric: str
    state: State
    reason: str
    critical: bool
    evidence: Evidence = field(default_factory=dict)


def _e(log_e: float) -> float:
    return math.exp(min(log_e, _MAX_LOG_E))


def _pct(rate: float) -> str:
    return f"{rate:.3%}" if rate < 0.01 else f"{rate:.2%}"


# --- counts -------------------------------------------------------------------------------


def assess_rate(
    metric: str,
    policy: RatePolicy,
    *,
    canary_events: int,
    canary_n: int,
    stable_events: int,
    stable_n: int,
    alpha_fail: float,
    alpha_pass: float,
) -> Assessment:
    """Error or dead-letter rate: a two-sample test on event counts per processed message."""
    nc, ns = max(0, canary_n), max(0, stable_n)
    # A message counts once; more events than messages (a delta race) cannot be a rate.
    xc, xs = min(max(0, canary_events), nc), min(max(0, stable_events), ns)
    evidence: Evidence = {
        "canary_events": xc,
        "canary_messages": nc,
        "stable_events": xs,
        "stable_messages": ns,
        "canary_rate": xc / nc if nc else None,
        "stable_rate": xs / ns if ns else None,
        "tolerance": policy.tolerance,
        "absolute_tolerance": policy.absolute_tolerance,
        "alpha": alpha_fail,
    }
    waiting = _waiting_counts(nc, ns, policy.min_sample, "messages")
    if waiting:
        return Assessment(metric, State.WAITING, f"{metric}: {waiting}", policy.critical, evidence)

    log_worse, log_ok = log_e_two_rates(
        xc, nc, xs, ns, ratio=1.0 + policy.tolerance, floor=policy.absolute_tolerance
    )
    evidence.update(
        e_value_worse=_e(log_worse),
        e_threshold_worse=1.0 / alpha_fail,
        e_value_no_worse=_e(log_ok),
        e_threshold_no_worse=1.0 / alpha_pass,
    )
    seen = f"canary {_pct(xc / nc)} ({xc}/{nc}) vs stable {_pct(xs / ns)} ({xs}/{ns})"
    allowed = _rate_allowance(policy)
    if log_worse >= math.log(1.0 / alpha_fail):
        return Assessment(
            metric,
            State.FAIL,
            f"{metric}: {seen}: worse than {allowed} "
            f"(e-value {_e(log_worse):.3g} >= {1.0 / alpha_fail:.3g})",
            policy.critical,
            evidence,
        )
    if log_ok >= math.log(1.0 / alpha_pass):
        return Assessment(
            metric,
            State.PASS,
            f"{metric}: {seen}: no worse than {allowed} "
            f"(e-value {_e(log_ok):.3g} >= {1.0 / alpha_pass:.3g})",
            policy.critical,
            evidence,
        )
    return Assessment(
        metric,
        State.UNDECIDED,
        f"{metric}: {seen}: no evidence yet either way (tolerated: {allowed})",
        policy.critical,
        evidence,
    )


def _rate_allowance(policy: RatePolicy) -> str:
    text = f"stable +{policy.tolerance:.0%}"
    if policy.absolute_tolerance > 0:
        text += f" or {_pct(policy.absolute_tolerance)}"
    return text


def _waiting_counts(nc: int, ns: int, need: int, unit: str) -> str | None:
    if nc == 0 and ns == 0:
        return f"no {unit} from either cohort yet"
    if nc == 0:
        return f"canary has no {unit} yet (stable {ns})"
    if ns == 0:
        return f"stable has no {unit} yet (canary {nc}); nothing to compare with"
    if nc < need or ns < need:
        return f"waiting for {need} {unit} per cohort (canary {nc}, stable {ns})"
    return None


# --- latency ------------------------------------------------------------------------------


def _cumulative(hist: LatencyHistogram) -> list[int]:
    out: list[int] = []
    total = 0
    for c in hist.counts[: len(LATENCY_BUCKETS)]:
        total += max(0, c)
        out.append(total)
    return out


def _quantile_upper(cum: Sequence[int], n: int, q: float, log_thr: float) -> int | None:
    """Smallest bucket ``j`` with anytime evidence that ``F(B[j]) >= q``, i.e. ``Q <= B[j]``.

    The e-value grows with the count below ``B[j]``, which only grows with ``j``, so an error
    at any bucket implies one at the bucket just below the true quantile: one fixed test, no
    union over buckets.
    """
    for j, k in enumerate(cum):
        if log_e_rate_above(k, n, q) >= log_thr:
            return j
    return None


def _quantile_lower(cum: Sequence[int], n: int, q: float, log_thr: float) -> int | None:
    """Largest bucket ``j`` with anytime evidence that ``F(B[j]) < q``, i.e. ``Q > B[j]``."""
    for j in range(len(cum) - 1, -1, -1):
        if log_e_rate_below(cum[j], n, q) >= log_thr:
            return j
    return None


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return f"> {LATENCY_BUCKETS[-1]:g} s"
    return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.3g} s"


def assess_latency(
    policy: LatencyPolicy,
    *,
    canary: LatencyHistogram,
    stable: LatencyHistogram,
    alpha_fail: float,
    alpha_pass: float,
) -> Assessment:
    """Latency quantile: anytime confidence bounds on each cohort's quantile, compared.

    FAIL when the canary's lower bound is above ``(1 + tolerance)`` times stable's upper bound
    (plus the absolute tolerance); PASS when the canary's upper bound is below the same
    function of stable's lower bound. Each bound spends half of the metric's alpha.
    """
    q = policy.quantile
    label = f"latency p{q * 100:g}"
    cum_c, cum_s = _cumulative(canary), _cumulative(stable)
    nc = sum(max(0, c) for c in canary.counts)
    ns = sum(max(0, c) for c in stable.counts)
    evidence: Evidence = {
        "quantile": q,
        "canary_samples": nc,
        "stable_samples": ns,
        "canary_quantile_seconds": _finite(canary.quantile(q)) if nc else None,
        "stable_quantile_seconds": _finite(stable.quantile(q)) if ns else None,
        "tolerance": policy.tolerance,
        "absolute_tolerance": policy.absolute_tolerance,
        "alpha": alpha_fail,
    }
    waiting = _waiting_counts(nc, ns, policy.min_sample, "latency samples")
    if waiting:
        return Assessment(
            "latency", State.WAITING, f"{label}: {waiting}", policy.critical, evidence
        )

    ratio = 1.0 + policy.tolerance
    slack = policy.absolute_tolerance
    thr_fail = math.log(2.0 / alpha_fail)
    thr_pass = math.log(2.0 / alpha_pass)
    seen = (
        f"canary ~{_seconds(canary.quantile(q))} vs stable ~{_seconds(stable.quantile(q))} "
        f"({nc} and {ns} samples)"
    )

    lo_c = _quantile_lower(cum_c, nc, q, thr_fail)
    hi_s = _quantile_upper(cum_s, ns, q, thr_fail)
    evidence.update(
        canary_lower_seconds=LATENCY_BUCKETS[lo_c] if lo_c is not None else None,
        stable_upper_seconds=LATENCY_BUCKETS[hi_s] if hi_s is not None else None,
    )
    if lo_c is not None and hi_s is not None:
        canary_above, stable_below = LATENCY_BUCKETS[lo_c], LATENCY_BUCKETS[hi_s]
        if canary_above >= (ratio * stable_below + slack) * (1.0 - _BUCKET_SLACK):
            return Assessment(
                "latency",
                State.FAIL,
                f"{label}: {seen}: canary > {_seconds(canary_above)} while stable <= "
                f"{_seconds(stable_below)}, worse than {_latency_allowance(policy)} "
                f"(anytime bounds at alpha {alpha_fail:.2g})",
                policy.critical,
                evidence,
            )

    hi_c = _quantile_upper(cum_c, nc, q, thr_pass)
    lo_s = _quantile_lower(cum_s, ns, q, thr_pass)
    evidence.update(
        canary_upper_seconds=LATENCY_BUCKETS[hi_c] if hi_c is not None else None,
        stable_lower_seconds=LATENCY_BUCKETS[lo_s] if lo_s is not None else None,
    )
    if hi_c is not None:
        canary_below = LATENCY_BUCKETS[hi_c]
        stable_above = LATENCY_BUCKETS[lo_s] if lo_s is not None else 0.0
        if canary_below <= (ratio * stable_above + slack) * (1.0 + _BUCKET_SLACK):
            return Assessment(
                "latency",
                State.PASS,
                f"{label}: {seen}: canary <= {_seconds(canary_below)} while stable > "
                f"{_seconds(stable_above)}, no worse than {_latency_allowance(policy)}",
                policy.critical,
                evidence,
            )
    return Assessment(
        "latency",
        State.UNDECIDED,
        f"{label}: {seen}: no evidence yet either way (tolerated: {_latency_allowance(policy)})",
        policy.critical,
        evidence,
    )


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else value


def _latency_allowance(policy: LatencyPolicy) -> str:
    text = f"stable +{policy.tolerance:.0%}"
    if policy.absolute_tolerance > 0:
        text += f" + {_seconds(policy.absolute_tolerance)}"
    return text


# --- custom KPIs --------------------------------------------------------------------------


def _interval(stats: KpiStats, sigma: float, alpha: float) -> tuple[float, float]:
    mean = stats.total / stats.count
    radius = mean_cs_radius(stats.count, sigma, alpha, design_count=KPI_DESIGN_COUNT)
    return mean - radius, mean + radius


def assess_kpi(
    name: str,
    policy: KpiPolicy,
    *,
    canary: KpiStats | None,
    stable: KpiStats | None,
    alpha_fail: float,
    alpha_pass: float,
) -> Assessment:
    """A custom KPI's mean: confidence sequences on each cohort's mean, compared.

    Higher is better: acceptable when ``mu_c >= mu_s - tol * |mu_s| - abs``; lower is better:
    when ``mu_c <= mu_s + tol * |mu_s| + abs``. Each sequence spends half the metric's alpha.
    """
    metric = f"kpi:{name}"
    nc = canary.count if canary else 0
    ns = stable.count if stable else 0
    evidence: Evidence = {
        "canary_count": nc,
        "stable_count": ns,
        "canary_mean": canary.mean if canary else None,
        "stable_mean": stable.mean if stable else None,
        "direction": policy.direction.value,
        "tolerance": policy.tolerance,
        "absolute_tolerance": policy.absolute_tolerance,
        "alpha": alpha_fail,
    }
    waiting = _waiting_counts(nc, ns, max(2, policy.min_sample), "values")
    if waiting or canary is None or stable is None:
        return Assessment(metric, State.WAITING, f"{metric}: {waiting}", policy.critical, evidence)

    if policy.bounds is not None:
        sigma_c = sigma_s = (policy.bounds[1] - policy.bounds[0]) / 2.0
    else:
        sigma_c = math.sqrt(canary.variance or 0.0)
        sigma_s = math.sqrt(stable.variance or 0.0)
    if not (math.isfinite(sigma_c) and math.isfinite(sigma_s)):
        return Assessment(
            metric, State.WAITING, f"{metric}: values are not finite", policy.critical, evidence
        )
    higher = policy.direction is Direction.HIGHER_IS_BETTER
    sign = -1.0 if higher else 1.0
    tol, off = policy.tolerance, sign * policy.absolute_tolerance

    def limit(mu: float) -> float:
        return mu + sign * tol * abs(mu) + off

    def bounds_of_limit(lo: float, hi: float) -> tuple[float, float]:
        # Piecewise linear with its only kink at 0: the extremes are at the ends or at 0.
        values = [limit(lo), limit(hi)] + ([limit(0.0)] if lo < 0.0 < hi else [])
        return min(values), max(values)

    seen = (
        f"canary mean {canary.total / nc:.4g} (n={nc}) vs stable {stable.total / ns:.4g} (n={ns})"
    )
    allowed = f"stable {'-' if higher else '+'}{tol:.0%}" + (
        f" {'-' if higher else '+'} {policy.absolute_tolerance:g}" if off else ""
    )
    lo_c, hi_c = _interval(canary, sigma_c, alpha_fail / 2.0)
    lo_s, hi_s = _interval(stable, sigma_s, alpha_fail / 2.0)
    lim_lo, lim_hi = bounds_of_limit(lo_s, hi_s)
    evidence.update(canary_low=lo_c, canary_high=hi_c, stable_low=lo_s, stable_high=hi_s)
    worse = hi_c < lim_lo if higher else lo_c > lim_hi
    if worse:
        return Assessment(
            metric,
            State.FAIL,
            f"{metric}: {seen}: worse than {allowed} (anytime intervals canary "
            f"[{lo_c:.4g}, {hi_c:.4g}], stable [{lo_s:.4g}, {hi_s:.4g}])",
            policy.critical,
            evidence,
        )
    lo_c, hi_c = _interval(canary, sigma_c, alpha_pass / 2.0)
    lo_s, hi_s = _interval(stable, sigma_s, alpha_pass / 2.0)
    lim_lo, lim_hi = bounds_of_limit(lo_s, hi_s)
    no_worse = lo_c >= lim_hi if higher else hi_c <= lim_lo
    if no_worse:
        return Assessment(
            metric,
            State.PASS,
            f"{metric}: {seen}: no worse than {allowed}",
            policy.critical,
            evidence,
        )
    return Assessment(
        metric,
        State.UNDECIDED,
        f"{metric}: {seen}: no evidence yet either way (tolerated: {allowed})",
        policy.critical,
        evidence,
    )


# --- lag growth ---------------------------------------------------------------------------


def _growth(samples: Sequence[LagSample]) -> float | None:
    """Lag added per produced message, robust to the saw-tooth of batch commits.

    From the highest lag in the first third of the window to the lowest in the last third:
    a cohort that keeps up comes back down, one that falls behind does not.
    """
    ordered = sorted(samples, key=lambda s: s.at)
    third = max(1, len(ordered) // 3)
    top = max(ordered[:third], key=lambda s: s.lag)
    bottom = min(ordered[-third:], key=lambda s: s.lag)
    produced = bottom.produced - top.produced
    if produced <= 0:
        return None
    return (bottom.lag - top.lag) / produced


def assess_lag(
    policy: LagPolicy, *, canary: Sequence[LagSample], stable: Sequence[LagSample]
) -> Assessment:
    """Lag growth: a rule, not a sampling test (lag is a queue's state, read without noise).

    FAIL when the canary's normalised growth exceeds ``absolute_tolerance`` and
    ``(1 + tolerance)`` times stable's; PASS when it has a full window and does not.
    """
    need = policy.min_sample
    evidence: Evidence = {
        "canary_samples": len(canary),
        "stable_samples": len(stable),
        "tolerance": policy.tolerance,
        "absolute_tolerance": policy.absolute_tolerance,
    }
    if len(canary) < need:
        return Assessment(
            "lag_growth",
            State.WAITING,
            f"lag_growth: waiting for {need} canary lag samples (have {len(canary)})",
            policy.critical,
            evidence,
        )
    g_c = _growth(canary)
    if g_c is None:
        return Assessment(
            "lag_growth",
            State.WAITING,
            "lag_growth: no messages produced to the canary's work units in the window",
            policy.critical,
            evidence,
        )
    g_s = _growth(stable) if len(stable) >= need else None
    limit = max(policy.absolute_tolerance, (1.0 + policy.tolerance) * max(g_s or 0.0, 0.0))
    evidence.update(canary_growth=g_c, stable_growth=g_s, limit=limit)
    stable_text = f"stable {g_s:+.2%}" if g_s is not None else "stable not sampled"
    seen = f"canary lag grew by {g_c:+.2%} of produced messages, {stable_text}"
    if g_c > limit:
        return Assessment(
            "lag_growth",
            State.FAIL,
            f"lag_growth: {seen}: canary is falling behind (limit {limit:.2%})",
            policy.critical,
            evidence,
        )
    return Assessment(
        "lag_growth",
        State.PASS,
        f"lag_growth: {seen}: keeping up (limit {limit:.2%})",
        policy.critical,
        evidence,
    )
