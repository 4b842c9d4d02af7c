"""The streaming BSON scanner agrees with pymongo's bson (the oracle), however the bytes are chunked."""

from __future__ import annotations

import math
import struct
import uuid

import bson
import bson.codec_options
import pymongo.message
import pytest
from bson import Code, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex, Timestamp
from bson.binary import Binary
from bson.codec_options import CodecOptions, DatetimeConversion
from bson.datetime_ms import DatetimeMS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mongoproxy import _bson_parser as bp

MAX = bp.MAX_STRING
MISSING = object()
ORACLE_OPTIONS = CodecOptions(datetime_conversion=DatetimeConversion.DATETIME_MS)


def decode(raw: bytes) -> dict:
    """The oracle: pymongo's bson decoder (datetimes kept as milliseconds, so any int64 decodes)."""
    return bson.decode(raw, codec_options=ORACLE_OPTIONS)


# Every field the scanner can fill; `documents` and `flags` default to 0, the rest to None.
RESULT_FIELDS = (
    "command",
    "collection",
    "database",
    "namespace",
    "cursor_id",
    "comment",
    "comment_traceparent",
    "comment_tracestate",
    "app_name",
    "driver_name",
    "driver_version",
    "compression",
    "ok",
    "code",
    "code_name",
    "errmsg",
    "cursor_ns",
    "returned",
    "n",
    "n_modified",
    "upserted",
    "write_errors",
    "write_error_code",
    "write_error_code_name",
    "write_concern_error_code",
    "write_concern_error_code_name",
    "last_error_n",
    "set_name",
    "me",
    "max_wire_version",
)


# -- message bodies ------------------------------------------------------------


def i32(v: int) -> bytes:
    return struct.pack("<i", v)


def i64(v: int) -> bytes:
    return struct.pack("<q", v)


def cstr(s: str | bytes) -> bytes:
    return (s.encode() if isinstance(s, str) else s) + b"\x00"


def op_msg(
    doc: dict | bytes, seqs=(), checksum: bool = False, flags: int = 0, crc: int = 0xDEADBEEF, kind0_at: int = 0
) -> bytes:
    """An OP_MSG body: flagBits, sections (the kind-0 one after `kind0_at` kind-1 sequences), optional CRC."""
    raw = doc if isinstance(doc, bytes) else bson.encode(doc)
    sections = []
    for ident, docs in seqs:
        payload = cstr(ident) + b"".join(d if isinstance(d, bytes) else bson.encode(d) for d in docs)
        sections.append(b"\x01" + i32(4 + len(payload)) + payload)
    sections.insert(kind0_at, b"\x00" + raw)
    out = [struct.pack("<I", flags | (1 if checksum else 0))] + sections
    if checksum:
        out.append(struct.pack("<I", crc))
    return b"".join(out)


def op_query(ns: str, doc: dict | bytes, flags: int = 0, selector: dict | None = None) -> bytes:
    raw = doc if isinstance(doc, bytes) else bson.encode(doc)
    sel = bson.encode(selector) if selector is not None else b""
    return i32(flags) + cstr(ns) + i32(0) + i32(-1) + raw + sel


def op_reply(docs: list, cursor_id: int = 0, flags: int = 8, number_returned: int | None = None) -> bytes:
    raws = [d if isinstance(d, bytes) else bson.encode(d) for d in docs]
    nret = len(raws) if number_returned is None else number_returned
    return i32(flags) + i64(cursor_id) + i32(0) + i32(nret) + b"".join(raws)


def op_command(db: str, name: str, args: dict, metadata: dict | None = None, inputs=()) -> bytes:
    return (
        cstr(db)
        + cstr(name)
        + bson.encode(args)
        + bson.encode(metadata or {})
        + b"".join(bson.encode(d) for d in inputs)
    )


def op_commandreply(reply: dict, metadata: dict | None = None, outputs=()) -> bytes:
    return bson.encode(reply) + bson.encode(metadata or {}) + b"".join(bson.encode(d) for d in outputs)


# -- feeding -------------------------------------------------------------------


def scan(op: int, is_reply: bool, body: bytes, cuts=(), scanner: bp.BodyScanner | None = None, **kw):
    """Feed body in pieces split at `cuts`; every feed must consume all it is offered."""
    s = scanner or bp.BodyScanner()
    s.reset(op, is_reply, len(body), **kw)
    prev = 0
    for c in sorted({c for c in cuts if 0 < c < len(body)}) + [len(body)]:
        piece = body[prev:c]
        assert not s.done
        assert s.feed(piece) == len(piece)
        assert s.consumed == c
        prev = c
    assert s.done
    return s.result()


def scan_bytewise(op: int, is_reply: bool, body: bytes, **kw):
    s = bp.BodyScanner()
    s.reset(op, is_reply, len(body), **kw)
    for j in range(len(body)):
        assert s.feed(body[j : j + 1]) == 1
    assert s.done
    return s.result()


def fields(r) -> dict:
    out = {}
    for name in RESULT_FIELDS:
        v = getattr(r, name)
        if isinstance(v, float) and math.isnan(v):
            v = "NaN"
        out[name] = v
    out["documents"] = r.documents
    return out


def expected(**kw) -> dict:
    out = dict.fromkeys(RESULT_FIELDS)
    out["documents"] = 0
    for k, v in kw.items():
        assert k in out, k
        out[k] = v
    if isinstance(out["ok"], float) and math.isnan(out["ok"]):
        out["ok"] = "NaN"
    return out


def check_chunkings(op: int, is_reply: bool, body: bytes, exp: dict, data=None, every_split_max: int = 160):
    """The same fields whatever the chunking: whole, random splits, every split (small), bytewise."""
    assert fields(scan(op, is_reply, body)) == exp
    if data is not None:
        cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=10), label="cuts")
        assert fields(scan(op, is_reply, body, cuts)) == exp
    if len(body) <= every_split_max:
        s = bp.BodyScanner()
        for c in range(1, len(body)):
            assert fields(scan(op, is_reply, body, [c], scanner=s)) == exp
        assert fields(scan_bytewise(op, is_reply, body)) == exp


# -- the oracle ----------------------------------------------------------------


def cut(s: str) -> str:
    """A captured string: at most MAX bytes, cut at a UTF-8 character boundary."""
    b = s.encode()
    if len(b) > MAX:
        c = MAX
        while c > 0 and (b[c] & 0xC0) == 0x80:
            c -= 1
        b = b[:c]
    return b.decode()


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def as_int(v):
    """int32/int64/double/bool into an int field."""
    if isinstance(v, (bool, int)):
        return int(v)
    if type(v) is float:
        return int(v) if math.isfinite(v) else None
    return None


