"""The tap's compiled fast path (mongoproxy._tap): the same outcomes as the FrameScanner alone, whatever the chunking."""

import random
import struct

import pytest

from mongoproxy._tap import Tap
from mongoproxy.events import Connection, SinkBus
from mongoproxy.protocol.framing import FrameScanner
from mongoproxy.tracker import Tracker
from tests.support import wire as tw
from tests.support.collecting import CollectingSink

# Every field of a CommandEvent a sink may read.
FIELDS = (
    "op database collection request_id request_opcode request_size request_first_ns request_last_ns reply_opcode "
    "reply_size reply_first_ns reply_last_ns reply_request_id ok code code_name errmsg documents_returned "
    "documents_changed cursor_id more_to_come_request exhaust exhaust_index awaitable decode_error hello"
).split()


class Observed:
    """One connection observed either through Taps (the proxy's path) or through the FrameScanners alone."""

    def __init__(self, via_tap: bool, verify_checksums: bool = False):
        self.sink = CollectingSink()
        self.conn = Connection(id=1, client_host="127.0.0.1", client_port=5000, upstream_host="h", upstream_port=1)
        self.tracker = Tracker(self.conn, SinkBus([self.sink]), 4)
        self.errors: list = []
        self.requests = FrameScanner(
            False, self.tracker.on_request, self._err("request"), render=1, verify_checksums=verify_checksums
        )
        self.replies = FrameScanner(True, self.tracker.on_reply, self._err("reply"), verify_checksums=verify_checksums)
        self.via_tap = via_tap
        if via_tap:
            self.request_tap = Tap(self.requests, self.tracker, self.conn, False)
            self.reply_tap = Tap(self.replies, self.tracker, self.conn, True)

    def _err(self, direction):
        return lambda reason, detail, fatal: self.errors.append((direction, reason, fatal))

    def feed(self, from_client: bool, chunk: bytes, now: int) -> None:
        if self.via_tap:
            (self.request_tap if from_client else self.reply_tap).feed_at(chunk, now)
        else:
            if from_client:
                self.conn.bytes_from_client += len(chunk)
            else:
                self.conn.bytes_from_server += len(chunk)
            (self.requests if from_client else self.replies).feed(chunk, now)

    def summary(self):
        events = [tuple(getattr(e, f) for f in FIELDS) for e in self.sink.commands]
        shapes = [e.request.query_shape if e.request is not None else None for e in self.sink.commands]
        return (
            events,
            shapes,
            self.errors,
            [r for _, r in self.sink.unmatched],
            self.sink.dropped,
            self.conn.bytes_from_client,
            self.conn.bytes_from_server,
        )


