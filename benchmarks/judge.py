"""Benchmark: our sequential judge against a threshold check and a Kayenta-style test.

The same simulated rollouts (per-second message and failure counts of a canary and a stable
cohort) go through three methods:

* ``ours``: :func:`pubsub_canary.core.judge.judge_step` with the default policy, looking every
  second. The count test is evaluated for every run by a numpy twin of the judge's error-rate
  e-value; ``judge_step`` itself is run on a sample of the runs and must agree exactly.
* ``threshold``: Flagger's documented analysis: every ``interval`` (1 m) the built-in
  ``request-success-rate`` check over the last minute must be >= 99% (``thresholdRange.min:
  99``); the canary rolls back after ``threshold`` (5) failed checks.
* ``kayenta``: Kayenta's NetflixACAJudge: per-minute samples of each cohort's error rate, a
  Mann-Whitney U test (Hodges-Lehmann 98% interval, ``tolerance`` 0.25, effect size >= 1.0,
  direction ``increase``) re-run at the end of each analysis interval (60 m) on everything
  since the start; one High metric scores 0 < marginal 75, which fails the canary at once.

Two extra rows show the documented variants: a threshold check that rolls back on the first
failed check (Argo Rollouts' ``failureLimit: 0``), and Kayenta with 10-minute intervals.

Run: ``python benchmarks/judge.py [--seed 1] [--json]``. With ``--json`` the last line is one
JSON object keyed by method with the reference case's figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import gammaln, xlog1py, xlogy  # type: ignore[import-untyped]

from pubsub_canary.core.judge import AnalysisPolicy, RatePolicy, judge_step, metric_alpha
from pubsub_canary.core.observations import CohortObservations, Verdict

RATE_PER_S = 1000.0
CANARY_SHARE = 0.10
STABLE_RATE = 0.005
MULTIPLIERS = (1.5, 2.0, 5.0, 10.0)
REFERENCE = 5.0  # 0.5% -> 2.5%
POLICY = AnalysisPolicy()  # the defaults a user gets
STEP_COUNT = 1  # the simulated rollout is one analysis step at 10%

# Flagger: interval 1m, request-success-rate thresholdRange.min 99, threshold 5.
CHECK_INTERVAL_S = 60
SUCCESS_MIN = 0.99
FAILED_CHECKS = 5
# Kayenta / NetflixACAJudge: 60 s samples, MW 98%, tolerance 0.25, effect size 1.0.
SAMPLE_S = 60
KAYENTA_CONF = 0.98
KAYENTA_TOLERANCE = 0.25
KAYENTA_EFFECT = 1.0


@dataclass(frozen=True)
class Scenario:
    name: str
    canary_multiplier: float
    runs: int
    incident: bool = False  # both cohorts at 3% errors from minute 30 to 35


@dataclass(frozen=True)
class Chunk:
    scenario: Scenario
    runs: int
    seed: int
    horizon: int


# --- simulation ---------------------------------------------------------------------------


def simulate(chunk: Chunk) -> dict[str, np.ndarray]:
    """Per-second counts, shape (runs, horizon)."""
    rng = np.random.default_rng(chunk.seed)
    shape = (chunk.runs, chunk.horizon)
    nc = rng.poisson(RATE_PER_S * CANARY_SHARE, shape)
    ns = rng.poisson(RATE_PER_S * (1 - CANARY_SHARE), shape)
    base = np.full(chunk.horizon, STABLE_RATE)
    if chunk.scenario.incident:
        t = np.arange(chunk.horizon)
        base = np.where((t >= 1800) & (t < 2100), 0.03, base)
    xc = rng.binomial(nc, np.minimum(1.0, base * chunk.scenario.canary_multiplier))
    xs = rng.binomial(ns, base)
    return {"nc": nc, "xc": xc, "ns": ns, "xs": xs}


# --- ours: numpy twin of the judge's error-rate test --------------------------------------


def _kt(k: np.ndarray, n: np.ndarray) -> np.ndarray:
    return np.asarray(
        gammaln(k + 0.5) + gammaln(n - k + 0.5) - gammaln(n + 1.0) - math.log(math.pi)
    )


def _ll(k: np.ndarray, n: np.ndarray, p: np.ndarray | float) -> np.ndarray:
    return np.asarray(xlogy(k, p) + xlog1py(n - k, -p))


def log_e_worse(
    xc: np.ndarray, nc: np.ndarray, xs: np.ndarray, ns: np.ndarray, ratio: float, floor: float
) -> np.ndarray:
    """Vectorised ``sequential.log_e_two_rates(...)[0]`` (same formulas, same order)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        num = _kt(xc, nc) + _kt(xs, ns)
        rc = np.where(nc > 0, xc / np.maximum(nc, 1), 0.0)
        rs = np.where(ns > 0, xs / np.maximum(ns, 1), 0.0)
        best = _ll(xc, nc, rc) + _ll(xs, ns, rs)
        limit = np.maximum(ratio * rs, floor)
        x = xc + xs
        a = ratio * (nc + ns)
        b = ratio * nc + ns + xc + ratio * xs
        root = 2.0 * x / (b + np.sqrt(np.maximum(0.0, b * b - 4.0 * a * x)))
        line = np.where(x > 0, np.minimum(np.minimum(root, 1.0), 1.0 / ratio), 0.0)
        sup_ok = np.where(
            rc <= limit,
            best,
            np.maximum(
                _ll(xc, nc, floor) + _ll(xs, ns, rs),
                _ll(xc, nc, ratio * line) + _ll(xs, ns, line),
            ),
        )
    return np.asarray(num - sup_ok)


