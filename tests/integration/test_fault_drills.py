"""Fault rules against SecantusDB with pymongo: what a driver really does when the proxy injects a fault."""

from __future__ import annotations

import contextlib
import io
import socket
import struct

import bson
import pymongo
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mongoproxy import wire
from mongoproxy.faults import FaultEngine
from mongoproxy.sinks.metrics import MetricsSink
from tests.support.collecting import CollectingSink
from tests.support.inprocess import ProxyThread


@contextlib.contextmanager
def faulty_proxy(secantus, *rules: dict, extra_sinks: tuple = (), **flags: str):
    """The proxy in a thread in front of SecantusDB, with fault injection allowed and `rules` added."""
    registry = CollectorRegistry()
    sink = CollectingSink()
    with ProxyThread(secantus.port, sinks=[sink, MetricsSink(registry), *extra_sinks], **flags) as pt:
        engine = FaultEngine(True, registry=registry)

        def attach():
            pt.proxy.faults = engine
            engine.attach(pt.proxy)
            for rule in rules:
                engine.add_raw(rule)

        pt.call(attach)
        pt.engine, pt.registry, pt.sink = engine, registry, sink
        try:
            yield pt
        finally:
            pt.call(engine.close)


def client(pt, **kwargs) -> pymongo.MongoClient:
    # SecantusDB holds a monitoring hello for heartbeatFrequencyMS: keep it short so that pymongo's re-check
    # after a state-change error (91, 10107) comes back quickly.
    kwargs.setdefault("heartbeatFrequencyMS", 500)
    kwargs.setdefault("serverSelectionTimeoutMS", 10000)
    kwargs.setdefault("appName", "drill-test")
    return pymongo.MongoClient("127.0.0.1", pt.port, directConnection=True, **kwargs)


def metric(registry, name: str, **labels) -> float:
    total = 0.0
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def faulted(pt, rule: str) -> list:
    return [e for e in pt.sink.commands if e.fault == rule]


def test_retryable_write_drill_succeeds_once(secantus, db_name):
    rule = {
        "name": "failover",
        "op": "insert",
        "ns": f"{db_name}.*",
        "action": "error",
        "code": 91,
        "labels": ["RetryableWriteError"],
        "max_count": 1,
    }
    with faulty_proxy(secantus, rule) as pt, client(pt, retryWrites=True) as c:
        c[db_name].orders.insert_one({"_id": 1, "item": "book"})
        pt.wait_until(lambda: len([e for e in pt.sink.commands if e.op == "insert"]) == 2, what="two inserts")
        inserts = [e for e in pt.sink.commands if e.op == "insert" and e.database == db_name]
        assert [(e.fault, e.code, e.code_name, e.ok) for e in inserts] == [
            ("failover", 91, "ShutdownInProgress", False),
            ("", None, "", True),
        ]
        assert inserts[0].reply.code == 91
        assert list(c[db_name].orders.find({})) == [{"_id": 1, "item": "book"}]  # exactly once
        assert metric(pt.registry, "mongoproxy_faults_injected_total", rule="failover", action="error") == 1
        assert pt.engine.listing()["rules"][0]["injected"] == 1


def test_retry_writes_false_sees_the_injected_code(secantus, db_name):
    rule = {"name": "nwp", "op": ["insert"], "action": "error", "code": 10107, "labels": ["RetryableWriteError"]}
    with faulty_proxy(secantus, rule) as pt, client(pt, retryWrites=False) as c:
        with pytest.raises(pymongo.errors.NotPrimaryError) as info:
            c[db_name].orders.insert_one({"_id": 1})
        assert info.value.details["code"] == 10107
        assert info.value.details["codeName"] == "NotWritablePrimary"
        assert info.value.details["errorLabels"] == ["RetryableWriteError"]
        pt.call(pt.engine.reset)
        assert c[db_name].orders.count_documents({}) == 0  # never forwarded, nothing executed


