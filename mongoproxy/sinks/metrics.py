"""Prometheus metrics: per-command histograms and the proxy's core counters (the /metrics content).

Hot path: a command costs one C call (sinks/_series.pyx, MetricsHook): the
label-tuple build, one dict lookup and the five histograms of the label set,
C arrays owned by the event loop (single writer), turned into Prometheus
families only at scrape time, so no lock and no `.labels()` call is paid per command. Byte
totals are read from the Connection objects at scrape time too.

See docs/metrics.md for every metric, its labels and the attribution rules.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from mongoproxy.config import Option, positive_int
from mongoproxy.errors import ConfigError
from mongoproxy.events import UPSTREAM_ERROR_REASONS, hostport
from mongoproxy.protocol.framing import DECODE_REASONS
from mongoproxy.querylog import code_name
from mongoproxy.sinks._series import Layout, MetricsHook, Series

# Label name -> what it reads from the event `e` and its connection `c` (sinks/_series.pyx reads the same, in C).
LABEL_SOURCES = {
    "op": "e.op",
    "db": "e.database",
    "collection": "e.collection",
    "app": "c.app_name",
    "server": "c.server",
    "replicaset": "c.replica_set",
    "member_state": "c.member_state",  # --upstream listeners only; moves with a failover
    "client": "c.client_host",  # the host only: the ephemeral port would make every connection a new series
}
VALID_LABELS = tuple(LABEL_SOURCES)
# The per-command key (sinks/_series.pyx, MetricsHook) reads the same sources, except that the server label takes
# two key items (host, port), joined into "host:port" once per new key in _resolve.
DEFAULT_LABELS = ("op", "db", "collection", "app", "server", "replicaset")
OTHER = "_other"

DEFAULT_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
DOCUMENT_BUCKETS = (0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 100000)
# 64 B to 16 MiB by powers of 4, then the largest message a server accepts.
SIZE_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 48000000)
# Label values of mongoproxy_connections_compression_total; a name a server invents counts as "other".
COMPRESSORS = frozenset(("snappy", "zlib", "zstd", "noop"))


def parse_metric_labels(value: Any) -> tuple[str, ...]:
    """`op,db,...` -> the label tuple in canonical order; unknown names name the valid ones."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = [str(x).strip().lower() for x in items if str(x).strip()]
    valid = ",".join(VALID_LABELS)
    if not names:
        raise ConfigError(f"--metric-labels is empty: give a comma-separated subset of {valid}")
    unknown = [n for n in names if n not in LABEL_SOURCES]
    if unknown:
        raise ConfigError(
            f"--metric-labels: unknown label {', '.join(map(repr, unknown))}: use a comma-separated subset of {valid}"
        )
    return tuple(n for n in VALID_LABELS if n in names)