def conversation():
    """(from_client, message) in wire order: every kind of message the tap meets, good and bad."""
    find = tw.encode_op_msg({"find": "users", "filter": {"_id": 1}, "$db": "app"}, request_id=1)
    found = tw.encode_op_msg(
        {"cursor": {"id": 0, "ns": "app.users", "firstBatch": [{"_id": 1}]}, "ok": 1}, request_id=101, response_to=1
    )
    hello = tw.encode_op_msg(
        {"hello": 1, "client": {"application": {"name": "app"}}, "compression": ["zlib"], "$db": "admin"},
        request_id=2,
    )
    hello_reply = tw.encode_op_msg(
        {"isWritablePrimary": True, "setName": "rs", "maxWireVersion": 21, "compression": ["zlib"], "ok": 1},
        request_id=102,
        response_to=2,
    )
    insert = tw.encode_op_msg(
        {"insert": "users", "$db": "app"}, sequences=[("documents", [{"_id": i} for i in range(3)])], request_id=3
    )
    inserted = tw.encode_op_msg({"n": 3, "ok": 1}, request_id=103, response_to=3)
    w0 = tw.encode_op_msg({"insert": "logs", "$db": "app"}, flags=tw.MORE_TO_COME, request_id=4)
    failed = tw.encode_op_msg({"ok": 0, "code": 11000, "codeName": "DuplicateKey", "errmsg": "dup"}, request_id=105)
    failed = failed[:8] + struct.pack("<i", 5) + failed[12:]
    update = tw.encode_op_msg({"update": "users", "updates": [{"q": {}, "u": {}}], "$db": "app"}, request_id=5)
    zipped = tw.compress_message(tw.encode_op_msg({"count": "users", "$db": "app"}, request_id=6), "zlib")
    zipped_reply = tw.compress_message(tw.encode_op_msg({"n": 7, "ok": 1}, request_id=106, response_to=6), "zlib")
    summed = tw.encode_op_msg({"ping": 1, "$db": "admin"}, checksum=True, request_id=7)
    summed_reply = tw.encode_op_msg({"ok": 1}, checksum=True, request_id=107, response_to=7)
    bad_body = tw.encode_message(tw.OP_MSG, b"\x00" + struct.pack("<i", 99) + b"\x00" * 3, request_id=8)
    bad_reply = tw.encode_message(tw.OP_MSG, b"\x00\x00\x00\x00\x07", request_id=108, response_to=8)
    legacy = tw.encode_op_query({"isMaster": 1}, request_id=9)
    legacy_reply = tw.encode_op_reply([{"ismaster": True, "ok": 1}], response_to=9, request_id=109)
    exhaust = tw.encode_op_msg(
        {"getMore": 42, "collection": "c", "$db": "app"}, flags=tw.EXHAUST_ALLOWED, request_id=10
    )
    stream = [
        tw.encode_op_msg(
            {"cursor": {"id": 42 if i < 2 else 0, "ns": "app.c", "nextBatch": [{}]}, "ok": 1},
            flags=tw.MORE_TO_COME if i < 2 else 0,
            request_id=110 + i,
            response_to=10 if i == 0 else 110 + i - 1,
        )
        for i in range(3)
    ]
    stray = tw.encode_op_msg({"ok": 1}, request_id=199, response_to=12345)
    insert_legacy = tw.encode_op_insert("app.users", [{"a": 1}], request_id=11)
    unknown = tw.encode_message(2003, b"\x00" * 8, request_id=12)  # an opcode nobody defines
    return [
        (True, find),
        (False, found),
        (True, hello),
        (False, hello_reply),
        (True, insert + w0),
        (False, inserted),
        (True, update),
        (False, failed),
        (True, zipped),
        (False, zipped_reply),
        (True, summed),
        (False, summed_reply),
        (True, bad_body),
        (False, bad_reply),
        (True, legacy),
        (False, legacy_reply),
        (True, exhaust),
        (False, b"".join(stream)),
        (False, stray),
        (True, insert_legacy + unknown),
        (True, find),  # after an unknown opcode (skipped by its length) framing goes on
        (False, found),
    ]


def observe(via_tap, chunking, seed=0, verify_checksums=False):
    obs = Observed(via_tap, verify_checksums)
    rng = random.Random(seed)
    now = 0
    for from_client, data in conversation():
        sizes = chunking(rng, len(data))
        pos = 0
        for n in sizes:
            now += 1000
            obs.feed(from_client, data[pos : pos + n], now)
            pos += n
        assert pos == len(data)
    return obs


def whole(rng, n):
    return [n]


def random_cuts(rng, n):
    sizes = []
    while n > 0:
        k = min(n, rng.choice((1, 2, 7, 15, 16, 17, 40, 300)))
        sizes.append(k)
        n -= k
    return sizes


