"""Tracing end to end: the proxy process in front of SecantusDB exports spans to an OTLP/HTTP receiver in the test.

The receiver decodes the protobuf with opentelemetry-proto. Each test uses its own trace ids and collections, so
spans of other tests sharing a proxy never match. Export order is FIFO, so once a later "marker" span arrives, any
span an earlier command would have produced has arrived too.
"""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time

import pytest

pytest.importorskip("opentelemetry.sdk", reason="tracing needs pip install 'mongoproxy[tracing]'")

from pymongo.errors import DuplicateKeyError, OperationFailure  # noqa: E402

from tests.support import wire  # noqa: E402
from tests.support.otlp_receiver import OTLPReceiver  # noqa: E402
from tests.support.proxy import run_proxy_cli, run_proxy_process  # noqa: E402

pytestmark = pytest.mark.timeout(180)

FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}  # ms: spans reach the receiver promptly


def new_context() -> tuple[str, str, str]:
    """(trace id hex, caller span id hex, traceparent) for a fresh sampled trace."""
    trace = f"{random.getrandbits(128) | 1 << 100:032x}"
    span = f"{random.getrandbits(64) | 1 << 40:016x}"
    return trace, span, f"00-{trace}-{span}-01"


@pytest.fixture(scope="module")
def receiver():
    with OTLPReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def proxy(secantus, receiver):
    """A proxy exporting to the receiver, sample ratio 0 (only commands with a context are traced)."""
    with run_proxy_process(
        ["--otlp-endpoint", receiver.endpoint, "--service-name", "orders-proxy"],
        env=FAST_EXPORT,
        upstream=secantus.address,
    ) as p:
        yield p


@pytest.fixture(scope="module")
def client(proxy):
    c = proxy.client(appname="tracing-test")
    yield c
    c.close()


# ---------------------------------------------------------------- the span


def test_find_with_traceparent_yields_a_child_span_with_every_attribute(proxy, receiver, secantus, client, db_name):
    client[db_name].people.insert_many([{"_id": i, "name": f"p{i}"} for i in range(3)])
    trace, parent, tp = new_context()
    find = wire.encode_op_msg({"find": "people", "filter": {"_id": {"$in": [0, 1, 2]}}, "comment": tp, "$db": db_name})
    before = time.time_ns()
    with socket.create_connection(proxy.address, timeout=10) as sock:
        sock.sendall(find)
        reply_raw = wire.recv_message(sock)
        client_port = sock.getsockname()[1]
    after = time.time_ns()
    reply = wire.decode_message(reply_raw)
    assert reply.doc["ok"] == 1 and len(reply.doc["cursor"]["firstBatch"]) == 3

    [span] = receiver.trace(trace)
    assert span.name == "find people"
    assert span.kind == "CLIENT"
    assert span.parent_span_id == parent
    assert span.span_id not in ("", parent)
    assert span.flags & 0x300 == 0x300  # the parent is remote
    # Wall time: the proxy converts its monotonic readings, so allow for clock drift between processes; a span
    # left on the monotonic clock would be decades off.
    assert span.start_ns <= span.end_ns
    assert before - 1_000_000_000 <= span.start_ns and span.end_ns <= after + 1_000_000_000
    assert span.status_code == "UNSET"
    assert span.attributes == {
        "db.system.name": "mongodb",
        "db.namespace": db_name,
        "db.collection.name": "people",
        "db.operation.name": "find",
        "db.query.summary": "find people",
        "server.address": "127.0.0.1",
        "server.port": secantus.port,
        "network.peer.address": "127.0.0.1",
        "network.peer.port": client_port,
        "network.transport": "tcp",
        "db.response.returned_rows": 3,
        "mongoproxy.request.size": len(find),
        "mongoproxy.response.size": len(reply_raw),
    }
    assert span.resource["service.name"] == "orders-proxy"
    assert span.scope_name == "mongoproxy" and span.scope_version == span.resource["service.version"]


def test_document_comment_with_tracestate(receiver, client, db_name):
    trace, parent, tp = new_context()
    client[db_name].things.find_one({"_id": 1}, comment={"traceparent": tp, "tracestate": "rojo=00f067aa0ba902b7"})
    [span] = receiver.trace(trace)
    assert span.parent_span_id == parent and span.trace_state == "rojo=00f067aa0ba902b7"


