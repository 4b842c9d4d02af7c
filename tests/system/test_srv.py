"""mongodb+srv:// in a network namespace: dnsmasq serves the _mongodb._tcp SRV and TXT records of a scripted set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.system import REPO_ROOT, require_netns, require_tool

DOMAIN = "example.test"
CLUSTER = f"cluster0.{DOMAIN}"

CLIENT = r"""
import json, sys
from pymongo import MongoClient
with MongoClient(sys.argv[1], serverSelectionTimeoutMS=10000) as c:
    c.shop.orders.insert_one({"n": 1})
    print(json.dumps({"n": c.shop.orders.find_one({"n": 1})["n"], "nodes": sorted(f"{h}:{p}" for h, p in c.nodes)}))
"""


def sh(*cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


@pytest.fixture
def srv_ns():
    """A namespace whose resolv.conf points at its own dnsmasq on 127.0.0.1."""
    ip = require_netns()
    dnsmasq = require_tool("dnsmasq")
    name = f"mpx-srv{os.getpid()}"
    etc = Path("/etc/netns") / name
    sh(ip, "netns", "add", name)
    procs: list[subprocess.Popen] = []
    try:
        sh(ip, "-n", name, "link", "set", "lo", "up")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        members = subprocess.Popen(
            [ip, "netns", "exec", name, sys.executable, "-m", "tests.support.replset", "3", "rs0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(REPO_ROOT),
        )
        procs.append(members)
        addresses = json.loads(members.stdout.readline())
        ports = [int(a.rsplit(":", 1)[1]) for a in addresses]
        args = [dnsmasq, "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1"]
        args += ["--port=53", f"--local=/{DOMAIN}/", "--log-facility=-", "--user=root", "--pid-file="]
        for i, port in enumerate(ports):
            args += [
                f"--srv-host=_mongodb._tcp.{CLUSTER},db{i}.{DOMAIN},{port}",
                f"--host-record=db{i}.{DOMAIN},127.0.0.1",
            ]
        args += [f"--txt-record={CLUSTER},replicaSet=rs0&authSource=admin"]
        dns = subprocess.Popen([ip, "netns", "exec", name, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(dns)
        probe = f"import dns.resolver; print(len(dns.resolver.resolve('_mongodb._tcp.{CLUSTER}', 'SRV')))"
        for _ in range(100):
            if sh(ip, "netns", "exec", name, sys.executable, "-c", probe, check=False).stdout.strip() == "3":
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"dnsmasq did not answer: {dns.stderr.read1().decode() if dns.poll() else ''}")
        yield name, addresses
    finally:
        for p in procs:
            if p.stdin:
                p.stdin.close()
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        sh(ip, "netns", "delete", name, check=False)
        shutil.rmtree(etc, ignore_errors=True)


def in_ns(ns, *cmd):
    return ["ip", "netns", "exec", ns, *cmd]


def test_srv_finds_the_members_and_clients_stay_inside_the_proxy(srv_ns):
    ns, addresses = srv_ns
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    env = {k: v for k, v in env.items() if not k.startswith("MONGOPROXY_")}
    cmd = [sys.executable, "-m", "mongoproxy", "run", "--upstream", f"mongodb+srv://{CLUSTER}/?tls=false"]
    cmd += ["--listen-port-base", "27113", "--admin-port", "9898"]
    proxy = subprocess.Popen(in_ns(ns, *cmd), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    try:
        for _ in range(200):
            line = proxy.stderr.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if "connect clients with:" in line:
                break
        err = "\n".join(lines)
        print(err)
        uri = "mongodb://127.0.0.1:27113,127.0.0.1:27114,127.0.0.1:27115/?replicaSet=rs0"
        assert f"connect clients with: {uri}" in err, err
        for address in addresses:
            assert f"→ {address} (" in err, err
        out = sh(*in_ns(ns, sys.executable, "-c", CLIENT, uri), env=env)
        result = json.loads(out.stdout)
        assert result["n"] == 1
        assert result["nodes"] == ["127.0.0.1:27113", "127.0.0.1:27114", "127.0.0.1:27115"]
    finally:
        proxy.terminate()
        proxy.wait(30)


def test_srv_that_does_not_resolve_is_one_line(srv_ns):
    ns, _ = srv_ns
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONGOPROXY_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    cmd = [
        sys.executable,
        "-m",
        "mongoproxy",
        "run",
        "--admin-port",
        "0",
        "--upstream",
        f"mongodb+srv://nothere.{DOMAIN}/",
    ]
    res = sh(*in_ns(ns, *cmd), check=False, env=env, timeout=60)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "SRV lookup failed" in lines[0] and "check the cluster name" in lines[0], res.stderr
