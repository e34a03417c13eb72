"""Data contracts: validation, JSON round trip, forward compatibility."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet import AgentStepSpec, FleetError, StepOutcome, TokenUsage
from fleet.errors import SpecError

FULL_SPEC = {
    "task_id": "a",
    "agent": "review",
    "description": "review a",
    "prompt": "look at a",
    "max_steps": 3,
    "parent_session_id": "parent",
    "output_schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}},
    "max_tokens": 500,
    "timeout_s": 2.5,
}


def test_full_spec_round_trips_byte_identically() -> None:
    """A spec with every field survives to_json/from_json unchanged."""
    spec = AgentStepSpec.from_dict(FULL_SPEC)
    text = spec.to_json()
    assert AgentStepSpec.from_json(text) == spec
    assert AgentStepSpec.from_json(text).to_json() == text


def test_minimal_spec_loads_with_optionals_none() -> None:
    """A payload with only the four required keys loads; optionals are None."""
    spec = AgentStepSpec.from_json('{"task_id":"a","agent":"b","description":"c","prompt":"d"}')
    assert spec.output_schema is None and spec.max_steps is None and spec.max_tokens is None
    assert spec.to_json() == '{"task_id":"a","agent":"b","description":"c","prompt":"d"}'


def test_null_and_absent_mean_the_same() -> None:
    """An explicit null equals an absent key, and dumps the same."""
    with_nulls = dict(FULL_SPEC, max_steps=None, output_schema=None, timeout_s=None)
    without = {k: v for k, v in with_nulls.items() if v is not None}
    assert AgentStepSpec.from_dict(with_nulls) == AgentStepSpec.from_dict(without)
    assert (
        AgentStepSpec.from_dict(with_nulls).to_json() == AgentStepSpec.from_dict(without).to_json()
    )


def test_unknown_keys_are_ignored() -> None:
    """Forward compatibility: extra keys from a newer writer do not break loading."""
    spec = AgentStepSpec.from_dict({**FULL_SPEC, "future_field": {"x": 1}})
    assert spec == AgentStepSpec.from_dict(FULL_SPEC)
    outcome = StepOutcome.from_dict(
        {"task_id": "a", "session_id": "s", "agent": "b", "output": "o", "success": True, "new": 1}
    )
    assert outcome.output == "o" and outcome.structured is None


@pytest.mark.parametrize("missing", ["task_id", "agent", "description", "prompt"])
def test_missing_required_field_is_named(missing: str) -> None:
    """A spec without a required field raises a SpecError naming that field."""
    data = {k: v for k, v in FULL_SPEC.items() if k != missing}
    with pytest.raises(SpecError, match=missing):
        AgentStepSpec.from_dict(data)
    with pytest.raises(SpecError, match=missing):
        AgentStepSpec(**data)


def test_errors_never_quote_the_prompt() -> None:
    """Validation errors name fields but never echo values (prompts stay secret)."""
    with pytest.raises(SpecError) as caught:
        AgentStepSpec.from_dict({**FULL_SPEC, "max_steps": "SECRET-PROMPT-TEXT"})
    assert "SECRET-PROMPT-TEXT" not in str(caught.value)
    assert "max_steps" in str(caught.value)


def test_invalid_output_schema_is_refused_with_a_fix() -> None:
    """An output_schema that is not a JSON Schema fails at construction, saying what to do."""
    with pytest.raises(SpecError, match="not a valid JSON Schema"):
        AgentStepSpec.from_dict({**FULL_SPEC, "output_schema": {"type": 12}})


@pytest.mark.parametrize("text", ["", "{", "[1,2]", "null", '"x"', '{"task_id": 5}'])
def test_bad_json_raises_fleet_errors_only(text: str) -> None:
    """Malformed or wrong-typed JSON raises a FleetError subclass, never anything else."""
    with pytest.raises(FleetError):
        AgentStepSpec.from_json(text)
    with pytest.raises(FleetError):
        StepOutcome.from_json(text)


def test_specs_are_frozen() -> None:
    """Specs are immutable values."""
    spec = AgentStepSpec.from_dict(FULL_SPEC)
    with pytest.raises(Exception, match="frozen"):
        spec.prompt = "changed"  # type: ignore[misc]


def test_outcome_round_trip_and_failed_constructor() -> None:
    """StepOutcome round-trips, and failed() mirrors the in-box session id."""
    outcome = StepOutcome(
        task_id="a",
        session_id="task-run-a",
        agent="b",
        output='{"ok":true}',
        success=True,
        structured={"ok": True},
        usage=TokenUsage(prompt_tokens=3, completion_tokens=4),
        duration_s=0.5,
        worker="w1@host",
    )
    assert outcome.usage.total_tokens == 7
    assert StepOutcome.from_json(outcome.to_json()) == outcome
    failed = StepOutcome.failed("t", "agent", "nope", error="timeout")
    assert (failed.session_id, failed.success, failed.error, failed.output) == (
        "task-run-t",
        False,
        "timeout",
        "nope",
    )
    legacy = json.loads(failed.to_json())
    legacy.pop("usage")
    assert StepOutcome.from_dict(legacy).usage == TokenUsage()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

specs = st.builds(
    AgentStepSpec,
    task_id=st.text(min_size=1, max_size=20),
    agent=st.text(min_size=1, max_size=10),
    description=st.text(max_size=20),
    prompt=st.text(max_size=200),
    max_steps=st.none() | st.integers(0, 1000),
    parent_session_id=st.none() | st.text(max_size=10),
    output_schema=st.none() | st.just({"type": "object"}),
    max_tokens=st.none() | st.integers(0, 10**6),
    timeout_s=st.none() | st.floats(0.001, 1e6),
)

outcomes = st.builds(
    StepOutcome,
    task_id=st.text(min_size=1, max_size=20),
    session_id=st.text(max_size=20),
    agent=st.text(min_size=1, max_size=10),
    output=st.text(max_size=200),
    success=st.booleans(),
    structured=json_values.filter(lambda v: v is not None) | st.none(),
    usage=st.builds(
        TokenUsage,
        prompt_tokens=st.integers(0, 10**6),
        completion_tokens=st.integers(0, 10**6),
    ),
    error=st.none() | st.sampled_from(["timeout", "crashed", "budget_exhausted"]),
    duration_s=st.floats(0, 1e6),
    worker=st.none() | st.text(max_size=10),
)


@given(specs)
def test_spec_reserialisation_is_byte_identical(spec: AgentStepSpec) -> None:
    """serialize → parse → serialize is byte-identical for any spec."""
    text = spec.to_json()
    assert AgentStepSpec.from_json(text).to_json() == text


@given(outcomes)
def test_outcome_reserialisation_is_byte_identical(outcome: StepOutcome) -> None:
    """serialize → parse → serialize is byte-identical for any outcome."""
    text = outcome.to_json()
    assert StepOutcome.from_json(text).to_json() == text


REQUIRED = {
    AgentStepSpec: ("task_id", "agent", "description", "prompt"),
    StepOutcome: ("task_id", "session_id", "agent", "output", "success"),
}


def expected_problem(model: type[AgentStepSpec] | type[StepOutcome], text: str) -> str | None:
    """What the error for ``text`` must name, decided without fleet; None if it may load."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return "not valid JSON"
    if not isinstance(data, dict):
        return "expected a JSON object"
    missing = [name for name in REQUIRED[model] if data.get(name) is None]
    return f"{missing[0]}: " if missing else None


