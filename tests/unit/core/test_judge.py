"""judge_step on synthetic per-second streams: one metric type at a time, the edge cases, the
verdict rules, and seeded A/A runs that bound the false-fail rate."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pubsub_canary.core.judge import (
    AnalysisPolicy,
    Direction,
    KpiPolicy,
    LagPolicy,
    LatencyPolicy,
    Promotion,
    RatePolicy,
    judge_step,
    metric_alpha,
    statistical_metric_count,
)
from pubsub_canary.core.observations import (
    LATENCY_BUCKETS,
    CohortObservations,
    Judgement,
    KpiStats,
    LagSample,
    LatencyHistogram,
    Verdict,
)
from pubsub_canary.errors import ConfigError

_EDGES = np.asarray(LATENCY_BUCKETS)

ERRORS_ONLY = AnalysisPolicy(dead_letter_rate=None, latency=None, lag_growth=None)


def _only(**metrics: object) -> AnalysisPolicy:
    base: dict[str, object] = {
        "error_rate": None,
        "dead_letter_rate": None,
        "latency": None,
        "lag_growth": None,
    }
    base.update(metrics)
    return AnalysisPolicy.model_validate(base)


@dataclass(frozen=True)
class Cohort:
    """How one simulated cohort behaves, per second."""

    per_second: float = 100.0
    error_rate: float = 0.005
    dead_letter_rate: float = 0.0
    latency_median: float | None = None  # seconds; lognormal with sigma 0.5
    kpi_mean: float | None = None  # reward ~ N(mean, 1)


def _histogram(rng: np.random.Generator, n: int, median: float) -> LatencyHistogram:
    samples = rng.lognormal(np.log(median), 0.5, size=n)
    idx = np.searchsorted(_EDGES, samples, side="left")  # LatencyHistogram.bucket_of
    counts = np.bincount(idx, minlength=len(LATENCY_BUCKETS) + 1)
    return LatencyHistogram(tuple(int(c) for c in counts))


def _delta(rng: np.random.Generator, c: Cohort, second: int) -> CohortObservations:
    n = int(rng.poisson(c.per_second))
    kpis = {}
    if c.kpi_mean is not None and n:
        values = rng.normal(c.kpi_mean, 1.0, size=n)
        kpis["reward"] = KpiStats(n, float(values.sum()), float((values * values).sum()))
    return CohortObservations(
        processed=n,
        errors=int(rng.binomial(n, c.error_rate)),
        dead_lettered=int(rng.binomial(n, c.dead_letter_rate)),
        latency=_histogram(rng, n, c.latency_median) if c.latency_median else LatencyHistogram(),
        kpis=kpis,
        elapsed_seconds=float(second),
    )


def stream(
    seconds: int, canary: Cohort, stable: Cohort, *, seed: int
) -> Iterator[tuple[int, CohortObservations, CohortObservations]]:
    """Cumulative (second, canary, stable) after each second, merged from deltas as the
    coordinator does."""
    rng = np.random.default_rng(seed)
    cum_c, cum_s = CohortObservations(), CohortObservations()
    for t in range(1, seconds + 1):
        cum_c = cum_c.merge(_delta(rng, canary, t))
        cum_s = cum_s.merge(_delta(rng, stable, t))
        yield t, cum_c, cum_s


def run(
    policy: AnalysisPolicy,
    seconds: int,
    canary: Cohort,
    stable: Cohort,
    *,
    seed: int = 0,
    hold: int | None = None,
    step_count: int = 1,
) -> tuple[int, Judgement]:
    """Judge after every second; stop at the first terminal verdict (not CONTINUE)."""
    hold = seconds if hold is None else hold
    j = Judgement(Verdict.CONTINUE, "")
    for t, c, s in stream(seconds, canary, stable, seed=seed):
        j = judge_step(policy, s, c, step_index=0, step_count=step_count, hold_elapsed=t >= hold)
        if j.verdict is not Verdict.CONTINUE:
            return t, j
    return seconds, j


def metric(j: Judgement, name: str) -> Verdict:
    (found,) = [m for m in j.metrics if m.metric == name]
    return found.verdict


STABLE = Cohort(per_second=900)
CANARY = Cohort(per_second=100)


# --- counts: error rate and dead-letter rate ---------------------------------------------


def test_reference_error_regression_fails_within_seconds() -> None:
    t, j = run(ERRORS_ONLY, 120, replace(CANARY, error_rate=0.025), STABLE, seed=1)
    assert j.verdict is Verdict.FAIL and t <= 30
    assert metric(j, "error_rate") is Verdict.FAIL
    assert "error_rate" in j.reason and "worse than stable +20%" in j.reason
    (m,) = j.metrics
    assert m.evidence["e_value_worse"] >= m.evidence["e_threshold_worse"]  # type: ignore[operator]


def test_aa_error_rates_pass_at_the_end_of_the_hold_and_not_before() -> None:
    t, j = run(ERRORS_ONLY, 300, CANARY, STABLE, seed=2)
    assert (t, j.verdict) == (300, Verdict.PASS)
    assert "no regression detected" in j.reason


def test_dead_letter_regression_fails_on_its_own_metric() -> None:
    policy = _only(dead_letter_rate=RatePolicy())
    canary = replace(CANARY, dead_letter_rate=0.02)
    _, j = run(policy, 120, canary, replace(STABLE, dead_letter_rate=0.002), seed=3)
    assert j.verdict is Verdict.FAIL and metric(j, "dead_letter_rate") is Verdict.FAIL


def test_no_data_yet_continues_then_is_inconclusive() -> None:
    empty = CohortObservations()
    for policy in (AnalysisPolicy(), AnalysisPolicy(promotion=Promotion.METRIC)):
        j = judge_step(policy, empty, empty, step_index=0, step_count=1, hold_elapsed=False)
        assert j.verdict is Verdict.CONTINUE
        assert {m.verdict for m in j.metrics} == {Verdict.CONTINUE}
        j = judge_step(policy, empty, empty, step_index=0, step_count=1, hold_elapsed=True)
        assert j.verdict is Verdict.INCONCLUSIVE
        assert "no messages from either cohort" in j.reason


@pytest.mark.parametrize("silent", ["canary", "stable"])
def test_one_silent_cohort_never_fails_and_ends_inconclusive(silent: str) -> None:
    mute = Cohort(per_second=0.0)
    canary, stable = (mute, STABLE) if silent == "canary" else (CANARY, mute)
    t, j = run(ERRORS_ONLY, 120, canary, stable, seed=4)
    assert (t, j.verdict) == (120, Verdict.INCONCLUSIVE)
    assert f"{silent} has no messages" in j.reason


def test_zero_failures_on_both_sides() -> None:
    clean_c, clean_s = replace(CANARY, error_rate=0.0), replace(STABLE, error_rate=0.0)
    t, j = run(ERRORS_ONLY, 120, clean_c, clean_s, seed=5)
    assert (t, j.verdict) == (120, Verdict.PASS)
    # With metric promotion, zero failures pass once the canary's rate is shown below the
    # absolute tolerance (0.1%): a few thousand messages.
    policy = ERRORS_ONLY.model_copy(update={"promotion": Promotion.METRIC})
    t, j = run(policy, 300, clean_c, clean_s, seed=5)
    assert j.verdict is Verdict.PASS and 30 <= t < 300


@pytest.mark.parametrize(("canary_per_s", "stable_per_s"), [(5, 995), (995, 5)])
def test_huge_traffic_skew_between_cohorts(canary_per_s: int, stable_per_s: int) -> None:
    """A canary whose partitions carry 0.5% (or 99.5%) of the traffic: same rates never fail,
    a 5x regression still does."""
    canary, stable = Cohort(per_second=canary_per_s), Cohort(per_second=stable_per_s)
    for seed in range(5):
        _, j = run(ERRORS_ONLY, 300, canary, stable, seed=seed)
        assert j.verdict is not Verdict.FAIL
    _, j = run(ERRORS_ONLY, 1200, replace(canary, error_rate=0.025), stable, seed=9)
    assert j.verdict is Verdict.FAIL


def test_traffic_swinging_between_cohorts_does_not_fake_a_regression() -> None:
    """The canary's share of the messages swings 1% <-> 50% every 30 s; the test never
    assumes a share, so a same-rate canary still does not fail."""
    policy = _only(error_rate=RatePolicy(tolerance=0.0, absolute_tolerance=0.0))
    rng = np.random.default_rng(12)
    fails = 0
    for _ in range(30):
        c = s = CohortObservations()
        for t in range(1, 301):
            share = 0.5 if (t // 30) % 2 else 0.01
            n = int(rng.poisson(1000))
            a = int(rng.binomial(n, share))
            c = c.merge(CohortObservations(processed=a, errors=int(rng.binomial(a, 0.01))))
            s = s.merge(CohortObservations(processed=n - a, errors=int(rng.binomial(n - a, 0.01))))
            j = judge_step(policy, s, c, step_index=0, step_count=1, hold_elapsed=False)
            if j.verdict is Verdict.FAIL:
                fails += 1
                break
    assert fails == 0


# --- latency ------------------------------------------------------------------------------


LATENCY_ONLY = _only(latency=LatencyPolicy())


def test_latency_regression_fails() -> None:
    canary = replace(CANARY, latency_median=0.040)
    t, j = run(LATENCY_ONLY, 180, canary, replace(STABLE, latency_median=0.020), seed=6)
    assert j.verdict is Verdict.FAIL and metric(j, "latency") is Verdict.FAIL
    assert "latency p99" in j.reason and t <= 60


def test_same_latency_never_fails_and_passes_on_evidence_with_metric_promotion() -> None:
    policy = LATENCY_ONLY.model_copy(update={"promotion": Promotion.METRIC})
    canary, stable = replace(CANARY, latency_median=0.02), replace(STABLE, latency_median=0.02)
    t, j = run(
        policy, 600, replace(canary, per_second=400), replace(stable, per_second=600), seed=7
    )
    assert j.verdict is Verdict.PASS and t < 600
    assert metric(j, "latency") is Verdict.PASS


def test_latency_waits_for_min_sample() -> None:
    canary, stable = replace(CANARY, latency_median=0.5), replace(STABLE, latency_median=0.01)
    c = CohortObservations(latency=LatencyHistogram.of([0.5] * 50))
    s = CohortObservations(latency=LatencyHistogram.of([0.01] * 5000))
    j = judge_step(LATENCY_ONLY, s, c, step_index=0, step_count=1, hold_elapsed=False)
    assert j.verdict is Verdict.CONTINUE and "waiting for 200 latency samples" in j.reason
    _, j = run(LATENCY_ONLY, 30, canary, stable, seed=1)
    assert j.verdict is Verdict.FAIL


# --- custom KPIs --------------------------------------------------------------------------


def _kpi_policy(direction: Direction, **extra: object) -> AnalysisPolicy:
    return _only(kpis={"reward": KpiPolicy(direction=direction, tolerance=0.05, **extra)})


@pytest.mark.parametrize("bounds", [None, (-10.0, 10.0)])
def test_kpi_drop_fails_when_higher_is_better(bounds: tuple[float, float] | None) -> None:
    policy = _kpi_policy(Direction.HIGHER_IS_BETTER, bounds=bounds)
    canary, stable = replace(CANARY, kpi_mean=1.5), replace(STABLE, kpi_mean=2.0)
    _, j = run(policy, 300, canary, stable, seed=8)
    assert j.verdict is Verdict.FAIL and metric(j, "kpi:reward") is Verdict.FAIL


def test_kpi_rise_fails_when_lower_is_better_and_not_when_higher_is_better() -> None:
    canary, stable = replace(CANARY, kpi_mean=2.5), replace(STABLE, kpi_mean=2.0)
    _, j = run(_kpi_policy(Direction.LOWER_IS_BETTER), 120, canary, stable, seed=9)
    assert j.verdict is Verdict.FAIL
    policy = _kpi_policy(Direction.HIGHER_IS_BETTER).model_copy(
        update={"promotion": Promotion.METRIC}
    )
    _, j = run(policy, 120, canary, stable, seed=9)
    assert j.verdict is Verdict.PASS


def test_kpi_with_negative_means_uses_the_magnitude_for_the_tolerance() -> None:
    canary, stable = replace(CANARY, kpi_mean=-2.02), replace(STABLE, kpi_mean=-2.0)
    _, j = run(_kpi_policy(Direction.HIGHER_IS_BETTER), 300, canary, stable, seed=10)
    assert j.verdict is Verdict.PASS  # 1% worse, 5% tolerated
    canary = replace(CANARY, kpi_mean=-3.0)
    _, j = run(_kpi_policy(Direction.HIGHER_IS_BETTER), 300, canary, stable, seed=10)
    assert j.verdict is Verdict.FAIL


def test_kpi_missing_on_one_side_waits() -> None:
    c = CohortObservations(kpis={"reward": KpiStats.of([1.0] * 500)})
    j = judge_step(
        _kpi_policy(Direction.HIGHER_IS_BETTER),
        CohortObservations(),
        c,
        step_index=0,
        step_count=1,
        hold_elapsed=True,
    )
    assert j.verdict is Verdict.INCONCLUSIVE and "stable has no values" in j.reason


# --- lag growth ---------------------------------------------------------------------------


def _lag_series(rate_in: float, rate_out: float, *, seconds: int = 30) -> tuple[LagSample, ...]:
    """Lag each second for a cohort receiving ``rate_in`` msg/s and consuming up to
    ``rate_out`` msg/s in batches (a saw-tooth when it keeps up)."""
    lag = produced = 0
    out = []
    for t in range(seconds):
        produced += int(rate_in)
        lag += int(rate_in)
        if t % 3 == 2:  # commits every 3 s
            lag = max(0, lag - int(3 * rate_out))
        out.append(LagSample(at=float(t), lag=lag, produced=produced))
    return tuple(out)


LAG_ONLY = _only(lag_growth=LagPolicy())


def _judge_lag(canary: tuple[LagSample, ...], stable: tuple[LagSample, ...]) -> Judgement:
    return judge_step(
        LAG_ONLY,
        CohortObservations(lag=stable),
        CohortObservations(lag=canary),
        step_index=0,
        step_count=1,
        hold_elapsed=False,
    )


def test_canary_falling_behind_while_stable_keeps_up_fails() -> None:
    j = _judge_lag(_lag_series(100, 80), _lag_series(900, 1000))
    assert j.verdict is Verdict.FAIL and "falling behind" in j.reason


def test_lag_saw_tooth_of_a_healthy_consumer_is_not_growth() -> None:
    j = _judge_lag(_lag_series(100, 100), _lag_series(900, 1000))
    assert j.verdict is Verdict.CONTINUE and metric(j, "lag_growth") is Verdict.PASS


def test_lag_growing_in_both_cohorts_alike_is_not_the_canarys_fault() -> None:
    j = _judge_lag(_lag_series(100, 70), _lag_series(900, 630))
    assert metric(j, "lag_growth") is Verdict.PASS


def test_lag_is_normalised_by_traffic() -> None:
    """A hot canary partition adds more lag in messages, not in share of its traffic."""
    j = _judge_lag(_lag_series(5000, 5000), _lag_series(50, 50))
    assert metric(j, "lag_growth") is Verdict.PASS


def test_lag_waits_for_a_window_and_for_traffic() -> None:
    j = _judge_lag(_lag_series(100, 0, seconds=5), ())
    assert metric(j, "lag_growth") is Verdict.CONTINUE and "10 canary lag samples" in j.reason
    idle = tuple(LagSample(at=float(t), lag=7, produced=40) for t in range(12))
    j = _judge_lag(idle, ())
    assert "no messages produced" in j.reason


# --- verdict rules ------------------------------------------------------------------------


def test_time_promotion_passes_only_when_the_hold_elapsed() -> None:
    seen = [
        j.verdict
        for t, c, s in stream(60, CANARY, STABLE, seed=13)
        for j in [judge_step(ERRORS_ONLY, s, c, step_index=0, step_count=1, hold_elapsed=t >= 60)]
    ]
    assert seen[:-1] == [Verdict.CONTINUE] * 59 and seen[-1] is Verdict.PASS


def test_metric_promotion_is_inconclusive_when_the_hold_ends_without_evidence() -> None:
    policy = ERRORS_ONLY.model_copy(update={"promotion": Promotion.METRIC})
    t, j = run(policy, 60, CANARY, STABLE, seed=14)
    assert (t, j.verdict) == (60, Verdict.INCONCLUSIVE)
    assert metric(j, "error_rate") is Verdict.INCONCLUSIVE


def test_non_critical_failure_holds_promotion_back_without_rolling_back() -> None:
    policy = _only(
        error_rate=RatePolicy(),
        dead_letter_rate=RatePolicy(critical=False),
    )
    canary = replace(CANARY, dead_letter_rate=0.05)
    t, j = run(policy, 120, canary, replace(STABLE, dead_letter_rate=0.001), seed=15)
    assert (t, j.verdict) == (120, Verdict.INCONCLUSIVE)
    assert metric(j, "dead_letter_rate") is Verdict.FAIL
    assert "non-critical dead_letter_rate" in j.reason


@pytest.mark.parametrize("promotion", list(Promotion))
def test_critical_failure_wins_over_missing_data_and_an_elapsed_hold(promotion: Promotion) -> None:
    c = CohortObservations(processed=2000, errors=100)
    s = CohortObservations(processed=18000, errors=90)
    policy = AnalysisPolicy(promotion=promotion)  # latency and lag have no data at all
    j = judge_step(policy, s, c, step_index=0, step_count=1, hold_elapsed=True)
    assert j.verdict is Verdict.FAIL and j.reason.startswith("canary worse than stable")
    assert metric(j, "latency") is Verdict.INCONCLUSIVE


def test_alpha_is_split_over_steps_and_statistical_metrics() -> None:
    policy = AnalysisPolicy(kpis={"reward": KpiPolicy(direction=Direction.HIGHER_IS_BETTER)})
    assert statistical_metric_count(policy) == 4  # error, dead letter, latency, reward
    assert metric_alpha(policy, step_count=5) == pytest.approx(0.01 / 5 / 4)
    assert metric_alpha(_only(), step_count=1) == 0.01
    more_steps = run(ERRORS_ONLY, 120, replace(CANARY, error_rate=0.025), STABLE, seed=1)
    fewer = run(ERRORS_ONLY, 120, replace(CANARY, error_rate=0.025), STABLE, seed=1, step_count=20)
    assert more_steps[0] <= fewer[0]


@pytest.mark.parametrize(("index", "count"), [(0, 0), (-1, 3), (3, 3)])
def test_bad_step_arguments_raise_config_errors(index: int, count: int) -> None:
    empty = CohortObservations()
    with pytest.raises(ConfigError, match="step_"):
        judge_step(
            AnalysisPolicy(), empty, empty, step_index=index, step_count=count, hold_elapsed=False
        )


def test_judge_is_pure() -> None:
    c = CohortObservations(processed=1000, errors=30)
    s = CohortObservations(processed=9000, errors=40)
    first, again = (
        judge_step(AnalysisPolicy(), s, c, step_index=0, step_count=2, hold_elapsed=False)
        for _ in range(2)
    )
    assert first == again


# --- properties ---------------------------------------------------------------------------

counts = st.integers(min_value=0, max_value=10**9)
hist = st.lists(st.integers(0, 10**6), min_size=len(LATENCY_BUCKETS) + 1, max_size=54).map(
    lambda c: LatencyHistogram(tuple(c))
)
lag = st.lists(
    st.builds(LagSample, at=st.floats(0, 1e6), lag=counts, produced=counts), max_size=15
).map(tuple)
kpi = st.builds(
    KpiStats,
    count=st.integers(0, 10**6),
    total=st.floats(-1e9, 1e9),
    total_sq=st.floats(0, 1e12),
)
observations = st.builds(
    CohortObservations,
    processed=counts,
    errors=counts,
    dead_lettered=counts,
    redeliveries=counts,
    latency=hist,
    kpis=st.dictionaries(st.sampled_from(["reward", "cost"]), kpi, max_size=2),
    lag=lag,
    elapsed_seconds=st.floats(0, 1e6),
)
KPI_POLICY = AnalysisPolicy(
    kpis={
        "reward": KpiPolicy(direction=Direction.HIGHER_IS_BETTER),
        "cost": KpiPolicy(direction=Direction.LOWER_IS_BETTER, bounds=(0, 5)),
    }
)


@settings(max_examples=200, deadline=None)
@given(
    stable=observations,
    canary=observations,
    step=st.integers(0, 9),
    hold=st.booleans(),
    metric_promotion=st.booleans(),
)
def test_never_crashes_on_any_non_negative_counts(
    stable: CohortObservations,
    canary: CohortObservations,
    step: int,
    hold: bool,
    metric_promotion: bool,
) -> None:
    policy = KPI_POLICY.model_copy(
        update={"promotion": Promotion.METRIC if metric_promotion else Promotion.TIME}
    )
    j = judge_step(policy, stable, canary, step_index=step, step_count=10, hold_elapsed=hold)
    assert isinstance(j.verdict, Verdict) and j.reason
    assert len(j.metrics) == 6
    if not hold:
        assert j.verdict is not Verdict.INCONCLUSIVE


@settings(max_examples=200, deadline=None)
@given(
    processed=counts,
    latency=hist,
    lag=lag,
    kpis=st.dictionaries(st.sampled_from(["reward", "cost"]), kpi, max_size=2),
    hold=st.booleans(),
)
def test_identical_cohorts_with_zero_failures_never_fail(
    processed: int,
    latency: LatencyHistogram,
    lag: tuple[LagSample, ...],
    kpis: dict[str, KpiStats],
    hold: bool,
) -> None:
    same = CohortObservations(processed=processed, latency=latency, lag=lag, kpis=kpis)
    for policy in (KPI_POLICY, KPI_POLICY.model_copy(update={"promotion": Promotion.METRIC})):
        j = judge_step(policy, same, same, step_index=0, step_count=1, hold_elapsed=hold)
        assert j.verdict is not Verdict.FAIL
        assert all(m.verdict is not Verdict.FAIL for m in j.metrics)


# --- seeded A/A runs: the false-fail rate -------------------------------------------------


def test_aa_false_fail_rate_at_the_null_boundary_is_below_alpha() -> None:
    """300 A/A runs, a look every second for 5 minutes, with no tolerance at all (the hardest
    case for the test: identical rates sit exactly on the null's boundary)."""
    alpha = 0.05
    policy = AnalysisPolicy(
        alpha=alpha,
        error_rate=RatePolicy(tolerance=0.0, absolute_tolerance=0.0, min_sample=1),
        dead_letter_rate=None,
        latency=None,
        lag_growth=None,
    )
    rng = np.random.default_rng(2024)
    runs, seconds = 300, 300
    nc = np.cumsum(rng.poisson(100, (runs, seconds)), axis=1)
    ns = np.cumsum(rng.poisson(900, (runs, seconds)), axis=1)
    xc = np.cumsum(rng.binomial(np.diff(nc, axis=1, prepend=0), 0.01), axis=1)
    xs = np.cumsum(rng.binomial(np.diff(ns, axis=1, prepend=0), 0.01), axis=1)
    fails = 0
    for r in range(runs):
        for t in range(seconds):
            c = CohortObservations(processed=int(nc[r, t]), errors=int(xc[r, t]))
            s = CohortObservations(processed=int(ns[r, t]), errors=int(xs[r, t]))
            j = judge_step(policy, s, c, step_index=0, step_count=1, hold_elapsed=False)
            if j.verdict is Verdict.FAIL:
                fails += 1
                break
    assert fails / runs <= alpha


def test_aa_latency_false_fail_rate_with_no_tolerance_is_below_alpha() -> None:
    alpha = 0.05
    policy = _only(latency=LatencyPolicy(tolerance=0.0, min_sample=1)).model_copy(
        update={"alpha": alpha}
    )
    same = Cohort(per_second=100, latency_median=0.02)
    fails = 0
    for seed in range(60):
        _, j = run(policy, 60, same, same, seed=1000 + seed)
        fails += j.verdict is Verdict.FAIL
    assert fails / 60 <= alpha
