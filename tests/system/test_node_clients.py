"""mongosh and the Node.js driver (from npm) through the proxy print exactly what they print directly.

Both still open every connection with the legacy handshake (OP_QUERY isMaster on admin.$cmd, answered by
OP_REPLY), so these are also the real-client proof of that path.
"""

import subprocess
import time
from pathlib import Path

from mongoproxy import wire
from tests.support.inprocess import ProxyThread
from tests.support.system import require_node_modules

JS = Path(__file__).parent / "js"


def node_workload(mods, port, db):
    res = subprocess.run(
        [mods.node, str(JS / "workload.js"), f"mongodb://127.0.0.1:{port}/", db],
        capture_output=True,
        text=True,
        timeout=120,
        env=mods.env(),
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def shell_workload(mods, port, db):
    res = subprocess.run(
        [
            mods.mongosh,
            "--quiet",
            f"mongodb://127.0.0.1:{port}/?directConnection=true",
            "--eval",
            f"const DB_NAME = {db!r};",
            "--file",
            str(JS / "shell.js"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=mods.env(),
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return [line for line in res.stdout.splitlines() if line.startswith("[")]


def check_legacy_handshakes(sink, app_name: str) -> None:
    """Every connection began with OP_QUERY isMaster on admin.$cmd, answered by OP_REPLY, and carries the app name."""
    assert sink.closed and len(sink.closed) == len(sink.opened)
    for conn in sink.closed:
        first = next(e for e in sink.commands if e.connection is conn)
        assert first.op.lower() in ("ismaster", "hello") and first.database == "admin"
        assert (first.request_opcode, first.reply_opcode) == (wire.OP_QUERY, wire.OP_REPLY)
        assert first.ok is True and first.decode_error == ""
        assert conn.app_name == app_name and conn.driver_name.startswith("nodejs")
    assert all(e.connection.app_name == app_name for e in sink.commands)
    assert sink.decode_errors == [] and sink.unmatched == []


def test_node_driver_through_proxy(secantus):
    mods = require_node_modules()
    stamp = time.monotonic_ns()
    direct = node_workload(mods, secantus.port, f"node_direct_{stamp}")
    with ProxyThread(secantus.port) as proxy:
        db = f"node_proxied_{stamp}"
        proxied = node_workload(mods, proxy.port, db)
        proxy.wait_until(lambda: any(e.op == "insert" and e.failed for e in proxy.sink.commands), what="dup insert")
        proxy.wait_until(lambda: len(proxy.sink.closed) == len(proxy.sink.opened), what="connections closed")
        events = [e for e in proxy.sink.commands if e.database == db]
    check_legacy_handshakes(proxy.sink, "node-itest")
    assert proxied == direct and len(direct) == 7
    ops = [e.op for e in events]
    assert ops.count("getMore") >= 4, ops  # 9 documents in batches of 2
    assert {"insert", "find", "update", "aggregate", "delete"} <= set(ops)
    assert all(e.connection.app_name == "node-itest" for e in events)
    assert all(e.collection == "things" for e in events)
    assert [e.reply.write_error_code for e in events if e.failed] == [11000]


def test_mongosh_through_proxy(secantus):
    mods = require_node_modules()
    version = subprocess.run(
        [mods.mongosh, "--version"], capture_output=True, text=True, timeout=60, env=mods.env()
    ).stdout.strip()
    stamp = time.monotonic_ns()
    direct = shell_workload(mods, secantus.port, f"sh_direct_{stamp}")
    with ProxyThread(secantus.port) as proxy:
        db = f"sh_proxied_{stamp}"
        proxied = shell_workload(mods, proxy.port, db)
        proxy.wait_until(lambda: any(e.database == db and e.failed for e in proxy.sink.commands), what="dup insert")
        proxy.wait_until(lambda: len(proxy.sink.closed) == len(proxy.sink.opened), what="connections closed")
        events = [e for e in proxy.sink.commands if e.database == db]
    assert proxied == direct and len(direct) == 6
    ops = [e.op for e in events]
    assert ops.count("getMore") >= 3
    assert {"insert", "aggregate", "find", "update", "delete"} <= set(ops), ops
    assert all(e.collection == "shellthings" for e in events)
    assert [e.reply.write_error_code for e in events if e.failed] == [11000]
    check_legacy_handshakes(proxy.sink, f"mongosh {version}")  # mongosh's own appName
