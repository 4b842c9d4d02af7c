"""Transparent (sidecar) mode in a network namespace: iptables REDIRECT, SO_ORIGINAL_DST, the proxy under its own uid."""

import json
import os
import subprocess
import sys

from tests.support.netns import (
    SERVER_V4,
    SERVER_V6,
    as_proxy_user,
    in_ns,
    redirect_rule,
    sh,
    wait_port_in_ns,
)

CLIENT = r"""
import json, sys
from pymongo import MongoClient
out = {}
for host in sys.argv[1:]:
    uri = f"mongodb://{host}:27017/?directConnection=true&appname=sidecar-app"
    with MongoClient(uri, serverSelectionTimeoutMS=10000) as c:
        c.t.items.insert_one({"_id": host, "v": 1})
        out[host] = c.t.items.find_one({"_id": host})["v"]
print(json.dumps(out))
"""

MEMBER_PORT = 27200  # the --upstream member listener, inside the test's own network namespace

LOOPER = r"""
import socket, struct, sys
import bson
body = b"\x00\x00\x00\x00\x00" + bson.encode({"hello": 1, "$db": "admin"})  # OP_MSG: flags, section 0
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(struct.pack("<iiii", 16 + len(body), 1, 0, 2013) + body)
s.settimeout(5)
try:
    print("closed" if s.recv(100) == b"" else "answered")
except ConnectionResetError:
    print("closed")
"""


def test_transparent_mode_ipv4_and_ipv6(netns, tmp_path):
    ns = netns
    server_log = open(tmp_path / "server.log", "w")
    servers = [
        subprocess.Popen(
            in_ns(
                ns, sys.executable, "-m", "secantus", "--host", host, "--port", "27017", "--storage-path", ":memory:"
            ),
            stdout=server_log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        for host in (SERVER_V4, SERVER_V6)
    ]
    rules = []
    for tool, dst, port in (
        ("iptables", SERVER_V4, 27017),
        ("ip6tables", SERVER_V6, 27017),
        ("iptables", "127.0.0.1", MEMBER_PORT),
    ):
        rule = redirect_rule(dst, port)
        sh(*in_ns(ns, tool, *rule))
        rules.append(f"{tool} {' '.join(rule)}")
    proxy_log = tmp_path / "proxy.log"
    proxy = subprocess.Popen(
        in_ns(
            ns,
            *as_proxy_user(
                sys.executable,
                "-m",
                "mongoproxy",
                "run",
                "--proxy",
                "27111",
                # A member listener (MEMBER_PORT) is an own listener too: redirected there, a client is refused.
                "--upstream",
                f"mongodb://{SERVER_V4}:27017/?directConnection=true",
                "--listen-port-base",
                str(MEMBER_PORT),
                "--listen-host",
                "127.0.0.1,::1",
                "--admin-port",
                "9898",
                "--log-commands",
                "--log-format",
                "json",
            ),
        ),
        stdout=subprocess.DEVNULL,
        stderr=open(proxy_log, "w"),
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    try:
        wait_port_in_ns(ns, SERVER_V4, 27017)
        wait_port_in_ns(ns, SERVER_V6, 27017)
        wait_port_in_ns(ns, "127.0.0.1", 9898)
        wait_port_in_ns(ns, "127.0.0.1", MEMBER_PORT)
        # The server is reached through the redirect only once both are up.
        client = subprocess.run(
            in_ns(ns, sys.executable, "-c", CLIENT, SERVER_V4, f"[{SERVER_V6}]"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert client.returncode == 0, client.stderr + proxy_log.read_text()
        assert json.loads(client.stdout) == {SERVER_V4: 1, f"[{SERVER_V6}]": 1}
        for port in (27111, MEMBER_PORT):
            looper = subprocess.run(
                in_ns(ns, sys.executable, "-c", LOOPER, str(port)), capture_output=True, text=True, timeout=30
            )
            assert looper.stdout.strip() == "closed", looper.stdout + looper.stderr  # refused, not looped
        metrics = subprocess.run(
            in_ns(
                ns,
                sys.executable,
                "-c",
                "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9898/metrics').read().decode())",
            ),
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    finally:
        proxy.terminate()
        proxy.wait(20)
        for server in servers:
            server.terminate()
            server.wait(20)
        server_log.close()
    log_text = proxy_log.read_text()
    lines = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    inserts = [line for line in lines if line.get("op") == "insert"]
    servers = sorted({line["server"] for line in inserts})
    assert servers == sorted([f"{SERVER_V4}:27017", f"[{SERVER_V6}]:27017"]), log_text
    assert all(line.get("app") == "sidecar-app" for line in inserts)
    assert "refusing to connect to myself" in log_text
    assert 'mongoproxy_upstream_connect_errors_total{reason="loop"} 2.0' in metrics
    print("\n".join(["iptables rules:", *rules, "proxy log (commands):", *[json.dumps(line) for line in inserts]]))