def test_uber_trace_id_form(receiver, client, db_name):
    trace64 = f"{random.getrandbits(64) | 1 << 60:016x}"
    span_hex = f"{random.getrandbits(64) | 1 << 40:016x}"
    client[db_name].things.find_one({"_id": 1}, comment=f"uber-trace-id:{trace64}:{span_hex}:0:1")
    [span] = receiver.trace(trace64.rjust(32, "0"))
    assert span.parent_span_id == span_hex and span.name == "find things"


def test_legacy_dollar_comment_in_the_filter_or_match(receiver, client, db_name):
    trace, parent, tp = new_context()
    client[db_name].things.find_one({"_id": 42, "$comment": f"traceparent={tp}"})
    list(client[db_name].things.aggregate([{"$match": {"_id": 42, "$comment": tp}}]))
    spans = receiver.trace(trace, count=2)
    assert sorted(s.name for s in spans) == ["aggregate things", "find things"]
    assert all(s.parent_span_id == parent for s in spans)


def test_legacy_dollar_comment_in_driver_write_sequences(receiver, client, db_name):
    coll = client[db_name].writes
    coll.insert_many([{"_id": i, "n": i} for i in range(4)])
    trace, parent, tp = new_context()
    coll.update_one({"_id": 1, "$comment": f"traceparent={tp}"}, {"$set": {"x": 1}})
    coll.delete_many({"_id": {"$in": [2, 3]}, "$comment": tp})
    spans = receiver.trace(trace, count=2)
    assert sorted(s.name for s in spans) == ["delete writes", "update writes"]
    assert all(s.parent_span_id == parent for s in spans)
    trace2, parent2, tp2 = new_context()
    _, _, other = new_context()
    coll.delete_one({"_id": 0, "$comment": other}, comment=tp2)  # the command's comment wins
    [span] = receiver.trace(trace2)
    assert span.parent_span_id == parent2


# ---------------------------------------------------------------- cursors


def test_find_needing_getmores_yields_getmore_spans_in_the_same_trace(receiver, client, db_name):
    coll = client[db_name].items
    coll.insert_many([{"_id": i} for i in range(7)])
    trace, parent, tp = new_context()
    docs = list(coll.find({}, batch_size=2, comment=tp).sort("_id", 1))
    assert [d["_id"] for d in docs] == list(range(7))
    spans = receiver.trace(trace, count=4)  # find (2) + getMore (2, 2, 1)
    names = sorted(s.name for s in spans)
    assert names == ["find items", "getMore items", "getMore items", "getMore items"]
    [find] = [s for s in spans if s.name == "find items"]
    cursor_id = find.attributes["db.mongodb.cursor_id"]
    for gm in (s for s in spans if s.name == "getMore items"):
        assert gm.parent_span_id == parent
        assert gm.attributes["db.mongodb.cursor_id"] == cursor_id
        assert gm.links == [{"trace_id": trace, "span_id": find.span_id}]
    assert sorted(s.attributes["db.response.returned_rows"] for s in spans) == [1, 2, 2, 2]


def test_getmore_and_killcursors_without_a_comment_inherit_the_finds_context(receiver, client, db_name):
    db = client[db_name]
    db.items.insert_many([{"_id": i} for i in range(6)])
    trace, parent, tp = new_context()
    cursor_id = db.command("find", "items", batchSize=2, comment=tp)["cursor"]["id"]
    assert cursor_id
    more = db.command("getMore", cursor_id, collection="items", batchSize=2)  # no comment
    assert len(more["cursor"]["nextBatch"]) == 2
    db.command("killCursors", "items", cursors=[cursor_id])
    spans = {s.name: s for s in receiver.trace(trace, count=3)}
    assert set(spans) == {"find items", "getMore items", "killCursors items"}
    for name in ("getMore items", "killCursors items"):
        assert spans[name].parent_span_id == parent
        assert spans[name].attributes["db.mongodb.cursor_id"] == cursor_id


# ---------------------------------------------------------------- failures


def test_failing_command_span_has_status_error_and_its_code(receiver, client, db_name):
    trace, parent, tp = new_context()
    with pytest.raises(OperationFailure) as err:
        client[db_name].command("find", "things", filter={"$nosuchop": 1}, comment=tp)
    assert err.value.code == 2
    [span] = receiver.trace(trace)
    assert span.status_code == "ERROR"
    assert span.attributes["db.response.status_code"] == "2"
    assert span.attributes["error.type"] == "BadValue"


