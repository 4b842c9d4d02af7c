"""The tracing sink, fed CommandEvents directly (no sockets): sampling, spans, cursor inheritance, drops, create()."""

from __future__ import annotations

import io
import json
import logging
import random
import sys
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("opentelemetry.sdk", reason="tracing needs pip install 'mongoproxy[tracing]'")

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from mongoproxy import config as config_mod  # noqa: E402
from mongoproxy import querylog  # noqa: E402
from mongoproxy.errors import ConfigError  # noqa: E402
from mongoproxy.events import CommandEvent, Connection, wall_ns  # noqa: E402
from mongoproxy.sinks import (
    SinkContext,  # noqa: E402
    otlp,  # noqa: E402
    otlp_encode,  # noqa: E402
    tracing,  # noqa: E402
)
from mongoproxy.sinks.tracing import TracingSink  # noqa: E402

TRACE = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN = 0x00F067AA0BA902B7
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TP_UNSAMPLED = TP[:-2] + "00"

# Every ScanResult field (mongoproxy/_bson_parser.pyi); the sink reads a few of them.
SCAN_FIELDS = (
    "checksum command collection database namespace cursor_id comment comment_traceparent comment_tracestate "
    "app_name driver_name driver_version compression query_shape ok code code_name errmsg cursor_ns returned n "
    "n_modified upserted write_errors write_error_code write_error_code_name write_concern_error_code "
    "write_concern_error_code_name last_error_n set_name me max_wire_version"
).split()


def scan(opcode: int = 2013, **fields) -> SimpleNamespace:
    """A ScanResult-shaped value: the given fields, every other one None."""
    values = dict.fromkeys(SCAN_FIELDS)
    values.update(opcode=opcode, flags=0, documents=0)
    unknown = set(fields) - set(values)
    assert not unknown, unknown
    values.update(fields)
    return SimpleNamespace(**values)


def connection(host: str = "10.0.0.5", port: int = 27017) -> Connection:
    return Connection(id=7, client_host="192.0.2.14", client_port=50123, upstream_host=host, upstream_port=port)


CONN = connection()
_clock = [time.monotonic_ns()]


def command(
    op: str = "find",
    collection: str = "users",
    database: str = "shop",
    *,
    conn: Connection = CONN,
    comment=None,
    doc_traceparent=None,
    doc_tracestate=None,
    request_cursor=None,
    cursor_id=None,
    ok=True,
    code=None,
    code_name="",
    returned=None,
    query_shape=None,
    opcode: int = 2013,
    reply: dict | None = None,
    no_reply: bool = False,
) -> CommandEvent:
    """A CommandEvent as the tracker would emit it, 1 ms after the previous one, lasting 250 µs."""
    _clock[0] += 1_000_000
    t0 = _clock[0]
    req = scan(
        opcode,
        command=op,
        collection=collection or None,
        database=database,
        comment=comment,
        comment_traceparent=doc_traceparent,
        comment_tracestate=doc_tracestate,
        cursor_id=request_cursor,
        query_shape=query_shape,
    )
    ev = CommandEvent(
        connection=conn,
        op=op,
        database=database,
        collection=collection,
        request_id=1,
        request_opcode=opcode,
        request_size=120,
        request_first_ns=t0,
        request_last_ns=t0 + 10_000,
        request=req,
    )
    if no_reply:
        ev.more_to_come_request = True
        return ev
    ev.reply_opcode = 2013
    ev.reply_size = 800
    ev.reply_first_ns = t0 + 200_000
    ev.reply_last_ns = t0 + 250_000
    ev.reply = scan(
        ok=1.0 if ok else 0.0,
        code=code,
        code_name=code_name or None,
        returned=returned,
        cursor_id=cursor_id,
        **(reply or {}),
    )
    ev.ok = ok
    ev.code = code
    ev.code_name = code_name
    ev.documents_returned = returned
    ev.cursor_id = cursor_id
    return ev


class SequenceRandom(random.Random):
    """random() answers from a fixed list (then 0.99); ids still come from a seeded generator."""

    def __init__(self, values):
        super().__init__(1234)
        self.values = list(values)

    def random(self):
        return self.values.pop(0) if self.values else 0.99


@pytest.fixture
def make():
    """make(**kw) -> (sink, in-memory exporter); every sink is closed at the end."""
    sinks = []

    def _make(exporter=None, **kw):
        exporter = exporter if exporter is not None else InMemorySpanExporter()
        kw.setdefault("close_timeout_seconds", 5.0)
        sink = TracingSink([("memory", exporter)], **kw)
        sinks.append(sink)
        return sink, exporter

    yield _make
    for s in sinks:
        s.close()


def spans_of(sink, exporter):
    sink.flush()
    return list(exporter.get_finished_spans())


# ---------------------------------------------------------------- the span


