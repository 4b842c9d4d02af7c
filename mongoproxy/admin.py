"""The admin endpoint: /healthz, /readyz and /metrics over a minimal HTTP/1.1 server on the proxy's loop."""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mongoproxy.errors import StartupError

log = logging.getLogger("mongoproxy.admin")

MAX_REQUEST_HEAD = 16 * 1024


class AdminProtocol(asyncio.Protocol):
    """One HTTP request per connection (Connection: close); GET and HEAD only."""

    def __init__(self, registry: Any, proxy: Any) -> None:
        self.registry = registry
        self.proxy = proxy
        self.transport: Any = None
        self.buf = bytearray()
        self.answered = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        self.buf += data
        if b"\r\n\r\n" not in self.buf and b"\n\n" not in self.buf:
            if len(self.buf) > MAX_REQUEST_HEAD:
                self._respond(431, b"request head too large\n")
            return
        self.answered = True
        line = bytes(self.buf.split(b"\n", 1)[0]).decode("latin-1").strip()
        parts = line.split()
        if len(parts) < 2:
            self._respond(400, b"bad request\n")
            return
        method, target = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            self._respond(405, b"method not allowed\n", extra=b"Allow: GET, HEAD\r\n")
            return
        head = method == "HEAD"
        if target == "/healthz":
            self._respond(200, b"ok\n", head=head)
        elif target == "/readyz":
            if self.proxy.ready and not self.proxy.draining:
                self._respond(200, b"ready\n", head=head)
            else:
                self._respond(503, b"draining\n" if self.proxy.draining else b"starting\n", head=head)
        elif target == "/metrics":
            asyncio.get_running_loop().create_task(self._metrics(head))
        else:
            self._respond(404, b"not found: try /metrics, /healthz or /readyz\n", head=head)

    async def _metrics(self, head: bool) -> None:
        # Rendering runs in a thread so a big registry never stalls the data path.
        try:
            body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, self.registry)
        except Exception as exc:  # noqa: BLE001
            log.exception("rendering /metrics failed")
            self._respond(500, f"metrics failed: {exc!r}\n".encode())
            return
        self._respond(200, body, content_type=CONTENT_TYPE_LATEST.encode(), head=head)

    def _respond(
        self,
        status: int,
        body: bytes,
        *,
        content_type: bytes = b"text/plain; charset=utf-8",
        head: bool = False,
        extra: bytes = b"",
    ) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        reason = {
            200: b"OK",
            400: b"Bad Request",
            404: b"Not Found",
            405: b"Method Not Allowed",
            431: b"Request Header Fields Too Large",
            500: b"Internal Server Error",
            503: b"Service Unavailable",
        }[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%sConnection: close\r\n\r\n"
            % (status, reason, content_type, len(body), extra)
        )
        if not head:
            self.transport.write(body)
        self.transport.close()


async def start(hosts: Any, port: int, registry: Any, proxy: Any) -> asyncio.Server:
    """Serve the admin endpoint on one host or several; StartupError names the fix when the port is taken."""
    loop = asyncio.get_running_loop()
    hosts = [hosts] if isinstance(hosts, str) else list(hosts)
    try:
        server = await loop.create_server(
            lambda: AdminProtocol(registry, proxy), hosts if len(hosts) > 1 else hosts[0], port, reuse_address=True
        )
    except OSError as exc:
        hostport = ",".join(f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts)
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"cannot serve the admin endpoint on {hostport}: the port is already in use; "
                "choose another --admin-port"
            ) from None
        raise StartupError(
            f"cannot serve the admin endpoint on {hostport}: {exc.strerror}; check --admin-host"
        ) from None
    return server
