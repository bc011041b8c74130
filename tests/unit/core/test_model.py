"""The rollout spec: valid files load; each bad input names the field and the value, on one line."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from pubsub_canary.core.model import (
    RolloutSpec,
    Transport,
    load_rollout_spec,
    parse_rollout_spec,
    rollout_json_schema,
)
from pubsub_canary.errors import CanaryError, ConfigError

VALID_YAML = """\
name: checkout-v2
target:
  transport: pubsub
  topic: orders
  group: orders-sub
stable_version: "1.4.0"
canary_version: "1.5.0"
steps:
  - share: 5
    hold_seconds: 60
    min_messages: 500
  - share: 25
    approval: true
  - share: 100
slo:
  max_error_rate: 0.01
"""

BASE: dict[str, Any] = {
    "name": "r1",
    "target": {"topic": "orders", "group": "g"},
    "canary_version": "v2",
    "steps": [{"share": 10}, {"share": 50}],
}


def _with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is _DROP:
            del data[key]
        else:
            data[key] = value
    return data


_DROP = object()


def test_valid_yaml_loads_every_field() -> None:
    spec = load_rollout_spec(VALID_YAML, source="checkout.yaml")

    assert isinstance(spec, RolloutSpec)
    assert spec.name == "checkout-v2"
    assert spec.target.transport is Transport.PUBSUB
    assert spec.target.key == "pubsub:orders/orders-sub"
    assert spec.target.dlq_topic == "orders.dlq"
    assert (spec.stable_version, spec.canary_version) == ("1.4.0", "1.5.0")
    assert [s.share for s in spec.steps] == [5, 25, 100]
    assert spec.steps[0].hold_seconds == 60 and spec.steps[0].min_messages == 500
    assert [s.approval for s in spec.steps] == [False, True, False]
    assert spec.slo.max_error_rate == 0.01


def test_defaults_of_a_minimal_spec() -> None:
    spec = parse_rollout_spec(BASE)

    assert spec.target.transport is Transport.KAFKA
    assert spec.stable_version == "stable"
    assert spec.steps[0].hold_seconds == 0 and not spec.steps[0].approval


def test_spec_is_frozen() -> None:
    spec = parse_rollout_spec(BASE)
    with pytest.raises(ValueError):
        setattr(spec, "name", "other")  # noqa: B010 - the assignment itself is the test


def test_equal_shares_are_allowed() -> None:
    spec = parse_rollout_spec(_with(steps=[{"share": 20}, {"share": 20}, {"share": 100}]))
    assert [s.share for s in spec.steps] == [20, 20, 100]


# (case, document, words the message must contain: the field and the offending value)
INVALID: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("share 0", _with(steps=[{"share": 0}]), ("steps.0.share", "got 0", "greater than 0")),
    ("share 150", _with(steps=[{"share": 10}, {"share": 150}]), ("steps.1.share", "got 150")),
    ("negative hold", _with(steps=[{"share": 10, "hold_seconds": -1}]), ("hold_seconds", "-1")),
    (
        "decreasing shares",
        _with(steps=[{"share": 50}, {"share": 10}]),
        ("steps", "10", "50", "must not decrease"),
    ),
    ("same versions", _with(stable_version="v2"), ("canary_version", "'v2'", "stable_version")),
    ("missing target", _with(target=_DROP), ("target", "required")),
    ("missing canary_version", _with(canary_version=_DROP), ("canary_version", "required")),
    ("missing topic", _with(target={"group": "g"}), ("target.topic", "required")),
    ("bad name", _with(name="bad name!"), ("name", "'bad name!'")),
    ("no steps", _with(steps=[]), ("steps", "at least 1")),
    (
        "unknown transport",
        _with(target={"topic": "t", "group": "g", "transport": "amqp"}),
        ("target.transport", "'amqp'"),
    ),
    ("unknown key", _with(stpes=[{"share": 1}]), ("stpes", "not permitted")),
    ("bad error rate", _with(slo={"max_error_rate": 2}), ("slo.max_error_rate", "got 2")),
]


@pytest.mark.parametrize(("doc", "words"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_spec_names_field_and_value(doc: dict[str, Any], words: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rollout_spec(doc, source="r.yaml")

    message = str(info.value)
    assert message.startswith("r.yaml: ")
    for word in words:
        assert word in message, f"{word!r} missing from {message!r}"
    assert "\n" not in message
    assert "Traceback" not in message
    assert isinstance(info.value, CanaryError) and info.value.http_status == 422


def test_every_bad_field_is_reported_at_once() -> None:
    doc = _with(name="bad name", steps=[{"share": 0}])
    with pytest.raises(ConfigError) as info:
        parse_rollout_spec(doc)
    assert "name:" in str(info.value) and "steps.0.share:" in str(info.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("- share: 10\n- share: 20\n", ("expected a mapping", "got list")),
        ("just a string\n", ("expected a mapping", "got str")),
        ("", ("expected a mapping", "got NoneType")),
        ("name: [unclosed\n", ("not valid YAML", "line 1")),
        ("name: r\n  bad: indent: x\n", ("not valid YAML",)),
    ],
    ids=["list", "scalar", "empty", "unclosed-flow", "bad-indent"],
)
def test_bad_yaml_is_a_one_line_config_error(text: str, words: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as info:
        load_rollout_spec(text, source="r.yaml")

    message = str(info.value)
    assert message.startswith("r.yaml: ")
    for word in words:
        assert word in message
    assert "\n" not in message


def test_yaml_errors_in_fields_go_through_the_same_validation() -> None:
    text = VALID_YAML.replace("share: 25", "share: 250")
    with pytest.raises(ConfigError, match=r"steps\.1\.share.*got 250"):
        load_rollout_spec(text)


def test_json_schema_describes_the_file() -> None:
    schema = rollout_json_schema()
    assert {"name", "target", "canary_version", "steps"} <= set(schema["required"])
    assert "share" in schema["$defs"]["Step"]["properties"]
