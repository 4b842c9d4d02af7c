"""mongoproxy_connections_compression_total{compressor}: once per connection, from the handshake the tracker saw."""

from __future__ import annotations

import itertools

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mongoproxy import wire
from mongoproxy.events import Connection, SinkBus
from mongoproxy.sinks.metrics import MetricsSink
from mongoproxy.tracker import Tracker
from tests.support import wire as tw
from tests.support.collecting import CollectingSink

METRIC = "mongoproxy_connections_compression_total"
_ids = itertools.count(1)


class Proxy:
    """Sans-io stand-in for the server: each connection is a Tracker fed through real FrameScanners."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.metrics = MetricsSink(self.registry)
        self.sink = CollectingSink()
        self.bus = SinkBus([self.metrics, self.sink])

    def connect(self) -> Conn:
        return Conn(self)

    def counts(self) -> dict[str, float]:
        text = generate_latest(self.registry).decode()
        return {
            s.labels["compressor"]: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == METRIC
        }


class Conn:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.conn = Connection(
            id=next(_ids), client_host="127.0.0.1", client_port=40000, upstream_host="db", upstream_port=27017
        )
        self.tracker = Tracker(self.conn, proxy.bus)
        err = proxy.sink.decode_errors.append
        self.requests = wire.FrameScanner(False, self.tracker.on_request, lambda r, d, f: err(r))
        self.replies = wire.FrameScanner(True, self.tracker.on_reply, lambda r, d, f: err(r))
        proxy.bus.connection_open(self.conn)

    def send(self, raw: bytes) -> None:
        self.requests.feed(raw, 1)

    def answer(self, raw: bytes) -> None:
        self.replies.feed(raw, 2)

    def handshake(self, offered, accepted, legacy=False, rid=1) -> None:
        hello = {"hello": 1, "client": {"application": {"name": "t"}}, "$db": "admin"}
        if offered is not None:
            hello["compression"] = list(offered)
        reply = {"isWritablePrimary": True, "maxWireVersion": 21, "ok": 1.0}
        if accepted is not None:
            reply["compression"] = list(accepted)
        if legacy:
            hello = {"isMaster": 1, **{k: v for k, v in hello.items() if k not in ("hello", "$db")}}
            self.send(tw.encode_op_query(hello, request_id=rid))
            self.answer(tw.encode_op_reply([reply], response_to=rid, request_id=rid + 1000))
        else:
            self.send(tw.encode_op_msg(hello, request_id=rid))
            self.answer(tw.encode_op_msg(reply, response_to=rid, request_id=rid + 1000))

    def close(self) -> None:
        self.proxy.bus.connection_close(self.conn)


def test_each_connection_is_counted_once_under_its_negotiated_compressor():
    p = Proxy()
    a = p.connect()
    a.handshake(["zstd", "zlib", "snappy"], ["zlib", "snappy"])  # the client's first accepted one wins
    assert a.conn.compression == "zlib"
    assert p.counts() == {"zlib": 1}
    # Later hellos on the same connection (a monitor re-checking) are not new connections.
    for i in range(5):
        a.handshake(["zstd", "zlib"], ["zlib"], rid=10 + i)
    a.send(tw.compress_message(tw.encode_op_msg({"find": "c", "$db": "d"}, request_id=30), "zlib"))
    a.answer(
        tw.compress_message(
            tw.encode_op_msg(
                {"cursor": {"id": 0, "ns": "d.c", "firstBatch": []}, "ok": 1}, response_to=30, request_id=31
            ),
            "zlib",
        )
    )
    assert p.counts() == {"zlib": 1}

    b = p.connect()
    b.handshake(["snappy"], ["snappy"], legacy=True)  # OP_QUERY isMaster / OP_REPLY
    c = p.connect()
    c.handshake(None, None)  # offered nothing
    d = p.connect()
    d.handshake(["zstd"], [])  # the server accepts none of them
    e = p.connect()
    e.handshake(["zstd"], ["zstd"])
    assert p.counts() == {"zlib": 1, "snappy": 1, "none": 2, "zstd": 1}
    assert p.sink.decode_errors == []
    # The connection event carries the compressor.
    for conn in (a, b, c, d, e):
        conn.close()
    assert [x.compression for x in p.sink.closed] == ["zlib", "snappy", "", "", "zstd"]
    assert p.metrics._compression_counted == set()  # nothing kept for closed connections


def test_streamed_hello_replies_count_the_connection_once():
    p = Proxy()
    a = p.connect()
    a.handshake(["zstd"], ["zstd"])
    a.send(
        tw.encode_op_msg(
            {"hello": 1, "topologyVersion": {"counter": 0}, "maxAwaitTimeMS": 10, "$db": "admin"},
            flags=tw.EXHAUST_ALLOWED,
            request_id=100,
        )
    )
    previous = 100
    for i in range(200):
        raw = tw.encode_op_msg(
            {"isWritablePrimary": True, "compression": ["zstd"], "ok": 1.0},
            flags=tw.MORE_TO_COME,
            request_id=5000 + i,
            response_to=previous,
        )
        a.answer(raw)
        previous = 5000 + i
    assert len(p.sink.commands) == 201 and p.sink.unmatched == []
    assert p.counts() == {"zstd": 1}


def test_unknown_names_are_bounded_and_failed_handshakes_wait():
    p = Proxy()
    a = p.connect()
    a.send(tw.encode_op_msg({"hello": 1, "compression": ["lz4-from-the-future"], "$db": "admin"}, request_id=1))
    a.answer(tw.encode_op_msg({"ok": 1.0, "compression": ["lz4-from-the-future"]}, response_to=1, request_id=2))
    assert p.counts() == {"other": 1}
    b = p.connect()
    # A hello whose reply could not be decoded says nothing about compression yet: not counted.
    b.send(tw.encode_op_msg({"hello": 1, "compression": ["zlib"], "$db": "admin"}, request_id=1))
    bad = bytearray(tw.encode_op_msg({"ok": 1.0, "compression": ["zlib"]}, response_to=1, request_id=2))
    bad[-1] = 7  # missing terminator
    b.answer(bytes(bad))
    assert p.counts() == {"other": 1}
    b.handshake(["zlib"], ["zlib"], rid=3)
    assert p.counts() == {"other": 1, "zlib": 1}
    # Commands that are not handshakes never count.
    c = p.connect()
    c.send(tw.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=1))
    c.answer(tw.encode_op_msg({"ok": 1.0}, response_to=1, request_id=2))
    assert p.counts() == {"other": 1, "zlib": 1}