def test_find_with_traceparent_comment_is_a_child_of_the_callers_span(make):
    sink, exp = make()
    ev = command(comment=TP, returned=3, cursor_id=0)
    sink.on_command(ev)
    [span] = spans_of(sink, exp)
    assert span.name == "find users"
    assert span.kind is SpanKind.CLIENT
    assert span.context.trace_id == TRACE
    assert span.context.span_id not in (0, SPAN)
    assert span.context.trace_flags.sampled
    assert span.parent.trace_id == TRACE and span.parent.span_id == SPAN and span.parent.is_remote
    assert span.start_time == wall_ns(ev.request_first_ns)
    assert span.end_time == wall_ns(ev.reply_last_ns)
    assert span.end_time - span.start_time == 250_000
    assert dict(span.attributes) == {
        "db.system.name": "mongodb",
        "db.namespace": "shop",
        "db.collection.name": "users",
        "db.operation.name": "find",
        "db.query.summary": "find users",
        "server.address": "10.0.0.5",
        "server.port": 27017,
        "network.peer.address": "192.0.2.14",
        "network.peer.port": 50123,
        "network.transport": "tcp",
        "db.response.returned_rows": 3,
        "mongoproxy.request.size": 120,
        "mongoproxy.response.size": 800,
    }
    assert span.status.status_code is StatusCode.UNSET
    assert span.instrumentation_scope.name == "mongoproxy"
    assert sink.spans == 1 and sink.dropped == 0


def test_span_name_without_collection_and_open_cursor_id(make):
    sink, exp = make()
    sink.on_command(command("ping", collection="", database="admin", comment=TP))
    sink.on_command(command("aggregate", collection="orders", comment=TP, cursor_id=998877, returned=101))
    ping, agg = spans_of(sink, exp)
    assert ping.name == "ping"
    assert "db.collection.name" not in ping.attributes
    assert ping.attributes["db.namespace"] == "admin"
    assert agg.name == "aggregate orders"
    assert agg.attributes["db.mongodb.cursor_id"] == 998877


def test_document_comment_with_tracestate(make):
    sink, exp = make()
    sink.on_command(command(doc_traceparent=TP, doc_tracestate="rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"))
    [span] = spans_of(sink, exp)
    assert span.context.trace_id == TRACE and span.parent.span_id == SPAN
    assert list(span.context.trace_state.items()) == [("rojo", "00f067aa0ba902b7"), ("congo", "t61rcWkgMzE")]


def test_uber_trace_id_comment(make):
    sink, exp = make()
    sink.on_command(command(comment="uber-trace-id:a3ce929d0e0e4736:00f067aa0ba902b7:0:1"))
    [span] = spans_of(sink, exp)
    assert span.context.trace_id == 0xA3CE929D0E0E4736  # a 64-bit Jaeger id, zero-extended
    assert span.parent.span_id == SPAN


def test_unacknowledged_write_ends_at_the_requests_last_byte(make):
    sink, exp = make()
    ev = command("insert", comment=TP, no_reply=True)
    sink.on_command(ev)
    [span] = spans_of(sink, exp)
    assert span.end_time == wall_ns(ev.request_last_ns)
    assert "mongoproxy.response.size" not in span.attributes


@pytest.mark.parametrize(
    "doc, trace_id",
    [
        ({"find": "users", "filter": {}, "comment": f"checkout traceparent={TP}"}, TRACE),
        ({"find": "users", "comment": {"traceparent": TP, "tracestate": "rojo=1"}}, TRACE),
        (
            {"find": "users", "filter": {"$comment": "uber-trace-id:a3ce929d0e0e4736:00f067aa0ba902b7:0:1", "x": 1}},
            0xA3CE929D0E0E4736,
        ),
    ],
)
def test_context_through_the_real_scanner(make, doc, trace_id):
    import struct

    import bson

    from mongoproxy._bson_parser import OP_MSG, scan_body

    req = scan_body(OP_MSG, False, struct.pack("<I", 0) + b"\x00" + bson.encode({**doc, "$db": "shop"}))
    ev = command()
    ev.request = req
    sink, exp = make()
    sink.on_command(ev)
    [span] = spans_of(sink, exp)
    assert span.context.trace_id == trace_id and span.parent.span_id == SPAN


# ---------------------------------------------------------------- failures


def test_failed_command_has_status_error_and_its_code(make):
    sink, exp = make()
    sink.on_command(command("find", comment=TP, ok=False, code=2, code_name="BadValue"))
    [span] = spans_of(sink, exp)
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "BadValue"
    assert span.attributes["db.response.status_code"] == "2"
    assert span.attributes["error.type"] == "BadValue"


def test_write_error_is_a_failure_with_the_first_write_errors_code(make):
    sink, exp = make()
    sink.on_command(
        command(
            "insert",
            comment=TP,
            reply={"n": 0, "write_errors": 1, "write_error_code": 11000, "write_error_code_name": "DuplicateKey"},
        )
    )
    [span] = spans_of(sink, exp)
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["db.response.status_code"] == "11000"
    assert span.attributes["error.type"] == "DuplicateKey"


