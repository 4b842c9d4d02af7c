"""The aiohttp admin endpoint: read timeout, connection cap, size limits, gzip/OpenMetrics, token, TLS, routes."""

from __future__ import annotations

import asyncio
import gzip
import os
import ssl

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from mongoproxy import admin
from tests.support.inprocess import make_config, run, running_proxy
from tests.support.ports import free_port

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


class RouteSink:
    """A sink contributing a route, as the contract says."""

    name = "routes"

    def admin_routes(self):
        async def echo(request: web.Request) -> web.Response:
            return web.Response(body=await request.read())

        async def hello(request: web.Request) -> web.Response:
            return web.json_response({"from": "sink"})

        @admin.public
        async def page(request: web.Request) -> web.Response:
            return web.Response(text="<html>no data here</html>", content_type="text/html")

        return [web.get("/api/sink", hello), web.post("/api/echo", echo), web.get("/api/page", page)]


class RouteComponent:
    def admin_routes(self):
        async def hello(request: web.Request) -> web.Response:
            return web.json_response({"from": "component"})

        return [web.get("/api/component", hello)]


async def _admin(proxy, **flags):
    registry = CollectorRegistry()
    Counter("mongoproxy_test_things", "A counter so that /metrics is not empty.", registry=registry).inc(3)
    cfg = make_config("0:127.0.0.1:1", **flags)
    server = await admin.start("127.0.0.1", 0, registry, proxy, cfg)
    return server, server.sockets[0].getsockname()[1]


def _with_admin(coro_fn, *, sinks=None, **flags):
    async def main():
        async with running_proxy(free_port(), sinks=sinks) as proxy:
            proxy.components.append(RouteComponent())
            server, port = await _admin(proxy, **flags)
            try:
                return await coro_fn(proxy, server, port)
            finally:
                await server.aclose()

    return run(main(), "asyncio")


async def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def test_read_timeout_closes_a_slow_head():
    """A client that never finishes its request head is closed after --admin-read-timeout and counted."""

    async def body(proxy, server, port):
        got = await _raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n", timeout=5)
        return got, dict(server.rejected)

    got, rejected = _with_admin(body, admin_read_timeout="0.3")
    assert got == b""
    assert rejected == {"read_timeout": 1}


def test_connection_cap_answers_503():
    """Past --admin-max-connections a connection gets a 503 and is closed; the open ones still work."""

    async def body(proxy, server, port):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.1)
        refused = await _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reader, writer = held[0]
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        ok = await asyncio.wait_for(reader.read(), 5)
        for _, w in held:
            w.close()
        return refused, ok, dict(server.rejected)

    refused, ok, rejected = _with_admin(body, admin_max_connections="2")
    assert refused.startswith(b"HTTP/1.1 503")
    assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"ok\n")
    assert rejected == {"too_many_connections": 1}


def test_request_size_limits():
    """A head line past 8190 bytes is refused, and so is a body past --admin-max-request-bytes."""

    async def body(proxy, server, port):
        long_head = await _raw(port, b"GET /healthz?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{port}/api/echo", data=b"x" * 2000) as r:
                big = r.status
            async with s.post(f"http://127.0.0.1:{port}/api/echo", data=b"x" * 500) as r:
                small = r.status, await r.read()
        return long_head, big, small

    long_head, big, small = _with_admin(body, sinks=[RouteSink()], admin_max_request_bytes="1000")
    assert long_head.split(b" ", 2)[1] in (b"400", b"414", b"431")
    assert big == 413
    assert small == (200, b"x" * 500)


def test_metrics_gzip_and_openmetrics():
    """Accept-Encoding: gzip gives a gzipped body; Accept: OpenMetrics gives OpenMetrics ending in # EOF."""

    async def body(proxy, server, port):
        url = f"http://127.0.0.1:{port}/metrics"
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.get(url, headers={"Accept-Encoding": "gzip"}) as r:
                zipped = r.headers.get("Content-Encoding"), r.headers["Content-Type"], await r.read()
            async with s.get(url, headers={"Accept": OPENMETRICS, "Accept-Encoding": "identity"}) as r:
                om = r.headers["Content-Type"], (await r.read()).decode()
            async with s.get(url, headers={"Accept-Encoding": "identity"}) as r:
                plain = r.headers["Content-Type"], (await r.read()).decode()
        return zipped, om, plain

    zipped, om, plain = _with_admin(body)
    assert zipped[0] == "gzip" and zipped[1].startswith("text/plain")
    assert "mongoproxy_test_things_total 3.0" in gzip.decompress(zipped[2]).decode()
    assert om[0].startswith("application/openmetrics-text") and om[1].rstrip().endswith("# EOF")
    assert plain[0].startswith("text/plain") and "# EOF" not in plain[1]
    assert "mongoproxy_test_things_total 3.0" in plain[1]