def as_float(v):
    if isinstance(v, (bool, int)) or type(v) is float:
        return float(v)
    return None


def text(v):
    return cut(v) if type(v) is str else None


def walk(v, path: str):
    """Follow a dotted path through documents and arrays (array elements are keyed "0", "1", ...)."""
    for k in path.split("."):
        if isinstance(v, dict):
            v = v.get(k, MISSING)
        elif isinstance(v, list) and k.isdigit() and str(int(k)) == k and int(k) < len(v):
            v = v[int(k)]
        else:
            return MISSING
        if v is MISSING:
            return MISSING
    return v


def strlist(v):
    return [cut(x) for x in v if type(x) is str][:16] if isinstance(v, list) else None


def expect_request(
    doc: dict, documents: int = 0, legacy_before: str | None = None, legacy_after: str | None = None
) -> dict:
    """What the scanner should extract from a decoded command document.

    legacy_before/legacy_after: the first legacy `$comment` of the kind-1 sections before/after it.
    """
    e: dict = {}
    items = list(doc.items())
    if items:
        k0, v0 = items[0]
        e["command"] = cut(k0)
        if type(v0) is str:
            e["collection"] = cut(v0)
        if k0 == "getMore" and is_int(v0):
            e["cursor_id"] = int(v0)
    legacy = legacy_before
    for k, v in items[1:]:
        found = MISSING
        if k == "collection" and type(v) is str and "collection" not in e:
            e["collection"] = cut(v)
        elif k == "$db" and type(v) is str:
            e["database"] = cut(v)
        elif k == "comment":
            if type(v) is str:
                e["comment"] = cut(v)
            for sub, name in (("traceparent", "comment_traceparent"), ("tracestate", "comment_tracestate")):
                if text(walk(v, sub)) is not None:
                    e[name] = text(walk(v, sub))
        elif k in ("filter", "q", "query"):
            found = walk(v, "$comment")
        elif k == "pipeline":
            found = walk(v, "0.$match.$comment")
        elif k in ("updates", "deletes"):
            found = walk(v, "0.q.$comment")
        elif k == "client":
            for path, name in (
                ("application.name", "app_name"),
                ("driver.name", "driver_name"),
                ("driver.version", "driver_version"),
            ):
                if text(walk(v, path)) is not None:
                    e[name] = text(walk(v, path))
        elif k == "compression" and isinstance(v, list):
            e["compression"] = strlist(v)
        elif k == "cursors" and is_int(walk(v, "0")):
            e["cursor_id"] = int(walk(v, "0"))
        if k in ("documents", "updates", "deletes") and isinstance(v, list):
            documents += len(v)
        if legacy is None and type(found) is str:
            legacy = cut(found)
    if legacy is None:
        legacy = legacy_after
    if "comment" not in e and legacy is not None:
        e["comment"] = legacy
    return expected(documents=documents, **e)


WRITE_SEQUENCES = ("updates", "deletes")


def sequence_legacy(seqs) -> str | None:
    """The first string `q.$comment` among the first documents of `updates`/`deletes` sequences."""
    for ident, docs in seqs:
        if ident in WRITE_SEQUENCES and docs:
            found = walk(decode(docs[0] if isinstance(docs[0], bytes) else bson.encode(docs[0])), "q.$comment")
            if type(found) is str:
                return cut(found)
    return None


def expect_op_msg_request(raw: bytes, seqs, kind0_at: int = 0) -> dict:
    """The oracle for an OP_MSG request: kind-0 `raw` placed after `kind0_at` of the kind-1 `seqs`."""
    return expect_request(
        decode(raw),
        documents=sum(len(docs) for _, docs in seqs),
        legacy_before=sequence_legacy(seqs[:kind0_at]),
        legacy_after=sequence_legacy(seqs[kind0_at:]),
    )


def expect_reply_fields(doc: dict) -> dict:
    e: dict = {}
    for k, v in doc.items():
        if k == "ok" and as_float(v) is not None:
            e["ok"] = as_float(v)
        elif k in ("code", "n", "nModified", "maxWireVersion") and as_int(v) is not None:
            e[{"code": "code", "n": "n", "nModified": "n_modified", "maxWireVersion": "max_wire_version"}[k]] = as_int(
                v
            )
        elif k in ("codeName", "errmsg", "setName", "me") and text(v) is not None:
            e[{"codeName": "code_name", "errmsg": "errmsg", "setName": "set_name", "me": "me"}[k]] = text(v)
        elif k == "cursor" and isinstance(v, dict):
            for ck, cv in v.items():
                if ck == "id" and is_int(cv):
                    e["cursor_id"] = int(cv)
                elif ck == "ns" and text(cv) is not None:
                    e["cursor_ns"] = text(cv)
                elif ck in ("firstBatch", "nextBatch") and isinstance(cv, list):
                    e["returned"] = len(cv)
        elif k == "upserted" and isinstance(v, list):
            e["upserted"] = len(v)
        elif k == "writeErrors":
            if isinstance(v, list):
                e["write_errors"] = len(v)
            if as_int(walk(v, "0.code")) is not None:
                e["write_error_code"] = as_int(walk(v, "0.code"))
            if text(walk(v, "0.codeName")) is not None:
                e["write_error_code_name"] = text(walk(v, "0.codeName"))
        elif k == "writeConcernError":
            if as_int(walk(v, "code")) is not None:
                e["write_concern_error_code"] = as_int(walk(v, "code"))
            if text(walk(v, "codeName")) is not None:
                e["write_concern_error_code_name"] = text(walk(v, "codeName"))
        elif k == "lastErrorObject" and as_int(walk(v, "n")) is not None:
            e["last_error_n"] = as_int(walk(v, "n"))
        elif k == "compression" and isinstance(v, list):
            e["compression"] = strlist(v)
    return e


def expect_reply(doc: dict) -> dict:
    return expected(**expect_reply_fields(doc))


# -- strategies ----------------------------------------------------------------

REQUEST_KEYS = {
    "collection",
    "$db",
    "comment",
    "filter",
    "q",
    "query",
    "pipeline",
    "documents",
    "updates",
    "deletes",
    "client",
    "compression",
    "cursors",
}
REPLY_KEYS = {
    "ok",
    "code",
    "codeName",
    "errmsg",
    "cursor",
    "n",
    "nModified",
    "upserted",
    "writeErrors",
    "writeConcernError",
    "lastErrorObject",
    "setName",
    "me",
    "maxWireVersion",
    "compression",
}
NESTED_KEYS = {
    "traceparent",
    "tracestate",
    "$comment",
    "$match",
    "application",
    "driver",
    "name",
    "version",
    "id",
    "ns",
    "firstBatch",
    "nextBatch",
}

