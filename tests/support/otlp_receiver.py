"""An OTLP/HTTP trace receiver for tests: POST /v1/traces, protobuf decoded with opentelemetry-proto.

    with OTLPReceiver() as rx:                      # listens on 127.0.0.1, a free port
        ... run mongoproxy with --otlp-endpoint rx.endpoint ...
        [span] = rx.wait_for(lambda s: s.trace_id == want, count=1)
        rx.stop(); ...; rx.restart()                 # take the collector down and bring it back, same port

`python -m tests.support.otlp_receiver --port 4318` prints each received span as one JSON line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

TRACES_PATH = "/v1/traces"


@dataclass
class ReceivedSpan:
    """One span as the receiver decoded it; ids are lowercase hex, "" when absent."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str  # "CLIENT", "SERVER", ...
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: str  # "UNSET", "OK" or "ERROR"
    status_message: str
    trace_state: str
    flags: int
    links: list[dict[str, str]] = field(default_factory=list)
    resource: dict[str, Any] = field(default_factory=dict)
    scope_name: str = ""
    scope_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def any_value(v: AnyValue) -> Any:
    """An OTLP AnyValue as a Python value."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return bytes(v.bytes_value)
    return getattr(v, kind)


def decode_request(body: bytes) -> list[ReceivedSpan]:
    """Every span of an ExportTraceServiceRequest."""
    req = ExportTraceServiceRequest()
    req.ParseFromString(body)
    out = []
    for rs in req.resource_spans:
        resource = {kv.key: any_value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    ReceivedSpan(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=Span.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes={kv.key: any_value(kv.value) for kv in s.attributes},
                        status_code=Status.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_"),
                        status_message=s.status.message,
                        trace_state=s.trace_state,
                        flags=s.flags,
                        links=[{"trace_id": ln.trace_id.hex(), "span_id": ln.span_id.hex()} for ln in s.links],
                        resource=resource,
                        scope_name=ss.scope.name,
                        scope_version=ss.scope.version,
                    )
                )
    return out


class OTLPReceiver:
    """A threaded OTLP/HTTP receiver on host:port (0 picks a free port, kept across stop/restart)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        on_span: Callable[[ReceivedSpan], None] | None = None,
        keep: bool = True,
    ) -> None:
        self.host = host
        self.keep = keep  # False: count requests and spans, keep none (long benchmark runs)
        self.port = port
        self.on_span = on_span
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.received = 0  # spans accepted, kept or not
        self.bad_requests = 0  # bodies that did not decode (answered 400)
        self.last_error = ""
        self.status = 200  # answer every export with this status (e.g. 503 to play a failing collector)
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle
    def start(self) -> OTLPReceiver:
        """Listen and serve in a background thread."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # one request per connection: stop() leaves no live connection behind

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if self.path.rstrip("/") != TRACES_PATH:
                    self._answer(404, b"", "text/plain")
                    return
                try:
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    spans = decode_request(body)
                except Exception as exc:  # noqa: BLE001 - a bad request is a test failure to report
                    with receiver._cond:
                        receiver.bad_requests += 1
                        receiver.last_error = f"{type(exc).__name__}: {exc}"
                    self._answer(400, repr(exc).encode(), "text/plain")
                    return
                status = receiver.status
                if status == 200:
                    receiver._add(spans)
                    self._answer(200, ExportTraceServiceResponse().SerializeToString(), "application/x-protobuf")
                else:
                    with receiver._cond:
                        receiver.requests += 1
                    self._answer(status, b"", "text/plain")

            def _answer(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((self.host, self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"otlp-receiver-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (the collector is down: connections are refused)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def restart(self) -> OTLPReceiver:
        """Listen again on the same port."""
        self.stop()
        return self.start()

    def __enter__(self) -> OTLPReceiver:
        return self.start() if self._server is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def endpoint(self) -> str:
        """Base URL (what OTEL_EXPORTER_OTLP_ENDPOINT or --otlp-endpoint takes)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # ---- spans
    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._cond:
            self.requests += 1
            self.received += len(spans)
            if self.keep:
                self.spans.extend(spans)
            self._cond.notify_all()
        if self.on_span is not None:
            for s in spans:
                self.on_span(s)

    def matching(self, predicate: Callable[[ReceivedSpan], bool]) -> list[ReceivedSpan]:
        """Spans received so far that satisfy predicate, in arrival order."""
        with self._cond:
            return [s for s in self.spans if predicate(s)]

    def wait_for(
        self, predicate: Callable[[ReceivedSpan], bool], count: int = 1, timeout: float = 20.0
    ) -> list[ReceivedSpan]:
        """Block until at least `count` received spans satisfy predicate; AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [s for s in self.spans if predicate(s)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    bad = f"{self.bad_requests} undecodable" + (f": {self.last_error}" if self.last_error else "")
                    raise AssertionError(
                        f"OTLP receiver: {len(found)} of {count} expected span(s) after {timeout}s "
                        f"({len(self.spans)} span(s) received in all, {self.requests} request(s), "
                        f"{bad})"
                    )
                self._cond.wait(left)

    def trace(self, trace_id: str, count: int = 1, timeout: float = 20.0) -> list[ReceivedSpan]:
        """Wait for `count` spans of one trace (hex id) and return them."""
        return self.wait_for(lambda s: s.trace_id == trace_id, count, timeout)


def main(argv: list[str] | None = None) -> int:
    """Run a receiver in the foreground, printing each span as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318)
    parser.add_argument("--indent", type=int, default=None, help="pretty-print with this indent")
    parser.add_argument("--quiet", action="store_true", help="print nothing per span, keep nothing (benchmarks)")
    args = parser.parse_args(argv)

    def show(span: ReceivedSpan) -> None:
        print(json.dumps(span.to_dict(), indent=args.indent, default=repr), flush=True)

    rx = OTLPReceiver(args.host, args.port, on_span=None if args.quiet else show, keep=not args.quiet).start()
    print(f"OTLP/HTTP receiver on {rx.endpoint}{TRACES_PATH}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        rx.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
