"""Writing pcapng: one section, one raw-IP interface with nanosecond timestamps, synthesized TCP flows.

The proxy never sees TCP segments, only the bytes it forwards; a TcpFlow turns
those bytes back into a TCP conversation between the real client and server
addresses, so that Wireshark, tshark and the replay reader open a recording
as they would a packet capture. Invariants:
- Sequence numbers are exact: SYN and FIN each take one, every payload byte
  takes one, and each segment acknowledges everything the peer has sent.
- No packet is longer than MAX_PACKET (65535) bytes; larger chunks are cut
  into several segments that share the chunk's timestamp.
- IPv4 and TCP checksums are correct (one's-complement sums via int.from_bytes
  modulo 0xFFFF, which is linear-time C, not a Python loop per word).
- Block lengths are multiples of 4 and repeated at the end of each block; the
  file is valid after every write_packet() (readers may tail a .part file).

The format is described in docs/capture-replay.md.
"""

from __future__ import annotations

import ipaddress
import os
import platform
import random
import struct
from collections.abc import Sequence
from typing import BinaryIO

BT_SHB = 0x0A0D0D0A
BT_IDB = 0x00000001
BT_EPB = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D

OPT_ENDOFOPT = 0
OPT_COMMENT = 1
SHB_HARDWARE = 2
SHB_OS = 3
SHB_USERAPPL = 4
IF_NAME = 2
IF_DESCRIPTION = 3
IF_TSRESOL = 9

LINKTYPE_RAW = 101  # raw IPv4 or IPv6, told apart by the version nibble
MAX_PACKET = 65535
SNAPLEN = MAX_PACKET

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
WINDOW_SCALE = 14  # advertised in the SYNs: the synthesized flows never wait for a window
WINDOW = 0xFFFF

_U32 = struct.Struct("<I")
_BLOCK_HEAD = struct.Struct("<II")
_EPB_HEAD = struct.Struct("<IIIIIII")  # type, total length, interface, ts high, ts low, captured, original
_OPT_HEAD = struct.Struct("<HH")
_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_ZERO_PAD = b"\0\0\0"


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def option(code: int, value: bytes) -> bytes:
    """One pcapng option: code, length, value padded to 4 bytes."""
    return _OPT_HEAD.pack(code, len(value)) + value + _ZERO_PAD[: _pad4(len(value))]


def _comment_bytes(text: str) -> bytes:
    return text.encode("utf-8", "replace")