def test_write_error_span_has_status_error_and_its_code(receiver, client, db_name):
    coll = client[db_name].unique
    coll.insert_one({"_id": 1})
    trace, parent, tp = new_context()
    with pytest.raises(DuplicateKeyError):
        coll.insert_one({"_id": 1}, comment=tp)
    [span] = receiver.trace(trace)
    assert span.name == "insert unique" and span.status_code == "ERROR"
    assert span.attributes["db.response.status_code"] == "11000"
    assert span.attributes["error.type"] == "DuplicateKey"


def test_trace_query_adds_the_command_with_every_literal_replaced(secantus, db_name):
    with run_proxy_process(["--trace-console", "--trace-query"], env=FAST_EXPORT, upstream=secantus.address) as p:
        c = p.client()
        try:
            trace, parent, tp = new_context()
            c[db_name].people.find_one({"email": "ann@example.com", "age": {"$gt": 41}, "tags": ["vip", 7]}, comment=tp)
        finally:
            c.close()
        deadline = time.monotonic() + 20
        while f"0x{trace}" not in p.stdout_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        [span] = [json.loads(line) for line in p.stdout_text().splitlines() if f"0x{trace}" in line]
    text = span["attributes"]["db.query.text"]
    query = json.loads(text)
    assert query["find"] == "people"
    assert query["filter"] == {"email": "?", "age": {"$gt": "?"}, "tags": ["?", "?"]}
    assert query["comment"] == "?"
    for literal in ("ann@example.com", "41", "vip", tp[3:35]):
        assert literal not in text


# ---------------------------------------------------------------- sampling


def test_no_context_and_ratio_zero_yields_no_span(receiver, client, db_name):
    coll = client[db_name].quiet
    coll.insert_one({"_id": 1})
    coll.find_one({"_id": 1})
    coll.find_one({"_id": 1}, comment="nightly report")
    coll.update_one({"_id": 1}, {"$set": {"x": 1}})
    _, _, unsampled = new_context()
    coll.find_one({"_id": 1}, comment=unsampled[:-2] + "00")  # a context that says "not sampled"
    coll.find_one({"_id": 1}, comment="traceparent=00-garbage-01")  # malformed: ignored, command untouched
    trace, _, tp = new_context()
    coll.find_one({"_id": 1}, comment=tp)  # the marker
    receiver.trace(trace)
    spans = receiver.matching(lambda s: s.attributes.get("db.namespace") == db_name)
    assert [s.trace_id for s in spans] == [trace]


def test_ratio_one_traces_every_command(secantus, receiver, db_name):
    with run_proxy_process(
        ["--otlp-endpoint", receiver.endpoint, "--trace-sample-ratio", "1"], env=FAST_EXPORT, upstream=secantus.address
    ) as p:
        c = p.client()
        try:
            coll = c[db_name].everything
            coll.insert_one({"_id": 1, "n": 1})
            coll.find_one({"_id": 1})
            coll.update_one({"_id": 1}, {"$inc": {"n": 1}})
            list(coll.aggregate([{"$match": {"_id": 1}}]))
            coll.delete_one({"_id": 1})
            c[db_name].command("ping")
        finally:
            c.close()
        ops = ["insert", "find", "update", "aggregate", "delete", "ping"]
        spans = receiver.wait_for(lambda s: s.attributes.get("db.namespace") == db_name, count=len(ops))
        assert sorted(s.attributes["db.operation.name"] for s in spans) == sorted(ops)
        assert all(s.parent_span_id == "" for s in spans)
        assert len({s.trace_id for s in spans}) == len(ops)
        # Handshake and monitoring commands never start a trace.
        assert not [s for s in spans if s.attributes["db.operation.name"] in ("hello", "isMaster", "ismaster")]


# ---------------------------------------------------------------- the collector goes away


