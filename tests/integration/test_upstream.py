"""--upstream: the proxy in front of a scripted replica set, scripted mongos routers and SecantusDB."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import time
from collections import Counter

import pymongo
import pytest
from pymongo import monitoring

from tests.support import wire
from tests.support.ports import free_port
from tests.support.proxy import run_proxy_cli, run_proxy_process
from tests.support.replset import ScriptedReplicaSet, local_ports_of
from tests.support.secantus import SecantusServer


def port_base(n: int = 12) -> int:
    """A base below the ephemeral range whose next `n` ports are free now."""
    for _ in range(200):
        base = random.randrange(20000, 32000)
        if all(_free(p) for p in range(base, base + n)):
            return base
    raise RuntimeError("no free port range")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    """Poll `predicate` (bounded) until it returns a true value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Commands(monitoring.CommandListener):
    """pymongo's own count of the commands it sent, and on which connection address."""

    def __init__(self) -> None:
        self.names: Counter = Counter()
        self.addresses: set[tuple[str, int]] = set()
        self.failed: list[str] = []

    def started(self, event) -> None:
        self.names[event.command_name] += 1
        self.addresses.add(event.connection_id)

    def succeeded(self, event) -> None:
        pass

    def failed(self, event) -> None:  # type: ignore[override]
        self.failed.append(f"{event.command_name}: {event.failure}")


class Pools(monitoring.ConnectionPoolListener):
    """How many pooled connections pymongo opened (every other pool event is ignored)."""

    created = 0

    def connection_created(self, event) -> None:
        self.created += 1

    def _ignore(self, event) -> None:
        pass

    pool_created = pool_ready = pool_cleared = pool_closed = _ignore
    connection_ready = connection_closed = connection_check_out_started = _ignore
    connection_check_out_failed = connection_checked_out = connection_checked_in = _ignore