def checksum_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit one's-complement sum of big-endian words (odd length padded with a zero byte), in [0, 0xFFFF].

    2**16 is 1 modulo 0xFFFF, so the sum of the words is the big-endian integer modulo 0xFFFF; a
    non-zero multiple of 0xFFFF sums to 0xFFFF in one's complement.
    """
    n = len(data)
    if not n:
        return 0
    value = int.from_bytes(data, "big")
    if n % 2:
        value <<= 8
    s = value % 0xFFFF
    return 0xFFFF if s == 0 and value else s


def _fold(*sums: int) -> int:
    s = sum(sums)
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _checksum(*sums: int) -> int:
    return (~_fold(*sums)) & 0xFFFF


class PcapngWriter:
    """Writes one pcapng section with a single raw-IP interface whose timestamps are in nanoseconds.

    `summary_space` bytes are reserved in the section header for a comment that finish_summary()
    fills in once the file is complete (seekable files only).
    """

    def __init__(
        self,
        f: BinaryIO,
        comment: str = "",
        application: str = "mongoproxy",
        interface_name: str = "mongoproxy",
        interface_description: str = "",
        summary_space: int = 0,
    ) -> None:
        self.f = f
        self.bytes_written = 0
        self.packets = 0
        self._summary_offset: int | None = None
        self._summary_space = summary_space
        opts = []
        if comment:
            opts.append(option(OPT_COMMENT, _comment_bytes(comment)))
        if summary_space:
            # The comment's value starts after the SHB's 24 fixed bytes, the options before it and its 4-byte head.
            self._summary_offset = 24 + sum(len(o) for o in opts) + 4
            opts.append(option(OPT_COMMENT, b" " * summary_space))
        opts.append(option(SHB_HARDWARE, platform.machine().encode() or b"unknown"))
        opts.append(option(SHB_OS, f"{platform.system()} {platform.release()}".encode()))
        opts.append(option(SHB_USERAPPL, application.encode()))
        opts.append(option(OPT_ENDOFOPT, b""))
        body = struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1) + b"".join(opts)
        self._block(BT_SHB, body)
        if_opts = [option(IF_NAME, interface_name.encode())]
        if interface_description:
            if_opts.append(option(IF_DESCRIPTION, interface_description.encode()))
        if_opts.append(option(IF_TSRESOL, b"\x09"))  # 10^-9 s
        if_opts.append(option(OPT_ENDOFOPT, b""))
        self._block(BT_IDB, struct.pack("<HHI", LINKTYPE_RAW, 0, SNAPLEN) + b"".join(if_opts))

    def _block(self, block_type: int, body: bytes) -> None:
        total = 12 + len(body)
        self.f.write(_BLOCK_HEAD.pack(block_type, total) + body + _U32.pack(total))
        self.bytes_written += total

    def write_packet(self, ts_ns: int, packet: bytes | Sequence[bytes | memoryview], comment: str = "") -> None:
        """One Enhanced Packet Block; `packet` may be given as parts (header, payload) to avoid a copy."""
        parts = (packet,) if isinstance(packet, (bytes, bytearray, memoryview)) else tuple(packet)
        length = sum(len(p) for p in parts)
        if length > MAX_PACKET:
            raise ValueError(f"packet of {length} bytes is longer than {MAX_PACKET}")
        pad = _pad4(length)
        opts = b""
        if comment:
            opts = option(OPT_COMMENT, _comment_bytes(comment)) + option(OPT_ENDOFOPT, b"")
        total = 32 + length + pad + len(opts)
        write = self.f.write
        write(_EPB_HEAD.pack(BT_EPB, total, 0, (ts_ns >> 32) & 0xFFFFFFFF, ts_ns & 0xFFFFFFFF, length, length))
        for p in parts:
            write(p)
        write(_ZERO_PAD[:pad] + opts + _U32.pack(total))
        self.bytes_written += total
        self.packets += 1

    def finish_summary(self, text: str) -> None:
        """Fill the reserved section comment (cut to fit, padded with spaces); needs a seekable file."""
        if self._summary_offset is None:
            return
        data = _comment_bytes(text)[: self._summary_space]
        while True:  # never cut inside a UTF-8 sequence
            try:
                data.decode("utf-8")
                break
            except UnicodeDecodeError:
                data = data[:-1]
        data += b" " * (self._summary_space - len(data))
        self.f.flush()
        here = self.f.tell()
        self.f.seek(self._summary_offset)
        self.f.write(data)
        self.f.seek(here)


def _ip_bytes(host: str) -> tuple[int, bytes]:
    """(4 or 6, packed address) of an address literal."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    return addr.version, addr.packed


