"""`mongoproxy replay`: replay recorded MongoDB traffic against another server and compare.

Input is the proxy's pcapng recordings (`run --record DIR`) or pcap/pcapng
from tcpdump, read with dpkt. TCP is reassembled by sequence number;
retransmissions are dropped, and a connection with a gap is skipped with a
warning. Each recorded client connection is replayed on a pinned connection of
its own, in its recorded order, at the recorded relative times (`--speed`), or
as fast as possible (`--max-speed`). Invariants of the rewrites:
- Cursor ids are remapped in getMore and killCursors; a getMore waits for the
  command that opened its cursor, on whatever connection that ran.
- Every recorded lsid maps to one fresh session id, so retryable writes are
  not answered from an old session's cache; txnNumber is kept.
- $clusterTime, afterClusterTime/atClusterTime, handshake (hello/isMaster),
  auth and endSessions are not replayed; pymongo authenticates with the
  target URI's own credentials and gossips the target's cluster time.
Bad input (files, filters, target) raises ReplayError/ConfigError: one line,
non-zero exit. The file format is documented in docs/capture-replay.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import math
import os
import struct
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from mongoproxy import redact
from mongoproxy.errors import ConfigError, DecodeError, ReplayError
from mongoproxy.events import hostport
from mongoproxy.wire import DEFAULT_MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from mongoproxy.wire import OP_MSG, OP_QUERY

REPLAY_EXTRA = "pip install 'mongoproxy[replay]'"
PLOT_EXTRA = "pip install 'mongoproxy[plot]'"

KNOWN_OPCODES = frozenset({1, 2001, 2002, 2004, 2005, 2006, 2007, 2010, 2011, 2012, 2013})
REQUEST_OPCODES = frozenset({2001, 2002, 2004, 2005, 2006, 2007, 2010, 2012, 2013})
MORE_TO_COME = 1 << 1
CHECKSUM_PRESENT = 1 << 0

HANDSHAKE_COMMANDS = frozenset({"hello", "ismaster"})
AUTH_COMMANDS = redact.AUTH_COMMANDS
SESSION_COMMANDS = frozenset({"endsessions"})
# --read-only keeps these (aggregate only without $out/$merge); killCursors writes nothing and frees what they opened.
READ_ONLY_COMMANDS = frozenset({"find", "aggregate", "count", "distinct", "getmore", "killcursors"})
# Fields never sent as recorded: the target session/cluster-time machinery replaces them.
DROPPED_FIELDS = frozenset({"$db", "lsid", "$clusterTime"})

_HEADER = struct.Struct("<iiii")
_I32 = struct.Struct("<i")
NS_PER_S = 1_000_000_000

# Why an operation is not replayed (report keys).
SKIP_HANDSHAKE = "handshake"
SKIP_MONITORING = "monitoring"
SKIP_AUTH = "auth"
SKIP_SESSIONS = "endSessions"
SKIP_LEGACY = "legacy opcode"
SKIP_UNPARSEABLE = "unparseable"
SKIP_FILTERED = "filtered"
SKIP_CURSOR = "cursor not open on target"


# =============================================================== reading capture files


def _require_dpkt() -> Any:
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


def iter_packets(path: str, warnings: list[str]) -> Iterator[Packet]:
    """Every packet of a pcap or pcapng file; ReplayError naming the file and offset when it is corrupt."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ReplayError(f"{path}: cannot read the file ({exc.strerror})") from None
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
    dpkt = _require_dpkt()
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
    dpkt = _require_dpkt()
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
    dpkt = _require_dpkt()
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


def _ip_text(packed: bytes) -> str:
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
        return _HEADER.unpack_from(self.data)


class _Half:
    """One direction of a TCP connection: reassembly by sequence number, then message framing."""

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
        if self.bad:
            return
        buf = self.buf
        if not buf:
            self.first_ts = ts
        buf += data
        while len(buf) >= 4:
            length = _I32.unpack_from(buf)[0]
            if length < 16 or length > MAX_MESSAGE_BYTES:
                self.bad = f"message length {length}"
                buf.clear()
                return
            if len(buf) >= 16:
                op_code = _I32.unpack_from(buf, 12)[0]
                if op_code not in KNOWN_OPCODES:
                    self.bad = f"opcode {op_code}"
                    buf.clear()
                    return
            if len(buf) < length:
                return
            self.messages.append(WireMessage(bytes(buf[:length]), self.first_ts, ts))
            del buf[:length]
            self.first_ts = ts

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

    def __init__(self) -> None:
        self.current: dict[tuple, Flow] = {}
        self.flows: list[Flow] = []
        self.tcp_packets = 0
        self.packets = 0
        self._counter = 0

    def add(self, pkt: Packet, source: str) -> None:
        self.packets += 1
        t = decode_tcp(pkt.linktype, pkt.data)
        if t is None:
            return
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
            flow.index = len(self.flows)
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


# =============================================================== recorded operations


@dataclasses.dataclass(slots=True)
class Outcome:
    """What a reply said: success, error, and the counts that are compared."""

    ok: bool | None = None
    code: int | None = None
    code_name: str = ""
    errmsg: str = ""
    returned: int | None = None
    cursor_id: int | None = None
    n: int | None = None
    write_errors: int = 0
    write_concern_error: bool = False
    exception: str = ""  # a client-side failure (network, timeout) instead of a reply

    @property
    def failed(self) -> bool:
        return self.ok is False or self.write_errors > 0 or self.write_concern_error or bool(self.exception)

    @property
    def error_name(self) -> str:
        if self.exception:
            return self.exception
        if self.ok is False:
            return self.code_name or (f"code {self.code}" if self.code is not None else "error")
        return self.code_name or (f"code {self.code}" if self.code is not None else "write error")

    @classmethod
    def from_scan(cls, r: Any) -> Outcome:
        ok = None if r.ok is None else r.ok == 1.0
        code, name = r.code, r.code_name or ""
        if ok is not False and r.write_errors:
            code, name = r.write_error_code, r.write_error_code_name or ""
        elif ok is not False and r.write_concern_error_code is not None:
            code, name = r.write_concern_error_code, r.write_concern_error_code_name or ""
        return cls(
            ok=ok,
            code=code,
            code_name=name,
            errmsg=r.errmsg or "",
            returned=r.returned,
            cursor_id=r.cursor_id,
            n=r.n,
            write_errors=r.write_errors or 0,
            write_concern_error=r.write_concern_error_code is not None,
        )


