"""The admin endpoint on aiohttp: /healthz, /readyz, /metrics and the routes components contribute.

Contract (shared with other components): any sink on the SinkBus and any object in `proxy.components`
that has `admin_routes() -> list[aiohttp.web.RouteDef]` serves those routes here. Every route except
/healthz and /readyz requires `Authorization: Bearer <token>` when --admin-token-file is given.
Invariants:
- Bounded: at most --admin-max-connections connections (later ones get a 503 and are closed), a request's
  head must arrive within --admin-read-timeout (and so must the next request on a kept-alive connection),
  heads are capped by aiohttp's line/field limits and bodies by --admin-max-request-bytes.
- /metrics is rendered (and gzipped) in a worker thread, so a big registry never stalls the data path.
- The token is compared in constant time and re-read by reload() (SIGHUP), as are the TLS certificate and key;
  a reload that fails logs one line and keeps the old ones.
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import hmac
import logging
import ssl
from typing import Any

from aiohttp import web

from mongoproxy.config import Option, non_negative_float, positive_int
from mongoproxy.errors import ConfigError, StartupError

log = logging.getLogger("mongoproxy.admin")

G = "admin endpoint"
OPEN_PATHS = frozenset(("/healthz", "/readyz"))  # probes: never behind the token


def public(handler: Any) -> Any:
    """Mark a contributed route handler that serves no data (a static page): reachable without the token."""
    handler.admin_public = True
    return handler


MAX_HEAD_LINE = 8190  # aiohttp's request-line and header-field limits, named here so that docs can cite them
MAX_HEADERS = 100

OPTIONS: list[Option] = [
    Option(
        "admin_token_file",
        ("--admin-token-file",),
        "file holding a bearer token required on every admin route but /healthz and /readyz; re-read on SIGHUP",
        str,
        None,
        metavar="PATH",
        group=G,
    ),
    Option(
        "admin_tls_cert",
        ("--admin-tls-cert",),
        "PEM certificate (chain) to serve the admin endpoint over HTTPS; needs --admin-tls-key; re-read on SIGHUP",
        str,
        None,
        metavar="PATH",
        group=G,
    ),
    Option(
        "admin_tls_key", ("--admin-tls-key",), "PEM private key of --admin-tls-cert", str, None, metavar="PATH", group=G
    ),
    Option(
        "admin_read_timeout",
        ("--admin-read-timeout",),
        "seconds a client has to send a request head (also the idle time allowed between kept-alive requests)",
        non_negative_float("--admin-read-timeout"),
        10.0,
        metavar="S",
        group=G,
    ),
    Option(
        "admin_max_connections",
        ("--admin-max-connections",),
        "admin connections served at once; later ones get a 503",
        positive_int("--admin-max-connections"),
        64,
        metavar="N",
        group=G,
    ),
    Option(
        "admin_max_request_bytes",
        ("--admin-max-request-bytes",),
        "largest request body accepted (413 past it); heads are limited to 8190-byte lines and 100 fields",
        positive_int("--admin-max-request-bytes"),
        1 << 20,
        metavar="N",
        group=G,
    ),
]


def _read_token(path: str) -> bytes:
    with open(path, "rb") as f:
        token = f.read().strip()
    if not token:
        raise ValueError("the file is empty")
    return token


class _Guard(asyncio.Protocol):
    """Wraps aiohttp's per-connection protocol: admission, the head read timer, the active count."""

    def __init__(self, admin: AdminServer, inner: Any) -> None:
        self.admin = admin
        self.inner = inner
        self.transport: Any = None
        self.timer: asyncio.TimerHandle | None = None
        self.rejected = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        admin = self.admin
        if len(admin.guards) >= admin.max_connections:
            self.rejected = True
            admin.count("too_many_connections")
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 32\r\n"
                b"Connection: close\r\n\r\ntoo many admin connections open\n"
            )
            transport.close()
            return
        admin.guards[transport] = self
        self.arm()
        self.inner.connection_made(transport)

    def arm(self) -> None:
        """Close the connection unless a request head arrives within the read timeout."""
        self.disarm()
        if self.admin.read_timeout > 0:
            self.timer = asyncio.get_running_loop().call_later(self.admin.read_timeout, self._expired)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        self.admin.count("read_timeout")
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if not self.rejected:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self.rejected else self.inner.eof_received()

    def pause_writing(self) -> None:
        if not self.rejected:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if not self.rejected:
            self.inner.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.disarm()
        if self.rejected:
            return
        self.admin.guards.pop(self.transport, None)
        self.inner.connection_lost(exc)


