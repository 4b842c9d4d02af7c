"""Protocol coverage against real clients and servers: compression, exhaust, moreToCome, checksums, legacy opcodes.

Each test proves one row of docs/protocol.md. The proxy runs in-process (ProxyThread) so the tests can see its
events, its per-connection tracker state and a real MetricsSink registry; a recording relay ("Tap") on each side
of the proxy proves the bytes are identical on both sides.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from typing import Any

import bson
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pymongo import CursorType, MongoClient, WriteConcern

from mongoproxy import wire as mwire
from mongoproxy.sinks.metrics import MetricsSink
from tests.support import wire
from tests.support.collecting import CollectingSink
from tests.support.inprocess import ProxyThread
from tests.support.scripted_server import MongoHandler, ScriptedServer

pytestmark = pytest.mark.timeout(120)

HANDSHAKE = frozenset(("hello", "isMaster", "ismaster"))


# ---------------------------------------------------------------- helpers


class Tap:
    """A recording TCP relay: every connection's bytes in each direction, as they passed."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.streams: list[dict[str, bytearray]] = []
        self.done = threading.Semaphore(0)
        self.server = ScriptedServer(self._relay)

    async def _relay(self, conn) -> None:
        rec = {"up": bytearray(), "down": bytearray()}
        self.streams.append(rec)
        reader, writer = await asyncio.open_connection(*self.target)

        async def pump(read, out, buf) -> None:
            while True:
                try:
                    data = await read(1 << 16)
                except ConnectionError:
                    data = b""
                if not data:
                    if out.can_write_eof():
                        try:
                            out.write_eof()
                        except OSError:
                            pass
                    return
                buf += data
                out.write(data)
                await out.drain()

        try:
            await asyncio.gather(pump(conn.reader.read, writer, rec["up"]), pump(reader.read, conn.writer, rec["down"]))
        finally:
            writer.close()
            self.done.release()

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address

    def pairs(self) -> Counter:
        """Multiset of (client-to-server bytes, server-to-client bytes), one per connection."""
        return Counter((bytes(s["up"]), bytes(s["down"])) for s in self.streams)

    def wait_closed(self, n: int, timeout: float = 10.0) -> None:
        for _ in range(n):
            assert self.done.acquire(timeout=timeout), "a relayed connection did not finish"

    def __enter__(self) -> Tap:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(check=exc[0] is None)