def check_load(model: type[AgentStepSpec] | type[StepOutcome], text: str) -> None:
    """Valid input loads with its values; invalid input fails naming the problem."""
    problem = expected_problem(model, text)
    try:
        loaded = model.from_json(text)
    except SpecError as error:
        message = str(error)
        assert message.startswith(f"invalid {model.__name__}: "), message
        if problem is not None:
            assert problem in message, (problem, message)
        else:
            # Every required field is there: the message names the fields that are wrong,
            # and those are fields the input really has.
            named = [f for f in model.model_fields if re.search(rf"\b{f}[.:]", message)]
            assert named, message
            assert set(named) <= set(json.loads(text)), (named, message)
        return
    assert problem is None, (problem, text)
    data = json.loads(text)
    for name in REQUIRED[model]:
        if isinstance(data[name], str):
            assert getattr(loaded, name) == data[name]


def with_noise(value: AgentStepSpec | StepOutcome) -> st.SearchStrategy[str]:
    """The JSON of ``value`` with unknown keys added and unset optionals as explicit nulls."""
    data = value.model_dump(mode="json")
    return st.dictionaries(st.text(max_size=8), json_values, max_size=3).map(
        lambda extra: json.dumps({**{k: v for k, v in extra.items() if k not in data}, **data})
    )


def retyped(value: AgentStepSpec | StepOutcome) -> st.SearchStrategy[str]:
    """The JSON of ``value`` with one field replaced by an arbitrary JSON value."""
    data = value.to_dict()
    return st.tuples(st.sampled_from(sorted(data)), json_values).map(
        lambda change: json.dumps({**data, change[0]: change[1]})
    )


valid_texts = specs.flatmap(with_noise) | outcomes.flatmap(with_noise)
any_texts = (
    st.text(max_size=300)
    | json_values.map(json.dumps)
    | valid_texts
    | specs.flatmap(retyped)
    | outcomes.flatmap(retyped)
)


@given(valid_texts)
def test_valid_json_with_unknown_keys_and_nulls_loads(text: str) -> None:
    """A valid spec or outcome with unknown keys and explicit nulls loads as the model it is."""
    data = json.loads(text)
    model = StepOutcome if "session_id" in data else AgentStepSpec
    loaded = model.from_json(text)
    assert loaded.to_dict() == {
        k: v for k, v in data.items() if k in model.model_fields and v is not None
    }


@given(any_texts)
def test_arbitrary_input_loads_or_names_the_problem(text: str) -> None:
    """Whatever arrives either loads with its values or fails with a SpecError naming the problem."""
    for model in (AgentStepSpec, StepOutcome):
        check_load(model, text)
