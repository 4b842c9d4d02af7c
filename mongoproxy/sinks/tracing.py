"""OpenTelemetry tracing sink: one CLIENT span per traced MongoDB command, exported over OTLP.

Which commands are traced:
- a command whose comment carries a trace context (see mongoproxy.tracecontext)
  follows that context's sampled flag and becomes a child of the caller's span;
- a getMore or killCursors follows the command that opened its cursor (a
  bounded, expiring map keyed by server and cursor id);
- any other command starts a new trace with probability --trace-sample-ratio
  (the handshake and authentication commands never do).

Spans are built on the event loop straight into SDK ReadableSpan objects
(no Tracer, no context machinery: a few µs) and handed to the SDK's
BatchSpanProcessor, whose thread encodes and exports them (mongoproxy.sinks.otlp:
the endpoint, the exporter and the queue; the OTLP/HTTP exporter writes protobuf
directly with mongoproxy.sinks.otlp_encode, about 5x less CPU per span than the
SDK's encoder). The queue is bounded; spans that do not fit, or whose export
fails, are counted in `dropped` and reported in a warning at most once a minute.

The OpenTelemetry SDK is an optional dependency (`mongoproxy[tracing]`); this
module imports it only when a sink is created.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from mongoproxy import tracecontext
from mongoproxy.config import Option, parse_bool
from mongoproxy.errors import ConfigError
from mongoproxy.events import CommandEvent, wall_ns
from mongoproxy.protocol.commands import is_sensitive
from mongoproxy.protocol.opcodes import OP_GET_MORE, OP_KILL_CURSORS
from mongoproxy.querylog import CODE_NAMES, event_query
from mongoproxy.sinks.otlp import (
    DEFAULT_GRPC_ENDPOINT,
    DEFAULT_HTTP_ENDPOINT,
    EXPORT_LOG,
    GRPC_EXTRA,
    HTTP_PROTOBUF,
    TRACES_PATH,
    TRACING_EXTRA,
    Export,
    otlp_exporter,
    parse_endpoint,
    parse_protocol,
    resolve_endpoint,
    resolve_protocol,
)

CURSOR_MAP_SIZE = 10_000  # open cursors remembered; the least recently used is forgotten first
CURSOR_TTL_SECONDS = 600.0  # the server's default idle cursor timeout (cursorTimeoutMillis)
WARN_INTERVAL_SECONDS = 60.0
CLOSE_TIMEOUT_SECONDS = 3.0  # flush budget at shutdown; an unreachable collector cannot hold the exit longer

_CURSOR_OPS = frozenset({"getMore", "killCursors"})
_LEGACY_CURSOR_OP_CODES = (OP_GET_MORE, OP_KILL_CURSORS)
_KILL = frozenset({"killCursors"})

# ---- options ----


def parse_ratio(value: str) -> float:
    """A sampling probability from 0 to 1."""
    try:
        x = float(str(value).strip())
    except ValueError:
        x = math.nan
    if not 0.0 <= x <= 1.0:  # also rejects nan
        raise ConfigError(
            f"--trace-sample-ratio {value!r} is not valid: give a number from 0 to 1, e.g. 0.01 to trace 1% of commands"
        )
    return x


def _parse_name(value: str) -> str:
    name = str(value).strip()
    if not name:
        raise ConfigError("--service-name is empty: give a name, e.g. --service-name orders-mongoproxy")
    return name


OPTIONS: list[Option] = [
    Option(
        "otlp_endpoint",
        ("--otlp-endpoint",),
        "OTLP collector URL for spans, e.g. http://otel-collector:4318 "
        "(/v1/traces is added when the URL has no path); default: $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "
        "$OTEL_EXPORTER_OTLP_ENDPOINT",
        parse_endpoint,
        None,
        metavar="URL",
        group="tracing",
    ),
    Option(
        "otlp_protocol",
        ("--otlp-protocol",),
        "http/protobuf or grpc (grpc needs " + GRPC_EXTRA + "); "
        "default: $OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, $OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf",
        parse_protocol,
        None,
        metavar="PROTOCOL",
        group="tracing",
    ),
    Option(
        "service_name",
        ("--service-name",),
        "service.name of the spans; default: $OTEL_SERVICE_NAME, else mongoproxy",
        _parse_name,
        None,
        metavar="NAME",
        group="tracing",
    ),
    Option(
        "trace_sample_ratio",
        ("--trace-sample-ratio",),
        "fraction (0 to 1) of commands without a trace "
        "context in their comment that start a new trace; commands with one follow its sampled flag",
        parse_ratio,
        0.0,
        metavar="R",
        group="tracing",
    ),
    Option(
        "trace_console",
        ("--trace-console",),
        "also print every span on stdout, one JSON object per line (local debugging)",
        parse_bool,
        False,
        switch=True,
        group="tracing",
    ),
    Option(
        "trace_query",
        ("--trace-query",),
        "add db.query.text to spans: the command with every literal replaced by ?",
        parse_bool,
        False,
        switch=True,
        group="tracing",
    ),
]


def resolve_service_name(flag_value: str | None, environ: Mapping[str, str]) -> str | None:
    """--service-name, else OTEL_SERVICE_NAME, else None (then OTEL_RESOURCE_ATTRIBUTES or "mongoproxy")."""
    if flag_value:
        return flag_value
    return environ.get("OTEL_SERVICE_NAME", "").strip() or None


# ---- the sink ----


class TracingSink:
    """Turns CommandEvents into OpenTelemetry spans and exports them in the background."""

    name = "tracing"

    def __init__(
        self,
        exporters: list[tuple[str, Any]],
        *,
        sample_ratio: float = 0.0,
        trace_query: bool = False,
        resource: Any = None,
        version: str = "",
        logger: logging.Logger | None = None,
        destination: str = "",
        max_queue_size: int = 2048,
        schedule_delay_millis: float | None = None,
        max_export_batch_size: int | None = None,
        cursor_map_size: int = CURSOR_MAP_SIZE,
        cursor_ttl_seconds: float = CURSOR_TTL_SECONDS,
        close_timeout_seconds: float = CLOSE_TIMEOUT_SECONDS,
        rng: random.Random | None = None,
    ) -> None:
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import ReadableSpan
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
            from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
        except ImportError as exc:  # pragma: no cover - exercised through create()
            raise ConfigError(f"tracing needs the OpenTelemetry SDK ({exc.name} is missing): {TRACING_EXTRA}") from None
        self._ReadableSpan = ReadableSpan
        self._SpanContext = SpanContext
        self._Link = Link
        self._TraceState = TraceState
        self._Status = Status
        self._ERROR = StatusCode.ERROR
        self._UNSET = Status(StatusCode.UNSET)
        self._CLIENT = SpanKind.CLIENT
        self._SAMPLED = TraceFlags(TraceFlags.SAMPLED)
        self._EMPTY_STATE = TraceState()
        self.resource = resource if resource is not None else Resource.create({"service.name": "mongoproxy"})
        self.scope = InstrumentationScope("mongoproxy", version or None)
        self.sample_ratio = float(sample_ratio)
        self.trace_query = bool(trace_query)
        self.destination = destination
        self._log = logger or logging.getLogger("mongoproxy.tracing")
        self._rng = rng or random.Random()
        self._random = self._rng.random
        self._bits = self._rng.getrandbits
        self._cursor_map_size = int(cursor_map_size)
        self._cursor_ttl_ns = int(cursor_ttl_seconds * 1e9)
        self._close_timeout = float(close_timeout_seconds)
        # (upstream host, upstream port, cursor id) -> _Cursor, least recently used first.
        self._cursors: OrderedDict[tuple, _Cursor] = OrderedDict()
        self._bases: dict[tuple, dict] = {}
        self.cursors_evicted = 0
        self.cursors_expired = 0
        self.spans = 0  # spans built (each is offered to every exporter)
        self.malformed = 0  # comments whose trace context did not parse
        self._warn_lock = threading.Lock()
        self._last_warn = -math.inf
        self._failing = False
        self._closed = False
        EXPORT_LOG.install()
        self._exports = [
            Export(self, label, exp, max_queue_size, schedule_delay_millis, max_export_batch_size)
            for label, exp in exporters
        ]

    # ---- counters ----

    @property
    def dropped(self) -> int:
        """Spans lost: queue full, export failed, or still queued at close (summed over exporters)."""
        return sum(e.dropped for e in self._exports)

    @property
    def exported(self) -> int:
        """Spans the exporters accepted."""
        return sum(e.exported for e in self._exports)

    @property
    def open_cursors(self) -> int:
        """Cursors currently remembered for getMore/killCursors inheritance."""
        return len(self._cursors)

    # ---- the hook ----

    def on_command(self, event: CommandEvent) -> None:
        """Decide whether the command is traced; if so build its span and queue it (event loop, a few µs)."""
        if self._closed:
            return
        req = event.request
        op = event.op
        parent = None  # SpanContext of our span's parent
        links = ()
        found = None
        request_cursor = None
        cursor_op = op in _CURSOR_OPS or (req is not None and req.opcode in _LEGACY_CURSOR_OP_CODES)
        if cursor_op:
            request_cursor = req.cursor_id if req is not None else None
            if request_cursor:
                conn = event.connection
                found = self._cursor_lookup((conn.upstream_host, conn.upstream_port, request_cursor), event)
        if found is not None:
            if not found.sampled:
                return
            trace_id, parent, links = found.trace_id, found.parent, found.links
        else:
            ctx = self._context_of(req, event) if req is not None else None
            if ctx is not None:
                if not ctx.sampled:
                    if not cursor_op:
                        self._remember_cursor(event, None, None, False)
                    return
                trace_id = ctx.trace_id
                state = self._TraceState(list(ctx.tracestate)) if ctx.tracestate else self._EMPTY_STATE
                parent = self._SpanContext(trace_id, ctx.span_id, True, self._SAMPLED, state)
            elif (
                self.sample_ratio > 0.0
                and not is_sensitive(op)  # handshake and credentials: never by ratio sampling
                and (self.sample_ratio >= 1.0 or self._random() < self.sample_ratio)
            ):
                trace_id = self._bits(128) or 1
            else:
                if not cursor_op:
                    self._remember_cursor(event, None, None, False)
                return
        span_ctx = self._SpanContext(
            trace_id,
            self._bits(64) or 1,
            False,
            self._SAMPLED,
            parent.trace_state if parent is not None else self._EMPTY_STATE,
        )
        self._emit(event, op, span_ctx, parent, links, request_cursor)
        if not cursor_op:
            self._remember_cursor(event, parent, span_ctx, True)

    # ---- context and cursors ----

    def _context_of(self, req: Any, event: CommandEvent) -> tracecontext.TraceContext | None:
        try:
            tp = req.comment_traceparent
            if tp is not None:
                return tracecontext.from_document(tp, req.comment_tracestate)
            comment = req.comment
            if comment:
                return tracecontext.from_comment(comment)
        except tracecontext.MalformedContext as exc:
            self.malformed += 1
            self._log.debug(
                "ignoring the trace context in the comment of %s on %s.%s from %s: %s",
                event.op,
                event.database,
                event.collection,
                event.connection.client,
                exc,
            )
        return None

    def _cursor_lookup(self, key: tuple, event: CommandEvent) -> _Cursor | None:
        entry = self._cursors.get(key)
        if entry is None:
            return None
        now = event.reply_last_ns or event.request_last_ns
        if now > entry.expires_ns:
            del self._cursors[key]
            self.cursors_expired += 1
            return None
        if event.op in _KILL or event.request.opcode == OP_KILL_CURSORS or event.cursor_id == 0 or event.failed:
            # killCursors, an exhausted cursor, or a getMore error (e.g. CursorNotFound): the cursor is gone.
            del self._cursors[key]
        else:
            entry.expires_ns = now + self._cursor_ttl_ns
            self._cursors.move_to_end(key)
        return entry

    def _remember_cursor(self, event: CommandEvent, parent: Any, span_ctx: Any, sampled: bool) -> None:
        """Remember the decision for the cursor this (non-cursor) command opened, if it opened one."""
        cursor_id = event.cursor_id
        if not cursor_id:
            return
        # An unsampled decision only needs remembering when ratio sampling could decide otherwise later.
        if not sampled and self.sample_ratio <= 0.0:
            return
        cursors = self._cursors
        now = event.reply_last_ns or event.request_last_ns
        while cursors:
            oldest_key, oldest = next(iter(cursors.items()))
            if oldest.expires_ns >= now:
                break
            del cursors[oldest_key]
            self.cursors_expired += 1
        if not sampled:
            entry = _Cursor(0, None, (), False, now + self._cursor_ttl_ns)
        elif parent is not None:
            # Followers are siblings of the opener under the caller's span, linked to the opener.
            entry = _Cursor(span_ctx.trace_id, parent, (self._Link(span_ctx),), True, now + self._cursor_ttl_ns)
        else:
            # The opener started the trace: followers are its children.
            entry = _Cursor(span_ctx.trace_id, span_ctx, (), True, now + self._cursor_ttl_ns)
        key = (event.connection.upstream_host, event.connection.upstream_port, cursor_id)
        cursors[key] = entry
        cursors.move_to_end(key)
        while len(cursors) > self._cursor_map_size:
            cursors.popitem(last=False)
            self.cursors_evicted += 1

    # ---- the span ----

    def _base_attributes(self, conn: Any) -> dict:
        """The attributes every span of this client/server pair shares (cached: they repeat span after span)."""
        key = (conn.upstream_host, conn.upstream_port, conn.client_host, conn.client_port)
        base = self._bases.get(key)
        if base is None:
            if len(self._bases) >= 4096:
                self._bases.clear()
            base = self._bases[key] = {
                "db.system.name": "mongodb",
                "server.address": conn.upstream_host,
                "server.port": conn.upstream_port,
                "network.peer.address": conn.client_host,
                "network.peer.port": conn.client_port,
                "network.transport": "tcp",
            }
        return base

    def _emit(
        self, event: CommandEvent, op: str, span_ctx: Any, parent: Any, links: tuple, request_cursor: int | None
    ) -> None:
        collection = event.collection
        name = f"{op} {collection}" if collection else (op or "unknown")
        attrs = self._base_attributes(event.connection).copy()
        if event.database:
            attrs["db.namespace"] = event.database
        if collection:
            attrs["db.collection.name"] = collection
        attrs["db.operation.name"] = op
        attrs["db.query.summary"] = name
        n = event.documents_returned
        if n is not None:
            attrs["db.response.returned_rows"] = n
        cursor_id = request_cursor or event.cursor_id
        if cursor_id:
            attrs["db.mongodb.cursor_id"] = cursor_id
        attrs["mongoproxy.request.size"] = event.request_size
        if event.fault:
            attrs["mongoproxy.fault"] = event.fault  # a drill rule acted on this command (mongoproxy.faults)
        if event.reply_size:
            attrs["mongoproxy.response.size"] = event.reply_size
        status = self._UNSET
        if event.ok is False or (event.reply is not None and event.failed):
            code, code_name = _failure(event)
            if code is not None:
                attrs["db.response.status_code"] = str(code)
            error_type = code_name or (CODE_NAMES.get(code) or str(code) if code is not None else "_OTHER")
            attrs["error.type"] = error_type
            status = self._Status(self._ERROR, error_type)
        if self.trace_query:
            q = event_query(event, False)  # shared with the command log and the digest: computed once
            if q is not None:
                attrs["db.query.text"] = q.redacted
                attrs["mongoproxy.query.shape"] = q.shape
        end_ns = event.reply_last_ns or event.request_last_ns  # no reply to an unacknowledged write
        span = self._ReadableSpan(
            name=name,
            context=span_ctx,
            parent=parent,
            resource=self.resource,
            attributes=attrs,
            links=links,
            kind=self._CLIENT,
            status=status,
            start_time=wall_ns(event.request_first_ns),
            end_time=wall_ns(end_ns),
            instrumentation_scope=self.scope,
        )
        self.spans += 1
        for export in self._exports:
            export.offer(span)

    # ---- export health, reported at most once a minute ----

    def queue_full(self, export: Export) -> None:
        self._warn(export, "the export queue is full (the collector is slow or unreachable)")

    def export_failed(self, export: Export) -> None:
        self._warn(export, EXPORT_LOG.last or "export failed")

    def export_ok(self, export: Export) -> None:
        if EXPORT_LOG.messages:
            EXPORT_LOG.messages = []  # a later failure reports its own cause, not an old one
        if self._failing:
            self._failing = False
            self._log.info("exporting spans to %s works again", self._where(export))

    def _warn(self, export: Export, reason: str) -> None:
        now = time.monotonic()
        if now - self._last_warn < WARN_INTERVAL_SECONDS:
            return
        with self._warn_lock:
            if now - self._last_warn < WARN_INTERVAL_SECONDS:
                return
            self._last_warn = now
        self._failing = True  # the next successful export says so, once
        self._log.warning(
            "cannot export spans to %s: %s; %d span(s) dropped so far (this warning repeats at most once a minute)",
            self._where(export),
            reason,
            self.dropped,
        )

    def _where(self, export: Export) -> str:
        return self.destination if export.label == "otlp" and self.destination else export.label

    # ---- shutdown ----

    def flush(self) -> None:
        """Export everything queued now (blocks until the exporters return; for tests and tools)."""
        for export in self._exports:
            export.processor.force_flush()

    def close(self) -> None:
        """Flush what is queued within close_timeout_seconds, then stop the export threads."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self._close_timeout
        threads = []
        for export in self._exports:
            t = threading.Thread(
                target=export.processor.shutdown, name=f"mongoproxy-tracing-close-{export.label}", daemon=True
            )
            t.start()
            threads.append((export, t))
        for export, t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                # Abort the exporter's retries so the processor thread ends; what it held is lost.
                try:
                    export.exporter.shutdown()
                except Exception:  # noqa: BLE001
                    pass
                t.join(0.5)
            export.lost_at_close = max(0, export.emitted - export.taken)
        if self.dropped:
            self._log.warning("%d span(s) could not be exported", self.dropped)