@dataclasses.dataclass(eq=False)
class Op:
    """One recorded request, what it got, and (after replay) what the target answered."""

    conn: RecordedConnection
    index: int  # position in its connection
    ts_ns: int  # first byte of the request, Unix ns
    op: str  # command name as sent ("find", "getMore")
    db: str
    coll: str
    request_id: int
    skip: str = ""  # why it is not replayed ("" = replayed)
    spec: dict | None = None  # the command without $db/lsid/$clusterTime, ready for pymongo
    lsid_key: bytes | None = None
    cursor_ref: int | None = None  # getMore: the recorded cursor id
    kill_ids: tuple = ()  # killCursors: recorded cursor ids
    creator: Op | None = None  # the op whose reply opened cursor_ref
    recorded: Outcome | None = None
    recorded_ns: int | None = None  # request first byte to reply last byte
    unacknowledged: bool = False
    # Filled by replay.
    replayed: Outcome | None = None
    replayed_ns: int | None = None
    lag_ns: int = 0
    offset_ns: int = 0  # scheduled time relative to the start
    done: threading.Event | None = None  # set once replayed, for getMores on other connections

    @property
    def ns(self) -> str:
        return f"{self.db}.{self.coll}" if self.coll else self.db

    @property
    def key(self) -> str:
        return self.op.lower()


@dataclasses.dataclass(eq=False)
class RecordedConnection:
    """One recorded client connection and its operations, in order."""

    index: int
    label: str
    source: str
    app: str = ""
    ops: list = dataclasses.field(default_factory=list)

    def replayable(self) -> list:
        return [o for o in self.ops if not o.skip]


@dataclasses.dataclass
class Workload:
    """Everything read from the capture files, with skip reasons and warnings."""

    files: list
    connections: list
    ops: list  # every op, in time order
    warnings: list
    packets: int = 0
    flows: int = 0
    mongo_flows: int = 0
    start_ns: int = 0
    end_ns: int = 0

    def replayable(self) -> list:
        return [o for o in self.ops if not o.skip]

    def skipped(self) -> dict:
        out: dict[str, int] = {}
        for o in self.ops:
            if o.skip:
                out[o.skip] = out.get(o.skip, 0) + 1
        return out


