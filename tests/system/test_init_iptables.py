"""`mongoproxy init-iptables` in a network namespace, with the proxy started exactly as `mongoproxy inject` starts it.

Inside a fresh namespace: a scripted "MongoDB" on 198.18.0.10:27017 (an address on the namespace's loopback
device, so it exists only there), the init container's command as root, the sidecar's command under uid 9999, and an app
under uid 8888 connecting to 198.18.0.10:27017. The server records which uid owns each connecting socket, so
the test sees that the app's connections were redirected through the proxy and that the proxy's own upstream
connection went straight to the server instead of looping back. The log of the run (rules, counters, original
destination, events) is printed and kept in the test's tmp directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from mongoproxy import inject
from tests.support.system import require_netns, require_tool, unavailable

ROOT = Path(__file__).resolve().parents[2]
SERVER_ADDR = "198.18.0.10"  # RFC 2544 benchmarking range; exists inside the test's namespace only
SERVER_ADDR6 = "2001:db8::10"  # documentation prefix; likewise
MONGO_PORT = 27017
APP_UID = 8888
OPTS = inject.InjectOptions(proxy_args=("--log-commands", "--log-format", "json"))

pytestmark = pytest.mark.system

# A scripted MongoDB that logs, per request, the uid owning the peer socket (read from /proc/net/tcp of the
# namespace it runs in).
SERVER = r"""
import json, socket, struct, sys, time
sys.path.insert(0, sys.argv[1])
from tests.support.scripted_server import MongoHandler, ScriptedServer

port, log_path, hosts = int(sys.argv[2]), sys.argv[3], sys.argv[4:]
log = open(log_path, "a", buffering=1)

