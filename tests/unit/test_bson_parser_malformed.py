"""Malformed bodies raise DecodeError with a reason from the fixed vocabulary, and nothing else."""

from __future__ import annotations

import struct

import bson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mongoproxy import _bson_parser as bp
from mongoproxy.errors import DecodeError
from tests.unit.test_bson_parser import (
    command_docs,
    cstr,
    i32,
    i64,
    op_msg,
    op_query,
    op_reply,
    pymongo_find,
    reply_docs,
    sequences,
)


def outcome(op: int, is_reply: bool, body: bytes, cuts=(), body_length: int | None = None):
    """("ok", fields) or ("error", reason); feeding must always make progress or raise."""
    s = bp.BodyScanner()
    length = len(body) if body_length is None else body_length
    try:
        s.reset(op, is_reply, length)
        prev = 0
        for c in sorted({c for c in cuts if 0 < c < len(body)}) + [len(body)]:
            piece = body[prev:c]
            took = s.feed(piece)
            # all of it, or exactly up to the body's end
            assert took == min(len(piece), length - (s.consumed - took))
            prev = c
        if not s.done:
            return ("incomplete", s.consumed)
        return ("ok", s.result().as_dict())
    except DecodeError as exc:
        assert exc.reason in bp.DECODE_REASONS
        return ("error", exc.reason)


def reason(op: int, is_reply: bool, body: bytes, **kw) -> str:
    kind, value = outcome(op, is_reply, body, **kw)
    assert kind == "error", value
    return value


def doc(elements: bytes) -> bytes:
    return i32(len(elements) + 5) + elements + b"\x00"


def msg(raw_doc: bytes, flags: int = 0) -> bytes:
    return struct.pack("<I", flags) + b"\x00" + raw_doc


def everywhere(op: int, is_reply: bool, body: bytes) -> str:
    """The same reason whole, for every two-way split, and bytewise."""
    whole = reason(op, is_reply, body)
    for c in range(1, len(body)):
        assert reason(op, is_reply, body, cuts=[c]) == whole, c
    assert reason(op, is_reply, body, cuts=range(len(body))) == whole
    return whole


FIND = b"\x02find\x00" + i32(2) + b"c\x00"


# -- documents -----------------------------------------------------------------


def test_document_length_below_five():
    assert everywhere(bp.OP_MSG, False, msg(i32(4) + b"\x00")) == "bad_length"
    assert everywhere(bp.OP_MSG, False, msg(i32(-1) + b"\x00")) == "bad_length"


def test_document_longer_than_body():
    raw = doc(FIND)
    assert everywhere(bp.OP_MSG, False, msg(i32(len(raw) + 1) + raw[4:])) == "bad_length"
    # and the declared body is longer than what arrives: the stream just waits for more
    assert outcome(bp.OP_MSG, False, msg(raw), body_length=len(msg(raw)) + 3)[0] == "incomplete"


def test_nested_document_past_its_parent():
    inner = doc(b"\x10a\x00" + i32(1))
    bad = b"\x03filter\x00" + i32(len(inner) + 3) + inner[4:]
    assert everywhere(bp.OP_MSG, False, msg(doc(FIND + bad))) == "bad_length"
    # a skipped (not on the spec) subdocument too
    bad = b"\x03other\x00" + i32(len(inner) + 3) + inner[4:]
    assert everywhere(bp.OP_MSG, False, msg(doc(FIND + bad))) == "bad_length"


def test_missing_and_early_terminators():
    raw = bytearray(doc(FIND + b"\x10limit\x00" + i32(1)))
    raw[-1] = 0x01
    assert everywhere(bp.OP_MSG, False, msg(bytes(raw))) == "missing_terminator"
    # a skipped subdocument whose declared last byte is not 0x00
    sub = bytearray(doc(b"\x10a\x00" + i32(1)))
    sub[-1] = 0x07
    assert everywhere(bp.OP_MSG, False, msg(doc(FIND + b"\x03lsid\x00" + bytes(sub)))) == "missing_terminator"
    # a 0x00 type byte before the declared end
    early = i32(len(FIND) + 5 + 6) + FIND + b"\x00" + b"\x10a\x00" + b"\x00" * 3 + b"\x00"
    assert everywhere(bp.OP_MSG, False, msg(early)) == "missing_terminator"