def ours_detect(
    d: dict[str, np.ndarray], policy: AnalysisPolicy = POLICY, step_count: int = STEP_COUNT
) -> np.ndarray:
    """First second at which the judge says FAIL on the error rate (inf if never)."""
    p = policy.error_rate
    assert p is not None
    nc, xc = np.cumsum(d["nc"], 1), np.cumsum(d["xc"], 1)
    ns, xs = np.cumsum(d["ns"], 1), np.cumsum(d["xs"], 1)
    le = log_e_worse(
        xc.astype(float),
        nc.astype(float),
        xs.astype(float),
        ns.astype(float),
        1.0 + p.tolerance,
        p.absolute_tolerance,
    )
    threshold = math.log(1.0 / metric_alpha(policy, step_count=step_count))
    fail = (le >= threshold) & (np.minimum(nc, ns) >= p.min_sample)
    return _first(fail, step=1)


def _first(hit: np.ndarray, *, step: int) -> np.ndarray:
    """Time (s) of the first True per row, columns ``step`` seconds apart; inf if none."""
    any_hit = hit.any(axis=1)
    return np.where(any_hit, (hit.argmax(axis=1) + 1.0) * step, np.inf)


def check_with_judge(d: dict[str, np.ndarray], rows: int) -> tuple[int, int]:
    """Run ``judge_step`` itself at every second on the first ``rows`` runs; count agreements
    with the twin's first-FAIL times."""
    twin = ours_detect({k: v[:rows] for k, v in d.items()})
    agree = 0
    for r in range(rows):
        nc = xc = ns = xs = 0
        first = math.inf
        for t in range(d["nc"].shape[1]):
            nc += int(d["nc"][r, t])
            xc += int(d["xc"][r, t])
            ns += int(d["ns"][r, t])
            xs += int(d["xs"][r, t])
            j = judge_step(
                POLICY,
                CohortObservations(processed=ns, errors=xs),
                CohortObservations(processed=nc, errors=xc),
                step_index=0,
                step_count=STEP_COUNT,
                hold_elapsed=False,
            )
            if j.verdict is Verdict.FAIL:
                first = float(t + 1)
                break
        agree += first == twin[r]
    return agree, rows


# --- threshold: Flagger / Argo style ------------------------------------------------------


def _per_interval(counts: np.ndarray, seconds: int) -> np.ndarray:
    runs, horizon = counts.shape
    whole = horizon // seconds
    return np.asarray(counts[:, : whole * seconds].reshape(runs, whole, seconds).sum(axis=2))


def threshold_detect(d: dict[str, np.ndarray], limit: int) -> np.ndarray:
    n = _per_interval(d["nc"], CHECK_INTERVAL_S)
    x = _per_interval(d["xc"], CHECK_INTERVAL_S)
    with np.errstate(divide="ignore", invalid="ignore"):
        success = np.where(n > 0, 1.0 - x / np.maximum(n, 1), 1.0)
    failed = np.cumsum(success < SUCCESS_MIN, axis=1)
    return _first(failed >= limit, step=CHECK_INTERVAL_S)


# --- kayenta: Mann-Whitney on per-minute samples, re-run each interval ---------------------