chars = st.characters(blacklist_categories=("Cs",))
key_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
short_text = st.text(chars, max_size=12)
long_text = st.text(chars, min_size=170, max_size=600)  # often > 512 bytes of UTF-8
strings = st.one_of(short_text, short_text, long_text)
extra_keys = st.one_of(
    st.text(key_chars, max_size=8),
    st.text(key_chars, min_size=60, max_size=90),  # longer than the key accumulator
).filter(lambda k: not k.startswith("$") and k not in REQUEST_KEYS | REPLY_KEYS | NESTED_KEYS)
int32s = st.integers(-(2**31), 2**31 - 1)
int64s = st.integers(-(2**63), 2**63 - 1).map(Int64)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    int32s,
    int64s,
    st.floats(),
    strings,
    st.binary(max_size=40),
    st.builds(Binary, st.binary(max_size=20), st.sampled_from([0, 3, 4, 5, 0x80])),
    st.builds(ObjectId, st.binary(min_size=12, max_size=12)),
    st.builds(DatetimeMS, st.integers(-(2**62), 2**62)),
    st.builds(Timestamp, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(Regex, st.text(key_chars, max_size=8), st.sampled_from(["", "i", "imsx"])),
    st.builds(Code, short_text),
    st.builds(Code, short_text, st.dictionaries(st.text(key_chars, max_size=4), int32s, max_size=2)),
    st.just(MinKey()),
    st.just(MaxKey()),
    st.builds(Decimal128, st.sampled_from(["1.5", "-0", "NaN", "1E+300"])),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(extra_keys, inner, max_size=4)),
    max_leaves=10,
)
small_docs = st.dictionaries(extra_keys, scalars, max_size=3)


def opt(strategy):
    """The field with a well-typed value, or any other value."""
    return st.one_of(strategy, values)


def fdict(**optional):
    return st.fixed_dictionaries({}, optional=optional)


filter_docs = fdict(**{"$comment": opt(strings), "x": values})
REQUEST_FIELDS = {
    "collection": opt(strings),
    "$db": opt(strings),
    "comment": st.one_of(strings, fdict(traceparent=opt(strings), tracestate=opt(strings), x=values), values),
    "filter": opt(filter_docs),
    "q": opt(filter_docs),
    "query": opt(filter_docs),
    "pipeline": opt(st.lists(opt(fdict(**{"$match": opt(filter_docs)})), max_size=3)),
    "documents": opt(st.lists(small_docs, max_size=6)),
    "updates": opt(st.lists(opt(fdict(q=opt(filter_docs), u=small_docs)), max_size=4)),
    "deletes": opt(st.lists(opt(fdict(q=opt(filter_docs), limit=int32s)), max_size=4)),
    "client": opt(
        fdict(
            application=opt(fdict(name=opt(strings))),
            driver=opt(fdict(name=opt(strings), version=opt(strings))),
            os=small_docs,
        )
    ),
    "compression": opt(st.lists(opt(st.sampled_from(["zstd", "zlib", "snappy", "noop"]) | strings), max_size=20)),
    "cursors": opt(st.lists(opt(int64s | int32s), max_size=3)),
}
numbers = st.one_of(int32s, int64s, st.floats(allow_nan=False), st.booleans())
batches = st.lists(small_docs, max_size=8)
REPLY_FIELDS = {
    "ok": opt(st.sampled_from([1.0, 0.0, 1, 0, True, False]) | numbers),
    "code": opt(numbers),
    "codeName": opt(strings),
    "errmsg": opt(strings),
    "cursor": opt(
        fdict(id=opt(int64s | int32s), ns=opt(strings), firstBatch=opt(batches), nextBatch=opt(batches), x=values)
    ),
    "n": opt(numbers),
    "nModified": opt(numbers),
    "upserted": opt(st.lists(fdict(index=int32s, _id=values), max_size=4)),
    "writeErrors": opt(
        st.lists(opt(fdict(index=int32s, code=opt(numbers), codeName=opt(strings), errmsg=strings)), max_size=4)
    ),
    "writeConcernError": opt(fdict(code=opt(numbers), codeName=opt(strings), errmsg=strings)),
    "lastErrorObject": opt(fdict(n=opt(numbers), updatedExisting=st.booleans())),
    "setName": opt(strings),
    "me": opt(strings),
    "maxWireVersion": opt(numbers),
    "compression": opt(st.lists(opt(strings), max_size=20)),
}
COMMAND_NAMES = [
    "find",
    "insert",
    "update",
    "delete",
    "aggregate",
    "getMore",
    "killCursors",
    "hello",
    "isMaster",
    "ping",
    "count",
    "distinct",
    "findAndModify",
    "createIndexes",
    "saslStart",
]


@st.composite
def command_docs(draw, fields=REQUEST_FIELDS):
    name = draw(
        st.one_of(
            st.sampled_from(COMMAND_NAMES),
            st.text(key_chars, min_size=1, max_size=10),
            st.text(key_chars, min_size=300, max_size=600),
        )
    )
    first = draw(st.one_of(strings, int64s, int32s, values))
    rest = [(k, draw(v)) for k, v in fields.items() if draw(st.booleans())]
    rest += draw(st.lists(st.tuples(extra_keys, values), max_size=4, unique_by=lambda kv: kv[0]))
    rest = [kv for kv in rest if kv[0] != name]
    return dict([(name, first)] + draw(st.permutations(rest)))


@st.composite
def reply_docs(draw):
    rest = [(k, draw(v)) for k, v in REPLY_FIELDS.items() if draw(st.booleans())]
    rest += draw(st.lists(st.tuples(extra_keys, values), max_size=4, unique_by=lambda kv: kv[0]))
    return dict(draw(st.permutations(rest)))


@st.composite
def permuted(draw, strategy):
    """A document from `strategy` with its keys in a random order."""
    return dict(draw(st.permutations(list(draw(strategy).items()))))


