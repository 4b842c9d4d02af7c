"""mongoproxy.compare: the one comparison of two replies, used by the mirror and `replay --verify`."""

from __future__ import annotations

import bson

from mongoproxy import compare
from mongoproxy.compare import Outcome


def test_same_replies_do_not_diverge():
    a = Outcome(ok=True, returned=3, cursor_id=0)
    assert compare.compare(a, Outcome(ok=True, returned=3, cursor_id=99)) == []


def test_ok_code_and_count_divergences():
    ok = Outcome(ok=True, returned=3)
    assert compare.compare(ok, Outcome(ok=False, code=13)) == [compare.KIND_OK]
    assert compare.compare(Outcome(ok=False, code=2), Outcome(ok=False, code=13)) == [compare.KIND_CODE]
    assert compare.compare(Outcome(ok=False, code=2), Outcome(ok=False, code=2)) == []
    assert compare.compare(ok, Outcome(ok=True, returned=2)) == [compare.KIND_COUNT]
    assert compare.compare(Outcome(ok=True, n=4), Outcome(ok=True, n=5)) == [compare.KIND_COUNT]
    assert compare.compare(Outcome(ok=True, write_errors=1), ok) == [compare.KIND_OK]
    assert "returned 3 vs 2" in compare.describe(compare.KIND_COUNT, ok, Outcome(ok=True, returned=2))


def test_a_client_side_failure_is_not_a_divergence():
    assert compare.compare(Outcome(ok=True), Outcome(exception="NetworkTimeout")) == []


def test_documents_unsorted_ignore_order_and_volatile_fields():
    a = [{"_id": 1, "x": 1}, {"_id": 2, "x": 2}]
    b = [{"_id": 2, "x": 2}, {"_id": 1, "x": 1, "operationTime": bson.Timestamp(1, 1)}]
    ok = Outcome(ok=True, returned=2)
    assert compare.compare(ok, ok, a, b, ordered=False) == []
    assert compare.compare(ok, ok, a, b, ordered=True) == [compare.KIND_DOCUMENTS]
    assert compare.compare(ok, ok, a, [{"_id": 1, "x": 1}, {"_id": 2, "x": 3}]) == [compare.KIND_DOCUMENTS]


def test_ordered_commands_and_reply_documents():
    assert compare.is_ordered("find", {"find": "c", "sort": {"a": 1}})
    assert not compare.is_ordered("find", {"find": "c", "filter": {}})
    assert compare.is_ordered("aggregate", {"pipeline": [{"$match": {}}, {"$sort": {"a": 1}}]})
    assert not compare.is_ordered("aggregate", {"pipeline": [{"$group": {"_id": "$a"}}]})
    assert compare.reply_documents({"cursor": {"firstBatch": [{"a": 1}], "id": 0}}) == [{"a": 1}]
    assert compare.reply_documents({"cursor": {"nextBatch": [], "id": 0}}) == []
    assert compare.reply_documents({"values": [1, 2]}) == [1, 2]
    assert compare.reply_documents({"n": 3, "ok": 1}) is None
