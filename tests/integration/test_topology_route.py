"""/topology through the admin routes contract (an aiohttp app built from Cluster.admin_routes())."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from mongoproxy import config as config_mod
from mongoproxy import topology
from mongoproxy.events import SinkBus
from mongoproxy.server import Proxy
from tests.support.collecting import CollectingSink
from tests.support.inprocess import make_config, run
from tests.support.replset import ScriptedReplicaSet
from tests.support.wire import decode_message, encode_op_msg, read_message


async def hello_through(port: int) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(encode_op_msg({"hello": 1, "$db": "admin"}))
        return decode_message(await read_message(reader)).doc
    finally:
        writer.close()


async def poll(predicate, what: str, timeout: float = 10.0):
    for _ in range(int(timeout / 0.05)):
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_topology_route_follows_failover_and_joins():
    with ScriptedReplicaSet(3) as rs:

        async def main() -> None:
            cfg = make_config(upstream=[rs.seed_uri], topology_interval="0.2")
            proxy = Proxy(cfg, SinkBus([CollectingSink()]))
            cluster = topology.create(proxy, CollectorRegistry())
            assert cluster in proxy.components
            await proxy.start()
            await cluster.start()
            assert proxy.ready
            app = web.Application()
            app.add_routes(cluster.admin_routes())
            client = TestClient(TestServer(app))
            await client.start_server()
            try:
                doc = await (await client.get("/topology")).json()
                assert doc["deployment"] == "replicaset" and doc["set_name"] == "rs0"
                members = doc["members"]
                assert [m["host"] for m in members] == rs.addresses
                assert [m["state"] for m in members] == ["primary", "secondary", "secondary"]
                listens = [m["listen"] for m in members]
                assert doc["client_uri"] == f"mongodb://{','.join(listens)}/?replicaSet=rs0"
                print("/topology:", await (await client.get("/topology")).text())

                rs.step_down(2)

                async def moved():
                    d = await (await client.get("/topology")).json()
                    return [m["state"] for m in d["members"]] == ["secondary", "secondary", "primary"]

                await poll(moved, "the primary to move in /topology")
                hello = await hello_through(int(listens[0].rsplit(":", 1)[1]))
                assert hello["primary"] == listens[2]

                new = rs.add_member()

                async def joined():
                    d = await (await client.get("/topology")).json()
                    return d if len(d["members"]) == 4 and d["members"][3]["state"] == "secondary" else None

                d = await poll(joined, "the new member in /topology")
                assert d["members"][3]["host"] == new.address
                hello = await hello_through(int(d["members"][3]["listen"].rsplit(":", 1)[1]))
                assert hello["me"] == d["members"][3]["listen"] and len(hello["hosts"]) == 4

                rs.remove_member(1)  # a member leaves: its listener closes once no connection uses it

                async def left():
                    d = await (await client.get("/topology")).json()
                    return d if d["members"][1].get("removed") else None

                d = await poll(left, "the departed member in /topology")
                assert listens[1] not in d["client_uri"] and listens[0] in d["client_uri"]
                port = int(listens[1].rsplit(":", 1)[1])

                async def closed():
                    try:
                        _, w = await asyncio.open_connection("127.0.0.1", port)
                    except OSError:
                        return True
                    w.close()
                    return False

                await poll(closed, "the departed member's listener to close")
            finally:
                await client.close()
                await proxy.drain(0)
                await proxy.close_listeners()

        run(main())


def test_readiness_is_the_and_of_static_dns_and_upstream_members(monkeypatch):
    """The DNS retry of a --proxy upstream must not make the proxy ready while no --upstream member answers."""
    from mongoproxy import server
    from tests.support.ports import free_port

    monkeypatch.setattr(server, "DNS_RETRY_FIRST", 0.01)
    port = free_port()

    async def main() -> None:
        cfg = make_config(
            upstream=[f"mongodb://127.0.0.1:{port}/?replicaSet=rs0"], topology_interval="0", connect_timeout="0.5"
        )
        proxy = Proxy(cfg, SinkBus([CollectingSink()]))
        cluster = topology.create(proxy, CollectorRegistry())
        await proxy.start()
        assert not proxy.ready  # discovery has not run yet
        await cluster.start()
        try:
            assert not proxy.ready and "answers hello" in proxy.not_ready_reason
            # A static upstream whose name did not resolve at start and resolves now: the retry task's path.
            spec = config_mod.parse_proxy_spec(f"{free_port()}:localhost:{port}")
            proxy.unresolved.add(spec)
            await proxy._resolve_until_ready()
            assert not proxy.unresolved
            assert not proxy.ready and "answers hello" in proxy.not_ready_reason

            # The other order: a member answers while a static upstream still does not resolve.
            proxy.unresolved.add(spec)
            with ScriptedReplicaSet(1, ports=(port,)):
                await cluster.topologies[0].refresh()
                assert cluster.topologies[0].reachable
                assert not proxy.ready and "do not resolve" in proxy.not_ready_reason
                proxy.unresolved.clear()
                await cluster.topologies[0].refresh()
                assert proxy.ready and proxy.not_ready_reason == ""
        finally:
            await proxy.drain(0)
            await proxy.close_listeners()

    run(main())


def test_member_listeners_are_own_listeners_for_the_transparent_loop_check():
    with ScriptedReplicaSet(2) as rs:

        async def main() -> None:
            cfg = make_config(upstream=[rs.seed_uri], topology_interval="0")
            proxy = Proxy(cfg, SinkBus([CollectingSink()]))
            cluster = topology.create(proxy, CollectorRegistry())
            await proxy.start()
            await cluster.start()
            try:
                ports = [m.listen_port for m in cluster.topologies[0]._unique()]
                assert len(ports) == 2
                elsewhere = ("127.0.0.1", 1)  # the transparent listener the connection arrived on
                for listen_port in ports:
                    assert proxy.is_own_listener(("127.0.0.1", listen_port), elsewhere)
                member_port = int(rs.addresses[0].rsplit(":", 1)[1])
                assert not proxy.is_own_listener(("127.0.0.1", member_port), elsewhere)
            finally:
                await proxy.drain(0)
                await proxy.close_listeners()

        run(main())


def test_advertise_host_names_the_listeners_in_rewritten_hellos_and_topology():
    with ScriptedReplicaSet(2) as rs:

        async def main() -> None:
            cfg = make_config(upstream=[rs.seed_uri], topology_interval="0", advertise_host="mongoproxy.svc")
            proxy = Proxy(cfg, SinkBus([CollectingSink()]))
            cluster = topology.create(proxy, CollectorRegistry())
            await proxy.start()
            await cluster.start()
            try:
                ports = [m.listen_port for m in cluster.topologies[0]._unique()]
                named = [f"mongoproxy.svc:{p}" for p in ports]
                hello = await hello_through(ports[0])  # listeners still bind --listen-host (127.0.0.1)
                assert sorted(hello["hosts"]) == sorted(named)
                assert hello["me"] == named[0] and hello["primary"] == named[0]
                doc = cluster.describe()
                assert [m["listen"] for m in doc["members"]] == named
                assert doc["client_uri"] == f"mongodb://{','.join(named)}/?replicaSet=rs0"
            finally:
                await proxy.drain(0)
                await proxy.close_listeners()

        run(main())