def _mw_high(canary: np.ndarray, control: np.ndarray) -> np.ndarray:
    """NetflixACAJudge's High classification per row (direction 'increase')."""
    m, n = canary.shape[1], control.shape[1]
    diffs = (canary[:, :, None] - control[:, None, :]).reshape(canary.shape[0], m * n)
    mn = m * n
    z = 2.3263478740408408  # two-sided 98%
    qu = max(1, math.floor(mn / 2.0 - z * math.sqrt(mn * (m + n + 1) / 12.0)))
    lo_k, hi_k = qu - 1, mn - qu
    mid = [(mn - 1) // 2, mn // 2]
    part = np.partition(diffs, sorted({lo_k, hi_k, *mid}), axis=1)
    lower = part[:, lo_k]
    estimate = 0.5 * (part[:, mid[0]] + part[:, mid[1]])
    c_mean, k_mean = canary.mean(axis=1), control.mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        deviation = np.where(k_mean == 0.0, 1.0, c_mean / k_mean)
    return np.asarray(
        (lower > KAYENTA_TOLERANCE * np.abs(estimate)) & (deviation >= KAYENTA_EFFECT)
    )


def kayenta_detect(d: dict[str, np.ndarray], interval_min: int) -> np.ndarray:
    nc, xc = _per_interval(d["nc"], SAMPLE_S), _per_interval(d["xc"], SAMPLE_S)
    ns, xs = _per_interval(d["ns"], SAMPLE_S), _per_interval(d["xs"], SAMPLE_S)
    with np.errstate(divide="ignore", invalid="ignore"):
        canary = np.where(nc > 0, xc / np.maximum(nc, 1), np.nan)
        control = np.where(ns > 0, xs / np.maximum(ns, 1), np.nan)
    runs, minutes = canary.shape
    out = np.full(runs, np.inf)
    for end in range(interval_min, minutes + 1, interval_min):
        todo = np.isinf(out)
        if not todo.any():
            break
        high = _mw_high(canary[todo, :end], control[todo, :end])
        idx = np.flatnonzero(todo)[high]
        out[idx] = end * SAMPLE_S
    return out


# --- running ------------------------------------------------------------------------------

#: The default policy with no tolerance at all: identical rates sit on the null's boundary.
NO_SLACK = POLICY.model_copy(
    update={"error_rate": RatePolicy(tolerance=0.0, absolute_tolerance=0.0)}
)

METHODS: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]] = {
    "ours": ours_detect,
    "ours_5_steps": lambda d: ours_detect(d, POLICY, 5),
    "ours_no_slack": lambda d: ours_detect(d, NO_SLACK, STEP_COUNT),
    "threshold": lambda d: threshold_detect(d, FAILED_CHECKS),
    "threshold_1": lambda d: threshold_detect(d, 1),
    "kayenta": lambda d: kayenta_detect(d, 60),
    "kayenta_10m": lambda d: kayenta_detect(d, 10),
}
LABELS = {
    "ours": "ours (e-values, look every 1 s, alpha 0.01)",
    "ours_5_steps": "ours, budget of one step in a 5-step rollout",
    "ours_no_slack": "ours, tolerance 0 and no floor (null's boundary)",
    "threshold": "threshold (Flagger: 1 m, >= 99% success, 5 failed checks)",
    "threshold_1": "threshold, roll back on 1st failed check (Argo failureLimit 0)",
    "kayenta": "kayenta (MW 98%, 60 m intervals, cumulative)",
    "kayenta_10m": "kayenta with 10 m intervals",
}


def run_chunk(chunk: Chunk, check_rows: int) -> dict[str, Any]:
    d = simulate(chunk)
    out: dict[str, Any] = {"scenario": chunk.scenario.name}
    for name, fn in METHODS.items():
        out[name] = fn(d)
    out["check"] = check_with_judge(d, check_rows) if check_rows else (0, 0)
    return out


def _summary(times: np.ndarray) -> dict[str, Any]:
    finite = times[np.isfinite(times)]
    n = len(times)

    def pct(q: float) -> float | None:
        v = float(np.percentile(times, q, method="higher")) if n else math.inf
        return None if math.isinf(v) else v

    return {
        "runs": n,
        "detected": len(finite),
        "rate": len(finite) / n if n else 0.0,
        "median_s": pct(50),
        "p90_s": pct(90),
    }


