"""Tests for models.mapping: parsing and resolving ``${...}`` placeholders."""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.mapping import (
    WORKFLOW_ROOT,
    Expression,
    MappingContext,
    MappingError,
    find_expressions,
    parse_expression,
    resolve_mapping,
)

WORKFLOW_INPUT: dict[str, Any] = {
    "topic": "ships",
    "a": {"b": 5, "c": {"d": "deep"}},
    "obj": {"a": 1},
    "nums": [1, 2],
    "matrix": [[10, 11], [12, {"y": "found"}]],
    "a key": "spaced value",
    'quote"key': "quoted value",
    "none": None,
    "flag": True,
    "off": False,
    "count": 7,
    "ratio": 2.5,
    "empty_list": [],
    "unicode": "héllo",
}
STEP_OUTPUTS: dict[str, Any] = {
    "research-step": {"summary": "the summary", "items": [{"title": "first"}, {"title": "second"}]},
    "plain": "text output",
    "numbers": [3, 1, 4],
    "nothing": None,
}


@pytest.fixture
def context() -> MappingContext:
    return MappingContext(workflow_input=copy.deepcopy(WORKFLOW_INPUT), step_outputs=copy.deepcopy(STEP_OUTPUTS))


def _resolve_error(mapping: Any, context: MappingContext) -> MappingError:
    with pytest.raises(MappingError) as info:
        resolve_mapping(mapping, context)
    return info.value


# --- whole-string placeholders keep the value's type ------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("${workflow.input.topic}", "ships"),
        ("${workflow.input.a.b}", 5),
        ("${workflow.input.a.c.d}", "deep"),
        ("${workflow.input.obj}", {"a": 1}),
        ("${workflow.input.nums}", [1, 2]),
        ("${workflow.input.nums[0]}", 1),
        ("${workflow.input.nums[1]}", 2),
        ("${workflow.input.matrix[0][1]}", 11),
        ("${workflow.input.matrix[1][1].y}", "found"),
        ('${workflow.input["a key"]}', "spaced value"),
        ('${workflow.input["quote\\"key"]}', "quoted value"),
        ('${workflow.input["a"].b}', 5),
        ("${workflow.input.none}", None),
        ("${workflow.input.flag}", True),
        ("${workflow.input.off}", False),
        ("${workflow.input.count}", 7),
        ("${workflow.input.ratio}", 2.5),
        ("${workflow.input.empty_list}", []),
        ("${workflow.input}", WORKFLOW_INPUT),
        ("${research-step.output.summary}", "the summary"),
        ("${research-step.output.items[1].title}", "second"),
        ("${research-step.output}", STEP_OUTPUTS["research-step"]),
        ("${plain.output}", "text output"),
        ("${numbers.output[2]}", 4),
        ("${nothing.output}", None),
    ],
)
def test_whole_placeholder_keeps_type(context, template, expected):
    result = resolve_mapping({"value": template}, context)

    assert result == {"value": expected}
    # ``True == 1`` and ``1 == 1.0``: check the type too.
    assert type(result["value"]) is type(expected)


def test_top_level_string_mapping_is_resolved(context):
    assert resolve_mapping("${workflow.input.count}", context) == 7


# --- interpolation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("About ${workflow.input.topic}.", "About ships."),
        ("obj=${workflow.input.obj}", 'obj={"a":1}'),
        ("none=${workflow.input.none}", "none=null"),
        ("flag=${workflow.input.flag}", "flag=true"),
        ("off=${workflow.input.off}", "off=false"),
        ("nums=${workflow.input.nums}", "nums=[1,2]"),
        ("n=${workflow.input.count}", "n=7"),
        ("r=${workflow.input.ratio}", "r=2.5"),
        ("m=${workflow.input.matrix[1]}", 'm=[12,{"y":"found"}]'),
        ("u=${workflow.input.unicode}!", "u=héllo!"),
        ("${workflow.input.topic} and ${plain.output}", "ships and text output"),
        ("${workflow.input.topic}${workflow.input.count}", "ships7"),
        ("[${workflow.input.nums[0]}|${workflow.input.nums[1]}|${numbers.output[2]}]", "[1|2|4]"),
        ("${research-step.output.summary}: done", "the summary: done"),
        ("plain text, no placeholder", "plain text, no placeholder"),
        ("", ""),
        ("a } on its own and a $ sign", "a } on its own and a $ sign"),
    ],
)
def test_interpolation(context, template, expected):
    assert resolve_mapping({"value": template}, context) == {"value": expected}


