"""The asyncio shell: listeners, connection pairs, the byte pump, backpressure and drain.

The data path, top to bottom: ClientSide.data_received writes the chunk to
the upstream transport first, unchanged, then feeds the same chunk to the
request Tap (mongoproxy._tap: one C call that counts, frames, scans and
matches, behind it the request FrameScanner for what it does not take);
UpstreamSide.data_received is its mirror image.
Invariants:
- Forwarding never waits for observation, and nothing observation does can
  raise into the pump (Tap.feed, FrameScanner.feed and SinkBus contain their errors).
- A side's reading is paused while the other side's write buffer is above
  its high-water mark, so a slow reader never makes memory grow.
- The client is not read from until the upstream is connected.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

from mongoproxy import __version__, dstaddr, faults, tlslisten
from mongoproxy._bson_parser import RENDER_OFF, RENDER_REDACTED, RENDER_VALUES
from mongoproxy._tap import Tap
from mongoproxy.config import Config, ProxySpec
from mongoproxy.errors import StartupError
from mongoproxy.events import Connection, DecodeErrorEvent, SinkBus, UpstreamConnectError, hostport
from mongoproxy.faults import gate as fault_gate
from mongoproxy.limits import DEFAULT_MAX_CONNECTIONS, ConnectionLimiter, RateLimitedLog
from mongoproxy.protocol.framing import FrameScanner, Message, checksum_function
from mongoproxy.tls import TlsManager
from mongoproxy.tracker import Tracker

log = logging.getLogger("mongoproxy")

WRITE_HIGH_WATER = 256 * 1024
monotonic_ns = time.monotonic_ns


class ClientSide(asyncio.Protocol):
    """The client's connection to the proxy; owns the pair and the observation tap."""

    tls_server_name = ""  # the SNI of a TLS-terminated client, set by the TLS listener

    def __init__(self, proxy: Proxy, spec: ProxySpec) -> None:
        self.proxy = proxy
        self.spec = spec
        self.transport: Any = None
        self.upstream: UpstreamSide | None = None
        self.conn: Connection | None = None
        self.tracker: Tracker | None = None
        self.requests: FrameScanner | None = None
        self.replies: FrameScanner | None = None
        self.request_tap: Tap | None = None  # the fast path in front of each FrameScanner (mongoproxy._tap)
        self.reply_tap: Tap | None = None
        self.client_eof = False
        self.upstream_eof = False
        self.closed = False
        self._connecting: asyncio.Task | None = None
        self._reading_blocked = {"connect"}  # reasons the client is not read from
        self._early: list[bytes] = []  # chunks that arrived before the upstream connected
        self.wants_data = proxy.bus.wants_data
        # Bound methods of the pump, looked up once: the upstream's write (None until connected), the request feed.
        self._write_upstream: Callable[[bytes], Any] | None = None
        self._feed_requests: Any = None
        self.fault_gate: Any = None  # mongoproxy.faults.gate.RequestGate while a fault rule could match
        self.passthrough = False  # a TLS stream this listener cannot open: forwarded, never framed
        self._last_from_client = False

    # ---- client → upstream ----

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if not self.proxy.limiter.admit(len(self.proxy.connections)):
            # Refused at accept: reset, counted by the limiter, no Connection. (A TLS listener admitted its
            # clients before the handshake, counting them until here: they always pass this check.)
            self.closed = True
            transport.abort()
            return
        transport.pause_reading()
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        _nodelay(transport)
        proxy = self.proxy
        peer = transport.get_extra_info("peername") or ("", 0)
        sockname = transport.get_extra_info("sockname") or ("", 0)
        conn = self.conn = Connection(
            id=proxy.next_id(),
            client_host=str(peer[0]),
            client_port=int(peer[1]),
            listen_port=int(sockname[1]),
            transparent=self.spec.transparent,
            opened_ns=monotonic_ns(),
            tls_server_name=self.tls_server_name,
        )
        proxy.tls.describe_client(transport, conn)
        proxy.connections.add(self)
        target = self._target(transport, sockname)
        if target is None:
            return
        conn.upstream_host, conn.upstream_port = target
        cfg = proxy.config
        bus = proxy.bus
        self.tracker = Tracker(conn, bus, cfg.max_pending_requests)
        self.requests = FrameScanner(
            False,
            self.tracker.on_request,
            self._request_error,
            cfg.max_message_bytes,
            proxy.query_rendering,
            verify_checksums=cfg.verify_checksums,
            max_observed_compressed_bytes=cfg.max_observed_compressed_bytes,
        )
        self.replies = FrameScanner(
            True,
            self._on_reply,
            self._reply_error,
            cfg.max_message_bytes,
            verify_checksums=cfg.verify_checksums,
            max_observed_compressed_bytes=cfg.max_observed_compressed_bytes,
        )
        self.request_tap = Tap(self.requests, self.tracker, conn, False)
        self.reply_tap = Tap(self.replies, self.tracker, conn, True)
        if proxy.draining:
            self.reply_tap.after_reply = self.close_if_idle
        # A plaintext listener looks at the first chunk once for a TLS ClientHello (passthrough).
        self._feed_requests = self.request_tap.feed if conn.client_tls else self._first_chunk
        bus.connection_open(conn)
        self._connecting = asyncio.get_running_loop().create_task(self._connect(target))

    def data_received(self, data: bytes) -> None:
        write = self._write_upstream
        if write is None:
            # pause_reading() in connection_made() may be ignored (CPython 3.11, uvloop): hold
            # what comes early and pause now, which takes effect.
            self._early.append(data)
            self.transport.pause_reading()
            return
        write(data)  # 1. bytes first, unchanged, at once
        self._feed_requests(data)  # 2. observation: counts the bytes, then frames, scans and matches
        if self.wants_data:
            self.proxy.bus.data(self.conn, True, data, monotonic_ns())

    def _first_chunk(self, data: bytes) -> None:
        self._feed_requests = self.request_tap.feed
        if tlslisten.looks_like_tls(data):
            self._start_passthrough(self.proxy.tls.passthrough_reason())  # the feeds now only count bytes
        self._feed_requests(data)

    def _start_passthrough(self, reason: str) -> None:
        self.passthrough = True
        self.wants_data = False  # capture frames what it is given: give it nothing
        self._last_from_client = True  # the ClientHello awaits its answer
        self._feed_requests = self._passthrough_request
        self.upstream._feed_replies = self._passthrough_reply
        self.proxy.tls.passthrough(self.conn, reason)

    # In passthrough the feeds only count the bytes and note which side spoke last: the connection is idle
    # when the server did.
    def _passthrough_request(self, data: bytes) -> None:
        self.conn.bytes_from_client += len(data)
        self._last_from_client = True

    def _passthrough_reply(self, data: bytes) -> None:
        self.conn.bytes_from_server += len(data)
        self._last_from_client = False
        if self.proxy.draining:
            self.close_if_idle()

    def eof_received(self) -> bool:
        self.client_eof = True
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            if upstream.transport.can_write_eof():
                if self.fault_gate is not None:  # after any request a fault delay still holds
                    self.fault_gate.valve.call(upstream.transport.write_eof)
                else:
                    upstream.transport.write_eof()
            else:  # a TLS upstream has no half-close: finish the pair
                self.close()
        if self.upstream_eof:
            self.close()
        return True  # keep the other half open

    def connection_lost(self, exc: BaseException | None) -> None:
        self.close()
        # Nothing feeds this pair any more (close() closed both transports). Drop the links that make it a
        # reference cycle (scanners hold bound methods of self, self <-> upstream, the gates) so that reference
        # counting frees it now: left to the cyclic gc, a burst of closed connections held memory until a full pass.
        self.upstream = self.tracker = self.requests = self.replies = self.fault_gate = None
        self.request_tap = self.reply_tap = None  # each holds its FrameScanner, which holds bound methods of self
        self._feed_requests = self._write_upstream = None

    def pause_writing(self) -> None:  # the client reads replies slower than the server sends them
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.closed:
            self.upstream.transport.resume_reading()

    # ---- upstream connection ----

    def _target(self, transport: Any, sockname: tuple) -> tuple[str, int] | None:
        spec = self.spec
        if not spec.transparent:
            route = getattr(spec, "route", None)  # an --upstream listener (mongoproxy.topology.MemberSpec)
            return route(self) if route is not None else (spec.upstream_host, spec.upstream_port)
        sock = transport.get_extra_info("socket")
        dst = dstaddr.original_dst(sock) if sock is not None else None
        if dst is None:
            self._refuse("no_original_dst", "no original destination (is an iptables REDIRECT rule in place?)")
            return None
        if self.proxy.is_own_listener(dst, sockname):
            self._refuse(
                "loop",
                f"original destination {hostport(*dst)} is this proxy's own listener; "
                "refusing to connect to myself (exclude the proxy's uid from the REDIRECT rule)",
            )
            return None
        return dst

    async def _connect(self, target: tuple[str, int]) -> None:
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        started = monotonic_ns()
        try:
            sni = self.conn.tls_server_name if self.spec.transparent else ""  # static: verify the upstream's name
            upstream_tls = getattr(self.spec, "upstream_tls", None) or proxy.tls.upstream_args  # --upstream: its URI's
            tls_args = upstream_tls(target[0], sni)
            _, upstream = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamSide(self), target[0], target[1], **tls_args),
                timeout=proxy.config.connect_timeout or None,
            )
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - every failure closes the client and is counted
            reason, detail = _connect_failure(exc)
            if tls_args and reason in ("tls", "timeout"):
                proxy.tls.upstream_handshake_error(exc, hostport(*target))
            # Once a minute per upstream and reason: a dead upstream must not turn every client into a log line.
            proxy.upstream_log.warning(
                (target, reason),
                "connection %d from %s: cannot reach upstream %s: %s",
                self.conn.id,
                self.conn.client,
                hostport(*target),
                detail,
            )
            proxy.bus.upstream_error(UpstreamConnectError(self.conn, reason, detail, monotonic_ns()))
            self.close()
            return
        except BaseException:  # SystemExit, KeyboardInterrupt: not a connect failure; close, then let it through
            self.close()
            raise
        if self.closed:  # the client went away while we were connecting
            upstream.transport.close()
            return
        self.conn.upstream_connect_ns = monotonic_ns() - started
        self.upstream = upstream
        self._write_upstream = upstream.transport.write
        gate = getattr(self.spec, "gate", None)
        if gate is not None:  # an --upstream listener: hello replies are rewritten (topology.install_gate)
            gate(self)
        if proxy.faults is not None and proxy.faults.active:
            fault_gate.install(proxy.faults, self)  # swaps the write functions; nothing else on the data path
        early, self._early = self._early, []
        for chunk in early:
            self.data_received(chunk)
        if self.client_eof and upstream.transport.can_write_eof():
            upstream.transport.write_eof()
        self._unblock_reading("connect")

    def _refuse(self, reason: str, detail: str) -> None:
        log.warning("connection %d from %s refused: %s", self.conn.id, self.conn.client, detail)
        self.proxy.bus.upstream_error(UpstreamConnectError(self.conn, reason, detail, monotonic_ns()))
        self.closed = True
        self.proxy.connections.discard(self)
        self.transport.abort()

    def _block_reading(self, reason: str) -> None:
        if not self._reading_blocked:
            self.transport.pause_reading()
        self._reading_blocked.add(reason)

    def _unblock_reading(self, reason: str) -> None:
        self._reading_blocked.discard(reason)
        if not self._reading_blocked and not self.closed:
            self.transport.resume_reading()

    # ---- observation callbacks ----

    def _on_reply(self, msg: Message) -> None:  # the FrameScanner's replies; the Tap's call after_reply itself
        self.tracker.on_reply(msg)
        after = self.reply_tap.after_reply  # set while draining (drain(), connection_made)
        if after is not None:
            after()

    def _request_error(self, reason: str, detail: str, fatal: bool) -> None:
        self._decode_error("request", reason, detail, fatal)

    def _reply_error(self, reason: str, detail: str, fatal: bool) -> None:
        self._decode_error("reply", reason, detail, fatal)

    def _decode_error(self, direction: str, reason: str, detail: str, fatal: bool) -> None:
        log.debug(
            "connection %d: %s decode error %s: %s%s",
            self.conn.id,
            direction,
            reason,
            detail,
            " (observation of this direction stopped)" if fatal else "",
        )
        self.proxy.bus.decode_error(DecodeErrorEvent(self.conn, direction, reason, detail, monotonic_ns(), fatal))

    # ---- teardown ----

    @property
    def idle(self) -> bool:
        """No request awaits a reply and no message is half-seen in either direction."""
        if self.tracker is None:
            return True
        if self.passthrough:  # no bytes in flight: nothing buffered, and the server spoke last
            return not self._last_from_client and self._buffered() == 0
        if self.requests.stopped or self.replies.stopped:
            return False  # unknown: wait for the drain deadline
        return self.tracker.in_flight == 0 and not self.requests.mid_message and not self.replies.mid_message

    def _buffered(self) -> int:
        n = self.transport.get_write_buffer_size() if self.transport is not None else 0
        if self.upstream is not None and self.upstream.transport is not None:
            n += self.upstream.transport.get_write_buffer_size()
        return n

    def close_if_idle(self) -> None:
        if not self.closed and self.idle:
            self.close()

    def drain(self) -> None:
        """The proxy is draining: close now if idle, else after the reply that makes this pair idle."""
        if self.reply_tap is not None:
            self.reply_tap.after_reply = self.close_if_idle
        self.close_if_idle()

    def close(self) -> None:
        """Close both sides, flushing what is already buffered; safe to call repeatedly."""
        if self.closed:
            return
        self.closed = True
        self.proxy.connections.discard(self)
        if self.fault_gate is not None:
            self.fault_gate.close()
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        if self.transport is not None:
            self.transport.close()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        conn = self.conn
        if conn is not None and self.tracker is not None:
            conn.closed_ns = monotonic_ns()
            # A message cut short by the close (a partial header included) is counted, once per direction.
            for direction, scanner in (("request", self.requests), ("reply", self.replies)):
                if scanner.mid_message:
                    self._decode_error(direction, "truncated", "the connection closed inside a message", True)
            self.proxy.bus.connection_close(conn)

    def abort(self) -> None:
        """Reset both sides at once (forced exit)."""
        if self.transport is not None:
            self.transport.abort()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.abort()
        self.close()


