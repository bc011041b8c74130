"""The terminal rendering of a rollout's status."""

from __future__ import annotations

import pytest

from pubsub_canary.render import unit_ranges


@pytest.mark.parametrize(
    ("units", "text"),
    [
        ([], ""),
        ([5], "5"),
        ([0, 1, 2, 3, 7, 9, 10], "0-3,7,9-10"),
        ([10, 9, 0, 2, 1], "0-2,9-10"),
        (list(range(250)) + list(range(300, 500)), "0-249,300-499"),
        ([0, 2, 4], "0,2,4"),
    ],
)
def test_units_are_shown_as_ranges(units: list[int], text: str) -> None:
    assert unit_ranges(units) == text


def test_a_members_line_shows_its_units_as_ranges_with_their_count() -> None:
    from pubsub_canary.render import render_status

    health = {
        "processed": 0,
        "error_rate": None,
        "dead_letter_rate": None,
        "latency_p99_seconds": None,
        "lag": None,
    }
    status = {
        "name": "r",
        "group": "kafka:orders/g",
        "phase": "progressing",
        "step": 1,
        "steps": 2,
        "share": 50.0,
        "stable_version": "1",
        "canary_version": "2",
        "cohorts": {c: {"members": 1, "units": 4, "step": health} for c in ("stable", "canary")},
        "members": [
            {
                "member_id": "s1",
                "cohort": "stable",
                "version": "1",
                "units": [1, 2, 3, 5],
                "standby": [0, 4],
            },
            {"member_id": "c1", "cohort": "canary", "version": "2", "units": [], "standby": []},
        ],
    }
    text = render_status(status)
    assert "units 1-3,5 (4)  standby 0,4" in text
    assert "c1" in text and "units idle" in text
