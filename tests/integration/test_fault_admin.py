"""The /faults admin routes and `mongoproxy fault add|list|rm|reset`, served by an aiohttp app built from
the engine's admin_routes() (the contract the admin server collects routes by)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import urllib.error
import urllib.request

import pytest
from aiohttp import web

from mongoproxy import cli
from mongoproxy.faults import FaultEngine
from tests.support.ports import free_port

TOKEN = "s3cret-token"


@contextlib.contextmanager
def admin_app(engine: FaultEngine, token: str | None = None):
    """Serve engine.admin_routes() on a free loopback port in a thread; yields the base URL."""

    @web.middleware
    async def bearer(request, handler):  # what the admin server applies with --admin-token-file
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            return web.Response(status=401, text="missing or wrong bearer token\n")
        return await handler(request)

    port = free_port()
    started = threading.Event()
    stop: list = []

    def main():
        async def serve():
            app = web.Application(middlewares=[bearer])
            app.add_routes(engine.admin_routes())
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            done = asyncio.Event()
            stop.append((asyncio.get_running_loop(), done))
            started.set()
            await done.wait()
            await runner.cleanup()

        asyncio.run(serve())

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop, done = stop[0]
        loop.call_soon_threadsafe(done.set)
        thread.join(10)


def http(method: str, url: str, body=None) -> tuple[int, str]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_add_list_delete_reset_over_http():
    engine = FaultEngine(True)
    with admin_app(engine) as url:
        rule = {"name": "failover", "op": ["insert", "update"], "ns": "shop.*", "action": "error", "code": 10107}
        status, body = http("POST", url + "/faults", rule)
        assert status == 201 and json.loads(body)["name"] == "failover"
        assert http("POST", url + "/faults", rule)[0] == 409
        status, body = http("GET", url + "/faults")
        assert status == 200
        assert json.loads(body)["rules"] == [{**rule, "injected": 0, "active": True}]
        assert http("DELETE", url + "/faults/failover") == (200, '{"deleted": "failover"}\n')
        assert http("DELETE", url + "/faults/failover")[0] == 404
        http("POST", url + "/faults", {"name": "a", "action": "close"})
        http("POST", url + "/faults", {"name": "b", "action": "blackhole"})
        assert http("POST", url + "/faults/reset") == (200, '{"removed": 2}\n')
        assert json.loads(http("GET", url + "/faults")[1])["rules"] == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"name": "x", "action": "explode"}, "rule x: action 'explode' is not known"),
        ({"name": "x", "action": "close", "percentage": 150}, "rule x: percentage must be from 0 to 100, got 150"),
        ({"name": "x", "action": "close", "client": "not-a-net"}, "rule x: client 'not-a-net' is not a CIDR"),
        (b"{not json", "the body is not JSON"),
    ],
)
def test_a_bad_rule_is_400_with_one_line(body, reason):
    engine = FaultEngine(True)
    with admin_app(engine) as url:
        status, text = http("POST", url + "/faults", body)
    assert status == 400 and text.startswith(reason) and text.count("\n") == 1
    assert engine.rules == {}


def test_without_allow_faults_every_route_is_403():
    with admin_app(FaultEngine(False)) as url:
        for method, path in (
            ("GET", "/faults"),
            ("POST", "/faults"),
            ("DELETE", "/faults/x"),
            ("POST", "/faults/reset"),
        ):
            status, text = http(method, url + path, {"name": "x", "action": "close"} if method == "POST" else None)
            assert status == 403 and "--allow-faults" in text and text.count("\n") == 1


def test_the_cli_talks_to_the_api(tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    engine = FaultEngine(True)
    with admin_app(engine, token=TOKEN) as url:
        auth = ["--admin", url, "--admin-token-file", str(token_file)]
        rc = cli.main(
            ["fault", "add", "orders-errors", "--op", "insert", "--ns", "shop.orders", "--error", "91"]
            + ["--label", "RetryableWriteError", "--percentage", "20", "--duration", "10m", *auth]
        )
        assert rc == 0
        assert engine.rules["orders-errors"].spec == {
            "name": "orders-errors",
            "op": "insert",
            "ns": "shop.orders",
            "percentage": 20,
            "duration": "10m",
            "action": "error",
            "code": 91,
            "labels": ["RetryableWriteError"],
        }
        assert cli.main(["fault", "add", "slow", "--op", "find", "--action", "delay", "--ms", "300", *auth]) == 0
        capsys.readouterr()
        assert cli.main(["fault", "list", *auth]) == 0
        listing = capsys.readouterr().out
        print(listing)
        lines = listing.splitlines()
        assert lines[0].split() == ["NAME", "ACTION", "MATCH", "PARAMETERS", "INJECTED", "STATE"]
        assert lines[1].split()[:2] == ["orders-errors", "error"] and "op=insert ns=shop.orders" in lines[1]
        assert "code=91" in lines[1] and lines[2].split()[:2] == ["slow", "delay"]
        assert cli.main(["fault", "rm", "slow", *auth]) == 0
        assert list(engine.rules) == ["orders-errors"]
        assert cli.main(["fault", "rm", "slow", *auth]) == 2
        assert "404 no fault rule named slow" in capsys.readouterr().err
        assert cli.main(["fault", "add", "bad", "--action", "close", "--percentage", "150", *auth]) == 2
        err = capsys.readouterr().err
        assert "400 rule bad: percentage must be from 0 to 100, got 150" in err and "Traceback" not in err
        assert cli.main(["fault", "list", "--admin", url]) == 2  # no token
        assert "401" in capsys.readouterr().err
        assert cli.main(["fault", "reset", *auth]) == 0 and engine.rules == {}


def test_the_cli_names_the_fix_when_nothing_listens(capsys):
    assert cli.main(["fault", "list", "--admin", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot reach the admin endpoint" in err and "kubectl port-forward" in err and "\n" not in err
