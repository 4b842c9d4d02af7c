"""The query digest's table, shapes, eviction, merging and JSON, driven with scanner renderings and hand-built events."""

from __future__ import annotations

import random
import struct

import bson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from mongoproxy import _bson_parser, querylog
from mongoproxy.digest import RELATIVE_ACCURACY, Digest, new_sketch, sketch_from_json, sketch_to_json
from mongoproxy.events import CommandEvent, Connection
from mongoproxy.sinks import SinkContext
from mongoproxy.sinks import digest as digest_sink
from tests.support.inprocess import make_config


def rendered(cmd: dict, mode: int = _bson_parser.RENDER_REDACTED) -> str:
    """The scanner's rendering of an OP_MSG carrying `cmd` (as the proxy renders requests)."""
    body = struct.pack("<I", 0) + b"\x00" + bson.encode(cmd)
    s = _bson_parser.BodyScanner()
    s.reset(_bson_parser.OP_MSG, False, len(body), mode)
    s.feed(body)
    return s.result().query_shape


def shape(cmd: dict) -> str:
    return querylog.query_of(rendered(cmd), next(iter(cmd)), False).shape


def test_in_lists_of_any_length_make_one_shape():
    shapes = {
        shape({"find": "orders", "filter": {"sku": {"$in": list(range(n))}}, "$db": "shop", "lsid": {"id": n}})
        for n in (1, 5, 100)
    }
    assert len(shapes) == 1
    # ... and other literal values of every type keep the shape too.
    assert shape({"find": "orders", "filter": {"sku": {"$in": ["a", 2.5, None]}}, "$db": "shop"}) in shapes


def test_key_order_and_structure_make_different_shapes():
    ab = shape({"find": "orders", "filter": {"a": 1, "b": 2}, "$db": "shop"})
    ba = shape({"find": "orders", "filter": {"b": 2, "a": 1}, "$db": "shop"})
    assert ab != ba  # the server plans {a, b} and {b, a} as different queries (docs/digest.md)
    assert ab == shape({"find": "orders", "filter": {"a": "x", "b": 3.5}, "$db": "shop"})  # only literals differ
    assert shape({"find": "orders", "filter": {"a": 1}}) != shape({"find": "orders", "filter": {"a": {"$gt": 1}}})
    assert shape({"find": "orders", "filter": {"a": 1}}) != shape({"find": "items", "filter": {"a": 1}})


def write_shape(cmd: dict, ident: str, stmts: list, kind0_first: bool = True) -> str:
    """The shape of a write sent as drivers send it: statements in an OP_MSG kind-1 document sequence."""
    payload = ident.encode() + b"\x00" + b"".join(bson.encode(d) for d in stmts)
    kind0 = b"\x00" + bson.encode(cmd)
    kind1 = b"\x01" + struct.pack("<i", 4 + len(payload)) + payload
    body = struct.pack("<I", 0) + (kind0 + kind1 if kind0_first else kind1 + kind0)
    s = _bson_parser.BodyScanner()
    s.reset(_bson_parser.OP_MSG, False, len(body), _bson_parser.RENDER_REDACTED)
    s.feed(body)
    return querylog.query_of(s.result().query_shape, next(iter(cmd)), False).shape


@pytest.mark.parametrize("kind0_first", [True, False])
def test_writes_in_document_sequences_are_shaped_by_their_first_statement(kind0_first):
    upd = {"update": "orders", "ordered": True, "$db": "shop", "lsid": {"id": 1}}
    a1 = write_shape(upd, "updates", [{"q": {"a": 1}, "u": {"$set": {"x": 1}}}], kind0_first)
    a2 = write_shape(upd, "updates", [{"q": {"a": 2}, "u": {"$set": {"x": "y"}}}, {"q": {"z": 1}}], kind0_first)
    b1 = write_shape(upd, "updates", [{"q": {"b": 1}, "u": {"$set": {"x": 1}}}], kind0_first)
    a_inc = write_shape(upd, "updates", [{"q": {"a": 1}, "u": {"$inc": {"x": 1}}}], kind0_first)
    a_pipe = write_shape(upd, "updates", [{"q": {"a": 1}, "u": [{"$set": {"x": 1}}]}], kind0_first)
    assert a1 == a2  # only literals (and later statements) differ
    assert len({a1, b1, a_inc, a_pipe}) == 4  # the filter, the update operator, a pipeline: four shapes
    # the same as the one-statement command sent in kind-0
    assert a1 == shape({**upd, "updates": [{"q": {"a": 7}, "u": {"$set": {"x": 0}}}]})
    dele = {"delete": "orders", "ordered": True, "$db": "shop"}
    da1 = write_shape(dele, "deletes", [{"q": {"a": 1}, "limit": 0}], kind0_first)
    da2 = write_shape(dele, "deletes", [{"q": {"a": 2}, "limit": 0}], kind0_first)
    db1 = write_shape(dele, "deletes", [{"q": {"b": 1}, "limit": 0}], kind0_first)
    assert da1 == da2 != db1
    ins = {"insert": "orders", "$db": "shop"}
    # inserted documents are data: one shape per collection
    assert write_shape(ins, "documents", [{"a": 1}], kind0_first) == write_shape(ins, "documents", [{"b": 1}])