def test_strings():
    # zero length, for a captured and for a skipped string
    assert everywhere(bp.OP_MSG, False, msg(doc(b"\x02find\x00" + i32(0)))) == "string_not_terminated"
    assert everywhere(bp.OP_MSG, False, msg(doc(FIND + b"\x02x\x00" + i32(0)))) == "string_not_terminated"
    # last byte not NUL, captured and skipped (long strings too)
    assert everywhere(bp.OP_MSG, False, msg(doc(b"\x02find\x00" + i32(2) + b"cc"))) == "string_not_terminated"
    assert everywhere(bp.OP_MSG, False, msg(doc(FIND + b"\x02x\x00" + i32(3) + b"abc"))) == "string_not_terminated"
    body = msg(doc(FIND + b"\x02$db\x00" + i32(700) + b"d" * 700))
    assert reason(bp.OP_MSG, False, body) == "string_not_terminated"
    assert reason(bp.OP_MSG, False, body, cuts=range(0, len(body), 50)) == "string_not_terminated"
    # a string running past its document
    assert everywhere(bp.OP_MSG, False, msg(doc(FIND + b"\x02x\x00" + i32(40) + b"ab\x00"))) == "bad_length"
    # DBPointer: its 12 trailing bytes must fit too
    assert everywhere(bp.OP_MSG, False, msg(doc(FIND + b"\x0cp\x00" + i32(2) + b"a\x00" + b"\x00" * 6))) == "bad_length"


def test_keys_and_cstrings_must_end_inside_their_container():
    assert everywhere(bp.OP_MSG, False, msg(i32(12) + b"\x02findxx\x00")) == "string_not_terminated"
    assert everywhere(bp.OP_MSG, False, msg(doc(FIND + b"\x0bre\x00abc\x00ix"))) == "string_not_terminated"
    assert everywhere(bp.OP_MSG, False, msg(doc(FIND + b"\x0a" + b"k" * 100))) == "string_not_terminated"


def test_unknown_type():
    for t in (0x00 + 0x14, 0x20, 0x80, 0xFE):
        assert everywhere(bp.OP_MSG, False, msg(doc(FIND + bytes([t]) + b"x\x00"))) == "unknown_type"


def test_fixed_values_past_the_document():
    assert everywhere(bp.OP_MSG, False, msg(doc(FIND + b"\x12n\x00" + b"\x00" * 4))) == "bad_length"
    assert everywhere(bp.OP_MSG, True, msg(doc(b"\x01ok\x00" + b"\x00" * 7))) == "bad_length"


def test_binary_and_code_with_scope_lengths():
    assert everywhere(bp.OP_MSG, False, msg(doc(FIND + b"\x05b\x00" + i32(-1) + b"\x00"))) == "bad_length"
    assert everywhere(bp.OP_MSG, False, msg(doc(FIND + b"\x05b\x00" + i32(9) + b"\x00abc"))) == "bad_length"
    assert everywhere(bp.OP_MSG, False, msg(doc(FIND + b"\x0fc\x00" + i32(13) + b"\x00" * 9))) == "bad_length"