def test_delay_moves_one_namespace_only(secantus, db_name):
    rule = {"name": "slow-orders", "op": "find", "ns": f"{db_name}.orders", "action": "delay", "ms": 300}
    with faulty_proxy(secantus, rule) as pt, client(pt) as c:
        c[db_name].orders.insert_one({"_id": 1})
        c[db_name].users.insert_one({"_id": 1})
        for _ in range(3):
            assert c[db_name].orders.find_one({"_id": 1}) == {"_id": 1}
            assert c[db_name].users.find_one({"_id": 1}) == {"_id": 1}
        pt.wait_until(lambda: len(faulted(pt, "slow-orders")) == 3, what="three delayed finds")

        def mean(coll):
            labels = {"op": "find", "db": db_name, "collection": coll}
            total = metric(pt.registry, "mongoproxy_response_latency_seconds_sum", **labels)
            return total / metric(pt.registry, "mongoproxy_response_latency_seconds_count", **labels)

        assert mean("orders") >= 0.3
        assert mean("users") < 0.25  # the delay is not applied to another namespace
        assert not [e for e in pt.sink.commands if e.collection == "users" and e.fault]


def test_close_raises_autoreconnect_then_recovers(secantus, db_name):
    rule = {"name": "flap", "op": "find", "ns": f"{db_name}.*", "action": "close", "max_count": 1}
    with faulty_proxy(secantus, rule) as pt, client(pt, retryReads=False) as c:
        c[db_name].things.insert_one({"_id": 1})
        with pytest.raises(pymongo.errors.AutoReconnect):
            c[db_name].things.find_one({"_id": 1})
        assert c[db_name].things.find_one({"_id": 1}) == {"_id": 1}
        pt.wait_until(lambda: faulted(pt, "flap"), what="the closed find in the log")
        (event,) = faulted(pt, "flap")
        assert event.op == "find" and event.reply is None


def test_blackhole_times_out(secantus, db_name):
    rule = {"name": "stuck", "op": "aggregate", "ns": f"{db_name}.*", "action": "blackhole"}
    with faulty_proxy(secantus, rule) as pt, client(pt, socketTimeoutMS=500, retryReads=False) as c:
        c[db_name].things.insert_one({"_id": 1})
        with pytest.raises(pymongo.errors.NetworkTimeout):
            list(c[db_name].things.aggregate([{"$match": {}}]))
        assert c[db_name].things.find_one({"_id": 1}) == {"_id": 1}  # other commands are untouched
        pt.wait_until(lambda: faulted(pt, "stuck"), what="the swallowed aggregate in the log")


def test_percentage_is_decided_per_command(secantus, db_name):
    rule = {"name": "half", "op": "find", "ns": f"{db_name}.things", "action": "error", "code": 6, "percentage": 50}
    with faulty_proxy(secantus, rule) as pt, client(pt, retryReads=False, maxPoolSize=1) as c:
        c[db_name].things.insert_one({"_id": 1})
        failures = 0
        for _ in range(2000):
            try:
                c[db_name].things.find_one({"_id": 1})
            except pymongo.errors.OperationFailure as exc:
                assert exc.code == 6
                failures += 1
        assert 900 <= failures <= 1100, failures
        assert pt.engine.rules["half"].injected == failures


def test_write_error_and_throttle_and_reply_delay(secantus, db_name):
    rules = (
        {"name": "dup", "op": "insert", "ns": f"{db_name}.a", "action": "write_error", "code": 11000},
        {"name": "thin", "op": "find", "ns": f"{db_name}.b", "action": "throttle", "bytes_per_second": 20000},
        {"name": "late", "op": "find", "ns": f"{db_name}.c", "action": "delay", "ms": 200, "where": "reply"},
    )
    with faulty_proxy(secantus, *rules) as pt, client(pt) as c:
        with pytest.raises(pymongo.errors.DuplicateKeyError):
            c[db_name].a.insert_one({"_id": 1})
        assert c[db_name].a.count_documents({}) == 0
        c[db_name].b.insert_many([{"_id": i, "pad": "x" * 1000} for i in range(10)])
        assert len(list(c[db_name].b.find({}))) == 10  # ~10 kB paced at 20 kB/s arrives whole
        c[db_name].c.insert_one({"_id": 1})
        assert c[db_name].c.find_one({}) == {"_id": 1}
        pt.wait_until(lambda: faulted(pt, "late"), what="the delayed reply")
        assert [e.reply.write_error_code for e in faulted(pt, "dup")] == [11000]
        assert len(faulted(pt, "thin")) == 1 and faulted(pt, "thin")[0].ok is True


def op_query(request_id: int, ns: str, doc: dict) -> bytes:
    body = struct.pack("<i", 0) + ns.encode() + b"\x00" + struct.pack("<ii", 0, -1) + bson.encode(doc)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, wire.OP_QUERY) + body


