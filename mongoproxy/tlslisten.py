"""The TLS-terminating listener: accept, peek at the first record, pick the certificate by SNI, handshake.

create_server() serves plain TCP when the listeners do not open TLS (a
ClientHello there is passed through by the connection itself). Otherwise each
accepted socket is peeked at (MSG_PEEK: nothing is consumed) until its first
record is complete or the handshake timeout runs out. A TLS record (0x16 0x03)
is handed to connect_accepted_socket(ssl=...), whose await raises the
handshake's failure, so every failure is counted under a reason; in `allow`
mode anything else is served as plaintext, in `require` mode it is counted
as `plaintext` and closed. The protocol's connection_made() runs once the
handshake is done, so its data_received() gets decrypted bytes: the tap sits
after decryption on both asyncio and uvloop.

Accepting goes through mongoproxy.limits (ConnectionLimiter.accept): a client
over --max-connections is reset before any peek or handshake, and accept
errors are counted and paused on exactly as on the plain listeners.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

from mongoproxy.limits import ConnectionLimiter
from mongoproxy.tls import TlsManager, classify

PEEK_BYTES = 16389  # one whole TLS record: 5-byte header + up to 2**14 bytes
PEEK_RETRY_S = 0.005  # a ClientHello split over segments: peek again after this


def looks_like_tls(data: bytes) -> bool:
    """True when the first bytes are a TLS handshake record (0x16, then version major 3 when present).

    A MongoDB message starts with its int32 length: 0x16 0x03 would be a first message of about 200 KB+.
    """
    return len(data) >= 1 and data[0] == 0x16 and (len(data) < 2 or data[1] == 0x03)


def client_hello_sni(data: bytes) -> str | None:
    """The server_name of a ClientHello record, or None (absent, or the record is incomplete)."""
    try:
        if len(data) < 9 or data[0] != 0x16 or data[5] != 0x01:
            return None
        end = min(len(data), 5 + struct.unpack_from(">H", data, 3)[0])
        pos = 9 + 2 + 32  # handshake header, legacy_version, random
        pos += 1 + data[pos]  # session id
        pos += 2 + struct.unpack_from(">H", data, pos)[0]  # cipher suites
        pos += 1 + data[pos]  # compression methods
        ext_end = min(end, pos + 2 + struct.unpack_from(">H", data, pos)[0])
        pos += 2
        while pos + 4 <= ext_end:
            ext_type, ext_len = struct.unpack_from(">HH", data, pos)
            pos += 4
            if ext_type == 0:  # server_name: list length, then (type 0 = host_name, length, name)
                if data[pos + 2] == 0:
                    n = struct.unpack_from(">H", data, pos + 3)[0]
                    return data[pos + 5 : pos + 5 + n].decode("ascii", "replace")
                return None
            pos += ext_len
    except (IndexError, struct.error):
        return None
    return None


def _record_complete(data: bytes) -> bool:
    return len(data) >= 5 and len(data) >= 5 + struct.unpack_from(">H", data, 3)[0]


class TlsListener:
    """Listening sockets with an accept loop; quacks like asyncio.Server where the proxy uses it."""

    def __init__(
        self,
        tls: TlsManager,
        factory: Callable[[], Any],
        sockets: list[socket.socket],
        limiter: ConnectionLimiter,
        open_connections: Callable[[], int],
    ) -> None:
        self.tls = tls
        self.factory = factory
        self.sockets = sockets
        self.limiter = limiter
        self.open_connections = open_connections
        self._tasks: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        self._accepting = [loop.create_task(self._accept(s)) for s in sockets]

    async def _accept(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        limiter = self.limiter
        while True:
            sock = await limiter.accept(lsock, self.open_connections)
            # Counted until _open() ends (the protocol is then in the proxy's connections); a done callback,
            # not a finally, so that a task cancelled before it ran is uncounted too.
            limiter.handshaking += 1
            task = loop.create_task(self._open(sock))
            self._tasks.add(task)
            task.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self.limiter.handshaking -= 1

    async def _open(self, sock: socket.socket) -> None:
        tls = self.tls
        loop = asyncio.get_running_loop()
        who = _peer(sock)
        handed_over, matched = False, True
        try:
            head = await asyncio.wait_for(self._peek(loop, sock), tls.handshake_timeout)
            if not head:
                return  # closed before sending anything: nothing to count
            if not looks_like_tls(head):
                if tls.listen_mode != "allow":
                    tls.handshake_error("client", "plaintext", who, "plaintext on a --tls-listen require listener")
                    return
                handed_over = True
                await loop.connect_accepted_socket(self.factory, sock)
                return
            sni = client_hello_sni(head)
            cert, matched = tls.server_cert_for(sni)

            def factory() -> Any:
                protocol = self.factory()
                protocol.tls_server_name = sni or ""
                return protocol

            handed_over = True
            timeout = tls.handshake_timeout
            await asyncio.wait_for(
                loop.connect_accepted_socket(factory, sock, ssl=cert.context, ssl_handshake_timeout=timeout),
                None if timeout is None else timeout + 1,  # the loop's own timeout fires first
            )
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure is counted, the listener goes on
            reason, detail = classify(exc)
            if reason in ("bad_certificate", "other", "eof") and not matched:
                reason = "sni_mismatch"  # the client named a host none of our certificates is for
            tls.handshake_error("client", reason, who, detail)
        finally:
            if not handed_over:
                sock.close()

    async def _peek(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
        """The first bytes, not consumed: once a whole record (or clearly not TLS) is there."""
        fd = sock.fileno()
        fut: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await fut
        finally:
            loop.remove_reader(fd)
        while True:  # bounded by the caller's handshake timeout
            try:
                head = sock.recv(PEEK_BYTES, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                await asyncio.sleep(PEEK_RETRY_S)
                continue
            except OSError:
                return b""
            if not looks_like_tls(head) or _record_complete(head):
                return head  # b"" is end of file
            await asyncio.sleep(PEEK_RETRY_S)  # a ClientHello split over segments

    def close(self) -> None:
        """Stop accepting and abandon handshakes in progress (open connections are the proxy's)."""
        for t in self._accepting:
            t.cancel()
        for t in list(self._tasks):
            t.cancel()
        for s in self.sockets:
            s.close()

    async def wait_closed(self) -> None:
        """Wait for the accept loops to end."""
        await asyncio.gather(*self._accepting, *self._tasks, return_exceptions=True)


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(backlog)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


async def create_server(
    tls: TlsManager,
    factory: Callable[[], Any],
    hosts: list[str],
    port: int,
    limiter: ConnectionLimiter,
    open_connections: Callable[[], int],
    backlog: int = 1024,
) -> Any:
    """A listener on every host: loop.create_server() for plain TCP, a TlsListener when TLS is opened.

    Both admit clients with `limiter` (plain TCP: in the protocol's connection_made()).
    """
    loop = asyncio.get_running_loop()
    if not tls.terminating:
        return await loop.create_server(
            factory, hosts if len(hosts) > 1 else hosts[0], port, reuse_address=True, backlog=backlog
        )
    socks: list[socket.socket] = []
    try:
        for host in hosts:
            socks.append(_bind(host, port or (socks[0].getsockname()[1] if socks else 0), backlog))
    except OSError:
        for s in socks:
            s.close()
        raise
    return TlsListener(tls, factory, socks, limiter, open_connections)
