"""The analysis policy: the ``analysis:`` section of a rollout file.

Frozen pydantic models. Each built-in metric has its own policy class so that a partial section
in YAML (``latency: {tolerance: 0.5}``) keeps that metric's other defaults. Set a metric to
``null`` to switch it off. Pydantic's messages name the field and the allowed values; the
rollout loader turns them into one :class:`~pubsub_canary.errors.ConfigError`.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
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

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_KPI_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,99}$")


class Direction(StrEnum):
    """Which way is better for a metric."""

    LOWER_IS_BETTER = "lower_is_better"
    HIGHER_IS_BETTER = "higher_is_better"


class OnInconclusive(StrEnum):
    """What the coordinator does when a step ends without evidence either way."""

    #: Stop widening and wait for a person to approve or roll back.
    PAUSE = "pause"
    #: Hold the step longer (same observations, same alpha: the tests are anytime-valid), up to
    #: ``max_extensions`` times, then pause.
    EXTEND = "extend"


class Promotion(StrEnum):
    """When a step passes."""

    #: Fixed observation window: pass when the hold is over and no metric failed.
    TIME = "time"
    #: Pass as soon as every critical metric shows the canary is no worse than tolerated.
    METRIC = "metric"


class MetricPolicy(BaseModel):
    """How to judge one metric, canary against stable.

    ``tolerance`` is the relative change accepted (0.2: the canary may be 20% worse);
    ``absolute_tolerance`` is a change accepted whatever the relative one, in the metric's unit
    (a rate for error and dead-letter rates, seconds for latency, a fraction of produced
    messages for lag growth, the KPI's unit for a KPI).
    """

    model_config = _FROZEN

    direction: Direction = Field(
        default=Direction.LOWER_IS_BETTER,
        description="which way is better: 'lower_is_better' or 'higher_is_better'",
    )
    tolerance: float = Field(
        default=0.2, ge=0, le=100, description="tolerated relative change (0.2 = 20% worse)"
    )
    absolute_tolerance: float = Field(
        default=0.0, ge=0, description="tolerated absolute change, in the metric's unit"
    )
    critical: bool = Field(
        default=True,
        description="a failure rolls back and a pass is needed to promote; a non-critical "
        "failure only holds back automatic promotion",
    )
    min_sample: int = Field(
        default=100, ge=1, description="observations each cohort needs before a verdict"
    )


class _LowerIsBetterPolicy(MetricPolicy):
    """A built-in metric where lower is better by definition."""

    @field_validator("direction")
    @classmethod
    def _lower_only(cls, direction: Direction) -> Direction:
        if direction is not Direction.LOWER_IS_BETTER:
            raise ValueError(
                "this metric is lower_is_better by definition; allowed: 'lower_is_better'"
            )
        return direction


class RatePolicy(_LowerIsBetterPolicy):
    """Error rate or dead-letter rate: events per processed message."""

    absolute_tolerance: float = Field(
        default=0.001,
        ge=0,
        le=1,
        description="rate the canary may reach whatever stable's (0.001 = 0.1 percentage point)",
    )


class LatencyPolicy(_LowerIsBetterPolicy):
    """Processing latency at a quantile, compared on the shared histogram buckets."""

    quantile: float = Field(default=0.99, gt=0, lt=1, description="quantile of interest")
    tolerance: float = Field(
        default=0.25,
        ge=0,
        le=100,
        description="tolerated relative change of the quantile; the histogram resolves 25%",
    )
    absolute_tolerance: float = Field(default=0.0, ge=0, description="seconds")
    min_sample: int = Field(
        default=200, ge=1, description="latency samples each cohort needs before a verdict"
    )


class LagPolicy(_LowerIsBetterPolicy):
    """Lag growth normalised by produced messages (Burrow-style: falling behind while stable
    keeps up)."""

    absolute_tolerance: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="fraction of produced messages the canary may leave behind",
    )
    min_sample: int = Field(default=10, ge=3, description="lag samples per cohort (window)")


class KpiPolicy(MetricPolicy):
    """A custom KPI the members report (for example an RL policy's reward).

    ``direction`` is required. ``bounds``, when the KPI is known to lie in ``[low, high]``,
    makes the test exact; without it the test is asymptotic (uses the sample variance).
    """

    tolerance: float = Field(
        default=0.05,
        ge=0,
        le=100,
        description="tolerated relative change, relative to |stable's mean|",
    )
    bounds: tuple[float, float] | None = Field(
        default=None, description="[low, high] the KPI always lies in, if known"
    )

    @model_validator(mode="before")
    @classmethod
    def _direction_is_explicit(cls, data: Any) -> Any:
        if isinstance(data, dict) and "direction" not in data:
            raise ValueError("a KPI needs a direction: 'higher_is_better' or 'lower_is_better'")
        return data

    @field_validator("bounds")
    @classmethod
    def _bounds_ordered(cls, bounds: tuple[float, float] | None) -> tuple[float, float] | None:
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"bounds must be [low, high] with low < high, got {list(bounds)}")
        return bounds


class AnalysisPolicy(BaseModel):
    """How the judge decides a step: the false-rollback budget, the metrics, what to do when
    the evidence is not there.

    ``alpha`` bounds the probability that a rollout of a canary no worse than tolerated is ever
    rolled back by the judge, however often it looks: it is split evenly over the steps and
    then over the statistical metrics. ``promotion_alpha`` bounds, per step, the probability
    that metric-based promotion passes a canary worse than tolerated on a critical metric.
    """

    model_config = _FROZEN

    alpha: float = Field(default=0.01, gt=0, lt=1, description="rollout false-rollback budget")
    promotion_alpha: float = Field(
        default=0.05, gt=0, lt=1, description="per-step false-promotion budget (metric promotion)"
    )
    promotion: Promotion = Field(
        default=Promotion.TIME, description="'time' (fixed window) or 'metric' (early pass)"
    )
    on_inconclusive: OnInconclusive = Field(
        default=OnInconclusive.PAUSE, description="'pause' for a person or 'extend' the hold"
    )
    max_extensions: int = Field(
        default=2, ge=0, le=100, description="hold extensions before pausing (with 'extend')"
    )
    error_rate: RatePolicy | None = Field(
        default_factory=RatePolicy, description="share of messages that failed at least one attempt"
    )
    dead_letter_rate: RatePolicy | None = Field(
        default_factory=RatePolicy, description="share of messages dead-lettered"
    )
    latency: LatencyPolicy | None = Field(
        default_factory=LatencyPolicy, description="processing latency at a quantile"
    )
    lag_growth: LagPolicy | None = Field(
        default_factory=LagPolicy, description="lag growth per produced message"
    )
    kpis: dict[str, KpiPolicy] = Field(
        default_factory=dict,
        description="custom metrics the members report with `report_kpi(name, value)`, "
        "judged canary against stable",
    )

    @field_validator("kpis")
    @classmethod
    def _kpi_names(cls, kpis: dict[str, KpiPolicy]) -> dict[str, KpiPolicy]:
        for name in kpis:
            if not _KPI_NAME.match(name):
                raise ValueError(
                    f"KPI name {name!r} must be 1-100 characters of letters, digits, '_', "
                    "'.', ':' or '-', not starting with a punctuation mark"
                )
        return kpis
