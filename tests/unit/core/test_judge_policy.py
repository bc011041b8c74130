"""The analysis policy: defaults, YAML loading, errors naming the field and what is allowed."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import ValidationError

import pubsub_canary.core.judge as judge_pkg
from pubsub_canary.core.judge import (
    AnalysisPolicy,
    Direction,
    KpiPolicy,
    LatencyPolicy,
    MetricPolicy,
    OnInconclusive,
    Promotion,
    RatePolicy,
)
from pubsub_canary.core.model import parse_rollout_spec
from pubsub_canary.errors import ConfigError

ANALYSIS_YAML = """\
alpha: 0.005
promotion: metric
on_inconclusive: extend
max_extensions: 3
error_rate:
  tolerance: 0.5
latency:
  quantile: 0.95
lag_growth: null
kpis:
  reward:
    direction: higher_is_better
    tolerance: 0.1
    bounds: [0, 1]
    critical: false
"""


def _errors(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        AnalysisPolicy.model_validate(data)
    return [(".".join(map(str, e["loc"])), e["msg"]) for e in info.value.errors()]


def test_public_names_are_pinned() -> None:
    assert sorted(judge_pkg.__all__) == sorted(
        [
            "judge_step",
            "metric_alpha",
            "statistical_metric_count",
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
    )


def test_defaults() -> None:
    p = AnalysisPolicy()
    assert (p.alpha, p.promotion_alpha) == (0.01, 0.05)
    assert p.promotion is Promotion.TIME and p.on_inconclusive is OnInconclusive.PAUSE
    assert p.error_rate == RatePolicy() and p.error_rate.absolute_tolerance == 0.001
    assert p.latency is not None and (p.latency.quantile, p.latency.tolerance) == (0.99, 0.25)
    assert p.lag_growth is not None and p.lag_growth.min_sample == 10
    assert p.kpis == {}
    assert all(
        isinstance(m, MetricPolicy)
        for m in (p.error_rate, p.dead_letter_rate, p.latency, p.lag_growth)
    )


def test_yaml_section_loads_and_partial_metric_sections_keep_their_defaults() -> None:
    p = AnalysisPolicy.model_validate(yaml.safe_load(ANALYSIS_YAML))
    assert p.alpha == 0.005 and p.promotion is Promotion.METRIC
    assert p.on_inconclusive is OnInconclusive.EXTEND and p.max_extensions == 3
    assert p.error_rate is not None
    assert p.error_rate.tolerance == 0.5 and p.error_rate.absolute_tolerance == 0.001
    assert p.latency == LatencyPolicy(quantile=0.95)
    assert p.latency.min_sample == 200
    assert p.lag_growth is None
    reward = p.kpis["reward"]
    assert reward.direction is Direction.HIGHER_IS_BETTER and reward.bounds == (0.0, 1.0)
    assert not reward.critical


def test_policy_is_frozen_and_rejects_unknown_fields() -> None:
    p = AnalysisPolicy()
    with pytest.raises(ValidationError):
        p.alpha = 0.5
    assert _errors({"latency": {"quantiel": 0.9}}) == [
        ("latency.quantiel", "Extra inputs are not permitted")
    ]


@pytest.mark.parametrize(
    ("data", "loc", "words"),
    [
        ({"promotion": "fast"}, "promotion", ["'time'", "'metric'"]),
        ({"on_inconclusive": "wait"}, "on_inconclusive", ["'pause'", "'extend'"]),
        ({"alpha": 0}, "alpha", ["greater than 0"]),
        ({"alpha": 1.5}, "alpha", ["less than 1"]),
        ({"latency": {"quantile": 1.5}}, "latency.quantile", ["less than 1"]),
        ({"error_rate": {"direction": "higher_is_better"}}, "error_rate.direction", ["lower_is"]),
        ({"kpis": {"reward": {"tolerance": 0.1}}}, "kpis.reward", ["higher_is_better"]),
        (
            {"kpis": {"reward": {"direction": "up"}}},
            "kpis.reward.direction",
            ["'lower_is_better'", "'higher_is_better'"],
        ),
        (
            {"kpis": {"reward": {"direction": "higher_is_better", "bounds": [1, 0]}}},
            "kpis.reward.bounds",
            ["low < high"],
        ),
        ({"kpis": {"bad name": {"direction": "higher_is_better"}}}, "kpis", ["letters"]),
        ({"error_rate": {"min_sample": 0}}, "error_rate.min_sample", ["greater than or equal"]),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(
    data: dict[str, Any], loc: str, words: list[str]
) -> None:
    (got_loc, msg), *_ = _errors(data)
    assert got_loc == loc
    for word in words:
        assert word in msg


def test_kpi_direction_is_required_in_python_too() -> None:
    with pytest.raises(ValidationError, match="needs a direction"):
        KpiPolicy()
    assert KpiPolicy(direction=Direction.LOWER_IS_BETTER).tolerance == 0.05


def test_rollout_file_reports_analysis_errors_as_one_config_error() -> None:
    data = {
        "name": "r1",
        "target": {"topic": "orders", "group": "g"},
        "canary_version": "v2",
        "steps": [{"share": 10}],
        "analysis": {"promotion": "fast"},
    }
    with pytest.raises(ConfigError) as info:
        parse_rollout_spec(data)
    assert "analysis.promotion" in str(info.value)
    assert "'time' or 'metric'" in str(info.value)
    data["analysis"] = yaml.safe_load(ANALYSIS_YAML)
    assert parse_rollout_spec(data).analysis.promotion is Promotion.METRIC