def test_a_redacted_rendering_is_parsed_once_and_shared():
    text = rendered({"find": "cache_probe", "filter": {"k": 1}, "$db": "d"})
    first = querylog.query_of(text, "find", False)
    assert querylog.query_of(text, "find", False) is first  # from the cache
    ev = event("find", query_shape=text)
    q = querylog.event_query(ev, False)
    assert q is first and ev.query_cache is q
    assert querylog.event_query(ev, False) is q
    # The command log shows the same text and hash.
    assert querylog.prepare(text, "find", False) == (q.text, q.shape)


def test_values_are_never_the_example():
    text = rendered({"find": "users", "filter": {"email": "ann@example.com"}, "$db": "d"}, _bson_parser.RENDER_VALUES)
    q = querylog.query_of(text, "find", True)
    assert "ann@example.com" in q.text
    assert "ann@example.com" not in q.redacted and '"email":"?"' in q.redacted
    assert q.shape == querylog.query_of(text, "find", False).shape


class _Reply:
    def __init__(self, **kw):
        self.write_errors = kw.get("write_errors")
        self.write_error_code = kw.get("write_error_code")
        self.write_error_code_name = kw.get("write_error_code_name")
        self.write_concern_error_code = None
        self.write_concern_error_code_name = None


class _Req:
    def __init__(self, query_shape):
        self.query_shape = query_shape


def event(op="find", *, query_shape=None, latency_ms=1.0, app="app", ok=True, code=None, code_name="", reply=None):
    conn = Connection(id=1, client_host="127.0.0.1", client_port=1, app_name=app)
    e = CommandEvent(conn, op, "shop", "orders", 7, 2013, 100, 1_000, 1_000, _Req(query_shape))
    e.reply = reply or _Reply()
    e.reply_size = 50
    e.reply_first_ns = e.reply_last_ns = 1_000 + int(latency_ms * 1e6)
    e.ok, e.code, e.code_name = ok, code, code_name
    return e


def make_sink(**flags) -> tuple[digest_sink.DigestSink, CollectorRegistry]:
    registry = CollectorRegistry()
    sink = digest_sink.create(
        make_config("0:127.0.0.1:1", **flags), SinkContext(registry=registry, version="t", mode="static")
    )
    return sink, registry


def test_lru_eviction_at_max_shapes_keeps_ten_of_fifty_and_counts_forty():
    sink, registry = make_sink(digest_max_shapes="10")
    for i in range(50):
        sink.on_command(event(query_shape=rendered({"find": "orders", "filter": {f"f{i}": 1}, "$db": "shop"})))
    sink.on_command(event(query_shape=rendered({"find": "orders", "filter": {"f45": 2}, "$db": "shop"})))  # a hit
    doc = sink.digest.to_json(limit=100)
    assert len(doc["shapes"]) == 10 and doc["evictions"] == 40
    kept = {s["example"] for s in doc["shapes"]}
    assert kept == {f'{{"find":"orders","filter":{{"f{i}":"?"}}}}' for i in range(40, 50)}
    text = generate_latest(registry).decode()
    assert "mongoproxy_digest_evictions_total 40.0" in text
    assert "mongoproxy_digest_shapes 10.0" in text
    assert "mongoproxy_digest_memory_bytes" in text and doc["memory_bytes"] > 0
    # One more new shape evicts the least recently seen one, which is f40 (f45 was seen again).
    sink.on_command(event(query_shape=rendered({"find": "orders", "filter": {"new": 1}, "$db": "shop"})))
    kept = {s["example"] for s in sink.digest.to_json()["shapes"]}
    assert '{"find":"orders","filter":{"f40":"?"}}' not in kept and '{"find":"orders","filter":{"f45":"?"}}' in kept


def test_digest_is_on_by_default_and_switches_off():
    assert make_sink()[0] is not None
    assert make_sink(no_digest="true")[0] is None


def test_errors_are_counted_by_code_name_and_shape_keys_include_the_app():
    sink, _ = make_sink()
    q = rendered({"insert": "orders", "$db": "shop"})
    dup = _Reply(write_errors=1, write_error_code=11000)
    for app in ("a", "b"):
        sink.on_command(event("insert", query_shape=q, app=app))
        sink.on_command(event("insert", query_shape=q, app=app, reply=dup))
    sink.on_command(event("insert", query_shape=q, app="a", ok=False, code=13, code_name="Unauthorized"))
    by_app = {s["app"]: s for s in sink.digest.to_json()["shapes"]}
    assert by_app["a"]["errors"] == {"DuplicateKey": 1, "Unauthorized": 1} and by_app["a"]["count"] == 3
    assert by_app["b"]["errors"] == {"DuplicateKey": 1} and by_app["b"]["count"] == 2