def parse_latency_buckets(value: Any) -> tuple[float, ...]:
    """`0.001,0.01,...` seconds -> sorted distinct positive finite bounds."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    raw = [str(x).strip() for x in items if str(x).strip()]
    example = "e.g. 0.001,0.01,0.1,1,10"
    if not raw:
        raise ConfigError(f"--latency-buckets is empty: give comma-separated upper bounds in seconds, {example}")
    bounds = set()
    for r in raw:
        try:
            x = float(r)
        except ValueError:
            raise ConfigError(f"--latency-buckets: {r!r} is not a number of seconds ({example})") from None
        if not (x > 0 and math.isfinite(x)):
            raise ConfigError(
                f"--latency-buckets: {r!r} must be a positive finite number of seconds "
                f"(+Inf is always added), {example}"
            )
        bounds.add(x)
    return tuple(sorted(bounds))


OPTIONS: list[Option] = [
    Option(
        "metric_labels",
        ("--metric-labels",),
        "labels of the per-command metrics, a comma-separated subset of "
        + ",".join(VALID_LABELS)
        + " (client is the client host; beware its cardinality)",
        parse_metric_labels,
        DEFAULT_LABELS,
        metavar="LABELS",
        group="metrics",
    ),
    Option(
        "max_label_values",
        ("--max-label-values",),
        "distinct values kept per label; later values become "
        f"{OTHER} and are counted in mongoproxy_label_overflow_total",
        positive_int("--max-label-values"),
        1000,
        metavar="N",
        group="metrics",
    ),
    Option(
        "max_series",
        ("--max-series",),
        "label sets kept per metric family, on top of --max-label-values; later ones go to a series whose "
        f"labels are all {OTHER}, counted in mongoproxy_series_overflow_total",
        positive_int("--max-series"),
        10_000,
        metavar="N",
        group="metrics",
    ),
    Option(
        "latency_buckets",
        ("--latency-buckets",),
        "upper bounds in seconds of the latency histogram buckets, comma-separated",
        parse_latency_buckets,
        DEFAULT_LATENCY_BUCKETS,
        metavar="SECONDS,...",
        group="metrics",
    ),
]


# (metric name, help, bucket-bounds key), in the order of the compiled Series' histograms (sinks/_series.pyx).
_HISTOGRAMS = (
    ("mongoproxy_response_latency_seconds", "Time from a request's first byte to its reply's last byte.", "latency"),
    ("mongoproxy_documents_returned", "Documents in a reply's cursor firstBatch/nextBatch.", "documents"),
    (
        "mongoproxy_documents_changed",
        "Documents written: n for insert/delete, nModified plus upserts for update, "
        "lastErrorObject.n for findAndModify.",
        "documents",
    ),
    ("mongoproxy_request_size_bytes", "Size of a request message, header included.", "size"),
    ("mongoproxy_response_size_bytes", "Size of a reply message, header included.", "size"),
)


def _cumulative(counts: list, bounds: tuple) -> list:
    out, total = [], 0
    for bound, c in zip(bounds, counts):
        total += c
        out.append((floatToGoString(bound), total))
    out.append(("+Inf", total + counts[-1]))
    return out


class _LabelCap:
    """At most `limit` distinct non-empty values per label; later values become _other and are counted."""

    def __init__(self, limit: int, overflow: Counter) -> None:
        self.limit = limit
        self.seen: dict[str, set] = {}
        self._overflow = overflow
        self._overflow_children: dict[str, Any] = {}

    def cap(self, label: str, value: str) -> tuple[str, bool]:
        """(value or _other, whether it overflowed); "" (no collection, no app...) is always kept."""
        seen = self.seen.setdefault(label, set())
        if value in seen or not value:
            return value, False
        if len(seen) < self.limit:
            seen.add(value)
            return value, False
        child = self._overflow_children.get(label)
        if child is None:
            child = self._overflow_children[label] = self._overflow.labels(label)
        child.inc()
        return OTHER, True


class MetricsSink:
    """Turns core events into Prometheus metrics in `registry`; always created."""

    name = "metrics"

    def __init__(
        self,
        registry: CollectorRegistry,
        version: str = "",
        mode: str = "",
        labels: Iterable[str] = DEFAULT_LABELS,
        max_label_values: int = 1000,
        latency_buckets: Iterable[float] = DEFAULT_LATENCY_BUCKETS,
        max_series: int = 10_000,
        upstream_tls: str = "off",
    ) -> None:
        self.max_series = max_series
        self.labels = tuple(labels)
        if not self.labels or any(n not in LABEL_SOURCES for n in self.labels):
            parse_metric_labels(",".join(self.labels))  # raises the one-line ConfigError
        self.latency_buckets = tuple(latency_buckets)
        self._bounds = {"latency": self.latency_buckets, "documents": DOCUMENT_BUCKETS, "size": SIZE_BUCKETS}
        self._layout = Layout(self.latency_buckets, DOCUMENT_BUCKETS, SIZE_BUCKETS)
        self._cache: dict[tuple, Series] = {}  # raw label tuple -> series (only tuples that did not overflow)
        # on_command(event): one C call (sinks/_series.pyx) builds the raw label key, finds the series and records
        # the command; a new key, a failure or the handshake's compressor come back to the methods below.
        self.on_command = MetricsHook(self, self.labels, self._cache)
        self._series: dict[tuple, Series] = {}  # capped label tuple -> series
        self._series_lock = threading.Lock()  # guards inserts into _series against a scrape in another thread
        self._live: dict[int, Any] = {}  # connection id -> Connection, for the active gauge and byte totals
        self._connect_pending: dict[int, Any] = {}  # opened before their upstream connect finished
        self._closed_bytes_in = 0
        self._closed_bytes_out = 0
        self._watched_sinks: list = []
        self._bus: Any = None

        r = registry
        self._overflow = Counter(
            "mongoproxy_label_overflow",
            f"Observations whose label value was replaced by {OTHER} because the label reached --max-label-values.",
            ["label"],
            registry=r,
        )
        self._capper = _LabelCap(max_label_values, self._overflow)
        self._series_overflow = Counter(
            "mongoproxy_series_overflow",
            f"Observations sent to the all-{OTHER} series because their metric family reached --max-series.",
            ["metric"],
            registry=r,
        )
        self._series_overflow_children: dict[str, Any] = {}
        info = Gauge(
            "mongoproxy_info",
            "Always 1; the proxy's version, mode and upstream TLS (off, verify, or insecure: not verified).",
            ["version", "mode", "upstream_tls"],
            registry=r,
        )
        info.labels(version, mode, upstream_tls).set(1)
        self._established = Counter(
            "mongoproxy_client_connections_established",
            "Client connections accepted and paired with an upstream.",
            registry=r,
        )
        self._disconnections = Counter("mongoproxy_client_disconnections", "Client connections closed.", registry=r)
        self._decode_errors = Counter(
            "mongoproxy_decode_errors",
            "Traffic that could not be observed (it was still forwarded unchanged).",
            ["direction", "reason"],
            registry=r,
        )
        self._upstream_errors = Counter(
            "mongoproxy_upstream_connect_errors", "Failed connections to an upstream server.", ["reason"], registry=r
        )
        # Every known reason exists from the first scrape, at 0, so rate() and alerts see it.
        for direction in ("request", "reply"):
            for reason in DECODE_REASONS:
                self._decode_errors.labels(direction, reason)
        for reason in UPSTREAM_ERROR_REASONS:
            self._upstream_errors.labels(reason)
        self._unmatched = Counter(
            "mongoproxy_unmatched_replies", "Replies whose responseTo matched no pending request.", registry=r
        )
        self._requests_dropped = Counter(
            "mongoproxy_requests_dropped",
            "Requests evicted from a full pending table (--max-pending-requests) before their reply came.",
            registry=r,
        )
        self._compression = Counter(
            "mongoproxy_connections_compression",
            "Client connections by the compressor "
            'their handshake negotiated ("none" when none), counted once per connection '
            "at its first hello/isMaster reply.",
            ["compressor"],
            registry=r,
        )
        self._compression_counted: set[int] = set()  # ids of open connections already counted
        self._error_labels = tuple(n for n in ("op", "db", "collection") if n in self.labels) + ("code_name",)
        self._command_errors = Counter(
            "mongoproxy_command_errors",
            "Commands that failed: ok:0 replies, write errors and write-concern errors.",
            list(self._error_labels),
            registry=r,
        )
        self._error_children: dict[tuple, Any] = {}
        self._error_seen: set[tuple] = set()  # label tuples of mongoproxy_command_errors_total created so far
        connect_labels = ["server"] if "server" in self.labels else []
        self._connect_time = _Histogram(
            "mongoproxy_server_connect_time_seconds",
            "Time the upstream TCP connect took.",
            connect_labels,
            self.latency_buckets,
        )
        self._connect_children: dict[tuple, list] = {}
        self._decode_children: dict[tuple, Any] = {}
        self._upstream_children: dict[str, Any] = {}
        r.register(_Collector(self))

    # ---- wiring ----

    def watch(self, bus: Any, sinks: Iterable[Any]) -> None:
        """Called by the server once the bus exists: watch_bus(bus) and watch_sinks(sinks)."""
        self.watch_bus(bus)
        self.watch_sinks(sinks)

    def watch_sinks(self, sinks: Iterable[Any]) -> None:
        """Export `mongoproxy_events_dropped_total{sink}` from each sink's int `dropped` attribute."""
        self._watched_sinks = [s for s in sinks if s is not self]

    def watch_bus(self, bus: Any) -> None:
        """Export `mongoproxy_sink_errors_total{sink}` from `bus.errors` (sink name -> count)."""
        self._bus = bus

    # ---- hooks ----

    def connect_observed(self, conn: Any) -> None:
        """A connection's first command: observe its upstream connect time if it was still pending at open."""
        pending = self._connect_pending.pop(conn.id, None)
        if pending is not None and pending.upstream_connect_ns > 0:
            self._observe_connect(pending)

    def _count_compression(self, conn: Any) -> None:
        """Once per connection: the tracker has set conn.compression from this hello reply."""
        if conn.id in self._compression_counted:
            return
        self._compression_counted.add(conn.id)
        name = conn.compression or "none"
        self._compression.labels(name if name in COMPRESSORS or name == "none" else "other").inc()

    def _resolve(self, key: tuple) -> Series:
        capped, overflowed = [], False
        items = iter(key)
        for name in self.labels:
            value = next(items)
            if name == "server":
                value = hostport(value, next(items))
            v, o = self._capper.cap(name, value)
            capped.append(v)
            overflowed |= o
        ckey = tuple(capped)
        s = self._series.get(ckey)
        if s is None and len(self._series) >= self.max_series:
            # The family is full: one all-_other series takes the rest (so at most max_series + 1 exist).
            self._count_series_overflow("mongoproxy_response_latency_seconds")
            overflowed = True
            ckey = (OTHER,) * len(self.labels)
            s = self._series.get(ckey)
        if s is None:
            s = Series(self._layout)
            with self._series_lock:
                self._series[ckey] = s
        if not overflowed:  # overflowing tuples take this path each time, so each is counted
            self._cache[key] = s
        return s

    def _count_series_overflow(self, family: str) -> None:
        child = self._series_overflow_children.get(family)
        if child is None:
            child = self._series_overflow_children[family] = self._series_overflow.labels(family)
        child.inc()

    def _count_errors(self, event: Any) -> None:
        names = []
        if event.ok is False:
            names.append(code_name(event.code_name, event.code))
        reply = event.reply
        if reply is not None:
            if reply.write_errors:
                names.append(code_name(reply.write_error_code_name, reply.write_error_code))
            if reply.write_concern_error_code is not None:
                names.append(code_name(reply.write_concern_error_code_name, reply.write_concern_error_code))
        values = {"op": event.op, "db": event.database, "collection": event.collection}
        base = tuple(values[n] for n in self._error_labels[:-1])
        for name in names:
            raw = base + (name,)
            child = self._error_children.get(raw)
            if child is None:
                capped, overflowed = [], False
                for label, v in zip(self._error_labels, raw):
                    v, o = self._capper.cap(label, v)
                    capped.append(v)
                    overflowed |= o
                if len(self._error_seen) >= self.max_series and tuple(capped) not in self._error_seen:
                    self._count_series_overflow("mongoproxy_command_errors_total")
                    capped, overflowed = [OTHER] * len(capped), True
                self._error_seen.add(tuple(capped))
                child = self._command_errors.labels(*capped)
                if not overflowed:
                    self._error_children[raw] = child
            child.inc()

    def on_connection_open(self, conn: Any) -> None:
        """Count the connection and start reading its byte counters at scrape time."""
        self._established.inc()
        self._live[conn.id] = conn
        if conn.upstream_connect_ns > 0:
            self._observe_connect(conn)
        else:  # the upstream connect is still running: observed at its first command or at close
            self._connect_pending[conn.id] = conn

    def on_connection_close(self, conn: Any) -> None:
        """Count the close and fold its byte totals into the closed totals."""
        self._disconnections.inc()
        if self._connect_pending.pop(conn.id, None) is not None and conn.upstream_connect_ns > 0:
            self._observe_connect(conn)
        # Fold first, then drop from live: a concurrent scrape may count it twice for an instant, never zero times.
        self._closed_bytes_in += conn.bytes_from_client
        self._closed_bytes_out += conn.bytes_from_server
        self._live.pop(conn.id, None)
        self._compression_counted.discard(conn.id)

    def _observe_connect(self, conn: Any) -> None:
        key = (conn.server,) if self._connect_time.labelnames else ()
        counts = self._connect_children.get(key)
        if counts is None:
            capped = tuple(self._capper.cap("server", v)[0] for v in key)
            if capped not in self._connect_time._children and len(self._connect_time._children) >= self.max_series:
                self._count_series_overflow("mongoproxy_server_connect_time_seconds")
                capped = (OTHER,) * len(capped)
            counts = self._connect_time.child(capped)
            if capped == key:
                self._connect_children[key] = counts
        self._connect_time.observe(counts, conn.upstream_connect_ns * 1e-9)

    def on_decode_error(self, event: Any) -> None:
        """Count by direction and reason token."""
        key = (event.direction, event.reason)
        child = self._decode_children.get(key)
        if child is None:
            child = self._decode_children[key] = self._decode_errors.labels(*key)
        child.inc()

    def on_upstream_error(self, event: Any) -> None:
        """Count by reason token."""
        child = self._upstream_children.get(event.reason)
        if child is None:
            child = self._upstream_children[event.reason] = self._upstream_errors.labels(event.reason)
        child.inc()

    def on_unmatched_reply(self, conn: Any, response_to: int) -> None:
        """Count a reply that matched no pending request."""
        self._unmatched.inc()

    def on_requests_dropped(self, conn: Any, count: int) -> None:
        """Count requests evicted from a full pending table."""
        self._requests_dropped.inc(count)

    def close(self) -> None:
        """Nothing to flush: the registry is read at scrape time."""

    # ---- scrape side (may run in the admin server's thread) ----

    def _collect(self) -> Iterable[Any]:
        with self._series_lock:
            series = list(self._series.items())
        for h, (name, doc, bounds_key) in enumerate(_HISTOGRAMS):
            bounds = self._bounds[bounds_key]
            fam = HistogramMetricFamily(name, doc, labels=list(self.labels))
            for key, s in series:
                counts, total = s.snapshot(h)
                if any(counts):
                    fam.add_metric(list(key), _cumulative(counts, bounds), total)
            yield fam
        yield self._connect_time.family()

        live = list(self._live.values())
        yield GaugeMetricFamily("mongoproxy_connections_active", "Client connections open now.", value=len(live))
        received = self._closed_bytes_in + sum(c.bytes_from_client for c in live)
        sent = self._closed_bytes_out + sum(c.bytes_from_server for c in live)
        yield CounterMetricFamily(
            "mongoproxy_client_bytes_received", "Bytes received from clients (and forwarded upstream).", value=received
        )
        yield CounterMetricFamily(
            "mongoproxy_client_bytes_sent", "Bytes sent to clients (received from upstream).", value=sent
        )

        dropped = CounterMetricFamily(
            "mongoproxy_events_dropped", "Events a sink dropped because its queue was full.", labels=["sink"]
        )
        for sink in list(self._watched_sinks):
            n = getattr(sink, "dropped", None)
            if isinstance(n, int) and not isinstance(n, bool):
                dropped.add_metric([getattr(sink, "name", type(sink).__name__)], n)
        yield dropped
        errors = CounterMetricFamily(
            "mongoproxy_sink_errors",
            "Exceptions raised by a sink's hooks (contained, logged once per sink).",
            labels=["sink"],
        )
        if self._bus is not None:
            for sink_name, n in list(self._bus.errors.items()):
                errors.add_metric([sink_name], n)
        yield errors


