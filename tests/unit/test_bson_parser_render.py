"""query_shape rendering: JSON-ish text of the command, redacted or with values; secrets always hidden."""

from __future__ import annotations

import json

import bson
import pytest
from bson import Int64, ObjectId, Regex, Timestamp
from bson.binary import Binary
from hypothesis import assume, given
from hypothesis import strategies as st

from mongoproxy import _bson_parser as bp
from tests.unit.test_bson_parser import (
    PROPERTY,
    command_docs,
    cstr,
    decode,
    fields,
    i32,
    i64,
    key_chars,
    op_msg,
    op_query,
    op_reply,
    reply_docs,
    scan,
)

SECRET_KEYS = {"payload", "pwd", "speculativeAuthenticate"}


def shape(op: int, is_reply: bool, body: bytes, mode: int, cuts=(), **kw) -> str:
    return scan(op, is_reply, body, cuts, render=mode, **kw).query_shape


# JSON-compatible documents: RENDER_VALUES must round-trip through json.loads.
json_keys = st.text(key_chars, max_size=8).filter(lambda k: k not in SECRET_KEYS and not k.startswith("$"))
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**63), 2**63 - 1).map(Int64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=30, max_size=150),  # often > 128 bytes
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def json_commands(draw):
    name = draw(st.sampled_from(["find", "aggregate", "update", "insert", "count", "getMore"]))
    doc = {name: draw(st.one_of(st.text(max_size=20), json_scalars))}
    doc.update(draw(st.dictionaries(json_keys.filter(lambda k: k != name), json_values, max_size=6)))
    if draw(st.booleans()):
        doc["$db"] = draw(st.text(max_size=10))
    return doc


def rcut(s: str) -> str:
    """A rendered string: characters starting within the first RENDER_STRING_MAX bytes, then "…" if cut."""
    out, n = [], 0
    for ch in s:
        if n >= bp.RENDER_STRING_MAX:
            return "".join(out) + "…"
        out.append(ch)
        n += len(ch.encode())
    return s


def cut_strings(v):
    if isinstance(v, dict):
        return {k: cut_strings(x) for k, x in v.items()}
    if isinstance(v, list):
        return [cut_strings(x) for x in v]
    return rcut(v) if type(v) is str else v


def redact(doc: dict) -> dict:
    """The RENDER_REDACTED oracle: every literal is "?" except the namespace strings, cut as every rendered string."""

    def hide(v):
        if isinstance(v, dict):
            return {k: hide(x) for k, x in v.items()}
        if isinstance(v, list):
            return [hide(x) for x in v]
        return "?"

    out = {}
    for i, (k, v) in enumerate(doc.items()):
        shown = type(v) is str and (i == 0 or k in ("$db", "collection"))
        out[k] = rcut(v) if shown else hide(v)
    return out


@PROPERTY
@given(doc=json_commands(), data=st.data())
def test_values_render_is_json_of_the_document(doc, data):
    raw = bson.encode(doc)
    body = op_msg(raw)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=8))
    text = shape(bp.OP_MSG, False, body, bp.RENDER_VALUES, render_limit=1 << 20)
    assert json.loads(text) == cut_strings(decode(raw))
    assert shape(bp.OP_MSG, False, body, bp.RENDER_VALUES, cuts, render_limit=1 << 20) == text


@PROPERTY
@given(doc=json_commands(), data=st.data())
def test_redacted_render_keeps_keys_and_nesting_only(doc, data):
    raw = bson.encode(doc)
    body = op_msg(raw)
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=8))
    text = shape(bp.OP_MSG, False, body, bp.RENDER_REDACTED, cuts, render_limit=1 << 20)
    assert json.loads(text) == cut_strings(redact(decode(raw)))