def test_failure_without_code_name(make):
    sink, exp = make()
    # MongoDB's writeErrors carry no codeName: the known name of the code stands in.
    sink.on_command(command("insert", comment=TP, reply={"write_errors": 1, "write_error_code": 11000}))
    assert spans_of(sink, exp)[-1].attributes["error.type"] == "DuplicateKey"
    sink.on_command(command("find", comment=TP, ok=False, code=987654))
    assert spans_of(sink, exp)[-1].attributes["error.type"] == "987654"
    assert spans_of(sink, exp)[-1].attributes["db.response.status_code"] == "987654"
    sink.on_command(command("find", comment=TP, ok=False))
    assert spans_of(sink, exp)[-1].attributes["error.type"] == "_OTHER"


# ---------------------------------------------------------------- sampling


def test_context_flag_not_sampled_gives_no_span(make):
    sink, exp = make(sample_ratio=1.0)
    sink.on_command(command(comment=TP_UNSAMPLED))
    assert spans_of(sink, exp) == []


def test_no_context_ratio_zero_gives_no_span(make):
    sink, exp = make(sample_ratio=0.0)
    sink.on_command(command())
    sink.on_command(command("insert", comment="nightly import"))
    assert spans_of(sink, exp) == []
    assert sink.spans == 0


def test_ratio_one_traces_every_command_as_a_new_trace(make):
    sink, exp = make(sample_ratio=1.0)
    for op in ("find", "insert", "update", "delete", "aggregate"):
        sink.on_command(command(op))
    spans = spans_of(sink, exp)
    assert [s.name.split()[0] for s in spans] == ["find", "insert", "update", "delete", "aggregate"]
    assert all(s.parent is None for s in spans)
    assert len({s.context.trace_id for s in spans}) == 5


def test_ratio_sampling_follows_the_random_draw(make):
    sink, exp = make(sample_ratio=0.25, rng=SequenceRandom([0.1, 0.3, 0.2499, 0.25, 0.9]))
    for i in range(5):
        sink.on_command(command("insert", collection=f"c{i}"))
    assert [s.name for s in spans_of(sink, exp)] == ["insert c0", "insert c2"]


def test_ratio_never_starts_traces_for_handshake_or_auth(make):
    sink, exp = make(sample_ratio=1.0)
    for op in ("hello", "isMaster", "saslStart", "saslContinue"):
        sink.on_command(command(op, collection="", database="admin"))
    assert spans_of(sink, exp) == []
    sink.on_command(command("hello", collection="", database="admin", comment=TP))  # a context still counts
    assert len(spans_of(sink, exp)) == 1


def test_malformed_context_is_ignored_with_a_debug_log(make, caplog):
    sink, exp = make(logger=logging.getLogger("test.tracing"))
    with caplog.at_level(logging.DEBUG, logger="test.tracing"):
        sink.on_command(command(comment="traceparent=00-nothex-01"))
        sink.on_command(command(comment="uber-trace-id:zz:1:0:1"))
    assert spans_of(sink, exp) == []
    assert sink.malformed == 2
    records = [r for r in caplog.records if r.name == "test.tracing"]
    assert len(records) == 2 and all(r.levelno == logging.DEBUG for r in records)
    assert "traceparent" in records[0].getMessage() and "shop.users" in records[0].getMessage()


def test_malformed_context_falls_back_to_ratio_sampling(make):
    sink, exp = make(sample_ratio=1.0)
    sink.on_command(command(comment="traceparent=bogus"))
    [span] = spans_of(sink, exp)
    assert span.parent is None


def test_trace_query_adds_the_redacted_query_text(make):
    shape = '{"find": "users", "filter": {"email": "?"}}'
    sink, exp = make(trace_query=True)
    sink.on_command(command(comment=TP, query_shape=shape))
    attrs = spans_of(sink, exp)[0].attributes
    assert attrs["db.query.text"] == '{"find":"users","filter":{"email":"?"}}'  # the command log's text
    assert attrs["mongoproxy.query.shape"] == querylog.prepare(shape, "find", False)[1]
    quiet, exp2 = make(trace_query=False)
    quiet.on_command(command(comment=TP, query_shape=shape))
    assert "db.query.text" not in spans_of(quiet, exp2)[0].attributes


# ---------------------------------------------------------------- cursors


def test_getmore_and_killcursors_inherit_the_finds_context(make):
    sink, exp = make()
    sink.on_command(command("find", comment=TP, cursor_id=42, returned=2))
    sink.on_command(command("getMore", request_cursor=42, cursor_id=42, returned=2))
    sink.on_command(command("getMore", request_cursor=42, cursor_id=42, returned=2))
    sink.on_command(command("killCursors", request_cursor=42))
    find, gm1, gm2, kill = spans_of(sink, exp)
    for span in (gm1, gm2, kill):
        assert span.context.trace_id == TRACE
        # Siblings of the find under the application's span, linked to the find.
        assert span.parent.span_id == SPAN and span.parent.is_remote
        assert [link.context.span_id for link in span.links] == [find.context.span_id]
        assert span.attributes["db.mongodb.cursor_id"] == 42
    assert gm1.name == "getMore users"
    assert sink.open_cursors == 0  # killCursors forgot it
    sink.on_command(command("getMore", request_cursor=42, cursor_id=42))
    assert len(spans_of(sink, exp)) == 4