def _fmt_time(v: float | None, horizon: int) -> str:
    return f"> {horizon // 3600} h" if v is None else f"{v:.0f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--aa", type=int, default=1000, help="A/A rollouts (>= 500)")
    ap.add_argument("--regressions", type=int, default=200, help="rollouts per effect size")
    ap.add_argument("--horizon-hours", type=float, default=3.0)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--check", type=int, default=4, help="runs per chunk re-run by judge_step")
    ap.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = ap.parse_args(argv)

    started = time.perf_counter()
    horizon = int(args.horizon_hours * 3600)
    scenarios = [Scenario("A/A", 1.0, args.aa), Scenario("A/A + incident", 1.0, args.aa, True)]
    scenarios += [Scenario(f"x{m:g}", m, args.regressions) for m in MULTIPLIERS]
    size = 50  # runs per chunk: bounds memory (a chunk is ~10 arrays of size x horizon)
    plan = [
        (sc, min(size, sc.runs - start)) for sc in scenarios for start in range(0, sc.runs, size)
    ]
    # One independent stream per chunk, fixed by --seed whatever the number of workers.
    streams = np.random.SeedSequence(args.seed).spawn(len(plan))
    chunks = [
        Chunk(sc, runs, int(ss.generate_state(1)[0]), horizon)
        for (sc, runs), ss in zip(plan, streams, strict=True)
    ]

    def checks_for(c: Chunk) -> int:
        # judge_step is slow in Python: verify a few regression runs per chunk (short until
        # they fail) and a couple of A/A runs over the full horizon in the first chunk only.
        if c.scenario.name == "A/A":
            return 2 if c is chunks[0] else 0
        return args.check if not c.scenario.incident else 0

    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(run_chunk, chunks, [checks_for(c) for c in chunks]))

    merged: dict[str, dict[str, np.ndarray]] = {}
    agree = checked = 0
    for res in results:
        sc = merged.setdefault(res["scenario"], {})
        for name in METHODS:
            sc[name] = np.concatenate([sc.get(name, np.empty(0)), res[name]])
        agree += res["check"][0]
        checked += res["check"][1]
    elapsed = time.perf_counter() - started

    summary = {sc: {m: _summary(t) for m, t in methods.items()} for sc, methods in merged.items()}
    print(
        f"pubsub-canary judge benchmark: seed {args.seed}, canary {CANARY_SHARE:.0%} of "
        f"{RATE_PER_S:.0f} msg/s, stable failure rate {STABLE_RATE:.1%}, horizon "
        f"{args.horizon_hours:g} h, {args.aa} A/A and {args.regressions} runs per effect size"
    )
    print(
        f"ours: default policy (tolerance +20%, floor 0.1%, alpha {POLICY.alpha} over "
        f"{STEP_COUNT} step and 3 statistical metrics -> {metric_alpha(POLICY, step_count=1):.4f}"
        " for the error rate)"
    )
    print()
    head = f"{'method':<64} {'A/A false rollback':>20} {'A/A + incident':>16}"
    print(head)
    for m in METHODS:
        aa, inc = summary["A/A"][m], summary["A/A + incident"][m]
        print(
            f"{LABELS[m]:<64} {aa['rate']:>9.3f} ({aa['detected']:>3}/{aa['runs']}) "
            f"{inc['rate']:>9.3f} ({inc['detected']}/{inc['runs']})"
        )
    print()
    print("time to detect (canary failure rate = stable x m): median / p90 (detected)")
    print(f"{'method':<64}" + "".join(f"{'x' + format(m, 'g'):>24}" for m in MULTIPLIERS))
    for m in METHODS:
        cells = []
        for mult in MULTIPLIERS:
            s = summary[f"x{mult:g}"][m]
            cells.append(
                f"{_fmt_time(s['median_s'], horizon)} / {_fmt_time(s['p90_s'], horizon)} "
                f"({s['rate']:.0%})"
            )
        print(f"{LABELS[m]:<64}" + "".join(f"{c:>24}" for c in cells))
    ref = f"x{REFERENCE:g}"
    ours_med = summary[ref]["ours"]["median_s"] or math.inf
    print()
    for base in ("threshold", "kayenta"):
        other = summary[ref][base]["median_s"] or math.inf
        print(f"reference case: ours is {other / ours_med:.1f}x faster than {base} (median)")
    print(f"judge_step re-run on {checked} runs: {agree} identical first-FAIL times")
    print(f"runtime {elapsed:.1f} s with {args.workers} workers")
    if agree != checked:
        print("ERROR: the numpy twin disagrees with judge_step", file=sys.stderr)
    if args.json:
        out = {
            m: {
                "false_rollback_rate": summary["A/A"][m]["rate"],
                "detect_median_s": summary[ref][m]["median_s"],
                "detect_p90_s": summary[ref][m]["p90_s"],
            }
            for m in ("ours", "threshold", "kayenta")
        }
        print(json.dumps(out, sort_keys=True))
    return 0 if agree == checked else 1


if __name__ == "__main__":
    raise SystemExit(main())
