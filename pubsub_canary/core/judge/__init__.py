"""The statistical judge: is the canary cohort worse than the stable cohort running beside it?

Pure code (standard library only): anytime-valid sequential tests on the cumulative
observations of a rollout step, with one false-rollback budget per rollout. See
``docs/judge.md`` for the method, its assumptions and the benchmark.
"""

from pubsub_canary.core.judge.judge import judge_step, metric_alpha, statistical_metric_count
from pubsub_canary.core.judge.policy import (
    AnalysisPolicy,
    Direction,
    KpiPolicy,
    LagPolicy,
    LatencyPolicy,
    MetricPolicy,
    OnInconclusive,
    Promotion,
    RatePolicy,
)

__all__ = [  # noqa: RUF022 - grouped by use, not sorted
    # Judging a step
    "judge_step",
    "metric_alpha",
    "statistical_metric_count",
    # The analysis policy (the rollout file's ``analysis:`` section)
    "AnalysisPolicy",
    "Direction",
    "KpiPolicy",
    "LagPolicy",
    "LatencyPolicy",
    "MetricPolicy",
    "OnInconclusive",
    "Promotion",
    "RatePolicy",
]