def test_exhausted_cursor_is_forgotten(make):
    sink, exp = make()
    sink.on_command(command("find", comment=TP, cursor_id=7))
    assert sink.open_cursors == 1
    sink.on_command(command("getMore", request_cursor=7, cursor_id=0))
    assert sink.open_cursors == 0
    assert len(spans_of(sink, exp)) == 2


def test_failed_getmore_forgets_the_cursor(make):
    sink, exp = make()
    sink.on_command(command("find", comment=TP, cursor_id=7))
    sink.on_command(command("getMore", request_cursor=7, ok=False, code=43, code_name="CursorNotFound"))
    assert sink.open_cursors == 0
    assert spans_of(sink, exp)[-1].attributes["error.type"] == "CursorNotFound"


def test_getmore_of_a_sampled_root_trace_is_a_child_of_the_find(make):
    sink, exp = make(sample_ratio=0.5, rng=SequenceRandom([0.1]))  # the find is sampled, later draws are not
    sink.on_command(command("find", cursor_id=9))
    sink.on_command(command("getMore", request_cursor=9, cursor_id=0))
    find, gm = spans_of(sink, exp)
    assert find.parent is None
    assert gm.context.trace_id == find.context.trace_id
    assert gm.parent.span_id == find.context.span_id and not gm.parent.is_remote
    assert gm.links == ()


def test_getmore_of_an_unsampled_find_is_not_traced_even_when_the_ratio_would_pick_it(make):
    sink, exp = make(sample_ratio=0.5, rng=SequenceRandom([0.9, 0.1, 0.1]))
    sink.on_command(command("find", cursor_id=9))  # 0.9: not sampled
    sink.on_command(command("getMore", request_cursor=9, cursor_id=9))  # would draw 0.1
    sink.on_command(command("find", comment=TP_UNSAMPLED, cursor_id=10))
    sink.on_command(command("getMore", request_cursor=10, cursor_id=10))
    assert spans_of(sink, exp) == []


def test_cursors_are_per_server(make):
    sink, exp = make()
    other = connection("10.0.0.6")
    sink.on_command(command("find", comment=TP, cursor_id=5))
    sink.on_command(command("getMore", conn=other, request_cursor=5, cursor_id=5))  # same id, other server
    assert len(spans_of(sink, exp)) == 1


def test_cursor_map_is_bounded_in_size(make):
    sink, exp = make(cursor_map_size=3)
    for cid in range(1, 6):
        sink.on_command(command("find", comment=TP, cursor_id=cid))
    assert sink.open_cursors == 3 and sink.cursors_evicted == 2
    sink.on_command(command("getMore", request_cursor=1, cursor_id=1))  # evicted: not traced
    sink.on_command(command("getMore", request_cursor=5, cursor_id=5))
    assert [s.attributes.get("db.mongodb.cursor_id") for s in spans_of(sink, exp)][-1] == 5
    assert len(spans_of(sink, exp)) == 6


def test_cursor_map_entries_expire(make):
    sink, exp = make(cursor_ttl_seconds=0.0015)  # events are 1 ms apart
    sink.on_command(command("find", comment=TP, cursor_id=1))
    sink.on_command(command("getMore", request_cursor=1, cursor_id=1))  # 1 ms later: alive, refreshed
    _clock[0] += 5_000_000
    sink.on_command(command("getMore", request_cursor=1, cursor_id=1))  # 6 ms later: expired
    assert len(spans_of(sink, exp)) == 2
    assert sink.cursors_expired == 1 and sink.open_cursors == 0
    sink.on_command(command("find", comment=TP, cursor_id=2))
    _clock[0] += 5_000_000
    sink.on_command(command("find", comment=TP, cursor_id=3))  # opening a cursor sweeps expired ones
    assert sink.open_cursors == 1 and sink.cursors_expired == 2


def test_legacy_op_get_more_inherits_too(make):
    sink, exp = make()
    sink.on_command(command("query", comment=TP, cursor_id=77, opcode=2004))
    sink.on_command(command("op_get_more", request_cursor=77, cursor_id=0, opcode=2005))
    query, gm = spans_of(sink, exp)
    assert gm.context.trace_id == TRACE and gm.name == "op_get_more users"


# ---------------------------------------------------------------- export: queue, failures, close


class BlockingExporter(SpanExporter):
    """Holds the export thread until released, like a collector that does not answer."""

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Event()
        self.spans = []

    def export(self, spans):
        self.entered.set()
        self.release.wait(10)
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self):
        self.release.set()