class AdminServer:
    """The admin HTTP(S) server: built-in probes and metrics, contributed routes, token and TLS."""

    def __init__(self, registry: Any, proxy: Any, config: Any = None) -> None:
        get = (lambda k, d=None: config.get(k, d)) if config is not None else (lambda k, d=None: d)
        self.registry = registry
        self.proxy = proxy
        self.read_timeout = float(get("admin_read_timeout", 10.0))
        self.max_connections = int(get("admin_max_connections", 64))
        self.max_request_bytes = int(get("admin_max_request_bytes", 1 << 20))
        self.token_file = get("admin_token_file")
        self.tls_cert, self.tls_key = get("admin_tls_cert"), get("admin_tls_key")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--admin-tls-cert and --admin-tls-key go together: give both or neither")
        self.token: bytes | None = None
        if self.token_file:
            try:
                self.token = _read_token(self.token_file)
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"--admin-token-file {self.token_file}: {getattr(exc, 'strerror', None) or exc}"
                ) from None
        self.ssl: ssl.SSLContext | None = None
        if self.tls_cert:
            self.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            try:
                self.ssl.load_cert_chain(self.tls_cert, self.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"--admin-tls-cert/--admin-tls-key: cannot load them ({exc})") from None
        self.guards: dict[Any, _Guard] = {}
        self.rejected: dict[str, int] = {}
        self.servers: list[asyncio.Server] = []
        self.runner: web.AppRunner | None = None

    # ---- the application ----

    def routes(self) -> list:
        """Built-in routes followed by those of every sink and every proxy component."""
        routes = [web.get("/healthz", self.healthz), web.get("/readyz", self.readyz), web.get("/metrics", self.metrics)]
        bus = getattr(self.proxy, "bus", None)
        for owner in [*getattr(bus, "sinks", ()), *getattr(self.proxy, "components", ())]:
            contribute = getattr(owner, "admin_routes", None)
            if callable(contribute):
                routes.extend(contribute())
        return routes

    def application(self) -> web.Application:
        """The aiohttp application (also usable on its own in tests)."""
        app = web.Application(client_max_size=self.max_request_bytes, middlewares=[self._middleware])
        app.add_routes(self.routes())
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        guard = self.guards.get(request.transport)
        if guard is not None:
            guard.disarm()  # the head arrived; a handler (an event stream, say) may run as long as it needs
        try:
            if (
                self.token is not None
                and request.path not in OPEN_PATHS
                and not getattr(request.match_info.handler, "admin_public", False)
                and not self._authorized(request)
            ):
                self.count("unauthorized")
                return web.Response(
                    status=401, text="a bearer token is required\n", headers={"WWW-Authenticate": "Bearer"}
                )
            return await handler(request)
        finally:
            if guard is not None:
                guard.arm()  # the next request on a kept-alive connection must come in time too

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        token = self.token
        return token is not None and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)

    async def healthz(self, request: web.Request) -> web.Response:
        """200 while the process runs."""
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        """200 when serving; 503 and the reason while starting, draining or waiting for upstream DNS."""
        proxy = self.proxy
        if proxy.ready and not proxy.draining:
            return web.Response(text="ready\n")
        reason = "draining" if proxy.draining else getattr(proxy, "not_ready_reason", "") or "starting"
        return web.Response(status=503, text=reason + "\n")

    async def metrics(self, request: web.Request) -> web.Response:
        """The registry in the format the Accept header asks for (OpenMetrics or text), gzipped if accepted."""
        accept = request.headers.get("Accept", "")
        gz = "gzip" in request.headers.get("Accept-Encoding", "").lower()
        try:
            body, content_type = await asyncio.get_running_loop().run_in_executor(
                None, _render, self.registry, accept, gz
            )
        except Exception as exc:  # noqa: BLE001
            log.exception("rendering /metrics failed")
            return web.Response(status=500, text=f"metrics failed: {exc!r}\n")
        headers = {"Content-Type": content_type, "Vary": "Accept, Accept-Encoding"}
        if gz:
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, headers=headers)

    # ---- lifecycle ----

    def count(self, reason: str) -> None:
        """Count a refused or cut admin connection or request."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    async def start(self, hosts: Any, port: int) -> None:
        """Listen on each host; StartupError names the fix when the port is taken."""
        self.runner = web.AppRunner(
            self.application(),
            handle_signals=False,
            access_log=None,
            max_line_size=MAX_HEAD_LINE,
            max_field_size=MAX_HEAD_LINE,
            max_headers=MAX_HEADERS,
            keepalive_timeout=self.read_timeout if self.read_timeout > 0 else 75.0,
        )
        await self.runner.setup()
        server = self.runner.server
        if server is None:  # setup() always makes one; this narrows the type
            raise RuntimeError("aiohttp runner has no server after setup()")
        loop = asyncio.get_running_loop()
        hosts = [hosts] if isinstance(hosts, str) else list(hosts)
        try:
            self.servers.append(
                await loop.create_server(
                    lambda: _Guard(self, server()),
                    hosts if len(hosts) > 1 else hosts[0],
                    port,
                    reuse_address=True,
                    ssl=self.ssl,
                )
            )
        except OSError as exc:
            await self.aclose()
            where = ",".join(f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts)
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(
                    f"cannot serve the admin endpoint on {where}: the port is already in use; "
                    "choose another --admin-port"
                ) from None
            raise StartupError(
                f"cannot serve the admin endpoint on {where}: {exc.strerror}; check --admin-host"
            ) from None

    @property
    def sockets(self) -> list:
        """The listening sockets."""
        return [s for srv in self.servers for s in srv.sockets]

    def close(self) -> None:
        """Stop listening and close the open admin connections."""
        for srv in self.servers:
            srv.close()
        for transport in list(self.guards):
            transport.close()

    async def aclose(self, timeout: float = 1.0) -> None:
        """close(), then release aiohttp's state within `timeout` seconds."""
        self.close()
        if self.runner is not None:
            try:
                await asyncio.wait_for(self.runner.cleanup(), timeout)
            except (TimeoutError, Exception):  # noqa: BLE001 - shutdown goes on whatever aiohttp says
                pass

    def reload(self) -> None:
        """Re-read the token file and the TLS certificate and key; on failure keep the old ones (one log line)."""
        if self.token_file:
            try:
                self.token = _read_token(self.token_file)
                log.info("admin token re-read from %s", self.token_file)
            except (OSError, ValueError) as exc:
                log.warning("cannot re-read --admin-token-file %s (%s): keeping the old token", self.token_file, exc)
        if self.ssl is not None:
            try:
                self.ssl.load_cert_chain(self.tls_cert, self.tls_key)
                log.info("admin TLS certificate re-read from %s", self.tls_cert)
            except (OSError, ssl.SSLError) as exc:
                log.warning("cannot re-read the admin TLS certificate (%s): keeping the old one", exc)

    def register_metrics(self, registry: Any) -> None:
        """Export mongoproxy_admin_rejected_total{reason}."""
        registry.register(_Collector(self))