def test_sorting_filters_limit_and_reset():
    d = Digest()
    for i, (coll, app, n, ms) in enumerate([("a", "x", 5, 1.0), ("b", "y", 1, 50.0), ("c", "x", 20, 0.1)]):
        for _ in range(n):
            d.add((f"s{i}", "shop", coll, "find", app), "{}", 1, ms, None, 1, None, 10, 20)
    assert [s["collection"] for s in d.to_json("total_time")["shapes"]] == ["b", "a", "c"]
    assert [s["collection"] for s in d.to_json("count")["shapes"]] == ["c", "a", "b"]
    assert [s["collection"] for s in d.to_json("p99")["shapes"]] == ["b", "a", "c"]
    assert [s["collection"] for s in d.to_json(ns=["shop.c"])["shapes"]] == ["c"]
    assert [s["collection"] for s in d.to_json(app="x", limit=1)["shapes"]] == ["a"]
    with pytest.raises(ValueError):
        d.to_json("bogus")
    d.reset()
    assert d.to_json()["shapes"] == []


def test_merged_sketches_give_exactly_the_percentiles_of_the_union():
    rng = random.Random(14)
    union, parts = Digest(), [Digest(), Digest(), Digest()]
    key = ("s", "shop", "orders", "find", "app")
    for _ in range(3000):
        ms = round(rng.lognormvariate(0, 1.5), 3)
        union.add(key, "{}", 1, ms, None, None, None, 1, 1)
        rng.choice(parts).add(key, "{}", 1, ms, None, None, None, 1, 1)
    merged = Digest()
    for p in parts:
        merged.merge_json(p.to_json(sketch=True))
    (m,), (u,) = merged.to_json()["shapes"], union.to_json()["shapes"]
    assert m["count"] == u["count"] == 3000
    assert m["latency_ms"]["p50"] == u["latency_ms"]["p50"]
    assert m["latency_ms"]["p95"] == u["latency_ms"]["p95"]
    assert m["latency_ms"]["p99"] == u["latency_ms"]["p99"]
    assert m["latency_ms"]["min"] == u["latency_ms"]["min"] and m["latency_ms"]["max"] == u["latency_ms"]["max"]
    assert m["latency_ms"]["total"] == pytest.approx(u["latency_ms"]["total"])


def test_sketch_round_trip_and_stated_error():
    s = new_sketch()
    values = [0.0] + [x / 7 for x in range(1, 500)]
    for v in values:
        s.add(v)
    again = sketch_from_json(sketch_to_json(s))
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        assert again.get_quantile_value(q) == s.get_quantile_value(q)
        exact = sorted(values)[int(q * (len(values) - 1))]
        assert abs(s.get_quantile_value(q) - exact) <= RELATIVE_ACCURACY * exact + 1e-12
    with pytest.raises(ValueError):
        sketch_from_json({**sketch_to_json(s), "relative_accuracy": 0.02})


def test_the_data_path_add_fills_the_same_bins_as_ddsketch_add():
    rng = random.Random(7)
    fast, ref = new_sketch(), new_sketch()
    values = [0.0, 0.001] + [round(rng.lognormvariate(0, 2), 3) for _ in range(2000)]
    for v in values + values[:500]:  # repeats come from the key cache
        fast.add_ms(v)
        ref.add(v)
    assert fast.count == ref.count == len(values) + 500
    assert sketch_to_json(fast) == sketch_to_json(ref)
    for q in (0.0, 0.01, 0.5, 0.95, 0.99, 1.0):
        assert fast.get_quantile_value(q) == ref.get_quantile_value(q)


def test_the_cost_benchmark_runs_every_variant_and_counts_every_command(capsys):
    import json

    from benchmarks import digestcost

    assert digestcost.main(["--pairs", "300", "--rounds", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["us_per_round_trip"]) == {"off", "render", "digest", "digest100"}
    assert set(out["median_minus_off_us"]) == {"render", "digest", "digest100"}


def test_one_pass_quantiles_equal_ddsketch_quantiles():
    from mongoproxy.digest import quantiles

    rng = random.Random(3)
    qs = (0.0, 0.25, 0.5, 0.95, 0.99, 1.0)
    for n in (1, 2, 7, 300):
        s = new_sketch()
        for _ in range(n):
            s.add_ms(rng.choice([0.0, round(rng.lognormvariate(0, 2), 3)]))
        assert quantiles(s, qs) == [s.get_quantile_value(q) for q in qs]
    assert quantiles(new_sketch(), qs) == [None] * len(qs)


def test_the_bin_key_memo_stays_small_under_ever_new_latencies():
    """Every distinct latency (ms, µs resolution) is memoised: the memo must stay bounded in bytes, not only entries."""
    import tracemalloc

    from mongoproxy import digest as digest_mod

    digest_mod._KEYS.clear()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(200_000):
            assert digest_mod.bin_key((i * 7919 % 5_000_000 + 1) / 1000) != digest_mod.ZERO_KEY
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        digest_mod._KEYS.clear()
    assert grown < 1_000_000, f"the bin-key memo holds {grown / 1e6:.1f} MB"