# update/delete statements as drivers send them (q first or not), and documents without a `q`
q_docs = permuted(fdict(**{"$comment": opt(strings), "_id": int32s, "x": values}))
write_stmts = st.one_of(
    permuted(fdict(q=opt(q_docs), u=small_docs, multi=st.booleans(), upsert=st.booleans())),
    permuted(fdict(q=opt(q_docs), limit=st.sampled_from([0, 1]), x=values)),
    small_docs,
)
# near misses must not be read: other names, a case change, a longer name, one longer than KEY_MAX
seq_idents = st.one_of(
    st.sampled_from(["documents", "updates", "deletes"]),
    st.sampled_from(["update", "delete", "Updates", "updatesx", "deletes" + "x" * 70, "", "ops", "q"]),
)
sequences = st.lists(st.tuples(seq_idents, st.lists(st.one_of(write_stmts, small_docs), max_size=4)), max_size=3)
PROPERTY = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


# -- property tests ------------------------------------------------------------


@PROPERTY
@given(doc=command_docs(), seqs=sequences, checksum=st.booleans(), data=st.data())
def test_op_msg_request_matches_oracle(doc, seqs, checksum, data):
    raw = bson.encode(doc)
    kind0_at = data.draw(st.integers(0, len(seqs)), label="kind0_at")
    body = op_msg(raw, seqs, checksum=checksum, crc=0x01020304, kind0_at=kind0_at)
    exp = expect_op_msg_request(raw, seqs, kind0_at)
    check_chunkings(bp.OP_MSG, False, body, exp, data)
    r = scan(bp.OP_MSG, False, body)
    assert r.flags == (1 if checksum else 0)
    assert r.checksum == (0x01020304 if checksum else None)
    assert r.opcode == bp.OP_MSG


# Write commands as drivers send them: small, so every split point is tried; comments everywhere.
short_strings = st.one_of(st.text(chars, max_size=10), st.just("traceparent=00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"))
trace_doc = fdict(traceparent=opt(short_strings), tracestate=short_strings)
small_values = st.one_of(st.none(), int32s, short_strings, st.lists(int32s, max_size=2))
comment_q = permuted(
    st.fixed_dictionaries(
        {"$comment": st.one_of(short_strings, short_strings, small_values)}, optional={"_id": int32s, "x": small_values}
    )
)
statement = permuted(
    st.fixed_dictionaries(
        {"q": st.one_of(comment_q, comment_q, comment_q, small_values)},
        optional={"u": fdict(**{"$set": small_docs}), "limit": st.just(0)},
    )
)
write_seq_docs = st.lists(
    st.one_of(statement, statement, statement, small_docs.filter(lambda d: len(d) <= 1)), min_size=1, max_size=3
)
write_sequences = st.lists(
    st.tuples(st.sampled_from(["updates", "updates", "deletes", "deletes", "documents", "Updates"]), write_seq_docs),
    min_size=1,
    max_size=3,
)
WRITE_COMMAND_FIELDS = {
    "comment": st.one_of(short_strings, short_strings, trace_doc, small_values),
    "$db": short_strings,
    "filter": fdict(**{"$comment": short_strings}),
    "deletes": st.lists(fdict(q=comment_q), max_size=1),
}


