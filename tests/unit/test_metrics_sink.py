"""The Prometheus metrics sink, driven with hand-built events (no sockets)."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mongoproxy import config as config_mod
from mongoproxy.errors import ConfigError
from mongoproxy.events import CommandEvent, Connection, DecodeErrorEvent, SinkBus, UpstreamConnectError
from mongoproxy.sinks import SinkContext, build_sinks, metrics
from mongoproxy.sinks.metrics import MetricsSink

MS = 1_000_000  # ns


def reply(**fields):
    """A stand-in for the scanner's ScanResult with the attributes the sinks read."""
    base = dict(
        write_errors=None,
        write_error_code=None,
        write_error_code_name=None,
        write_concern_error_code=None,
        write_concern_error_code_name=None,
        query_shape=None,
        comment=None,
    )
    base.update(fields)
    return SimpleNamespace(**base)


def conn(cid=1, app="app1", host="10.0.0.5", port=50000, server=("db1", 27017), rs=""):
    return Connection(
        id=cid,
        client_host=host,
        client_port=port,
        upstream_host=server[0],
        upstream_port=server[1],
        app_name=app,
        replica_set=rs,
    )


def command(
    c,
    op="find",
    db="shop",
    coll="users",
    *,
    latency_ms=2.0,
    request_size=120,
    reply_size=300,
    ok=True,
    returned=None,
    changed=None,
    no_reply=False,
    exhaust_index=0,
    r=None,
    code=None,
    code_name="",
    start_ns=1_000 * MS,
):
    e = CommandEvent(
        connection=c,
        op=op,
        database=db,
        collection=coll,
        request_id=7,
        request_opcode=2013,
        request_size=request_size,
        request_first_ns=start_ns,
        request_last_ns=start_ns + 1000,
        request=reply(),
    )
    if no_reply:
        e.more_to_come_request = True
        return e
    e.reply = r if r is not None else reply()
    e.reply_size = reply_size
    e.reply_first_ns = start_ns + int(latency_ms * MS) - 1000
    e.reply_last_ns = start_ns + int(latency_ms * MS)
    e.ok = ok
    e.code, e.code_name = code, code_name
    e.documents_returned, e.documents_changed = returned, changed
    if exhaust_index:
        e.exhaust, e.exhaust_index = True, exhaust_index
    return e


@pytest.fixture
def reg():
    return CollectorRegistry(auto_describe=True)


@pytest.fixture
def sink(reg):
    return MetricsSink(reg, version="9.9.9", mode="static")


L = {"op": "find", "db": "shop", "collection": "users", "app": "app1", "server": "db1:27017", "replicaset": ""}


def val(reg, name, labels=None):
    return reg.get_sample_value(name, labels or {})


def test_info_gauge(reg, sink):
    assert val(reg, "mongoproxy_info", {"version": "9.9.9", "mode": "static", "upstream_tls": "off"}) == 1


def test_many_commands_land_in_the_buckets_their_values_name(reg, sink):
    """Thousands of commands, a scrape among them: each bucket and sum holds what the values say."""
    from bisect import bisect_left

    c = conn()
    n = 5000
    lat_ms = [0.1 + (i * 7919 % 5000) / 10 for i in range(n)]  # 0.1 ms .. 500 ms, bucket bounds included
    sizes = [16 + (i * 104729 % 70000) for i in range(n)]
    returned = [i % 150 if i % 3 else None for i in range(n)]
    for i in range(n):
        sink.on_command(command(c, latency_ms=lat_ms[i], request_size=sizes[i], returned=returned[i]))
        if i == 2500:
            assert val(reg, "mongoproxy_response_latency_seconds_count", L) == i + 1
    bounds = sink.latency_buckets
    for bound in bounds:
        expect = sum(1 for ms in lat_ms if bisect_left(bounds, ms / 1000) <= bisect_left(bounds, bound))
        assert val(reg, "mongoproxy_response_latency_seconds_bucket", dict(L, le=str(bound))) == expect
    assert val(reg, "mongoproxy_response_latency_seconds_sum", L) == pytest.approx(sum(lat_ms) / 1000)
    assert val(reg, "mongoproxy_request_size_bytes_sum", L) == sum(sizes)
    assert val(reg, "mongoproxy_request_size_bytes_bucket", dict(L, le="1024.0")) == sum(1 for x in sizes if x <= 1024)
    real = [r for r in returned if r is not None]
    assert val(reg, "mongoproxy_documents_returned_count", L) == len(real)
    assert val(reg, "mongoproxy_documents_returned_sum", L) == sum(real)


