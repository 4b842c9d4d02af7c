"""An in-process proxy with the real sinks, and the sinks' admin routes served by an aiohttp Application.

Stands in for the aiohttp admin endpoint (issue 16) as the admin contract describes it: the routes of every sink that
has `admin_routes()` are collected into one `aiohttp.web.Application`, served on the proxy's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.request
from collections.abc import Iterator

from prometheus_client import CollectorRegistry

from mongoproxy import __version__
from mongoproxy.sinks import SinkContext, build_sinks

from .inprocess import ProxyThread, make_config

# Static, data-free routes a browser must reach before it can send a token (the page and its assets).
OPEN_PREFIXES = ("/healthz", "/readyz", "/ui/")


async def serve_routes(routes: list, host: str = "127.0.0.1", token: str | None = None) -> tuple[object, int]:
    """Start an aiohttp Application with `routes` on a free port of this loop: (runner, port).

    With `token`, every route but the page and OPEN_PREFIXES needs `Authorization: Bearer <token>`, as the admin
    endpoint's --admin-token-file asks.
    """
    from aiohttp import web

    @web.middleware
    async def bearer(request: web.Request, handler):
        open_path = request.path == "/" or request.path.startswith(OPEN_PREFIXES)
        if token is not None and not open_path and request.headers.get("Authorization") != f"Bearer {token}":
            return web.Response(status=401, text="a bearer token is required\n")
        return await handler(request)

    app = web.Application(middlewares=[bearer])
    app.add_routes(routes)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


class AdminProxy:
    """What a test needs from one proxy: its URI, its sinks by name, its admin base URL."""

    def __init__(self, thread: ProxyThread, sinks: list, admin_port: int, registry: CollectorRegistry) -> None:
        self.thread = thread
        self.sinks = {s.name: s for s in sinks}
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.registry = registry

    @property
    def uri(self) -> str:
        """mongodb:// URI of the proxy (directConnection)."""
        return f"mongodb://127.0.0.1:{self.thread.port}/?directConnection=true"

    def get_json(self, path: str, method: str = "GET") -> dict:
        """GET (or POST) a JSON document from the admin routes."""
        req = urllib.request.Request(self.admin_url + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())


@contextlib.contextmanager
def admin_proxy(upstream: tuple[str, int], token: str | None = None, **flags: str) -> Iterator[AdminProxy]:
    """A proxy in front of `upstream` with the sinks `mongoproxy run` would build from `flags`, plus admin routes."""
    cfg = make_config(f"0:{upstream[0]}:{upstream[1]}", **flags)
    registry = CollectorRegistry()
    sinks = build_sinks(cfg, SinkContext(registry=registry, version=__version__, mode="static"))
    routes = [r for s in sinks if hasattr(s, "admin_routes") for r in s.admin_routes()]
    with ProxyThread(upstream[1], upstream_host=upstream[0], sinks=sinks, **flags) as thread:
        runner, port = asyncio.run_coroutine_threadsafe(serve_routes(routes, token=token), thread.loop).result(10)
        try:
            yield AdminProxy(thread, sinks, port, registry)
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), thread.loop).result(10)
            for s in sinks:
                close = getattr(s, "close", None)
                if callable(close):
                    close()