def test_interpolating_a_non_json_value_is_a_mapping_error():
    context = MappingContext(workflow_input={"bad": float("nan")}, step_outputs={})

    error = _resolve_error({"q": "x=${workflow.input.bad}"}, context)

    assert error.expression == "${workflow.input.bad}"
    assert error.path == "$.q"
    assert "not JSON" in error.reason


# --- escaping ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("$${", "${"),
        ("cost: $${price}", "cost: ${price}"),
        ("$${workflow.input.x}", "${workflow.input.x}"),
        ("$${workflow.input.topic} is ${workflow.input.topic}", "${workflow.input.topic} is ships"),
        ("${workflow.input.topic}$${not.parsed}", "ships${not.parsed}"),
        ("$${research-step.output[", "${research-step.output["),
    ],
)
def test_double_dollar_writes_a_literal_placeholder(context, template, expected):
    assert resolve_mapping({"value": template}, context) == {"value": expected}


def test_escaped_placeholders_are_not_expressions():
    assert list(find_expressions({"a": "$${workflow.input.x}", "b": ["$${nope"]})) == []


# --- recursion and immutability ------------------------------------------------------------------------------------


def test_nested_objects_and_lists_are_resolved_recursively(context):
    mapping = {
        "query": "${workflow.input.topic}",
        "options": {
            "depth": "${workflow.input.a.b}",
            "tags": ["fixed", "${workflow.input.nums[1]}", {"title": "${research-step.output.items[0].title}"}],
            "label": "about ${workflow.input.topic}",
        },
        "constants": [1, 2.5, True, None, "plain"],
        "empty": {},
    }

    assert resolve_mapping(mapping, context) == {
        "query": "ships",
        "options": {
            "depth": 5,
            "tags": ["fixed", 2, {"title": "first"}],
            "label": "about ships",
        },
        "constants": [1, 2.5, True, None, "plain"],
        "empty": {},
    }


def test_mapping_is_not_mutated(context):
    mapping = {"a": "${workflow.input.topic}", "b": ["${workflow.input.count}", {"c": "${plain.output}"}]}
    before = copy.deepcopy(mapping)

    result = resolve_mapping(mapping, context)

    assert mapping == before
    assert result is not mapping
    assert result["b"] is not mapping["b"]
    assert result == {"a": "ships", "b": [7, {"c": "text output"}]}


def test_context_is_not_mutated(context):
    before_input = copy.deepcopy(context.workflow_input)
    before_outputs = copy.deepcopy(dict(context.step_outputs))

    resolve_mapping({"a": "${workflow.input.a.c}", "b": "x ${research-step.output}"}, context)

    assert context.workflow_input == before_input
    assert dict(context.step_outputs) == before_outputs


def test_tuples_resolve_to_lists(context):
    assert resolve_mapping(("${workflow.input.count}", "x"), context) == [7, "x"]


@pytest.mark.parametrize("value", [None, True, False, 0, -3, 1.5, [], {}])
def test_plain_json_values_resolve_to_themselves(context, value):
    assert resolve_mapping({"v": value}, context) == {"v": value}


@pytest.mark.parametrize(
    ("mapping", "path", "reason"),
    [
        ({"a": {1, 2}}, "$.a", "unsupported value"),
        ({"a": [object()]}, "$.a[0]", "unsupported value"),
        ({"a": {1: "x"}}, "$.a", "keys must be strings"),
    ],
)
def test_non_json_mappings_are_rejected(context, mapping, path, reason):
    error = _resolve_error(mapping, context)

    assert error.path == path
    assert reason in error.reason


def test_too_deep_mapping_is_rejected(context):
    mapping: Any = "leaf"
    for _ in range(200):
        mapping = [mapping]

    error = _resolve_error(mapping, context)

    assert "nested deeper" in error.reason


