"""The e-values and confidence sequences: exact optimisation, monotonicity, and validity under
optional stopping, checked by seeded simulation."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar  # type: ignore[import-untyped]

from pubsub_canary.core.judge.sequential import (
    bernoulli_loglik,
    log_e_rate_above,
    log_e_rate_below,
    log_e_two_rates,
    log_kt_marginal,
    mean_cs_radius,
)


def _best_on(f: Callable[[float], float], lo: float, hi: float) -> float:
    """Maximum of a unimodal function: dense grid, then a bounded refinement."""
    if hi <= lo:
        return f(lo)
    grid = np.linspace(lo, hi, 801)
    values = [f(float(x)) for x in grid]
    i = int(np.argmax(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = minimize_scalar(
        lambda x: -f(x), bounds=(a, b), method="bounded", options={"xatol": 1e-14}
    )
    return float(max(max(values), -float(res.fun)))


def _numeric(xc: int, nc: int, xs: int, ns: int, ratio: float, floor: float) -> tuple[float, float]:
    def ll(rc: float, rs: float) -> float:
        return bernoulli_loglik(xc, nc, rc) + bernoulli_loglik(xs, ns, rs)

    rc_hat = xc / nc if nc else 0.0
    rs_hat = xs / ns if ns else 0.0
    sup_ok = max(
        ll(min(rc_hat, floor), rs_hat),
        _best_on(lambda rs: ll(min(rc_hat, ratio * rs), rs), 0.0, 1.0),
    )
    sup_bad = _best_on(
        lambda rs: ll(min(1.0, max(rc_hat, ratio * rs, floor)), rs), 0.0, min(1.0, 1.0 / ratio)
    )
    num = log_kt_marginal(xc, nc) + log_kt_marginal(xs, ns)
    return num - sup_ok, num - sup_bad


def test_two_rate_e_values_match_numerical_optimisation() -> None:
    rng = np.random.default_rng(7)
    for _ in range(60):
        nc, ns = (int(v) for v in rng.integers(0, 3000, 2))
        rate = rng.choice([0.001, 0.01, 0.1, 0.5])
        xc = int(rng.binomial(nc, min(1.0, rate * rng.choice([1, 3]))))
        xs = int(rng.binomial(ns, rate))
        ratio = float(rng.choice([1.0, 1.2, 2.0]))
        floor = float(rng.choice([0.0, 0.001, 0.3]))
        got = log_e_two_rates(xc, nc, xs, ns, ratio=ratio, floor=floor)
        want = _numeric(xc, nc, xs, ns, ratio, floor)
        assert got == pytest.approx(want, abs=1e-6)


@given(
    nc=st.integers(0, 10**7),
    ns=st.integers(0, 10**7),
    fc=st.floats(0, 1),
    fs=st.floats(0, 1),
    ratio=st.floats(1, 20),
    floor=st.floats(0, 1),
)
def test_two_rate_e_values_are_defined_and_at_most_one_inside_their_null(
    nc: int, ns: int, fc: float, fs: float, ratio: float, floor: float
) -> None:
    xc, xs = int(nc * fc), int(ns * fs)
    worse, no_worse = log_e_two_rates(xc, nc, xs, ns, ratio=ratio, floor=floor)
    # +inf is a legitimate e-value: data that contradict a null outright (a success against
    # "the rate is 1"); never NaN, never -inf.
    assert not math.isnan(worse) and not math.isnan(no_worse)
    assert worse > -math.inf and no_worse > -math.inf
    rc = xc / nc if nc else 0.0
    rs = xs / ns if ns else 0.0
    if rc <= max(ratio * rs, floor):
        assert worse <= 1e-9  # the data sit in "acceptable": no evidence against it
    if rc >= max(ratio * rs, floor):
        assert no_worse <= 1e-9


@given(n=st.integers(1, 10**6), p0=st.floats(0.001, 0.999), k=st.integers(0, 10**6))
def test_one_sample_e_values_are_monotone_in_the_count(n: int, p0: float, k: int) -> None:
    k = min(k, n - 1)
    up, up_next = log_e_rate_above(k, n, p0), log_e_rate_above(k + 1, n, p0)
    down, down_next = log_e_rate_below(k, n, p0), log_e_rate_below(k + 1, n, p0)
    # Monotone where it matters (above 1); inside the null both are at most 1.
    if up > 0:
        assert up_next >= up - 1e-9
    if down_next > 0:
        assert down >= down_next - 1e-9
    assert min(up, down) <= 1e-9


def test_two_rate_test_is_valid_under_optional_stopping_and_uneven_interleaving() -> None:
    """At the null's boundary (canary rate exactly 1.2x stable), with the canary's share of
    messages swinging between 2% and 60% and a look after every batch, the test crosses
    1/alpha in at most about alpha of the runs."""
    rng = np.random.default_rng(11)
    alpha, runs, looks = 0.1, 300, 200
    crossed = 0
    for _ in range(runs):
        rs, nc, ns, xc, xs = 0.02, 0, 0, 0, 0
        for t in range(looks):
            share = 0.6 if (t // 20) % 2 else 0.02
            a = int(rng.binomial(200, share))
            b = 200 - a
            nc, ns = nc + a, ns + b
            xc += int(rng.binomial(a, 1.2 * rs))
            xs += int(rng.binomial(b, rs))
            worse, _ = log_e_two_rates(xc, nc, xs, ns, ratio=1.2, floor=0.0)
            if worse >= math.log(1 / alpha):
                crossed += 1
                break
    assert crossed <= alpha * runs


def test_quantile_bounds_from_one_sample_tests_cover_under_optional_stopping() -> None:
    """The one-sided tests that make the latency bounds: under their null, crossing at any of
    many looks happens in at most about alpha of the runs."""
    rng = np.random.default_rng(5)
    alpha, runs, looks, q = 0.1, 400, 100, 0.99
    above = below = 0
    for _ in range(runs):
        k = n = 0
        hit_above = hit_below = False
        for _ in range(looks):
            n += 50
            k += int(rng.binomial(50, q))
            hit_above |= log_e_rate_above(k, n, q) >= math.log(1 / alpha)
            hit_below |= log_e_rate_below(k, n, q) >= math.log(1 / alpha)
        above += hit_above
        below += hit_below
    assert above <= alpha * runs and below <= alpha * runs


def test_normal_mixture_sequence_covers_a_gaussian_mean_at_every_look() -> None:
    rng = np.random.default_rng(3)
    alpha, runs, n = 0.1, 300, 2000
    data = rng.normal(0.0, 2.0, size=(runs, n))
    means = np.cumsum(data, axis=1) / np.arange(1, n + 1)
    radii = np.array([mean_cs_radius(t, 2.0, alpha, design_count=500) for t in range(1, n + 1)])
    misses = int(np.any(np.abs(means) > radii, axis=1).sum())
    assert misses <= alpha * runs
    # A fixed-width 90% interval re-checked at every look misses far more often.
    fixed = 1.645 * 2.0 / np.sqrt(np.arange(1, n + 1))
    assert int(np.any(np.abs(means) > fixed, axis=1).sum()) > 3 * misses


def test_radius_edge_cases() -> None:
    assert mean_cs_radius(0, 1.0, 0.05, design_count=100) == math.inf
    assert mean_cs_radius(10, 0.0, 0.05, design_count=100) == 0.0
    r100 = mean_cs_radius(100, 1.0, 0.05, design_count=100)
    r10000 = mean_cs_radius(10000, 1.0, 0.05, design_count=100)
    assert 0 < r10000 < r100