def test_histograms_count_and_sum_per_label_set(reg, sink):
    c = conn()
    for _ in range(3):
        sink.on_command(command(c, latency_ms=2.0, returned=1))
    sink.on_command(command(c, op="insert", latency_ms=1.0, changed=5, request_size=5000, reply_size=60))
    assert val(reg, "mongoproxy_response_latency_seconds_count", L) == 3
    assert val(reg, "mongoproxy_response_latency_seconds_sum", L) == pytest.approx(0.006)
    assert val(reg, "mongoproxy_documents_returned_count", L) == 3
    assert val(reg, "mongoproxy_documents_returned_sum", L) == 3
    assert val(reg, "mongoproxy_documents_changed_count", L) is None  # finds change nothing: no series
    assert val(reg, "mongoproxy_request_size_bytes_sum", L) == 360
    assert val(reg, "mongoproxy_response_size_bytes_sum", L) == 900
    ins = dict(L, op="insert")
    assert val(reg, "mongoproxy_documents_changed_sum", ins) == 5
    assert val(reg, "mongoproxy_documents_returned_count", ins) is None
    assert val(reg, "mongoproxy_request_size_bytes_bucket", dict(ins, le="4096.0")) == 0
    assert val(reg, "mongoproxy_request_size_bytes_bucket", dict(ins, le="16384.0")) == 1
    assert val(reg, "mongoproxy_response_size_bytes_bucket", dict(ins, le="64.0")) == 1


def test_bucket_bounds_are_inclusive_and_cumulative(reg, sink):
    c = conn()
    sink.on_command(command(c, latency_ms=1.0))  # exactly on the 0.001 bound
    sink.on_command(command(c, latency_ms=1.0001))
    sink.on_command(command(c, latency_ms=120_000))  # past the last bound
    assert val(reg, "mongoproxy_response_latency_seconds_bucket", dict(L, le="0.0005")) == 0
    assert val(reg, "mongoproxy_response_latency_seconds_bucket", dict(L, le="0.001")) == 1
    assert val(reg, "mongoproxy_response_latency_seconds_bucket", dict(L, le="0.0025")) == 2
    assert val(reg, "mongoproxy_response_latency_seconds_bucket", dict(L, le="60.0")) == 2
    assert val(reg, "mongoproxy_response_latency_seconds_bucket", dict(L, le="+Inf")) == 3
    sink.on_command(command(c, op="find", returned=0))
    assert val(reg, "mongoproxy_documents_returned_bucket", dict(L, le="0.0")) == 1


def test_exposition_parses_and_histograms_are_consistent(reg, sink):
    c = conn()
    for i in range(50):
        sink.on_command(command(c, coll=f"c{i % 5}", latency_ms=i * 0.7, returned=i, request_size=i * 100))
    text = generate_latest(reg).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    hist = families["mongoproxy_response_latency_seconds"]
    assert hist.type == "histogram"
    by_series: dict = {}
    for s in hist.samples:
        key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        by_series.setdefault(key, []).append(s)
    assert len(by_series) == 5
    for samples in by_series.values():
        buckets = [s.value for s in samples if s.name.endswith("_bucket")]
        count = next(s.value for s in samples if s.name.endswith("_count"))
        assert buckets == sorted(buckets) and buckets[-1] == count == 10


def test_attribution_labels_come_from_event_and_connection(reg, sink):
    c = conn(app="billing", server=("::1", 27018), rs="rs0")
    sink.on_command(command(c, op="ping", db="admin", coll=""))
    sink.on_command(command(c, op="getMore", coll="orders", returned=2))
    base = {"app": "billing", "server": "[::1]:27018", "replicaset": "rs0"}
    assert val(reg, "mongoproxy_response_latency_seconds_count", dict(base, op="ping", db="admin", collection="")) == 1
    assert val(reg, "mongoproxy_documents_returned_sum", dict(base, op="getMore", db="shop", collection="orders")) == 2


def test_unacknowledged_request_has_no_latency_or_reply(reg, sink):
    sink.on_command(command(conn(), op="insert", no_reply=True, request_size=80))
    ins = dict(L, op="insert")
    assert val(reg, "mongoproxy_response_latency_seconds_count", ins) is None
    assert val(reg, "mongoproxy_response_size_bytes_count", ins) is None
    assert val(reg, "mongoproxy_request_size_bytes_sum", ins) == 80