def proxy_command_counts(proxy) -> Counter:
    """Commands the proxy saw, by op, from mongoproxy_response_latency_seconds_count."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: Counter = Counter()
    for family in text_string_to_metric_families(proxy.metrics_text()):
        for s in family.samples:
            if s.name == "mongoproxy_response_latency_seconds_count":
                counts[s.labels["op"]] += int(s.value)
    return counts


def labelled(proxy, name: str, **labels: str) -> float:
    return proxy.metric(name, **labels) or 0.0


def raw_hello(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        return wire.roundtrip(s, wire.encode_op_msg({"hello": 1, "$db": "admin"})).doc


@pytest.fixture
def rs():
    with ScriptedReplicaSet(3) as rs:
        yield rs


def test_replica_set_through_the_proxy(rs):
    base = port_base()
    static = free_port()
    args = [
        "--upstream",
        rs.seed_uri,
        "--listen-port-base",
        str(base),
        "--topology-interval",
        "0.5",
        "--proxy",
        f"{static}:127.0.0.1:{rs.members[1].server.port}",
        "--metric-labels",
        "op,server,replicaset,member_state",
    ]
    with run_proxy_process(args) as proxy:
        err = proxy.stderr_text()
        listeners = [base, base + 1, base + 2]
        for i, member in enumerate(rs.members):
            state = "primary" if i == 0 else "secondary"
            assert f"{listeners[i]} → {member.address} ({state})" in err
        client_uri = f"mongodb://127.0.0.1:{base},127.0.0.1:{base + 1},127.0.0.1:{base + 2}/?replicaSet=rs0"
        assert f"connect clients with: {client_uri}" in err
        status, body = proxy.admin_get("/topology")
        assert status == 200, body
        assert json.loads(body) == {
            "deployment": "replicaset",
            "set_name": "rs0",
            "members": [
                {"host": m.address, "listen": f"127.0.0.1:{p}", "state": "primary" if i == 0 else "secondary"}
                for i, (m, p) in enumerate(zip(rs.members, listeners))
            ],
            "client_uri": client_uri,
        }

        commands = Commands()
        pools = Pools()
        client = pymongo.MongoClient(
            f"mongodb://127.0.0.1:{base}/?replicaSet=rs0",
            serverSelectionTimeoutMS=10000,
            event_listeners=[commands, pools],
        )
        try:
            client.app.items.insert_many([{"k": i} for i in range(5)])
            assert len(list(client.app.items.find({}))) == 5
            secondary = client.get_database("app", read_preference=pymongo.ReadPreference.SECONDARY)
            assert len(list(secondary.items.find({"k": 3}))) == 1
            wait_for(lambda: len(client.nodes) == 3, what="pymongo to see three members")
            # pymongo's monitors stream hello (exhaust) through the proxy to every member.
            wait_for(lambda: all(m.streams for m in rs.members), what="streaming monitors on every member")
            assert client.nodes == {("127.0.0.1", p) for p in listeners}
            assert commands.addresses <= {("127.0.0.1", p) for p in listeners}
            # Every connection the members accepted came from the proxy, none from this process (pymongo).
            own = local_ports_of(os.getpid())
            proxy_ports = local_ports_of(proxy.pid)
            for member in rs.members:
                open_peers = [c.peer[1] for c in member.server.connections if not c.closed]
                assert open_peers and set(open_peers) <= proxy_ports, member.address
                assert not {peer for _, peer in member.peers} & own, member.address
            # The proxy accepted every connection pymongo opened: its pools' and its streaming monitors'.
            streams = sum(m.streams for m in rs.members)
            established = labelled(proxy, "mongoproxy_client_connections_established_total")
            assert established >= pools.created + streams, (established, pools.created, streams)
            # Events know the deployment: the member's real address, the set name, its state.
            primary = rs.members[0].address
            assert labelled(
                proxy,
                "mongoproxy_response_latency_seconds_count",
                op="insert",
                server=primary,
                replicaset="rs0",
                member_state="primary",
            )
            assert labelled(proxy, "mongoproxy_response_latency_seconds_count", op="find", member_state="secondary")
            assert labelled(proxy, "mongoproxy_rewritten_replies_total") > 0
            assert (
                sum(labelled(proxy, "mongoproxy_decode_errors_total", direction=d) for d in ("request", "reply")) == 0
            )
        finally:
            client.close()
        # The static --proxy listener stays byte-exact: the member's real addresses.
        doc = raw_hello(static)
        assert doc["hosts"] == rs.addresses and doc["me"] == rs.members[1].address
        # On an --upstream listener the same hello names the listeners.
        doc = raw_hello(base + 1)
        assert doc["hosts"] == [f"127.0.0.1:{p}" for p in listeners] and doc["me"] == f"127.0.0.1:{base + 1}"
        assert doc["primary"] == f"127.0.0.1:{base}" and doc["setName"] == "rs0"
        assert doc["$clusterTime"]["signature"]["hash"] == b"\x00" * 20


def test_failover_the_driver_follows_and_writes_succeed(rs, tmp_path):
    base = port_base()
    log_file = tmp_path / "commands.log"
    args = [
        "--upstream",
        rs.seed_uri,
        "--listen-port-base",
        str(base),
        "--topology-interval",
        "0.3",
        "--log-file",
        str(log_file),
        "--log-format",
        "json",
        "--metric-labels",
        "op,server,member_state",
    ]
    with run_proxy_process(args) as proxy:
        client = pymongo.MongoClient(
            f"mongodb://127.0.0.1:{base}/?replicaSet=rs0", serverSelectionTimeoutMS=15000, heartbeatFrequencyMS=500
        )
        try:
            client.app.orders.insert_one({"n": 1, "before": True})
            assert rs.writes[-1] == (0, "insert")
            rs.step_down(1)  # member 0 steps down, member 1 is elected
            client.app.orders.insert_one({"n": 2, "after": True})
            assert rs.writes[-1] == (1, "insert")
            wait_for(
                lambda: f"member {rs.members[1].address} is now primary" in proxy.stderr_text(),
                what="the proxy to see the new primary",
            )
            states = [m["state"] for m in json.loads(proxy.admin_get("/topology")[1])["members"]]
            assert states == ["secondary", "primary", "secondary"]
            client.app.orders.insert_one({"n": 3, "after": True})
            assert [d["n"] for d in client.app.orders.find({})] == [1, 2, 3]
            assert client.primary == ("127.0.0.1", base + 1)
            assert all(m.streams for m in rs.members)  # the new primary was learnt through exhaust hellos too
            assert (
                sum(labelled(proxy, "mongoproxy_decode_errors_total", direction=d) for d in ("request", "reply")) == 0
            )
            # The primary label moved from member 0 to member 1.
            for i in (0, 1):
                assert labelled(
                    proxy,
                    "mongoproxy_response_latency_seconds_count",
                    op="insert",
                    server=rs.members[i].address,
                    member_state="primary",
                ), i
        finally:
            client.close()
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    print("---- command log of the failover (server, op, outcome) ----")
    for r in records:
        outcome = "ok" if r["ok"] else f"{r['code']} {r['code_name']}"
        print(r["time"], r["server"], r["replicaset"] or "-", r["op"], outcome)
    writes = [(r["server"], r["ok"], r["code_name"]) for r in records if r["op"] == "insert"]
    old, new = rs.members[0].address, rs.members[1].address
    # As pymongo lived it: a write on the old primary, one refused there, then the retry and the next on the new one.
    assert writes == [(old, True, None), (old, False, "NotWritablePrimary"), (new, True, None), (new, True, None)]
    assert all(r["replicaset"] == "rs0" for r in records if r["op"] == "insert")


def test_fault_rules_and_hello_rewriting_compose(rs, tmp_path):
    rules = tmp_path / "drill.toml"
    rules.write_text(
        '[[rule]]\nname = "stepdown"\nop = "insert"\naction = "error"\ncode = 91\n'
        'labels = ["RetryableWriteError"]\nmax_count = 1\n'
    )
    base = port_base()
    args = ["--upstream", rs.seed_uri, "--listen-port-base", str(base), "--allow-faults", "--faults", str(rules)]
    with run_proxy_process(args) as proxy:
        client = pymongo.MongoClient(f"mongodb://127.0.0.1:{base}/?replicaSet=rs0", serverSelectionTimeoutMS=10000)
        try:
            client.app.f.insert_one({"k": 1})  # the first attempt gets the injected error, the retry goes through
            assert client.app.f.find_one({"k": 1})["k"] == 1
            wait_for(lambda: len(client.nodes) == 3, what="three members")
            assert client.nodes == {("127.0.0.1", base + i) for i in range(3)}
        finally:
            client.close()
        assert proxy.metric("mongoproxy_faults_injected_total", rule="stepdown", action="error") == 1.0
        assert rs.writes == [(0, "insert")]
        assert labelled(proxy, "mongoproxy_rewritten_replies_total") > 0
        assert sum(labelled(proxy, "mongoproxy_decode_errors_total", direction=d) for d in ("request", "reply")) == 0


def test_a_member_added_gets_a_listener(rs):
    base = port_base()
    args = ["--upstream", rs.seed_uri, "--listen-port-base", str(base), "--topology-interval", "0.3"]
    with run_proxy_process(args) as proxy:
        client = pymongo.MongoClient(
            f"mongodb://127.0.0.1:{base}/?replicaSet=rs0", serverSelectionTimeoutMS=10000, heartbeatFrequencyMS=500
        )
        try:
            client.admin.command("ping")
            wait_for(lambda: len(client.nodes) == 3, what="three members")
            new = rs.add_member()
            line = wait_for(
                lambda: re.search(
                    rf"member {re.escape(new.address)} joined rs0: listening on (\S+)", proxy.stderr_text()
                ),
                what="the join to be logged",
            )
            listen = line.group(1)
            host, port = listen.rsplit(":", 1)
            wait_for(
                lambda: (host, int(port)) in client.nodes, what="pymongo to reach the new member through the proxy"
            )
            assert raw_hello(int(port))["me"] == listen
            own = local_ports_of(os.getpid())
            assert new.peers and not {p for _, p in new.peers} & own
        finally:
            client.close()


def test_secantus_all_commands_go_through_the_proxy():
    with SecantusServer() as server:
        base = port_base()
        uri = f"mongodb://127.0.0.1:{server.port}/?replicaSet=secantus"
        with run_proxy_process(["--upstream", uri, "--listen-port-base", str(base)]) as proxy:
            assert f"{base} → 127.0.0.1:{server.port} (primary)" in proxy.stderr_text()
            commands = Commands()
            client = pymongo.MongoClient(
                f"mongodb://127.0.0.1:{base}/?replicaSet=secantus",
                serverSelectionTimeoutMS=10000,
                event_listeners=[commands],
            )
            try:
                coll = client.shop.things
                coll.drop()
                coll.insert_many([{"i": i} for i in range(20)])
                coll.update_one({"i": 3}, {"$set": {"x": 1}})
                assert coll.count_documents({"i": {"$lt": 10}}) == 10
                assert len(list(coll.find({}).batch_size(5))) == 20
                coll.delete_many({"i": {"$gte": 15}})
                assert client.nodes == {("127.0.0.1", base)}
                assert commands.addresses == {("127.0.0.1", base)}
                wanted = +commands.names
                seen = wait_for(
                    lambda: (c := proxy_command_counts(proxy)) and _without_hello(c) == wanted and c,
                    timeout=10,
                    what=f"the proxy's counts to equal pymongo's {dict(wanted)}",
                )
                assert sum(_without_hello(seen).values()) == sum(wanted.values()) > 5
                assert labelled(proxy, "mongoproxy_rewritten_replies_total") > 0
            finally:
                client.close()


def test_tls_upstream_from_the_uri_clients_in_plaintext(tmp_path):
    from tests.support.tlscerts import TlsSecantus, make_pki

    pki = make_pki(str(tmp_path))
    with TlsSecantus(pki.server_cert, pki.server_key, pki.ca) as server:
        base = port_base()
        uri = f"mongodb://127.0.0.1:{server.port}/?replicaSet=secantus&tls=true&tlsCAFile={pki.ca}"
        with run_proxy_process(["--upstream", uri, "--listen-port-base", str(base)]) as proxy:
            assert f"{base} → 127.0.0.1:{server.port} (primary, TLS)" in proxy.stderr_text()
            client = pymongo.MongoClient(
                f"mongodb://127.0.0.1:{base}/?replicaSet=secantus", serverSelectionTimeoutMS=10000
            )
            try:
                client.app.tls.insert_one({"over": "tls"})
                assert client.app.tls.find_one({"over": "tls"})["over"] == "tls"
                assert client.nodes == {("127.0.0.1", base)}
            finally:
                client.close()
            assert labelled(proxy, "mongoproxy_rewritten_replies_total") > 0
        # A CA that did not issue the server's certificate: nothing answers, the proxy starts unready and says so.
        uri = f"mongodb://127.0.0.1:{server.port}/?replicaSet=secantus&tls=true&tlsCAFile={pki.rogue_ca}"
        args = ["--upstream", uri, "--listen-port-base", str(base), "--connect-timeout", "2"]
        with run_proxy_process(args, ready=False) as proxy:
            wait_for(lambda: "listening anyway" in proxy.stderr_text(), what="the warning")
            assert proxy.admin_get("/readyz")[0] == 503


def test_tls_listeners_for_the_members_with_tls_cert(rs, tmp_path):
    from tests.support.tlscerts import make_pki

    pki = make_pki(str(tmp_path))
    base = port_base()
    args = ["--upstream", rs.seed_uri, "--listen-port-base", str(base), "--tls-cert", pki.server_cert]
    args += ["--tls-key", pki.server_key]
    with run_proxy_process(args) as proxy:
        uri = f"mongodb://127.0.0.1:{base},127.0.0.1:{base + 1},127.0.0.1:{base + 2}/?replicaSet=rs0&tls=true"
        assert f"connect clients with: {uri}" in proxy.stderr_text()
        client = pymongo.MongoClient(f"{uri}&tlsCAFile={pki.ca}", serverSelectionTimeoutMS=10000)
        try:
            client.app.t.insert_one({"tls": 1})
            assert client.app.t.find_one({"tls": 1})["tls"] == 1
            wait_for(lambda: len(client.nodes) == 3, what="three members over TLS")
        finally:
            client.close()
        assert labelled(proxy, "mongoproxy_rewritten_replies_total") > 0


def _without_hello(counts: Counter) -> Counter:
    # The driver's handshake and monitoring hellos are not command-monitoring events; everything else is.
    return +Counter({k: v for k, v in counts.items() if k.lower() not in ("hello", "ismaster")})


def test_sharded_load_balance_spreads_connections_over_both_mongos():
    with ScriptedReplicaSet(2, mongos=True) as routers:
        base = port_base()
        args = ["--upstream", routers.seed_uri, "--listen-port-base", str(base), "--load-balance"]
        args += ["--topology-interval", "0.3"]
        with run_proxy_process(args) as proxy:
            err = proxy.stderr_text()
            assert f"{base} → load balanced over {routers.addresses[0]}, {routers.addresses[1]}" in err
            for _ in range(100):
                with socket.create_connection(("127.0.0.1", base), timeout=5) as s:
                    reply = wire.roundtrip(s, wire.encode_op_msg({"ping": 1, "$db": "admin"}))
                    assert reply.doc["ok"] == 1.0
            pings = [r.commands["ping"] for r in routers.members]
            assert sum(pings) == 100 and min(pings) >= 40, pings
            client = pymongo.MongoClient(f"mongodb://127.0.0.1:{base}/", serverSelectionTimeoutMS=10000)
            try:
                client.app.c.insert_one({"a": 1})
                assert client.app.c.find_one({"a": 1})["a"] == 1
            finally:
                client.close()
            assert labelled(proxy, "mongoproxy_rewritten_replies_total") == 0
            # Health checks: a router that stops answering gets no new connections.
            routers.call(routers.members[0].server.astop)
            wait_for(
                lambda: f"member {routers.addresses[0]} stopped answering hello" in proxy.stderr_text(),
                what="the health check to notice",
            )
            before = [r.commands["ping"] for r in routers.members]
            for _ in range(10):
                with socket.create_connection(("127.0.0.1", base), timeout=5) as s:
                    assert wire.roundtrip(s, wire.encode_op_msg({"ping": 1, "$db": "admin"})).doc["ok"] == 1.0
            assert [r.commands["ping"] - b for r, b in zip(routers.members, before)] == [0, 10]


def test_sharded_without_load_balance_one_listener_per_mongos_and_nothing_rewritten():
    with ScriptedReplicaSet(2, mongos=True) as routers:
        base = port_base()
        with run_proxy_process(["--upstream", routers.seed_uri, "--listen-port-base", str(base)]) as proxy:
            client = pymongo.MongoClient(
                f"mongodb://127.0.0.1:{base},127.0.0.1:{base + 1}/", serverSelectionTimeoutMS=10000
            )
            try:
                for i in range(10):
                    client.app.c.insert_one({"i": i})
                wait_for(lambda: len(client.nodes) == 2, what="both routers")
            finally:
                client.close()
            assert "(mongos)" in proxy.stderr_text()
            assert labelled(proxy, "mongoproxy_rewritten_replies_total") == 0
            assert all(r.peers for r in routers.members)


def test_direct_connection_is_one_server(rs):
    base = port_base()
    uri = f"mongodb://{rs.members[1].address}/?directConnection=true"
    with run_proxy_process(["--upstream", uri, "--listen-port-base", str(base)]) as proxy:
        err = proxy.stderr_text()
        assert f"{base} → {rs.members[1].address} (secondary)" in err
        assert f"connect clients with: mongodb://127.0.0.1:{base}/?directConnection=true" in err
        assert f"{base + 1} →" not in err
        client = pymongo.MongoClient(
            f"mongodb://127.0.0.1:{base}/?directConnection=true", serverSelectionTimeoutMS=5000
        )
        try:
            assert client.admin.command("ping")["ok"] == 1.0
        finally:
            client.close()
        assert labelled(proxy, "mongoproxy_rewritten_replies_total") == 0


def test_no_member_reachable_starts_unready_until_one_answers():
    port = free_port()
    base = port_base()
    uri = f"mongodb://127.0.0.1:{port}/?replicaSet=rs0"
    args = ["--upstream", uri, "--listen-port-base", str(base), "--topology-interval", "0.3", "--connect-timeout", "1"]
    with run_proxy_process(args, ready=False) as proxy:
        wait_for(lambda: "listening anyway" in proxy.stderr_text(), what="the warning")
        assert proxy.admin_get("/readyz")[0] == 503
        assert f"{base} → 127.0.0.1:{port} (unknown)" in proxy.stderr_text()
        with ScriptedReplicaSet(1, ports=(port,)):
            proxy.wait_ready(15)
            assert raw_hello(base)["me"] == f"127.0.0.1:{base}"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--upstream", "http://db.example.net/"], "is not a MongoDB connection string"),
        (["--upstream", "mongodb://db.example.net:notaport/"], "does not parse"),
        (["--upstream", "mongodb://127.0.0.1:1/?tls=true&tlsCAFile=/nonexistent/ca.pem"], "fix the connection string"),
    ],
)
def test_bad_input_is_one_line(args, needle):
    res = run_proxy_cli(["run", "--admin-port", "0", *args])
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_credentials_never_logged(rs):
    uri = f"mongodb://alice:s3cr3t@{rs.members[0].address}/?replicaSet=rs0&tls=true&tlsCAFile=/nonexistent/ca.pem"
    res = run_proxy_cli(["run", "--admin-port", "0", "--upstream", uri])
    assert res.returncode == 2 and "s3cr3t" not in res.stderr and "***@" in res.stderr, res.stderr


def test_port_range_exhausted_is_one_line(rs):
    res = run_proxy_cli(["run", "--admin-port", "0", "--upstream", rs.seed_uri, "--listen-port-base", "65534"])
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert "port range is exhausted; choose another --listen-port-base" in lines[-1], res.stderr
    assert "Traceback" not in res.stderr


def test_load_balance_needs_mongos(rs):
    res = run_proxy_cli(["run", "--admin-port", "0", "--upstream", rs.seed_uri, "--load-balance"])
    assert res.returncode == 2 and "--load-balance needs mongos routers" in res.stderr, res.stderr
