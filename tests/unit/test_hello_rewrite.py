"""protocol.hello and hellogate: the rewritten hello equals the original with only the address fields replaced."""

from __future__ import annotations

import struct
from collections import OrderedDict

import bson
import pytest
from bson.raw_bson import RawBSONDocument
from hypothesis import given, settings
from hypothesis import strategies as st

from mongoproxy import hellogate
from mongoproxy.protocol import hello
from tests.support import wire

ADDRESS = st.builds(
    lambda h, p: f"{h}:{p}", st.sampled_from(["db0.example.net", "10.0.0.5", "[::1]", "Host-A"]), st.integers(1, 65535)
)
SCALAR = st.one_of(
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**63), 2**63 - 1).map(bson.Int64),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.booleans(),
    st.none(),
    st.binary(max_size=16),
    st.builds(bson.Timestamp, st.integers(0, 2**31), st.integers(0, 2**31)),
)
EXTRA = st.dictionaries(
    st.text(min_size=1, max_size=10).filter(lambda k: "\x00" not in k and k not in hello.ADDRESS_FIELDS_STR),
    st.one_of(SCALAR, st.lists(SCALAR, max_size=3), st.dictionaries(st.sampled_from("abc"), SCALAR, max_size=3)),
    max_size=6,
)


@st.composite
def hello_docs(draw):
    """A hello reply document with some of the address fields, in any order, among other fields."""
    members = draw(st.lists(ADDRESS, min_size=1, max_size=5, unique=True))
    doc = dict(draw(EXTRA))
    fields = draw(st.sets(st.sampled_from(["hosts", "passives", "arbiters", "primary", "me"])))
    for f in sorted(fields):
        if f in ("primary", "me"):
            doc[f] = draw(st.sampled_from(members))
        else:
            doc[f] = draw(st.lists(st.sampled_from(members), max_size=4))
    doc["$clusterTime"] = {"clusterTime": bson.Timestamp(1, 2), "signature": {"hash": b"\x01" * 20, "keyId": 7}}
    doc["ok"] = 1.0
    keys = list(doc)
    order = draw(st.permutations(keys))
    return {k: doc[k] for k in order}, members


def listener_map(members):
    return {m.lower(): f"127.0.0.1:{27113 + i}" for i, m in enumerate(members)}


def expected(doc, mapping):
    out = dict(doc)
    for f in ("primary", "me"):
        if f in out:
            out[f] = mapping[out[f].lower()]
    for f in ("hosts", "passives", "arbiters"):
        if f in out:
            out[f] = [mapping[a.lower()] for a in out[f]]
    return out


def decode(message: bytes) -> dict:
    m = wire.decode_message(message)
    return m.doc


def raw_doc(message: bytes, op: int) -> bytes:
    start = 21 if op == hello.OP_MSG else 36
    size = struct.unpack_from("<i", message, start)[0]
    return message[start : start + size]


@settings(max_examples=300, deadline=None)
@given(hello_docs(), st.sampled_from(["op_msg", "op_reply"]), st.integers(1, 2**31 - 1))
def test_rewritten_hello_equals_original_with_only_addresses_replaced(case, form, response_to):
    doc, members = case
    mapping = listener_map(members)
    if form == "op_msg":
        original = wire.encode_op_msg(doc, response_to=response_to)
        op = hello.OP_MSG
    else:
        original = wire.encode_op_reply([doc], response_to=response_to)
        op = hello.OP_REPLY
    out, changes = hello.rewrite_reply(original, hello.make_swap(mapping))
    # Header: the length is fixed, the ids and opcode are kept.
    assert struct.unpack_from("<i", out)[0] == len(out)
    assert out[4:16] == original[4:16]
    before = bson.decode(raw_doc(original, op))
    after = bson.decode(raw_doc(out, op))
    assert after == expected(before, mapping)
    assert list(after) == list(before)  # same fields, same order
    # Every field other than the addresses is byte-exact.
    raw_before = RawBSONDocument(raw_doc(original, op))
    raw_after = RawBSONDocument(raw_doc(out, op))
    for key in before:
        if key not in hello.ADDRESS_FIELDS_STR:
            assert bson.encode({key: raw_before[key]}) == bson.encode({key: raw_after[key]})
    has_address = any(doc.get(f) for f in hello.ADDRESS_FIELDS_STR)
    assert (changes > 0) == has_address
    if not has_address:
        assert out == original