def hexaddr(addr):
    # As /proc/net/tcp{,6} print them: each 32-bit word of the address in host order, then the port.
    ip, p = addr[:2]
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    raw = socket.inet_pton(family, ip)
    words = struct.unpack("<%dI" % (len(raw) // 4), raw)
    return "".join("%08X" % w for w in words) + ":%04X" % p

def peer_uid(conn):
    want = (hexaddr(conn.peer), hexaddr(conn.sockname))
    table = "/proc/self/net/tcp6" if ":" in conn.peer[0] else "/proc/self/net/tcp"
    with open(table) as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if (cols[1], cols[2]) == want:
                return int(cols[7])
    return None

def hostport(addr):
    return ("[%s]:%d" if ":" in addr[0] else "%s:%d") % addr[:2]

class Recording(MongoHandler):
    async def respond(self, request, conn):
        if not hasattr(conn, "uid"):
            conn.uid = peer_uid(conn)
        log.write(json.dumps({"peer": hostport(conn.peer), "server": hostport(conn.sockname), "peer_uid": conn.uid,
                              "command": request.command_name}) + "\n")
        return await super().respond(request, conn)

def find(request, conn):
    ns = "%s.%s" % (request.doc.get("$db"), request.doc.get("find"))
    served_by = "scripted-mongo@" + conn.sockname[0]
    return {"cursor": {"id": 0, "ns": ns, "firstBatch": [{"_id": 1, "servedBy": served_by}]}, "ok": 1.0}

servers = [ScriptedServer(Recording(commands={"find": find}), host, port).start() for host in hosts]
print("listening", flush=True)
while True:
    time.sleep(3600)
"""

APP = r"""
import json, os, sys
from pymongo import MongoClient
out = {"uid": os.getuid()}
for host in sys.argv[2:]:
    uri = "mongodb://%s:%s/?directConnection=true&appname=orders-app&serverSelectionTimeoutMS=15000" % (
        "[%s]" % host if ":" in host else host, sys.argv[1])
    with MongoClient(uri) as client:
        out[host] = {"ping": client.admin.command("ping")["ok"],
                     "servedBy": client.shop.orders.find_one({"_id": 1})["servedBy"]}
print(json.dumps(out))
"""

GET = r"""
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        print(r.status); print(r.read().decode())
except Exception as exc:
    print(0); print(exc)
"""


class Namespace:
    """A network namespace with lo up holding 127.0.0.1 and SERVER_ADDR; commands run inside it."""

    def __init__(self, ip: str, name: str) -> None:
        self.ip, self.name = ip, name

    def cmd(self, *argv: str, uid: int | None = None) -> list[str]:
        # The interpreter may live under a root-only home: a non-root uid keeps only the right to read files.
        drop = (
            []
            if uid is None
            else [
                "setpriv",
                f"--reuid={uid}",
                f"--regid={uid}",
                "--clear-groups",
                "--inh-caps=+dac_read_search",
                "--ambient-caps=+dac_read_search",
            ]
        )
        return [self.ip, "netns", "exec", self.name, *drop, *argv]

    def run(
        self, *argv: str, uid: int | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(self.cmd(*argv, uid=uid), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def mongoproxy(self, *args: str, uid: int | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "mongoproxy", *args, uid=uid, check=check)

    def http_get(self, url: str) -> tuple[int, str]:
        out = self.run(sys.executable, "-c", GET, url).stdout
        status, _, body = out.partition("\n")
        return int(status), body


@pytest.fixture(params=["ipv4", "dual-stack"])
def family(request) -> str:
    return request.param


@pytest.fixture
def netns(family):
    ip = require_netns()
    require_tool("iptables")
    require_tool("setpriv")
    if family == "dual-stack":
        require_tool("ip6tables")
    name = f"mpx-inj{os.getpid()}"
    subprocess.run([ip, "netns", "add", name], check=True, capture_output=True)
    try:
        # The address goes on the namespace's own loopback device: no dummy/veth kernel module needed.
        for argv in (["link", "set", "lo", "up"], ["addr", "add", f"{SERVER_ADDR}/32", "dev", "lo"]):
            subprocess.run([ip, "-n", name, *argv], check=True, capture_output=True)
        if family == "dual-stack":
            added = subprocess.run(
                [ip, "-n", name, "addr", "add", f"{SERVER_ADDR6}/128", "dev", "lo", "nodad"],
                capture_output=True,
                text=True,
            )
            if added.returncode != 0:
                unavailable(
                    f"no IPv6 in network namespaces ({added.stderr.strip()}): enable IPv6 "
                    "(sysctl net.ipv6.conf.default.disable_ipv6=0)"
                )
        yield Namespace(ip, name)
    finally:
        subprocess.run([ip, "netns", "delete", name], capture_output=True)


def nat_rules(ns: Namespace, tools: tuple[str, ...] = ("iptables", "ip6tables")) -> str:
    """The nat tables (IPv4, then IPv6) without counters, for comparing states."""
    return "".join(f"# {tool}\n" + ns.run(tool, "-w", "10", "-t", "nat", "-S").stdout for tool in tools)


def wait_until(
    predicate, what: str, timeout: float = 30.0, proc: subprocess.Popen | None = None, log: Path | None = None
):
    def detail() -> str:
        return f"; its log:\n{log.read_text()}" if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}{detail()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}{detail()}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_sidecar_in_a_network_namespace(netns, family, tmp_path):
    ns = netns
    opts = replace(OPTS, ipv6=family == "dual-stack")
    addresses = [SERVER_ADDR, SERVER_ADDR6] if opts.ipv6 else [SERVER_ADDR]
    tools = ("iptables", "ip6tables") if opts.ipv6 else ("iptables",)
    report: list[str] = []

    def note(title: str, text: str = "") -> None:
        report.append(f"## {title}\n{text.rstrip()}\n" if text else f"## {title}\n")

    init_args = inject.init_container(opts)["args"]
    sidecar_args = list(inject.sidecar_container(opts)["args"])
    note("init container: mongoproxy " + " ".join(init_args))
    note("sidecar (uid %d): mongoproxy %s" % (opts.proxy_uid, " ".join(sidecar_args)))

    # Without NET_ADMIN: one clear line, exit 2, nothing installed.
    denied = ns.mongoproxy(*init_args, uid=APP_UID, check=False)
    assert denied.returncode == 2
    assert len(denied.stderr.strip().splitlines()) == 1 and "NET_ADMIN" in denied.stderr, denied.stderr
    assert "MONGOPROXY" not in nat_rules(ns)
    note("init-iptables without NET_ADMIN (uid %d), exit %d" % (APP_UID, denied.returncode), denied.stderr)

    dry = ns.mongoproxy(*init_args, "--dry-run")
    assert "MONGOPROXY" not in nat_rules(ns)
    note("init-iptables --dry-run", dry.stdout)

    # Install; a second run leaves the same single set of rules.
    first = ns.mongoproxy(*init_args)
    rules_once = nat_rules(ns)
    ns.mongoproxy(*init_args)
    assert nat_rules(ns) == rules_once
    assert rules_once.count("-A OUTPUT -p tcp -j MONGOPROXY_OUTPUT") == len(tools)
    assert f"--uid-owner {opts.proxy_uid} -j RETURN" in rules_once
    assert f"--dport {MONGO_PORT} -j REDIRECT --to-ports {opts.proxy_port}" in rules_once
    note("init-iptables output", first.stdout)
    note("iptables -t nat -S (and ip6tables) after two runs", rules_once)

    server_log = tmp_path / "server.jsonl"
    server = subprocess.Popen(
        ns.cmd(sys.executable, "-c", SERVER, str(ROOT), str(MONGO_PORT), str(server_log), *addresses),
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "server.err", "w"),
        text=True,
        cwd=ROOT,
    )
    proxy_err = tmp_path / "proxy.err"
    proxy = None
    try:
        assert server.stdout.readline().strip() == "listening", (tmp_path / "server.err").read_text()
        proxy = subprocess.Popen(
            ns.cmd(sys.executable, "-m", "mongoproxy", *sidecar_args, uid=opts.proxy_uid),
            stdout=subprocess.DEVNULL,
            stderr=open(proxy_err, "w"),
            cwd=ROOT,
        )
        # With --ipv6 the admin endpoint listens on 0.0.0.0 and :: (both families).
        admin = f"http://127.0.0.1:{opts.admin_port}"
        if opts.ipv6:
            wait_until(
                lambda: ns.http_get(f"http://[::1]:{opts.admin_port}/readyz")[0] == 200,
                "the sidecar's /readyz over IPv6",
                proc=proxy,
            )
        wait_until(lambda: ns.http_get(f"{admin}/readyz")[0] == 200, "the sidecar's /readyz", proc=proxy, log=proxy_err)

        # The app, under an ordinary uid, connects to the real server address.
        app = ns.run(sys.executable, "-c", APP, str(MONGO_PORT), *addresses, uid=APP_UID, timeout=60)
        result = json.loads(app.stdout)
        assert result == {"uid": APP_UID, **{a: {"ping": 1.0, "servedBy": f"scripted-mongo@{a}"} for a in addresses}}
        note("app (uid %d) -> %s" % (APP_UID, ", ".join(f"{a} port {MONGO_PORT}" for a in addresses)), app.stdout)

        wait_until(
            lambda: ns.http_get(f"{admin}/metrics")[1].count('op="find"') >= len(addresses),
            "the finds in /metrics",
            timeout=10,
            log=proxy_err,
        )
        status, metrics = ns.http_get(f"{admin}/metrics")
        assert status == 200
        counters = {
            tool: ns.run(tool, "-w", "10", "-t", "nat", "-L", "MONGOPROXY_OUTPUT", "-n", "-v", "-x").stdout
            for tool in tools
        }
        seen_with_rules = len(server_log.read_text().splitlines())

        # Uninstall is clean, and twice is harmless; then the same app reaches the server directly.
        ns.mongoproxy(*init_args, "--uninstall")
        ns.mongoproxy(*init_args, "--uninstall")
        assert "MONGOPROXY" not in nat_rules(ns, tools)
        note("iptables -t nat -S (and ip6tables) after --uninstall (twice)", nat_rules(ns, tools))
        direct = ns.run(sys.executable, "-c", APP, str(MONGO_PORT), *addresses, uid=APP_UID, timeout=60)
        assert json.loads(direct.stdout) == result
    finally:
        if proxy is not None:
            stop(proxy)
        stop(server)

    all_events = [json.loads(line) for line in server_log.read_text().splitlines()]
    events, after_uninstall = all_events[:seen_with_rules], all_events[seen_with_rules:]
    proxy_log = proxy_err.read_text()
    command_lines = [json.loads(line) for line in proxy_log.splitlines() if line.startswith("{")]
    for tool, text in counters.items():
        note(f"{tool} -t nat -L MONGOPROXY_OUTPUT -n -v -x", text)
    note("what the server saw with the rules in place (peer uid per request)", "\n".join(json.dumps(e) for e in events))
    note("what the server saw after --uninstall", "\n".join(json.dumps(e) for e in after_uninstall))
    note("proxy log", proxy_log)
    note(
        "proxy /metrics (mongoproxy_ samples with data)",
        "\n".join(
            line
            for line in metrics.splitlines()
            if line.startswith("mongoproxy_")
            and not line.endswith(" 0.0")
            and "_bucket{" not in line
            and "_created" not in line
        ),
    )
    text = "\n".join(report)
    (tmp_path / "netns-test.log").write_text(text)
    print(text)

    # Every connection the server got came from the proxy's uid: the app was redirected, never direct,
    # and the proxy's own upstream connection went straight out (not looped back into the proxy).
    uids = {e["peer_uid"] for e in events}
    assert uids == {opts.proxy_uid}, events
    assert {"ping", "find"} <= {e["command"] for e in events}
    # The proxy saw the app's commands with the original destination as their server.
    originals = [f"[{a}]:{MONGO_PORT}" if ":" in a else f"{a}:{MONGO_PORT}" for a in addresses]
    finds = [c for c in command_lines if c.get("op") == "find"]
    assert sorted(c["server"] for c in finds) == sorted(originals), proxy_log
    assert sorted(e["server"] for e in events if e["command"] == "find") == sorted(originals)
    for original in originals:
        assert f'server="{original}"' in metrics
    assert "refusing to connect to myself" not in proxy_log
    # The counters show both paths taken: the app's SYN redirected, the proxy's returned untouched.
    for tool, text in counters.items():
        rows = {" ".join(line.split()[2:]): int(line.split()[0]) for line in text.splitlines()[2:] if line.strip()}
        redirect = next(n for rule, n in rows.items() if "REDIRECT" in rule)
        own = next(n for rule, n in rows.items() if f"owner UID match {opts.proxy_uid}" in rule)
        assert redirect >= 1 and own >= 1, (tool, text)
    # Without the rules the app's own uid shows up at the server: the redirect was what routed it.
    assert {e["peer_uid"] for e in after_uninstall} == {APP_UID}, after_uninstall