def read_message(sock) -> bytes:
    def recv(n: int) -> bytes:
        data = sock.recv(n)
        if not data:
            raise ConnectionError("the proxy closed the connection")
        return data

    head = b""
    while len(head) < 16:
        head += recv(16 - len(head))
    length = struct.unpack_from("<i", head)[0]
    body = b""
    while len(body) < length - 16:
        body += recv(length - 16 - len(body))
    return head + body


def test_op_query_gets_op_reply_and_hello_is_spared(secantus):
    rule = {"name": "all", "action": "error", "code": 13435}  # no op: every command but handshakes and auth
    with faulty_proxy(secantus, rule) as pt, socket.create_connection(("127.0.0.1", pt.port)) as s:
        s.sendall(op_query(7, "admin.$cmd", {"isMaster": 1}))
        reply = read_message(s)
        assert struct.unpack_from("<i", reply, 12)[0] == wire.OP_REPLY
        assert bson.decode(reply[36:])["ok"] == 1.0  # the handshake was forwarded
        request = op_query(8, "admin.$cmd", {"ping": 1})
        for i in range(len(request)):  # one byte at a time: the gate frames across chunks
            s.sendall(request[i : i + 1])
        reply = read_message(s)
        length, _, response_to, opcode = struct.unpack_from("<iiii", reply)
        assert (length, response_to, opcode) == (len(reply), 8, wire.OP_REPLY)
        doc = bson.decode(reply[36:])
        assert doc["code"] == 13435 and doc["codeName"] == "NotPrimaryNoSecondaryOk" and doc["ok"] == 0


def plain(client_side) -> bool:
    """The connection runs the plain data path: no gate, the transports' own write functions."""
    up = client_side.upstream
    return (
        client_side.fault_gate is None
        and client_side._write_upstream == up.transport.write
        and up._write_client == client_side.transport.write
    )


def test_only_connections_a_rule_could_match_are_gated(secantus, db_name):
    with faulty_proxy(secantus) as pt, client(pt) as c:
        c[db_name].things.insert_one({"_id": 1})
        conns = pt.call(lambda: list(pt.proxy.connections))
        assert conns and all(plain(x) for x in conns)  # no rule: nothing on the data path
        pt.call(pt.engine.add_raw, {"name": "elsewhere", "client": "10.99.0.0/16", "action": "close"})
        assert c[db_name].things.find_one({"_id": 1}) == {"_id": 1}
        assert all(plain(x) for x in pt.call(lambda: list(pt.proxy.connections)))  # a client that cannot match
        pt.call(pt.engine.add_raw, {"name": "other-app", "app": "billing", "action": "close"})
        assert all(plain(x) for x in pt.call(lambda: list(pt.proxy.connections)))  # their app is known already
        with client(pt) as fresh:  # new connections: gated until the handshake names the app, then plain
            assert fresh[db_name].things.find_one({"_id": 1}) == {"_id": 1}
            assert fresh[db_name].things.find_one({"_id": 1}) == {"_id": 1}
            served = {e.connection.id for e in pt.sink.commands if e.op == "find"}
            conns = [x for x in pt.call(lambda: list(pt.proxy.connections)) if x.conn.id in served]
            assert len(conns) == 2 and all(plain(x) for x in conns)
        pt.call(pt.engine.add_raw, {"name": "now", "op": "count", "ns": f"{db_name}.*", "action": "error", "code": 2})
        with pytest.raises(pymongo.errors.OperationFailure):  # a rule added at runtime reaches pooled connections
            c[db_name].command("count", "things")
        pt.call(pt.engine.reset)
        assert c[db_name].command("count", "things")["n"] == 1  # after the reset the gate steps aside
        counted = {e.connection.id for e in pt.sink.commands if e.op == "count"}
        conns = [x for x in pt.call(lambda: list(pt.proxy.connections)) if x.conn.id in counted]
        assert conns and all(plain(x) for x in conns)


def op_msg(request_id: int, doc: dict) -> bytes:
    body = b"\x00\x00\x00\x00\x00" + bson.encode(doc)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, wire.OP_MSG) + body


