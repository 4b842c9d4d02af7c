"""Members of a deployment: addresses, states, the discovery hello, and listen ports for their listeners."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import struct
from dataclasses import dataclass, field
from typing import Any

import bson

from mongoproxy.errors import StartupError
from mongoproxy.events import hostport
from mongoproxy.protocol import builders, hello
from mongoproxy.protocol.opcodes import HEADER

DEFAULT_PORT_BASE = 27113
PORT_SEARCH = 200  # ports tried past the last one handed out before the range counts as exhausted
MAX_DISCOVERY_REPLY = 16 * 1024 * 1024


def redact(uri: str) -> str:
    """The URI without its user:password@ part (never logged)."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    auth, at, hosts = rest.partition("@")
    if at and "/" not in auth:
        return f"{scheme}://***@{hosts}"
    return uri


def uri_tls_context(options: Any) -> ssl.SSLContext | None:
    """The client TLS context a connection string asks for (tls=true, tlsCAFile, ...); None for plaintext."""
    if not (options.get("tls") or options.get("ssl")):
        return None
    ctx = ssl.create_default_context(cafile=options.get("tlsCAFile"))
    if options.get("tlsCertificateKeyFile"):
        ctx.load_cert_chain(
            options["tlsCertificateKeyFile"], password=options.get("tlsCertificateKeyFilePassword") or None
        )
    if options.get("tlsInsecure") or options.get("tlsAllowInvalidCertificates"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif options.get("tlsAllowInvalidHostnames"):
        ctx.check_hostname = False
    return ctx


def member_state(doc: dict) -> str:
    """primary, secondary, arbiter, mongos, standalone or other, from one hello reply."""
    if doc.get("msg") == "isdbgrid":
        return "mongos"
    if "setName" in doc:
        if doc.get("isWritablePrimary") or doc.get("ismaster"):
            return "primary"
        if doc.get("secondary"):
            return "secondary"
        if doc.get("arbiterOnly"):
            return "arbiter"
        return "other"
    if doc.get("isreplicaset"):
        return "other"
    return "standalone"


@dataclass(eq=False)
class Member:
    """One server of the deployment and its listener."""

    address: str  # host:port as the deployment names it (lower case)
    host: str
    port: int
    state: str = "unknown"
    healthy: bool = False
    removed: bool = False
    listen_port: int = 0
    spec: Any = None  # its topology.MemberSpec
    servers: list = field(default_factory=list)
    error: str = ""


def split_address(address: str) -> tuple[str, int]:
    """host:port (IPv6 in brackets) -> (host, port); the port defaults to 27017."""
    address = address.strip()
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 27017
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return address, 27017
    return host, int(port)


def _encode_hello(request_id: int) -> bytes:
    return builders.op_msg(request_id, 0, {"hello": 1, "helloOk": True, "$db": "admin"})


async def probe(host: str, port: int, timeout: float, tls_args: dict | None = None) -> dict:
    """One discovery hello (it needs no authentication); raises OSError, TimeoutError or ValueError."""

    async def run() -> dict:
        reader, writer = await asyncio.open_connection(host, port, **(tls_args or {}))
        try:
            writer.write(_encode_hello(1))
            header = await reader.readexactly(16)
            length, _, _, op = HEADER.unpack(header)
            if op != hello.OP_MSG or not 21 <= length <= MAX_DISCOVERY_REPLY:
                raise ValueError(f"not an OP_MSG hello reply (opcode {op}, {length} bytes)")
            payload = await reader.readexactly(length - 16)
            if payload[4] != 0:
                raise ValueError("hello reply without a body section")
            size = struct.unpack_from("<i", payload, 5)[0]
            return bson.decode(payload[5 : 5 + size])
        finally:
            writer.close()

    return await asyncio.wait_for(run(), timeout or None)


class PortAllocator:
    """Listen ports for --upstream members from --listen-port-base upward, skipping taken ones."""

    def __init__(self, hosts: tuple[str, ...], base: int, taken: set[int]) -> None:
        self.hosts = hosts
        self.base = base
        self.next = base
        self.taken = set(taken)

    def bind(self, what: str) -> tuple[int, list[socket.socket]]:
        """Bind (synchronously) the next free port on every listen host; StartupError when none is left."""
        tried = 0
        while self.next <= 65535 and tried < PORT_SEARCH:
            port = self.next
            self.next += 1
            tried += 1
            if port in self.taken:
                continue
            socks = []
            try:
                for host in self.hosts:
                    family = socket.AF_INET6 if ":" in host else socket.AF_INET
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    socks.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind((host, port))
                    sock.listen(1024)
                    sock.setblocking(False)
            except OSError as exc:
                for s in socks:
                    s.close()
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise StartupError(
                    f"cannot listen on {hostport(self.hosts[0], port)} for {what}: {exc.strerror}; check --listen-host"
                ) from None
            self.taken.add(port)
            return port, socks
        raise StartupError(
            f"no free listen port for {what} from {self.base} to {min(self.next - 1, 65535)}: "
            "the port range is exhausted; choose another --listen-port-base"
        )
