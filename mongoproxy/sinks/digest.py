"""The live query digest (on by default): a sink that feeds mongoproxy.digest and serves it on the admin endpoint.

Routes (admin contract: `admin_routes()` returns aiohttp route definitions):
  GET  /digest?sort=total_time|p99|count|errors&limit=N&ns=db.coll&app=NAME[&reset=1][&sketch=1]
  POST /digest/reset
Shapes never become metric labels: Prometheus gets only the table's size, memory and evictions.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from mongoproxy import digest as digest_mod
from mongoproxy._digest import DigestHook
from mongoproxy.config import Option, positive_int
from mongoproxy.digest import error_name
from mongoproxy.events import wall_ns
from mongoproxy.querylog import event_query

log = logging.getLogger("mongoproxy.digest")

# Shapes rendered between two yields to the event loop while answering GET /digest.
SLICE = 100

G = "digest"
OPTIONS: list[Option] = [
    Option(
        "no_digest",
        ("--no-digest",),
        "switch off the per-shape query digest (GET /digest, mongoproxy top, the web view's table)",
        switch=True,
        default=False,
        group=G,
    ),
    Option(
        "digest_max_shapes",
        ("--digest-max-shapes",),
        "query shapes the digest keeps; the least recently seen is evicted past this",
        positive_int("--digest-max-shapes"),
        digest_mod.DEFAULT_MAX_SHAPES,
        metavar="N",
        group=G,
    ),
]


def enabled(config: Any) -> bool:
    """Whether the digest runs (and so the scanner renders every command's shape)."""
    return not getattr(config, "no_digest", False)


class DigestSink:
    """Counts every command (but drivers' monitoring long polls) under its shape key."""

    name = "digest"

    def __init__(self, max_shapes: int = digest_mod.DEFAULT_MAX_SHAPES, show_values: bool = False) -> None:
        self.digest = digest_mod.Digest(max_shapes, to_wall=wall_ns)
        # The Query is shared with the command log, which shows values with --no-redact; the digest keeps only
        # its redacted text, so asking with the same flag lets both use one computation.
        self.show_values = show_values
        self.live: Any = None  # the live view's sink, offered every command (see sinks/live.py)
        # on_command(event): one C call (mongoproxy/_digest.pyx) that counts every command but drivers'
        # monitoring long polls under its shape key, and offers it to the live view when a browser follows it.
        self.on_command = DigestHook(self, digest_mod.COUNT, event_query, error_name)

    # ---- admin API ----

    def admin_routes(self) -> list:
        """GET /digest and POST /digest/reset."""
        from aiohttp import web

        return [web.get("/digest", self.handle_get), web.post("/digest/reset", self.handle_reset)]

    async def document(self, params: Any) -> dict:
        """The JSON document for request parameters, built in slices so the data path runs in between."""
        sort = params.get("sort", "total_time")
        limit = params.get("limit")
        if limit is not None:
            if not str(limit).isdigit():
                raise ValueError(f"limit must be a whole number, got {limit!r}")
            limit = int(limit)
        ns = [n for v in params.getall("ns", []) if v for n in v.split(",") if n]
        d = self.digest
        items = d.select(sort, limit, ns, params.get("app"))
        doc = d.header()
        if params.get("reset") in ("1", "true"):
            d.reset()  # the entries selected above are still ours to render: read and clear in one step
        with_sketch = params.get("sketch") in ("1", "true")
        shapes = doc["shapes"]
        for i, (k, e) in enumerate(items):
            if i and i % SLICE == 0:
                await asyncio.sleep(0)  # a big table never holds the event loop for long
            shapes.append(d.shape_json(k, e, with_sketch))
        return doc

    async def handle_get(self, request: Any) -> Any:
        """GET /digest."""
        from aiohttp import web

        try:
            doc = await self.document(request.query)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        # The document is ours alone (plain values): serialise it off the event loop.
        body = await asyncio.get_running_loop().run_in_executor(None, _dumps, doc)
        return web.Response(text=body, content_type="application/json")

    async def handle_reset(self, request: Any) -> Any:
        """POST /digest/reset."""
        from aiohttp import web

        self.digest.reset()
        return web.json_response({"reset": True, "since": digest_mod.iso(self.digest.since_ns)})

    # ---- Prometheus (bounded: no shape labels) ----

    def collect(self) -> Any:
        """mongoproxy_digest_shapes, _memory_bytes and _evictions_total."""
        d = self.digest
        yield GaugeMetricFamily("mongoproxy_digest_shapes", "Query shapes the digest holds.", value=len(d))
        yield GaugeMetricFamily("mongoproxy_digest_memory_bytes", "Approximate memory of the digest.", value=d.memory())
        yield CounterMetricFamily(
            "mongoproxy_digest_evictions", "Shapes evicted from the digest (least recently seen).", value=d.evictions
        )

    def describe(self) -> list:
        """Families, so the registry does not call collect() at registration."""
        return [
            GaugeMetricFamily("mongoproxy_digest_shapes", ""),
            GaugeMetricFamily("mongoproxy_digest_memory_bytes", ""),
            CounterMetricFamily("mongoproxy_digest_evictions", ""),
        ]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def create(config: Any, ctx: Any) -> DigestSink | None:
    """The digest sink unless --no-digest."""
    if not enabled(config):
        return None
    sink = DigestSink(config.digest_max_shapes, show_values=bool(getattr(config, "no_redact", False)))
    ctx.registry.register(sink)
    ctx.extra["digest_sink"] = sink  # the live view's sink rides on this one's hook
    return sink
