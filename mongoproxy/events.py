"""Events the sans-io core emits, and the Sink protocol that consumes them.

Timestamps are `time.monotonic_ns()` values; `wall_ns()` turns one into Unix
nanoseconds for logs and traces. Events are plain slotted objects: sinks may
keep them but must not mutate them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

# CommandEvent is built by the compiled tracker, which fills it in C (mongoproxy/tracker.pyx, tracker.pyi).
from mongoproxy.tracker import CommandEvent as CommandEvent
from mongoproxy.tracker import Fanout

_MONO_ANCHOR = time.monotonic_ns()
_WALL_ANCHOR = time.time_ns()


def wall_ns(mono_ns: int) -> int:
    """Unix time in ns for a monotonic_ns() reading taken in this process."""
    return _WALL_ANCHOR + (mono_ns - _MONO_ANCHOR)


@dataclass(slots=True, eq=False)
class Connection:
    """One proxied client connection; shared by all its events and filled in as the handshake is seen."""

    id: int
    client_host: str
    client_port: int
    upstream_host: str = ""
    upstream_port: int = 0
    listen_port: int = 0
    transparent: bool = False
    opened_ns: int = 0
    closed_ns: int = 0
    upstream_connect_ns: int = 0  # how long the upstream TCP connect took
    # From the first hello/isMaster and its reply.
    app_name: str = ""
    driver_name: str = ""
    driver_version: str = ""
    compression_offered: tuple[str, ...] = ()
    compression: str = ""  # the compressor the server accepted first, "" when none
    replica_set: str = ""
    member_state: str = ""  # --upstream listeners: primary, secondary, arbiter, mongos, standalone, other
    max_wire_version: int | None = None
    # TLS (mongoproxy.tls): whether each side is encrypted, the client's SNI and verified certificate subject.
    client_tls: bool = False
    upstream_tls: bool = False
    tls_server_name: str = ""
    client_cert_subject: str = ""
    # Byte counters, bumped by the data path.
    bytes_from_client: int = 0
    bytes_from_server: int = 0

    @property
    def client(self) -> str:
        """host:port of the client."""
        return hostport(self.client_host, self.client_port)

    @property
    def server(self) -> str:
        """host:port of the upstream server."""
        return hostport(self.upstream_host, self.upstream_port)


def hostport(host: str, port: int) -> str:
    """host:port, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def duration_ms(ns: int) -> float:
    """Nanoseconds as milliseconds rounded to the microsecond (half up): the command log's and the digest's value."""
    return ((ns + 500) // 1000) / 1000  # exact integer rounding, then the double nearest to k/1000


@dataclass(slots=True, eq=False)
class DecodeErrorEvent:
    """Traffic that could not be observed; it was still forwarded unchanged."""

    connection: Connection
    direction: str  # "request" (client to server) or "reply"
    reason: str  # stable token, see mongoproxy.errors.DecodeError
    detail: str
    at_ns: int
    fatal: bool  # True when observation of this direction stopped for good


# Every UpstreamConnectError.reason (metric label values).
UPSTREAM_ERROR_REASONS = ("refused", "timeout", "unreachable", "dns", "loop", "no_original_dst", "tls", "error")


@dataclass(slots=True, eq=False)
class UpstreamConnectError:
    """The proxy could not reach the upstream for a client connection."""

    connection: Connection
    reason: str  # "refused", "timeout", "unreachable", "dns", "loop", "no_original_dst", "error"
    detail: str
    at_ns: int


class Sink(Protocol):
    """A subscriber to core events. Every hook is optional: define only those you need.

    Hooks run on the event loop and must be quick; a sink that does I/O hands
    work to a bounded queue or thread and drops (and counts) when it is full.
    An exception in a hook is logged once per sink and counted; it never
    reaches the data path.
    """

    name: str

    def on_connection_open(self, conn: Connection) -> None: ...
    def on_connection_close(self, conn: Connection) -> None: ...
    def on_command(self, event: CommandEvent) -> None: ...
    def on_decode_error(self, event: DecodeErrorEvent) -> None: ...
    def on_upstream_error(self, event: UpstreamConnectError) -> None: ...
    def on_unmatched_reply(self, conn: Connection, response_to: int) -> None: ...
    def on_requests_dropped(self, conn: Connection, count: int) -> None: ...
    def on_data(self, conn: Connection, from_client: bool, data: bytes, now_ns: int) -> None:
        """Every forwarded chunk, after it was written on (capture). Keep it O(1): hand it to a queue."""

    def close(self) -> None: ...


HOOKS = (
    "on_connection_open",
    "on_connection_close",
    "on_command",
    "on_decode_error",
    "on_upstream_error",
    "on_unmatched_reply",
    "on_requests_dropped",
    "on_data",
)


class SinkBus:
    """Fans events out to sinks; a sink that raises is logged once, counted, and never reaches the caller."""

    # Set in __init__, one per name in HOOKS: the bound hook methods of the sinks that define it.
    _on_connection_open: list[Any]
    _on_connection_close: list[Any]
    _on_command: list[Any]
    _on_decode_error: list[Any]
    _on_upstream_error: list[Any]
    _on_unmatched_reply: list[Any]
    _on_requests_dropped: list[Any]
    _on_data: list[Any]

    def __init__(self, sinks: list, logger: Any = None) -> None:
        import logging

        self.sinks = list(sinks)
        self.errors: dict[str, int] = {s.name: 0 for s in self.sinks}
        self._log = logger or logging.getLogger("mongoproxy.sinks")
        # Only sinks that define a hook are called for it.
        for hook in HOOKS:
            setattr(self, "_" + hook, [getattr(s, hook) for s in self.sinks if callable(getattr(s, hook, None))])
        self.wants_data = bool(self._on_data)  # the data path skips the call entirely when False
        # command(event): every sink's on_command, a failing one contained like _fan's; compiled (tracker.pyx),
        # since the data path calls it once per command.
        self.command: Callable[[CommandEvent], None] = Fanout(self._on_command, self._failed)

    def _failed(self, method: Any, exc: BaseException) -> None:
        # A hook is a bound method, or a compiled hook object that names its sink (`sink`, e.g. MetricsHook).
        sink = getattr(method, "__self__", None)
        if sink is None:
            sink = getattr(method, "sink", method)
        name = getattr(sink, "name", type(sink).__name__)
        count = self.errors.get(name, 0)
        self.errors[name] = count + 1
        if count == 0:
            self._log.error(
                "sink %s failed in %s (further errors are only counted): %r",
                name,
                getattr(method, "__name__", type(method).__name__),
                exc,
                exc_info=exc,
            )

    def _fan(self, methods: list, *args: Any) -> None:
        for m in methods:
            try:
                m(*args)
            except Exception as exc:  # noqa: BLE001
                self._failed(m, exc)

    def connection_open(self, conn: Connection) -> None:
        self._fan(self._on_connection_open, conn)

    def connection_close(self, conn: Connection) -> None:
        self._fan(self._on_connection_close, conn)

    def decode_error(self, event: DecodeErrorEvent) -> None:
        self._fan(self._on_decode_error, event)

    def upstream_error(self, event: UpstreamConnectError) -> None:
        self._fan(self._on_upstream_error, event)

    def unmatched_reply(self, conn: Connection, response_to: int) -> None:
        self._fan(self._on_unmatched_reply, conn, response_to)

    def requests_dropped(self, conn: Connection, count: int) -> None:
        self._fan(self._on_requests_dropped, conn, count)

    def data(self, conn: Connection, from_client: bool, data: bytes, now_ns: int) -> None:
        for m in self._on_data:
            try:
                m(conn, from_client, data, now_ns)
            except Exception as exc:  # noqa: BLE001
                self._failed(m, exc)

    def close(self) -> None:
        """Close every sink (flush queues); errors are logged, not raised."""
        for s in self.sinks:
            close = getattr(s, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as exc:  # noqa: BLE001
                    self._failed(close, exc)
