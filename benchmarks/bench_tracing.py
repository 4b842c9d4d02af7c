"""CPU cost per command of the tracing sink, side by side with tracing off.

    python -m benchmarks.bench_tracing [--events N] [--repeat R] [--json PATH] [--no-otlp]

Feeds N synthetic CommandEvents through SinkBus.command, as the event loop
does, and reports the best of R runs:

- "loop µs": CPU time per command of the feeding thread, i.e. the event
  loop's share (deciding, building and queueing the span);
- "CPU µs": process CPU time per command, all threads, measured until every
  span has been exported (the loop's share + protobuf encoding + HTTP).

CPU time, not wall time, so that other processes on a busy machine do not
inflate the figures.

Rows: the bare bus (tracing off); the sink on but the command not traced;
traced commands (a traceparent in the comment) exported to a null exporter
and to a real OTLP/HTTP receiver in another process (its CPU is not
counted), as shipped and with the SDK's own protobuf encoder; and the same
spans made through the SDK's Tracer API (start_span/end) instead of
building ReadableSpans directly.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from mongoproxy.events import CommandEvent, Connection, SinkBus, wall_ns
from mongoproxy.sinks.tracing import TracingSink

TP = "00-{:032x}-00f067aa0ba902b7-01"
BIG_QUEUE = 1 << 20  # no drops while measuring: every span is built and exported


def _scan(**fields: Any) -> SimpleNamespace:
    base = dict(
        opcode=2013,
        comment=None,
        comment_traceparent=None,
        comment_tracestate=None,
        cursor_id=None,
        query_shape=None,
        write_errors=None,
        write_error_code=None,
        write_error_code_name=None,
        write_concern_error_code=None,
        write_concern_error_code_name=None,
    )
    base.update(fields)
    return SimpleNamespace(**base)


def make_events(n: int, traced: bool, comment: str | None = None) -> list:
    """n events over 20 connections: find (opening a cursor), getMore on it, insert, update.

    traced: each find/insert/update carries its own traceparent (a new trace id) and the getMore
    inherits through the cursor map; else the commands carry `comment` (None or a plain string).
    """
    conns = [
        Connection(
            id=i + 1, client_host="10.0.0.%d" % (i + 1), client_port=40000 + i, upstream_host="db1", upstream_port=27017
        )
        for i in range(20)
    ]
    reply = _scan()
    events = []
    t = 1_000_000_000
    for i in range(n):
        op = ("find", "getMore", "insert", "update")[i % 4]
        conn = conns[(i // 4) % 20]
        cursor = 1_000_000 + i // 4
        c = TP.format(i + 1) if traced else comment
        req = _scan(comment=None if op == "getMore" else c, cursor_id=cursor if op == "getMore" else None)
        e = CommandEvent(
            connection=conn,
            op=op,
            database="shop",
            collection="c%d" % (i % 10),
            request_id=i,
            request_opcode=2013,
            request_size=100 + (i % 700),
            request_first_ns=t,
            request_last_ns=t + 2000,
            request=req,
            reply_opcode=2013,
            reply_size=200 + (i % 5000),
            reply_first_ns=t + 100_000,
            reply_last_ns=t + 150_000,
            reply=reply,
            ok=True,
        )
        if op == "find":
            e.cursor_id, e.documents_returned = cursor, 101
        elif op == "getMore":
            e.cursor_id, e.documents_returned = 0, 20
        else:
            e.documents_changed = 1
        events.append(e)
        t += 1_000_000
    return events


class NullExporter:
    """Accepts every batch and does nothing: isolates the cost of building and queueing spans."""

    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class TracerAPISink:
    """The textbook way, for comparison: Tracer.start_span(...)/end() through a TracerProvider."""

    name = "tracing-api"

    def __init__(self) -> None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, set_span_in_context

        from mongoproxy import tracecontext

        self.provider = TracerProvider()
        self.processor = BatchSpanProcessor(NullExporter(), max_queue_size=BIG_QUEUE, max_export_batch_size=512)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("mongoproxy")
        self._ctx = (NonRecordingSpan, SpanContext, SpanKind.CLIENT, TraceFlags(1), set_span_in_context)
        self._tc = tracecontext
        self.dropped = 0

    def on_command(self, e: Any) -> None:
        NonRecordingSpan, SpanContext, CLIENT, SAMPLED, set_span_in_context = self._ctx
        tc = self._tc.from_comment(e.request.comment) if e.request.comment else None
        if tc is None:
            return
        parent = set_span_in_context(NonRecordingSpan(SpanContext(tc.trace_id, tc.span_id, True, SAMPLED)))
        c = e.connection
        span = self.tracer.start_span(
            f"{e.op} {e.collection}",
            context=parent,
            kind=CLIENT,
            start_time=wall_ns(e.request_first_ns),
            attributes={
                "db.system.name": "mongodb",
                "db.namespace": e.database,
                "db.collection.name": e.collection,
                "db.operation.name": e.op,
                "server.address": c.upstream_host,
                "server.port": c.upstream_port,
                "network.peer.address": c.client_host,
                "network.peer.port": c.client_port,
                "mongoproxy.request.size": e.request_size,
                "mongoproxy.response.size": e.reply_size,
            },
        )
        if e.documents_returned is not None:
            span.set_attribute("db.response.returned_rows", e.documents_returned)
        span.end(wall_ns(e.reply_last_ns))

    def flush(self) -> None:
        self.provider.force_flush()

    def close(self) -> None:
        self.provider.shutdown()


def _receiver(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.otlp_receiver", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=0.5)
        except urllib.error.HTTPError:
            return proc  # it answers (501/404 for GET): listening
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the OTLP receiver did not start")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configurations(endpoint: str | None) -> list[tuple[str, bool, str | None, Callable[[], list]]]:
    """(name, traced events?, plain comment, factory of the sink list) per row."""

    def tracing(exporter_factory: Callable[[], Any], ratio: float = 0.0) -> Callable[[], list]:
        return lambda: [
            TracingSink(
                [("bench", exporter_factory())],
                sample_ratio=ratio,
                max_queue_size=BIG_QUEUE,
                max_export_batch_size=512,
                close_timeout_seconds=60,
            )
        ]

    rows = [
        ("tracing off (bus, no sinks)", False, None, lambda: []),
        ("sink on, no comment, ratio 0", False, None, tracing(NullExporter)),
        ("sink on, plain string comment, ratio 0", False, "nightly-report job=42", tracing(NullExporter)),
        ("traced, null exporter", True, None, tracing(NullExporter)),
        ("traced, SDK Tracer API, null exporter", True, None, lambda: [TracerAPISink()]),
    ]
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        from mongoproxy.sinks import otlp

        rows.append(
            (
                "traced, OTLP/HTTP to a receiver (as shipped)",
                True,
                None,
                tracing(lambda: otlp.otlp_exporter(otlp.HTTP_PROTOBUF, endpoint)),
            )
        )
        rows.append(
            (
                "traced, OTLP/HTTP, the SDK's own encoder",
                True,
                None,
                tracing(lambda: OTLPSpanExporter(endpoint=endpoint)),
            )
        )
    return rows


def measure(factory: Callable[[], list], events: list, repeat: int) -> tuple[float, float, int]:
    """Best-of-`repeat` (loop-thread CPU ns, process CPU ns) per event, and spans dropped in the last run."""
    best_loop = best_cpu = float("inf")
    dropped = 0
    for _ in range(repeat):
        sinks = factory()
        bus = SinkBus(sinks)
        for e in events[:1000]:  # warm-up
            bus.command(e)
        for s in sinks:
            getattr(s, "flush", lambda: None)()
        command = bus.command
        c0 = time.process_time_ns()
        t0 = time.thread_time_ns()
        for e in events:
            command(e)
        loop = time.thread_time_ns() - t0
        for s in sinks:
            getattr(s, "flush", lambda: None)()
        cpu = time.process_time_ns() - c0
        dropped = sum(getattr(s, "dropped", 0) for s in sinks)
        bus.close()
        best_loop = min(best_loop, loop / len(events))
        best_cpu = min(best_cpu, cpu / len(events))
    return best_loop, best_cpu, dropped


def main(argv: list[str] | None = None) -> int:
    """Run the table; print it and optionally write JSON."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_tracing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=40_000, help="events per run (default 40000)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration; the best is kept (default 3)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--no-otlp", action="store_true", help="skip the row that exports to a receiver process")
    args = ap.parse_args(argv)
    receiver = None
    endpoint = None
    if not args.no_otlp:
        port = _free_port()
        receiver = _receiver(port)
        endpoint = f"http://127.0.0.1:{port}/v1/traces"
    plain = make_events(args.events, traced=False)
    traced = make_events(args.events, traced=True)
    rows = []
    try:
        print(f"{'configuration':46} {'loop µs':>8} {'CPU µs':>8} {'extra CPU µs':>13} {'dropped':>8}")
        base = None
        for name, is_traced, comment, factory in configurations(endpoint):
            events = traced if is_traced else (make_events(args.events, False, comment) if comment else plain)
            loop, cpu, dropped = measure(factory, events, args.repeat)
            if base is None:
                base = cpu
            rows.append(
                {
                    "configuration": name,
                    "loop_us": round(loop / 1000, 3),
                    "cpu_us": round(cpu / 1000, 3),
                    "extra_cpu_us": round((cpu - base) / 1000, 3),
                    "dropped": dropped,
                }
            )
            print(f"{name:46} {loop / 1000:8.2f} {cpu / 1000:8.2f} {(cpu - base) / 1000:13.2f} {dropped:8d}")
    finally:
        if receiver is not None:
            receiver.terminate()
            receiver.wait(10)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "benchmark": "bench_tracing",
                    "events": args.events,
                    "repeat": args.repeat,
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                    "results": rows,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