# --- missing values ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "missing", "available", "reason"),
    [
        (
            "${workflow.input.nope}",
            "nope",
            tuple(sorted(WORKFLOW_INPUT)),
            "no key 'nope' in workflow.input",
        ),
        ("${workflow.input.a.x}", "x", ("b", "c"), "no key 'x' in workflow.input.a"),
        ("${workflow.input.a.c.e}", "e", ("d",), "no key 'e' in workflow.input.a.c"),
        (
            "${research-step.output.sumary}",
            "sumary",
            ("items", "summary"),
            "no key 'sumary' in research-step.output",
        ),
        (
            "${later-step.output.x}",
            "later-step",
            tuple(sorted(STEP_OUTPUTS)),
            "has not finished",
        ),
        ("${workflow.input.nums[2]}", 2, ("[0]", "[1]"), "out of range"),
        ("${workflow.input.empty_list[0]}", 0, (), "out of range"),
        ("${workflow.input.matrix[1][5]}", 5, ("[0]", "[1]"), "out of range"),
        ("${workflow.input.a[0]}", 0, (), "cannot take index [0] of workflow.input.a: it is an object"),
        ("${workflow.input.topic[0]}", 0, (), "it is a string"),
        ("${workflow.input.none[0]}", 0, (), "it is null"),
        ("${workflow.input.nums.first}", "first", (), "cannot take key 'first' of workflow.input.nums: it is a list"),
        ("${workflow.input.count.x}", "x", (), "it is a number"),
        ("${workflow.input.flag.x}", "x", (), "it is a boolean"),
        ("${plain.output.x}", "x", (), "it is a string"),
        ("${nothing.output.x}", "x", (), "it is null"),
    ],
)
def test_missing_value_raises_mapping_error(context, template, missing, available, reason):
    error = _resolve_error({"q": template}, context)

    assert error.expression == template
    assert error.missing == missing
    assert error.available == available
    assert reason in error.reason
    assert error.path == "$.q"
    assert template in str(error)
    assert "$.q" in str(error)


def test_missing_value_in_interpolated_string_names_the_failing_expression(context):
    error = _resolve_error({"q": "${workflow.input.topic} and ${workflow.input.gone}"}, context)

    assert error.expression == "${workflow.input.gone}"
    assert error.missing == "gone"


def test_step_not_finished_lists_finished_steps():
    context = MappingContext(workflow_input={}, step_outputs={"b-step": 1, "a-step": 2})

    error = _resolve_error("${c-step.output}", context)

    assert error.missing == "c-step"
    assert error.available == ("a-step", "b-step")


def test_out_of_range_lists_at_most_ten_indexes():
    context = MappingContext(workflow_input={"big": list(range(50))}, step_outputs={})

    error = _resolve_error("${workflow.input.big[60]}", context)

    assert error.available == tuple(f"[{i}]" for i in range(10))
    assert "50 item(s)" in error.reason


@pytest.mark.parametrize(
    ("mapping", "path"),
    [
        ("${workflow.input.nope}", "$"),
        ({"q": "${workflow.input.nope}"}, "$.q"),
        ({"a": {"b": ["ok", "${workflow.input.nope}"]}}, "$.a.b[1]"),
        ({"a": [{"b": "x ${workflow.input.nope}"}]}, "$.a[0].b"),
        ({"a key": "${workflow.input.nope}"}, '$["a key"]'),
        ({"list": [[0, "${workflow.input.nope}"]]}, "$.list[0][1]"),
        ({"a": {"b": ["ok", "${workflow.output}"]}}, "$.a.b[1]"),
        ({"a": {"b": ["ok", "${workflow.input"]}}, "$.a.b[1]"),
    ],
)
def test_error_path_points_into_the_mapping(context, mapping, path):
    assert _resolve_error(mapping, context).path == path


# --- malformed expressions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expression", "reason"),
    [
        ("${workflow.input", "${workflow.input", "never closed"),
        ("text ${workflow.input.a and more", "${workflow.input.a and more", "never closed"),
        ("${", "${", "never closed"),
        ("${}", "${}", "malformed"),
        ("${workflow}", "${workflow}", "malformed"),
        ("${workflow.}", "${workflow.}", "malformed"),
        ("${workflow.output.x}", "${workflow.output.x}", "'workflow' is followed by 'input'"),
        ("${workflow.inputs}", "${workflow.inputs}", "'workflow' is followed by 'input'"),
        ("${step.input}", "${step.input}", "followed by 'output'"),
        ("${step.outputs.x}", "${step.outputs.x}", "followed by 'output'"),
        ("${a.output..b}", "${a.output..b}", "expected a key after '.'"),
        ("${a.output.}", "${a.output.}", "expected a key after '.'"),
        ("${a.output[x]}", "${a.output[x]}", "unexpected '['"),
        ("${a.output[-1]}", "${a.output[-1]}", "unexpected '['"),
        ("${a.output[]}", "${a.output[]}", "unexpected '['"),
        ("${a.output[0}", "${a.output[0}", "unexpected '['"),
        ('${a.output["unterminated]}', '${a.output["unterminated]}', "malformed"),
        ("${a.output.b c}", "${a.output.b c}", "unexpected ' '"),
        ("${a.output b}", "${a.output b}", "unexpected ' '"),
        ("${ workflow.input }", "${ workflow.input }", "malformed"),
        ("${-a.output}", "${-a.output}", "malformed"),
        ("${a.output.b!}", "${a.output.b!}", "unexpected '!'"),
        ("before ${workflow.output} after", "${workflow.output}", "malformed"),
        ("${workflow.input.topic} then ${oops}", "${oops}", "malformed"),
    ],
)
def test_malformed_expressions_raise(context, template, expression, reason):
    error = _resolve_error({"q": template}, context)

    assert error.expression == expression
    assert reason in error.reason
    assert error.path == "$.q"