def expand_inputs(paths: Iterable[str]) -> list[str]:
    """Files as given; a directory stands for its finished *.pcapng/*.pcap/*.cap files, in name order."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(
                os.path.join(p, n)
                for n in os.listdir(p)
                if n.endswith((".pcapng", ".pcap", ".cap")) and os.path.isfile(os.path.join(p, n))
            )
            if not found:
                raise ReplayError(
                    f"{p}: the directory holds no .pcapng or .pcap files (unfinished recordings end in "
                    ".part; name one explicitly to read it)"
                )
            out.extend(found)
        elif not os.path.exists(p):
            raise ReplayError(f"{p}: no such file")
        else:
            out.append(p)
    return out


def _first_ts(path: str) -> int:
    warnings: list[str] = []
    for pkt in iter_packets(path, warnings):
        return pkt.ts_ns
    return 0


def load(paths: Iterable[str]) -> Workload:
    """Read, reassemble and parse capture files into a Workload; ReplayError for bad input."""
    files = expand_inputs(paths)
    _require_dpkt()
    warnings: list[str] = []
    files.sort(key=_first_ts)  # connections may continue from one file into the next
    re = Reassembler()
    for path in files:
        for pkt in iter_packets(path, warnings):
            try:
                re.add(pkt, path)
            except ReplayError as exc:
                raise ReplayError(f"{path}: packet at offset {pkt.offset}: {exc}") from None
    where = files[0] if len(files) == 1 else f"{len(files)} files ({', '.join(files)})"
    if not re.packets:
        raise ReplayError(f"{where}: no packets")
    connections = []
    mongo_flows = 0
    for flow in re.flows:
        conn, is_mongo = _connection_from_flow(flow, warnings)
        flow.halves = {}  # the messages are parsed; let their bytes go
        mongo_flows += is_mongo
        if conn is not None and conn.ops:
            conn.index = len(connections)
            connections.append(conn)
    if not mongo_flows:
        raise ReplayError(
            f"{where}: no MongoDB traffic ({re.packets} packets, {re.tcp_packets} TCP, "
            f"{len(re.flows)} TCP connections, none carrying the MongoDB wire protocol)"
        )
    ops = sorted((o for c in connections for o in c.ops), key=lambda o: (o.ts_ns, o.conn.index, o.index))
    _link_cursors(ops)
    start = min((o.ts_ns for o in ops), default=0)
    end = max((o.ts_ns for o in ops), default=0)
    return Workload(files, connections, ops, warnings, re.packets, len(re.flows), mongo_flows, start, end)


def _connection_from_flow(flow: Flow, warnings: list[str]) -> tuple[RecordedConnection | None, bool]:
    """(the flow's requests and replies as a connection or None when skipped, whether it is MongoDB)."""
    ha, hb = flow.halves[flow.a], flow.halves[flow.b]
    if not (ha.messages or hb.messages):
        return None, False  # no complete message: not MongoDB (or nothing was said)
    if (ha.bad and not ha.messages) or (hb.bad and not hb.messages):
        if ha.midstream or hb.midstream:
            warnings.append(
                f"connection {flow.label()} ({flow.source}): the capture began in the middle of a message; skipped"
            )
            return None, True
        return None, False  # one side never parsed as MongoDB
    if flow.client is None:
        flow.client = _guess_client(flow)
        if flow.client is None:
            warnings.append(
                f"connection {flow.label()} ({flow.source}): cannot tell client from server (the capture "
                "began after it opened and neither side looks like a MongoDB client); skipped"
            )
            return None, True
    client, server = flow.halves[flow.client], flow.halves[flow.server]
    for half, side in ((client, "client"), (server, "server")):
        if half.gap:
            warnings.append(
                f"connection {flow.label()} ({flow.source}): {half.gap} bytes from the {side} follow a "
                f"gap at stream offset {half.next} (packets missing from the capture); skipped"
            )
            return None, True
        if half.bad:
            warnings.append(
                f"connection {flow.label()} ({flow.source}): the {side}'s stream stops parsing as MongoDB "
                f"after {len(half.messages)} messages ({half.bad}); skipped"
            )
            return None, True
    if client.midstream or server.midstream:
        msgs = client.messages
        if msgs and (msgs[0].header[2] != 0 or msgs[0].header[3] not in REQUEST_OPCODES):
            warnings.append(
                f"connection {flow.label()} ({flow.source}): the capture began in the middle of it and "
                "it does not start at a request; skipped"
            )
            return None, True
    conn = RecordedConnection(flow.index, flow.label(), flow.source)
    replies: dict[int, list[WireMessage]] = {}
    for m in server.messages:
        replies.setdefault(m.header[2], []).append(m)
    first_hello = True
    for i, m in enumerate(client.messages):
        op = _op_from_message(conn, i, m, replies, warnings)
        if op is None:
            continue
        if op.key in HANDSHAKE_COMMANDS:
            op.skip = SKIP_HANDSHAKE if first_hello else SKIP_MONITORING
            first_hello = False
        conn.ops.append(op)
    trailing = len(client.buf)
    if trailing:
        warnings.append(
            f"connection {flow.label()} ({flow.source}): its last request is incomplete ({trailing} bytes "
            "at the end of the capture); left out"
        )
    return conn, True


def _guess_client(flow: Flow) -> tuple | None:
    """Without a SYN: the side whose first message is a request (responseTo 0) is the client."""
    scores = {}
    for ep in (flow.a, flow.b):
        msgs = flow.halves[ep].messages
        if msgs:
            _, _, response_to, op_code = msgs[0].header
            scores[ep] = op_code in REQUEST_OPCODES and response_to == 0
    clients = [ep for ep, yes in scores.items() if yes]
    if len(clients) == 1:
        return clients[0]
    return None


def _op_from_message(
    conn: RecordedConnection, index: int, m: WireMessage, replies: dict, warnings: list[str]
) -> Op | None:
    from mongoproxy import _bson_parser
    from mongoproxy.tracker import COLLECTION_COMMANDS

    length, request_id, response_to, wire_op = m.header
    try:
        data = redact.uncompressed(m.data)
    except DecodeError as exc:
        op = Op(conn, index, m.first_ns, "unknown", "", "", request_id, skip=SKIP_UNPARSEABLE)
        warnings.append(f"connection {conn.label}: request {request_id} cannot be decompressed ({exc}); not replayed")
        return op
    op_code = _HEADER.unpack_from(data)[3]
    body = memoryview(data)[16:]
    try:
        r = _bson_parser.scan_body(op_code, False, body)
    except (DecodeError, ValueError) as exc:
        warnings.append(f"connection {conn.label}: request {request_id} does not parse ({exc}); not replayed")
        return Op(conn, index, m.first_ns, "unknown", "", "", request_id, skip=SKIP_UNPARSEABLE)
    flags = r.flags or 0
    if r.command is None or op_code not in (OP_MSG, OP_QUERY):
        db, _, coll = (r.namespace or "").partition(".")
        return Op(conn, index, m.first_ns, f"opcode {op_code}", db, coll, request_id, skip=SKIP_LEGACY)
    command = r.command
    coll = (r.collection or "") if command in COLLECTION_COMMANDS else ""
    if op_code == OP_QUERY and command in ("$query", "query"):  # a wrapped legacy command
        try:
            inner = _query_document(data)[command]
            command = next(iter(inner))
            first = inner[command]
            coll = first if isinstance(first, str) and command in COLLECTION_COMMANDS else ""
        except (KeyError, StopIteration, TypeError, ValueError, bson_errors()) as exc:
            warnings.append(f"connection {conn.label}: request {request_id} does not parse ({exc}); not replayed")
            return Op(conn, index, m.first_ns, "unknown", "", "", request_id, skip=SKIP_UNPARSEABLE)
    op = Op(conn, index, m.first_ns, command, r.database or "", coll, request_id)
    if r.app_name and not conn.app:
        conn.app = r.app_name
    key = command.lower()
    if key in AUTH_COMMANDS or key in redact.USER_COMMANDS:  # recorded passwords are blanked
        op.skip = SKIP_AUTH
    elif key in SESSION_COMMANDS:
        op.skip = SKIP_SESSIONS
    op.unacknowledged = bool(op_code == OP_MSG and flags & MORE_TO_COME)
    got = replies.get(request_id)
    if got and not op.unacknowledged:
        reply = got[0]
        op.recorded_ns = reply.last_ns - m.first_ns
        op.recorded = _reply_outcome(reply)
    if op.skip or key in HANDSHAKE_COMMANDS:
        return op
    try:
        _prepare(op, data, op_code)
    except (DecodeError, struct.error, ValueError, IndexError, KeyError, TypeError) as exc:
        op.skip = SKIP_UNPARSEABLE
        warnings.append(
            f"connection {conn.label}: {command} (request {request_id}) cannot be decoded ({exc}); not replayed"
        )
    return op


def _reply_outcome(reply: WireMessage) -> Outcome | None:
    from mongoproxy import _bson_parser

    try:
        data = redact.uncompressed(reply.data)
        op_code = _HEADER.unpack_from(data)[3]
        return Outcome.from_scan(_bson_parser.scan_body(op_code, True, memoryview(data)[16:]))
    except (DecodeError, ValueError):
        return None


def bson_errors() -> type:
    from bson.errors import BSONError

    return BSONError


def _query_document(data: bytes) -> Any:
    """The query document of an OP_QUERY message, as a RawBSONDocument."""
    from bson.raw_bson import RawBSONDocument

    pos = data.index(b"\0", 20) + 1 + 8
    n = _I32.unpack_from(data, pos)[0]
    return RawBSONDocument(bytes(data[pos : pos + n]))


def _elements(doc: bytes) -> Iterator[tuple[str, int, int, int]]:
    """(key, type, value start, value end) of each top-level element of a BSON document."""
    end = _I32.unpack_from(doc)[0]
    i = 4
    while i < end - 1:
        t = doc[i]
        k_end = doc.index(b"\0", i + 1)
        key = doc[i + 1 : k_end].decode("utf-8", "replace")
        stop = redact.value_end(doc, t, k_end + 1, end - 1)
        yield key, t, k_end + 1, stop
        i = stop


def _prepare(op: Op, data: bytes, op_code: int) -> None:
    """Build op.spec (top-level dict, nested values as RawBSONDocument so their types survive) and the refs."""
    from bson import Int64
    from bson.raw_bson import RawBSONDocument

    sequences: list[tuple[str, list]] = []
    if op_code == OP_MSG:
        flags = _I32.unpack_from(data, 16)[0] & 0xFFFFFFFF
        end = len(data) - (4 if flags & CHECKSUM_PRESENT else 0)
        pos = 20
        doc = None
        while pos < end:
            kind = data[pos]
            pos += 1
            if kind == 0:
                n = _I32.unpack_from(data, pos)[0]
                doc = bytes(data[pos : pos + n])
                pos += n
            elif kind == 1:
                size = _I32.unpack_from(data, pos)[0]
                stop = pos + size
                name_end = data.index(b"\0", pos + 4)
                ident = data[pos + 4 : name_end].decode()
                docs = []
                d = name_end + 1
                while d < stop:
                    n = _I32.unpack_from(data, d)[0]
                    docs.append(RawBSONDocument(bytes(data[d : d + n])))
                    d += n
                sequences.append((ident, docs))
                pos = stop
            else:
                raise DecodeError("bad_section_kind", f"kind {kind}")
        if doc is None:
            raise DecodeError("truncated", "no kind-0 section")
    else:  # OP_QUERY on db.$cmd
        doc = _query_document(data).raw
    raw = RawBSONDocument(doc)
    if op_code == OP_QUERY and next(iter(raw), "") in ("$query", "query"):
        inner = raw[next(iter(raw))]
        doc = inner.raw
        raw = inner
    int64_keys = {k for k, t, _, _ in _elements(doc) if t == 0x12}
    spec: dict[str, Any] = {}
    for k, v in raw.items():
        if k in DROPPED_FIELDS:
            if k == "lsid" and isinstance(v, RawBSONDocument) and "id" in v:
                lid = v["id"]
                op.lsid_key = bytes(lid.bytes if isinstance(lid, uuid.UUID) else lid)
            continue
        if k in int64_keys and isinstance(v, int):
            v = Int64(v)
        spec[k] = v
    for ident, docs in sequences:
        spec[ident] = docs
    rc = spec.get("readConcern")
    if isinstance(rc, RawBSONDocument) and ("afterClusterTime" in rc or "atClusterTime" in rc):
        spec["readConcern"] = {k: v for k, v in rc.items() if k not in ("afterClusterTime", "atClusterTime")}
    key = op.key
    if key == "getmore":
        op.cursor_ref = int(spec["getMore"])
    elif key == "killcursors":
        op.kill_ids = tuple(int(x) for x in spec.get("cursors", ()))
    op.spec = spec


def _link_cursors(ops: list) -> None:
    """Point each getMore/killCursors at the op whose recorded reply opened its cursor."""
    creators: dict[int, Op] = {}
    for o in ops:
        key = o.key
        if key == "getmore":
            o.creator = creators.get(o.cursor_ref)
        elif key == "killcursors":
            o.creator = next((creators[c] for c in o.kill_ids if c in creators), None)
        if o.recorded is not None and o.recorded.cursor_id and key != "getmore":
            creators.setdefault(o.recorded.cursor_id, o)


# =============================================================== filters


@dataclasses.dataclass(frozen=True)
class Filters:
    """What to replay: --read-only, --include-ns/--exclude-ns, --ops."""

    read_only: bool = False
    include_ns: tuple = ()
    exclude_ns: tuple = ()
    ops: tuple = ()

    def describe(self) -> str:
        parts = []
        if self.read_only:
            parts.append("--read-only")
        if self.include_ns:
            parts.append("--include-ns " + ",".join(self.include_ns))
        if self.exclude_ns:
            parts.append("--exclude-ns " + ",".join(self.exclude_ns))
        if self.ops:
            parts.append("--ops " + ",".join(self.ops))
        return " ".join(parts)


def _ns_match(patterns: tuple, db: str, coll: str) -> bool:
    for p in patterns:
        if p.endswith(".*"):
            if db == p[:-2]:
                return True
        elif "." in p:
            if coll and f"{db}.{coll}" == p:
                return True
        elif db == p:
            return True
    return False


def _is_write_aggregate(op: Op) -> bool:
    pipeline = (op.spec or {}).get("pipeline") or []
    for stage in pipeline:
        try:
            if "$out" in stage or "$merge" in stage:
                return True
        except TypeError:
            continue
    return False


def apply_filters(workload: Workload, filters: Filters) -> None:
    """Mark ops the filters leave out; ReplayError when they leave nothing of what could be replayed."""
    candidates = workload.replayable()
    include_ops = {o.lower() for o in filters.ops if not o.startswith("!")}
    exclude_ops = {o[1:].lower() for o in filters.ops if o.startswith("!")}
    for o in candidates:
        key = o.key
        keep = True
        if filters.read_only and (key not in READ_ONLY_COMMANDS or (key == "aggregate" and _is_write_aggregate(o))):
            keep = False
        elif include_ops and key not in include_ops:
            keep = False
        elif key in exclude_ops:
            keep = False
        elif filters.include_ns and not _ns_match(filters.include_ns, o.db, o.coll):
            keep = False
        elif filters.exclude_ns and _ns_match(filters.exclude_ns, o.db, o.coll):
            keep = False
        if not keep:
            o.skip = SKIP_FILTERED
    # A getMore or killCursors whose cursor's command is left out has nothing to continue.
    for o in candidates:
        if not o.skip and o.key in ("getmore", "killcursors") and o.creator is not None and o.creator.skip:
            o.skip = SKIP_FILTERED
    if candidates and not workload.replayable():
        ops = sorted({o.op for o in candidates})
        nss = sorted({o.ns for o in candidates if o.ns})
        raise ReplayError(
            f"the filters ({filters.describe()}) match none of the {len(candidates)} recorded "
            f"operations; they are {', '.join(ops[:12])} on {', '.join(nss[:12])}"
        )
    if not candidates:
        why = (
            f"every MongoDB connection was skipped ({workload.warnings[0]}"
            + (f"; {len(workload.warnings) - 1} more warning(s)" if len(workload.warnings) > 1 else "")
            + ")"
            if not workload.ops and workload.warnings
            else f"the capture holds only handshake, monitoring or auth traffic ({len(workload.ops)} commands)"
        )
        raise ReplayError(f"{', '.join(workload.files)}: nothing to replay: {why}")


# =============================================================== the target


class Target:
    """The server replayed against: one MongoClient, one pinned connection per recorded connection."""

    def __init__(self, uri: str, connect_timeout: float = 5.0, retries: int = 5, pool_size: int = 100) -> None:
        import pymongo
        from pymongo.errors import ConfigurationError, InvalidURI

        self.uri = uri
        try:
            self.client = pymongo.MongoClient(
                uri,
                serverSelectionTimeoutMS=int(connect_timeout * 1000),
                connectTimeoutMS=int(connect_timeout * 1000),
                maxPoolSize=max(pool_size, 1),
                appname="mongoproxy-replay",
                retryReads=False,
                retryWrites=False,
            )
        except (InvalidURI, ConfigurationError, ValueError, TypeError) as exc:
            raise ConfigError(f"--target {redact_uri(uri)} is not a usable MongoDB URI: {exc}") from None
        if not hasattr(self.client, "_conn_for_writes"):
            raise ConfigError(
                "replay pins one connection per recorded connection with pymongo's connection "
                "checkout, which this pymongo version lacks: pip install 'pymongo>=4.9,<5'"
            )
        self.retries = max(1, retries)
        self.pool_size = max(pool_size, 1)

    def wait_ready(self, log: Any = None) -> None:
        """Ping the target, retrying with backoff; ReplayError naming the fix when it stays unreachable."""
        from pymongo.errors import OperationFailure, PyMongoError

        delay = 0.5
        started = time.monotonic()
        last = ""
        for attempt in range(1, self.retries + 1):
            try:
                self.client.admin.command("ping")
                return
            except OperationFailure as exc:
                if exc.code in (18, 13):  # AuthenticationFailed, Unauthorized
                    raise ReplayError(
                        f"the target {redact_uri(self.uri)} refused the URI's credentials "
                        f"({exc.details.get('errmsg', exc) if exc.details else exc}): check the user, "
                        "password and authSource in --target"
                    ) from None
                last = str(exc)
            except PyMongoError as exc:
                last = str(exc).split(", Timeout:")[0]
            if attempt < self.retries:
                if log is not None:
                    log(
                        f"target {redact_uri(self.uri)} not reachable (attempt {attempt}/{self.retries}): {last}; "
                        f"retrying in {delay:g}s"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        raise ReplayError(
            f"cannot reach the target {redact_uri(self.uri)} after {self.retries} attempts over "
            f"{time.monotonic() - started:.0f}s ({last}): check --target and that the server is up"
        )

    def checkout(self) -> Any:
        """A context manager holding one pooled, authenticated connection."""
        return self.client._conn_for_writes(None, "mongoproxy-replay")

    def close(self) -> None:
        self.client.close()


def redact_uri(uri: str) -> str:
    """The URI with its password replaced by ***."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    creds, at, host = rest.rpartition("@")
    if not at:
        return uri
    user, colon, _ = creds.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


# =============================================================== replay


class Replayer:
    """Runs the replayable ops: a thread per recorded connection, started at its first op's time."""

    DEPENDENCY_TIMEOUT_S = 60.0

    def __init__(self, workload: Workload, target: Target, speed: float | None) -> None:
        self.workload = workload
        self.target = target
        self.speed = speed  # None: as fast as possible
        self.cursors: dict[int, int] = {}  # recorded cursor id -> target cursor id (0: closed)
        self.sessions: dict[bytes, dict] = {}
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.done_ops = 0
        self.max_lag_ns = 0
        self.current_lag_ns = 0
        self.errors = 0
        self.started_ns = 0
        self.finished_ns = 0
        self.total = len(workload.replayable())
        # The clock starts with the first replayed command; skipped ones (handshakes) are not waited for.
        self.origin_ns = min((o.ts_ns for o in workload.replayable()), default=workload.start_ns)
        from bson.codec_options import CodecOptions
        from bson.raw_bson import RawBSONDocument

        self.codec = CodecOptions(document_class=RawBSONDocument)
        self._t0 = time.perf_counter()
        for o in workload.replayable():
            if o.creator is not None:
                o.creator.done = o.creator.done or threading.Event()

    def _due(self, op: Op) -> float:
        """Seconds (perf_counter) at which op is due."""
        if self.speed is None:
            return 0.0
        return self._t0 + (op.ts_ns - self.origin_ns) / NS_PER_S / self.speed

    def run(self, on_tick: Any = None) -> None:
        """Replay everything; on_tick(replayer) is called about ten times a second from this thread."""
        conns = [c for c in self.workload.connections if c.replayable()]
        conns.sort(key=lambda c: c.replayable()[0].ts_ns)
        self.warm_up(_max_overlap(conns) if self.speed is not None else len(conns))
        self._t0 = time.perf_counter()
        self.started_ns = time.time_ns()
        threads: list[threading.Thread] = []
        pending = list(conns)
        try:
            while pending or any(t.is_alive() for t in threads):
                now = time.perf_counter()
                while pending and self._due(pending[0].replayable()[0]) <= now + 0.002:
                    c = pending.pop(0)
                    t = threading.Thread(target=self._run_connection, args=(c,), name=f"replay-{c.index}", daemon=True)
                    t.start()
                    threads.append(t)
                if on_tick is not None:
                    on_tick(self)
                wait = 0.1
                if pending:
                    wait = min(wait, max(0.0, self._due(pending[0].replayable()[0]) - time.perf_counter()))
                if threads and not pending:
                    alive = [t for t in threads if t.is_alive()]
                    if alive:
                        alive[0].join(wait)
                        continue
                time.sleep(wait)
        except KeyboardInterrupt:
            self.stop.set()
            for t in threads:
                t.join(5)
            raise
        finally:
            self.finished_ns = time.time_ns()
            if on_tick is not None:
                on_tick(self)

    def warm_up(self, n: int) -> None:
        """Open (and authenticate) n pooled connections before the clock starts, so that lag is the target's."""
        n = min(n, self.target.pool_size)
        if n <= 0:
            return
        barrier = threading.Barrier(n, timeout=30)

        def hold() -> None:
            try:
                with self.target.checkout():
                    barrier.wait()
            except Exception:  # noqa: BLE001 - a failed warm-up only costs lag; replay reports real failures
                barrier.abort()

        threads = [threading.Thread(target=hold, daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(35)

    def _run_connection(self, c: RecordedConnection) -> None:
        from pymongo.errors import PyMongoError

        ops = c.replayable()
        i = 0
        while i < len(ops) and not self.stop.is_set():
            try:
                with self.target.checkout() as conn:
                    while i < len(ops) and not self.stop.is_set():
                        op = ops[i]
                        i += 1
                        if self._one(conn, op):
                            break  # the pinned connection broke: take another one for the rest
            except PyMongoError as exc:  # no connection could be had: the next op fails
                if i < len(ops):
                    self._finish(ops[i], Outcome(exception=type(exc).__name__, errmsg=str(exc)), None)
                    i += 1
                self.stop.wait(0.1)

    def _one(self, conn: Any, op: Op) -> bool:
        """Replay one op on conn when it is due; True when conn is broken."""
        from bson import Int64
        from pymongo.errors import ConnectionFailure, PyMongoError

        from mongoproxy import _bson_parser

        due = self._due(op)
        now = time.perf_counter()
        if self.speed is not None and due > now:
            if self.stop.wait(due - now):
                return False
        # Cursor ids come from the target's answer to the command that opened the cursor.
        spec = dict(op.spec)
        key = op.key
        if key in ("getmore", "killcursors"):
            if op.creator is not None and op.creator.done is not None:
                op.creator.done.wait(self.DEPENDENCY_TIMEOUT_S)
            if key == "getmore":
                target_id = self.cursors.get(op.cursor_ref)
                if not target_id:
                    self._finish(op, None, None, skip=SKIP_CURSOR)
                    return False
                spec["getMore"] = Int64(target_id)
            else:
                ids = [Int64(self.cursors[c]) for c in op.kill_ids if self.cursors.get(c)]
                if not ids:
                    self._finish(op, None, None, skip=SKIP_CURSOR)
                    return False
                spec["cursors"] = ids
        if op.lsid_key is not None:
            with self._lock:
                lsid = self.sessions.get(op.lsid_key)
                if lsid is None:
                    from bson.binary import Binary

                    lsid = self.sessions[op.lsid_key] = {"id": Binary(uuid.uuid4().bytes, 4)}
            spec["lsid"] = lsid
        start = time.perf_counter()
        op.lag_ns = int(max(0.0, start - due) * NS_PER_S) if self.speed is not None else 0
        op.offset_ns = int((start - self._t0) * NS_PER_S)
        broken = False
        try:
            reply = conn.command(op.db, spec, codec_options=self.codec, check=False, client=self.target.client)
            elapsed = int((time.perf_counter() - start) * NS_PER_S)
            outcome = Outcome.from_scan(_bson_parser.scan_body(OP_MSG, True, b"\0\0\0\0\0" + reply.raw))
        except PyMongoError as exc:
            elapsed = int((time.perf_counter() - start) * NS_PER_S)
            outcome = Outcome(exception=type(exc).__name__, errmsg=str(exc).split(", full error:")[0])
            broken = isinstance(exc, ConnectionFailure)
        except Exception as exc:  # noqa: BLE001 - an undecodable reply or a command pymongo refuses to encode
            elapsed = int((time.perf_counter() - start) * NS_PER_S)
            outcome = Outcome(exception=type(exc).__name__, errmsg=str(exc))
        rec = op.recorded
        if rec is not None and rec.cursor_id is not None:
            # getMore: the cursor lives on until a reply says 0; other commands open recorded id -> target id.
            ref = op.cursor_ref if key == "getmore" else rec.cursor_id
            if ref:
                with self._lock:
                    self.cursors[ref] = outcome.cursor_id or 0
        if key == "killcursors":
            with self._lock:
                for c in op.kill_ids:
                    self.cursors[c] = 0
        self._finish(op, outcome, elapsed)
        return broken

    def _finish(self, op: Op, outcome: Outcome | None, elapsed: int | None, skip: str = "") -> None:
        op.replayed = outcome
        op.replayed_ns = elapsed
        if skip:
            op.skip = skip
        with self._lock:
            self.done_ops += 1
            if op.lag_ns > self.max_lag_ns:
                self.max_lag_ns = op.lag_ns
            self.current_lag_ns = op.lag_ns
            if outcome is not None and outcome.failed:
                self.errors += 1
        if op.done is not None:
            op.done.set()


def _max_overlap(conns: list) -> int:
    """The most recorded connections that have replayable ops in flight at once."""
    events = []
    for c in conns:
        ops = c.replayable()
        events.append((ops[0].ts_ns, 1))
        events.append((ops[-1].ts_ns + 1, -1))
    best = cur = 0
    for _, d in sorted(events):
        cur += d
        best = max(best, cur)
    return best


# =============================================================== report


def percentile(values: list, q: float) -> float | None:
    """Nearest-rank percentile of values (None when empty)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


def build_report(
    workload: Workload,
    replayer: Replayer | None,
    filters: Filters,
    target: str,
    speed: float | None,
    dry_run: bool = False,
) -> dict:
    """The JSON report (its field names are documented in docs/capture-replay.md)."""
    ops = workload.ops
    replayed = [o for o in ops if not o.skip and (dry_run or o.replayed is not None)]
    groups: dict[tuple, list] = {}
    for o in replayed:
        groups.setdefault((o.op, o.ns), []).append(o)
    by_op = []
    for (name, ns), group in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        rec = [o.recorded_ns for o in group if o.recorded_ns is not None]
        rep = [o.replayed_ns for o in group if o.replayed_ns is not None]
        by_op.append(
            {
                "op": name,
                "ns": ns,
                "count": len(group),
                "recorded_ms": {f"p{q}": _ms(percentile(rec, q)) for q in (50, 90, 99)},
                "replayed_ms": {f"p{q}": _ms(percentile(rep, q)) for q in (50, 90, 99)},
                "recorded_errors": sum(1 for o in group if o.recorded is not None and o.recorded.failed),
                "replayed_errors": sum(1 for o in group if o.replayed is not None and o.replayed.failed),
            }
        )
    new_errors: dict[tuple, dict] = {}
    gone_errors: dict[tuple, dict] = {}
    differences = []
    for o in replayed:
        rec, rep = o.recorded, o.replayed
        if rep is None:
            continue
        rec_failed = rec is not None and rec.failed
        if rep.failed and not rec_failed:
            k = (o.op, o.ns, rep.error_name)
            e = new_errors.setdefault(
                k,
                {
                    "op": o.op,
                    "ns": o.ns,
                    "error": rep.error_name,
                    "code": rep.code,
                    "count": 0,
                    "example": rep.errmsg[:300],
                },
            )
            e["count"] += 1
        elif rec_failed and not rep.failed:
            k = (o.op, o.ns, rec.error_name)
            e = gone_errors.setdefault(
                k,
                {
                    "op": o.op,
                    "ns": o.ns,
                    "error": rec.error_name,
                    "code": rec.code,
                    "count": 0,
                    "example": rec.errmsg[:300],
                },
            )
            e["count"] += 1
        if rec is not None:
            for field in ("returned", "n"):
                a, b = getattr(rec, field), getattr(rep, field)
                if a is not None and b is not None and a != b:
                    differences.append(
                        {
                            "op": o.op,
                            "ns": o.ns,
                            "connection": o.conn.index,
                            "field": field,
                            "recorded": a,
                            "replayed": b,
                            "at_s": round((o.ts_ns - workload.start_ns) / 1e9, 3),
                        }
                    )
    cursor_skips = [o for o in ops if o.skip == SKIP_CURSOR]
    for o in cursor_skips:
        if o.recorded is not None and o.recorded.returned:
            differences.append(
                {
                    "op": o.op,
                    "ns": o.ns,
                    "connection": o.conn.index,
                    "field": "returned",
                    "recorded": o.recorded.returned,
                    "replayed": None,
                    "at_s": round((o.ts_ns - workload.start_ns) / 1e9, 3),
                    "note": "not sent: the cursor was already closed on the target",
                }
            )
    span = (workload.end_ns - workload.start_ns) / 1e9
    times = [o.ts_ns for o in workload.ops if not o.skip or o.skip == SKIP_CURSOR]
    replayable_span = (max(times) - min(times)) / 1e9 if times else 0.0
    report: dict[str, Any] = {
        "files": workload.files,
        "target": redact_uri(target) if target else None,
        "dry_run": dry_run,
        "speed": "max" if speed is None else speed,
        "filters": filters.describe(),
        "recorded": {
            "start": _iso(workload.start_ns),
            "span_s": round(span, 3),
            "connections": len(workload.connections),
            "operations": len(ops),
            "packets": workload.packets,
            "tcp_connections": workload.flows,
            "mongodb_connections": workload.mongo_flows,
            "ops_per_s": round(len(ops) / span, 1) if span > 0 else None,
            "replayable_span_s": round(replayable_span, 3),
        },
        "skipped": workload.skipped(),
        "by_op": by_op,
        "new_errors": sorted(new_errors.values(), key=lambda e: -e["count"]),
        "gone_errors": sorted(gone_errors.values(), key=lambda e: -e["count"]),
        "count_differences": differences[:1000],
        "count_differences_total": len(differences),
        "warnings": workload.warnings,
    }
    if replayer is not None:
        duration = (replayer.finished_ns - replayer.started_ns) / 1e9
        n = len(replayed)
        report["replayed"] = {
            "operations": n,
            "duration_s": round(duration, 3),
            "ops_per_s": round(n / duration, 1) if duration > 0 else None,
            "errors": sum(1 for o in replayed if o.replayed is not None and o.replayed.failed),
            "max_lag_ms": None if speed is None else _ms(replayer.max_lag_ns),
            "schedule_s": None if speed is None else round(replayable_span / speed, 3),
            "sessions": len(replayer.sessions),
            "cursors": len(replayer.cursors),
        }
    else:
        report["would_replay"] = [
            {"at_s": round((o.ts_ns - workload.start_ns) / 1e9, 6), "connection": o.conn.index, "op": o.op, "ns": o.ns}
            for o in replayed
        ]
    return report


def _iso(ns: int) -> str | None:
    if not ns:
        return None
    import datetime

    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).isoformat(timespec="milliseconds")


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def print_report(report: dict, console: Any) -> None:
    """The terminal form of the report: a table per op and namespace, then errors, differences and lag."""
    from rich.table import Table

    dry = report["dry_run"]
    title = "would replay" if dry else "replay report"
    table = Table(title=f"{title}: recorded vs replayed latency (ms)" if not dry else title, show_lines=False)
    table.add_column("op")
    table.add_column("namespace")
    table.add_column("count", justify="right")
    table.add_column("rec p50", justify="right")
    table.add_column("rec p90", justify="right")
    table.add_column("rec p99", justify="right")
    if not dry:
        table.add_column("replay p50", justify="right")
        table.add_column("replay p90", justify="right")
        table.add_column("replay p99", justify="right")
        table.add_column("errors rec/replay", justify="right")
    for row in report["by_op"]:
        r, p = row["recorded_ms"], row["replayed_ms"]
        cells = [row["op"], row["ns"] or "-", str(row["count"]), _fmt(r["p50"]), _fmt(r["p90"]), _fmt(r["p99"])]
        if not dry:
            cells += [
                _fmt(p["p50"]),
                _fmt(p["p90"]),
                _fmt(p["p99"]),
                f"{row['recorded_errors']}/{row['replayed_errors']}",
            ]
        table.add_row(*cells)
    console.print(table)
    rec = report["recorded"]
    console.print(
        f"recorded: {rec['operations']} commands on {rec['connections']} connections over "
        f"{rec['span_s']:.3f}s ({rec['ops_per_s'] or '-'} ops/s) from {len(report['files'])} file(s)"
    )
    if report["skipped"]:
        console.print("not replayed: " + ", ".join(f"{k} {v}" for k, v in sorted(report["skipped"].items())))
    if dry:
        console.print(
            f"would replay {len(report['would_replay'])} operations"
            + (f" with {report['filters']}" if report["filters"] else "")
        )
    else:
        rp = report["replayed"]
        lag = "n/a (--max-speed)" if rp["max_lag_ms"] is None else f"{rp['max_lag_ms']:.1f} ms"
        console.print(
            f"replayed: {rp['operations']} operations in {rp['duration_s']:.3f}s ({rp['ops_per_s']} ops/s), "
            f"speed {report['speed']}, max lag behind schedule {lag}, {rp['sessions']} session(s), "
            f"{rp['cursors']} cursor(s) remapped"
        )
        for label, key in (("new errors", "new_errors"), ("errors gone", "gone_errors")):
            rows = report[key]
            console.print(f"{label}: {sum(e['count'] for e in rows)}")
            for e in rows[:20]:
                console.print(f"  {e['count']} x {e['op']} {e['ns']}: {e['error']}: {e['example']}")
        diffs = report["count_differences"]
        console.print(f"document count differences: {report['count_differences_total']}")
        for d in diffs[:20]:
            console.print(
                f"  {d['op']} {d['ns']} (connection {d['connection']}, at {d['at_s']}s): {d['field']} "
                f"recorded {d['recorded']}, replayed {d['replayed']}" + (f" ({d['note']})" if d.get("note") else "")
            )
    for w in report["warnings"][:50]:
        console.print(f"warning: {w}", style="yellow")


def write_plot(workload: Workload, path: str) -> None:
    """A latency CDF per busiest op, recorded (dashed) against replayed (solid), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ops = [o for o in workload.ops if not o.skip and o.replayed_ns is not None]
    counts: dict[str, int] = {}
    for o in ops:
        counts[o.op] = counts.get(o.op, 0) + 1
    panels = [("all commands", ops)] + [
        (name, [o for o in ops if o.op == name]) for name, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    ]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, group) in zip(axes.flat, panels):
        shown: list = []
        for label, values, style in (
            ("recorded", [o.recorded_ns for o in group if o.recorded_ns is not None], "--"),
            ("replayed", [o.replayed_ns for o in group], "-"),
        ):
            if not values:
                continue
            xs = sorted(v / 1e6 for v in values)
            shown += (xs[0], xs[-1])
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step([xs[0]] + xs, [0.0] + ys, style, where="post", label=f"{label} (n={len(xs)})")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        label = FuncFormatter(lambda v, _: f"{v:.3g}")
        ax.xaxis.set_major_formatter(label)
        if shown:
            ax.set_xlim(max(min(shown), 1e-6) / 1.5, max(shown) * 1.5)
        lo, hi = ax.get_xlim()
        if hi < lo * 30:  # within about a decade there are too few powers of ten to read: label 2x and 5x too
            ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
            ax.xaxis.set_minor_formatter(label)
        else:
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(name)
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of commands")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("mongoproxy replay: latency CDF, recorded vs replayed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# =============================================================== command line


def _positive_float(flag: str):
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number (e.g. 2 or 0.5)") from None
        if not x > 0 or x == float("inf"):
            raise argparse.ArgumentTypeError(f"{flag} must be a positive number, got {value!r}")
        return x

    return parse


def _items(values: list | None) -> tuple:
    out = []
    for v in values or ():
        out.extend(x.strip() for x in str(v).split(",") if x.strip())
    return tuple(out)


def add_parser(subparsers: Any) -> None:
    """Register `mongoproxy replay`."""
    p = subparsers.add_parser(
        "replay",
        help="replay recorded traffic against a server and compare",
        description="Replay MongoDB traffic recorded by `mongoproxy run --record DIR` (pcapng) or captured with "
        "tcpdump (pcap/pcapng) against a target server, keeping each connection's order and the relative timing, "
        "and report recorded against replayed latency, new or gone errors and document count differences.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="capture files; a directory stands for its *.pcapng/*.pcap")
    p.add_argument("--target", metavar="URI", help="MongoDB URI to replay against (its credentials are used)")
    timing = p.add_mutually_exclusive_group()
    timing.add_argument(
        "--speed",
        type=_positive_float("--speed"),
        default=1.0,
        metavar="X",
        help="replay X times as fast as recorded (default 1)",
    )
    timing.add_argument(
        "--max-speed",
        action="store_true",
        help="ignore recorded timing: each connection runs its commands back to back",
    )
    p.add_argument(
        "--read-only",
        action="store_true",
        help="replay only find, aggregate without $out/$merge, count, "
        "distinct, getMore (and killCursors for their cursors)",
    )
    p.add_argument(
        "--include-ns",
        action="append",
        metavar="NS",
        help="replay only these namespaces: db.collection, db.* or db (comma-separated, repeatable)",
    )
    p.add_argument("--exclude-ns", action="append", metavar="NS", help="do not replay these namespaces")
    p.add_argument(
        "--ops",
        action="append",
        metavar="OPS",
        help="replay only these commands (find,insert); !name leaves one out (!count)",
    )
    p.add_argument("--report", metavar="PATH.json", help="write the report as JSON")
    p.add_argument(
        "--plot",
        metavar="PATH.png",
        help="write a latency CDF plot, recorded against replayed (needs matplotlib: " + PLOT_EXTRA + ")",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be replayed, with the filters applied, and send nothing"
    )
    p.add_argument(
        "--connect-timeout",
        type=_positive_float("--connect-timeout"),
        default=5.0,
        metavar="S",
        help="seconds to wait for the target on each attempt (default 5)",
    )
    p.add_argument(
        "--connect-retries",
        type=int,
        default=5,
        metavar="N",
        help="attempts to reach the target, with backoff, before giving up (default 5)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run `mongoproxy replay`."""
    try:
        from rich.console import Console
    except ImportError:
        raise ConfigError(
            f"replay shows its progress and report with rich, which is not installed: {REPLAY_EXTRA}"
        ) from None
    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False) if sys.stdout.isatty() else Console(width=160, highlight=False)
    if not args.dry_run and not args.target:
        raise ConfigError("replay needs --target URI (the server to replay against), or --dry-run")
    if args.connect_retries < 1:
        raise ConfigError("--connect-retries must be at least 1")
    for flag, path in (("--report", args.report), ("--plot", args.plot)):
        if path:
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                raise ConfigError(f"{flag} {path}: directory {directory} does not exist")
    if args.plot and not args.dry_run:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError(f"--plot needs matplotlib: {PLOT_EXTRA}") from None
    filters = Filters(
        read_only=args.read_only,
        include_ns=_items(args.include_ns),
        exclude_ns=_items(args.exclude_ns),
        ops=_items(args.ops),
    )
    for ns in filters.include_ns + filters.exclude_ns:
        if not ns.split(".", 1)[0]:
            raise ConfigError(f"namespace {ns!r}: give db.collection, db.* or db")
    workload = load(args.files)
    apply_filters(workload, filters)
    speed = None if args.max_speed else args.speed
    if args.dry_run:
        report = build_report(workload, None, filters, args.target or "", speed, dry_run=True)
        print_report(report, out)
        if args.report:
            _write_json(args.report, report)
        return 0
    conns = [c for c in workload.connections if c.replayable()]
    target = Target(args.target, args.connect_timeout, args.connect_retries, pool_size=len(conns) + 4)
    try:
        target.wait_ready(lambda msg: err.print(msg, style="yellow"))
        replayer = Replayer(workload, target, speed)
        _run_with_progress(replayer, err, not args.no_progress and err.is_terminal)
    finally:
        target.close()
    report = build_report(workload, replayer, filters, args.target, speed)
    print_report(report, out)
    if args.report:
        _write_json(args.report, report)
        err.print(f"report written to {args.report}")
    if args.plot:
        write_plot(workload, args.plot)
        err.print(f"plot written to {args.plot}")
    return 0


def _write_json(path: str, report: dict) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
            f.write("\n")
    except OSError as exc:
        raise ReplayError(f"--report {path}: cannot write ({exc.strerror})") from None


def _run_with_progress(replayer: Replayer, console: Any, show: bool) -> None:
    if not show:
        replayer.run()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ops"),
        TextColumn("lag {task.fields[lag]}"),
        TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("replay", total=replayer.total, lag="-", errors=0)

        def tick(r: Replayer) -> None:
            lag = "n/a" if r.speed is None else f"{r.current_lag_ns / 1e6:.0f} ms (max {r.max_lag_ns / 1e6:.0f})"
            progress.update(task, completed=r.done_ops, lag=lag, errors=r.errors)

        replayer.run(tick)