class _Cursor:
    """What a getMore/killCursors on this cursor inherits from the command that opened it."""

    __slots__ = ("trace_id", "parent", "links", "sampled", "expires_ns")

    def __init__(self, trace_id: int, parent: Any, links: tuple, sampled: bool, expires_ns: int) -> None:
        self.trace_id = trace_id
        self.parent = parent  # SpanContext the follower's span hangs under
        self.links = links  # (Link to the opener,) when the follower is its sibling
        self.sampled = sampled
        self.expires_ns = expires_ns


def _failure(event: CommandEvent) -> tuple[int | None, str]:
    """(code, codeName) of a failure: the command error, else the first write error, else the write concern error."""
    if event.code is not None or event.code_name:
        return event.code, event.code_name
    reply = event.reply
    if reply is not None:
        if reply.write_errors:
            return reply.write_error_code, reply.write_error_code_name or ""
        if reply.write_concern_error_code is not None:
            return reply.write_concern_error_code, reply.write_concern_error_code_name or ""
    return None, ""


# ---- creation ----


def _one_line_json(span: Any) -> str:
    return span.to_json(indent=None) + os.linesep


def create(config: Any, ctx: Any) -> TracingSink | None:
    """A TracingSink when tracing can produce spans (a ratio above 0, an OTLP endpoint, or --trace-console)."""
    environ: Mapping[str, str] = ctx.extra.get("environ", os.environ)
    log = ctx.logger.getChild("tracing") if ctx.logger is not None else logging.getLogger("mongoproxy.tracing")
    ratio = float(config.trace_sample_ratio or 0.0)
    console = bool(config.trace_console)
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        if ratio > 0 or console or config.otlp_endpoint:
            log.info("tracing is off because OTEL_SDK_DISABLED=true")
        return None
    protocol = resolve_protocol(config.otlp_protocol, environ)
    endpoint, endpoint_source = resolve_endpoint(config.otlp_endpoint, protocol, environ)
    use_otlp = endpoint is not None or (ratio > 0 and not console)
    if not use_otlp and not console:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
    except ImportError as exc:
        raise ConfigError(
            f"tracing needs the OpenTelemetry SDK, which is not installed ({exc.name} is missing): {TRACING_EXTRA}"
        ) from None
    exporters: list[tuple[str, Any]] = []
    destination = ""
    if use_otlp:
        if endpoint is None:
            endpoint = DEFAULT_HTTP_ENDPOINT + TRACES_PATH if protocol == HTTP_PROTOBUF else DEFAULT_GRPC_ENDPOINT
            endpoint_source = "the OTLP default"
        exporters.append(("otlp", otlp_exporter(protocol, endpoint)))
        destination = endpoint
    if console:
        exporters.append(
            ("console", ConsoleSpanExporter(out=ctx.extra.get("console_out", sys.stdout), formatter=_one_line_json))
        )
    attributes: dict[str, Any] = {"service.version": ctx.version}
    service = resolve_service_name(config.service_name, environ)
    if service:
        attributes["service.name"] = service
    resource = Resource.create(attributes)
    if not service and str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "mongoproxy"}))
    trace_query = bool(config.trace_query)
    if trace_query and config.get("no_redact"):
        # One scanner pass renders the query text for both sinks; traces only ever carry the redacted form.
        log.warning("--trace-query is ignored with --no-redact: spans never carry literal values")
        trace_query = False
    sink = TracingSink(
        exporters,
        sample_ratio=ratio,
        trace_query=trace_query,
        resource=resource,
        version=ctx.version,
        logger=log,
        destination=destination,
        max_queue_size=_env_int(environ, "OTEL_BSP_MAX_QUEUE_SIZE", 2048),
        schedule_delay_millis=_env_int(environ, "OTEL_BSP_SCHEDULE_DELAY", 5000),
        max_export_batch_size=_env_int(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
    )
    parts = []
    if use_otlp:
        parts.append(f"OTLP {protocol} to {destination} (from {endpoint_source})")
    if console:
        parts.append("stdout")
    log.info(
        "exporting spans as service %r by %s; commands with a trace context in their comment follow "
        "its sampled flag, others start a trace with probability %g",
        resource.attributes.get("service.name"),
        " and ".join(parts),
        ratio,
    )
    return sink


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} {raw!r} is not a whole number: give a positive integer, e.g. {default}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value