@PROPERTY
@given(
    doc=command_docs(),
    reply=reply_docs(),
    mode=st.sampled_from([bp.RENDER_REDACTED, bp.RENDER_VALUES]),
    limit=st.sampled_from([16, 100, 4096]),
    data=st.data(),
)
def test_rendering_never_changes_extraction_and_is_chunking_invariant(doc, reply, mode, limit, data):
    for is_reply, d in ((False, doc), (True, reply)):
        body = op_msg(d)
        plain = scan(bp.OP_MSG, is_reply, body)
        cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=8))
        rendered = scan(bp.OP_MSG, is_reply, body, render=mode, render_limit=limit)
        again = scan(bp.OP_MSG, is_reply, body, cuts, render=mode, render_limit=limit)
        assert fields(rendered) == fields(plain) == fields(again)
        assert rendered.query_shape == again.query_shape
        assert plain.query_shape is None
        # bounded: the limit, plus the "…" marker
        assert len(rendered.query_shape.encode()) <= limit + 3
        assert rendered.query_shape.startswith("{")


# -- secrets ---------------------------------------------------------------------

MARK = "S3CRET-c0ffee"
secret_values = st.sampled_from(
    [
        MARK,
        {"inner": MARK},
        [MARK, {"x": MARK}],
        Binary(MARK.encode()),
        {"payload": MARK},
    ]
)


@st.composite
def secret_commands(draw):
    v = draw(secret_values)
    case = draw(st.integers(0, 5))
    if case == 0:
        return {"saslStart": 1, "mechanism": "SCRAM-SHA-256", "payload": v, "autoAuthorize": 1, "$db": "admin"}
    if case == 1:
        return {"saslContinue": 1, "conversationId": 1, "payload": v, "$db": "admin"}
    if case == 2:
        return {"authenticate": 1, "user": MARK, "nonce": v, "key": v, "mechanism": "MONGODB-CR", "$db": "admin"}
    if case == 3:
        return {draw(st.sampled_from(["createUser", "updateUser"])): "bob", "pwd": v, "roles": [], "$db": "admin"}
    if case == 4:
        return {
            "hello": 1,
            "speculativeAuthenticate": {"saslStart": 1, "payload": v, "db": "admin"},
            "client": {"application": {"name": "app"}},
            "$db": "admin",
        }
    return {"$query": {"authenticate": 1, "user": v}, "$readPreference": {"mode": "primary"}}


@PROPERTY
@given(doc=secret_commands(), mode=st.sampled_from([bp.RENDER_REDACTED, bp.RENDER_VALUES]), data=st.data())
def test_secrets_never_rendered(doc, mode, data):
    if "$query" in doc:
        body, op = op_query("admin.$cmd", doc), bp.OP_QUERY
    else:
        body, op = op_msg(doc), bp.OP_MSG
    cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=8))
    text = shape(op, False, body, mode, cuts)
    assert MARK not in text
    assert MARK.encode().hex() not in text
    assert json.loads(text)  # still well formed
    if op == bp.OP_MSG:  # a write statement carrying a secret, in either section order
        seqs = [("updates", [{"q": {"pwd": MARK, "a": 1}, "u": {"$set": {"payload": {"inner": MARK}}}}])]
        body = op_msg(doc, seqs=seqs, kind0_at=data.draw(st.integers(0, 1)))
        cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=8))
        text = shape(op, False, body, mode, cuts)
    assert MARK not in text
    assert MARK.encode().hex() not in text
    assert json.loads(text)  # still well formed


def test_secret_examples():
    text = shape(
        bp.OP_MSG,
        False,
        op_msg({"saslStart": 1, "mechanism": "PLAIN", "payload": Binary(b"\0u\0pw"), "$db": "$external"}),
        bp.RENDER_VALUES,
    )
    assert text == '{"saslStart":1,"mechanism":"PLAIN","payload":"?","$db":"$external"}'
    text = shape(bp.OP_MSG, False, op_msg({"authenticate": 1, "user": "u", "$db": "admin"}), bp.RENDER_VALUES)
    assert text == '{"authenticate":"?","user":"?","$db":"?"}'
    text = shape(bp.OP_MSG, False, op_msg({"updateUser": "u", "pwd": "pw", "$db": "admin"}), bp.RENDER_REDACTED)
    assert text == '{"updateUser":"u","pwd":"?","$db":"admin"}'
    reply = {"conversationId": 1, "done": False, "payload": Binary(b"r=nonce,s=salt"), "ok": 1.0}
    text = shape(bp.OP_MSG, True, op_msg(reply), bp.RENDER_VALUES)
    assert text == '{"conversationId":1,"done":false,"payload":"?","ok":1}'
    reply = {"isWritablePrimary": True, "speculativeAuthenticate": {"payload": b"x"}, "ok": 1.0}
    assert '"speculativeAuthenticate":"?"' in shape(bp.OP_MSG, True, op_msg(reply), bp.RENDER_REDACTED)


