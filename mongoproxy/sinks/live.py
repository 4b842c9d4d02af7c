"""The live web view: a static page at / (shipped in mongoproxy/web/) and a Server-Sent Events stream of commands.

Every subscriber has a bounded queue: when a browser reads slower than commands arrive, events are dropped for that
subscriber and counted (`dropped`, exported as mongoproxy_events_dropped_total{sink="live"}); the data path only
appends. With no subscriber, on_command returns at once. Stream records carry the redacted query text unless the
proxy runs with --no-redact (then, as in the command log, literal values but never credentials).
"""

from __future__ import annotations

import asyncio
import json
import logging
from importlib import resources
from typing import Any

from mongoproxy.admin import public
from mongoproxy.digest import error_name
from mongoproxy.events import duration_ms, wall_ns
from mongoproxy.querylog import event_query

log = logging.getLogger("mongoproxy.live")

SUBSCRIBER_QUEUE = 1000  # events waiting per browser before new ones are dropped for it
MAX_SUBSCRIBERS = 16
HEARTBEAT_SECONDS = 15.0  # an SSE comment, so proxies keep the stream open and a gone browser is noticed
BATCH = 200  # events written per chunk
OPTIONS: list = []  # none: the view is served wherever the admin endpoint is
STATIC = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


class _Subscriber:
    __slots__ = ("queue", "dropped")

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue = asyncio.Queue(size)
        self.dropped = 0


class LiveSink:
    """Hands each command to every open /live stream; serves the page.

    It has no on_command hook of its own: the digest sink offers it each command (one check while no browser is
    subscribed, instead of one more call per command on the sink bus); with --no-digest, LiveHookSink has the hook.
    """

    name = "live"

    def __init__(self, show_values: bool = False, queue_size: int = SUBSCRIBER_QUEUE) -> None:
        self.show_values = show_values
        self.queue_size = queue_size
        self.subscribers: set[_Subscriber] = set()
        self.dropped = 0

    def offer(self, event: Any) -> None:
        """Offer the event to each subscriber; a full queue drops it (counted)."""
        if not self.subscribers or event.awaitable:
            return
        for sub in self.subscribers:
            try:
                sub.queue.put_nowait(event)
            except asyncio.QueueFull:
                sub.dropped += 1
                self.dropped += 1

    def record(self, event: Any) -> dict:
        """One stream record: the command log's view of a command."""
        q = event_query(event, self.show_values)
        has_reply = bool(event.reply_last_ns)
        failed = bool(event.ok is False or (event.reply is not None and event.failed))
        return {
            "time": wall_ns(event.request_first_ns) // 1_000_000,
            "connection_id": event.connection.id,
            "app": event.connection.app_name,
            "db": event.database,
            "collection": event.collection,
            "op": event.op,
            "duration_ms": duration_ms(event.duration_ns) if has_reply else None,
            "documents_returned": event.documents_returned,
            "documents_changed": event.documents_changed,
            "failed": failed,
            "error": error_name(event) if failed else None,
            "shape": q.shape if q is not None else "",
            "query": q.text if q is not None else "",
        }

    # ---- admin routes ----

    def admin_routes(self) -> list:
        """GET / (the page), GET /ui/{file} (its JS and CSS), GET /live (the event stream)."""
        from aiohttp import web

        return [
            web.get("/", self.handle_page),
            web.get("/ui/{name}", self.handle_static),
            web.get("/live", self.handle_stream),
        ]

    # The page and its files hold no data (the page sends the token it was given in #token= with each data
    # request), so they are reachable without the token; /live and /digest are not.
    @public
    async def handle_page(self, request: Any) -> Any:
        """The web view."""
        return _static("index.html")

    @public
    async def handle_static(self, request: Any) -> Any:
        """The page's script and style sheet."""
        from aiohttp import web

        name = request.match_info["name"]
        if name not in STATIC or name == "index.html":
            raise web.HTTPNotFound(text="not found\n")
        return _static(name)

    async def handle_stream(self, request: Any) -> Any:
        """text/event-stream of commands: a `hello` event, then `command` events, JSON each."""
        from aiohttp import web

        if len(self.subscribers) >= MAX_SUBSCRIBERS:
            return web.Response(status=503, text=f"at most {MAX_SUBSCRIBERS} live streams at once\n")
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await resp.prepare(request)
        sub = _Subscriber(self.queue_size)
        self.subscribers.add(sub)
        try:
            hello = {"redacted": not self.show_values, "queue": self.queue_size}
            await resp.write(b"event: hello\ndata: " + json.dumps(hello).encode() + b"\n\n")
            queue = sub.queue
            while True:
                try:
                    first = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
                except TimeoutError:
                    await resp.write(b": heartbeat\n\n")
                    continue
                events = [first]
                while len(events) < BATCH and not queue.empty():
                    events.append(queue.get_nowait())
                chunks = []
                for e in events:
                    try:
                        rec = self.record(e)
                    except Exception:  # noqa: BLE001 - one odd event must not end the stream
                        log.debug("cannot render a live record", exc_info=True)
                        continue
                    rec["dropped"] = sub.dropped
                    chunks.append("event: command\ndata: " + json.dumps(rec, ensure_ascii=False) + "\n\n")
                await resp.write("".join(chunks).encode())
        except (ConnectionResetError, ConnectionError):
            pass  # the browser went away
        finally:
            self.subscribers.discard(sub)
        return resp


class LiveHookSink(LiveSink):
    """The live view on its own (no digest sink to offer it commands)."""

    def on_command(self, event: Any) -> None:
        """Offer the event to each subscriber."""
        self.offer(event)


def _static(name: str) -> Any:
    from aiohttp import web

    body = resources.files("mongoproxy").joinpath("web", name).read_bytes()
    return web.Response(body=body, content_type=STATIC[name], charset="utf-8", headers={"Cache-Control": "no-cache"})


def create(config: Any, ctx: Any) -> LiveSink | None:
    """The live view; always on (it costs one check per command until a browser subscribes)."""
    show_values = bool(getattr(config, "no_redact", False))
    digest = ctx.extra.get("digest_sink")  # created just before (SINK_MODULES order)
    if digest is None:
        return LiveHookSink(show_values=show_values)
    sink = LiveSink(show_values=show_values)
    digest.live = sink
    return sink