def test_awaitable_hello_is_a_long_poll_not_a_latency(reg, sink):
    c = conn()
    handshake = command(c, op="hello", coll="", db="admin", latency_ms=1)
    poll = command(c, op="hello", coll="", db="admin", latency_ms=10_000, reply_size=400)
    poll.awaitable = True
    sink.on_command(handshake)
    sink.on_command(poll)
    hello = dict(L, op="hello", collection="", db="admin")
    assert val(reg, "mongoproxy_response_latency_seconds_count", hello) == 1
    assert val(reg, "mongoproxy_response_latency_seconds_sum", hello) == pytest.approx(0.001)
    assert val(reg, "mongoproxy_response_size_bytes_count", hello) == 2


def test_exhaust_replies_count_the_request_once(reg, sink):
    c = conn()
    sink.on_command(command(c, op="getMore", returned=2, request_size=100, reply_size=200))
    sink.on_command(command(c, op="getMore", returned=2, request_size=100, reply_size=200, exhaust_index=1))
    sink.on_command(command(c, op="getMore", returned=1, request_size=100, reply_size=150, exhaust_index=2))
    gm = dict(L, op="getMore")
    assert val(reg, "mongoproxy_request_size_bytes_count", gm) == 1
    assert val(reg, "mongoproxy_response_size_bytes_count", gm) == 3
    assert val(reg, "mongoproxy_response_latency_seconds_count", gm) == 3
    assert val(reg, "mongoproxy_documents_returned_sum", gm) == 5


def test_command_errors_by_code_name(reg, sink):
    c = conn()
    sink.on_command(command(c, ok=False, code=2, code_name="BadValue"))
    sink.on_command(command(c, ok=False, code=2, code_name="BadValue"))
    sink.on_command(command(c, ok=False, code=12345))  # unknown code without a name: the number
    sink.on_command(command(c, ok=False))
    sink.on_command(
        command(
            c,
            op="insert",
            changed=0,
            r=reply(write_errors=3, write_error_code=11000, write_error_code_name="DuplicateKey"),
        )
    )
    sink.on_command(command(c, op="insert", changed=1, r=reply(write_errors=1, write_error_code=121)))
    sink.on_command(
        command(
            c,
            op="update",
            changed=1,
            r=reply(write_concern_error_code=64, write_concern_error_code_name="WriteConcernFailed"),
        )
    )
    sink.on_command(
        command(
            c,
            op="delete",
            changed=0,
            r=reply(
                write_errors=1,
                write_error_code=11000,
                write_error_code_name="DuplicateKey",
                write_concern_error_code=100,
            ),
        )
    )
    sink.on_command(command(c, op="insert", changed=1))  # success: nothing counted
    e = {"db": "shop", "collection": "users"}
    name = "mongoproxy_command_errors_total"
    assert val(reg, name, dict(e, op="find", code_name="BadValue")) == 2
    assert val(reg, name, dict(e, op="find", code_name="12345")) == 1
    assert val(reg, name, dict(e, op="find", code_name="unknown")) == 1
    assert val(reg, name, dict(e, op="insert", code_name="DuplicateKey")) == 1  # one per command, not per error
    assert val(reg, name, dict(e, op="insert", code_name="DocumentValidationFailure")) == 1  # name from the code
    assert val(reg, name, dict(e, op="update", code_name="WriteConcernFailed")) == 1
    assert val(reg, name, dict(e, op="delete", code_name="DuplicateKey")) == 1
    assert val(reg, name, dict(e, op="delete", code_name="UnsatisfiableWriteConcern")) == 1
    total = sum(
        s.value
        for f in text_string_to_metric_families(generate_latest(reg).decode())
        if f.name == "mongoproxy_command_errors"
        for s in f.samples
        if s.name.endswith("_total")
    )
    assert total == 9


def test_label_subset(reg):
    sink = MetricsSink(reg, labels=("op", "app"))
    c = conn()
    sink.on_command(command(c, ok=False, code_name="BadValue"))
    assert val(reg, "mongoproxy_response_latency_seconds_count", {"op": "find", "app": "app1"}) == 1
    assert val(reg, "mongoproxy_command_errors_total", {"op": "find", "code_name": "BadValue"}) == 1
    # without the server label the connect-time histogram has none either
    c2 = conn(cid=2)
    c2.upstream_connect_ns = 2 * MS
    sink.on_connection_open(c2)
    assert val(reg, "mongoproxy_server_connect_time_seconds_count") == 1


