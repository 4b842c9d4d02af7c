"""Where and how the tracing sink's spans leave: the OTLP endpoint and protocol, the exporter and its queue.

- The endpoint and the protocol come from --otlp-endpoint/--otlp-protocol, else the OTEL_EXPORTER_OTLP_*
  variables (resolve_endpoint, resolve_protocol: pure).
- otlp_exporter() makes the exporter: the SDK's for grpc; for http/protobuf the SDK's with the direct protobuf
  writer of mongoproxy.sinks.otlp_encode in place of the SDK's encoder.
- Export is one exporter behind one BatchSpanProcessor, counting what is queued, exported and dropped.
- EXPORT_LOG folds the export path's per-batch log messages into the sink's own warning, at most one a minute.

The OpenTelemetry SDK is imported only when an exporter or an Export is made.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from mongoproxy.errors import ConfigError
from mongoproxy.sinks.otlp_encode import encode_spans

TRACING_EXTRA = "pip install 'mongoproxy[tracing]'"
GRPC_EXTRA = "pip install 'mongoproxy[grpc]'"
HTTP_PROTOBUF = "http/protobuf"
GRPC = "grpc"
DEFAULT_HTTP_ENDPOINT = "http://localhost:4318"
DEFAULT_GRPC_ENDPOINT = "http://localhost:4317"
TRACES_PATH = "/v1/traces"

# Loggers of the export path whose per-batch messages we fold into one warning a minute.
_EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http",
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.sdk._shared_internal",
)


# ---- endpoint and protocol (pure) ----


def parse_endpoint(value: str) -> str:
    """An http(s) URL with a host; ConfigError naming the fix otherwise."""
    text = str(value).strip()
    hint = "give e.g. http://otel-collector:4318 (http/protobuf) or http://otel-collector:4317 (grpc)"
    try:
        parts = urlsplit(text)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        raise ConfigError(f"OTLP endpoint {text!r} has an invalid port: {hint}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"OTLP endpoint {text!r} is not an http:// or https:// URL: {hint}")
    if not port_ok:
        raise ConfigError(f"OTLP endpoint {text!r} has an invalid port: {hint}")
    return text


def parse_protocol(value: str) -> str:
    """http/protobuf (also "http") or grpc."""
    v = str(value).strip().lower()
    if v in ("http/protobuf", "http"):
        return HTTP_PROTOBUF
    if v == "grpc":
        return GRPC
    if v == "http/json":
        raise ConfigError("OTLP protocol http/json is not supported: use http/protobuf or grpc")
    raise ConfigError(f"OTLP protocol {value!r} is not valid: use http/protobuf or grpc")


def resolve_endpoint(flag_value: str | None, protocol: str, environ: Mapping[str, str]) -> tuple[str | None, str]:
    """(URL to export to or None when nothing is configured, where it came from).

    Precedence: --otlp-endpoint, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (used as is),
    OTEL_EXPORTER_OTLP_ENDPOINT (a base URL: /v1/traces is appended for http).
    For http/protobuf a flag URL without a path gets /v1/traces.
    """
    if flag_value:
        url = flag_value
        if protocol == HTTP_PROTOBUF and urlsplit(url).path in ("", "/"):
            url = url.rstrip("/") + TRACES_PATH
        return url, "--otlp-endpoint"
    for name, is_base in (("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", False), ("OTEL_EXPORTER_OTLP_ENDPOINT", True)):
        raw = environ.get(name, "").strip()
        if raw:
            try:
                url = parse_endpoint(raw)
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from None
            if is_base and protocol == HTTP_PROTOBUF:
                url = url.rstrip("/") + TRACES_PATH
            return url, name
    return None, ""


def resolve_protocol(flag_value: str | None, environ: Mapping[str, str]) -> str:
    """--otlp-protocol, else OTEL_EXPORTER_OTLP_TRACES_PROTOCOL / OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf."""
    if flag_value:
        return flag_value
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        raw = environ.get(name, "").strip()
        if raw:
            try:
                return parse_protocol(raw)
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from None
    return HTTP_PROTOBUF


# ---- export ----


class Export:
    """One exporter behind one BatchSpanProcessor, with the counts the sink needs.

    The SDK processor drops silently-but-for-a-log when its queue is full, so
    the sink keeps its own count of what is queued (`emitted` on the loop,
    `taken` in the export thread) and never offers a span that would not fit.
    """

    def __init__(
        self,
        sink: Any,  # the TracingSink: told of each batch's outcome and of a full queue
        label: str,
        exporter: Any,
        max_queue_size: int,
        schedule_delay_millis: float | None,
        max_export_batch_size: int | None,
    ) -> None:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.sink = sink
        self.label = label
        self.exporter = exporter
        self.max_queue_size = max_queue_size
        self.emitted = 0  # written on the event loop only
        self.taken = 0  # written in the export thread only
        self.exported = 0  # export thread
        self.failed = 0  # export thread
        self.full = 0  # event loop
        self.lost_at_close = 0
        # The SDK refuses a batch larger than the queue; a small queue means small batches.
        batch = min(max_export_batch_size or 512, max_queue_size)
        try:
            self.processor = BatchSpanProcessor(
                self,  # type: ignore[arg-type]  # duck-typed: export(), shutdown() and force_flush() are all it calls
                max_queue_size=max_queue_size,
                schedule_delay_millis=schedule_delay_millis or 5000,
                max_export_batch_size=batch,
            )
        except ValueError as exc:
            raise ConfigError(f"span batch settings are invalid: {exc} (check OTEL_BSP_* variables)") from None

    # SpanExporter interface, called by the processor's thread.
    def export(self, spans: Any) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        n = len(spans)
        self.taken += n
        try:
            result = self.exporter.export(spans)
        except Exception as exc:  # noqa: BLE001 - an exporter bug costs spans, never the proxy
            result = SpanExportResult.FAILURE
            EXPORT_LOG.note(f"{type(exc).__name__}: {exc}")
        if result is SpanExportResult.SUCCESS:
            self.exported += n
            self.sink.export_ok(self)
        else:
            self.failed += n
            self.sink.export_failed(self)
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)

    def offer(self, span: Any) -> None:
        """Queue a span for export, or count it dropped when the queue is full (event loop)."""
        if self.emitted - self.taken >= self.max_queue_size:
            self.full += 1
            self.sink.queue_full(self)
            return
        self.emitted += 1
        self.processor.on_end(span)

    @property
    def dropped(self) -> int:
        return self.full + self.failed + self.lost_at_close


class ExportLogCapture(logging.Filter):
    """Swallows the SDK exporter's per-batch warnings, keeping the last one as the reason for our own warning."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []  # the last two distinct messages: a cause is often followed by "giving up"
        self.installed = False

    @property
    def last(self) -> str:
        """The reason to report: the last one or two distinct messages of the export path."""
        return " / ".join(self.messages)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001
                message = str(record.msg)
            self.note(message)
            return False
        return True

    def note(self, message: str) -> None:
        if not self.messages or self.messages[-1] != message:
            self.messages = (self.messages + [message])[-2:]

    def install(self) -> None:
        if not self.installed:
            for name in _EXPORT_LOGGERS:
                logging.getLogger(name).addFilter(self)
            self.installed = True