@st.composite
def write_commands(draw):
    name = draw(st.sampled_from(["update", "delete", "insert", "find"]))
    rest = [(k, draw(v)) for k, v in WRITE_COMMAND_FIELDS.items() if draw(st.booleans())]
    return dict([(name, draw(short_strings))] + draw(st.permutations(rest)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(doc=write_commands(), seqs=write_sequences, checksum=st.booleans(), data=st.data())
def test_write_sequence_comment_matches_oracle_in_any_section_order(doc, seqs, checksum, data):
    raw = bson.encode(doc)
    kind0_at = data.draw(st.integers(0, len(seqs)), label="kind0_at")
    body = op_msg(raw, seqs, checksum=checksum, kind0_at=kind0_at)
    exp = expect_op_msg_request(raw, seqs, kind0_at)
    check_chunkings(bp.OP_MSG, False, body, exp, data, every_split_max=400)
    # the root string comment wins whatever the order; a sequence's first-document comment is read
    if type(doc.get("comment")) is str:
        assert exp["comment"] == doc["comment"]
    # the same sections as a reply: kind-1 documents of a reply are never read
    assert fields(scan(bp.OP_MSG, True, body))["comment"] is None


@PROPERTY
@given(doc=reply_docs(), checksum=st.booleans(), data=st.data())
def test_op_msg_reply_matches_oracle(doc, checksum, data):
    raw = bson.encode(doc)
    body = op_msg(raw, checksum=checksum, flags=2)
    check_chunkings(bp.OP_MSG, True, body, expect_reply(decode(raw)), data)
    assert scan(bp.OP_MSG, True, body).flags == 2 | (1 if checksum else 0)


@PROPERTY
@given(doc=reply_docs(), more=st.lists(small_docs, max_size=3), cursor_id=int64s, data=st.data())
def test_op_reply_matches_oracle(doc, more, cursor_id, data):
    raw = bson.encode(doc)
    body = op_reply([raw] + more, cursor_id=cursor_id, flags=8)
    e = expect_reply_fields(decode(raw))
    e.setdefault("cursor_id", int(cursor_id))  # the header's, unless the document names one
    e.setdefault("returned", 1 + len(more))
    check_chunkings(bp.OP_REPLY, True, body, expected(**e), data)
    assert scan(bp.OP_REPLY, True, body).flags == 8


@PROPERTY
@given(
    doc=command_docs(),
    db=st.text(key_chars, min_size=1, max_size=10).filter(lambda s: "." not in s),
    selector=st.none() | small_docs,
    data=st.data(),
)
def test_op_query_command_matches_oracle(doc, db, selector, data):
    raw = bson.encode(doc)
    body = op_query(db + ".$cmd", raw, flags=4, selector=selector)
    exp = expect_request(decode(raw))
    exp.update(namespace=db + ".$cmd", database=exp["database"] if exp["database"] is not None else db)
    check_chunkings(bp.OP_QUERY, False, body, exp, data)
    assert scan(bp.OP_QUERY, False, body).flags == 4


@PROPERTY
@given(doc=command_docs(), data=st.data())
def test_op_query_dollar_query_wrapper(doc, data):
    raw = bson.encode({"$query": doc, "$readPreference": {"mode": "secondary"}})
    exp = expect_request(doc)
    exp.update(namespace="admin.$cmd", database=exp["database"] if exp["database"] is not None else "admin")
    check_chunkings(bp.OP_QUERY, False, op_query("admin.$cmd", raw), exp, data)


@PROPERTY
@given(args=command_docs(), inputs=st.lists(small_docs, max_size=3), data=st.data())
def test_op_command_matches_oracle(args, inputs, data):
    body = op_command("appdb", "ignored", args, {"$replData": 1}, inputs)
    exp = expect_request(decode(bson.encode(args)), documents=len(inputs))
    if exp["database"] is None:
        exp["database"] = "appdb"
    check_chunkings(bp.OP_COMMAND, False, body, exp, data)


@PROPERTY
@given(doc=reply_docs(), outputs=st.lists(small_docs, max_size=3), data=st.data())
def test_op_commandreply_matches_oracle(doc, outputs, data):
    body = op_commandreply(doc, {"$gleStats": {}}, outputs)
    check_chunkings(bp.OP_COMMANDREPLY, True, body, expect_reply(decode(bson.encode(doc))), data)


# -- examples ------------------------------------------------------------------


def pymongo_find() -> dict:
    return {
        "find": "users",
        "filter": {"_id": 1},
        "limit": 1,
        "singleBatch": True,
        "lsid": {"id": Binary(uuid.UUID(int=7).bytes, 4)},
        "$clusterTime": {
            "clusterTime": Timestamp(1700000000, 1),
            "signature": {"hash": Binary(b"\x00" * 20, 0), "keyId": Int64(0)},
        },
        "$db": "shop",
    }


def test_find_command():
    body = op_msg(pymongo_find())
    check_chunkings(bp.OP_MSG, False, body, expected(command="find", collection="users", database="shop"))


def test_hello_handshake_on_op_query():
    doc = {
        "isMaster": 1,
        "helloOk": True,
        "client": {
            "driver": {"name": "PyMongo", "version": "4.20.1"},
            "os": {"type": "Linux"},
            "platform": "CPython 3.11",
            "application": {"name": "billing"},
        },
        "compression": ["zstd", "snappy", 7, "zlib"],
    }
    body = op_query("admin.$cmd", doc, selector={"x": 1})
    check_chunkings(
        bp.OP_QUERY,
        False,
        body,
        expected(
            command="isMaster",
            database="admin",
            namespace="admin.$cmd",
            app_name="billing",
            driver_name="PyMongo",
            driver_version="4.20.1",
            compression=["zstd", "snappy", "zlib"],
        ),
        every_split_max=400,
    )


def test_hello_reply():
    doc = {
        "isWritablePrimary": True,
        "topologyVersion": {"processId": ObjectId(), "counter": Int64(0)},
        "hosts": ["a:27017", "b:27017"],
        "setName": "rs0",
        "me": "a:27017",
        "maxWireVersion": 21,
        "compression": ["zstd"],
        "ok": 1.0,
    }
    check_chunkings(
        bp.OP_MSG,
        True,
        op_msg(doc, flags=2),
        expected(set_name="rs0", me="a:27017", max_wire_version=21, compression=["zstd"], ok=1.0),
        every_split_max=400,
    )


def test_get_more_and_kill_cursors():
    gm = op_msg({"getMore": Int64(1234567890123), "collection": "users", "batchSize": 10, "$db": "shop"})
    check_chunkings(
        bp.OP_MSG, False, gm, expected(command="getMore", cursor_id=1234567890123, collection="users", database="shop")
    )
    kc = op_msg({"killCursors": "users", "cursors": [Int64(99), Int64(100)], "$db": "shop"})
    check_chunkings(
        bp.OP_MSG, False, kc, expected(command="killCursors", collection="users", cursor_id=99, database="shop")
    )
    # only getMore's first value is a cursor id
    assert scan(bp.OP_MSG, False, op_msg({"hello": 1, "$db": "admin"})).cursor_id is None


def test_insert_counts_kind1_and_inline_documents():
    body = op_msg(
        {"insert": "users", "ordered": True, "$db": "shop", "documents": [{"a": 1}, {"a": 2}]},
        seqs=[("documents", [{"a": i} for i in range(5)]), ("documents", [{}])],
    )
    check_chunkings(
        bp.OP_MSG, False, body, expected(command="insert", collection="users", database="shop", documents=8)
    )


def test_comment_forms():
    r = scan(bp.OP_MSG, False, op_msg({"find": "c", "filter": {"$comment": "old"}, "comment": "new"}))
    assert r.comment == "new"
    r = scan(
        bp.OP_MSG,
        False,
        op_msg(
            {"find": "c", "filter": {"$comment": "old"}, "comment": {"traceparent": "00-ab-cd-01", "tracestate": "k=v"}}
        ),
    )
    assert (r.comment, r.comment_traceparent, r.comment_tracestate) == ("old", "00-ab-cd-01", "k=v")
    r = scan(bp.OP_MSG, False, op_msg({"aggregate": "c", "pipeline": [{"$match": {"$comment": "agg"}}], "cursor": {}}))
    assert r.comment == "agg"
    r = scan(bp.OP_MSG, False, op_msg({"update": "c", "updates": [{"q": {"$comment": "upd"}, "u": {}}]}))
    assert (r.comment, r.documents) == ("upd", 1)
    r = scan(bp.OP_MSG, False, op_msg({"delete": "c", "deletes": [{"q": {"$comment": 5}}, {"q": {}}]}))
    assert (r.comment, r.documents) == (None, 2)


def driver_op_msg(command: dict) -> bytes:
    """The OP_MSG body pymongo itself builds (documents/updates/deletes go into a kind-1 sequence)."""
    _, message, _, _ = pymongo.message._op_msg(0, command, "shop", None, bson.codec_options.DEFAULT_CODEC_OPTIONS)
    return message[16:]


TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_driver_write_sequences_carry_the_legacy_comment():
    lsid = {"id": Binary(uuid.UUID(int=7).bytes, 4)}
    body = driver_op_msg(
        {
            "delete": "users",
            "ordered": True,
            "lsid": lsid,
            "deletes": [{"q": {"age": {"$gt": 3}, "$comment": f"traceparent={TP}"}, "limit": 0}],
        }
    )
    end0 = 5 + int.from_bytes(body[5:9], "little")  # the driver sends kind 0, then the kind-1 `deletes`
    assert body[4] == 0 and body[end0] == 1 and body[end0 + 5 :].startswith(b"deletes\x00")
    check_chunkings(
        bp.OP_MSG,
        False,
        body,
        expected(command="delete", collection="users", database="shop", comment=f"traceparent={TP}", documents=1),
        every_split_max=400,
    )
    body = driver_op_msg(
        {
            "update": "users",
            "ordered": True,
            "updates": [
                {"q": {"_id": 1, "$comment": TP}, "u": {"$set": {"a": 1}}, "multi": False, "upsert": False},
                {"q": {"_id": 2, "$comment": "second"}, "u": {"$set": {"a": 2}}},
            ],
        }
    )
    check_chunkings(
        bp.OP_MSG,
        False,
        body,
        expected(command="update", collection="users", database="shop", comment=TP, documents=2),
        every_split_max=400,
    )
    # an insert's documents are data: never read, even when one looks like a statement
    body = driver_op_msg({"insert": "users", "documents": [{"q": {"$comment": TP}}]})
    assert scan(bp.OP_MSG, False, body).comment is None


def test_write_sequence_comment_precedence():
    deletes = [("deletes", [{"q": {"$comment": "from q"}, "limit": 0}, {"q": {"$comment": "second doc"}}])]
    for kind0_at in (0, 1):

        def comment(doc, seqs=deletes):
            return scan(bp.OP_MSG, False, op_msg(doc, seqs, kind0_at=kind0_at)).comment  # noqa: B023 - called within this iteration

        # a root string comment wins, before or after the sequence
        assert comment({"delete": "c", "comment": "root"}) == "root"
        # a document comment is not a string: the legacy one is used, the trace context still read
        r = scan(bp.OP_MSG, False, op_msg({"delete": "c", "comment": {"traceparent": TP}}, deletes, kind0_at=kind0_at))
        assert (r.comment, r.comment_traceparent) == ("from q", TP)
        assert comment({"delete": "c", "comment": 7}) == "from q"
        # only the first document of the sequence counts
        assert comment({"delete": "c"}, [("deletes", [{"q": {}}, {"q": {"$comment": "second"}}])]) is None
        assert comment({"delete": "c"}, [("deletes", [{"q": {"$comment": 5}}, {"q": {"$comment": "x"}}])]) is None
    # the first legacy comment in body order wins
    seqs = [("updates", [{"q": {"$comment": "seq 1"}}]), ("deletes", [{"q": {"$comment": "seq 2"}}])]
    doc = {"update": "c", "filter": {"$comment": "kind 0"}}
    assert [scan(bp.OP_MSG, False, op_msg(doc, seqs, kind0_at=k)).comment for k in (0, 1, 2)] == [
        "kind 0",
        "seq 1",
        "seq 1",
    ]
    # a second kind-1 `updates` section: its first document is read too, but the first found wins
    seqs = [("updates", [{"q": {}}]), ("updates", [{"q": {"$comment": "later"}}])]
    assert scan(bp.OP_MSG, False, op_msg({"update": "c"}, seqs)).comment == "later"


def test_write_sequence_identifier_split_and_snapshots():
    body = op_msg({"delete": "c", "$db": "d"}, [("deletes", [{"q": {"$comment": "tp"}}])], kind0_at=1)
    ident = body.index(b"deletes")
    s = bp.BodyScanner()
    s.reset(bp.OP_MSG, False, len(body))
    s.feed(body[: ident + 3])  # inside the identifier
    assert s.result().comment is None
    s.feed(body[ident + 3 : ident + 40])
    early = s.result()
    assert (early.comment, early.command) == ("tp", None)  # the kind-0 section has not arrived
    s.feed(body[ident + 40 :])
    assert s.done and (s.result().comment, s.result().command, s.result().database) == ("tp", "delete", "d")
    # a root comment arriving after the sequence still wins
    body = op_msg({"delete": "c", "comment": "root"}, [("deletes", [{"q": {"$comment": "tp"}}])], kind0_at=1)
    assert fields(scan_bytewise(bp.OP_MSG, False, body))["comment"] == "root"


def test_reply_errors_and_writes():
    doc = {
        "n": 1,
        "nModified": 0,
        "upserted": [{"index": 0, "_id": 5}],
        "writeErrors": [{"index": 1, "code": 11000, "codeName": "DuplicateKey", "errmsg": "E11000"}],
        "writeConcernError": {"code": 64, "codeName": "WriteConcernFailed", "errmsg": "timeout"},
        "ok": 1,
    }
    check_chunkings(
        bp.OP_MSG,
        True,
        op_msg(doc),
        expected(
            n=1,
            n_modified=0,
            upserted=1,
            write_errors=1,
            write_error_code=11000,
            write_error_code_name="DuplicateKey",
            write_concern_error_code=64,
            write_concern_error_code_name="WriteConcernFailed",
            ok=1.0,
        ),
        every_split_max=300,
    )
    err = {"ok": 0.0, "errmsg": "ns does not exist", "code": 26, "codeName": "NamespaceNotFound"}
    r = scan(bp.OP_MSG, True, op_msg(err))
    assert (r.ok, r.code, r.code_name, r.errmsg) == (0.0, 26, "NamespaceNotFound", "ns does not exist")
    assert isinstance(r.ok, float) and isinstance(r.code, int)
    fam = {"lastErrorObject": {"n": 1, "updatedExisting": True}, "value": {"_id": 1}, "ok": True}
    r = scan(bp.OP_MSG, True, op_msg(fam))
    assert (r.last_error_n, r.ok) == (1, 1.0)


def test_cursor_reply():
    docs = [{"_id": i, "pad": "x" * i} for i in range(100)]
    body = op_msg({"cursor": {"firstBatch": docs, "id": Int64(77), "ns": "shop.users"}, "ok": 1.0})
    r = scan(bp.OP_MSG, True, body)
    assert (r.returned, r.cursor_id, r.cursor_ns, r.ok) == (100, 77, "shop.users", 1.0)
    body = op_msg({"cursor": {"nextBatch": [], "id": Int64(0), "ns": "shop.users"}, "ok": 1.0})
    assert scan(bp.OP_MSG, True, body).returned == 0


def test_op_reply_rules():
    # a legacy query reply: the header counts
    r = scan(bp.OP_REPLY, True, op_reply([{"a": 1}, {"a": 2}], cursor_id=42))
    assert (r.returned, r.cursor_id, r.flags) == (2, 42, 8)
    # a command reply carrying a cursor: the batch and cursor.id win
    r = scan(bp.OP_REPLY, True, op_reply([{"cursor": {"firstBatch": [{}, {}, {}], "id": Int64(5)}, "ok": 1}]))
    assert (r.returned, r.cursor_id, r.ok) == (3, 5, 1.0)
    assert scan(bp.OP_REPLY, True, op_reply([])).returned == 0


def test_legacy_write_ops():
    docs = b"".join(bson.encode({"i": i}) for i in range(3))
    body = i32(1) + cstr("shop.users") + docs
    check_chunkings(
        bp.OP_INSERT, False, body, expected(namespace="shop.users", database="shop", collection="users", documents=3)
    )
    assert scan(bp.OP_INSERT, False, body).flags == 1
    body = i32(0) + cstr("shop.users") + i32(2) + bson.encode({"a": 1}) + bson.encode({"$set": {"b": 2}})
    check_chunkings(bp.OP_UPDATE, False, body, expected(namespace="shop.users", database="shop", collection="users"))
    assert scan(bp.OP_UPDATE, False, body).flags == 2
    body = i32(0) + cstr("shop.a.b") + i32(1) + bson.encode({"a": 1})
    check_chunkings(bp.OP_DELETE, False, body, expected(namespace="shop.a.b", database="shop", collection="a.b"))


def test_legacy_get_more_and_kill_cursors():
    body = i32(0) + cstr("shop.users") + i32(100) + i64(-5)
    check_chunkings(
        bp.OP_GET_MORE, False, body, expected(namespace="shop.users", database="shop", collection="users", cursor_id=-5)
    )
    body = i32(0) + i32(3) + i64(11) + i64(12) + i64(13)
    check_chunkings(bp.OP_KILL_CURSORS, False, body, expected(cursor_id=11))
    check_chunkings(bp.OP_KILL_CURSORS, False, i32(0) + i32(0), expected())


def test_legacy_find_comment():
    body = op_query("shop.users", {"$query": {"a": 1}, "$comment": "legacy find"})
    r = scan(bp.OP_QUERY, False, body)
    assert (r.command, r.collection, r.database, r.comment) == (None, "users", "shop", "legacy find")
    r = scan(bp.OP_QUERY, False, op_query("shop.users", {"$query": {"$comment": "inner"}}))
    assert r.comment == "inner"


def test_strings_are_cut_at_character_boundary():
    long = "é" * 300  # 600 bytes; 512 falls inside no character, 511 would
    r = scan(bp.OP_MSG, False, op_msg({"find": long, "comment": "€" * 200, "$db": "a" * 1000}))
    assert r.collection == "é" * 256
    assert r.comment == "€" * 170  # 3-byte characters: 170 * 3 = 510 <= 512
    assert r.database == "a" * 512
    s = bp.BodyScanner(max_string=64)
    s.reset(bp.OP_MSG, False, len(body := op_msg({"find": "x" * 100})))
    s.feed(body)
    assert s.result().collection == "x" * 64


def test_long_keys_do_not_match_and_command_name_is_cut():
    k = "k" * 100
    r = scan(bp.OP_MSG, False, op_msg({k: "coll", "x" * 70 + "$db": "no", "$db": "yes"}), cuts=[20, 90])
    assert (r.command, r.collection, r.database) == (k, "coll", "yes")


def test_unusual_types_are_skipped():
    # DBPointer (0x0C), undefined (0x06) and symbol (0x0E) cannot be produced by bson.encode.
    elems = (
        b"\x0cptr\x00"
        + i32(2)
        + b"a\x00"
        + b"\x01" * 12
        + b"\x06und\x00"
        + b"\x0esym\x00"
        + i32(2)
        + b"s\x00"
        + b"\x02$db\x00"
        + i32(3)
        + b"db\x00"
    )
    doc = b"\x02find\x00" + i32(2) + b"c\x00" + elems
    raw = i32(len(doc) + 5) + doc + b"\x00"
    assert decode(raw)["$db"] == "db"  # the oracle agrees it is valid BSON
    check_chunkings(bp.OP_MSG, False, op_msg(raw), expected(command="find", collection="c", database="db"))


def test_feed_accepts_buffers_offsets_and_stops_at_body_end():
    body = op_msg(pymongo_find())
    nxt = b"NEXT MESSAGE"
    for buf in (body + nxt, bytearray(body + nxt), memoryview(body + nxt)):
        s = bp.BodyScanner()
        s.reset(bp.OP_MSG, False, len(body))
        assert s.feed(buf) == len(body)
        assert s.done and s.consumed == len(body)
        assert s.feed(buf) == 0
        assert s.result().collection == "users"
    padded = b"\xff" * 7 + body + nxt
    s = bp.BodyScanner()
    s.reset(bp.OP_MSG, False, len(body))
    assert s.feed(padded, 7, 7 + 30) == 30
    assert s.feed(padded, 37) == len(body) - 30
    assert s.result().database == "shop"
    with pytest.raises(ValueError):
        s.reset(bp.OP_MSG, False, len(body))
        s.feed(padded, 10, 5)


def test_result_before_done_is_a_snapshot():
    body = op_msg({"find": "users", "filter": {"$comment": "c"}, "$db": "shop"})
    s = bp.BodyScanner()
    s.reset(bp.OP_MSG, False, len(body))
    split = body.index(b"$db") - 1  # just before the $db element
    s.feed(body[:split])
    early = s.result()
    assert (early.command, early.collection, early.database, early.comment) == ("find", "users", None, "c")
    s.feed(body[split:])
    assert early.database is None
    assert s.result().database == "shop"


def test_scanner_reuse_resets_everything():
    s = bp.BodyScanner()
    a = scan(bp.OP_MSG, True, op_msg({"ok": 0, "code": 1, "compression": ["zlib"]}), scanner=s)
    b = scan(bp.OP_MSG, False, op_msg({"ping": 1, "$db": "admin"}), scanner=s)
    assert a.code == 1 and a.compression == ["zlib"]
    assert fields(b) == expected(command="ping", database="admin")


def test_scan_body_and_result_helpers():
    r = bp.scan_body(bp.OP_MSG, False, bytearray(op_msg({"ping": 1, "$db": "admin"})))
    assert r.as_dict()["command"] == "ping"
    assert "command='ping'" in repr(r)
    made = bp.ScanResult(command="find", documents=3)
    assert (made.command, made.documents, made.collection) == ("find", 3, None)
    assert set(bp.DECODE_REASONS) >= {"truncated", "bad_length", "invalid_utf8", "unknown_opcode"}


def test_compression_list_is_bounded():
    r = scan(bp.OP_MSG, False, op_msg({"hello": 1, "compression": [f"c{i}" for i in range(40)]}))
    assert r.compression == [f"c{i}" for i in range(16)]
    assert scan(bp.OP_MSG, False, op_msg({"hello": 1, "compression": []})).compression == []
    assert scan(bp.OP_MSG, False, op_msg({"hello": 1, "compression": "zlib"})).compression is None


def test_large_reply_scans_without_descending():
    docs = [{"_id": i, "blob": b"\x00" * 4000} for i in range(1000)]  # ~4 MB
    body = op_msg({"cursor": {"id": Int64(0), "ns": "a.b", "firstBatch": docs}, "ok": 1})
    step = 65536
    r = scan(bp.OP_MSG, True, body, cuts=range(step, len(body), step))
    assert (r.returned, r.ok, r.cursor_ns) == (1000, 1.0, "a.b")


def test_empty_op_msg_sections_and_multiple_kind0():
    r = scan(bp.OP_MSG, False, struct.pack("<I", 0))
    assert r.command is None
    body = op_msg({"find": "a"}) + b"\x00" + bson.encode({"find": "b", "$db": "z"})
    r = scan(bp.OP_MSG, False, body)
    assert (r.collection, r.database) == ("a", None)


def test_scan_is_reset_feed_result_in_one_call():
    """BodyScanner.scan gives what reset + feed + result give, and truncated when the body stops short."""
    from mongoproxy.errors import DecodeError

    bodies = [
        (bp.OP_MSG, False, op_msg({"find": "c", "filter": {"_id": 1}, "$db": "shop"})),
        (bp.OP_MSG, True, op_msg({"cursor": {"firstBatch": [{"a": 1}], "id": 0, "ns": "shop.c"}, "ok": 1.0})),
    ]
    s = bp.BodyScanner()
    for op, is_reply, body in bodies:
        data = b"x" * 16 + body + b"tail"
        got = s.scan(data, 16, 16 + len(body), op, is_reply)
        want = scan(op, is_reply, body)
        assert repr(got) == repr(want)
        assert (got.command, got.collection, got.database, got.returned) == (
            want.command,
            want.collection,
            want.database,
            want.returned,
        )
    body = op_msg({"find": "c", "$db": "shop"})
    with pytest.raises(DecodeError):
        s.scan(body[:-1], 0, len(body) - 1, bp.OP_MSG, False)


def _scan_find(name: str, db: str = "app") -> bp.ScanResult:
    body = b"\x00\x00\x00\x00\x00" + bson.encode({"find": name, "$db": db})
    return bp.BodyScanner().scan(body, 0, len(body), bp.OP_MSG, False)


def test_recurring_names_are_one_str_object_and_every_name_stays_exact():
    """The name table hands out the same str for the same bytes; collisions and long names are still exact."""
    first, again = _scan_find("orders"), _scan_find("orders")
    assert again.collection == "orders" and again.collection is first.collection
    assert again.command is first.command and again.database is first.database
    # 2,000 distinct names through a 512-slot table: collisions replace slots, values never mix up.
    names = [f"c{i}é" for i in range(2000)]
    assert [_scan_find(n).collection for n in names] == names
    assert [_scan_find(n).collection for n in reversed(names)] == names[::-1]
    long_name = "x" * 65  # past the cached length: decoded each time, still exact
    a, b = _scan_find(long_name), _scan_find(long_name)
    assert a.collection == b.collection == long_name and a.collection is not b.collection


def test_a_name_that_is_not_utf8_is_still_a_decode_error_with_the_name_table():
    from mongoproxy.errors import DecodeError

    ok = _scan_find("users")
    body = bytearray(b"\x00\x00\x00\x00\x00" + bson.encode({"find": "users", "$db": "app"}))
    i = body.index(b"users")
    body[i : i + 2] = b"\xff\xfe"  # same length, invalid UTF-8
    with pytest.raises(DecodeError) as info:
        bp.BodyScanner().scan(bytes(body), 0, len(body), bp.OP_MSG, False)
    assert info.value.reason == "invalid_utf8"
    assert _scan_find("users").collection is ok.collection  # the table was not disturbed


def _doc(elements: bytes) -> bytes:
    return i32(4 + len(elements) + 1) + elements + b"\x00"


def _elem(t: int, key: str, value: bytes) -> bytes:
    return bytes([t]) + cstr(key) + value


def _batch_reply(batch: bytes) -> bytes:
    """An OP_MSG cursor reply whose firstBatch array holds the raw elements `batch` (lengths around it exact)."""
    cursor = _doc(
        _elem(0x04, "firstBatch", _doc(batch)) + _elem(0x12, "id", i64(0)) + _elem(0x02, "ns", i32(7) + b"shop.c\x00")
    )
    return op_msg(_doc(_elem(0x03, "cursor", cursor) + _elem(0x01, "ok", struct.pack("<d", 1.0))))


def _outcome(body: bytes, cuts=()):
    from mongoproxy.errors import DecodeError

    s = bp.BodyScanner()
    s.reset(bp.OP_MSG, True, len(body))
    prev = 0
    try:
        for c in sorted({c for c in cuts if 0 < c < len(body)}) + [len(body)]:
            s.feed(body[prev:c])
            prev = c
    except DecodeError as exc:
        return ("error", exc.reason, exc.detail)
    return ("ok", fields(s.result())) if s.done else ("short",)


def test_batches_skimmed_whole_and_scanned_piece_by_piece_agree_on_every_outcome():
    """A reply's batch is skipped document by document when each lies whole in the chunk (the skim), else by the
    states: well formed or not, every chunking gives the same count or the same error at the same place."""
    docs = [bson.encode({"_id": i, "pad": "x" * (i % 7)}) for i in range(6)]
    good = [_elem(0x03, str(i), d) for i, d in enumerate(docs)]
    no_term = docs[2][:-1] + b"\x01"  # the document's last byte is not its terminator
    cases = {
        "documents": good,
        "mixed types": [
            *good[:2],
            _elem(0x10, "2", i32(7)),
            _elem(0x04, "3", _doc(_elem(0x03, "0", docs[0]))),
            *good[4:],
        ],
        "empty documents": [_elem(0x03, str(i), _doc(b"")) for i in range(4)],
        "missing terminator": [*good[:2], _elem(0x03, "2", no_term), *good[3:]],
        "length below 5": [*good[:3], _elem(0x03, "3", i32(4) + b"\x00" * 8), *good[4:]],
        "length past the batch": [*good[:3], _elem(0x03, "3", i32(4000) + docs[3][4:])],
        "length past the batch, last": [*good[:5], _elem(0x03, "5", i32(len(docs[5]) + 1) + docs[5][4:])],
    }
    for name, elements in cases.items():
        body = _batch_reply(b"".join(elements))
        whole = _outcome(body)
        if name in ("documents", "mixed types", "empty documents"):
            assert whole[0] == "ok" and whole[1]["returned"] == len(elements), (name, whole)
        else:
            assert whole[0] == "error", (name, whole)
        assert _outcome(body, range(len(body))) == whole, name  # byte by byte: the states alone
        for c in range(1, len(body)):
            assert _outcome(body, [c]) == whole, (name, c)