def test_pipelined_requests_keep_their_order_behind_a_delay(secantus, db_name):
    rule = {"name": "hold", "op": "find", "ns": f"{db_name}.things", "action": "delay", "ms": 200}
    with faulty_proxy(secantus, rule) as pt, socket.create_connection(("127.0.0.1", pt.port)) as s:
        s.settimeout(10)
        s.sendall(op_msg(1, {"hello": 1, "$db": "admin"}))
        read_message(s)
        burst = op_msg(2, {"find": "things", "filter": {}, "$db": db_name}) + op_msg(3, {"ping": 1, "$db": "admin"})
        s.sendall(burst[:30])  # the find's first section arrives in pieces
        s.sendall(burst[30:])
        replies = [read_message(s) for _ in range(2)]
        assert [struct.unpack_from("<i", r, 8)[0] for r in replies] == [2, 3]  # the ping waited behind the find
        assert all(bson.decode(r[21:])["ok"] == 1.0 for r in replies)
        s.sendall(op_msg(4, {"find": "things", "filter": {}, "$db": db_name}))
        s.shutdown(socket.SHUT_WR)  # a half-close goes upstream only after the delayed request
        assert struct.unpack_from("<i", read_message(s), 8)[0] == 4


def test_an_injected_reply_answers_its_own_request_among_forwarded_ones(secantus, db_name):
    rule = {"name": "no-insert", "op": "insert", "ns": f"{db_name}.*", "action": "error", "code": 189}
    with faulty_proxy(secantus, rule) as pt, socket.create_connection(("127.0.0.1", pt.port)) as s:
        s.settimeout(10)
        burst = b"".join(
            [
                op_msg(1, {"ping": 1, "$db": "admin"}),
                op_msg(2, {"insert": "things", "documents": [{"_id": 1}], "$db": db_name}),
                op_msg(3, {"ping": 1, "$db": "admin"}),
            ]
        )
        s.sendall(burst)
        replies = {struct.unpack_from("<i", r, 8)[0]: bson.decode(r[21:]) for r in (read_message(s) for _ in range(3))}
        assert replies[1]["ok"] == replies[3]["ok"] == 1.0
        assert (replies[2]["code"], replies[2]["codeName"]) == (189, "PrimarySteppedDown")
    assert secantus.client()[db_name].things.count_documents({}) == 0


def compress(compressor: str, message: bytes) -> bytes:
    """OP_COMPRESSED wrapping of an uncompressed message, as drivers send it."""
    import zlib

    import cramjam
    import zstandard

    body = message[16:]
    packed, cid = {
        "zlib": (lambda: zlib.compress(body), 2),
        "zstd": (lambda: zstandard.ZstdCompressor().compress(body), 3),
        "snappy": (lambda: bytes(cramjam.snappy.compress_raw(body)), 1),
    }[compressor]
    data = packed()
    length, request_id, response_to, opcode = struct.unpack_from("<iiii", message)
    prefix = struct.pack("<iiB", opcode, len(body), cid)
    return struct.pack("<iiii", 16 + 9 + len(data), request_id, response_to, wire.OP_COMPRESSED) + prefix + data


@pytest.mark.parametrize("compressor", ["zlib", "zstd", "snappy"])
def test_compressed_requests_are_matched(secantus, db_name, compressor):
    rule = {"name": "squeezed", "op": "insert", "ns": f"{db_name}.*", "action": "error", "code": 11600}
    with faulty_proxy(secantus, rule) as pt, socket.create_connection(("127.0.0.1", pt.port)) as s:
        s.settimeout(10)
        insert = op_msg(5, {"insert": "things", "documents": [{"_id": 1, "pad": "x" * 500}], "$db": db_name})
        s.sendall(compress(compressor, insert))
        reply = read_message(s)
        assert struct.unpack_from("<ii", reply, 8) == (5, wire.OP_MSG)
        assert bson.decode(reply[21:])["codeName"] == "InterruptedAtShutdown"
        pt.wait_until(lambda: faulted(pt, "squeezed"), what="the injected insert")
        (event,) = faulted(pt, "squeezed")
        assert event.request_opcode == wire.OP_COMPRESSED and event.code == 11600


