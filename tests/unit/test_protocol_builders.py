"""The messages the proxy builds decode with pymongo's bson and frame exactly (property tests)."""

import struct

import bson
from hypothesis import given
from hypothesis import strategies as st

from mongoproxy import wire
from mongoproxy._bson_parser import scan_body
from mongoproxy.protocol import builders

ids = st.integers(min_value=-(2**31), max_value=2**31 - 1)
codes = st.one_of(st.sampled_from(sorted(builders.CODE_NAMES)), st.integers(min_value=-(2**31), max_value=2**31 - 1))
texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=200)
labels = st.lists(st.sampled_from(sorted(builders.ERROR_LABELS)), max_size=3, unique=True)


def split(message: bytes) -> tuple[tuple, bytes]:
    header = struct.unpack_from("<iiii", message)
    assert header[0] == len(message)
    return header, message[16:]


@given(ids, ids, codes, texts, labels)
def test_error_reply_is_an_op_msg_error(request_id, response_to, code, errmsg, error_labels):
    msg = builders.error_reply(request_id, response_to, code, errmsg, error_labels)
    (length, rid, rto, opcode), body = split(msg)
    assert (rid, rto, opcode) == (request_id, response_to, wire.OP_MSG)
    assert body[:5] == b"\x00\x00\x00\x00\x00"  # flagBits 0, then one kind-0 section
    doc = bson.decode(body[5:])
    assert doc["ok"] == 0.0 and doc["code"] == code and doc["errmsg"] == errmsg
    assert doc["codeName"] == (builders.CODE_NAMES.get(code) or f"Location{code}")
    assert doc.get("errorLabels", []) == error_labels
    result = scan_body(opcode, True, body)  # the proxy's own scanner reads it as a server's reply
    assert (result.ok, result.code, result.code_name) == (0.0, code, doc["codeName"])


@given(ids, ids, codes, texts)
def test_write_error_reply_is_ok_with_one_write_error(request_id, response_to, code, errmsg):
    (_, _, rto, opcode), body = split(builders.write_error_reply(request_id, response_to, code, errmsg))
    doc = bson.decode(body[5:])
    assert (rto, opcode) == (response_to, wire.OP_MSG)
    assert doc == {"n": 0, "writeErrors": [{"index": 0, "code": code, "errmsg": errmsg}], "ok": 1.0}
    assert scan_body(opcode, True, body).write_error_code == code


@given(ids, ids, codes, texts, labels, st.booleans())
def test_query_error_reply_is_an_op_reply(request_id, response_to, code, errmsg, error_labels, command):
    msg = builders.query_error_reply(request_id, response_to, code, errmsg, error_labels, command)
    (_, _, rto, opcode), body = split(msg)
    flags, cursor_id, starting_from, returned = struct.unpack_from("<iqii", body)
    assert (rto, opcode, cursor_id, starting_from, returned) == (response_to, wire.OP_REPLY, 0, 0, 1)
    (doc,) = bson.decode_all(body[20:])
    if command:
        assert flags == 0 and doc["ok"] == 0.0 and doc["code"] == code and doc["errmsg"] == errmsg
    else:
        assert flags == builders.QUERY_FAILURE and doc == {"$err": errmsg, "code": code}


def test_code_table_names_the_drill_codes():
    assert builders.code_name(91) == "ShutdownInProgress"
    assert builders.code_name(10107) == "NotWritablePrimary"
    assert builders.code_name(11000) == "DuplicateKey"
    assert builders.code_name(424242) == ""
