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


def batch(cid: int, n: int) -> Outcome:
    return Outcome(ok=True, returned=n, cursor_id=cid)


def test_an_unsorted_cursor_is_compared_over_all_its_batches():
    docs = compare.CursorDocuments()
    # The same four documents, spread differently over two batches: no divergence until the end, none there.
    assert (
        docs.judge(7, True, batch(7, 2), batch(9, 2), [{"_id": 1}, {"_id": 2}], [{"_id": 3}, {"_id": 1}], False) == []
    )
    assert len(docs) == 1
    assert (
        docs.judge(7, False, batch(0, 2), batch(0, 2), [{"_id": 3}, {"_id": 4}], [{"_id": 4}, {"_id": 2}], False) == []
    )
    assert len(docs) == 0 and docs.held == 0
    # One document differs: named once, at the cursor's end.
    assert docs.judge(8, True, batch(8, 1), batch(9, 1), [{"_id": 1}], [{"_id": 1}], False) == []
    last = docs.judge(8, False, batch(0, 1), batch(0, 1), [{"_id": 2}], [{"_id": 5}], False)
    assert last == [compare.KIND_DOCUMENTS]
    # Sorted: still per batch.
    assert docs.judge(9, True, batch(9, 2), batch(9, 2), [{"_id": 1}, {"_id": 2}], [{"_id": 2}, {"_id": 1}], True) == [
        compare.KIND_DOCUMENTS
    ]
    assert len(docs) == 0


def test_a_cursor_past_the_cap_or_forgotten_is_not_compared():
    docs = compare.CursorDocuments(max_documents=3, max_held=8)
    two = [{"_id": 1}, {"_id": 2}]
    assert docs.judge(1, True, batch(1, 2), batch(1, 2), two, two, False) == []
    assert docs.judge(1, False, batch(1, 2), batch(1, 2), two, two, False) == []  # 4 > 3: nothing more held
    assert docs.held == 0
    assert docs.judge(1, False, batch(0, 2), batch(0, 2), two, [{"_id": 9}], False) == [compare.NOT_COMPARED]
    # Past max_held the oldest cursor is forgotten; its end is counted as not compared, not as a divergence.
    for key in (10, 11, 12):
        docs.judge(key, True, batch(key, 2), batch(key, 2), two, two, False)
    assert 10 not in docs.open and docs.held <= 8
    assert docs.judge(10, False, batch(0, 2), batch(0, 2), two, two, False) == [compare.NOT_COMPARED]
    # A count divergence is not counted again as documents at the end.
    assert docs.judge(11, False, batch(0, 2), batch(0, 1), two, two[:1], False) == [compare.KIND_COUNT]
