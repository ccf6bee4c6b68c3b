"""Hostile HTTP against the real executor: oversize bodies, reused run ids, cross-site posts, Faust's own
views, router errors, NUL in paths and bodies. Every answer is JSON, nothing hostile starts a run, and after
each case the worker still runs a good run to its end.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from tests.faults.conftest import (
    API_TOKEN,
    AUTH,
    MAX_MESSAGE_BYTES,
    AgentSpec,
    FaultStack,
    StackPlaces,
    chain,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def stack(stack_places: StackPlaces) -> Iterator[FaultStack]:
    """A stack of this module's own: hostile requests must not touch the other scenarios."""
    with stack_places.stack("hostile-http", {"summarizer": AgentSpec()}) as started:
        yield started


def send(
    stack: FaultStack, method: str, path: str, data: bytes | None = None, headers: Mapping[str, str] | None = None
) -> tuple[int, Any]:
    """A raw request to the executor; asserts that the answer is JSON, returns (status, decoded body)."""
    request = urllib.request.Request(stack.url("executor", path), data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=10.0) as response:
            raw, status, content_type = response.read(), int(response.status), response.headers.get_content_type()
    except urllib.error.HTTPError as error:
        raw, status, content_type = error.read(), error.code, error.headers.get_content_type()
    assert content_type == "application/json", f"{method} {path} answered {status} {content_type}: {raw[:300]!r}"
    return status, json.loads(raw)


def post_json(stack: FaultStack, path: str, body: Any, **headers: str) -> tuple[int, Any]:
    return send(stack, "POST", path, json.dumps(body).encode(), {**JSON, **AUTH, **headers})


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def never_recorded(stack: FaultStack, *run_ids: str) -> None:
    """None of ``run_ids`` reached PostgreSQL (checked after a good run went all the way through)."""
    assert stack.statuses(run_ids) == {}


def test_an_oversize_submission_is_413_with_its_size_and_the_limit(stack: FaultStack) -> None:
    run_id = unique("oversize")
    body = {"plan": chain("summarizer"), "input": {"text": "x" * MAX_MESSAGE_BYTES}, "run_id": run_id}
    status, answer = post_json(stack, "/runs/", body)
    assert status == 413, answer
    assert answer["size"] == len(json.dumps(body).encode())
    assert answer["limit"] == MAX_MESSAGE_BYTES
    assert str(MAX_MESSAGE_BYTES) in answer["error"]

    # A body that fits, whose record (the plan's defaults filled in) does not.
    compact: dict[str, Any] = {"plan": chain("summarizer"), "input": {"text": ""}, "run_id": unique("oversize")}
    room = MAX_MESSAGE_BYTES - len(json.dumps(compact, separators=(",", ":")))
    compact["input"] = {"text": "y" * room}
    raw = json.dumps(compact, separators=(",", ":")).encode()
    assert len(raw) == MAX_MESSAGE_BYTES
    status, answer = send(stack, "POST", "/runs/", raw, {**JSON, **AUTH})
    assert status == 413, answer
    assert answer["size"] > MAX_MESSAGE_BYTES
    assert answer["limit"] == MAX_MESSAGE_BYTES

    stack.assert_serving("after oversize")
    never_recorded(stack, run_id, compact["run_id"])


def test_a_reused_run_id_means_the_same_run(stack: FaultStack) -> None:
    run_id = unique("reused")
    plan = chain("summarizer")
    status, answer = post_json(stack, "/runs/", {"plan": plan, "input": {"text": "first words"}, "run_id": run_id})
    assert (status, answer) == (202, {"run_id": run_id, "status_url": f"/runs/{run_id}/"})
    first = stack.wait_terminal([run_id])[run_id]
    assert first.status == "COMPLETED"

    status, answer = post_json(stack, "/runs/", {"plan": plan, "input": {"text": "first words"}, "run_id": run_id})
    assert status == 202, answer
    assert answer["run_id"] == run_id
    assert answer["status_url"] == f"/runs/{run_id}/"
    assert answer["existing"] is True
    assert answer["status"] == "COMPLETED"

    status, answer = post_json(stack, "/runs/", {"plan": plan, "input": {"text": "other words"}, "run_id": run_id})
    assert status == 409, answer
    assert answer["run_id"] == run_id
    assert answer["status"] == "COMPLETED"
    assert run_id in answer["error"]

    stack.assert_serving("after reuse")
    again = stack.run(run_id)
    assert again is not None
    assert (again.input, again.output, again.completed_at) == (first.input, first.output, first.completed_at)
    assert len(again.steps) == len(first.steps), "nothing ran again"