class FailingExporter(SpanExporter):
    """A collector that answers 503 to everything (through the SDK's logger, as the OTLP exporter does)."""

    def __init__(self):
        self.calls = 0

    def export(self, spans):
        self.calls += 1
        logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter").error(
            "Failed to export spans batch code: 503, reason: Service Unavailable"
        )
        return SpanExportResult.FAILURE


def test_full_queue_drops_and_counts_without_blocking(make, caplog):
    blocking = BlockingExporter()
    sink, _ = make(
        exporter=blocking,
        max_queue_size=4,
        max_export_batch_size=1,
        schedule_delay_millis=10,
        logger=logging.getLogger("test.tracing"),
    )
    sink.on_command(command(comment=TP))
    assert blocking.entered.wait(5)  # the export thread holds one span and is stuck
    with caplog.at_level(logging.INFO, logger="test.tracing"):
        for _ in range(20):
            sink.on_command(command(comment=TP))
        assert sink.spans == 21
        assert sink.dropped == 16  # 1 in the exporter, 4 queued
        warnings = [r for r in caplog.records if r.name == "test.tracing" and r.levelno == logging.WARNING]
        assert len(warnings) == 1, "one warning for the burst, not one per span"
        assert "queue is full" in warnings[0].getMessage()
        blocking.release.set()
        sink.close()
    assert len(blocking.spans) == 5
    assert sink.dropped == 16
    assert [r.getMessage() for r in caplog.records if "works again" in r.getMessage()] == [
        "exporting spans to memory works again"
    ]


def test_failed_exports_are_counted_and_warned_about_once_a_minute(make, caplog):
    failing = FailingExporter()
    sink, _ = make(
        exporter=failing,
        max_export_batch_size=2,
        logger=logging.getLogger("test.tracing"),
        destination="http://collector.invalid:4318/v1/traces",
    )
    sink._exports[0].label = "otlp"
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            for _ in range(2):
                sink.on_command(command(comment=TP))
            sink.flush()
    assert failing.calls == 3
    assert sink.dropped == 6
    ours = [r for r in caplog.records if r.name == "test.tracing"]
    assert len(ours) == 1
    msg = ours[0].getMessage()
    assert "http://collector.invalid:4318/v1/traces" in msg and "503" in msg
    # The SDK's own per-batch error lines are folded into ours.
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]


def test_export_recovers_after_failures(make, caplog):
    class Flaky(SpanExporter):
        ok = False

        def export(self, spans):
            return SpanExportResult.SUCCESS if self.ok else SpanExportResult.FAILURE

    flaky = Flaky()
    sink, _ = make(exporter=flaky, logger=logging.getLogger("test.tracing"))
    sink.on_command(command(comment=TP))
    sink.flush()
    flaky.ok = True
    with caplog.at_level(logging.INFO, logger="test.tracing"):
        sink.on_command(command(comment=TP))
        sink.flush()
    assert sink.dropped == 1 and sink.exported == 1
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_exporter_exception_is_a_counted_failure(make):
    class Broken(SpanExporter):
        def export(self, spans):
            raise RuntimeError("boom")

    sink, _ = make(exporter=Broken())
    sink.on_command(command(comment=TP))
    sink.flush()
    assert sink.dropped == 1


def test_close_flushes_queued_spans(make):
    sink, exp = make(schedule_delay_millis=60_000)
    for _ in range(3):
        sink.on_command(command(comment=TP))
    sink.close()
    assert len(exp.get_finished_spans()) == 3
    assert sink.dropped == 0
    sink.on_command(command(comment=TP))  # after close: ignored
    assert sink.spans == 3


def test_close_gives_up_on_an_unreachable_collector_and_counts_the_loss(make):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from tests.support.ports import free_port

    port = free_port("127.0.0.1")  # nothing listens there
    sink, _ = make(
        exporter=OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}/v1/traces", timeout=30),
        schedule_delay_millis=60_000,
        close_timeout_seconds=0.5,
    )
    for _ in range(5):
        sink.on_command(command(comment=TP))
    sink.close()
    assert sink.dropped == 5 and sink.exported == 0


# ---------------------------------------------------------------- options and create()


def build(env=None, **flags):
    return config_mod.build({k: v for k, v in flags.items()}, env=env or {})


def ctx(**extra):
    extra.setdefault("environ", {})
    from prometheus_client import CollectorRegistry

    return SinkContext(
        registry=CollectorRegistry(),
        version="9.9.9",
        mode="static",
        logger=logging.getLogger("test.mongoproxy"),
        extra=extra,
    )


@pytest.fixture
def created():
    sinks = []

    def _create(cfg, context=None):
        sink = tracing.create(cfg, context or ctx())
        if sink is not None:
            sinks.append(sink)
        return sink

    yield _create
    for s in sinks:
        s.close()