@pytest.mark.parametrize(
    "body",
    ["", "workflow", "workflow.output", "step.input", "a.output..b", "a.output[x]", "a.output.b c", "a.output["],
)
def test_parse_expression_rejects_malformed_bodies(body):
    with pytest.raises(MappingError) as info:
        parse_expression(body)

    assert info.value.expression == "${" + body + "}"
    assert "malformed" in info.value.reason


@pytest.mark.parametrize(
    ("body", "root", "kind", "path"),
    [
        ("workflow.input", "workflow", "input", ()),
        ("workflow.input.a.b", "workflow", "input", ("a", "b")),
        ("research-step.output", "research-step", "output", ()),
        ("research-step.output.items[0].title", "research-step", "output", ("items", 0, "title")),
        ("s.output.x[0][1].y", "s", "output", ("x", 0, 1, "y")),
        ('s.output["a key"].b', "s", "output", ("a key", "b")),
        ('s.output["a\\"b"]', "s", "output", ('a"b',)),
        ('s.output["é"]', "s", "output", ("é",)),
        ("s_1.output.with-hyphen.and_under.123", "s_1", "output", ("with-hyphen", "and_under", "123")),
        ("s.output[12]", "s", "output", (12,)),
    ],
)
def test_parse_expression(body, root, kind, path):
    expression = parse_expression(body)

    assert expression == Expression(text="${" + body + "}", root=root, kind=kind, path=path)
    assert expression.step_id == (None if root == WORKFLOW_ROOT else root)


def test_parse_expression_keeps_given_text():
    assert parse_expression("workflow.input.a", "${workflow.input.a}").text == "${workflow.input.a}"


# --- find_expressions ----------------------------------------------------------------------------------------------


def test_find_expressions_lists_every_placeholder_depth_first():
    mapping = {
        "a": "${workflow.input.x} and ${first.output.y[0]}",
        "b": {"c": ["lit", "${second-step.output}"]},
        "d": 3,
        "e": None,
        "f": "$${escaped.output}",
    }

    found = list(find_expressions(mapping))

    assert [(path, expr.text) for path, expr in found if isinstance(expr, Expression)] == [
        ("$.a", "${workflow.input.x}"),
        ("$.a", "${first.output.y[0]}"),
        ("$.b.c[1]", "${second-step.output}"),
    ]
    assert [expr.step_id for _, expr in found if isinstance(expr, Expression)] == [None, "first", "second-step"]
    assert len(found) == 3


def test_find_expressions_uses_given_root_path():
    found = list(find_expressions({"q": "${a.output}"}, "$.steps.b.input_mapping"))

    assert [path for path, _ in found] == ["$.steps.b.input_mapping.q"]


def test_find_expressions_yields_malformed_as_errors_instead_of_raising():
    mapping = {
        "bad1": "${workflow.output.x}",
        "good": "${workflow.input.x}",
        "nested": ["${a.output..b}", {"bad3": "text ${unclosed"}],
        "good2": "${a-step.output[0]}",
    }

    found = list(find_expressions(mapping))

    errors = [(path, item) for path, item in found if isinstance(item, MappingError)]
    expressions = [(path, item.text) for path, item in found if isinstance(item, Expression)]
    assert [(path, error.expression) for path, error in errors] == [
        ("$.bad1", "${workflow.output.x}"),
        ("$.nested[0]", "${a.output..b}"),
        ("$.nested[1].bad3", "${unclosed"),
    ]
    assert all(error.path == path for path, error in errors)
    assert expressions == [("$.good", "${workflow.input.x}"), ("$.good2", "${a-step.output[0]}")]