@pytest.mark.parametrize("verify_checksums", [False, True])
@pytest.mark.parametrize("seed", range(25))
def test_the_tap_and_the_frame_scanner_observe_the_same_whatever_the_chunking(seed, verify_checksums):
    chunking = whole if seed == 0 else random_cuts
    expected = observe(False, whole, verify_checksums=verify_checksums).summary()
    got = observe(True, chunking, seed, verify_checksums).summary()
    # Timing differs with the chunking (first/last byte times); everything else must not.
    strip = lambda s: ([e[:6] + e[8:10] + e[12:] for e in s[0]],) + s[1:]  # noqa: E731
    assert strip(got) == strip(expected)
    if seed == 0:
        assert got == expected  # whole messages: the same times too
    events, _, errors, unmatched, dropped, *_ = expected
    # The conversation exercises what it claims to: every kind of outcome is there.
    ops = [e[0] for e in events]
    assert {"find", "hello", "insert", "update", "count", "ping", "isMaster", "getMore", "op_insert"} <= set(ops)
    assert ("request", "truncated", False) in errors and ("reply", "bad_section_kind", False) in errors
    assert ("request", "unknown_opcode", False) in errors
    assert unmatched == [12345]
    assert any(e[FIELDS.index("exhaust_index")] == 2 for e in events)
    assert any(e[FIELDS.index("more_to_come_request")] for e in events)


def test_whole_messages_take_the_fast_path_and_need_no_scanner_of_their_own():
    """An idle pair holds no BodyScanner of its own: whole messages are scanned by the shared one, in C."""
    obs = observe(True, whole)
    plain = sum(1 for _, m in conversation() if m[12:16] != struct.pack("<i", tw.OP_COMPRESSED))
    assert obs.request_tap.messages + obs.reply_tap.messages >= plain - 2  # all but the compressed ones
    fresh = Observed(True)
    fresh.feed(True, conversation()[0][1], 1)
    fresh.feed(False, conversation()[1][1], 2)
    assert fresh.requests._scanner is None and fresh.replies._scanner is None
    assert [e.op for e in fresh.sink.commands] == ["find"]
    split = Observed(True)
    data = conversation()[0][1]
    split.feed(True, data[:30], 1)
    split.feed(True, data[30:], 2)
    assert split.requests._scanner is not None  # a body that spans chunks is the FrameScanner's


def test_the_tap_counts_every_byte_even_after_observation_stopped():
    obs = Observed(True)
    obs.feed(True, struct.pack("<iiii", 7, 1, 0, tw.OP_MSG), 1)  # a length below 16: framing stops
    obs.feed(True, b"x" * 100, 2)
    assert obs.conn.bytes_from_client == 116
    assert obs.errors == [("request", "bad_message_length", True)]


def test_a_bug_behind_the_tap_is_an_internal_error_and_never_reaches_the_caller(caplog):
    obs = Observed(True)
    obs.feed(True, conversation()[0][1], 1)

    def broken():
        raise RuntimeError("boom")

    obs.reply_tap.after_reply = broken
    obs.feed(False, conversation()[1][1], 2)  # must not raise
    obs.feed(False, conversation()[1][1], 3)
    assert obs.errors == [("reply", "internal_error", True)]
    assert "boom" in caplog.text
    assert obs.replies.stopped


def test_after_reply_runs_after_each_reply_the_fast_path_matched():
    obs = Observed(True)
    seen = []
    obs.reply_tap.after_reply = lambda: seen.append(len(obs.sink.commands))
    obs.feed(True, conversation()[0][1] + conversation()[2][1], 1)
    obs.feed(False, conversation()[1][1] + conversation()[3][1], 2)
    assert seen == [1, 2]  # the event is out before the callback (the drain's idle check sees it matched)


def test_per_command_objects_are_not_tracked_by_the_garbage_collector():
    """Events, pending requests and scan results hold no cycles: the collector need not scan one per command."""
    import gc

    obs = Observed(True)
    obs.feed(True, conversation()[0][1] + conversation()[2][1], 1)
    pending = obs.tracker.pending[2]  # the hello, waiting for its reply
    obs.feed(False, conversation()[1][1], 2)
    (event,) = obs.sink.commands
    assert not gc.is_tracked(event) and not gc.is_tracked(event.request) and not gc.is_tracked(event.reply)
    assert not gc.is_tracked(pending)
