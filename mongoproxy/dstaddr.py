"""SO_ORIGINAL_DST: the address a REDIRECTed connection was really aimed at (IPv4 and IPv6)."""

from __future__ import annotations

import socket
import struct
from typing import Any

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SOL_IP = getattr(socket, "SOL_IP", 0)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """Decode a struct sockaddr_in (16 bytes) or sockaddr_in6 (28 bytes) as returned by getsockopt."""
    (family,) = struct.unpack_from("=H", raw, 0)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET and len(raw) >= 8:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raise ValueError(f"unexpected address family {family} in original destination")


def original_dst(sock: Any) -> tuple[str, int] | None:
    """The pre-NAT destination of an accepted socket, or None when the kernel has none."""
    attempts = [(SOL_IP, SO_ORIGINAL_DST, 16)]
    if sock.family == socket.AF_INET6:
        # A dual-stack listener may hold an IPv4 connection: try IPv6 first, then IPv4.
        attempts.insert(0, (SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28))
    for level, opt, size in attempts:
        try:
            raw = sock.getsockopt(level, opt, size)
            break
        except OSError:
            continue
    else:
        return None
    host, port = parse_sockaddr(raw)
    if host.startswith("::ffff:"):  # an IPv4 client on a dual-stack listener
        host = host[7:]
    return host, port