def test_cross_site_posts_are_refused_and_start_nothing(stack: FaultStack) -> None:
    form_run, json_run, no_type_run = unique("xsite-form"), unique("xsite-json"), unique("xsite-plain")
    form = json.dumps({"plan": chain("summarizer"), "input": {"text": "evil"}, "run_id": form_run}).encode()
    # What a form on another site can send without a preflight: text/plain, with the page's Origin.
    status, answer = send(
        stack,
        "POST",
        "/runs/",
        form,
        {"Content-Type": "text/plain", "Origin": "http://evil.example", **AUTH},
    )
    assert status in {403, 415}, answer
    # The same without an Origin (not a browser) is still not JSON.
    plain = form.replace(form_run.encode(), no_type_run.encode())
    status, answer = send(stack, "POST", "/runs/", plain, {"Content-Type": "text/plain", **AUTH})
    assert status == 415, answer
    # JSON from a foreign origin, token and all.
    body = {"plan": chain("summarizer"), "input": {"text": "evil"}, "run_id": json_run}
    status, answer = post_json(stack, "/runs/", body, Origin="http://evil.example")
    assert status == 403, answer
    assert answer["origin"] == "http://evil.example"
    status, answer = post_json(stack, "/runs/", body, **{"Sec-Fetch-Site": "cross-site"})
    assert status == 403, answer
    status, answer = send(stack, "DELETE", "/agents/summarizer", headers={"Origin": "http://evil.example", **AUTH})
    assert status == 403, answer
    # The server's own origin passes.
    own = f"http://127.0.0.1:{stack.web_ports['executor']}"
    status, answer = post_json(stack, "/runs/", {"plan": chain("summarizer"), "input": {"text": "own"}}, Origin=own)
    assert status == 202, answer
    assert stack.wait_terminal([answer["run_id"]])[answer["run_id"]].status == "COMPLETED"

    stack.assert_serving("after cross-site")
    never_recorded(stack, form_run, json_run, no_type_run)
    status, agent = send(stack, "GET", "/agents/summarizer")
    assert status == 200, "the cross-site DELETE deleted nothing"
    assert agent["name"] == "summarizer"


def test_fausts_own_views_are_behind_the_token(stack: FaultStack) -> None:
    (run_id,) = stack.submit(chain("summarizer"), 1, "table view")
    stack.wait_terminal([run_id])
    for path in ("/router/", "/table/", f"/table/runs/{run_id}/", "/router/runs/", "/"):
        status, answer = send(stack, "GET", path)
        assert status == 404, (path, answer)
        assert answer["error"].startswith("no such endpoint"), answer
        status, _ = send(stack, "GET", path, headers={"Authorization": "Bearer not-the-token"})
        assert status == 404, path
    for path in ("/router/", "/table/"):
        status, _ = send(stack, "GET", path, headers=AUTH)
        assert status == 200, path
    # Switchyard's own routed view works, through the same machinery Faust's views use.
    status, view = send(stack, "GET", f"/runs/{run_id}/")
    assert (status, view["status"]) == (200, "COMPLETED")
    stack.assert_serving("after Faust's views")


def test_router_errors_are_json(stack: FaultStack) -> None:
    status, answer = send(stack, "GET", "/no/such/path")
    assert status == 404
    assert answer["error"] == "no such endpoint: GET /no/such/path"
    status, answer = send(stack, "PATCH", "/runs/", b"{}", {**JSON, **AUTH})
    assert status == 405
    assert answer["allowed"] == ["GET", "HEAD", "POST"]
    status, answer = send(stack, "DELETE", "/runs/", headers=AUTH)
    assert status == 405
    status, answer = send(stack, "POST", "/runs/", b"", {**JSON, **AUTH})
    assert status == 400, "an empty body is not a submission"
    status, answer = send(stack, "POST", "/runs/", b"{oops", {**JSON, **AUTH})
    assert status == 400
    assert "not valid JSON" in answer["error"]
    status, answer = post_json(stack, "/runs/", {"plan": chain("summarizer")}, Authorization="Bearer wrong")
    assert status == 401
    stack.assert_serving("after router errors")


def test_nul_in_a_path_or_a_body_field_is_400_naming_it(stack: FaultStack) -> None:
    status, answer = send(stack, "GET", "/runs/a%00b/")
    assert (status, answer["parameter"]) == (400, "run_id"), answer
    status, answer = send(stack, "POST", "/runs/a%00b/cancel", b"{}", {**JSON, **AUTH})
    assert (status, answer["parameter"]) == (400, "run_id"), answer
    status, answer = send(stack, "GET", "/agents/x%00y")
    assert (status, answer["parameter"]) == (400, "name"), answer
    status, answer = send(stack, "GET", "/runs/?workflow_id=%00")
    assert (status, answer["parameter"]) == (400, "workflow_id"), answer

    run_id = unique("nul")
    body = {"plan": chain("summarizer"), "input": {"text": "a\x00b"}, "run_id": run_id}
    status, answer = post_json(stack, "/runs/", body)
    assert (status, answer["path"]) == (400, "$.input.text"), answer
    assert "NUL" in answer["error"]
    plan = chain("summarizer")
    plan["name"] = "bad\x00name"
    status, answer = post_json(stack, "/runs/", {"plan": plan, "input": {}, "run_id": unique("nul")})
    assert (status, answer["path"]) == (400, "$.plan.name"), answer
    lone = b'{"plan": {}, "input": {"text": "\\udc80"}}'
    status, answer = send(stack, "POST", "/runs/", lone, {**JSON, **AUTH})
    assert (status, answer["path"]) == (400, "$.input.text"), answer
    entry = json.dumps({"url": "http://127.0.0.1:9/\x00"}).encode()
    status, answer = send(stack, "PUT", "/agents/nul-agent", entry, {**JSON, **AUTH})
    assert (status, answer["path"]) == (400, "$.url"), answer
    # Run ids that cannot be runs are not looked up at all.
    status, answer = send(stack, "GET", "/runs/not%20a%20run%20id/")
    assert status == 404, answer

    stack.assert_serving("after NUL")
    never_recorded(stack, run_id)
    status, _ = send(stack, "GET", "/agents/nul-agent")
    assert status == 404


def test_the_token_guards_writes_with_the_configured_token(stack: FaultStack) -> None:
    assert stack.worker_env["SWITCHYARD_API_TOKEN"] == API_TOKEN
    status, _ = send(stack, "DELETE", "/agents/nobody")
    assert status == 401
    status, _ = send(stack, "DELETE", "/agents/nobody", headers=AUTH)
    assert status == 404, "a DELETE without a body needs no content type"
    status, _ = send(stack, "GET", "/health/")
    assert status == 200
