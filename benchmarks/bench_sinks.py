"""Cost per command of the sinks, side by side: SinkBus with no sinks, with the metrics sink, and more.

    python -m benchmarks.bench_sinks [--events N] [--repeat R] [--json PATH]

Feeds N synthetic CommandEvents (a realistic label mix: 4 ops, 10
collections, 2 apps, 20 connections) through SinkBus.command and reports
the best of R runs in µs per command, and the extra cost over the bare bus.
The "prometheus_client .labels()" row is the naive way (five labelled
histograms, .labels() per event) for comparison. The last row is the yardstick
for the metrics sink: the Cython scanner's work for one small command (reset +
feed + result of a driver's find by _id and of its one-document reply).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

from mongoproxy.events import CommandEvent, Connection, SinkBus
from mongoproxy.sinks.commandlog import CommandLogSink
from mongoproxy.sinks.metrics import DEFAULT_LABELS, DOCUMENT_BUCKETS, SIZE_BUCKETS, MetricsSink

OPS = ("find", "insert", "getMore", "update")


def make_events(n: int) -> list:
    """n events over 20 connections, 4 ops and 10 collections, with varied latencies and sizes."""
    conns = [
        Connection(
            id=i + 1,
            client_host="10.0.0.%d" % (i + 1),
            client_port=40000 + i,
            upstream_host="db1",
            upstream_port=27017,
            app_name="app%d" % (i % 2),
            replica_set="rs0",
        )
        for i in range(20)
    ]
    scan = SimpleNamespace(
        write_errors=0,
        write_error_code=None,
        write_error_code_name=None,
        write_concern_error_code=None,
        write_concern_error_code_name=None,
        query_shape=None,
        comment=None,
    )
    events = []
    t = 1_000_000_000
    for i in range(n):
        op = OPS[i % 4]
        e = CommandEvent(
            connection=conns[i % 20],
            op=op,
            database="shop",
            collection="c%d" % (i % 10),
            request_id=i,
            request_opcode=2013,
            request_size=100 + (i % 700),
            request_first_ns=t,
            request_last_ns=t + 2000,
            request=scan,
            reply_opcode=2013,
            reply_size=200 + (i % 5000),
            reply_first_ns=t + 100_000,
            reply_last_ns=t + 100_000 + (i % 97) * 20_000,
            reply=scan,
            ok=True,
            cursor_id=0,
        )
        if op in ("find", "getMore"):
            e.documents_returned = i % 50
        else:
            e.documents_changed = i % 3
        events.append(e)
        t += 1_000_000
    return events


class PrometheusClientNaive:
    """The naive sink: prometheus_client histograms with .labels() per event."""

    name = "naive"

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = list(DEFAULT_LABELS)
        self.lat = Histogram("naive_latency_seconds", "", labels, registry=registry)
        self.ret = Histogram("naive_returned", "", labels, buckets=DOCUMENT_BUCKETS, registry=registry)
        self.chg = Histogram("naive_changed", "", labels, buckets=DOCUMENT_BUCKETS, registry=registry)
        self.req = Histogram("naive_request_bytes", "", labels, buckets=SIZE_BUCKETS, registry=registry)
        self.rsp = Histogram("naive_response_bytes", "", labels, buckets=SIZE_BUCKETS, registry=registry)

    def on_command(self, e: Any) -> None:
        c = e.connection
        key = (e.op, e.database, e.collection, c.app_name, c.server, c.replica_set)
        self.lat.labels(*key).observe(e.duration_ns / 1e9)
        self.req.labels(*key).observe(e.request_size)
        self.rsp.labels(*key).observe(e.reply_size)
        if e.documents_returned is not None:
            self.ret.labels(*key).observe(e.documents_returned)
        if e.documents_changed is not None:
            self.chg.labels(*key).observe(e.documents_changed)


def _null_stream() -> io.TextIOBase:
    return open("/dev/null", "w") if sys.platform != "win32" else io.StringIO()


def configurations() -> list[tuple[str, Callable[[], list]]]:
    """(name, factory of the sink list) for each row of the table."""
    return [
        ("bus, no sinks", lambda: []),
        ("metrics sink", lambda: [MetricsSink(CollectorRegistry())]),
        ("metrics sink, labels op+collection", lambda: [MetricsSink(CollectorRegistry(), labels=("op", "collection"))]),
        ("prometheus_client .labels() (naive)", lambda: [PrometheusClientNaive(CollectorRegistry())]),
        ("command log on, filtered out (--slow-ms)", lambda: [CommandLogSink(_null_stream(), slow_ms=10_000)]),
        (
            "metrics + command log json (enqueue)",
            lambda: [
                MetricsSink(CollectorRegistry()),
                CommandLogSink(_null_stream(), fmt="json", queue_size=10_000_000),
            ],
        ),
    ]


def measure(factory: Callable[[], list], events: list, repeat: int) -> float:
    """Best-of-`repeat` ns per event through SinkBus.command (sinks warmed up on the same events)."""
    best = float("inf")
    for _ in range(repeat):
        sinks = factory()
        bus = SinkBus(sinks)
        for e in events[:2000]:  # warm-up: label caches filled as in a long-running proxy
            bus.command(e)
        command = bus.command
        t0 = time.thread_time_ns()
        for e in events:
            command(e)
        elapsed = time.thread_time_ns() - t0
        bus.close()
        best = min(best, elapsed / len(events))
    return best


def scanner_per_command(n: int, repeat: int) -> float:
    """Best-of-`repeat` ns the body scanner spends on one small command: its request and its reply."""
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from benchmarks.tapcost import build_pair
    from mongoproxy._bson_parser import OP_MSG, BodyScanner

    req, rep = build_pair()
    scanner = BodyScanner()
    reset, feed, result = scanner.reset, scanner.feed, scanner.result
    lq, lp = len(req), len(rep)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time_ns()
        for _ in range(n):
            reset(OP_MSG, False, lq - 16)
            feed(req, 16, lq)
            result()
            reset(OP_MSG, True, lp - 16)
            feed(rep, 16, lp)
            result()
        best = min(best, (time.thread_time_ns() - t0) / n)
    return best


def main(argv: list[str] | None = None) -> int:
    """Run the table; print it and optionally write JSON."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_sinks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000, help="events per run (default 200000)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per configuration; the best is kept (default 5)")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    events = make_events(args.events)
    rows = []
    base = None
    print(f"{'configuration':44} {'µs/command':>11} {'extra µs':>9}")
    for name, factory in configurations():
        ns = measure(factory, events, args.repeat)
        if base is None:
            base = ns
        rows.append(
            {"configuration": name, "us_per_command": round(ns / 1000, 3), "extra_us": round((ns - base) / 1000, 3)}
        )
        print(f"{name:44} {ns / 1000:11.3f} {(ns - base) / 1000:9.3f}")
    ns = scanner_per_command(args.events, args.repeat)
    rows.append({"configuration": "scanner: request + reply", "us_per_command": round(ns / 1000, 3)})
    print(f"{'yardstick: scanner, small request + reply':44} {ns / 1000:11.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "benchmark": "bench_sinks",
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
