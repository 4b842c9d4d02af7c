"""Reading captures for replay: pcap and pcapng via dpkt, TCP reassembly, gaps, corrupt files."""

from __future__ import annotations

import socket
import struct
import zlib

import bson
import dpkt
import pytest

from mongoproxy.errors import ReplayError
from mongoproxy.replay.extract import load, load_bytes
from mongoproxy.replay.reader import iter_packets

T0 = 1_700_000_000 * 10**9


def op_msg(request_id: int, response_to: int, doc: dict, flags: int = 0) -> bytes:
    body = struct.pack("<I", flags) + b"\0" + bson.encode(doc)
    return struct.pack("<iiii", 16 + len(body), request_id, response_to, 2013) + body


def reply(to: int, doc: dict = None, rid: int = 0) -> bytes:
    return op_msg(rid or 1000 + to, to, doc or {"ok": 1.0})


class Capture:
    """A hand-made TCP conversation, written with dpkt as Ethernet (or Linux cooked) frames."""

    def __init__(self, client=("10.0.0.1", 40000), server=("10.0.0.2", 27017), isn=(1000, 5000)) -> None:
        self.client, self.server = client, server
        self.next = {True: isn[0], False: isn[1]}
        self.frames: list[tuple[int, bytes]] = []
        self.t = T0

    def packet(self, from_client: bool, flags: int, payload: bytes = b"", seq=None, ts=None, sll=False) -> None:
        src, dst = (self.client, self.server) if from_client else (self.server, self.client)
        tcp = dpkt.tcp.TCP(
            sport=src[1],
            dport=dst[1],
            seq=self.next[from_client] if seq is None else seq,
            ack=self.next[not from_client],
            flags=flags,
            data=payload,
        )
        tcp.off = 5
        ip = dpkt.ip.IP(src=socket.inet_aton(src[0]), dst=socket.inet_aton(dst[0]), p=6, data=tcp, ttl=64)
        ip.len = 20 + len(bytes(tcp))
        if sll:
            frame = dpkt.sll.SLL(type=0, hrd=772, hlen=6, hdr=b"\0" * 8, ethtype=0x0800, data=ip)
        else:
            frame = dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=0x0800, data=ip)
        if ts is None:
            self.t += 1_000_000
            ts = self.t
        self.frames.append((ts, bytes(frame)))
        if seq is None:
            self.next[from_client] = (self.next[from_client] + len(payload) + (1 if flags & 0x03 else 0)) & 0xFFFFFFFF

    def handshake(self) -> Capture:
        self.packet(True, dpkt.tcp.TH_SYN)
        self.packet(False, dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK)
        self.packet(True, dpkt.tcp.TH_ACK)
        return self

    def send(self, from_client: bool, data: bytes, **kw) -> None:
        self.packet(from_client, dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH, data, **kw)

    def close(self) -> None:
        self.packet(True, dpkt.tcp.TH_FIN | dpkt.tcp.TH_ACK)
        self.packet(False, dpkt.tcp.TH_FIN | dpkt.tcp.TH_ACK)
        self.packet(True, dpkt.tcp.TH_ACK)


def write_pcap(path, frames, nano=False, linktype=dpkt.pcap.DLT_EN10MB) -> str:
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, nano=nano, linktype=linktype)
        for ts, frame in frames:
            w.writepkt(frame, ts=ts / 1e9 if not nano else None)
            if nano:  # dpkt's writer takes float seconds; patch the exact ns into the record header
                pass
    return str(path)


