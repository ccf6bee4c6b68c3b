"""The HTTP guard on a tiny aiohttp app: JSON errors, token, cross-site, content type, size, unstorable text."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from pydantic import SecretStr

from switchyard import http_guard
from switchyard.http_guard import MAX_DEPTH, NO_BODY, Guard, find_unstorable, parse_json
from switchyard.settings import Settings

TOKEN = "guard-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
LIMIT = 16_384


def make_settings(**options: Any) -> Settings:
    return Settings(**{"max_message_bytes": LIMIT, "database_url": None, **options})


async def echo(request: web.Request) -> web.Response:
    body = await http_guard.json_body(request, LIMIT)
    return web.json_response({"body": None if body is NO_BODY else body, "params": dict(request.match_info)})


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("secret detail that must not be shown")


async def teapot(request: web.Request) -> web.Response:
    return web.Response(status=418, text="<html>I am a teapot</html>", content_type="text/html")


async def bad(request: web.Request) -> web.Response:
    raise web.HTTPBadRequest(text="plain text from aiohttp")


async def redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/health/")


def tiny_app(guard: Guard) -> web.Application:
    app = web.Application(middlewares=[guard])
    app.router.add_get("/health/", echo)
    app.router.add_get("/runs/", echo)
    app.router.add_post("/runs/", echo)
    app.router.add_get("/runs/{run_id}/", echo)
    app.router.add_post("/runs/{run_id}/{action}", echo)
    app.router.add_put("/agents/{name}", echo)
    app.router.add_delete("/agents/{name}", echo)
    app.router.add_get("/internal/{key}/", echo)
    app.router.add_get("/boom", boom)
    app.router.add_get("/teapot", teapot)
    app.router.add_get("/bad", bad)
    app.router.add_get("/redirect", redirect)
    return app


ClientFactory = Callable[..., Any]


@pytest.fixture
async def client_for() -> AsyncIterator[ClientFactory]:
    clients: list[TestClient[web.Request, web.Application]] = []

    async def make(**options: Any) -> TestClient[web.Request, web.Application]:
        guard = Guard(make_settings(**options), port=6066, internal=lambda path: path.startswith("/internal/"))
        client: TestClient[web.Request, web.Application] = TestClient(TestServer(tiny_app(guard)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def answer(response: Any) -> tuple[int, Any]:
    assert response.content_type == "application/json", await response.text()
    return response.status, await response.json()


# ------------------------------------------------------------ JSON errors


async def test_router_errors_are_json(client_for: ClientFactory) -> None:
    client = await client_for()
    status, body = await answer(await client.get("/nowhere"))
    assert status == 404
    assert body["error"] == "no such endpoint: GET /nowhere"
    response = await client.patch("/runs/", json={})
    status, body = await answer(response)
    assert status == 405
    assert body["allowed"] == ["GET", "HEAD", "POST"]
    assert "POST" in response.headers["Allow"]


async def test_an_unexpected_exception_is_a_json_500_without_the_detail(
    client_for: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    client = await client_for()
    with caplog.at_level(logging.ERROR, logger="switchyard.http_guard"):
        response = await client.get("/boom")
        status, body = await answer(response)
    assert (status, body) == (500, {"error": "internal error"})
    assert "secret detail" not in await response.text()
    assert any("secret detail" in (r.exc_text or "") or r.exc_info for r in caplog.records)


async def test_error_answers_that_are_not_json_become_json(client_for: ClientFactory) -> None:
    client = await client_for()
    assert await answer(await client.get("/teapot")) == (418, {"error": "i'm a teapot"})
    assert await answer(await client.get("/bad")) == (400, {"error": "bad request"})
    response = await client.get("/redirect", allow_redirects=False)
    assert response.status == 302, "a redirect is not an error"


# ------------------------------------------------------------ the token


async def test_mutating_requests_need_the_token(client_for: ClientFactory) -> None:
    client = await client_for(api_token=SecretStr(TOKEN))
    response = await client.post("/runs/", json={"a": 1})
    status, body = await answer(response)
    assert status == 401
    assert "SWITCHYARD_API_TOKEN" in body["error"]
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert (await client.post("/runs/", json={}, headers={"Authorization": "Bearer wrong"})).status == 401
    assert (await client.post("/runs/", json={"a": 1}, headers={"Authorization": f"bearer {TOKEN}"})).status == 200
    assert (await client.get("/runs/")).status == 200, "reads are open by default"


async def test_reads_need_the_token_when_configured_except_health(client_for: ClientFactory) -> None:
    client = await client_for(api_token=SecretStr(TOKEN), api_token_for_reads=True)
    assert (await client.get("/runs/")).status == 401
    assert (await client.get("/runs/run-1/")).status == 401
    assert (await client.get("/runs/", headers=AUTH)).status == 200
    assert (await client.get("/health/")).status == 200


async def test_internal_views_are_hidden_without_the_token(client_for: ClientFactory) -> None:
    open_client = await client_for()
    status, body = await answer(await open_client.get("/internal/x/", headers=AUTH))
    assert status == 404, "without a configured token nobody sees them"
    assert body["error"] == "no such endpoint: GET /internal/x/"
    client = await client_for(api_token=SecretStr(TOKEN))
    assert (await client.get("/internal/x/")).status == 404
    assert (await client.get("/internal/x/", headers={"Authorization": "Bearer nope"})).status == 404
    assert (await client.get("/internal/x/", headers=AUTH)).status == 200


# ------------------------------------------------------------ cross-site


async def test_cross_site_requests_are_refused(client_for: ClientFactory) -> None:
    client = await client_for()
    status, body = await answer(await client.post("/runs/", json={}, headers={"Origin": "http://evil.example"}))
    assert status == 403
    assert body["origin"] == "http://evil.example"
    for origin in ("null", "http://127.0.0.1:1", "https://127.0.0.1", "file://", "not a url"):
        response = await client.post("/runs/", json={}, headers={"Origin": origin})
        assert response.status == 403, origin
    response = await client.post("/runs/", json={}, headers={"Sec-Fetch-Site": "cross-site"})
    assert response.status == 403
    # A text/plain form post from another site: refused before its content type is even looked at.
    response = await client.post(
        "/runs/", data=b"x=1", headers={"Origin": "http://evil.example", "Content-Type": "text/plain"}
    )
    assert response.status == 403
    deleted = await client.delete("/agents/a", headers={"Origin": "http://evil.example"})
    assert deleted.status == 403


async def test_same_origin_and_origin_less_requests_pass(client_for: ClientFactory) -> None:
    client = await client_for()
    own = f"http://{client.host}:{client.port}"
    assert (await client.post("/runs/", json={}, headers={"Origin": own})).status == 200
    assert (
        await client.post("/runs/", json={}, headers={"Origin": own, "Sec-Fetch-Site": "same-origin"})
    ).status == 200
    assert (await client.post("/runs/", json={})).status == 200, "curl and the CLI send no Origin"
    response = await client.get("/runs/", headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert response.status == 200, "reads are not refused: a browser does not show them to another site"


def test_own_origin_rules() -> None:
    guard = Guard(make_settings(web_bind="10.1.2.3"), port=6066)

    def own(origin: str, host: str) -> bool:
        return guard.own_origin(origin, make_mocked_request("POST", "/runs/", headers={"Host": host}))

    assert own("http://127.0.0.1:6066", "anything:1")
    assert own("http://localhost:6066", "anything:1")
    assert own("http://[::1]:6066", "anything:1")
    assert own("http://10.1.2.3:6066", "anything:1"), "the bind address"
    assert not own("http://127.0.0.1:6067", "anything:1")
    assert own("http://switchyard.example:8080", "switchyard.example:8080")
    assert own("https://switchyard.example", "switchyard.example"), "behind a TLS proxy that keeps Host"
    assert own("http://Switchyard.Example", "switchyard.example:80")
    assert not own("http://switchyard.example:8080", "switchyard.example:8081")
    assert not own("http://evil.example", "switchyard.example")
    assert not own("null", "switchyard.example")
    assert not own("ftp://switchyard.example", "switchyard.example")
    assert not own("http://switchyard.example/path", "switchyard.example")
    assert not own("http://switchyard.example", "[bad")


# ------------------------------------------------------------ content type


async def test_mutating_requests_need_json(client_for: ClientFactory) -> None:
    client = await client_for()
    status, body = await answer(await client.post("/runs/", data=b"{}", headers={"Content-Type": "text/plain"}))
    assert status == 415
    assert body["content_type"] == "text/plain"
    assert (await client.post("/runs/", data=b"{}")).status == 415, "no content type at all"
    assert (await client.post("/runs/run-1/cancel")).status == 415, "a POST needs it even without a body"
    ok = await client.post("/runs/run-1/cancel", headers=JSON)
    assert ok.status == 200
    assert (await ok.json())["body"] is None
    charset = {"Content-Type": "application/json; charset=UTF-8"}
    assert (await client.post("/runs/", data=b"{}", headers=charset)).status == 200
    latin = {"Content-Type": "application/json; charset=latin-1"}
    assert (await client.post("/runs/", data=b"{}", headers=latin)).status == 415
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert (await client.put("/agents/a", data=b"a=1", headers=form)).status == 415


async def test_a_delete_without_a_body_needs_no_content_type(client_for: ClientFactory) -> None:
    client = await client_for()
    assert (await client.delete("/agents/a")).status == 200
    with_body = await client.delete("/agents/a", data=b"x", headers={"Content-Type": "text/plain"})
    assert with_body.status == 415
    assert (await client.delete("/agents/a", json={"why": "done"})).status == 200


# ------------------------------------------------------------ size


async def test_a_body_over_the_limit_is_413_with_size_and_limit(client_for: ClientFactory) -> None:
    client = await client_for()
    raw = json.dumps({"text": "x" * LIMIT}).encode()
    status, body = await answer(await client.post("/runs/", data=raw, headers=JSON))
    assert status == 413
    assert body["size"] == len(raw)
    assert body["limit"] == LIMIT
    assert str(LIMIT) in body["error"]
    exact = json.dumps({"t": "x" * (LIMIT - 9)}).encode()
    assert len(exact) == LIMIT
    assert (await client.post("/runs/", data=exact, headers=JSON)).status == 200, "the limit itself is fine"


async def test_a_chunked_body_over_the_limit_is_413(client_for: ClientFactory) -> None:
    client = await client_for()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(LIMIT // 1000 + 2):
            yield b" " * 1000
        yield b"{}"

    status, body = await answer(await client.post("/runs/", data=chunks(), headers=JSON))
    assert status == 413
    assert body["size"] is None, "a body that does not say its length has no known size"
    assert body["limit"] == LIMIT


# ------------------------------------------------------------ unstorable text


@pytest.mark.parametrize(
    ("raw", "path", "reason"),
    [
        (b'{"input": {"text": "a\\u0000b"}}', "$.input.text", "NUL"),
        (b'{"input": {"items": ["ok", "\\ud800"]}}', "$.input.items[1]", "surrogate"),
        (b'{"input": {"a\\u0000": 1}}', r'$.input["a\u0000"]', "key"),
        (b'{"input": {"n": 1e400}}', "$.input.n", "out of range"),
        (b'{"plan": {"my key": ["\\u0000"]}}', '$.plan["my key"][0]', "NUL"),
    ],
)
async def test_text_postgresql_cannot_store_is_400_naming_the_field(
    client_for: ClientFactory, raw: bytes, path: str, reason: str
) -> None:
    client = await client_for()
    status, body = await answer(await client.post("/runs/", data=raw, headers=JSON))
    assert status == 400
    assert body["path"] == path
    assert reason in body["error"]


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"n": NaN}', "not valid JSON"),
        (b'{"t": "\xff"}', "not UTF-8"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
    ],
)
async def test_unreadable_bodies_are_400(client_for: ClientFactory, raw: bytes, says: str) -> None:
    client = await client_for(max_message_bytes=1_000_000)
    status, body = await answer(await client.post("/runs/", data=raw, headers=JSON))
    assert status == 400
    assert says in body["error"]


async def test_nul_in_a_path_or_query_parameter_is_400_naming_it(client_for: ClientFactory) -> None:
    client = await client_for()
    status, body = await answer(await client.get("/runs/a%00b/"))
    assert status == 400
    assert body["parameter"] == "run_id"
    assert "NUL" in body["error"]
    status, body = await answer(await client.put("/agents/x%00", json={}))
    assert (status, body["parameter"]) == (400, "name")
    status, body = await answer(await client.get("/runs/?workflow_id=%00"))
    assert (status, body["parameter"]) == (400, "workflow_id")
    assert (await client.get("/runs/a%ffb/")).status == 200, "undecodable bytes stay escaped: storable text"


def test_find_unstorable_names_the_first_in_document_order() -> None:
    assert find_unstorable({"a": "ok", "b": [1, 2.5, True, None, {"c": "fine"}]}) is None
    assert find_unstorable({"a": ["\x00", "\x00"], "b": "\x00"}) == (
        "$.a[0]",
        "contains a NUL character (\\u0000), which PostgreSQL cannot store",
    )
    deep: Any = "x"
    for _ in range(MAX_DEPTH):
        deep = [deep]
    assert find_unstorable(deep) is None
    found = find_unstorable([deep])
    assert found is not None
    assert "nested" in found[1]


def test_parse_json_accepts_storable_json() -> None:
    assert parse_json('{"text": "caf\u00e9 \u2603", "n": -1.5e10}'.encode()) == {"text": "café ☃", "n": -1.5e10}
    with pytest.raises(http_guard.Problem) as refused:
        parse_json(b'{"a": "\\u0000"}')
    assert refused.value.status == 400
    assert refused.value.extra == {"path": "$.a"}


def test_install_needs_the_aiohttp_driver() -> None:
    class Conf:
        web_port = 1

    class App:
        web = object()
        conf = Conf()

    with pytest.raises(TypeError, match="aiohttp"):
        http_guard.install(App(), make_settings())


async def test_the_bridge_app_can_be_guarded(tmp_path: Any) -> None:
    from agents_bridge.app import create_app

    settings = make_settings(broker_url="kafka://127.0.0.1:9", data_dir=tmp_path, api_token=SecretStr(TOKEN))
    app = create_app(settings)
    guard = http_guard.install(app, settings)
    assert http_guard.install(app, settings) is guard, "installing twice keeps one guard"
    web_app = app.web.web_app  # type: ignore[attr-defined]
    assert sum(isinstance(m, Guard) for m in web_app.middlewares) == 1
    app.web.init_server()
    async with TestClient(TestServer(web_app)) as client:
        health = await client.get("/health/")
        assert health.status in {200, 503}
        assert health.content_type == "application/json"
        router = await client.get("/router/")
        assert (router.status, router.content_type) == (404, "application/json")
        assert (await client.get("/router/", headers=AUTH)).status == 200
        assert (await client.post("/health/", json={})).status == 405
