"""Anytime-valid statistics on cumulative counts, with the standard library only.

Two tools, both valid however often they are looked at (Ville's inequality):

* **E-values by universal inference** (Wasserman, Ramdas & Balakrishnan, PNAS 2020) for
  Bernoulli rates: the Krichevsky-Trofimov (Beta(1/2, 1/2)) mixture likelihood of the data over
  the largest likelihood any null parameter gives it. Under every parameter of the null, the
  ratio is bounded by a test martingale in the number of messages, so
  ``P(ever >= 1/alpha) <= alpha``. It only needs the cumulative counts, and it stays valid for
  any interleaving of the two cohorts' messages, any look times and any traffic skew, because it
  never assumes what share of the messages each cohort gets.
* **Normal-mixture confidence sequences** (Robbins 1970; Howard et al., AoS 2021) for means,
  exact for sub-Gaussian observations with a known scale, asymptotic with the sample variance
  (Waudby-Smith et al., "Time-uniform central limit theory and asymptotic confidence
  sequences", AoS 2024).

All functions take and return plain floats and work in logs, so huge counts neither overflow
nor lose precision.
"""

from __future__ import annotations

import math

__all__ = [
    "bernoulli_loglik",
    "log_e_rate_above",
    "log_e_rate_below",
    "log_e_two_rates",
    "log_kt_marginal",
    "mean_cs_radius",
]

_LOG_PI = math.log(math.pi)


def _xlog(count: float, p: float) -> float:
    """``count * log(p)`` with ``0 * log(0) = 0``."""
    if count == 0:
        return 0.0
    if p <= 0.0:
        return -math.inf
    return count * math.log(p)


def _xlog1m(count: float, p: float) -> float:
    """``count * log(1 - p)`` with ``0 * log(0) = 0``, precise for small ``p``."""
    if count == 0:
        return 0.0
    if p >= 1.0:
        return -math.inf
    return count * math.log1p(-p)


def bernoulli_loglik(k: float, n: float, p: float) -> float:
    """Log-likelihood of ``k`` events in ``n`` independent trials of probability ``p``."""
    return _xlog(k, p) + _xlog1m(n - k, p)


def log_kt_marginal(k: float, n: float) -> float:
    """Log probability of one sequence with ``k`` events in ``n`` trials under the KT mixture.

    The Beta(1/2, 1/2) (Jeffreys) mixture of Bernoulli likelihoods: its regret against the best
    single rate is at most ``log(2) + log(n)/2`` nats whatever the data, which is why it is the
    numerator of every e-value here.
    """
    if n <= 0:
        return 0.0
    return math.lgamma(k + 0.5) + math.lgamma(n - k + 0.5) - math.lgamma(n + 1.0) - _LOG_PI


def log_e_rate_above(k: float, n: float, p0: float) -> float:
    """Log e-value against ``H0: p <= p0`` from ``k`` events in ``n`` trials.

    Non-decreasing in ``k`` wherever it is positive, which the quantile confidence bounds rely on.
    """
    if n <= 0:
        return 0.0
    return log_kt_marginal(k, n) - bernoulli_loglik(k, n, min(k / n, p0))


def log_e_rate_below(k: float, n: float, p0: float) -> float:
    """Log e-value against ``H0: p >= p0`` from ``k`` events in ``n`` trials.

    Non-increasing in ``k`` wherever it is positive.
    """
    if n <= 0:
        return 0.0
    return log_kt_marginal(k, n) - bernoulli_loglik(k, n, max(k / n, p0))


def _boundary_rate(xc: float, nc: float, xs: float, ns: float, ratio: float) -> float:
    """The stable rate ``rs`` maximising the likelihood on the line ``rc = ratio * rs``.

    The log-likelihood along the line is concave in ``rs``; its derivative has the sign of
    ``A rs^2 - B rs + x`` on the domain, so the stationary point is the smaller root (written
    in the cancellation-free form), clipped to the domain ``[0, min(1, 1/ratio)]``.
    """
    x = xc + xs
    if x <= 0:
        return 0.0
    a = ratio * (nc + ns)
    b = ratio * nc + ns + xc + ratio * xs
    disc = max(0.0, b * b - 4.0 * a * x)
    root = 2.0 * x / (b + math.sqrt(disc))
    return min(root, 1.0, 1.0 / ratio)


def _loglik2(xc: float, nc: float, rc: float, xs: float, ns: float, rs: float) -> float:
    return bernoulli_loglik(xc, nc, rc) + bernoulli_loglik(xs, ns, rs)


def log_e_two_rates(
    xc: float, nc: float, xs: float, ns: float, *, ratio: float, floor: float
) -> tuple[float, float]:
    """Log e-values comparing two Bernoulli rates: canary ``rc`` (``xc`` of ``nc``) and stable
    ``rs`` (``xs`` of ``ns``).

    The canary is *acceptable* when ``rc <= max(ratio * rs, floor)``: within the tolerated
    relative change of stable, or below an absolute floor.

    Returns ``(log_e_worse, log_e_no_worse)``: the first is evidence against "acceptable" (large
    when the canary is worse than tolerated), the second is evidence against "worse than
    tolerated" (large when the canary is no worse). Both share the numerator (independent KT
    mixtures over each cohort's rate) and divide it by the largest likelihood over their null.
    """
    num = log_kt_marginal(xc, nc) + log_kt_marginal(xs, ns)
    rc_hat = xc / nc if nc > 0 else 0.0
    rs_hat = xs / ns if ns > 0 else 0.0
    best = _loglik2(xc, nc, rc_hat, xs, ns, rs_hat)
    limit = max(ratio * rs_hat, floor)
    on_line_rs = _boundary_rate(xc, nc, xs, ns, ratio)

    # Null "acceptable": {rc <= ratio*rs} U {rc <= floor}; the sup over a union is the larger
    # of the two sups, each on its own boundary when the unconstrained maximum lies outside.
    if rc_hat <= limit:
        sup_ok = best
    else:
        sup_ok = max(
            _loglik2(xc, nc, floor, xs, ns, rs_hat),
            _loglik2(xc, nc, ratio * on_line_rs, xs, ns, on_line_rs),
        )

    # Null "worse": {rc >= ratio*rs} n {rc >= floor}, convex; when the maximum lies outside,
    # the constrained maximum sits on one of the two active pieces of its boundary.
    if rc_hat >= limit:
        sup_bad = best
    else:
        rs_edge = min(rs_hat, floor / ratio)
        rs_line = min(max(on_line_rs, floor / ratio), 1.0 / ratio, 1.0)
        sup_bad = max(
            _loglik2(xc, nc, floor, xs, ns, rs_edge),
            _loglik2(xc, nc, ratio * rs_line, xs, ns, rs_line),
        )
    return num - sup_ok, num - sup_bad


def mean_cs_radius(count: int, sigma: float, alpha: float, *, design_count: float) -> float:
    """Half-width of a two-sided normal-mixture confidence sequence for a mean.

    ``|mean_t - mu| <= radius(t)`` for all ``t`` at once with probability ``1 - alpha`` when the
    observations are ``sigma``-sub-Gaussian (exact), or asymptotically when ``sigma`` is the
    running sample standard deviation. ``design_count`` is where the boundary is tightest.
    """
    if count <= 0:
        return math.inf
    if sigma <= 0.0:
        return 0.0
    log_inv = math.log(1.0 / alpha)
    rho2 = (2.0 * log_inv + math.log(2.0 * log_inv + 1.0)) / design_count
    t = float(count)
    return sigma * math.sqrt((t + 1.0 / rho2) * (2.0 * log_inv + math.log1p(t * rho2))) / t
