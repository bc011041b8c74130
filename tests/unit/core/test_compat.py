"""Can the cohorts read each other's changelog? State formats and record encodings."""

from __future__ import annotations

from typing import Any

from pubsub_canary.client.state import StateFormats
from pubsub_canary.core.compat import FormatSupport, state_format_problems


def support(version: str, meta: dict[str, Any]) -> FormatSupport:
    s = FormatSupport.from_meta(version, {"state_formats": meta})
    assert s is not None
    return s


CURRENT = StateFormats().as_meta()  # what this library registers
FIRST_LIBRARY = {"writes": 1, "reads": [1], "migrates": []}  # no encoding declared


def test_members_of_this_library_read_each_other() -> None:
    assert state_format_problems([support("1", CURRENT)], [support("2", CURRENT)]) == []


def test_a_library_that_cannot_read_the_other_encoding_is_refused_both_ways() -> None:
    old, new = support("1.0", FIRST_LIBRARY), support("1.1", CURRENT)
    (problem,) = state_format_problems([old], [new])  # stable on the first library
    assert "version 1.0 cannot read changelog encoding 2 that version 1.1 writes" in problem
    assert "a rollback would lose state" in problem
    (problem,) = state_format_problems([new], [old])  # the canary on the first library
    assert "version 1.0 cannot read changelog encoding 2" in problem
    assert "a promotion would lose state" in problem


def test_state_format_problems_still_name_the_missing_migration() -> None:
    v2 = StateFormats(writes=2, reads=frozenset({1, 2})).as_meta()
    problems = state_format_problems([support("1", CURRENT)], [support("2", v2)])
    assert len(problems) == 1 and "add a migration from format 2" in problems[0]
    assert state_format_problems([support("1", CURRENT)], [support("2", v2)], [(2, 1)]) == []
