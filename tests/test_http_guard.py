"""http_guard.py: the Host, Origin and body-size rules, on a small app of their own (serve.py's routes are tested in
tests/test_serve.py), and the pure functions behind them."""

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI

from alpaca_trainml.generation.http_guard import ApiKey, Guard, host_name, is_loopback, origin_allowed
from alpaca_trainml.generation.protocol import install_error_handlers


def app_with(**guard):
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(body: dict):
        return body

    app.add_middleware(Guard, **guard)
    return app


def call(app, *requests):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=30) as client:
            return await asyncio.gather(*(client.request(m, p, **kw) for m, p, kw in requests))

    return asyncio.run(go())


@pytest.mark.parametrize(
    "name,loopback",
    [("localhost", True), ("127.0.0.1", True), ("127.9.8.7", True), ("[::1]", True), ("::1", True)]
    + [("evil.example", False), ("0.0.0.0", False), ("127.0.0.1.nip.io", False), ("10.0.0.1", False), ("", False)],
)
def test_is_loopback(name, loopback):
    assert is_loopback(name) is loopback


def test_host_name_drops_the_port():
    assert [host_name(h) for h in ["localhost:8000", "127.0.0.1", "[::1]:80", "[::1]", "evil.example:1"]] == [
        "localhost",
        "127.0.0.1",
        "[::1]",
        "[::1]",
        "evil.example",
    ]


def test_origin_allowed():
    assert origin_allowed("http://localhost:3000", "evil.example", ())  # a loopback page
    assert origin_allowed("http://[::1]:5173", "localhost:8000", ())
    assert origin_allowed("http://my.lan:8000", "my.lan:8000", ())  # the server's own page
    assert not origin_allowed("https://evil.example", "localhost:8000", ())
    assert not origin_allowed("http://localhost.evil.example", "localhost:8000", ())
    assert not origin_allowed("null", "localhost:8000", ())
    assert origin_allowed("null", "localhost:8000", ("null",))
    assert origin_allowed("https://evil.example", "localhost:8000", ("*",))


def test_foreign_host_headers_are_refused_on_loopback():
    def echo(app, host):
        return call(app, ("POST", "/echo", dict(json={"a": 1}, headers={"Host": host})))[0]

    app = app_with()
    for host in ["localhost", "localhost:8000", "127.0.0.1:80", "127.1.2.3", "[::1]:8000"]:
        assert echo(app, host).json() == {"a": 1}, host
    for host in ["evil.example", "evil.example:8000", "127.0.0.1.nip.io", "0.0.0.0:8000"]:
        r = echo(app, host)
        assert r.status_code == 403 and "listens on a loopback address" in r.json()["error"]["message"], host
    assert echo(app_with(loopback_only=False), "my-server.lan:8000").status_code == 200


def test_bodies_over_the_limit_get_413():
    big = {"text": "x" * 2000}

    async def chunks():  # no Content-Length: sent with chunked transfer encoding
        text = json.dumps(big).encode()
        for i in range(0, len(text), 300):
            yield text[i : i + 300]

    declared, chunked, small = call(
        app_with(max_body_bytes=1000),
        ("POST", "/echo", dict(json=big)),
        ("POST", "/echo", dict(content=chunks(), headers={"Content-Type": "application/json"})),
        ("POST", "/echo", dict(json={"text": "Hi"})),
    )
    for r in (declared, chunked):
        assert r.status_code == 413, r.text
        assert "the limit is 1000 (--max_body_bytes)" in r.json()["error"]["message"]
    assert "transfer-encoding" not in declared.request.headers  # refused on its Content-Length
    assert chunked.request.headers["transfer-encoding"] == "chunked"  # refused while it was read
    assert small.json() == {"text": "Hi"}


def test_the_api_key_guards_the_model_routes_only():
    app = app_with()
    app.add_middleware(ApiKey, api_key="sekret")
    none, wrong, right = call(
        app,
        ("POST", "/echo", dict(json={})),
        ("POST", "/v1/x", dict(json={}, headers={"Authorization": "Bearer nope"})),
        ("POST", "/v1/x", dict(json={}, headers={"Authorization": "Bearer sekret"})),
    )
    assert none.status_code == 200  # /echo is not a model route
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert right.status_code == 404  # past the key check, to a route this app does not have