EXPORT_LOG = ExportLogCapture()


def fast_otlp_exporter(endpoint: str) -> Any:
    """The SDK's OTLP/HTTP exporter with otlp_encode.encode_spans in place of the SDK's encoder.

    Sending (retries, compression, headers, TLS, timeouts) stays the SDK's. If
    this SDK version lays its exporter out differently, or encoding fails, the
    SDK's own export runs instead.
    """
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import SpanExportResult

    class FastOTLPSpanExporter(OTLPSpanExporter):
        """OTLP/HTTP exporter serialising with mongoproxy's direct protobuf writer."""

        @property
        def fast_path(self) -> bool:
            """True when spans are sent through the SDK's HTTP client after our own encoding."""
            client = getattr(self, "_client", None)
            return callable(getattr(client, "export", None)) and hasattr(self, "_shutdown")

        def export(self, spans: Any) -> Any:
            if not self.fast_path or self._shutdown:
                return super().export(spans)
            try:
                data = encode_spans(spans)
            except Exception:  # noqa: BLE001 - an unexpected value: let the SDK encode this batch
                return super().export(spans)
            result = self._client.export(data)
            return SpanExportResult.SUCCESS if getattr(result, "success", False) else SpanExportResult.FAILURE

    return FastOTLPSpanExporter(endpoint=endpoint)


def otlp_exporter(protocol: str, endpoint: str) -> Any:
    """The span exporter for `protocol` (grpc: the SDK's; http/protobuf: fast_otlp_exporter)."""
    if protocol == GRPC:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
        except ImportError:
            raise ConfigError(
                f"OTLP over grpc needs the grpc exporter, which is not installed: {GRPC_EXTRA} "
                f"(or use --otlp-protocol http/protobuf)"
            ) from None
        return GrpcSpanExporter(endpoint=endpoint, insecure=urlsplit(endpoint).scheme == "http")
    try:
        return fast_otlp_exporter(endpoint)
    except ImportError as exc:
        raise ConfigError(
            f"OTLP export needs the OTLP/HTTP exporter, which is not installed ({exc.name} is missing): {TRACING_EXTRA}"
        ) from None