class UpstreamSide(asyncio.Protocol):
    """The proxy's connection to the server: the mirror image of ClientSide."""

    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.transport: Any = None
        # Looked up once (the client side is set up before its upstream connects).
        self._write_client = client.transport.write
        self._feed_replies: Callable[[Any], None] = client.reply_tap.feed

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self._write_client(data)  # 1. bytes first, unchanged, at once
        self._feed_replies(data)  # 2. observation: counts the bytes, then frames, scans and matches
        client = self.client
        if client.wants_data:
            client.proxy.bus.data(client.conn, False, data, monotonic_ns())

    def eof_received(self) -> bool:
        client = self.client
        client.upstream_eof = True
        if client.transport.can_write_eof():
            if client.fault_gate is not None:  # after any reply a fault delay or throttle still holds
                client.fault_gate.replies.valve.call(client.transport.write_eof)
            else:
                client.transport.write_eof()
        else:  # a TLS client has no half-close: finish the pair
            client.close()
        if client.client_eof:
            client.close()
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.client.close()

    def pause_writing(self) -> None:  # the server reads requests slower than the client sends them
        self.client._block_reading("backpressure")

    def resume_writing(self) -> None:
        self.client._unblock_reading("backpressure")


def _nodelay(transport: Any) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _connect_failure(exc: BaseException) -> tuple[str, str]:
    """(reason token, human detail) for an upstream connect failure."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout", "connect timed out"
    if isinstance(exc, socket.gaierror):
        return "dns", f"cannot resolve host ({exc.strerror or exc})"
    if isinstance(exc, ssl.SSLError) or "SSL" in str(exc):  # a TCP connect that got through; TLS failed
        return "tls", f"TLS handshake failed: {getattr(exc, 'verify_message', '') or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return "refused", "connection refused"
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return "unreachable", exc.strerror or str(exc)
        # create_connection folds several attempts into one OSError whose text names each.
        if "refused" in str(exc).lower():
            return "refused", "connection refused"
        return "error", exc.strerror or str(exc)
    return "error", repr(exc)


class Proxy:
    """All listeners of one process, their connections, and the drain state."""

    def __init__(self, config: Config, bus: SinkBus, registry: Any = None) -> None:
        self.config = config
        self.bus = bus
        self.tls = TlsManager(config, registry)  # contexts, reload and the TLS counters
        self.connections: set[ClientSide] = set()
        self.servers: list[tuple[ProxySpec, Any]] = []  # asyncio.Server or tlslisten.TlsListener
        self.draining = False
        self.ready = False
        self._next_id = 0
        self._own_addresses: set[tuple[str, int]] = set()
        self.limiter = ConnectionLimiter(config.get("max_connections", DEFAULT_MAX_CONNECTIONS))
        self.upstream_log = RateLimitedLog(log)
        # Objects offering admin_routes()/reload(), like sinks (see admin, signals); TLS reloads its certificates.
        self.components: list = [self.tls]
        self.unresolved: set[ProxySpec] = set()  # static upstreams whose name did not resolve yet
        # Other conditions of readiness (topology.Cluster: a member of every --upstream answers): each returns
        # None when satisfied, else the reason /readyz gives. update_ready() is the one place that decides.
        self.ready_checks: list[Callable[[], str | None]] = []
        self.not_ready_reason = "starting"
        self._dns_task: asyncio.Task | None = None
        self.faults: Any = None  # FaultEngine, set by serve() (or a test) when fault injection is configured
        # One scanner rendering per request serves the command log, tracing, the digest and the live view;
        # the digest is on by default, so shapes are rendered unless every consumer is off.
        self.query_rendering = RENDER_OFF
        if config.get("log_query") or config.get("trace_query") or not config.get("no_digest", True):
            self.query_rendering = RENDER_VALUES if config.get("no_redact") else RENDER_REDACTED

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def _open_connections(self) -> int:
        return len(self.connections)

    @property
    def ports(self) -> list[int]:
        """The bound listen port of each --proxy, in order."""
        return [srv.sockets[0].getsockname()[1] for _, srv in self.servers]

    async def start(self) -> None:
        """Resolve static upstreams and bind every listener; StartupError names the fix."""
        loop = asyncio.get_running_loop()
        hosts = list(self.config.listen_host)
        host = ",".join(hosts)
        for spec in self.config.proxy:
            if not spec.transparent and not await _resolves(spec):
                self.unresolved.add(spec)  # like Envoy's STRICT_DNS: serve, stay unready, retry
            try:
                factory = functools.partial(ClientSide, self, spec)
                server = await tlslisten.create_server(
                    self.tls, factory, hosts, spec.listen_port, self.limiter, self._open_connections, backlog=1024
                )
            except OSError as exc:
                await self.close_listeners()
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(
                        f"cannot listen on {hostport(host, spec.listen_port)} for --proxy "
                        f"{spec.text}: the port is already in use; stop the other process or "
                        "choose another port"
                    ) from None
                raise StartupError(
                    f"cannot listen on {hostport(host, spec.listen_port)} for --proxy "
                    f"{spec.text}: {exc.strerror}; check --listen-host"
                ) from None
            self.servers.append((spec, server))
            self.add_own_listener(server.sockets)
        for spec, server in self.servers:
            target = (
                "original destination (transparent)"
                if spec.transparent
                else hostport(spec.upstream_host, spec.upstream_port)
            )
            tls = f" (TLS {self.tls.listen_mode})" if self.tls.terminating else ""
            up = f" (TLS, {self.tls.info_label})" if self.tls.upstream else ""
            log.info("listening on %s%s -> %s%s", hostport(host, server.sockets[0].getsockname()[1]), tls, target, up)
        self.tls.start()
        self.update_ready()
        if self.unresolved:
            self._dns_task = loop.create_task(self._resolve_until_ready())

    async def _resolve_until_ready(self) -> None:
        """Retry unresolved static upstreams with a capped backoff; ready once every one resolves."""
        delay = DNS_RETRY_FIRST
        while self.unresolved and not self.draining:
            await asyncio.sleep(delay)
            for spec in list(self.unresolved):
                if await _resolves(spec):
                    self.unresolved.discard(spec)
                    log.info("upstream host %r of --proxy %s resolves now", spec.upstream_host, spec.text)
            delay = min(delay * 2, DNS_RETRY_MAX)
        self.update_ready()

    def update_ready(self) -> None:
        """Decide readiness: not draining, every static upstream resolves and every ready check passes."""
        reason = None
        if self.draining:
            reason = "draining"
        elif self.unresolved:
            names = ", ".join(sorted(s.upstream_host for s in self.unresolved))
            reason = f"upstream host(s) {names} do not resolve yet"
        else:
            reason = next((r for r in (check() for check in self.ready_checks) if r), None)
        self.ready = reason is None
        self.not_ready_reason = reason or ""

    def add_own_listener(self, sockets: Any) -> None:
        """Remember the bound addresses of a listener, for the transparent loop check (is_own_listener)."""
        for sock in sockets:
            addr = sock.getsockname()
            self._own_addresses.add((addr[0], addr[1]))

    def remove_own_listener(self, sockets: Any) -> None:
        """Forget a closed listener's addresses (a departed --upstream member)."""
        for sock in sockets:
            addr = sock.getsockname()
            self._own_addresses.discard((addr[0], addr[1]))

    def is_own_listener(self, dst: tuple[str, int], sockname: tuple) -> bool:
        """True when a transparent connection's original destination is one of our listeners."""
        if (dst[0], dst[1]) == (sockname[0], sockname[1]):
            return True
        listen_ports = {port for _, port in self._own_addresses}
        if dst[1] not in listen_ports:
            return False
        if (dst[0], dst[1]) in self._own_addresses:
            return True
        return any(
            host in ("0.0.0.0", "::") for host, port in self._own_addresses if port == dst[1]
        ) and _is_local_address(dst[0])

    async def close_listeners(self) -> None:
        self.tls.close()
        for _, server in self.servers:
            server.close()
        for _, server in self.servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 1)
            except (TimeoutError, Exception):  # noqa: BLE001 - wait_closed also waits for connections
                pass

    async def drain(self, seconds: float) -> bool:
        """Stop accepting, deliver replies in flight for up to `seconds`, then close everything.

        Returns True when every connection finished before the deadline.
        """
        self.draining = True
        self.update_ready()
        self.tls.close()
        if self._dns_task is not None:
            self._dns_task.cancel()
        for _, server in self.servers:
            server.close()
        for c in list(self.connections):
            c.drain()
        deadline = time.monotonic() + seconds
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            for c in list(self.connections):
                c.close_if_idle()
        clean = not self.connections
        if not clean:
            log.warning("drain deadline passed with %d connection(s) still busy; closing them", len(self.connections))
        for c in list(self.connections):
            c.close()
        await asyncio.sleep(0)  # let transports flush and report connection_lost
        return clean

    def abort_all(self) -> None:
        for c in list(self.connections):
            c.abort()