def test_op_msg_checksum_is_dropped_with_its_flag():
    doc = {"isWritablePrimary": True, "hosts": ["a:1", "b:2"], "me": "a:1", "ok": 1.0}
    original = wire.encode_op_msg(doc, checksum=True, response_to=9)
    out, changes = hello.rewrite_reply(original, hello.make_swap({"a:1": "127.0.0.1:1", "b:2": "127.0.0.1:2"}))
    m = wire.decode_message(out)
    assert m.msg.checksum is None and not m.flags & wire.CHECKSUM_PRESENT
    assert m.doc["hosts"] == ["127.0.0.1:1", "127.0.0.1:2"] and m.doc["me"] == "127.0.0.1:1"
    assert changes == 2


def test_unknown_address_asks_the_callback_and_unmapped_stays():
    asked = []
    swap = hello.make_swap(
        {"a:1": "127.0.0.1:1"}, lambda a: asked.append(a) or ("127.0.0.1:9" if a == "new:3" else None)
    )
    out, _ = hello.rewrite_reply(wire.encode_op_msg({"hosts": ["A:1", "new:3", "gone:4"], "ok": 1.0}), swap)
    assert decode(out)["hosts"] == ["127.0.0.1:1", "127.0.0.1:9", "gone:4"]
    assert asked == ["new:3", "gone:4"]


@pytest.mark.parametrize(
    "message",
    [
        b"\x00" * 10,
        wire.encode_op_query({"hello": 1}),
        wire.encode_op_msg({"hosts": ["a:1"]})[:-3],
    ],
)
def test_what_cannot_be_rewritten_raises(message):
    with pytest.raises(hello.HelloRewriteError):
        hello.rewrite_reply(message, hello.make_swap({}))


# ---- the gate


def hello_request(request_id: int, legacy: bool = False, exhaust: bool = False) -> bytes:
    if legacy:
        return wire.encode_op_query({"isMaster": 1}, request_id=request_id)
    flags = wire.EXHAUST_ALLOWED if exhaust else 0
    return wire.encode_op_msg({"hello": 1, "$db": "admin"}, flags=flags, request_id=request_id)


def gate_pair(chunk_size: int, max_hello: int = hellogate.DEFAULT_MAX_HELLO_BYTES):
    ids: OrderedDict = OrderedDict()
    out: list[bytes] = []
    errors: list[str] = []
    counts = []
    gate = hellogate.ReplyGate(
        ids,
        out.append,
        hello.make_swap({"db1:27017": "127.0.0.1:1", "db2:27017": "127.0.0.1:2"}),
        lambda: counts.append(1),
        lambda reason, detail: errors.append(reason),
        max_hello,
    )
    watch = hellogate.RequestWatch(ids)

    def feed(feedee, data):
        for i in range(0, len(data), chunk_size):
            feedee.feed(data[i : i + chunk_size])

    return gate, watch, out, errors, counts, feed


HELLO_DOC = {"isWritablePrimary": True, "hosts": ["db1:27017", "db2:27017"], "primary": "db1:27017", "ok": 1.0}


@pytest.mark.parametrize("chunk", [1, 7, 16, 100, 100_000])
def test_gate_rewrites_hello_and_forwards_the_rest_unchanged(chunk):
    gate, watch, out, errors, counts, feed = gate_pair(chunk)
    requests = hello_request(11) + wire.encode_op_msg({"find": "c", "$db": "x"}, request_id=12)
    requests += hello_request(13, legacy=True)
    feed(watch, requests)
    other = wire.encode_op_msg({"cursor": {"firstBatch": [{"hosts": ["db1:27017"]}], "id": 0}, "ok": 1}, response_to=12)
    replies = wire.encode_op_msg(HELLO_DOC, response_to=11) + other + wire.encode_op_reply([HELLO_DOC], response_to=13)
    feed(gate, replies)
    messages, rest = wire.split_messages(b"".join(out))
    assert rest == b"" and len(messages) == 3
    assert decode(messages[0])["hosts"] == ["127.0.0.1:1", "127.0.0.1:2"]
    assert messages[1] == other  # not a hello reply: byte-exact, although it holds an address-like field
    assert decode(messages[2])["primary"] == "127.0.0.1:1"
    assert len(counts) == 2 and errors == []
    assert not gate.mid_message


