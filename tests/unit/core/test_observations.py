"""Observation types: latency histogram quantiles and merges, KPI moments, cohort merges."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pubsub_canary.core.observations import (
    LATENCY_BUCKETS,
    CohortObservations,
    KpiStats,
    LagSample,
    LatencyHistogram,
)

_latencies = st.lists(st.floats(0.0, 120.0, allow_nan=False), max_size=200)


def test_buckets_are_increasing_and_cover_half_a_millisecond_to_a_minute() -> None:
    assert LATENCY_BUCKETS[0] == 0.0005
    assert all(a < b for a, b in itertools.pairwise(LATENCY_BUCKETS))
    assert 50 < LATENCY_BUCKETS[-1] <= 60
    # Log-spaced at 1.25: a quantile is resolved within 25% anywhere in the range.
    assert max(b / a for a, b in itertools.pairwise(LATENCY_BUCKETS)) < 1.26


@pytest.mark.parametrize(
    ("seconds", "bucket"),
    [(0.0, 0), (0.0005, 0), (0.00051, 1), (0.000625, 1), (60.0, len(LATENCY_BUCKETS)), (1e9, -1)],
)
def test_bucket_upper_bounds_are_inclusive(seconds: float, bucket: int) -> None:
    counts = LatencyHistogram.of([seconds]).counts
    assert counts[bucket] == 1 and sum(counts) == 1


def test_quantiles_of_a_known_distribution() -> None:
    # 90 fast (10 ms) and 10 slow (2 s) messages.
    h = LatencyHistogram.of([0.010] * 90 + [2.0] * 10)
    fast = LATENCY_BUCKETS[LatencyHistogram.bucket_of(0.010)]
    slow = LATENCY_BUCKETS[LatencyHistogram.bucket_of(2.0)]

    assert 0.010 <= fast < 0.010 * 1.25 and 2.0 <= slow < 2.0 * 1.25
    assert h.quantile(0.5) == fast
    assert h.quantile(0.9) == fast
    assert h.quantile(0.91) == slow
    assert h.quantile(0.99) == slow
    assert h.quantile(1.0) == slow
    assert h.total == 100


def test_quantile_zero_is_the_smallest_samples_bucket() -> None:
    h = LatencyHistogram.of([0.010] * 10)
    assert h.quantile(0.0) == h.quantile(0.5)


def test_quantile_of_empty_and_overflow() -> None:
    assert LatencyHistogram().quantile(0.99) is None
    assert LatencyHistogram.of([0.01, 300.0]).quantile(1.0) == math.inf


@settings(max_examples=200, deadline=None)
@given(_latencies.filter(bool), st.floats(0.0, 1.0))
def test_quantile_bounds_the_exact_quantile_from_above_within_a_bucket(
    samples: list[float], q: float
) -> None:
    h = LatencyHistogram.of(samples)
    exact = sorted(samples)[max(0, math.ceil(q * len(samples)) - 1)]
    got = h.quantile(q)
    assert got is not None and got >= exact
    if exact > LATENCY_BUCKETS[0] and got != math.inf:
        assert got < exact * 1.25 + 1e-9


@settings(max_examples=200, deadline=None)
@given(_latencies, _latencies)
def test_merge_is_the_histogram_of_all_samples(a: list[float], b: list[float]) -> None:
    ha, hb = LatencyHistogram.of(a), LatencyHistogram.of(b)
    assert ha.merge(hb) == LatencyHistogram.of(a + b) == hb.merge(ha)
    assert ha.merge(LatencyHistogram()) == ha


def test_count_above_counts_only_samples_surely_above() -> None:
    h = LatencyHistogram.of([0.00055, 0.001, 0.5, 2.0, 100.0])
    # 0.0006 falls inside the bucket (0.0005, 0.000625]; its 0.00055 sample is not above.
    assert h.count_above(0.0006) == 4
    assert h.count_above(LATENCY_BUCKETS[0]) == 5
    assert h.count_above(1.0) == 2
    assert h.count_above(1000.0) == 0


@settings(max_examples=200, deadline=None)
@given(_latencies, st.floats(0.0, 70.0))
def test_count_above_never_counts_a_sample_at_or_below_the_limit(
    samples: list[float], limit: float
) -> None:
    above = LatencyHistogram.of(samples).count_above(limit)
    assert above <= sum(1 for s in samples if s > limit)


def test_kpi_mean_and_variance() -> None:
    values = [1.0, 2.0, 4.0, 7.0]
    k = KpiStats.of(values)
    assert (k.count, k.total, k.total_sq) == (4, 14.0, 70.0)
    assert k.mean == pytest.approx(3.5)
    assert k.variance == pytest.approx(statistics.variance(values))
    assert KpiStats().mean is None and KpiStats.of([3.0]).variance is None
    assert KpiStats.of([2.0, 2.0, 2.0]).variance == 0.0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-1000, 1000), min_size=0, max_size=50),
    st.lists(st.floats(-1000, 1000), min_size=0, max_size=50),
)
def test_kpi_merge_equals_stats_of_all_values(a: list[float], b: list[float]) -> None:
    merged = KpiStats.of(a).merge(KpiStats.of(b))
    both = KpiStats.of(a + b)
    assert merged.count == both.count
    assert merged.total == pytest.approx(both.total, abs=1e-6)
    if len(a + b) >= 2:
        assert merged.variance == pytest.approx(statistics.variance(a + b), rel=1e-6, abs=1e-6)


def test_cohort_merge_adds_counts_and_merges_kpis() -> None:
    first = CohortObservations(
        processed=100,
        errors=3,
        dead_lettered=1,
        redeliveries=2,
        latency=LatencyHistogram.of([0.01] * 100),
        kpis={"reward": KpiStats.of([1.0, 2.0]), "clicks": KpiStats.of([5.0])},
        lag=(LagSample(1.0, 10, 100),),
        elapsed_seconds=10.0,
    )
    delta = CohortObservations(
        processed=50,
        errors=1,
        latency=LatencyHistogram.of([0.5] * 50),
        kpis={"reward": KpiStats.of([3.0]), "latency_budget": KpiStats.of([0.2])},
        lag=(LagSample(2.0, 12, 160),),
        elapsed_seconds=15.0,
    )

    total = first.merge(delta)

    assert (total.processed, total.errors, total.dead_lettered, total.redeliveries) == (
        150,
        4,
        1,
        2,
    )
    assert total.latency == LatencyHistogram.of([0.01] * 100 + [0.5] * 50)
    assert total.kpis == {
        "reward": KpiStats.of([1.0, 2.0, 3.0]),
        "clicks": KpiStats.of([5.0]),
        "latency_budget": KpiStats.of([0.2]),
    }
    assert [s.at for s in total.lag] == [1.0, 2.0]
    assert total.elapsed_seconds == 15.0
    assert total.error_rate == pytest.approx(4 / 150)
    assert total.dead_letter_rate == pytest.approx(1 / 150)
    # Merging returns a new value; the inputs are untouched.
    assert first.processed == 100 and dict(first.kpis).keys() == {"reward", "clicks"}


def test_rates_of_an_empty_cohort_are_unknown() -> None:
    empty = CohortObservations()
    assert empty.error_rate is None and empty.dead_letter_rate is None
    assert empty.merge(empty) == empty