def test_find_expressions_yields_valid_placeholders_before_an_error_in_the_same_string():
    found = list(find_expressions({"q": "${workflow.input.a} ${bad}"}))

    assert isinstance(found[0][1], Expression)
    assert found[0][1].text == "${workflow.input.a}"
    assert isinstance(found[1][1], MappingError)
    assert found[1][1].expression == "${bad}"
    assert len(found) == 2


@pytest.mark.parametrize("value", [None, 1, 2.5, True, [], {}, "no placeholders"])
def test_find_expressions_finds_nothing_in_plain_values(value):
    assert list(find_expressions(value)) == []


# --- the module raises only MappingError (these found bugs; see the report) ----------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        pytest.param('${workflow.input["bad\\q"]}', id="invalid-escape-in-quoted-key"),
        pytest.param('${workflow.input["a\nb"]}', id="control-character-in-quoted-key"),
        pytest.param('${workflow.input["\\u12"]}', id="truncated-unicode-escape"),
        pytest.param("${workflow.input.a[" + "9" * 5000 + "]}", id="index-with-5000-digits"),
    ],
)
def test_odd_expressions_raise_only_mapping_error(context, template):
    with pytest.raises(MappingError):
        resolve_mapping({"q": template}, context)


def test_find_expressions_never_raises_on_odd_quoted_keys():
    found = list(find_expressions({"q": '${workflow.input["bad\\q"]}'}))

    assert len(found) == 1
    assert isinstance(found[0][1], MappingError)


def test_quoted_key_may_contain_a_closing_brace():
    # The docstring promises ``["any key"]`` for keys with other characters.
    context = MappingContext(workflow_input={"a}b": 1}, step_outputs={})

    assert resolve_mapping({"q": '${workflow.input["a}b"]}'}, context) == {"q": 1}


# --- properties ----------------------------------------------------------------------------------------------------

_FRAGMENTS = [
    "${",
    "$${",
    "}",
    "$",
    "{",
    "workflow.input",
    "workflow",
    ".output",
    "step-1",
    "a",
    ".",
    "[0]",
    "[1]",
    "[",
    "]",
    '["k"]',
    '["',
    "\\",
    " ",
    "${workflow.input}",
    "${a.output}",
]
_fragment_text = st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=3)), max_size=8).map("".join)
_json_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _fragment_text, st.text(max_size=5)
)
_json_values = st.recursive(
    _json_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(["a", "k", "0"]), st.text(max_size=4)), children, max_size=4),
    ),
    max_leaves=20,
)
_mappings = st.dictionaries(st.one_of(_fragment_text, st.text(max_size=6)), _json_values, max_size=5)
_contexts = st.builds(
    MappingContext,
    workflow_input=_json_values,
    step_outputs=st.dictionaries(
        st.one_of(st.sampled_from(["a", "step-1", "workflow", "output"]), st.text(max_size=4)), _json_values, max_size=4
    ),
)


@settings(max_examples=300, deadline=None)
@given(mapping=_mappings, context=_contexts)
def test_resolve_mapping_raises_only_mapping_error(mapping, context):
    with contextlib.suppress(MappingError):
        resolve_mapping(mapping, context)


@settings(max_examples=300, deadline=None)
@given(mapping=_mappings)
def test_find_expressions_never_raises(mapping):
    for path, found in find_expressions(mapping):
        assert path.startswith("$")
        assert isinstance(found, Expression | MappingError)


_no_dollar_text = st.text(alphabet=st.characters(blacklist_characters="$"), max_size=10)
_no_dollar_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _no_dollar_text),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(_no_dollar_text, children, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(mapping=st.dictionaries(_no_dollar_text, _no_dollar_values, max_size=5), context=_contexts)
def test_mapping_without_dollar_resolves_to_itself(mapping, context):
    assert resolve_mapping(mapping, context) == mapping


_finite_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text()),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(), children, max_size=3)),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(value=_finite_json)
def test_any_json_value_is_kept_whole_or_interpolated(value):
    context = MappingContext(workflow_input=value, step_outputs={"s": value})
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    assert resolve_mapping(
        {"whole": "${workflow.input}", "step": "${s.output}", "text": "<${workflow.input}>"}, context
    ) == {"whole": value, "step": value, "text": f"<{text}>"}