def test_client_label_is_the_host_only(reg):
    sink = MetricsSink(reg, labels=("op", "client"))
    for port in (40001, 40002, 40003):
        sink.on_command(command(conn(port=port)))
    assert val(reg, "mongoproxy_response_latency_seconds_count", {"op": "find", "client": "10.0.0.5"}) == 3


def test_label_cap_sends_overflow_to_other_and_counts_it(reg):
    sink = MetricsSink(reg, max_label_values=3)
    c = conn()
    sink.on_command(command(c, op="ping", coll=""))  # "" does not take one of the three places
    for i in range(10):
        sink.on_command(command(c, coll=f"coll{i}"))
    sink.on_command(command(c, coll="coll9"))  # an overflowed value stays overflowed, and is counted again
    sink.on_command(command(c, coll="coll1"))  # a kept value stays kept
    for i in range(3):
        assert val(reg, "mongoproxy_response_latency_seconds_count", dict(L, collection=f"coll{i}")) == (
            2 if i == 1 else 1
        )
    assert val(reg, "mongoproxy_response_latency_seconds_count", dict(L, collection="_other")) == 8
    assert val(reg, "mongoproxy_label_overflow_total", {"label": "collection"}) == 8
    assert val(reg, "mongoproxy_label_overflow_total", {"label": "op"}) is None
    assert val(reg, "mongoproxy_response_latency_seconds_count", dict(L, op="ping", collection="")) == 1
    # the error counter shares the cap
    sink.on_command(command(c, coll="coll7", ok=False, code_name="BadValue"))
    assert (
        val(
            reg,
            "mongoproxy_command_errors_total",
            {"op": "find", "db": "shop", "collection": "_other", "code_name": "BadValue"},
        )
        == 1
    )
    text = generate_latest(reg).decode()
    assert 'collection="coll5"' not in text


def test_connection_counters_and_bytes(reg, sink):
    a, b = conn(1), conn(2)
    sink.on_connection_open(a)
    sink.on_connection_open(b)
    assert val(reg, "mongoproxy_client_connections_established_total") == 2
    assert val(reg, "mongoproxy_connections_active") == 2
    a.bytes_from_client, a.bytes_from_server = 100, 1000
    b.bytes_from_client, b.bytes_from_server = 7, 70
    # live counters are read at scrape time: no event needed
    assert val(reg, "mongoproxy_client_bytes_received_total") == 107
    assert val(reg, "mongoproxy_client_bytes_sent_total") == 1070
    sink.on_connection_close(a)
    b.bytes_from_client += 3
    assert val(reg, "mongoproxy_connections_active") == 1
    assert val(reg, "mongoproxy_client_disconnections_total") == 1
    assert val(reg, "mongoproxy_client_bytes_received_total") == 110
    sink.on_connection_close(b)
    assert val(reg, "mongoproxy_connections_active") == 0
    assert val(reg, "mongoproxy_client_bytes_received_total") == 110
    assert val(reg, "mongoproxy_client_bytes_sent_total") == 1070


def test_connect_time_observed_once_whenever_it_becomes_known(reg, sink):
    known = conn(1)
    known.upstream_connect_ns = 3 * MS
    sink.on_connection_open(known)
    later = conn(2)
    sink.on_connection_open(later)  # the server opens before its upstream connect finishes
    later.upstream_connect_ns = 20 * MS
    sink.on_command(command(later))
    sink.on_command(command(later))
    idle = conn(3)
    sink.on_connection_open(idle)
    idle.upstream_connect_ns = 400 * MS
    sink.on_connection_close(idle)  # never sent a command
    failed = conn(4)
    sink.on_connection_open(failed)
    sink.on_connection_close(failed)  # upstream never connected
    sink.on_connection_close(known)
    lbl = {"server": "db1:27017"}
    assert val(reg, "mongoproxy_server_connect_time_seconds_count", lbl) == 3
    assert val(reg, "mongoproxy_server_connect_time_seconds_sum", lbl) == pytest.approx(0.423)
    assert val(reg, "mongoproxy_server_connect_time_seconds_bucket", dict(lbl, le="0.005")) == 1