class _Histogram:
    """A lock-free histogram family written by the event loop only; children are bucket-count lists."""

    def __init__(self, name: str, doc: str, labelnames: list, bounds: tuple) -> None:
        self.name, self.doc, self.labelnames, self.bounds = name, doc, labelnames, bounds
        self._children: dict[tuple, list] = {}
        self._lock = threading.Lock()

    def child(self, key: tuple) -> list:
        """Bucket counts (+Inf last) followed by the sum, for one label tuple."""
        counts = self._children.get(key)
        if counts is None:
            counts = [0] * (len(self.bounds) + 1) + [0.0]
            with self._lock:
                self._children[key] = counts
        return counts

    def observe(self, counts: list, value: float) -> None:
        counts[bisect_left(self.bounds, value)] += 1
        counts[-1] += value

    def family(self) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        with self._lock:
            children = list(self._children.items())
        for key, counts in children:
            snap = list(counts)
            fam.add_metric(list(key), _cumulative(snap[:-1], self.bounds), snap[-1])
        return fam


class _Collector:
    """Adapter registering MetricsSink's scrape-time families in a CollectorRegistry."""

    def __init__(self, sink: MetricsSink) -> None:
        self._sink = sink

    def collect(self) -> Iterable[Any]:
        return self._sink._collect()

    def describe(self) -> list:
        # Names only, so the registry can detect clashes without running a scrape at registration.
        return [HistogramMetricFamily(h[0], h[1]) for h in _HISTOGRAMS] + [
            HistogramMetricFamily("mongoproxy_server_connect_time_seconds", ""),
            GaugeMetricFamily("mongoproxy_connections_active", ""),
            CounterMetricFamily("mongoproxy_client_bytes_received", ""),
            CounterMetricFamily("mongoproxy_client_bytes_sent", ""),
            CounterMetricFamily("mongoproxy_events_dropped", ""),
            CounterMetricFamily("mongoproxy_sink_errors", ""),
        ]


def create(config: Any, ctx: Any) -> MetricsSink:
    """The metrics sink is always on: it is what /metrics serves."""
    return MetricsSink(
        ctx.registry,
        version=ctx.version,
        mode=ctx.mode,
        labels=getattr(config, "metric_labels", DEFAULT_LABELS),
        max_label_values=getattr(config, "max_label_values", 1000),
        latency_buckets=getattr(config, "latency_buckets", DEFAULT_LATENCY_BUCKETS),
        max_series=getattr(config, "max_series", 10_000),
        upstream_tls=_upstream_tls_label(config),
    )


def _upstream_tls_label(config: Any) -> str:
    if not config.get("upstream_tls"):
        return "off"
    return "insecure" if config.get("upstream_tls_insecure") else "verify"


def find(sinks: Iterable[Any]) -> MetricsSink | None:
    """The MetricsSink among `sinks`, if any (for wiring watch_sinks/watch_bus)."""
    for s in sinks:
        if isinstance(s, MetricsSink):
            return s
    return None