# -- examples --------------------------------------------------------------------


def test_redacted_example():
    doc = {"find": "users", "filter": {"email": "a@b.c", "age": {"$gt": 21}}, "$db": "shop"}
    assert (
        shape(bp.OP_MSG, False, op_msg(doc), bp.RENDER_REDACTED)
        == '{"find":"users","filter":{"email":"?","age":{"$gt":"?"}},"$db":"shop"}'
    )


def test_values_of_every_type():
    doc = {
        "find": "c",
        "filter": {
            "s": 'q"b\\s\n',
            "i": 7,
            "l": Int64(-(2**62)),
            "d": 0.1,
            "t": True,
            "n": None,
            "o": ObjectId("65f1a2b3c4d5e6f708192a3b"),
            "re": Regex("^a", "i"),
            "ts": Timestamp(5, 6),
            "b": Binary(b"abc", 0),
            "a": [1, [2, {}]],
            "e": {},
        },
    }
    text = shape(bp.OP_MSG, False, op_msg(doc), bp.RENDER_VALUES)
    assert text == (
        '{"find":"c","filter":{"s":"q\\"b\\\\s\\u000a","i":7,"l":-4611686018427387904,"d":0.1,"t":true,'
        '"n":null,"o":{"$oid":"65f1a2b3c4d5e6f708192a3b"},"re":"/^a/i","ts":{"$timestamp":{"t":5,"i":6}},'
        '"b":"<binary 3>","a":[1,[2,{}]],"e":{}}}'
    )
    assert json.loads(text)["filter"]["s"] == 'q"b\\s\n'
    # datetime, undefined, DBPointer, symbol: hand-made elements
    elems = (
        b"\x02find\x00"
        + i32(2)
        + b"c\x00"
        + b"\x09dt\x00"
        + i64(1700000000000)
        + b"\x06u\x00"
        + b"\x0cp\x00"
        + i32(2)
        + b"a\x00"
        + b"\x01" * 12
        + b"\x0esym\x00"
        + i32(2)
        + b"s\x00"
    )
    raw = i32(len(elems) + 5) + elems + b"\x00"
    assert (
        shape(bp.OP_MSG, False, op_msg(raw), bp.RENDER_VALUES)
        == '{"find":"c","dt":{"$date":1700000000000},"u":{"$undefined":true},"p":"<dbpointer>","sym":"s"}'
    )


def test_long_strings_are_cut_at_a_character_boundary():
    for prefix, kept in (("", "é" * 64), ("a", "a" + "é" * 64), ("ab", "ab" + "é" * 63)):
        body = op_msg({"find": "c", "filter": {"s": prefix + "é" * 200}})
        for cuts in ((), range(0, 500, 3), range(0, 500, 2)):
            text = shape(bp.OP_MSG, False, body, bp.RENDER_VALUES, cuts)
            assert json.loads(text)["filter"]["s"] == kept + "…", (prefix, cuts)
    assert rcut("é" * 64) == "é" * 64 and rcut("a" + "é" * 64) == "a" + "é" * 64


def test_render_limit_truncates_but_scanning_continues():
    doc = {"insert": "c", "documents": [{"a": i, "b": "x" * 50} for i in range(1000)], "$db": "shop"}
    r = scan(bp.OP_MSG, False, op_msg(doc), range(0, 70000, 4096), render=bp.RENDER_VALUES, render_limit=200)
    assert r.query_shape.endswith("…")
    assert len(r.query_shape.encode()) <= 203
    assert r.query_shape.startswith('{"insert":"c","documents":[{"a":0,"b":"xxx')
    assert (r.documents, r.database) == (1000, "shop")


