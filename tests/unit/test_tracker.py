"""Tracker: request/reply matching, moreToCome both ways, exhaust conventions, legacy pairs, the pending cap."""

from mongoproxy import wire
from mongoproxy._tap import Tap
from mongoproxy.events import Connection, SinkBus
from mongoproxy.tracker import Tracker
from tests.support import wire as tw
from tests.support.collecting import CollectingSink


class Pair:
    """A Tracker fed as the proxy feeds it: through a Tap (and its FrameScanner) in each direction."""

    def __init__(self, max_pending=1000):
        self.sink = CollectingSink()
        self.conn = Connection(
            id=1, client_host="127.0.0.1", client_port=5000, upstream_host="10.0.0.1", upstream_port=27017
        )
        self.tracker = Tracker(self.conn, SinkBus([self.sink]), max_pending)
        err = lambda r, d, f: self.sink.decode_errors.append(r)  # noqa: E731
        self.requests = wire.FrameScanner(False, self.tracker.on_request, err)
        self.replies = wire.FrameScanner(True, self.tracker.on_reply, err)
        self.request_tap = Tap(self.requests, self.tracker, self.conn, False)
        self.reply_tap = Tap(self.replies, self.tracker, self.conn, True)
        self.t = 0

    def send(self, data):
        self.t += 10
        self.request_tap.feed_at(data, self.t)

    def answer(self, data):
        self.t += 10
        self.reply_tap.feed_at(data, self.t)


def test_pipelined_replies_out_of_order():
    p = Pair()
    p.send(
        tw.encode_op_msg({"find": "a", "$db": "d"}, request_id=1)
        + tw.encode_op_msg({"find": "b", "$db": "d"}, request_id=2)
    )
    p.answer(
        tw.encode_op_msg(
            {"cursor": {"id": 0, "ns": "d.b", "firstBatch": [{}, {}]}, "ok": 1}, request_id=9, response_to=2
        )
    )
    p.answer(
        tw.encode_op_msg({"cursor": {"id": 0, "ns": "d.a", "firstBatch": [{}]}, "ok": 1}, request_id=10, response_to=1)
    )
    assert [(e.collection, e.documents_returned, e.reply_request_id) for e in p.sink.commands] == [
        ("b", 2, 9),
        ("a", 1, 10),
    ]
    assert p.tracker.in_flight == 0 and p.sink.unmatched == []
    e = p.sink.commands[0]
    assert e.request_first_ns == 10 and e.reply_last_ns == 20 and e.duration_ns == 10


def test_more_to_come_request_yields_event_without_reply():
    p = Pair()
    p.send(
        tw.encode_op_msg(
            {"insert": "logs", "$db": "d", "writeConcern": {"w": 0}},
            sequences=[("documents", [{}, {}, {}])],
            flags=tw.MORE_TO_COME,
            request_id=5,
        )
    )
    (e,) = p.sink.commands
    assert e.more_to_come_request and e.reply is None and e.duration_ns == 0
    assert (e.op, e.collection, e.request.documents) == ("insert", "logs", 3)
    assert p.tracker.in_flight == 0


def _exhaust(p, chain_on_previous: bool, replies: int):
    p.send(
        tw.encode_op_msg(
            {"hello": 1, "topologyVersion": {"counter": 0}, "maxAwaitTimeMS": 10000, "$db": "admin"},
            flags=tw.EXHAUST_ALLOWED,
            request_id=100,
        )
    )
    previous = 100
    for i in range(replies):
        last = i == replies - 1
        rid = 1000 + i
        p.answer(
            tw.encode_op_msg(
                {"isWritablePrimary": True, "setName": "rs0", "ok": 1},
                flags=0 if last else tw.MORE_TO_COME,
                request_id=rid,
                response_to=previous if chain_on_previous else 100,
            )
        )
        previous = rid


def test_exhaust_replies_chain_on_previous_reply_id():
    p = Pair()
    _exhaust(p, True, 5)
    assert [(e.exhaust, e.exhaust_index) for e in p.sink.commands] == [
        (False, 0),
        (True, 1),
        (True, 2),
        (True, 3),
        (True, 4),
    ]
    assert p.sink.unmatched == [] and p.tracker.pending == {} and p.tracker.exhaust == {}
    assert p.conn.replica_set == "rs0"
    # Streamed replies measure from the previous reply's last byte.
    second = p.sink.commands[1]
    assert second.request_first_ns == p.sink.commands[0].reply_last_ns


def test_exhaust_replies_answering_the_original_request_id():
    p = Pair()
    _exhaust(p, False, 4)
    assert len(p.sink.commands) == 4 and p.sink.unmatched == []
    assert p.tracker.pending == {} and p.tracker.exhaust == {}


def test_long_exhaust_stream_leaves_no_state():
    p = Pair()
    _exhaust(p, False, 2000)
    assert len(p.sink.commands) == 2000 and p.sink.unmatched == [] and p.sink.dropped == 0
    assert p.tracker.pending == {} and p.tracker.exhaust == {}