def test_option_dests_and_defaults():
    cfg = build()
    assert cfg.otlp_endpoint is None and cfg.otlp_protocol is None and cfg.service_name is None
    assert cfg.trace_sample_ratio == 0.0 and cfg.trace_console is False and cfg.trace_query is False
    cfg = build(
        otlp_endpoint="http://c:4318",
        otlp_protocol="grpc",
        service_name="orders",
        trace_sample_ratio="0.25",
        trace_console=True,
        trace_query=True,
    )
    assert (cfg.otlp_endpoint, cfg.otlp_protocol, cfg.service_name) == ("http://c:4318", "grpc", "orders")
    assert (cfg.trace_sample_ratio, cfg.trace_console, cfg.trace_query) == (0.25, True, True)
    assert build(env={"MONGOPROXY_TRACE_SAMPLE_RATIO": "1"}).trace_sample_ratio == 1.0


@pytest.mark.parametrize("raw", ["1.5", "-0.1", "nan", "inf", "half", ""])
def test_bad_sample_ratio_is_one_line_naming_the_fix(raw):
    with pytest.raises(ConfigError) as err:
        build(trace_sample_ratio=raw)
    msg = str(err.value)
    assert "\n" not in msg and "--trace-sample-ratio" in msg and "from 0 to 1" in msg


@pytest.mark.parametrize(
    "raw", ["collector:4318", "ftp://c:21", "http://", "http://c:99999", "grpc://c:4317", "http://c:port"]
)
def test_bad_endpoint_is_one_line_naming_the_fix(raw):
    with pytest.raises(ConfigError) as err:
        build(otlp_endpoint=raw)
    msg = str(err.value)
    assert "\n" not in msg and "http://otel-collector:4318" in msg


