"""The exported JSON Schema is in sync, and the example plans are valid by both checks."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from models.plan import load_plan, plan_json_schema

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "schemas" / "workflow-plan.schema.json"
EXAMPLES = sorted((ROOT / "examples" / "workflows").glob("*.json"))


def test_schema_file_is_in_sync_with_the_model() -> None:
    on_disk = json.loads(SCHEMA_FILE.read_text())
    assert on_disk == plan_json_schema(), "schemas/workflow-plan.schema.json is stale: run `make schema`"


def test_there_are_example_plans() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_plan_is_valid(path: Path) -> None:
    data = json.loads(path.read_text())
    jsonschema.validate(data, json.loads(SCHEMA_FILE.read_text()))
    plan = load_plan(data)
    assert plan.order() == list(plan.steps), "example steps are listed in the order they run"


def test_schema_rejects_what_the_model_rejects() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    bad = {"workflow_id": "w", "name": "n", "version": "1", "start_step": "a", "steps": {"a": {"id": "a"}}}
    with pytest.raises(jsonschema.ValidationError, match="agent_name"):
        jsonschema.validate(bad, schema)
    typo = {**bad, "steps": {"a": {"id": "a", "agent_name": "x"}}, "stpes": {}}
    with pytest.raises(jsonschema.ValidationError, match="stpes"):
        jsonschema.validate(typo, schema)
