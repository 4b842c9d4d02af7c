"""The mirror sink's event-loop side: request framing, selection, the bounded queue (its shadow thread is not started)."""

from __future__ import annotations

import bson
from prometheus_client import CollectorRegistry

from mongoproxy import _bson_parser
from mongoproxy.events import CommandEvent, Connection
from mongoproxy.sinks.mirror import MAX_MESSAGE_BYTES, MirrorSink, _Framer
from tests.support import wire


def request(rid: int, doc: dict) -> bytes:
    return wire.encode_op_msg(doc, request_id=rid)


def event(conn: Connection, raw: bytes, reply: dict, op: str, coll: str) -> CommandEvent:
    rid = int.from_bytes(raw[4:8], "little")
    req = _bson_parser.scan_body(2013, False, raw[16:])
    rep_raw = wire.encode_op_msg(reply, response_to=rid)
    rep = _bson_parser.scan_body(2013, True, rep_raw[16:])
    return CommandEvent(
        conn,
        op,
        "shop",
        coll,
        rid,
        2013,
        len(raw),
        1,
        2,
        req,
        2013,
        len(rep_raw),
        3,
        4,
        rep,
        ok=True,
        cursor_id=rep.cursor_id,
    )


def test_framer_keeps_whole_messages_across_any_chunking_and_skips_unwanted_ones():
    msgs = [request(i, {"find": "c", "filter": {"i": i}, "$db": "shop"}) for i in range(1, 4)]
    big = wire.encode_op_msg({"insert": "c", "documents": [{"x": "y" * 100}], "$db": "shop"}, request_id=9)
    stream = msgs[0] + big + msgs[1] + msgs[2]
    for size in (1, 7, 16, 100, len(stream)):
        f = _Framer()
        out = []
        for i in range(0, len(stream), size):
            out += f.feed(stream[i : i + size], lambda h: int.from_bytes(h[4:8], "little") != 9)
        assert out == msgs, size
    f = _Framer()
    huge = (MAX_MESSAGE_BYTES + 1).to_bytes(4, "little") + (0).to_bytes(8, "little") + (2013).to_bytes(4, "little")
    assert f.feed(huge + b"\0" * 100, lambda h: True) == [] and not f.buf  # passed over, never buffered
    assert f.feed(b"\0" * (MAX_MESSAGE_BYTES + 1 - 116) + msgs[0], lambda h: True) == [msgs[0]]


def test_reads_are_queued_writes_are_not_and_a_full_queue_drops():
    sink = MirrorSink("mongodb://127.0.0.1:1", CollectorRegistry(), queue_size=2)
    conn = Connection(1, "127.0.0.1", 5000)
    for rid, doc, op in (
        (1, {"find": "orders", "filter": {}, "$db": "shop"}, "find"),
        (2, {"insert": "orders", "documents": [{"_id": 1}], "$db": "shop"}, "insert"),
        (3, {"count": "orders", "$db": "shop"}, "count"),
        (4, {"distinct": "orders", "key": "a", "$db": "shop"}, "distinct"),
    ):
        raw = request(rid, doc)
        sink.on_data(conn, True, raw, 0)
        reply = {"cursor": {"firstBatch": [], "id": bson.Int64(0), "ns": "shop.orders"}, "ok": 1.0}
        sink.on_command(event(conn, raw, reply, op, "orders"))
    queued = [sink.queue.get_nowait()[1] for _ in range(sink.queue.qsize())]
    assert queued == ["find", "count"]  # the insert is not mirrored; the distinct found the queue full
    assert sink.dropped.labels("queue_full")._value.get() == 1
    assert sink.conns[1].pending == {}


def test_a_command_answered_by_a_fault_drill_is_not_compared():
    sink = MirrorSink("mongodb://127.0.0.1:1", CollectorRegistry())
    conn = Connection(1, "127.0.0.1", 5000)
    raw = request(1, {"find": "orders", "filter": {}, "$db": "shop"})
    sink.on_data(conn, True, raw, 0)
    ev = event(conn, raw, {"ok": 0.0, "code": 6, "errmsg": "injected"}, "find", "orders")
    ev.fault = "error"
    sink.on_command(ev)
    assert sink.queue.qsize() == 0 and sink.dropped.labels("fault")._value.get() == 1