def test_collector_down_mid_run_does_not_disturb_traffic_and_drops_are_counted(secantus, db_name):
    rx = OTLPReceiver().start()
    env = {**FAST_EXPORT, "OTEL_BSP_MAX_QUEUE_SIZE": "40", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1"}
    try:
        with run_proxy_process(
            ["--otlp-endpoint", rx.endpoint, "--trace-sample-ratio", "1"], env=env, upstream=secantus.address
        ) as p:
            c = p.client()
            try:
                coll = c[db_name].load
                errors: list[BaseException] = []
                done = {"inserts": 0, "finds": 0}
                stop = threading.Event()

                def traffic() -> None:
                    i = 0
                    while not stop.is_set():
                        try:
                            coll.insert_one({"_id": i, "v": i})
                            done["inserts"] += 1
                            assert coll.find_one({"_id": i}) == {"_id": i, "v": i}
                            done["finds"] += 1
                        except BaseException as exc:  # noqa: BLE001 - reported below
                            errors.append(exc)
                            return
                        i += 1

                worker = threading.Thread(target=traffic)
                worker.start()
                rx.wait_for(lambda s: s.attributes.get("db.collection.name") == "load", count=20)
                rx.stop()  # the collector goes down while the traffic runs
                at_stop = done["inserts"]
                deadline = time.monotonic() + 60
                while done["inserts"] < at_stop + 300 and not errors and time.monotonic() < deadline:
                    time.sleep(0.05)
                outage = done["inserts"] - at_stop
                # Drops: at least what did not fit in the queue (40) or an export batch (40) while it was down.
                lower = 2 * outage - 80
                dropped = 0.0
                while time.monotonic() < deadline:
                    dropped = p.metric("mongoproxy_events_dropped_total", sink="tracing") or 0.0
                    if dropped >= lower:
                        break
                    time.sleep(0.1)
                stop.set()
                worker.join(30)
                assert not errors, f"traffic failed while the collector was down: {errors[0]!r}"
                assert outage >= 300
                assert dropped >= lower, f"{dropped} spans counted dropped, expected at least {lower}"

                # The proxy itself saw every command.
                assert p.metric("mongoproxy_response_latency_seconds_count", op="insert") == done["inserts"]
                assert p.metric("mongoproxy_response_latency_seconds_count", op="find") >= done["finds"]
                assert not p.metric("mongoproxy_sink_errors_total", sink="tracing")

                # The collector comes back: spans flow again (once the exporter's retry backoff ends and the
                # backlog is sent; a marker that meets a still-full queue is dropped, so send fresh ones).
                rx.restart()
                deadline = time.monotonic() + 30
                while True:
                    trace, parent, tp = new_context()
                    coll.find_one({"_id": 0}, comment=tp)
                    try:
                        [span] = rx.trace(trace, timeout=1)
                        break
                    except AssertionError:
                        if time.monotonic() > deadline:
                            raise
                assert span.parent_span_id == parent
            finally:
                c.close()
            deadline = time.monotonic() + 10
            while "works again" not in p.stderr_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            stderr = p.stderr_text()
        warnings = re.findall(r"WARNING .*cannot export spans to (\S+)", stderr)
        assert warnings == [f"{rx.endpoint}/v1/traces:"], "one warning a minute, naming the collector"
        assert "works again" in stderr
        assert "Traceback" not in stderr
    finally:
        rx.stop()


# ---------------------------------------------------------------- console, flags


def test_trace_console_prints_spans_on_stdout(secantus, db_name):
    with run_proxy_process(["--trace-console"], env=FAST_EXPORT, upstream=secantus.address) as p:
        c = p.client()
        try:
            trace, parent, tp = new_context()
            c[db_name].things.find_one({"_id": 1}, comment=tp)
        finally:
            c.close()
        deadline = time.monotonic() + 20
        while f"0x{trace}" not in p.stdout_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = [json.loads(line) for line in p.stdout_text().splitlines() if line.startswith("{")]
        [span] = [s for s in lines if s["context"]["trace_id"] == f"0x{trace}"]
        assert span["name"] == "find things" and span["parent_id"] == f"0x{parent}"


@pytest.mark.parametrize(
    "args, fix",
    [
        (["--trace-sample-ratio", "1.5"], "give a number from 0 to 1"),
        (["--otlp-endpoint", "collector:4318"], "give e.g. http://otel-collector:4318"),
        (["--otlp-protocol", "thrift"], "use http/protobuf or grpc"),
    ],
)
def test_bad_tracing_flags_get_one_line_naming_the_fix(args, fix):
    r = run_proxy_cli(["run", "--proxy", "27999:localhost:27017", "--admin-port", "0", *args])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fix in lines[0], r.stderr


def test_bad_otel_endpoint_variable_gets_one_line(secantus):
    r = run_proxy_cli(
        ["run", "--proxy", f"0:127.0.0.1:{secantus.port}", "--admin-port", "0"],
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4318"},
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mongoproxy: error: OTEL_EXPORTER_OTLP_ENDPOINT:"), r.stderr