class _Collector:
    REASONS = ("too_many_connections", "read_timeout", "unauthorized")

    def __init__(self, admin: AdminServer) -> None:
        self._admin = admin

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        fam = CounterMetricFamily(
            "mongoproxy_admin_rejected",
            "Admin connections or requests refused: over --admin-max-connections, past --admin-read-timeout, "
            "or without the bearer token.",
            labels=["reason"],
        )
        for reason in self.REASONS:
            fam.add_metric([reason], self._admin.rejected.get(reason, 0))
        yield fam

    def describe(self):
        from prometheus_client.core import CounterMetricFamily

        return [CounterMetricFamily("mongoproxy_admin_rejected", "", labels=["reason"])]


def _render(registry: Any, accept: str, gz: bool) -> tuple[bytes, str]:
    from prometheus_client.exposition import choose_encoder

    encoder, content_type = choose_encoder(accept)
    body = encoder(registry)
    if gz:
        body = gzip.compress(body, compresslevel=5)
    return body, content_type


async def start(hosts: Any, port: int, registry: Any, proxy: Any, config: Any = None) -> AdminServer:
    """Serve the admin endpoint on one host or several."""
    admin = AdminServer(registry, proxy, config)
    admin.register_metrics(registry)
    await admin.start(hosts, port)
    return admin