def test_depth_is_bounded():
    deep: dict = {"v": 1}
    for _ in range(150):
        deep = {"d": deep}
    r = scan(bp.OP_MSG, False, op_msg({"find": "c", "filter": deep, "$db": "shop"}), render=bp.RENDER_REDACTED)
    assert r.query_shape.endswith("…")
    assert r.query_shape.count("{") == 100  # the root and 99 levels below it
    assert (r.command, r.database) == ("find", "shop")


def test_one_scanner_renders_deep_then_shallow_then_deep_in_chunks():
    """The stack grows past its inline frames mid-chunk and is given back at reset: reuse stays exact."""
    deep: dict = {"v": 1}
    for _ in range(40):
        deep = {"d": deep}
    bodies = [
        op_msg({"find": "c", "filter": deep, "$db": "shop"}),
        op_msg({"find": "d", "filter": {"a": {"b": 1}}, "$db": "web"}),
        op_msg({"find": "e", "filter": deep, "$db": "shop"}),
    ]
    s = bp.BodyScanner()
    for body in bodies:
        s.reset(bp.OP_MSG, False, len(body), bp.RENDER_REDACTED)
        for start in range(0, len(body), 7):
            s.feed(body, start, min(start + 7, len(body)))
        r = s.result()
        alone = scan(bp.OP_MSG, False, body, render=bp.RENDER_REDACTED)
        assert (r.command, r.collection, r.query_shape) == (alone.command, alone.collection, alone.query_shape)
    assert r.query_shape.count("{") == 42  # the root, the filter and the 40 documents nested in it


def test_legacy_bodies_render_their_command_document():
    text = shape(
        bp.OP_QUERY,
        False,
        op_query("admin.$cmd", {"isMaster": 1, "client": {"driver": {"name": "x"}}}),
        bp.RENDER_REDACTED,
    )
    assert text == '{"isMaster":"?","client":{"driver":{"name":"?"}}}'
    text = shape(bp.OP_REPLY, True, op_reply([{"ok": 1.0, "n": 2}, {"ignored": 1}]), bp.RENDER_VALUES)
    assert text == '{"ok":1,"n":2}'
    body = cstr("db") + cstr("ping") + bson.encode({"ping": 1}) + bson.encode({})
    assert shape(bp.OP_COMMAND, False, body, bp.RENDER_VALUES) == '{"ping":1}'


def test_only_the_first_kind0_document_renders():
    body = op_msg({"insert": "c", "$db": "d"}, seqs=[("documents", [{"secret": "data"}])])
    assert shape(bp.OP_MSG, False, body, bp.RENDER_VALUES) == '{"insert":"c","$db":"d"}'


def test_the_first_write_statement_renders_in_either_section_order():
    seqs = [("deletes", [{"q": {"$comment": "tp", "pwd": "secret", "a": 1}, "limit": 0}, {"q": {"other": 1}}])]
    for kind0_at in (0, 1):
        body = op_msg({"delete": "c", "$db": "d"}, seqs=seqs, kind0_at=kind0_at)
        r = scan(bp.OP_MSG, False, body, render=bp.RENDER_VALUES)
        assert r.comment == "tp"
        assert r.query_shape == (
            '{"delete":"c","$db":"d","deletes":[{"q":{"$comment":"tp","pwd":"?","a":1},"limit":0}]}'
        )
    seqs = [("updates", [{"q": {"a": 1}, "u": [{"$set": {"b": 2}}, {"$unset": "c"}], "multi": True}])]
    for kind0_at in (0, 1):
        body = op_msg({"update": "c", "ordered": True, "$db": "d"}, seqs=seqs, kind0_at=kind0_at)
        assert shape(bp.OP_MSG, False, body, bp.RENDER_REDACTED) == (
            '{"update":"c","ordered":"?","$db":"d","updates":[{"q":{"a":"?"},"u":[{"$set":{"b":"?"}},{"$unset":"?"}],'
            '"multi":"?"}]}'
        )


