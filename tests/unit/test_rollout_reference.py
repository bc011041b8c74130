"""docs/rollout-reference.md is generated from the rollout schema and cannot drift from it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_generator() -> ModuleType:
    path = ROOT / "scripts" / "gen_rollout_reference.py"
    spec = importlib.util.spec_from_file_location("gen_rollout_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_committed_reference_equals_a_fresh_generation() -> None:
    gen = load_generator()
    committed = (ROOT / "docs" / "rollout-reference.md").read_text()
    assert committed == gen.render(), (
        "docs/rollout-reference.md is out of date: run python scripts/gen_rollout_reference.py"
    )


def test_every_field_of_the_schema_is_in_the_reference() -> None:
    gen = load_generator()
    text = gen.render()
    paths = gen.schema_paths()
    assert {"name", "steps[].share", "analysis.kpis.<name>.bounds", "slo.min_messages"} <= paths
    for path in paths:
        key = path.rsplit(".", 1)[-1].removesuffix("[]")
        assert f"| `{key}` |" in text, path


def test_hand_written_notes_name_fields_that_exist() -> None:
    gen = load_generator()
    paths = gen.schema_paths()
    stale = sorted(set(gen.NOTES) - paths)
    assert not stale, f"notes for fields the schema no longer has: {stale}"


def test_every_field_has_a_description_editors_can_show() -> None:
    from pubsub_canary.core.model import rollout_json_schema

    schema = rollout_json_schema()
    models = {"RolloutSpec": schema, **schema.get("$defs", {})}
    missing = [
        f"{name}.{field}"
        for name, model in models.items()
        for field, node in model.get("properties", {}).items()
        # a field that is only a reference shows the referenced model's description
        if "description" not in node and "$ref" not in node
    ]
    assert not missing, f"schema fields without a description: {missing}"
    assert all(m.get("description") for m in models.values() if "properties" in m)