class TcpFlow:
    """One TCP connection, synthesized: the client's and server's addresses, ports and sequence numbers.

    The methods return packets as (ts_ns, parts) tuples ready for PcapngWriter.write_packet.
    """

    __slots__ = (
        "version",
        "client_ip",
        "server_ip",
        "client_port",
        "server_port",
        "client_next",
        "server_next",
        "_ip_id",
        "_pseudo_c",
        "_pseudo_s",
        "max_payload",
        "client_fin",
        "server_fin",
    )

    def __init__(
        self,
        client_host: str,
        client_port: int,
        server_host: str,
        server_port: int,
        rng: random.Random | None = None,
    ) -> None:
        cv, cip = _ip_bytes(client_host)
        sv, sip = _ip_bytes(server_host)
        if cv != sv:  # one flow has one IP version: show the IPv4 side as IPv4-mapped IPv6
            if cv == 4:
                cip = ipaddress.IPv6Address("::ffff:" + client_host).packed
            else:
                sip = ipaddress.IPv6Address("::ffff:" + server_host).packed
            cv = sv = 6
        self.version = cv
        self.client_ip, self.server_ip = cip, sip
        self.client_port, self.server_port = client_port, server_port
        rng = rng or random.Random(os.urandom(8))
        # Next sequence number each side will send (absolute, modulo 2**32); the SYNs take the ISNs.
        self.client_next = rng.getrandbits(32)
        self.server_next = rng.getrandbits(32)
        self._ip_id = rng.getrandbits(16)
        self.client_fin = self.server_fin = False
        if cv == 4:
            self.max_payload = MAX_PACKET - 20 - 20
            self._pseudo_c = checksum_sum(cip + sip + b"\0\x06")
            self._pseudo_s = checksum_sum(sip + cip + b"\0\x06")
        else:
            self.max_payload = MAX_PACKET - 40 - 20
            self._pseudo_c = checksum_sum(cip + sip + b"\0\0\0\x06")
            self._pseudo_s = checksum_sum(sip + cip + b"\0\0\0\x06")

    def _packet(self, from_client: bool, flags: int, payload: bytes | memoryview = b"", options: bytes = b"") -> list:
        if from_client:
            src, dst, sport, dport = self.client_ip, self.server_ip, self.client_port, self.server_port
            seq, ack, pseudo = self.client_next, self.server_next, self._pseudo_c
        else:
            src, dst, sport, dport = self.server_ip, self.client_ip, self.server_port, self.client_port
            seq, ack, pseudo = self.server_next, self.client_next, self._pseudo_s
        if not flags & TCP_ACK:
            ack = 0
        tcp_len = 20 + len(options)
        seg_len = tcp_len + len(payload)
        header = _TCP.pack(sport, dport, seq, ack, (tcp_len // 4) << 4, flags, WINDOW, 0, 0) + options
        # The pseudo-header's length word (IPv6: the upper 16 bits are zero for packets this small). TCP
        # headers are 4-byte multiples, so summing header and payload apart keeps the words aligned.
        csum = _checksum(pseudo, seg_len, checksum_sum(header), checksum_sum(payload) if payload else 0)
        header = header[:16] + csum.to_bytes(2, "big") + header[18:]
        if self.version == 4:
            self._ip_id = (self._ip_id + 1) & 0xFFFF
            ip = _IP4.pack(0x45, 0, 20 + seg_len, self._ip_id, 0x4000, 64, 6, 0, src, dst)
            ip = ip[:10] + _checksum(checksum_sum(ip)).to_bytes(2, "big") + ip[12:]
        else:
            ip = _IP6.pack(6 << 28, seg_len, 6, 64, src, dst)
        delta = len(payload) + (1 if flags & (TCP_SYN | TCP_FIN) else 0)
        if from_client:
            self.client_next = (self.client_next + delta) & 0xFFFFFFFF
        else:
            self.server_next = (self.server_next + delta) & 0xFFFFFFFF
        return [ip + header, payload] if payload else [ip + header]

    def _syn_options(self) -> bytes:
        # MSS, NOP, window scale: the synthesized flows never wait for a window.
        return struct.pack("!BBH", 2, 4, self.max_payload) + struct.pack("!BBBB", 1, 3, 3, WINDOW_SCALE)

    def syn(self, ts_ns: int) -> list[tuple[int, list]]:
        """The client's SYN."""
        return [(ts_ns, self._packet(True, TCP_SYN, options=self._syn_options()))]

    def accept(self, ts_ns: int) -> list[tuple[int, list]]:
        """The server's SYN-ACK and the client's ACK."""
        return [
            (ts_ns, self._packet(False, TCP_SYN | TCP_ACK, options=self._syn_options())),
            (ts_ns, self._packet(True, TCP_ACK)),
        ]

    def refuse(self, ts_ns: int) -> list[tuple[int, list]]:
        """The server's RST-ACK answering the SYN (the upstream could not be reached)."""
        self.client_fin = self.server_fin = True
        return [(ts_ns, self._packet(False, TCP_RST | TCP_ACK))]

    def handshake(self, ts_ns: int, ts_ack_ns: int | None = None) -> list[tuple[int, list]]:
        """SYN, SYN-ACK, ACK."""
        return self.syn(ts_ns) + self.accept(ts_ns if ts_ack_ns is None else ts_ack_ns)

    def data(self, from_client: bool, payload: bytes | bytearray | memoryview, ts_ns: int) -> list[tuple[int, list]]:
        """Data segments (PSH on the last) carrying `payload`, each at most max_payload bytes."""
        view = memoryview(payload)
        n = len(view)
        out = []
        step = self.max_payload
        for start in range(0, n, step):
            piece = view[start : start + step]
            flags = TCP_ACK | (TCP_PSH if start + step >= n else 0)
            out.append((ts_ns, self._packet(from_client, flags, piece)))
        return out

    def close(self, ts_ns: int, rst: bool = False) -> list[tuple[int, list]]:
        """FIN from the client, FIN-ACK from the server, the last ACK (or one RST from the client)."""
        if rst:
            return [(ts_ns, self._packet(True, TCP_RST | TCP_ACK))]
        out = []
        if not self.client_fin:
            self.client_fin = True
            out.append((ts_ns, self._packet(True, TCP_FIN | TCP_ACK)))
        if not self.server_fin:
            self.server_fin = True
            out.append((ts_ns, self._packet(False, TCP_FIN | TCP_ACK)))
        out.append((ts_ns, self._packet(True, TCP_ACK)))
        return out