def test_invalid_utf8_in_captured_strings_only():
    bad = b"\xff\xfe"
    assert everywhere(bp.OP_MSG, False, msg(doc(b"\x02find\x00" + i32(3) + bad + b"\x00"))) == "invalid_utf8"
    assert everywhere(bp.OP_MSG, False, msg(doc(b"\x10fi" + bad + b"nd\x00" + i32(1)))) == "invalid_utf8"
    nested = doc(b"\x02traceparent\x00" + i32(3) + bad + b"\x00")
    assert everywhere(bp.OP_MSG, False, msg(doc(FIND + b"\x03comment\x00" + nested))) == "invalid_utf8"
    assert everywhere(bp.OP_MSG, True, msg(doc(b"\x02errmsg\x00" + i32(3) + b"a\xc3\x00"))) == "invalid_utf8"
    # a skipped string and a skipped key may hold anything
    assert outcome(bp.OP_MSG, False, msg(doc(FIND + b"\x02x" + bad + b"\x00" + i32(3) + bad + b"\x00")))[0] == "ok"
    # a captured string cut at 512 bytes is only checked up to the cut
    long = b"a" * 600 + bad
    assert outcome(bp.OP_MSG, False, msg(doc(FIND + b"\x02$db\x00" + i32(len(long) + 1) + long + b"\x00")))[0] == "ok"


# -- message layouts -----------------------------------------------------------


def test_op_msg_sections():
    body = op_msg({"insert": "c"}) + b"\x02" + i32(5)
    assert everywhere(bp.OP_MSG, False, body) == "bad_section_kind"
    seq = cstr("documents") + bson.encode({"a": 1})
    assert everywhere(bp.OP_MSG, False, op_msg({"insert": "c"}) + b"\x01" + i32(len(seq) + 40) + seq) == "bad_length"
    assert everywhere(bp.OP_MSG, False, op_msg({"insert": "c"}) + b"\x01" + i32(3) + seq) == "bad_length"
    # the section size cuts a document in two
    assert everywhere(bp.OP_MSG, False, op_msg({"insert": "c"}) + b"\x01" + i32(len(seq) + 2) + seq) == "bad_length"
    # identifier without NUL inside the section
    assert everywhere(bp.OP_MSG, False, op_msg({"insert": "c"}) + b"\x01" + i32(8) + b"docu") == "string_not_terminated"
    # a kind-1 size that does not fit
    assert everywhere(bp.OP_MSG, False, op_msg({"insert": "c"}) + b"\x01" + b"\x10\x00") == "truncated"


def test_write_sequence_first_document_is_validated_where_it_is_read():
    def seq(ident: str, *docs: bytes) -> bytes:
        payload = cstr(ident) + b"".join(docs)
        return b"\x01" + i32(4 + len(payload)) + payload

    head = op_msg({"delete": "c"})
    bad_type = doc(b"\x03q\x00" + doc(b"\x20x\x00") + b"\x10limit\x00" + i32(0))
    bad_utf8 = doc(b"\x03q\x00" + doc(b"\x02$comment\x00" + i32(3) + b"\xff\xfe\x00"))
    q_too_long = doc(b"\x03q\x00" + i32(40) + b"\x00")
    good = bson.encode({"q": {}, "limit": 0})
    assert everywhere(bp.OP_MSG, False, head + seq("deletes", bad_type)) == "unknown_type"
    assert everywhere(bp.OP_MSG, False, head + seq("updates", bad_utf8)) == "invalid_utf8"
    assert everywhere(bp.OP_MSG, False, seq("deletes", q_too_long) + head) == "bad_length"
    # only the first document of an `updates`/`deletes` sequence is read; the rest are skipped by length
    for body in (
        head + seq("documents", bad_type),
        head + seq("deletes", good, bad_type, bad_utf8),
        head + seq("deletesx", bad_utf8),
        head + seq("Updates", bad_utf8),
    ):
        assert outcome(bp.OP_MSG, False, body)[0] == "ok"
        assert outcome(bp.OP_MSG, False, body, cuts=range(len(body)))[0] == "ok"
    # a reply's kind-1 documents are never read
    assert outcome(bp.OP_MSG, True, op_msg({"ok": 1}) + seq("deletes", bad_type))[0] == "ok"


