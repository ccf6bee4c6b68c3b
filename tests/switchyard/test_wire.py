"""Strict JSON: what Python's json reads but JSON does not allow is refused, naming it; snippets and clips are short."""

from __future__ import annotations

import json

import pytest

from switchyard.wire import SNIPPET_BYTES, StrictJsonError, clip, snippet, strict_loads


def test_plain_json_reads_as_json_does() -> None:
    text = '{"a": [1, 2.5, "x", null, true], "b": {"c": -0.0}}'
    assert strict_loads(text) == json.loads(text)
    assert strict_loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b"[Infinity]", "Infinity is not valid JSON"),
        (b"[-Infinity]", "-Infinity is not valid JSON"),
        (b"[1e999]", "number 1e999 is out of range"),
    ],
)
def test_what_only_python_reads_is_refused_naming_it(body: bytes, reason: str) -> None:
    with pytest.raises(StrictJsonError) as raised:
        strict_loads(body)
    assert str(raised.value) == reason
    assert isinstance(raised.value, ValueError), "callers that refuse any bad JSON catch ValueError"


def test_not_json_at_all_is_a_value_error_but_not_a_strict_json_error() -> None:
    for body in (b"not json", b"\xff\xfe{", b""):
        with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)) as raised:
            strict_loads(body)
        assert not isinstance(raised.value, StrictJsonError)
    with pytest.raises(RecursionError):
        strict_loads(b"[" * 100_000 + b"]" * 100_000)


def test_a_snippet_shows_the_start_and_says_when_there_is_more() -> None:
    assert snippet(b"short") == "b'short'"
    long = b"x" * (SNIPPET_BYTES + 1)
    assert snippet(long) == repr(b"x" * SNIPPET_BYTES) + "..."


def test_clip() -> None:
    assert clip("abc", 3) == "abc"
    assert clip("abcdef", 5) == "ab..."
    assert len(clip("y" * 5000, 2000)) == 2000