def test_bearer_token_everywhere_but_probes_and_reload(tmp_path):
    """--admin-token-file guards /metrics and contributed routes, not the probes; reload() re-reads it."""
    token = tmp_path / "token"
    token.write_text("s3cret-one\n")

    async def body(proxy, server, port):
        base = f"http://127.0.0.1:{port}"
        out = {}
        async with aiohttp.ClientSession() as s:

            async def status(path, tok=None):
                headers = {"Authorization": f"Bearer {tok}"} if tok else {}
                async with s.get(base + path, headers=headers) as r:
                    return r.status

            for path in ("/healthz", "/readyz", "/api/page", "/metrics", "/api/sink", "/api/component", "/nowhere"):
                out[path] = (await status(path), await status(path, "wrong"), await status(path, "s3cret-one"))
            token.write_text("s3cret-two")
            server.reload()
            out["after reload"] = (await status("/metrics", "s3cret-one"), await status("/metrics", "s3cret-two"))
            token.unlink()
            server.reload()  # a missing file keeps the old token
            out["after failed reload"] = await status("/metrics", "s3cret-two")
        return out, dict(server.rejected)

    out, rejected = _with_admin(body, sinks=[RouteSink()], admin_token_file=str(token))
    assert out["/healthz"] == (200, 200, 200)
    assert out["/readyz"] == (200, 200, 200)
    assert out["/api/page"] == (200, 200, 200)  # marked public: a static page with no data
    assert out["/metrics"] == (401, 401, 200)
    assert out["/api/sink"] == (401, 401, 200)
    assert out["/api/component"] == (401, 401, 200)
    assert out["/nowhere"] == (401, 401, 404)
    assert out["after reload"] == (401, 200)
    assert out["after failed reload"] == 200
    assert rejected["unauthorized"] == 9


def test_tls(tmp_path):
    """--admin-tls-cert/--admin-tls-key serve HTTPS; a plain-HTTP client gets nothing."""
    trustme = pytest.importorskip("trustme")  # in the test extra; the guard fails the run if it is missing
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def body(proxy, server, port):
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://127.0.0.1:{port}/metrics", ssl=client_ctx) as r:
                secure = r.status, await r.text()
        plain = await _raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        return secure, plain

    secure, plain = _with_admin(body, admin_tls_cert=str(cert_path), admin_tls_key=str(key_path))
    assert secure[0] == 200 and "mongoproxy_test_things_total" in secure[1]
    assert not plain.startswith(b"HTTP/1.1 200")


def test_contributed_routes_and_head():
    """Routes come from sinks and proxy.components; HEAD works on the built-in routes."""

    async def body(proxy, server, port):
        async with aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{port}"
            async with s.get(base + "/api/sink") as r:
                sink = await r.json()
            async with s.get(base + "/api/component") as r:
                comp = await r.json()
            async with s.head(base + "/metrics") as r:
                head = r.status, await r.read()
            async with s.post(base + "/healthz") as r:
                post = r.status
        return sink, comp, head, post

    sink, comp, head, post = _with_admin(body, sinks=[RouteSink()])
    assert sink == {"from": "sink"} and comp == {"from": "component"}
    assert head == (200, b"")
    assert post == 405


def test_admin_options_reject_half_tls(tmp_path):
    """--admin-tls-cert without --admin-tls-key is a one-line ConfigError."""
    from mongoproxy.errors import ConfigError

    with pytest.raises(ConfigError, match="go together"):
        admin.AdminServer(CollectorRegistry(), None, make_config("0:a:1", admin_tls_cert=os.devnull))
