"""mongosh and the Node.js driver (from npm) through the proxy print exactly what they print directly."""

import subprocess
import time
from pathlib import Path

from tests.support.inprocess import ProxyThread
from tests.support.system import require_node_modules

JS = Path(__file__).parent / "js"


def node_workload(mods, port, db):
    res = subprocess.run([mods.node, str(JS / "workload.js"), f"mongodb://127.0.0.1:{port}/", db],
                         capture_output=True, text=True, timeout=120, env=mods.env())
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def shell_workload(mods, port, db):
    res = subprocess.run([mods.mongosh, "--quiet", f"mongodb://127.0.0.1:{port}/?directConnection=true",
                          "--eval", f"const DB_NAME = {db!r};", "--file", str(JS / "shell.js")],
                         capture_output=True, text=True, timeout=180, env=mods.env())
    assert res.returncode == 0, res.stdout + res.stderr
    return [line for line in res.stdout.splitlines() if line.startswith("[")]


def test_node_driver_through_proxy(secantus):
    mods = require_node_modules()
    stamp = time.monotonic_ns()
    direct = node_workload(mods, secantus.port, f"node_direct_{stamp}")
    with ProxyThread(secantus.port) as proxy:
        db = f"node_proxied_{stamp}"
        proxied = node_workload(mods, proxy.port, db)
        proxy.wait_until(lambda: any(e.op == "insert" and e.failed for e in proxy.sink.commands), what="dup insert")
        events = [e for e in proxy.sink.commands if e.database == db]
    assert proxied == direct and len(direct) == 7
    ops = [e.op for e in events]
    assert ops.count("getMore") >= 4, ops  # 9 documents in batches of 2
    assert {"insert", "find", "update", "aggregate", "delete"} <= set(ops)
    assert all(e.connection.app_name == "node-itest" for e in events)
    assert all(e.collection == "things" for e in events)
    assert [e.reply.write_error_code for e in events if e.failed] == [11000]


def test_mongosh_through_proxy(secantus):
    mods = require_node_modules()
    stamp = time.monotonic_ns()
    direct = shell_workload(mods, secantus.port, f"sh_direct_{stamp}")
    with ProxyThread(secantus.port) as proxy:
        db = f"sh_proxied_{stamp}"
        proxied = shell_workload(mods, proxy.port, db)
        proxy.wait_until(lambda: any(e.database == db and e.failed for e in proxy.sink.commands), what="dup insert")
        events = [e for e in proxy.sink.commands if e.database == db]
    assert proxied == direct and len(direct) == 4
    assert [e.op for e in events].count("getMore") >= 3
    assert all(e.connection.app_name.startswith("mongosh") for e in events), {e.connection.app_name for e in events}
