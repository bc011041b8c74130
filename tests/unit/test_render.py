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
