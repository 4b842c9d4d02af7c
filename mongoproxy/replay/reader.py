"""Reading capture files: pcap/pcapng packets, TCP reassembly by sequence number, MongoDB message framing.

Retransmissions are dropped; a direction with a hole that never fills reports its gap. Framing is
mongoproxy.protocol's Framer (`_Half`), decompression its bounded decompressor (`uncompressed`).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import struct
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from mongoproxy.errors import ConfigError, ReplayError
from mongoproxy.events import hostport
from mongoproxy.protocol import compression
from mongoproxy.protocol.framing import Framer
from mongoproxy.protocol.opcodes import DEFAULT_MAX_MESSAGE_BYTES, HEADER, OPCODE_NAMES

REPLAY_EXTRA = "pip install 'mongoproxy[replay]'"

I32 = struct.Struct("<i")
NS_PER_S = 1_000_000_000
# Opens a capture by name: open_capture for files, or one returning a BytesIO for a capture in memory.
Opener = Callable[[str], BinaryIO]


def uncompressed(data: bytes) -> bytes:
    """The message with OP_COMPRESSED undone (other messages as they are); DecodeError when it cannot be."""
    return compression.uncompressed(data)


def require_dpkt() -> Any:
    try:
        import dpkt
    except ImportError:
        raise ConfigError(f"replay reads capture files with dpkt, which is not installed: {REPLAY_EXTRA}") from None
    return dpkt


@dataclasses.dataclass(slots=True)
class Packet:
    """One captured packet: timestamp in Unix ns, link type, the bytes, and where it is in its file."""

    ts_ns: int
    linktype: int
    data: bytes
    offset: int


def open_capture(path: str) -> BinaryIO:
    """The capture file open for reading; ReplayError (one line) when it cannot be."""
    try:
        return open(path, "rb")
    except OSError as exc:
        raise ReplayError(f"{path}: cannot read the file ({exc.strerror})") from None


def iter_packets(path: str, warnings: list[str], opener: Opener = open_capture) -> Iterator[Packet]:
    """Every packet of a pcap or pcapng file; ReplayError naming the file and offset when it is corrupt.

    `opener` gives the file's content: the file itself, or a BytesIO for a capture held in memory
    (extract.load_bytes), so that both are read by this same code.
    """
    f = opener(path)
    with f:
        head = f.read(4)
        f.seek(0)
        if len(head) < 4:
            raise ReplayError(f"{path}: not a capture file (only {len(head)} bytes)")
        magic = int.from_bytes(head, "little")
        if magic == 0x0A0D0D0A:
            yield from _iter_pcapng(path, f, warnings)
        elif magic in (0xA1B2C3D4, 0xA1B23C4D, 0xD4C3B2A1, 0x4D3CB2A1, 0xA1B2CD34, 0x34CDB2A1):
            yield from _iter_pcap(path, f, warnings)
        else:
            raise ReplayError(f"{path}: not a pcap or pcapng file (it starts with 0x{head.hex()} at offset 0)")


def _iter_pcap(path: str, f: Any, warnings: list[str]) -> Iterator[Packet]:
    dpkt = require_dpkt()
    from dpkt import pcap

    raw = f.read(24)
    if len(raw) < 24:
        raise ReplayError(f"{path}: truncated pcap file header at offset 0")
    magic_le = int.from_bytes(raw[:4], "little")
    little = magic_le in (0xA1B2C3D4, 0xA1B23C4D, 0xA1B2CD34)
    fh = (pcap.LEFileHdr if little else pcap.FileHdr)(raw)
    magic = fh.magic
    nano = magic in (0xA1B23C4D,)
    if magic in (0xA1B2CD34,):
        hdr_cls = pcap.LEPktModHdr if little else pcap.PktModHdr
    else:
        hdr_cls = pcap.LEPktHdr if little else pcap.PktHdr
    hdr_len = hdr_cls.__hdr_len__
    linktype = fh.linktype & 0x0FFFFFFF
    offset = 24
    while True:
        raw = f.read(hdr_len)
        if not raw:
            return
        if len(raw) < hdr_len:
            warnings.append(
                f"{path}: truncated at offset {offset} (an incomplete packet header at the end); read what came before"
            )
            return
        try:
            h = hdr_cls(raw)
        except dpkt.UnpackError as exc:
            raise ReplayError(f"{path}: corrupt pcap packet header at offset {offset} ({exc})") from None
        if h.caplen > 0x4000000:
            raise ReplayError(
                f"{path}: corrupt pcap packet header at offset {offset} (captured length "
                f"{h.caplen}); the file is damaged"
            )
        data = f.read(h.caplen)
        if len(data) < h.caplen:
            warnings.append(
                f"{path}: truncated at offset {offset} (the last packet is incomplete); read what came before"
            )
            return
        ts = h.tv_sec * NS_PER_S + (h.tv_usec if nano else h.tv_usec * 1000)
        yield Packet(ts, linktype, data, offset)
        offset += hdr_len + h.caplen


def _iter_pcapng(path: str, f: Any, warnings: list[str]) -> Iterator[Packet]:
    dpkt = require_dpkt()
    from dpkt import pcapng

    interfaces: list[tuple[int, int, int]] = []  # (linktype, units per second, offset seconds)
    little = True
    offset = 0
    while True:
        head = f.read(8)
        if not head:
            return
        if len(head) < 8:
            warnings.append(
                f"{path}: truncated at offset {offset} (an incomplete block at the end); read what came before"
            )
            return
        block_type = int.from_bytes(head[:4], "little")
        if block_type == pcapng.PCAPNG_BT_SHB:
            bom = f.read(4)
            if len(bom) < 4:
                raise ReplayError(f"{path}: truncated section header at offset {offset}")
            if bom == b"\x4d\x3c\x2b\x1a":
                little = True
            elif bom == b"\x1a\x2b\x3c\x4d":
                little = False
            else:
                raise ReplayError(
                    f"{path}: corrupt pcapng section header at offset {offset} (byte-order magic 0x{bom.hex()})"
                )
            head += bom
            interfaces = []  # a new section starts its own interface numbering
        order = "<" if little else ">"
        block_type, length = struct.unpack(order + "II", head[:8])
        if length < 12 or length % 4 or length > 0x4000000:
            raise ReplayError(
                f"{path}: corrupt pcapng block at offset {offset} (type 0x{block_type:08x}, length "
                f"{length}); the file is damaged"
            )
        rest = f.read(length - len(head))
        if len(rest) < length - len(head):
            warnings.append(
                f"{path}: truncated at offset {offset} (the last block is incomplete); read what came before"
            )
            return
        buf = head + rest
        if buf[-4:] != buf[4:8]:
            raise ReplayError(f"{path}: corrupt pcapng block at offset {offset} (its two length fields differ)")
        try:
            if block_type == pcapng.PCAPNG_BT_SHB:
                (pcapng.SectionHeaderBlockLE if little else pcapng.SectionHeaderBlock)(buf)
            elif block_type == pcapng.PCAPNG_BT_IDB:
                idb = (pcapng.InterfaceDescriptionBlockLE if little else pcapng.InterfaceDescriptionBlock)(buf)
                units, tsoffset = 1_000_000, 0
                for opt in idb.opts:
                    if opt.code == pcapng.PCAPNG_OPT_IF_TSRESOL and opt.data:
                        v = opt.data[0]
                        units = 2 ** (v & 0x7F) if v & 0x80 else 10 ** (v & 0x7F)
                    elif opt.code == pcapng.PCAPNG_OPT_IF_TSOFFSET and len(opt.data) >= 8:
                        tsoffset = struct.unpack(order + "q", opt.data[:8])[0]
                interfaces.append((idb.linktype, units, tsoffset))
            elif block_type in (pcapng.PCAPNG_BT_EPB, pcapng.PCAPNG_BT_PB):
                cls = {
                    pcapng.PCAPNG_BT_EPB: (pcapng.EnhancedPacketBlockLE, pcapng.EnhancedPacketBlock),
                    pcapng.PCAPNG_BT_PB: (pcapng.PacketBlockLE, pcapng.PacketBlock),
                }[block_type]
                epb = cls[0 if little else 1](buf)
                iface = epb.iface_id & 0xFFFF if block_type == pcapng.PCAPNG_BT_PB else epb.iface_id
                if iface >= len(interfaces):
                    raise ReplayError(
                        f"{path}: corrupt pcapng packet at offset {offset} (interface {iface} was never described)"
                    )
                linktype, units, tsoffset = interfaces[iface]
                ticks = (epb.ts_high << 32) | epb.ts_low
                ts = tsoffset * NS_PER_S + (ticks * NS_PER_S // units if units != NS_PER_S else ticks)
                yield Packet(ts, linktype, bytes(epb.pkt_data), offset)
            elif block_type == pcapng.PCAPNG_BT_SPB:
                warnings.append(f"{path}: simple packet blocks (no timestamps) at offset {offset} are ignored")
        except ReplayError:
            raise
        except (dpkt.UnpackError, dpkt.NeedData, struct.error, ValueError) as exc:
            raise ReplayError(
                f"{path}: corrupt pcapng block at offset {offset} (type 0x{block_type:08x}: "
                f"{exc or type(exc).__name__})"
            ) from None
        offset += length


# Link types: Ethernet, raw IP (101, and the BSD numbers 12/14), Linux cooked v1/v2, BSD loopback, IPv4, IPv6.
LINKTYPE_NAMES = {
    0: "BSD loopback",
    1: "Ethernet",
    12: "raw IP",
    14: "raw IP",
    101: "raw IP",
    108: "OpenBSD loopback",
    113: "Linux cooked",
    228: "IPv4",
    229: "IPv6",
    276: "Linux cooked v2",
}


def decode_tcp(linktype: int, data: bytes) -> tuple | None:
    """(src ip, src port, dst ip, dst port, seq, ack, flags, payload) of a TCP packet, else None."""
    dpkt = require_dpkt()
    try:
        if linktype == 1:
            ip = dpkt.ethernet.Ethernet(data).data
        elif linktype in (101, 12, 14, 228, 229):
            if not data:
                return None
            ip = dpkt.ip.IP(data) if data[0] >> 4 == 4 else dpkt.ip6.IP6(data)
        elif linktype == 113:
            ip = dpkt.sll.SLL(data).data
        elif linktype == 276:
            ip = dpkt.sll2.SLL2(data).data
        elif linktype in (0, 108):
            ip = dpkt.loopback.Loopback(data).data
        else:
            raise ReplayError(
                f"unsupported link type {linktype}: capture on an Ethernet or loopback interface "
                "(tcpdump -i lo or -i eth0), or with the proxy's --record"
            )
    except (dpkt.UnpackError, dpkt.NeedData, struct.error, IndexError):
        return None
    if isinstance(ip, dpkt.ip.IP):
        if ip.p != 6 or ip.offset or ip.mf:  # not TCP, or a fragment
            return None
        src, dst = _ip_text(ip.src), _ip_text(ip.dst)
    elif isinstance(ip, dpkt.ip6.IP6):
        src, dst = _ip_text(ip.src), _ip_text(ip.dst)
    else:
        return None
    tcp = ip.data
    if not isinstance(tcp, dpkt.tcp.TCP):
        return None
    payload = bytes(tcp.data)
    return src, tcp.sport, dst, tcp.dport, tcp.seq, tcp.ack, tcp.flags, payload


@functools.lru_cache(maxsize=4096)
def _ip_text(packed: bytes) -> str:
    # Cached: every packet names two addresses, and a capture holds few distinct ones (bounded all the same).
    import ipaddress

    addr = ipaddress.ip_address(packed)
    mapped = getattr(addr, "ipv4_mapped", None)
    return f"::ffff:{mapped}" if mapped is not None else str(addr)


# =============================================================== TCP reassembly and framing


@dataclasses.dataclass(slots=True)
class WireMessage:
    """One complete message: its bytes and the times of the packets holding its first and last byte."""

    data: bytes
    first_ns: int
    last_ns: int

    @property
    def header(self) -> tuple[int, int, int, int]:
        return HEADER.unpack_from(self.data)


class _Half(Framer):
    """One direction of a TCP connection: reassembly by sequence number, then message framing (protocol.Framer)."""

    __slots__ = (
        "base",
        "next",
        "pending",
        "pending_bytes",
        "buf",
        "first_ts",
        "messages",
        "bad",
        "midstream",
        "retransmitted",
        "fin",
        "bytes",
    )

    def __init__(self) -> None:
        super().__init__(DEFAULT_MAX_MESSAGE_BYTES)
        self.base: int | None = None  # sequence number of stream offset 0
        self.next = 0  # stream offset expected next
        self.pending: list = []  # heap of (offset, counter, payload, ts) past a hole
        self.pending_bytes = 0
        self.buf = bytearray()
        self.first_ts = 0
        self.messages: list[WireMessage] = []
        self.bad = ""  # why framing stopped
        self.midstream = False  # the capture began after this direction's SYN
        self.retransmitted = 0
        self.fin = False
        self.bytes = 0

    def syn(self, seq: int) -> None:
        if self.base is None or self.midstream:
            self.base = (seq + 1) & 0xFFFFFFFF
            self.midstream = False
            self.next = 0

    def segment(self, seq: int, payload: bytes, ts: int, counter: int) -> None:
        if self.base is None:
            self.base = seq
            self.midstream = True
        rel32 = (seq - self.base) & 0xFFFFFFFF
        off = self.next + ((rel32 - (self.next & 0xFFFFFFFF) + (1 << 31)) % (1 << 32)) - (1 << 31)
        end = off + len(payload)
        if end <= self.next:
            self.retransmitted += 1
            return
        if off > self.next:
            heapq.heappush(self.pending, (off, counter, payload, ts))
            self.pending_bytes += len(payload)
            return
        self._deliver(payload[self.next - off :], ts)
        pending = self.pending
        while pending and pending[0][0] <= self.next:
            p_off, _, p_payload, p_ts = heapq.heappop(pending)
            self.pending_bytes -= len(p_payload)
            if p_off + len(p_payload) > self.next:
                self._deliver(p_payload[self.next - p_off :], p_ts)
            else:
                self.retransmitted += 1

    def _deliver(self, data: bytes, ts: int) -> None:
        self.next += len(data)
        self.bytes += len(data)
        if not self.bad:
            self._frame(data, ts)

    # ---- framer hooks: each message is rebuilt whole in buf ----

    def _on_header_bytes(self, data: Any, start: int, end: int, now_ns: int) -> None:
        if not self.buf:
            self.first_ts = now_ns
        self.buf += data[start:end]

    def _on_header(self, length: int, request_id: int, response_to: int, opcode: int) -> None:
        if opcode not in OPCODE_NAMES:
            self.bad = f"opcode {opcode}"
            self.buf.clear()
            self.stop()

    def _on_body(self, data: Any, start: int, end: int) -> None:
        self.buf += data[start:end]

    def _on_end(self, now_ns: int) -> None:
        self.messages.append(WireMessage(bytes(self.buf), self.first_ts, now_ns))
        self.buf.clear()

    def _on_bad_length(self, length: int, request_id: int, opcode: int) -> None:
        self.bad = f"message length {length}"
        self.buf.clear()

    @property
    def gap(self) -> int:
        """Bytes captured past a hole that never filled (0 when the stream is whole)."""
        return self.pending_bytes


class Flow:
    """One TCP connection between two endpoints, as captured."""

    __slots__ = ("a", "b", "halves", "client", "syn_client_isn", "closed", "first_ns", "last_ns", "source", "index")

    def __init__(self, a: tuple, b: tuple, first_ns: int, source: str) -> None:
        self.a, self.b = a, b
        self.halves = {a: _Half(), b: _Half()}
        self.client: tuple | None = None
        self.syn_client_isn: int | None = None
        self.closed = False
        self.first_ns = self.last_ns = first_ns
        self.source = source
        self.index = 0

    @property
    def server(self) -> tuple | None:
        if self.client is None:
            return None
        return self.b if self.client == self.a else self.a

    def label(self) -> str:
        c = self.client or self.a
        s = self.server or self.b
        return f"{hostport(*c)} -> {hostport(*s)}"


class Reassembler:
    """Turns packets into Flows: SYN starts a connection, the SYN's sender is the client."""

    def __init__(self, keep_flows: bool = True) -> None:
        self.current: dict[tuple, Flow] = {}
        self.flows: list[Flow] = []  # every flow, when keep_flows (streaming readers forget ended ones)
        self.keep_flows = keep_flows
        self.flow_count = 0
        self.tcp_packets = 0
        self.packets = 0
        self._counter = 0

    def forget(self, flow: Flow) -> None:
        """Drop an ended flow (a later packet of its ports starts a new one)."""
        key = (flow.a, flow.b)
        if self.current.get(key) is flow:
            del self.current[key]

    def add(self, pkt: Packet, source: str) -> Flow | None:
        """Feed one packet; the flow it belongs to (None when it is not TCP)."""
        self.packets += 1
        t = decode_tcp(pkt.linktype, pkt.data)
        if t is None:
            return None
        self.tcp_packets += 1
        src, sport, dst, dport, seq, ack, flags, payload = t
        a, b = (src, sport), (dst, dport)
        key = (a, b) if a <= b else (b, a)
        flow = self.current.get(key)
        syn, fin, rst, has_ack = flags & 0x02, flags & 0x01, flags & 0x04, flags & 0x10
        if (
            syn
            and not has_ack
            and flow is not None
            and (flow.closed or flow.syn_client_isn not in (None, seq) or flow.halves[a].bytes or flow.halves[b].bytes)
        ):
            flow = None  # the ports are reused by a new connection
        if flow is None:
            flow = Flow(key[0], key[1], pkt.ts_ns, source)
            flow.index = self.flow_count
            self.flow_count += 1
            if self.keep_flows:
                self.flows.append(flow)
            self.current[key] = flow
        flow.last_ns = pkt.ts_ns
        half = flow.halves[a]
        if syn:
            half.syn(seq)
            if not has_ack:
                flow.client = a
                flow.syn_client_isn = seq
            elif flow.client is None:
                flow.client = b
        if payload:
            self._counter += 1
            half.segment(seq + (1 if syn else 0), payload, pkt.ts_ns, self._counter)
        if fin:
            half.fin = True
        if rst or (flow.halves[a].fin and flow.halves[b].fin):
            flow.closed = True
        return flow