def test_op_msg_flags_and_checksum_need_room():
    assert everywhere(bp.OP_MSG, False, b"\x00\x00") == "truncated"
    assert reason(bp.OP_MSG, False, b"") == "truncated"
    assert everywhere(bp.OP_MSG, False, struct.pack("<I", 1) + b"\x00\x00") == "truncated"
    # checksum flag set but the kind-0 document runs into the last four bytes
    body = op_msg({"find": "c"}, flags=1)
    assert everywhere(bp.OP_MSG, False, body) == "bad_length"


def test_legacy_layouts():
    ns = cstr("a.b")
    assert everywhere(bp.OP_GET_MORE, False, i32(0) + ns + i32(0) + i64(1) + b"x") == "trailing_bytes"
    assert everywhere(bp.OP_GET_MORE, False, i32(0) + ns + i32(0) + b"\x01\x02") == "truncated"
    assert everywhere(bp.OP_GET_MORE, False, i32(0) + b"a.b") == "truncated"  # namespace without NUL
    assert everywhere(bp.OP_KILL_CURSORS, False, i32(0) + i32(2) + i64(1)) == "truncated"
    assert everywhere(bp.OP_KILL_CURSORS, False, i32(0) + i32(-1)) == "bad_length"
    assert everywhere(bp.OP_KILL_CURSORS, False, i32(0) + i32(1) + i64(1) + i64(2)) == "trailing_bytes"
    assert everywhere(bp.OP_REPLY, True, op_reply([{"a": 1}], number_returned=2)) == "truncated"
    assert everywhere(bp.OP_REPLY, True, op_reply([{"a": 1}, {"b": 2}], number_returned=1)) == "trailing_bytes"
    assert everywhere(bp.OP_REPLY, True, op_reply([], number_returned=-3)) == "bad_length"
    q = op_query("a.$cmd", {"ping": 1}, selector={"x": 1})
    assert everywhere(bp.OP_QUERY, False, q + bson.encode({})) == "trailing_bytes"
    assert everywhere(bp.OP_QUERY, False, q[:-3]) == "bad_length"
    upd = i32(0) + ns + i32(0) + bson.encode({"a": 1})
    assert everywhere(bp.OP_UPDATE, False, upd) == "truncated"  # the update document is missing
    assert everywhere(bp.OP_INSERT, False, i32(0) + ns + bson.encode({"a": 1}) + b"\x05\x00") == "truncated"
    assert everywhere(bp.OP_COMMAND, False, cstr("db") + cstr("ping") + bson.encode({"ping": 1})) == "truncated"


def test_unknown_opcode_and_error_state():
    s = bp.BodyScanner()
    with pytest.raises(DecodeError) as info:
        s.reset(2012, False, 10)  # OP_COMPRESSED belongs to protocol/framing.py
    assert info.value.reason == "unknown_opcode"
    with pytest.raises(DecodeError):
        s.feed(b"\x00" * 10)
    body = msg(doc(FIND + b"\x20x\x00"))
    s.reset(bp.OP_MSG, False, len(body))
    with pytest.raises(DecodeError) as info:
        s.feed(body)
    assert info.value.reason == "unknown_type"
    with pytest.raises(DecodeError) as again:
        s.feed(b"")
    assert again.value.reason == "unknown_type"
    # reset recovers
    ok = op_msg({"ping": 1})
    s.reset(bp.OP_MSG, False, len(ok))
    s.feed(ok)
    assert s.result().command == "ping"


# -- mutations of valid bodies -------------------------------------------------