def test_shape_matches_the_command_logs_hash(secantus, db_name):
    from mongoproxy import querylog
    from mongoproxy.sinks.commandlog import CommandLogSink

    log = io.StringIO()
    log_sink = CommandLogSink(log, log_query=True)
    with faulty_proxy(secantus, log_query="true", extra_sinks=[log_sink]) as pt:
        with client(pt, retryReads=False) as c:
            c[db_name].things.insert_one({"_id": 1, "name": "a"})
            c[db_name].things.find_one({"_id": 1})
            pt.wait_until(lambda: [e for e in pt.sink.commands if e.op == "find"], what="the find")
            (find,) = [e for e in pt.sink.commands if e.op == "find"]
            shape = querylog.prepare(find.request.query_shape, "find", False)[1]
            rule = {"name": "by-shape", "shape": shape, "action": "error", "code": 50}
            pt.call(pt.engine.add_raw, rule)
            with pytest.raises(pymongo.errors.ExecutionTimeout):
                c[db_name].things.find_one({"_id": 2})  # another value, the same shape
            assert c[db_name].things.find_one({"name": "a"}) == {"_id": 1, "name": "a"}  # another shape
        with socket.create_connection(("127.0.0.1", pt.port)) as s:  # the same shape, compressed
            s.settimeout(10)
            doc = {"find": "things", "filter": {"_id": 3}, "limit": 1, "singleBatch": True, "$db": db_name}
            doc["$readPreference"] = {"mode": "primaryPreferred"}  # as pymongo sends it on a direct connection
            s.sendall(compress("zlib", op_msg(9, doc)))
            assert bson.decode(read_message(s)[21:])["codeName"] == "MaxTimeMSExpired"
        pt.wait_until(lambda: len(faulted(pt, "by-shape")) == 2, what="the faulted finds")
    log_sink.close()  # the writer thread has written every queued line (it may lag behind on a loaded machine)
    assert f"shape={shape}" in log.getvalue()
    assert [e.collection for e in faulted(pt, "by-shape")] == ["things", "things"]


def test_large_replies_keep_their_framing_through_a_gate(secantus, db_name):
    rule = {"name": "counts", "op": "count", "ns": f"{db_name}.*", "action": "error", "code": 2}
    with faulty_proxy(secantus, rule) as pt, client(pt, retryReads=False, maxPoolSize=1) as c:
        docs = [{"_id": i, "pad": "x" * 1000} for i in range(300)]
        c[db_name].big.insert_many(docs)
        for _ in range(3):  # replies of ~300 kB arrive in many chunks, between injected replies
            assert len(list(c[db_name].big.find({}, batch_size=1000))) == 300
            with pytest.raises(pymongo.errors.OperationFailure) as info:
                c[db_name].command("count", "big")
            assert info.value.code == 2
        assert all(x.fault_gate is not None for x in pt.call(lambda: list(pt.proxy.connections)) if x.conn.app_name)


def test_a_tls_stream_on_a_plain_listener_passes_a_gate_unchanged():
    import asyncio
    import os

    from tests.support.inprocess import run, running_proxy

    hello = bytes.fromhex("16030102000100") + os.urandom(600)  # a TLS record, as a ClientHello starts

    async def main():
        async def echo(reader, writer):
            writer.write(await reader.readexactly(len(hello)))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        async with running_proxy(server.sockets[0].getsockname()[1]) as proxy:
            engine = FaultEngine(True)
            proxy.faults = engine
            engine.attach(proxy)
            engine.add_raw({"name": "anything", "action": "close"})
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
            writer.write(hello[:5])
            await asyncio.sleep(0.05)
            writer.write(hello[5:])
            back = await asyncio.wait_for(reader.readexactly(len(hello)), 10)
            writer.close()
            engine.close()
        server.close()
        return back, engine.rules["anything"].injected

    back, injected = run(main())
    assert back == hello and injected == 0


def test_a_rule_ends_with_its_duration_and_the_file_is_reread_on_change(secantus, db_name, tmp_path):
    path = tmp_path / "drill.toml"
    path.write_text(f'[[rule]]\nname = "brief"\nop = "count"\nns = "{db_name}.*"\naction = "error"\ncode = 2\n')
    with ProxyThread(secantus.port) as pt, client(pt, retryReads=False) as c:
        engine = FaultEngine(True, str(path))

        def attach():
            pt.proxy.faults = engine
            engine.attach(pt.proxy)

        pt.call(attach)
        with pytest.raises(pymongo.errors.OperationFailure):
            c[db_name].command("count", "things")
        text = f'[[rule]]\nname = "brief"\nop = "count"\nns = "{db_name}.*"\naction = "error"\ncode = 2\n'
        path.write_text(text + 'duration = "300ms"\n')  # no SIGHUP: the poll sees the change
        pt.wait_until(lambda: engine.rules["brief"].expires is not None, what="the file re-read")
        pt.wait_until(lambda: not pt.call(lambda: engine.active), what="the rule's end")
        assert c[db_name].command("count", "things")["n"] == 0
        assert engine.rules["brief"].as_dict()["active"] is False
        pt.call(engine.close)
