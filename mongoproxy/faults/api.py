"""The admin API of fault rules, Toxiproxy-style: GET/POST /faults, DELETE /faults/{name}, POST /faults/reset.

Every answer to a mistake is one line of text: 403 without --allow-faults,
400 for a bad rule, 404 for an unknown name, 409 for a name in use.
"""

from __future__ import annotations

import json
from typing import Any

from mongoproxy.faults.rules import RuleError

MAX_BODY = 64 * 1024
FORBIDDEN = "fault injection is disabled: start the proxy with --allow-faults (or MONGOPROXY_ALLOW_FAULTS=1)\n"


def routes(engine: Any) -> list:
    """aiohttp RouteDefs bound to `engine`."""
    from aiohttp import web

    def text(status: int, line: str) -> web.Response:
        return web.Response(status=status, text=line.rstrip("\n") + "\n")

    def ok(payload: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, text=json.dumps(payload) + "\n", content_type="application/json")

    async def get_faults(request: web.Request) -> web.Response:
        if not engine.allowed:
            return text(403, FORBIDDEN)
        return ok(engine.listing())

    async def post_faults(request: web.Request) -> web.Response:
        if not engine.allowed:
            return text(403, FORBIDDEN)
        if request.content_length is not None and request.content_length > MAX_BODY:
            return text(413, f"rule body larger than {MAX_BODY} bytes")
        raw = await request.read()
        if len(raw) > MAX_BODY:
            return text(413, f"rule body larger than {MAX_BODY} bytes")
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            return text(400, f"the body is not JSON: {exc}")
        try:
            rule = engine.add_raw(body)
        except RuleError as exc:
            return text(409 if " exists:" in str(exc) else 400, str(exc))
        return ok(rule.as_dict(), 201)

    async def delete_fault(request: web.Request) -> web.Response:
        if not engine.allowed:
            return text(403, FORBIDDEN)
        name = request.match_info["name"]
        if not engine.remove(name):
            return text(404, f"no fault rule named {name}: see GET /faults")
        return ok({"deleted": name})

    async def reset_faults(request: web.Request) -> web.Response:
        if not engine.allowed:
            return text(403, FORBIDDEN)
        return ok({"removed": engine.reset()})

    return [
        web.get("/faults", get_faults),
        web.post("/faults", post_faults),
        web.post("/faults/reset", reset_faults),
        web.delete("/faults/{name}", delete_fault),
    ]
