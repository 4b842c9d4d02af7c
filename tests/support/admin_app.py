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


async def serve_routes(routes: list, host: str = "127.0.0.1") -> tuple[object, int]:
    """Start an aiohttp Application with `routes` on a free port of this loop: (runner, port)."""
    from aiohttp import web

    app = web.Application()
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
def admin_proxy(upstream: tuple[str, int], **flags: str) -> Iterator[AdminProxy]:
    """A proxy in front of `upstream` with the sinks `mongoproxy run` would build from `flags`, plus admin routes."""
    cfg = make_config(f"0:{upstream[0]}:{upstream[1]}", **flags)
    registry = CollectorRegistry()
    sinks = build_sinks(cfg, SinkContext(registry=registry, version=__version__, mode="static"))
    routes = [r for s in sinks if hasattr(s, "admin_routes") for r in s.admin_routes()]
    with ProxyThread(upstream[1], upstream_host=upstream[0], sinks=sinks, **flags) as thread:
        runner, port = asyncio.run_coroutine_threadsafe(serve_routes(routes), thread.loop).result(10)
        try:
            yield AdminProxy(thread, sinks, port, registry)
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), thread.loop).result(10)
            for s in sinks:
                close = getattr(s, "close", None)
                if callable(close):
                    close()