def test_only_one_write_statement_renders_and_inserted_documents_never_do():
    seqs = [("documents", [{"a": 1}]), ("updates", [{"q": {"x": 1}, "u": {}}]), ("updates", [{"q": {"y": 1}}])]
    body = op_msg({"update": "c", "$db": "d"}, seqs=seqs, kind0_at=3)
    assert (
        shape(bp.OP_MSG, False, body, bp.RENDER_VALUES) == '{"update":"c","$db":"d","updates":[{"q":{"x":1},"u":{}}]}'
    )
    assert scan(bp.OP_MSG, False, body, render=bp.RENDER_VALUES).documents == 3
    body = op_msg({"update": "c", "$db": "d"}, seqs=[("updates", [{"q": {"x": 1}}])])
    assert scan(bp.OP_MSG, True, body, render=bp.RENDER_VALUES).query_shape == '{"update":"c","$db":"d"}'  # a reply


write_statements = st.fixed_dictionaries(
    {"q": st.dictionaries(json_keys, json_values, max_size=4)},
    optional={
        "u": st.one_of(
            st.dictionaries(st.sampled_from(["$set", "$inc", "$unset"]), st.dictionaries(json_keys, json_values)),
            st.lists(st.dictionaries(st.sampled_from(["$set", "$project"]), json_values, max_size=1), max_size=3),
        ),
        "multi": st.booleans(),
        "limit": st.integers(0, 1),
    },
)


@PROPERTY
@given(
    doc=json_commands(),
    stmts=st.lists(write_statements, min_size=1, max_size=3),
    ident=st.sampled_from(["updates", "deletes"]),
    mode=st.sampled_from([bp.RENDER_REDACTED, bp.RENDER_VALUES]),
    limit=st.sampled_from([16, 60, 200, 4096]),
    data=st.data(),
)
def test_write_statement_rendering_is_chunking_and_section_order_invariant(doc, stmts, ident, mode, limit, data):
    assume(ident not in doc)
    texts = set()
    for kind0_at in (0, 1):
        body = op_msg(doc, seqs=[(ident, stmts)], kind0_at=kind0_at)
        plain = scan(bp.OP_MSG, False, body)
        whole = scan(bp.OP_MSG, False, body, render=mode, render_limit=limit)
        assert fields(whole) == fields(plain)
        cuts = data.draw(st.lists(st.integers(0, len(body)), max_size=8))
        assert shape(bp.OP_MSG, False, body, mode, cuts, render_limit=limit) == whole.query_shape
        texts.add(whole.query_shape)
    (text,) = texts  # the same whichever section comes first
    assert len(text.encode()) <= limit + 3
    if limit == 4096:  # uncut: the command document with its first statement, as if sent in kind-0
        one = shape(bp.OP_MSG, False, op_msg({**doc, ident: stmts[:1]}), mode)
        assert json.loads(text) == json.loads(one)
        if mode == bp.RENDER_REDACTED:
            assert json.loads(text) == redact({**doc, ident: stmts[:1]})


def test_render_arguments_are_checked():
    s = bp.BodyScanner()
    with pytest.raises(ValueError):
        s.reset(bp.OP_MSG, False, 10, render=3)
    with pytest.raises(ValueError):
        s.reset(bp.OP_MSG, False, 10, render=bp.RENDER_VALUES, render_limit=4)
    body = op_msg({"ping": 1})
    s.reset(bp.OP_MSG, False, len(body), render=bp.RENDER_VALUES)
    s.feed(body)
    assert s.result().query_shape == '{"ping":1}'
    s.reset(bp.OP_MSG, False, len(body))
    s.feed(body)
    assert s.result().query_shape is None


@pytest.mark.parametrize("mode", [bp.RENDER_REDACTED, bp.RENDER_VALUES])
def test_truncation_never_splits_a_character_whatever_the_chunking(mode):
    # Multi-byte characters in a key straddle the render limit; a chunk cut may split one too.
    body = op_msg({"find": "", "q": {"ab" + "é€😀" * 8: None}})
    for limit in range(16, 60):
        whole = shape(bp.OP_MSG, False, body, mode, render_limit=limit)
        assert whole.endswith("…") and "\ufffd" not in whole
        for cut in range(1, len(body)):
            assert shape(bp.OP_MSG, False, body, mode, (cut,), render_limit=limit) == whole, (limit, cut)