def write_pcap_exact(path, frames, linktype=dpkt.pcap.DLT_EN10MB) -> str:
    """A nanosecond pcap written record by record, so timestamps are exact."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, linktype))
        for ts, frame in frames:
            f.write(struct.pack("<IIII", ts // 10**9, ts % 10**9, len(frame), len(frame)) + frame)
    return str(path)


def write_pcapng(path, frames, linktype=dpkt.pcap.DLT_EN10MB) -> str:
    with open(path, "wb") as f:
        w = dpkt.pcapng.Writer(f, linktype=linktype)
        for ts, frame in frames:
            w.writepkt(frame, ts=ts / 1e9)
    return str(path)


def simple_session(c: Capture) -> tuple[bytes, bytes]:
    find = op_msg(7, 0, {"find": "orders", "filter": {"_id": 1}, "$db": "shop"})
    rep = reply(7, {"cursor": {"firstBatch": [{"_id": 1}], "id": 0, "ns": "shop.orders"}, "ok": 1.0})
    c.handshake()
    c.send(True, find)
    c.send(False, rep)
    c.close()
    return find, rep


def test_pcap_with_out_of_order_and_retransmitted_segments(tmp_path):
    c = Capture().handshake()
    find = op_msg(7, 0, {"find": "orders", "filter": {"_id": 1}, "$db": "shop"})
    seq = c.next[True]
    # The second half arrives first, then the first half, then the first half again (a retransmission).
    c.packet(True, 0x18, find[40:], seq=seq + 40)
    c.packet(True, 0x18, find[:40], seq=seq)
    c.packet(True, 0x18, find[:40], seq=seq)
    c.next[True] = seq + len(find)
    c.send(False, reply(7, {"cursor": {"firstBatch": [{"_id": 1}] * 3, "id": 0, "ns": "shop.orders"}, "ok": 1.0}))
    c.close()
    w = load([write_pcap_exact(tmp_path / "a.pcap", c.frames)])
    [op] = w.ops
    assert (op.op, op.ns, op.request_id, op.skip) == ("find", "shop.orders", 7, "")
    assert op.ts_ns == c.frames[4][0]  # the packet holding the first byte, however they were ordered
    assert op.recorded_ns == c.frames[6][0] - c.frames[4][0]
    assert op.recorded.returned == 3 and op.recorded.ok is True
    assert w.connections[0].label == "10.0.0.1:40000 -> 10.0.0.2:27017"
    assert not w.warnings


@pytest.mark.parametrize("writer", ["pcap_usec", "pcapng", "sll"])
def test_pcap_and_pcapng_from_dpkt(tmp_path, writer):
    c = Capture()
    if writer == "sll":
        c.packet(True, dpkt.tcp.TH_SYN, sll=True)
        c.packet(False, dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK, sll=True)
        find = op_msg(7, 0, {"find": "orders", "$db": "shop"})
        c.packet(True, 0x18, find, sll=True)
        path = write_pcap(tmp_path / "c.pcap", c.frames, linktype=dpkt.pcap.DLT_LINUX_SLL)
    else:
        simple_session(c)
        path = (write_pcapng if writer == "pcapng" else write_pcap)(tmp_path / "c.cap", c.frames)
    w = load([path])
    assert [(o.op, o.ns) for o in w.ops] == [("find", "shop.orders")]
    assert abs(w.ops[0].ts_ns - c.frames[2 if writer == "sll" else 3][0]) < 1000  # microsecond files


def test_gap_ends_the_connection_with_a_warning(tmp_path):
    good = Capture(client=("10.0.0.3", 40001))
    simple_session(good)
    bad = Capture(client=("10.0.0.4", 40002)).handshake()
    m1, m2 = op_msg(1, 0, {"find": "a", "$db": "x"}), op_msg(2, 0, {"find": "b", "$db": "x"})
    bad.send(True, m1)
    bad.next[True] += len(m2)  # m2 was never captured
    bad.send(True, op_msg(3, 0, {"find": "c", "$db": "x"}))
    w = load([write_pcap_exact(tmp_path / "g.pcap", good.frames + bad.frames)])
    # Read as a stream: what came before the gap is replayed, nothing after it.
    assert [(c.label, [o.spec["find"] for o in c.ops if o.spec]) for c in w.connections] == [
        ("10.0.0.3:40001 -> 10.0.0.2:27017", ["orders"]),
        ("10.0.0.4:40002 -> 10.0.0.2:27017", ["a"]),
    ]
    [warning] = w.warnings
    assert "10.0.0.4:40002 -> 10.0.0.2:27017" in warning and "gap" in warning and "skipped from there on" in warning


def test_capture_started_mid_connection(tmp_path):
    at_request = Capture(client=("10.0.0.5", 40005))
    at_request.send(True, op_msg(1, 0, {"count": "a", "$db": "x"}))
    at_request.send(False, reply(1, {"n": 4, "ok": 1.0}))
    mid_message = Capture(client=("10.0.0.6", 40006))
    msg = op_msg(2, 0, {"count": "b", "$db": "x"})
    mid_message.send(True, msg[10:])
    mid_message.send(True, op_msg(3, 0, {"count": "b", "$db": "x"}))
    mid_message.send(False, reply(3))
    w = load([write_pcap_exact(tmp_path / "m.pcap", at_request.frames + mid_message.frames)])
    assert [(c.label, [o.op for o in c.ops]) for c in w.connections] == [
        ("10.0.0.5:40005 -> 10.0.0.2:27017", ["count"])
    ]
    assert any("10.0.0.6:40006" in x for x in w.warnings)


def test_reused_ports_are_two_connections_and_compressed_requests_decode(tmp_path):
    c = Capture()
    simple_session(c)
    c.next = {True: 90000, False: 70000}
    c.handshake()
    plain = op_msg(9, 0, {"insert": "t", "documents": [{"_id": 1}], "$db": "shop"})
    body = zlib.compress(plain[16:])
    c.send(
        True, struct.pack("<iiii", 25 + len(body), 9, 0, 2012) + struct.pack("<iiB", 2013, len(plain) - 16, 2) + body
    )
    c.send(False, reply(9, {"n": 1, "ok": 1.0}))
    w = load([write_pcap_exact(tmp_path / "r.pcap", c.frames)])
    assert [[o.op for o in conn.ops] for conn in w.connections] == [["find"], ["insert"]]
    insert = w.connections[1].ops[0]
    assert dict(insert.spec["documents"][0]) == {"_id": 1} and insert.recorded.n == 1


def test_files_are_read_in_time_order_and_connections_span_them(tmp_path):
    c = Capture().handshake()
    c.send(True, op_msg(1, 0, {"find": "a", "$db": "x"}))
    first = list(c.frames)
    c.send(False, reply(1))
    c.send(True, op_msg(2, 0, {"find": "b", "$db": "x"}))
    second = c.frames[len(first) :]
    # Named so that name order is the wrong order.
    a = write_pcap_exact(tmp_path / "b-first.pcap", first)
    b = write_pcap_exact(tmp_path / "a-second.pcap", second)
    w = load([str(tmp_path)])
    assert w.files == [a, b]
    assert [o.op + o.coll for o in w.ops] == ["finda", "findb"] and w.ops[0].recorded is not None


def test_no_mongodb_traffic(tmp_path):
    c = Capture(server=("10.0.0.2", 80)).handshake()
    c.send(True, b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    c.send(False, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    path = write_pcap_exact(tmp_path / "http.pcap", c.frames)
    with pytest.raises(ReplayError, match=r"http.pcap: no MongoDB traffic \(5 packets, 5 TCP, 1 TCP connections"):
        load([path])


def test_bad_files_name_the_file_and_offset(tmp_path):
    c = Capture()
    simple_session(c)
    good = write_pcapng(tmp_path / "good.pcapng", c.frames)
    data = open(good, "rb").read()
    # Corrupt the length of the third block (the second packet).
    blocks = []
    pos = 0
    while pos < len(data):
        length = struct.unpack_from("<I", data, pos + 4)[0]
        blocks.append(pos)
        pos += length
    bad = bytearray(data)
    struct.pack_into("<I", bad, blocks[3] + 4, 7)
    (tmp_path / "bad.pcapng").write_bytes(bad)
    with pytest.raises(ReplayError, match=rf"bad.pcapng: corrupt pcapng block at offset {blocks[3]} "):
        load([str(tmp_path / "bad.pcapng")])
    (tmp_path / "text.pcap").write_text("hello, not a capture")
    with pytest.raises(ReplayError, match=r"text.pcap: not a pcap or pcapng file \(it starts with 0x68656c6c"):
        load([str(tmp_path / "text.pcap")])
    with pytest.raises(ReplayError, match="missing.pcap: no such file"):
        load([str(tmp_path / "missing.pcap")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplayError, match="holds no .pcapng or .pcap files"):
        load([str(tmp_path / "empty")])
    # A truncated last packet is a warning: what came before is still read.
    (tmp_path / "cut.pcapng").write_bytes(data[:-10])
    warnings: list = []
    assert len(list(iter_packets(str(tmp_path / "cut.pcapng"), warnings))) == len(c.frames) - 1
    assert "truncated at offset" in warnings[0]


def test_sections_may_be_concatenated(tmp_path):
    c1, c2 = Capture(client=("10.0.0.7", 1)), Capture(client=("10.0.0.8", 2))
    simple_session(c1)
    simple_session(c2)
    a = open(write_pcapng(tmp_path / "1.pcapng", c1.frames), "rb").read()
    b = open(write_pcapng(tmp_path / "2.pcapng", c2.frames, linktype=dpkt.pcap.DLT_EN10MB), "rb").read()
    (tmp_path / "both.pcapng").write_bytes(a + b)
    w = load([str(tmp_path / "both.pcapng")])
    assert len(w.connections) == 2


def _summary(w) -> tuple:
    ops = [(o.conn.label, o.op, o.ns, o.request_id, o.skip, o.ts_ns, o.recorded_ns, o.spec) for o in w.ops]
    return ops, w.warnings, w.packets, w.flows, w.mongo_flows, w.files


def test_load_bytes_reads_a_capture_in_memory_as_load_reads_the_file(tmp_path):
    # load_bytes is what the replay fuzz harness runs: it must be load() itself, only without the file.
    session = Capture()
    simple_session(session)
    gap = Capture(client=("10.0.0.4", 40002)).handshake()
    gap.send(True, op_msg(1, 0, {"find": "a", "$db": "x"}))
    gap.next[True] += 100
    gap.send(True, op_msg(3, 0, {"find": "c", "$db": "x"}))
    paths = [
        write_pcap_exact(tmp_path / "a.pcap", session.frames),
        write_pcapng(tmp_path / "b.pcapng", session.frames + gap.frames),
    ]
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(open(paths[1], "rb").read()[:-10])
    for path in [*paths, str(cut)]:
        data = open(path, "rb").read()
        assert _summary(load_bytes(data, path)) == _summary(load([path]))
    assert any("gap" in x for x in load([paths[1]]).warnings)  # the comparison above covered a warning
    (tmp_path / "text.pcap").write_text("hello, not a capture")
    with pytest.raises(ReplayError) as on_disk:
        load([str(tmp_path / "text.pcap")])
    with pytest.raises(ReplayError) as in_memory:
        load_bytes(b"hello, not a capture", str(tmp_path / "text.pcap"))
    assert str(in_memory.value) == str(on_disk.value)