def metric_values(registry: CollectorRegistry, name: str) -> dict[tuple, float]:
    """{sorted label items: value} of every sample called `name`."""
    text = generate_latest(registry).decode()
    return {
        tuple(sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name
    }


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return sum(v for k, v in metric_values(registry, name).items() if all((n, labels[n]) in k for n in labels))


def proxy_with_metrics(upstream_port: int, **flags: str) -> tuple[ProxyThread, CollectingSink, CollectorRegistry]:
    sink = CollectingSink()
    registry = CollectorRegistry(auto_describe=True)
    return ProxyThread(upstream_port, sinks=[sink, MetricsSink(registry)], **flags), sink, registry


def tracker_state(proxy: ProxyThread) -> list[tuple[int, int]]:
    """(pending, exhaust) table sizes of each open connection, read on the proxy's loop."""
    return proxy.call(
        lambda: [
            (len(c.tracker.pending), len(c.tracker.exhaust)) for c in proxy.proxy.connections if c.tracker is not None
        ]
    )


def pending_ops(proxy: ProxyThread) -> list[str]:
    """The ops of every request still waiting for a reply, over all open connections."""
    return proxy.call(
        lambda: [p.op for c in proxy.proxy.connections if c.tracker is not None for p in c.tracker.pending.values()]
    )


def uri(port: int, **opts: Any) -> str:
    extra = "".join(f"&{k}={v}" for k, v in opts.items())
    return f"mongodb://127.0.0.1:{port}/?directConnection=true{extra}"


# ---------------------------------------------------------------- OP_COMPRESSED from pymongo


class RecordingHandler(MongoHandler):
    """MongoHandler that logs what it decoded itself (name, collection, request id, compressor) and answers writes."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.log: list[tuple[str, str | None, int, str | None]] = []
        self.commands.update({"insert": self._write, "update": self._write, "delete": self._write})

    @staticmethod
    def _write(request, conn) -> dict:
        """n = the number of statements the server decoded itself (documents, updates or deletes)."""
        name = request.command_name
        field = {"insert": "documents", "update": "updates", "delete": "deletes"}[name]
        n = len(request.msg.sequence(field) or request.msg.body.get(field, []))
        return {"n": n, "nModified": n, "ok": 1.0} if name == "update" else {"n": n, "ok": 1.0}

    async def respond(self, request, conn):
        name = request.command_name or ""
        value = (request.doc or {}).get(name)
        if name == "getMore":
            value = request.doc.get("collection")
        self.log.append((name, value if isinstance(value, str) else None, request.request_id, request.compressor))
        return await super().respond(request, conn)


def compression_workload(db) -> dict:
    out = {}
    out["insert_one"] = db.orders.insert_one({"_id": 1, "sku": "a" * 500}).acknowledged
    out["insert_many"] = len(db.orders.insert_many([{"_id": i, "sku": "b" * 300} for i in range(2, 40)]).inserted_ids)
    out["find_one"] = db.orders.find_one({"_id": 1}) is None  # the canned reply's batch is empty
    out["update"] = db.orders.update_many({"_id": {"$gt": 5}}, {"$set": {"x": 1}}).modified_count
    out["delete"] = db.orders.delete_one({"_id": 3}).deleted_count
    out["aggregate"] = list(db.orders.aggregate([{"$match": {"sku": "b" * 300}}]))
    out["count"] = db.command("count", "orders")["ok"]
    return out


@pytest.mark.parametrize("compressor", ["zlib", "zstd", "snappy"])
def test_pymongo_compression_is_observed_inside_and_forwarded_byte_for_byte(compressor):
    handler = RecordingHandler(compressors=(compressor,))
    with ScriptedServer(handler) as srv, Tap(srv.address) as server_tap:
        proxy, sink, registry = proxy_with_metrics(server_tap.address[1])
        with proxy, Tap(("127.0.0.1", proxy.port)) as client_tap:
            with MongoClient(uri(client_tap.address[1]), compressors=compressor, appname=f"cmp-{compressor}") as c:
                result = compression_workload(c.shop)
            n = len(client_tap.streams)
            client_tap.wait_closed(n)
            server_tap.wait_closed(n)
            proxy.wait_until(lambda: len(sink.closed) == n, what="every connection closed")
    assert result["update"] == 1 and result["delete"] == 1 and result["insert_many"] == 38

    # The bytes on both sides of the proxy are identical, connection by connection.
    assert client_tap.pairs() == server_tap.pairs()
    assert sum(len(s["up"]) for s in client_tap.streams) == sum(c.bytes_from_client for c in sink.closed)
    assert sum(len(s["down"]) for s in client_tap.streams) == sum(c.bytes_from_server for c in sink.closed)

    # pymongo really compressed: the server decoded every non-handshake request as compressed.
    assert Counter(
        comp for name, _, _, comp in handler.log if name.lower() not in wire.UNCOMPRESSED_COMMANDS
    ) == Counter({compressor: len([x for x in handler.log if x[0].lower() not in wire.UNCOMPRESSED_COMMANDS])})
    assert handler.negotiated and all(n == [compressor] for n in handler.negotiated)

    # Each request the server decoded is an event with the same name and collection, seen through the compression.
    by_id = {}
    for e in sink.commands:
        by_id.setdefault(e.request_id, []).append(e)
    checked = Counter()
    for name, coll, rid, comp in handler.log:
        (e,) = by_id[rid]
        assert e.op == name and e.collection == (coll or ""), (e.op, e.collection, name, coll)
        want_op = (
            mwire.OP_COMPRESSED if comp else mwire.OP_MSG if e.request_opcode != mwire.OP_QUERY else mwire.OP_QUERY
        )
        assert e.request_opcode == want_op
        assert e.reply is not None and e.ok is True and e.decode_error == ""
        if comp:
            assert e.reply_opcode == mwire.OP_COMPRESSED
            checked[name] += 1
    assert {"insert", "find", "update", "delete", "aggregate", "count"} <= set(checked)
    assert [e.request.documents for e in sink.commands if e.op == "insert"] == [1, 38]
    assert [e.documents_changed for e in sink.commands if e.op == "update"] == [1]
    assert all(e.connection.app_name == f"cmp-{compressor}" for e in sink.commands)
    assert sink.decode_errors == [] and sink.unmatched == []

    # The connection event carries the compressor; the metric counts each connection once. pymongo's monitor
    # connection offers no compressors, so it negotiates none.
    offered = [c for c in sink.closed if c.compression_offered]
    assert offered and all(c.compression_offered == (compressor,) and c.compression == compressor for c in offered)
    assert all(c.compression == "" for c in sink.closed if not c.compression_offered)
    want = {(("compressor", compressor),): len(offered)}
    if len(offered) < len(sink.closed):
        want[(("compressor", "none"),)] = len(sink.closed) - len(offered)
    assert metric_values(registry, "mongoproxy_connections_compression_total") == want


# ---------------------------------------------------------------- w:0 writes (moreToCome requests)


def test_unacknowledged_writes_against_secantus(secantus, db_name):
    proxy, sink, registry = proxy_with_metrics(secantus.port)
    with proxy:
        with MongoClient(uri(proxy.port, w=0), appname="w0-app") as c:
            coll = c[db_name].items
            coll.insert_one({"_id": 1})
            # pymongo sends an ordered w:0 bulk acknowledged (to stop at the first error): unordered is moreToCome.
            coll.insert_many([{"_id": i} for i in range(2, 12)], ordered=False)
            coll.update_one({"_id": 1}, {"$set": {"x": 1}})
            coll.delete_one({"_id": 11})
            acked = c[db_name].get_collection("items", write_concern=WriteConcern(w=1))
            deadline = time.monotonic() + 10
            while (acked.find_one({"_id": 1}) or {}).get("x") != 1 or acked.find_one({"_id": 11}) is not None:
                assert time.monotonic() < deadline, "the w:0 writes never reached the server"
                time.sleep(0.05)
            assert [d["_id"] for d in acked.find({"_id": {"$lt": 12}}).sort("_id", 1)] == list(range(1, 11))
            waiting = pending_ops(proxy)
        proxy.wait_until(lambda: len(sink.closed) == len(sink.opened), what="every connection closed")

    # moreToCome requests: one event each, no reply, documents counted from the request.
    w0 = [e for e in sink.commands if e.database == db_name and e.more_to_come_request]
    assert [(e.op, e.collection, e.request.documents) for e in w0] == [
        ("insert", "items", 1),
        ("insert", "items", 10),
        ("update", "items", 1),
        ("delete", "items", 1),
    ]
    for e in w0:
        assert e.request.flags & mwire.MORE_TO_COME and e.request_opcode == mwire.OP_MSG
        assert e.reply is None and e.reply_size == 0 and e.duration_ns == 0 and e.ok is None
    assert metric(registry, "mongoproxy_request_size_bytes_count", op="insert", db=db_name) == 2
    assert metric(registry, "mongoproxy_response_latency_seconds_count", op="insert", db=db_name) == 0

    # Every connection began with the handshake (pymongo 4.20 sends it as OP_MSG; the OP_QUERY form is covered by
    # the legacy test below and by the Node driver and mongosh in tests/system).
    for conn in sink.closed:
        first = next(e for e in sink.commands if e.connection is conn)
        assert first.op in HANDSHAKE and first.database == "admin" and first.collection == ""
        assert first.ok is True and conn.app_name == "w0-app" and conn.max_wire_version >= 6
        assert conn.driver_name.startswith("PyMongo")
    # Nothing waits for a reply but the monitor's awaitable hello; nothing is unmatched.
    assert set(waiting) <= HANDSHAKE, waiting
    assert sink.unmatched == [] and sink.decode_errors == [] and sink.dropped == 0
    assert metric(registry, "mongoproxy_unmatched_replies_total") == 0


# ---------------------------------------------------------------- streaming hello (pymongo's monitor, SecantusDB)


def test_streaming_hello_from_pymongos_monitor_is_one_event_per_reply(secantus):
    with Tap(secantus.address) as tap:
        proxy, sink, registry = proxy_with_metrics(tap.address[1])
        with proxy:
            with MongoClient(uri(proxy.port), heartbeatFrequencyMS=500, appname="monitor-app") as c:
                c.admin.command("ping")
                proxy.wait_until(
                    lambda: max((e.exhaust_index for e in sink.commands), default=0) >= 4,
                    timeout=30,
                    what="four streamed hello replies",
                )
                states = tracker_state(proxy)
            n = len(tap.streams)
            tap.wait_closed(n)
            proxy.wait_until(lambda: len(sink.closed) == n, what="every connection closed")

    streamed = [e for e in sink.commands if e.exhaust_index]
    (monitor,) = {e.connection for e in streamed}
    events = [e for e in sink.commands if e.connection is monitor]
    # The stream: one awaitable hello with exhaustAllowed, then one event per reply the server streamed.
    awaitable = [e for e in events if e.request.flags & mwire.EXHAUST_ALLOWED]
    assert awaitable and {e.request_id for e in awaitable} == {awaitable[0].request_id}
    assert [e.exhaust_index for e in awaitable] == list(range(len(awaitable)))
    assert all(e.op in HANDSHAKE and e.ok is True for e in awaitable)
    assert all(e.reply.flags & mwire.MORE_TO_COME for e in awaitable[:-1])
    assert all(e.request_first_ns <= e.reply_last_ns for e in awaitable)

    # Independently: the replies on the monitor's upstream socket, decoded by the test codec.
    def awaitable_hello(s) -> bool:
        return any(wire.decode_message(m).flags & wire.EXHAUST_ALLOWED for m in wire.split_messages(bytes(s["up"]))[0])

    (stream,) = [s for s in tap.streams if awaitable_hello(s)]
    replies = [wire.decode_message(m) for m in wire.split_messages(bytes(stream["down"]))[0]]
    assert sum(r.more_to_come for r in replies) >= 4
    # Every reply on the wire is exactly one event. The client's close races with the next streamed reply: the
    # server may have sent one more that the proxy, already closing, never read (and if it read part of it, that
    # part is counted as a truncated reply).
    assert [e.reply_request_id for e in events] == [r.request_id for r in replies[: len(events)]]
    assert len(replies) - len(events) <= 1
    assert sink.unmatched == [] and sink.dropped == 0
    assert [(d.direction, d.reason) for d in sink.decode_errors] in ([], [("reply", "truncated")])
    assert metric(registry, "mongoproxy_unmatched_replies_total") == 0
    assert all(pending <= 1 and exhaust <= 2 for pending, exhaust in states), states


# ---------------------------------------------------------------- exhaust getMore


def exhaust_cursor_handler(batches: int, per_batch: int, chain: str) -> MongoHandler:
    cursor_id = bson.Int64(7070)

    def find(request, conn):
        return {
            "cursor": {
                "id": cursor_id,
                "ns": f"shop.{request.doc['find']}",
                "firstBatch": [{"_id": i} for i in range(2)],
            },
            "ok": 1.0,
        }

    async def getmore(request, conn):
        assert request.msg.exhaust_allowed, "the driver did not ask for exhaust"
        docs = []
        for b in range(batches):
            last = b == batches - 1
            docs.append(
                {
                    "cursor": {
                        "id": bson.Int64(0) if last else cursor_id,
                        "ns": "shop.ledger",
                        "nextBatch": [{"_id": 2 + b * per_batch + i} for i in range(per_batch)],
                    },
                    "ok": 1.0,
                }
            )
        await conn.stream_exhaust(request, docs, chain=chain)
        return None  # everything was sent

    return MongoHandler(commands={"find": find, "getmore": getmore})


def check_exhaust_getmore(sink, batches: int, per_batch: int) -> None:
    getmores = [e for e in sink.commands if e.op == "getMore"]
    assert [e.exhaust_index for e in getmores] == list(range(batches))
    assert {e.request_id for e in getmores} == {getmores[0].request_id}
    assert all(e.collection == "ledger" and e.database == "shop" for e in getmores)
    assert [e.documents_returned for e in getmores] == [per_batch] * batches
    assert [e.cursor_id for e in getmores] == [7070] * (batches - 1) + [0]
    assert getmores[0].request.flags & mwire.EXHAUST_ALLOWED
    assert all(e.reply.flags & mwire.MORE_TO_COME for e in getmores[:-1])
    assert not getmores[-1].reply.flags & mwire.MORE_TO_COME
    assert sink.unmatched == [] and sink.decode_errors == []


def test_exhaust_getmore_from_pymongo():
    batches, per_batch = 6, 3
    with ScriptedServer(exhaust_cursor_handler(batches, per_batch, "previous")) as srv:
        proxy, sink, registry = proxy_with_metrics(srv.port)
        with proxy:
            with MongoClient(uri(proxy.port)) as c:
                docs = list(c.shop.ledger.find({}, cursor_type=CursorType.EXHAUST, batch_size=2))
                states = tracker_state(proxy)
            proxy.wait_until(lambda: len(sink.closed) == len(sink.opened), what="every connection closed")
    assert [d["_id"] for d in docs] == list(range(2 + batches * per_batch))
    check_exhaust_getmore(sink, batches, per_batch)
    assert states and all(s == (0, 0) for s in states), states
    assert metric(registry, "mongoproxy_documents_returned_sum", op="getMore") == batches * per_batch


@pytest.mark.parametrize("chain", ["previous", "original"])
def test_exhaust_getmore_both_response_to_conventions(chain):
    batches, per_batch = 40, 5
    with ScriptedServer(exhaust_cursor_handler(batches, per_batch, chain)) as srv:
        proxy, sink, _ = proxy_with_metrics(srv.port)
        with proxy, socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(wire.encode_op_msg({"find": "ledger", "$db": "shop"}, request_id=1))
            assert wire.decode_message(wire.recv_message(sock)).doc["cursor"]["id"] == 7070
            sock.sendall(
                wire.encode_op_msg(
                    {"getMore": bson.Int64(7070), "collection": "ledger", "$db": "shop"},
                    flags=wire.EXHAUST_ALLOWED,
                    request_id=2,
                )
            )
            replies = [wire.decode_message(wire.recv_message(sock)) for _ in range(batches)]
            assert [r.more_to_come for r in replies] == [True] * (batches - 1) + [False]
            proxy.wait_until(
                lambda: len([e for e in sink.commands if e.op == "getMore"]) == batches, what="every streamed reply"
            )
            states = tracker_state(proxy)
    check_exhaust_getmore(sink, batches, per_batch)
    assert states == [(0, 0)]


# ---------------------------------------------------------------- the "hour of streaming hellos", accelerated

HELLO_STREAM = 10_000  # per connection; an hour at pymongo's fastest heartbeat (500 ms) is 7,200


async def hello_stream_handler(conn) -> None:
    """Answer one awaitable hello with HELLO_STREAM replies, written in large pipelined batches."""
    request = await conn.read_message(timeout=10)
    assert request.command_name == "hello" and request.msg.exhaust_allowed
    chain = request.doc["chain"]
    rto, batch = request.request_id, []
    for i in range(HELLO_STREAM):
        last = i == HELLO_STREAM - 1
        rid = 1_000_000 + i
        batch.append(
            wire.encode_op_msg(
                {
                    "isWritablePrimary": True,
                    "topologyVersion": {"processId": bson.ObjectId(b"0123456789ab"), "counter": bson.Int64(i)},
                    "maxWireVersion": 21,
                    "setName": "rs0",
                    "ok": 1.0,
                },
                flags=0 if last else wire.MORE_TO_COME,
                request_id=rid,
                response_to=rto,
            )
        )
        if chain == "previous":
            rto = rid
        if len(batch) == 500 or last:
            await conn.send_and_drain(b"".join(batch))
            batch = []
    await conn.read()  # until the client leaves


def test_an_hour_of_streaming_hellos_leaves_nothing_behind():
    with ScriptedServer(hello_stream_handler) as srv:
        proxy, sink, registry = proxy_with_metrics(srv.port)
        samples = []
        with proxy:
            socks = []
            for i, chain in enumerate(("previous", "original")):
                sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
                sock.sendall(
                    wire.encode_op_msg(
                        {
                            "hello": 1,
                            "topologyVersion": {"counter": bson.Int64(0)},
                            "maxAwaitTimeMS": 10_000,
                            "chain": chain,
                            "$db": "admin",
                        },
                        flags=wire.EXHAUST_ALLOWED,
                        request_id=10 + i,
                    )
                )
                socks.append(sock)
            received = [0, 0]
            while min(received) < HELLO_STREAM:
                for i, sock in enumerate(socks):
                    if received[i] < HELLO_STREAM:
                        wire.recv_message(sock)
                        received[i] += 1
                if sum(received) % 2000 == 0:
                    samples.append(tracker_state(proxy))
            proxy.wait_until(lambda: len(sink.commands) == 2 * HELLO_STREAM, timeout=30, what="every event")
            final = tracker_state(proxy)
            for sock in socks:
                sock.close()
            proxy.wait_until(lambda: len(sink.closed) == 2, what="both connections closed")

    assert metric(registry, "mongoproxy_unmatched_replies_total") == 0 and sink.unmatched == []
    assert metric(registry, "mongoproxy_requests_dropped_total") == 0 and sink.dropped == 0
    assert sink.decode_errors == []
    # Mid-stream the pending table is empty and the exhaust table holds two keys per stream at most; at the end
    # both are empty.
    assert samples and all(pending == 0 and exhaust <= 2 for sample in samples for pending, exhaust in sample)
    assert final == [(0, 0), (0, 0)]
    for conn in sink.closed:
        events = [e for e in sink.commands if e.connection is conn]
        assert [e.exhaust_index for e in events] == list(range(HELLO_STREAM))
        assert {e.request_id for e in events} == {events[0].request_id}
        assert conn.replica_set == "rs0" and conn.max_wire_version == 21
    # Each streamed reply is observed once; awaitable hellos are long polls, never latencies.
    assert metric(registry, "mongoproxy_response_size_bytes_count", op="hello") == 2 * HELLO_STREAM
    assert not metric(registry, "mongoproxy_response_latency_seconds_count", op="hello")
    assert metric(registry, "mongoproxy_request_size_bytes_count", op="hello") == 2  # one request per stream


# ---------------------------------------------------------------- legacy opcodes


async def legacy_handler(conn) -> None:
    """A pre-3.6-style server: OP_QUERY/OP_REPLY, fire-and-forget writes, OP_GET_MORE, OP_COMMAND."""
    while True:
        m = await conn.read_message(timeout=10)
        if m is None:
            return
        if m.opcode == wire.OP_QUERY and m.query.full_collection_name.endswith(".$cmd"):
            await conn.send_and_drain(
                wire.encode_op_reply(
                    [{"ismaster": True, "maxWireVersion": 5, "compression": ["zlib"], "ok": 1.0}],
                    response_to=m.request_id,
                    request_id=9000 + m.request_id,
                )
            )
        elif m.opcode == wire.OP_QUERY:
            await conn.send_and_drain(
                wire.encode_op_reply(
                    [{"_id": i} for i in range(3)],
                    response_to=m.request_id,
                    cursor_id=77,
                    request_id=9000 + m.request_id,
                )
            )
        elif m.opcode == wire.OP_GET_MORE:
            await conn.send_and_drain(
                wire.encode_op_reply(
                    [{"_id": 3}, {"_id": 4}], response_to=m.request_id, cursor_id=0, request_id=9000 + m.request_id
                )
            )
        elif m.opcode == wire.OP_COMMAND:
            await conn.send_and_drain(
                wire.encode_op_commandreply({}, {"ok": 1.0}, response_to=m.request_id, request_id=9000 + m.request_id)
            )
        elif m.opcode == wire.OP_MSG:
            await conn.send_and_drain(
                wire.encode_op_msg({"ok": 1.0}, response_to=m.request_id, request_id=9000 + m.request_id)
            )
        # OP_INSERT, OP_UPDATE, OP_DELETE, OP_KILL_CURSORS: no reply, as in the legacy protocol


def test_legacy_opcodes_are_counted_under_their_own_names_and_matching_stays_intact():
    requests = [
        wire.encode_op_query(
            {
                "isMaster": 1,
                "client": {"application": {"name": "legacy-app"}, "driver": {"name": "old-driver", "version": "0.9"}},
                "compression": ["zlib"],
            },
            request_id=1,
        ),
        wire.encode_op_insert("shop.items", [{"_id": i} for i in range(4)], flags=1, request_id=2),  # ContinueOnError
        wire.encode_op_update("shop.items", {"_id": 1}, {"$set": {"x": 1}}, flags=1 | 2, request_id=3),  # Upsert|Multi
        wire.encode_op_delete("shop.items", {"_id": 2}, flags=1, request_id=4),  # SingleRemove
        wire.encode_op_query(
            {"x": {"$gt": 0}}, full_collection_name="shop.items", number_to_return=3, flags=4 | 16, request_id=5
        ),  # SlaveOk | NoCursorTimeout
        wire.encode_op_get_more("shop.items", 77, number_to_return=2, request_id=6),
        wire.encode_op_kill_cursors([77, 78], request_id=7),
        wire.encode_op_command("shop", "ping", {}, {"ping": 1}, request_id=8),
        wire.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=9),
    ]
    with ScriptedServer(legacy_handler) as srv:
        proxy, sink, registry = proxy_with_metrics(srv.port)
        with proxy, socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(b"".join(requests))  # pipelined, in one write
            replies = [wire.decode_message(wire.recv_message(sock)) for _ in range(5)]
            assert [r.response_to for r in replies] == [1, 5, 6, 8, 9]
            proxy.wait_until(lambda: len(sink.commands) == 9, what="nine events")
            states = tracker_state(proxy)

    ev = {e.request_id: e for e in sink.commands}
    got = [(rid, e.op, e.database, e.collection, e.request_opcode, e.reply_opcode) for rid, e in sorted(ev.items())]
    assert got == [
        (1, "isMaster", "admin", "", mwire.OP_QUERY, mwire.OP_REPLY),
        (2, "op_insert", "shop", "items", mwire.OP_INSERT, 0),
        (3, "op_update", "shop", "items", mwire.OP_UPDATE, 0),
        (4, "op_delete", "shop", "items", mwire.OP_DELETE, 0),
        (5, "query", "shop", "items", mwire.OP_QUERY, mwire.OP_REPLY),
        (6, "op_get_more", "shop", "items", mwire.OP_GET_MORE, mwire.OP_REPLY),
        (7, "op_kill_cursors", "", "", mwire.OP_KILL_CURSORS, 0),
        (8, "ping", "shop", "", mwire.OP_COMMAND, mwire.OP_COMMANDREPLY),
        (9, "ping", "admin", "", mwire.OP_MSG, mwire.OP_MSG),
    ]
    # Matching stayed intact across the fire-and-forget ops: each reply went to its own request.
    assert [ev[r].reply_request_id for r in (1, 5, 6, 8, 9)] == [9001, 9005, 9006, 9008, 9009]
    assert [r for r in (2, 3, 4, 7) if not ev[r].more_to_come_request] == []
    assert ev[2].request.documents == 4
    # Each legacy opcode's flags are read as sent; OP_REPLY's responseFlags (AwaitCapable here) too.
    assert [ev[r].request.flags for r in (2, 3, 4, 5)] == [1, 3, 1, 20]
    assert ev[5].reply.flags == wire.REPLY_AWAIT_CAPABLE
    assert (ev[5].documents_returned, ev[5].cursor_id) == (3, 77)
    assert (ev[6].documents_returned, ev[6].cursor_id, ev[6].request.cursor_id) == (2, 0, 77)
    assert ev[7].request.cursor_id == 77
    assert all(ev[r].ok is True for r in (1, 5, 6, 9))  # 8: the codec writes 3.2-style OP_COMMANDREPLY (no outcome)
    conn = ev[1].connection
    assert (conn.app_name, conn.driver_name, conn.driver_version, conn.compression) == (
        "legacy-app",
        "old-driver",
        "0.9",
        "zlib",
    )
    assert states == [(0, 0)] and sink.unmatched == [] and sink.decode_errors == []
    # /metrics counts each under its own op name.
    for op in ("op_insert", "op_update", "op_delete", "op_get_more", "op_kill_cursors", "query", "isMaster"):
        assert metric(registry, "mongoproxy_request_size_bytes_count", op=op) == 1, op
    assert metric(registry, "mongoproxy_response_latency_seconds_count", op="op_get_more") == 1
    assert metric(registry, "mongoproxy_response_latency_seconds_count", op="op_insert") == 0
    assert metric(registry, "mongoproxy_documents_returned_sum", op="query") == 3
    assert metric(registry, "mongoproxy_connections_compression_total", compressor="zlib") == 1


# ---------------------------------------------------------------- checksumPresent


async def checksum_handler(conn) -> None:
    """Replies carry a CRC-32C; the reply to request id 3 carries a wrong one."""
    while True:
        raw = await conn.read_raw_message(timeout=10)
        if raw is None:
            return
        m = wire.decode_message(raw, verify_checksum=False)
        raw = bytearray(
            wire.encode_op_msg(
                {"ok": 1.0, "n": m.request_id}, checksum=True, response_to=m.request_id, request_id=500 + m.request_id
            )
        )
        if m.request_id == 3:
            raw[-2] ^= 0x55
        await conn.send_and_drain(bytes(raw))


@pytest.mark.parametrize("verify", [False, True])
def test_checksum_present_is_skipped_or_verified(verify):
    good = [
        wire.encode_op_msg(
            {"insert": "c", "$db": "d"}, sequences=[("documents", [{"_id": i}])], checksum=True, request_id=i
        )
        for i in (1, 3, 4)
    ]
    bad = bytearray(
        wire.encode_op_msg(
            {"insert": "c", "$db": "d"}, sequences=[("documents", [{"_id": 2}])], checksum=True, request_id=2
        )
    )
    bad[-1] ^= 0xFF
    sent = good[0] + bytes(bad) + good[1] + good[2]
    compressed = wire.compress_message(
        wire.encode_op_msg({"ping": 1, "$db": "admin"}, checksum=True, request_id=5), "zlib"
    )
    flags = {"verify_checksums": "true"} if verify else {}
    with ScriptedServer(checksum_handler) as srv:
        proxy, sink, registry = proxy_with_metrics(srv.port, **flags)
        with proxy, socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(sent + compressed)
            raws = [wire.recv_message(sock) for _ in range(5)]
            proxy.wait_until(lambda: len(sink.commands) == 5, what="five events")
    assert [wire.decode_message(r, verify_checksum=False).response_to for r in raws] == [1, 2, 3, 4, 5]
    ev = {e.request_id: e for e in sink.commands}
    assert all(ev[i].request.checksum is not None and ev[i].request.flags & mwire.CHECKSUM_PRESENT for i in range(1, 5))
    assert all(ev[i].request.documents == 1 and ev[i].collection == "c" and ev[i].ok is True for i in range(1, 5))
    assert ev[5].op == "ping" and ev[5].request_opcode == mwire.OP_COMPRESSED  # the CRC inside is skipped
    errors = sorted((e.direction, e.reason) for e in sink.decode_errors)
    if verify:
        assert errors == [("reply", "checksum_mismatch"), ("request", "checksum_mismatch")]
        assert (ev[2].decode_error, ev[3].decode_error) == ("checksum_mismatch", "checksum_mismatch")
        assert metric(registry, "mongoproxy_decode_errors_total", reason="checksum_mismatch") == 2
    else:
        assert errors == [] and all(e.decode_error == "" for e in sink.commands)
    assert sink.unmatched == [] and [ev[i].reply_request_id for i in range(1, 6)] == [501, 502, 503, 504, 505]


async def legacy_exhaust_handler(conn) -> None:
    """A pre-5.1 server answering an OP_QUERY flagged Exhaust: OP_REPLYs until the cursor id is 0."""
    m = await conn.read_message(timeout=10)
    assert m.opcode == wire.OP_QUERY and m.query.flags & (1 << 6)
    chain = m.query.query["chain"]
    rto = m.request_id
    for i in range(5):
        rid = 700 + i
        await conn.send_and_drain(
            wire.encode_op_reply(
                [{"_id": 2 * i}, {"_id": 2 * i + 1}],
                response_to=rto,
                cursor_id=0 if i == 4 else 4242,
                starting_from=2 * i,
                request_id=rid,
            )
        )
        if chain == "previous":
            rto = rid
    m = await conn.read_message(timeout=10)  # then an ordinary round trip on the same connection
    await conn.send_and_drain(wire.encode_op_msg({"ok": 1.0}, response_to=m.request_id, request_id=800))
    await conn.read()


@pytest.mark.parametrize("chain", ["previous", "original"])
def test_legacy_exhaust_query_streams_op_replies(chain):
    with ScriptedServer(legacy_exhaust_handler) as srv:
        proxy, sink, registry = proxy_with_metrics(srv.port)
        with proxy, socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(
                wire.encode_op_query(
                    {"chain": chain}, full_collection_name="shop.oplog", flags=1 << 6, number_to_return=0, request_id=1
                )
            )
            replies = [wire.decode_message(wire.recv_message(sock)) for _ in range(5)]
            assert [r.reply.cursor_id for r in replies] == [4242] * 4 + [0]
            sock.sendall(wire.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=2))
            assert wire.decode_message(wire.recv_message(sock)).response_to == 2
            proxy.wait_until(lambda: len(sink.commands) == 6, what="six events")
            states = tracker_state(proxy)
    queries = [e for e in sink.commands if e.op == "query"]
    assert [(e.exhaust_index, e.documents_returned, e.cursor_id) for e in queries] == [
        (i, 2, 0 if i == 4 else 4242) for i in range(5)
    ]
    assert all(e.request_id == 1 and e.collection == "oplog" and e.reply_opcode == mwire.OP_REPLY for e in queries)
    assert [e.reply_request_id for e in queries] == [700, 701, 702, 703, 704]
    assert sink.unmatched == [] and metric(registry, "mongoproxy_unmatched_replies_total") == 0
    assert states == [(0, 0)]