def test_gate_writes_other_replies_at_once():
    gate, watch, out, *_ = gate_pair(100_000)
    watch.feed(hello_request(1))
    other = wire.encode_op_msg({"ok": 1}, response_to=5)
    gate.feed(other[:30])
    assert b"".join(out) == other[:30]  # header whole, so the body goes out as it comes
    gate.feed(other[30:])
    assert b"".join(out) == other
    reply = wire.encode_op_msg(HELLO_DOC, response_to=1)
    gate.feed(reply[:40])
    assert b"".join(out) == other  # a hello reply is held until complete
    gate.feed(reply[40:])
    assert decode(b"".join(out)[len(other) :])["primary"] == "127.0.0.1:1"


@pytest.mark.parametrize("chain", ["previous", "original"])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_exhaust_stream_is_rewritten_and_its_chaining_kept(chain, chunk):
    gate, watch, out, errors, counts, feed = gate_pair(chunk)
    feed(watch, hello_request(21, exhaust=True))
    stream = []
    rto = 21
    for i in range(4):
        raw = wire.encode_op_msg(HELLO_DOC, flags=wire.MORE_TO_COME if i < 3 else 0, response_to=rto)
        stream.append(raw)
        if chain == "previous":
            rto = struct.unpack_from("<i", raw, 4)[0]
    feed(gate, b"".join(stream))
    messages, _ = wire.split_messages(b"".join(out))
    assert len(messages) == 4 and len(counts) == 4 and errors == []
    for sent, got in zip(stream, messages):
        assert got[4:12] == sent[4:12]  # requestID and responseTo untouched
        assert wire.decode_message(got).more_to_come == wire.decode_message(sent).more_to_come
        assert decode(got)["hosts"] == ["127.0.0.1:1", "127.0.0.1:2"]


def test_oversized_or_compressed_hello_is_forwarded_unchanged_and_counted():
    gate, watch, out, errors, counts, feed = gate_pair(1000, max_hello=100)
    feed(watch, hello_request(1) + hello_request(2))
    big = wire.encode_op_msg(dict(HELLO_DOC, pad="x" * 200), response_to=1)
    compressed = wire.compress_message(wire.encode_op_msg(HELLO_DOC, response_to=2), "zlib")
    feed(gate, big + compressed)
    assert b"".join(out) == big + compressed
    assert errors == ["hello_too_large", "hello_compressed"] and counts == []


def test_request_watch_reads_command_names():
    assert hellogate.command_name(hello_request(1)) == b"hello"
    assert hellogate.command_name(hello_request(1, legacy=True)) == b"ismaster"
    assert hellogate.command_name(wire.encode_op_msg({"insert": "c"})) == b"insert"
    assert hellogate.command_name(wire.compress_message(hello_request(1), "zlib")) is None


def test_a_chunk_without_hello_replies_is_written_once_unchanged():
    gate, watch, out, errors, counts, feed = gate_pair(100_000)
    watch.feed(hello_request(1))
    chunk = b"".join(wire.encode_op_msg({"ok": 1, "i": i}, response_to=100 + i) for i in range(3))
    gate.feed(chunk)
    assert out == [chunk]


@settings(max_examples=400, deadline=None)
@given(hello_docs(), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4))
def test_corrupted_hello_replies_raise_only_the_rewrite_error(case, flips):
    doc, members = case
    raw = bytearray(wire.encode_op_msg(doc, response_to=1))
    for pos, value in flips:
        raw[16 + pos % (len(raw) - 16)] = value  # the body; the header's length stays right
    try:
        out, _ = hello.rewrite_reply(bytes(raw), hello.make_swap(listener_map(members)))
    except hello.HelloRewriteError:
        return
    assert struct.unpack_from("<i", out)[0] == len(out)
