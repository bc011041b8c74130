"""What members report about their cohort's work, accumulated per rollout step.

Plain frozen data, standard library only. Members send *deltas* with each heartbeat; the
coordinator adds them up (:meth:`CohortObservations.merge`) into the cumulative observations of
the current step, which is what the judge and the SLO guards read.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

#: Upper bounds (seconds) of the latency histogram buckets; the last bucket is +Inf.
#: Log-spaced from 0.5 ms to 60 s so that p99 is resolved within ~25% anywhere in that range.
LATENCY_BUCKETS: tuple[float, ...] = tuple(
    round(0.0005 * (1.25**i), 7) for i in range(0, 53) if 0.0005 * (1.25**i) <= 60.0
)


class Cohort(StrEnum):
    """Which version a member runs. ``shadow`` is reserved for the shadow strategy."""

    STABLE = "stable"
    CANARY = "canary"
    SHADOW = "shadow"


@dataclass(frozen=True)
class LatencyHistogram:
    """Counts of processing latencies per bucket of :data:`LATENCY_BUCKETS` (+ one overflow)."""

    counts: tuple[int, ...] = field(default_factory=lambda: (0,) * (len(LATENCY_BUCKETS) + 1))

    @staticmethod
    def bucket_of(seconds: float) -> int:
        return bisect.bisect_left(LATENCY_BUCKETS, seconds)

    @classmethod
    def of(cls, samples: list[float] | tuple[float, ...]) -> LatencyHistogram:
        counts = [0] * (len(LATENCY_BUCKETS) + 1)
        for s in samples:
            counts[cls.bucket_of(s)] += 1
        return cls(tuple(counts))

    @property
    def total(self) -> int:
        return sum(self.counts)

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        return LatencyHistogram(
            tuple(a + b for a, b in zip(self.counts, other.counts, strict=True))
        )

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (None when empty; inf past 60 s)."""
        n = self.total
        if n == 0:
            return None
        rank = max(1, math.ceil(q * n))  # q=0 is the smallest sample, not an empty bucket
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else math.inf
        return math.inf

    def count_above(self, seconds: float) -> int:
        """Samples in buckets entirely above ``seconds``."""
        # Bucket i holds (LATENCY_BUCKETS[i-1], LATENCY_BUCKETS[i]]: it is entirely above
        # ``seconds`` when its lower bound LATENCY_BUCKETS[i-1] >= seconds.
        return sum(self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds) + 1 :])


@dataclass(frozen=True)
class KpiStats:
    """Running sums of one custom KPI (for example an RL policy's reward)."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    @classmethod
    def of(cls, values: list[float] | tuple[float, ...]) -> KpiStats:
        return cls(len(values), float(sum(values)), float(sum(v * v for v in values)))

    def merge(self, other: KpiStats) -> KpiStats:
        return KpiStats(
            self.count + other.count, self.total + other.total, self.total_sq + other.total_sq
        )

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def variance(self) -> float | None:
        if self.count < 2:
            return None
        m = self.total / self.count
        return max(0.0, (self.total_sq - self.count * m * m) / (self.count - 1))


@dataclass(frozen=True)
class LagSample:
    """A cohort's consumer lag (messages) and the messages appended to its work units so far.

    ``produced`` lets the judge normalise lag growth by traffic (Burrow-style): a cohort whose
    lag grows by 10 while 10,000 messages arrived is keeping up; one whose lag grows by 5,000 is
    not.
    """

    at: float
    lag: int
    produced: int


@dataclass(frozen=True)
class CohortObservations:
    """Cumulative observations of one cohort over the current step.

    ``processed`` counts messages that finished (ok or dead-lettered); ``errors`` counts
    messages whose handler raised at least once; ``dead_lettered`` counts messages sent to the
    dead-letter destination; ``redeliveries`` counts messages seen again after a crash.
    """

    processed: int = 0
    errors: int = 0
    dead_lettered: int = 0
    redeliveries: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    kpis: Mapping[str, KpiStats] = field(default_factory=dict)
    #: Lag snapshots in time order (oldest first); the coordinator keeps a bounded window.
    lag: tuple[LagSample, ...] = ()
    #: Seconds of the step this cohort was observed for.
    elapsed_seconds: float = 0.0

    def merge(self, delta: CohortObservations) -> CohortObservations:
        kpis = dict(self.kpis)
        for name, stats in delta.kpis.items():
            kpis[name] = kpis.get(name, KpiStats()).merge(stats)
        return CohortObservations(
            processed=self.processed + delta.processed,
            errors=self.errors + delta.errors,
            dead_lettered=self.dead_lettered + delta.dead_lettered,
            redeliveries=self.redeliveries + delta.redeliveries,
            latency=self.latency.merge(delta.latency),
            kpis=kpis,
            lag=self.lag + delta.lag,
            elapsed_seconds=max(self.elapsed_seconds, delta.elapsed_seconds),
        )

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.processed if self.processed else None

    @property
    def dead_letter_rate(self) -> float | None:
        return self.dead_lettered / self.processed if self.processed else None


class Verdict(StrEnum):
    """What the analysis of a step concluded, from worst to best.

    ``fail``: the canary is worse; roll back. ``inconclusive``: the step's budget of time or
    messages ran out without evidence either way. ``continue``: keep observing. ``pass``: the
    canary is no worse within the tolerated change; the step may end.
    """

    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    CONTINUE = "continue"
    PASS = "pass"


@dataclass(frozen=True)
class MetricVerdict:
    """The verdict on one metric, with the evidence a person needs to check it."""

    metric: str
    verdict: Verdict
    reason: str
    critical: bool = True
    evidence: Mapping[str, float | int | str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Judgement:
    """The verdict on a step: the overall one and one per metric."""

    verdict: Verdict
    reason: str
    metrics: tuple[MetricVerdict, ...] = ()