def test_legacy_handshake_and_fire_and_forget_ops():
    p = Pair()
    p.send(
        tw.encode_op_query(
            {
                "isMaster": 1,
                "client": {"application": {"name": "legacy-app"}, "driver": {"name": "d", "version": "1.2"}},
                "compression": ["zstd", "zlib"],
            },
            request_id=1,
        )
    )
    p.answer(
        tw.encode_op_reply(
            [{"ismaster": True, "maxWireVersion": 6, "compression": ["zlib"], "ok": 1.0}], response_to=1, request_id=2
        )
    )
    p.send(tw.encode_op_insert("shop.items", [{"a": 1}, {"a": 2}], request_id=3))
    p.send(tw.encode_op_query({"a": 1}, full_collection_name="shop.items", number_to_return=0, request_id=4))
    p.answer(tw.encode_op_reply([{"a": 1}, {"a": 1}, {"a": 1}], response_to=4, cursor_id=77, request_id=5))
    p.send(tw.encode_op_get_more("shop.items", 77, request_id=6))
    p.answer(tw.encode_op_reply([{"a": 1}], response_to=6, cursor_id=0, request_id=7))
    ops = [(e.op, e.database, e.collection, e.documents_returned, e.ok) for e in p.sink.commands]
    assert ops == [
        ("isMaster", "admin", "", 1, True),
        ("op_insert", "shop", "items", None, None),
        ("query", "shop", "items", 3, True),
        ("op_get_more", "shop", "items", 1, True),
    ]
    assert (p.conn.app_name, p.conn.driver_name, p.conn.driver_version) == ("legacy-app", "d", "1.2")
    assert p.conn.compression_offered == ("zstd", "zlib") and p.conn.compression == "zlib"
    assert p.conn.max_wire_version == 6
    assert p.sink.commands[1].request.documents == 2


def test_query_failure_flag_marks_legacy_reply_failed():
    p = Pair()
    p.send(tw.encode_op_query({"a": 1}, full_collection_name="shop.items", request_id=1))
    p.answer(
        tw.encode_op_reply([{"$err": "boom", "code": 2}], response_to=1, flags=tw.REPLY_QUERY_FAILURE, request_id=2)
    )
    (e,) = p.sink.commands
    assert e.ok is False and e.code == 2


def test_pending_cap_drops_oldest():
    p = Pair(max_pending=3)
    for i in range(1, 6):
        p.send(tw.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=i))
    assert p.sink.dropped == 2 and list(p.tracker.pending) == [3, 4, 5]
    p.answer(tw.encode_op_msg({"ok": 1}, response_to=1, request_id=50))
    assert p.sink.unmatched == [(p.conn, 1)]


def test_errors_and_attribution():
    p = Pair()
    p.send(tw.encode_op_msg({"getMore": 12345678901, "collection": "orders", "$db": "shop"}, request_id=1))
    p.answer(
        tw.encode_op_msg(
            {"cursor": {"id": 0, "ns": "shop.orders", "nextBatch": [{}] * 4}, "ok": 1}, response_to=1, request_id=2
        )
    )
    p.send(tw.encode_op_msg({"usersInfo": "alice", "$db": "admin"}, request_id=3))
    p.answer(
        tw.encode_op_msg(
            {"ok": 0, "code": 13, "codeName": "Unauthorized", "errmsg": "not authorized"}, response_to=3, request_id=4
        )
    )
    p.send(tw.encode_op_msg({"update": "orders", "$db": "shop"}, request_id=5))
    p.answer(
        tw.encode_op_msg(
            {"n": 3, "nModified": 2, "upserted": [{"index": 0, "_id": 1}], "ok": 1}, response_to=5, request_id=6
        )
    )
    p.send(tw.encode_op_msg({"findAndModify": "orders", "$db": "shop"}, request_id=7))
    p.answer(
        tw.encode_op_msg(
            {"lastErrorObject": {"n": 1, "updatedExisting": True}, "value": {}, "ok": 1}, response_to=7, request_id=8
        )
    )
    getmore, users, update, fam = p.sink.commands
    assert (getmore.op, getmore.collection, getmore.documents_returned, getmore.request.cursor_id) == (
        "getMore",
        "orders",
        4,
        12345678901,
    )
    assert (users.collection, users.ok, users.code, users.code_name, users.failed) == (
        "",
        False,
        13,
        "Unauthorized",
        True,
    )
    assert update.documents_changed == 3
    assert fam.documents_changed == 1


def test_legacy_query_reply_documents_are_data_not_outcome():
    p = Pair()
    p.send(tw.encode_op_query({"status": "x"}, full_collection_name="shop.items", request_id=1))
    p.answer(tw.encode_op_reply([{"ok": 0, "code": 99, "errmsg": "a user field", "n": 5}], response_to=1, request_id=2))
    (e,) = p.sink.commands
    assert (e.op, e.ok, e.code, e.errmsg, e.documents_returned) == ("query", True, None, "", 1)
    assert not e.failed


def test_monitoring_hello_with_exhaust_allowed_is_a_long_poll():
    p = Pair()
    _exhaust(p, True, 3)
    p.send(tw.encode_op_msg({"hello": 1, "$db": "admin"}, request_id=500))
    p.answer(tw.encode_op_msg({"isWritablePrimary": True, "ok": 1}, response_to=500, request_id=501))
    assert [e.awaitable for e in p.sink.commands] == [True, True, True, False]