def test_bad_endpoint_from_the_environment_names_the_variable(created):
    with pytest.raises(ConfigError, match="^MONGOPROXY_OTLP_ENDPOINT: "):
        build(env={"MONGOPROXY_OTLP_ENDPOINT": "nope"})
    with pytest.raises(ConfigError, match="^OTEL_EXPORTER_OTLP_ENDPOINT: .*http://otel-collector:4318"):
        created(build(), ctx(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4318"}))


def test_bad_protocol():
    with pytest.raises(ConfigError, match="http/protobuf or grpc"):
        build(otlp_protocol="thrift")
    with pytest.raises(ConfigError, match="http/json is not supported"):
        build(otlp_protocol="http/json")
    assert build(otlp_protocol="HTTP").otlp_protocol == "http/protobuf"


def test_endpoint_resolution():
    r = otlp.resolve_endpoint
    assert r("http://c:4318", "http/protobuf", {}) == ("http://c:4318/v1/traces", "--otlp-endpoint")
    assert r("http://c:4318/", "http/protobuf", {}) == ("http://c:4318/v1/traces", "--otlp-endpoint")
    assert r("https://c/otlp/v1/traces", "http/protobuf", {})[0] == "https://c/otlp/v1/traces"
    assert r("http://c:4317", "grpc", {})[0] == "http://c:4317"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://base:4318/", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x"}
    assert r(None, "http/protobuf", env) == ("http://t:1/x", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    del env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    assert r(None, "http/protobuf", env) == ("http://base:4318/v1/traces", "OTEL_EXPORTER_OTLP_ENDPOINT")
    assert r(None, "grpc", env)[0] == "http://base:4318/"
    assert r("http://flag:1", "http/protobuf", env)[0] == "http://flag:1/v1/traces"
    assert r(None, "http/protobuf", {}) == (None, "")


def test_protocol_resolution():
    assert otlp.resolve_protocol(None, {}) == "http/protobuf"
    assert otlp.resolve_protocol(None, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == "grpc"
    assert (
        otlp.resolve_protocol(
            None, {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
        )
        == "http/protobuf"
    )
    assert otlp.resolve_protocol("http/protobuf", {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == "http/protobuf"
    with pytest.raises(ConfigError, match="^OTEL_EXPORTER_OTLP_PROTOCOL: "):
        otlp.resolve_protocol(None, {"OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


def test_create_is_off_when_tracing_cannot_produce_spans(created):
    assert created(build()) is None
    assert created(build(trace_query=True)) is None


def test_create_with_ratio_exports_to_the_default_collector(created):
    sink = created(build(trace_sample_ratio="0.1"))
    assert sink.destination == "http://localhost:4318/v1/traces"
    assert sink.sample_ratio == 0.1


def test_create_with_an_endpoint_and_ratio_zero_traces_commands_with_a_context(created):
    sink = created(build(), ctx(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318"}))
    assert sink is not None and sink.destination == "http://otel:4318/v1/traces" and sink.sample_ratio == 0.0
    sink = created(build(otlp_endpoint="http://flag:4318"))
    assert sink.destination == "http://flag:4318/v1/traces"


def test_create_console_only_prints_one_json_object_per_span(created):
    out = io.StringIO()
    sink = created(build(trace_console=True), ctx(console_out=out))
    assert sink.destination == ""
    sink.on_command(command(comment=TP))
    sink.on_command(command(comment=TP))  # without context: not traced (ratio 0)
    sink.on_command(command())
    sink.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    span = json.loads(lines[0])
    assert span["name"] == "find users" and span["context"]["trace_id"] == f"0x{TRACE:032x}"
    assert span["kind"] == "SpanKind.CLIENT"
    assert span["resource"]["attributes"]["service.name"] == "mongoproxy"


def test_create_service_name_precedence(created, monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    out = io.StringIO()
    sink = created(build(trace_console=True), ctx(console_out=out))
    assert sink.resource.attributes["service.name"] == "mongoproxy"
    assert sink.resource.attributes["service.version"] == "9.9.9"
    sink = created(build(trace_console=True), ctx(console_out=out, environ={"OTEL_SERVICE_NAME": "from-env"}))
    assert sink.resource.attributes["service.name"] == "from-env"
    sink = created(
        build(trace_console=True, service_name="from-flag"),
        ctx(console_out=out, environ={"OTEL_SERVICE_NAME": "from-env"}),
    )
    assert sink.resource.attributes["service.name"] == "from-flag"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-resource,deployment.environment=prod")
    sink = created(build(trace_console=True), ctx(console_out=out))
    assert sink.resource.attributes["service.name"] == "from-resource"
    assert sink.resource.attributes["deployment.environment"] == "prod"


def test_create_honours_the_batch_processor_variables(created):
    sink = created(
        build(trace_sample_ratio="1"), ctx(environ={"OTEL_BSP_MAX_QUEUE_SIZE": "40", "OTEL_BSP_SCHEDULE_DELAY": "50"})
    )
    assert sink._exports[0].max_queue_size == 40  # and the batch shrank to fit (the SDK refuses a bigger one)
    with pytest.raises(ConfigError, match="^OTEL_BSP_MAX_EXPORT_BATCH_SIZE 'lots' is not a whole number"):
        created(build(trace_sample_ratio="1"), ctx(environ={"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "lots"}))
    with pytest.raises(ConfigError, match="^OTEL_BSP_MAX_QUEUE_SIZE must be positive"):
        created(build(trace_sample_ratio="1"), ctx(environ={"OTEL_BSP_MAX_QUEUE_SIZE": "0"}))


def test_create_honours_otel_sdk_disabled(created):
    assert created(build(trace_sample_ratio="1"), ctx(environ={"OTEL_SDK_DISABLED": "true"})) is None


def test_create_grpc_without_the_grpc_exporter_names_the_extra(created):
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the grpc exporter is installed here")  # the message is only reachable without it
    with pytest.raises(ConfigError) as err:
        created(build(otlp_endpoint="http://c:4317", otlp_protocol="grpc"))
    assert "pip install 'mongoproxy[grpc]'" in str(err.value) and "\n" not in str(err.value)


def test_create_without_the_sdk_names_the_extra(created, monkeypatch):
    # An entry of None in sys.modules makes the import fail as if the package were not installed.
    for name in [m for m in sys.modules if m.startswith("opentelemetry.sdk")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)
    with pytest.raises(ConfigError) as err:
        created(build(trace_sample_ratio="1"))
    assert "pip install 'mongoproxy[tracing]'" in str(err.value) and "\n" not in str(err.value)
    assert created(build()) is None  # no tracing asked for: no error


def test_trace_query_is_refused_with_no_redact(created, caplog):
    cfg = build(trace_console=True, trace_query=True)
    if "no_redact" not in cfg:
        pytest.skip("the command log's --no-redact option is not in this tree")
    cfg = cfg.replace(no_redact=True)
    with caplog.at_level(logging.WARNING):
        sink = created(cfg, ctx(console_out=io.StringIO()))
    assert sink.trace_query is False
    assert any("--trace-query is ignored with --no-redact" in r.getMessage() for r in caplog.records)


def test_dropped_is_an_int_for_the_metrics_sink(make):
    sink, _ = make()
    assert isinstance(sink.dropped, int) and not isinstance(sink.dropped, bool)


# ---------------------------------------------------------------- the OTLP protobuf writer


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from opentelemetry.attributes import BoundedAttributes  # noqa: E402
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans  # noqa: E402
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import Event, ReadableSpan  # noqa: E402
from opentelemetry.sdk.util import BoundedList  # noqa: E402
from opentelemetry.sdk.util.instrumentation import InstrumentationScope  # noqa: E402
from opentelemetry.trace import Link, SpanContext, Status, TraceFlags, TraceState  # noqa: E402


def decoded(data: bytes) -> ExportTraceServiceRequest:
    msg = ExportTraceServiceRequest()
    msg.ParseFromString(data)
    return msg


def assert_same_as_sdk(spans):
    ours = decoded(otlp_encode.encode_spans(spans))
    theirs = decoded(sdk_encode_spans(spans).SerializeToString())
    assert ours == theirs, f"ours:\n{ours}\nSDK:\n{theirs}"


def test_encoder_matches_the_sdk_on_the_sinks_own_spans(make):
    sink, exp = make(sample_ratio=1.0, trace_query=True)
    sink.on_command(
        command(
            doc_traceparent=TP,
            doc_tracestate="rojo=1,congo=2",
            cursor_id=5,
            returned=101,
            query_shape='{"find": "users", "filter": {"x": "?"}}',
        )
    )
    sink.on_command(command("getMore", request_cursor=5, cursor_id=0, returned=3))
    sink.on_command(command("insert", ok=False, code=11000, code_name="DuplicateKey"))
    sink.on_command(command("ping", collection="", comment="uber-trace-id:1:2:0:1"))
    sink.on_command(command("update", no_reply=True))
    spans = spans_of(sink, exp)
    assert len(spans) == 5
    assert_same_as_sdk(spans)


_values = st.one_of(
    st.text(max_size=20),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.binary(max_size=8),
    st.lists(st.text(max_size=5), max_size=3),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
    st.lists(st.booleans(), max_size=3),
    st.lists(st.floats(allow_nan=False), max_size=3),
)
_attrs = st.dictionaries(st.text(min_size=1, max_size=12), _values, max_size=6)
_ids = st.integers(1, 2**64 - 1)


@st.composite
def sdk_spans(draw):
    resources = [Resource.create({"service.name": "a"}), Resource({"k": 1, "l": [1, 2]}, "https://schema/1")]
    scopes = [
        InstrumentationScope("mongoproxy", "1.2"),
        InstrumentationScope("x", None, "https://s/2", {"a": "b"}),
        None,
    ]
    spans = []
    for _ in range(draw(st.integers(1, 4))):
        state = TraceState(
            draw(
                st.lists(
                    st.tuples(st.sampled_from(["rojo", "congo", "a@b"]), st.text("abc123", min_size=1, max_size=4)),
                    max_size=2,
                    unique_by=lambda kv: kv[0],
                )
            )
        )
        trace_id = draw(st.integers(1, 2**128 - 1))
        ctx = SpanContext(trace_id, draw(_ids), False, TraceFlags(1), state)
        parent = draw(
            st.one_of(
                st.none(),
                st.builds(lambda s, r: SpanContext(trace_id, s, r, TraceFlags(1)), _ids, st.booleans()),  # noqa: B023 - called within this iteration
            )
        )
        links = [
            Link(
                SpanContext(draw(st.integers(1, 2**128 - 1)), draw(_ids), draw(st.booleans()), TraceFlags(1)),
                draw(_attrs),
            )
            for _ in range(draw(st.integers(0, 2)))
        ]
        events = [
            Event(draw(st.text(max_size=8)), draw(_attrs), draw(st.integers(0, 2**63)))
            for _ in range(draw(st.integers(0, 2)))
        ]
        status = draw(
            st.sampled_from(
                [
                    Status(StatusCode.UNSET),
                    Status(StatusCode.OK),
                    Status(StatusCode.ERROR, "DuplicateKey"),
                    Status(StatusCode.ERROR),
                ]
            )
        )
        start = draw(st.integers(0, 2**63))
        attrs = draw(_attrs)
        if draw(st.booleans()):  # what the SDK's own spans hold, with limits that drop
            attrs = BoundedAttributes(maxlen=2, attributes=attrs, immutable=False)
            events = BoundedList.from_seq(1, events)
            links = BoundedList.from_seq(1, links)
        spans.append(
            ReadableSpan(
                draw(st.text(max_size=20)),
                ctx,
                parent,
                draw(st.sampled_from(resources)),
                attrs,
                events,
                links,
                draw(st.sampled_from(list(SpanKind))),
                None,
                status,
                start,
                start + draw(st.integers(0, 10**12)),
                draw(st.sampled_from(scopes)),
            )
        )
    return spans


@settings(max_examples=200, deadline=None)
@given(sdk_spans())
def test_encoder_matches_the_sdk_on_any_span(spans):
    assert_same_as_sdk(spans)


def test_shipped_otlp_exporter_uses_the_fast_encoder():
    exporter = otlp.otlp_exporter(otlp.HTTP_PROTOBUF, "http://127.0.0.1:9/v1/traces")
    try:
        assert exporter.fast_path, "this SDK version's exporter layout changed: spans fall back to the SDK encoder"
    finally:
        exporter.shutdown()


def test_a_faulted_command_is_marked_on_its_span(make):
    sink, exp = make()
    event = command("find", comment=TP, ok=False, code=91, code_name="ShutdownInProgress")
    event.fault = "failover"
    sink.on_command(event)
    sink.on_command(command("find", comment=TP))
    faulted, plain = spans_of(sink, exp)
    assert faulted.attributes["mongoproxy.fault"] == "failover"
    assert "mongoproxy.fault" not in plain.attributes