def test_decode_upstream_unmatched_and_dropped(reg, sink):
    c = conn()
    sink.on_decode_error(DecodeErrorEvent(c, "request", "bad_length", "x", 0, True))
    sink.on_decode_error(DecodeErrorEvent(c, "request", "bad_length", "x", 0, True))
    sink.on_decode_error(DecodeErrorEvent(c, "reply", "bad_bson", "x", 0, False))
    sink.on_upstream_error(UpstreamConnectError(c, "refused", "x", 0))
    sink.on_unmatched_reply(c, 42)
    sink.on_requests_dropped(c, 3)
    sink.on_requests_dropped(c, 1)
    assert val(reg, "mongoproxy_decode_errors_total", {"direction": "request", "reason": "bad_length"}) == 2
    assert val(reg, "mongoproxy_decode_errors_total", {"direction": "reply", "reason": "bad_bson"}) == 1
    assert val(reg, "mongoproxy_upstream_connect_errors_total", {"reason": "refused"}) == 1
    assert val(reg, "mongoproxy_unmatched_replies_total") == 1
    assert val(reg, "mongoproxy_requests_dropped_total") == 4


class _Queued:
    name = "queued"

    def __init__(self):
        self.dropped = 0


class _Broken:
    name = "broken"

    def on_command(self, event):
        raise RuntimeError("bug")


def test_events_dropped_and_sink_errors_through_a_real_bus(reg, sink, caplog):
    q, broken = _Queued(), _Broken()
    sinks = [sink, q, broken]
    bus = SinkBus(sinks, logger=logging.getLogger("test.bus"))
    sink.watch(bus, sinks)  # what the server calls
    q.dropped = 5
    with caplog.at_level(logging.ERROR, "test.bus"):
        for _ in range(4):
            bus.command(command(conn()))
    assert val(reg, "mongoproxy_events_dropped_total", {"sink": "queued"}) == 5
    assert val(reg, "mongoproxy_events_dropped_total", {"sink": "metrics"}) is None
    assert val(reg, "mongoproxy_sink_errors_total", {"sink": "broken"}) == 4
    assert val(reg, "mongoproxy_sink_errors_total", {"sink": "metrics"}) == 0
    assert val(reg, "mongoproxy_response_latency_seconds_count", L) == 4  # the broken sink did not stop metrics


def test_scrape_in_another_thread_while_series_are_added(reg, sink):
    errors = []
    stop = threading.Event()

    def scrape():
        while not stop.is_set():
            try:
                generate_latest(reg)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    t = threading.Thread(target=scrape)
    t.start()
    try:
        for i in range(3000):
            c = conn(i)
            sink.on_connection_open(c)
            sink.on_command(command(c, coll=f"c{i}"))
            sink.on_connection_close(c)
    finally:
        stop.set()
        t.join()
    assert errors == []
    assert val(reg, "mongoproxy_client_connections_established_total") == 3000


# ---- options ----


def test_metric_labels_option():
    assert config_mod.build({}, env={}).metric_labels == metrics.DEFAULT_LABELS
    cfg = config_mod.build({"metric_labels": "collection, OP,client"}, env={})
    assert cfg.metric_labels == ("op", "collection", "client")
    cfg = config_mod.build({}, env={"MONGOPROXY_METRIC_LABELS": "op,db"})
    assert cfg.metric_labels == ("op", "db")
    cfg = config_mod.build({}, env={}, file_values={"metric_labels": ["op", "server"]})
    assert cfg.metric_labels == ("op", "server")


@pytest.mark.parametrize("raw", ["op,ip", "namespace", ",", ""])
def test_metric_labels_rejects_unknown_or_empty(raw):
    with pytest.raises(ConfigError) as exc:
        config_mod.build({"metric_labels": raw}, env={}) if raw else metrics.parse_metric_labels(raw)
    msg = str(exc.value)
    assert "\n" not in msg and "op,db,collection,app,server,replicaset,member_state,client" in msg


def test_latency_buckets_option():
    cfg = config_mod.build({"latency_buckets": "1, 0.5,0.001,1"}, env={})
    assert cfg.latency_buckets == (0.001, 0.5, 1.0)
    for raw, needle in (
        ("", "empty"),
        (" , ", "empty"),
        ("0.1,fast", "not a number"),
        ("0,1", "positive"),
        ("-1", "positive"),
        ("inf", "positive"),
        ("nan", "positive"),
    ):
        with pytest.raises(ConfigError) as exc:
            metrics.parse_latency_buckets(raw)
        assert needle in str(exc.value) and "e.g." in str(exc.value)
    with pytest.raises(ConfigError):
        config_mod.build({}, env={"MONGOPROXY_LATENCY_BUCKETS": "a,b"})