DNS_RETRY_FIRST = 1.0
DNS_RETRY_MAX = 30.0
_dns_log = RateLimitedLog(log)


async def _resolves(spec: ProxySpec) -> bool:
    """True when the static upstream's host resolves; a failure is logged (once a minute per host)."""
    try:
        await asyncio.get_running_loop().getaddrinfo(spec.upstream_host, spec.upstream_port, type=socket.SOCK_STREAM)
        return True
    except (socket.gaierror, UnicodeError) as exc:
        _dns_log.warning(
            spec.upstream_host,
            "cannot resolve upstream host %r in --proxy %s (%s): not ready; retrying (check the name or use an "
            "IP address)",
            spec.upstream_host,
            spec.text,
            getattr(exc, "strerror", None) or exc,
        )
        return False


def _is_local_address(host: str) -> bool:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


async def serve(config: Config, on_started: Callable[[Proxy], Any] | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain; the exit code. on_started(proxy) runs once listening."""
    from prometheus_client import CollectorRegistry, disable_created_metrics

    from mongoproxy import admin, limits, reclaim, shutdown, signals, topology
    from mongoproxy.runtime_gauges import RuntimeGauges
    from mongoproxy.sinks import SinkContext, build_sinks

    loop = asyncio.get_running_loop()
    disable_created_metrics()  # *_created series double the scrape size and no dashboard reads them
    registry = CollectorRegistry(auto_describe=True)
    modes = {"transparent" if s.transparent else "static" for s in config.proxy}
    ctx = SinkContext(registry=registry, version=__version__, mode=modes.pop() if len(modes) == 1 else "mixed")
    sinks = build_sinks(config, ctx)
    bus = SinkBus(sinks)
    for s in sinks:
        watch = getattr(s, "watch", None)
        if callable(watch):
            watch(bus, sinks)
    if config.verify_checksums:
        checksum_function()  # fail at start-up, not at the first message, when the library is missing
    proxy = Proxy(config, bus, registry)
    registry.register(RuntimeGauges(proxy, loop))
    cluster = topology.create(proxy, registry)  # --upstream: a component before the admin endpoint collects routes
    proxy.faults = faults.create(config, registry)
    proxy.components.append(proxy.faults)
    admin_server = None
    try:
        if config.admin_port:
            admin_server = await admin.start(config.admin_host, config.admin_port, registry, proxy, config)
            proxy.components.append(admin_server)  # its reload() re-reads the token and TLS files on SIGHUP
        await proxy.start()
        if cluster is not None:
            await cluster.start()  # discovery and a listener per member
        limits.install(proxy, registry, loop)
        reclaim.install(proxy, registry, loop)
        proxy.faults.attach(proxy)
    except BaseException:
        if admin_server is not None:
            await admin_server.aclose()
        await proxy.close_listeners()
        shutdown.close_sinks(bus.sinks)
        raise

    if admin_server is not None:
        admin_port = admin_server.sockets[0].getsockname()[1]
        log.info(
            "admin endpoint on %s (/metrics, /healthz, /readyz)",
            ", ".join(f"http://{hostport(h, admin_port)}" for h in config.admin_host),
        )
    if on_started is not None:
        on_started(proxy)
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal(signame: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("%s received: draining for up to %gs (send it again to exit now)", signame, config.drain_seconds)
            stop.set()
        else:
            log.warning("%s received again: exiting now", signame)
            proxy.abort_all()
            loop.stop()

    handled = signals.install(loop, proxy, on_signal)
    try:
        await stop.wait()
        clean = await proxy.drain(config.drain_seconds)
        log.info(
            "drained %s; closing the sinks (within %gs)",
            "cleanly" if clean else "at the deadline",
            shutdown.SHUTDOWN_MARGIN_SECONDS,
        )
    finally:
        signals.remove(loop, handled)
        if admin_server is not None:
            await admin_server.aclose(timeout=0.5)
        proxy.faults.close()
        shutdown.close_sinks(bus.sinks)
    return 0


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(config: Config) -> int:
    """Blocking entry point of `mongoproxy run`."""
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mongoproxy import signals

    signals.ignore_hangup()
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        try:
            return runner.run(serve(config))
        except RuntimeError as exc:
            if "Event loop stopped before Future completed" in str(exc):
                return 1  # forced exit on a second signal
            raise