def mutate(data, body: bytes) -> bytes:
    b = bytearray(body)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        kind = data.draw(st.sampled_from(["byte", "int32", "delete", "insert", "truncate"]), label="kind")
        at = data.draw(st.integers(0, max(0, len(b) - 1)), label="at")
        if kind == "byte" and b:
            b[at] = data.draw(st.integers(0, 255))
        elif kind == "int32" and len(b) >= 4:
            at = min(at, len(b) - 4)
            v = data.draw(
                st.one_of(
                    st.integers(-(2**31), 2**31 - 1),
                    st.integers(-8, 8),
                    st.just(int.from_bytes(b[at : at + 4], "little", signed=True) + 1),
                )
            )
            b[at : at + 4] = struct.pack("<i", v)
        elif kind == "delete":
            del b[at : at + data.draw(st.integers(1, 8))]
        elif kind == "insert":
            b[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:
            del b[at:]
    return bytes(b)


MUTATIONS = settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
OPS = st.sampled_from(
    [
        bp.OP_MSG,
        bp.OP_QUERY,
        bp.OP_REPLY,
        bp.OP_INSERT,
        bp.OP_UPDATE,
        bp.OP_DELETE,
        bp.OP_GET_MORE,
        bp.OP_KILL_CURSORS,
        bp.OP_COMMAND,
        bp.OP_COMMANDREPLY,
    ]
)


@st.composite
def valid_bodies(draw):
    op = draw(OPS)
    if op == bp.OP_MSG:
        if draw(st.booleans()):
            return op, True, op_msg(draw(reply_docs()), checksum=draw(st.booleans()))
        return op, False, op_msg(draw(command_docs()), draw(sequences), checksum=draw(st.booleans()))
    if op == bp.OP_QUERY:
        return op, False, op_query(draw(st.sampled_from(["admin.$cmd", "db.coll"])), draw(command_docs()))
    if op == bp.OP_REPLY:
        return op, True, op_reply([draw(reply_docs()), {"x": 1}])
    if op == bp.OP_INSERT:
        return op, False, i32(0) + cstr("db.c") + bson.encode({"a": 1}) + bson.encode({"b": "x"})
    if op == bp.OP_UPDATE:
        return op, False, i32(0) + cstr("db.c") + i32(0) + bson.encode({"a": 1}) + bson.encode({"$set": {"b": 1}})
    if op == bp.OP_DELETE:
        return op, False, i32(0) + cstr("db.c") + i32(0) + bson.encode({"a": 1})
    if op == bp.OP_GET_MORE:
        return op, False, i32(0) + cstr("db.c") + i32(0) + i64(7)
    if op == bp.OP_KILL_CURSORS:
        return op, False, i32(0) + i32(2) + i64(7) + i64(8)
    if op == bp.OP_COMMAND:
        return op, False, cstr("db") + cstr("find") + bson.encode(draw(command_docs())) + bson.encode({})
    return op, True, bson.encode(draw(reply_docs())) + bson.encode({})


@MUTATIONS
@given(case=valid_bodies(), data=st.data())
def test_mutated_bodies_raise_decode_error_or_scan_and_chunking_never_matters(case, data):
    op, is_reply, body = case
    assert outcome(op, is_reply, body)[0] == "ok"
    bad = mutate(data, body)
    whole = outcome(op, is_reply, bad)
    assert whole[0] in ("ok", "error")
    cuts = data.draw(st.lists(st.integers(0, len(bad)), max_size=12), label="cuts")
    assert outcome(op, is_reply, bad, cuts=cuts) == whole
    if len(bad) <= 200:
        assert outcome(op, is_reply, bad, cuts=range(len(bad))) == whole


@MUTATIONS
@given(body=st.binary(max_size=120), op=OPS, is_reply=st.booleans())
def test_random_bytes_never_crash(body, op, is_reply):
    whole = outcome(op, is_reply, body)
    assert whole[0] in ("ok", "error")
    assert outcome(op, is_reply, body, cuts=range(len(body))) == whole


def test_every_truncation_of_a_find_command():
    body = op_msg(pymongo_find())
    for k in range(len(body)):
        kind, value = outcome(bp.OP_MSG, False, body[:k])
        # an OP_MSG body ends cleanly only after the flags (no sections) or after a whole section
        assert kind == "error" or k == 4, (k, value)