def test_max_label_values_option():
    assert config_mod.build({}, env={}).max_label_values == 1000
    assert config_mod.build({"max_label_values": "3"}, env={}).max_label_values == 3
    with pytest.raises(ConfigError):
        config_mod.build({"max_label_values": "0"}, env={})


def test_create_uses_the_config_and_is_always_on(reg):
    cfg = config_mod.build({"metric_labels": "op", "latency_buckets": "0.01,0.1", "max_label_values": "2"}, env={})
    sinks = build_sinks(cfg, SinkContext(registry=reg, version="1.2.3", mode="transparent"))
    sink = metrics.find(sinks)
    assert sink is not None and sink.labels == ("op",) and sink.latency_buckets == (0.01, 0.1)
    for op in ("a", "b", "c"):
        sink.on_command(command(conn(), op=op, latency_ms=50))
    assert val(reg, "mongoproxy_info", {"version": "1.2.3", "mode": "transparent", "upstream_tls": "off"}) == 1
    assert val(reg, "mongoproxy_response_latency_seconds_bucket", {"op": "a", "le": "0.1"}) == 1
    assert val(reg, "mongoproxy_response_latency_seconds_bucket", {"op": "a", "le": "0.01"}) == 0
    assert val(reg, "mongoproxy_response_latency_seconds_count", {"op": "_other"}) == 1
    assert val(reg, "mongoproxy_label_overflow_total", {"label": "op"}) == 1


def test_constructor_rejects_unknown_labels(reg):
    with pytest.raises(ConfigError):
        MetricsSink(reg, labels=("op", "__import__('os')"))


def test_error_counters_exist_at_zero_for_every_known_reason(reg, sink):
    from mongoproxy.events import UPSTREAM_ERROR_REASONS
    from mongoproxy.wire import DECODE_REASONS

    for direction in ("request", "reply"):
        for reason in DECODE_REASONS:
            assert val(reg, "mongoproxy_decode_errors_total", {"direction": direction, "reason": reason}) == 0
    for reason in UPSTREAM_ERROR_REASONS:
        assert val(reg, "mongoproxy_upstream_connect_errors_total", {"reason": reason}) == 0


def test_series_cap_per_family_sends_the_rest_to_other_and_counts_it(reg):
    """--max-series: label values each under the per-label cap still make at most N series per family."""
    sink = MetricsSink(reg, max_label_values=1000, max_series=5)
    c = conn()
    for op in ("find", "insert", "update"):
        for i in range(10):
            sink.on_command(command(c, op=op, coll=f"coll{i}", ok=False, code_name="BadValue"))
    text = generate_latest(reg).decode()
    lat = [line for line in text.splitlines() if line.startswith("mongoproxy_response_latency_seconds_count")]
    assert len(lat) == 6  # five label sets and the overflow series
    other = {k: "_other" for k in L}
    assert val(reg, "mongoproxy_response_latency_seconds_count", other) == 25
    assert val(reg, "mongoproxy_series_overflow_total", {"metric": "mongoproxy_response_latency_seconds"}) == 25
    errors = [line for line in text.splitlines() if line.startswith("mongoproxy_command_errors_total")]
    assert len(errors) == 6
    assert val(reg, "mongoproxy_series_overflow_total", {"metric": "mongoproxy_command_errors_total"}) == 25
    # connect time: one series per server
    for i in range(8):
        sc = conn(cid=100 + i, server=(f"db{i}", 27017))
        sc.upstream_connect_ns = 1_000_000
        sink.on_connection_open(sc)
    assert val(reg, "mongoproxy_server_connect_time_seconds_count", {"server": "_other"}) == 3
    assert val(reg, "mongoproxy_series_overflow_total", {"metric": "mongoproxy_server_connect_time_seconds"}) == 3


def test_max_series_option():
    assert config_mod.build({}, env={}).max_series == 10_000
    assert config_mod.build({"max_series": "50"}, env={}).max_series == 50
    with pytest.raises(ConfigError):
        config_mod.build({"max_series": "0"}, env={})


def test_the_compiled_key_reads_every_label_the_sink_offers_in_order():
    """sinks/_series.pyx builds the per-command key; its label list is metrics.LABEL_SOURCES's, in order."""
    from mongoproxy.sinks import _series

    assert _series.LABELS == tuple(metrics.LABEL_SOURCES)
    with pytest.raises(ValueError):
        _series.MetricsHook(None, ("op", "nope"), {})
