"""pcapng writing: block structure, nanosecond timestamps, TCP sequence numbers, checksums, segmentation."""

from __future__ import annotations

import io
import os
import random
import struct

import dpkt
import pytest

from mongoproxy import pcapng
from mongoproxy.pcapng import MAX_PACKET, PcapngWriter, TcpFlow, checksum_sum
from mongoproxy.replay.reader import decode_tcp, iter_packets


def reference_checksum(data: bytes) -> int:
    """RFC 1071, one 16-bit word at a time."""
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def write(tmp_path, packets, **kwargs) -> str:
    path = str(tmp_path / "t.pcapng")
    with open(path, "wb") as f:
        w = PcapngWriter(f, **kwargs)
        for ts, parts, *comment in packets:
            w.write_packet(ts, parts, *comment)
        if kwargs.get("summary_space"):
            w.finish_summary("done: ünïcode ✓")
    return path


def blocks(path: str):
    """(type, body) of each block, checking both length fields and 4-byte alignment."""
    data = open(path, "rb").read()
    pos = 0
    out = []
    while pos < len(data):
        block_type, length = struct.unpack_from("<II", data, pos)
        assert length % 4 == 0 and length >= 12
        assert struct.unpack_from("<I", data, pos + length - 4)[0] == length
        out.append((block_type, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def comments(block: bytes, options_at: int) -> list[str]:
    out = []
    pos = options_at
    while pos + 4 <= len(block) - 4:
        code, length = struct.unpack_from("<HH", block, pos)
        if code == 0:
            break
        if code == 1:
            out.append(block[pos + 4 : pos + 4 + length].decode("utf-8"))
        pos += 4 + length + (-length % 4)
    return out


@pytest.mark.parametrize("n", [0, 1, 2, 3, 19, 20, 21, 1000, 65535])
def test_checksum_sum_matches_rfc1071(n):
    rng = random.Random(n)
    for _ in range(20):
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert (~checksum_sum(data)) & 0xFFFF == reference_checksum(data)
    assert checksum_sum(b"\xff\xff") == 0xFFFF
    assert checksum_sum(b"\xff\xff\xff\xff") == 0xFFFF
    assert checksum_sum(b"\x00\x00") == 0


def test_section_interface_and_packet_blocks(tmp_path):
    ts = 1_700_000_000_123_456_789
    path = write(
        tmp_path,
        [(ts, b"\x45" + bytes(39), "first"), (ts + 1, [b"\x45" + bytes(19), b"xyz"])],
        comment="hello",
        summary_space=64,
    )
    bl = blocks(path)
    assert [b[0] for b in bl] == [pcapng.BT_SHB, pcapng.BT_IDB, pcapng.BT_EPB, pcapng.BT_EPB]
    shb = bl[0][1]
    assert struct.unpack_from("<IHHq", shb, 8) == (0x1A2B3C4D, 1, 0, -1)
    shb_comments = comments(shb, 24)
    assert shb_comments[0] == "hello"
    assert shb_comments[1].rstrip(" ") == "done: ünïcode ✓" and len(shb_comments[1].encode()) == 64
    idb = bl[1][1]
    assert struct.unpack_from("<HHI", idb, 8) == (pcapng.LINKTYPE_RAW, 0, MAX_PACKET)
    assert b"\x09\x00\x01\x00\x09" in idb  # if_tsresol = 9 (nanoseconds)
    epb = bl[2][1]
    _, _, iface, high, low, caplen, origlen = struct.unpack_from("<IIIIIII", epb)
    assert (iface, (high << 32) | low, caplen, origlen) == (0, ts, 40, 40)
    assert comments(epb, 28 + 40) == ["first"]
    assert bl[3][1][28 : 28 + 23] == b"\x45" + bytes(19) + b"xyz"  # parts are written back to back
    # dpkt and the replay reader agree on every packet and its exact timestamp.
    got = list(iter_packets(path, []))
    assert [(p.ts_ns, p.linktype, len(p.data)) for p in got] == [(ts, 101, 40), (ts + 1, 101, 23)]
    reader = dpkt.pcapng.Reader(open(path, "rb"))
    assert reader.datalink() == 101 and len(list(reader)) == 2


def test_summary_is_cut_at_a_character_boundary(tmp_path):
    f = io.BytesIO()
    w = PcapngWriter(f, summary_space=5)
    w.finish_summary("ab✓✓")  # "✓" is 3 bytes: only "ab✓" fits in 5
    assert b"ab\xe2\x9c\x93" in f.getvalue()
    assert b"ab\xe2\x9c\x93\xe2" not in f.getvalue()


def test_packet_longer_than_65535_is_refused():
    w = PcapngWriter(io.BytesIO())
    with pytest.raises(ValueError):
        w.write_packet(0, bytes(MAX_PACKET + 1))


def verify_checksums(packet: bytes) -> None:
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0xF) * 4
        assert reference_checksum(packet[:ihl]) == 0, "IPv4 header checksum"
        src, dst, tcp = packet[12:16], packet[16:20], packet[ihl:]
        pseudo = src + dst + b"\0\x06" + struct.pack("!H", len(tcp))
    else:
        src, dst, tcp = packet[8:24], packet[24:40], packet[40:]
        pseudo = src + dst + struct.pack("!I", len(tcp)) + b"\0\0\0\x06"
    assert reference_checksum(pseudo + tcp) == 0, "TCP checksum"


@pytest.mark.parametrize("client,server", [("10.1.2.3", "10.9.8.7"), ("::1", "2001:db8::5"), ("127.0.0.1", "::1")])
def test_tcp_flow_sequence_numbers_checksums_and_segments(client, server):
    flow = TcpFlow(client, 40000, server, 27017, rng=random.Random(7))
    c_isn, s_isn = flow.client_next, flow.server_next
    request = os.urandom(1000)
    reply = os.urandom(200_001)  # four segments, odd length
    packets = flow.handshake(1) + flow.data(True, request, 2) + flow.data(False, reply, 3) + flow.close(4)
    decoded = []
    for ts, parts in packets:
        raw = b"".join(bytes(p) for p in parts)
        assert len(raw) <= MAX_PACKET
        verify_checksums(raw)
        decoded.append((ts,) + decode_tcp(101, raw))
    ends = {client.split("%")[0], server}
    flags = [d[7] for d in decoded]
    assert flags[:3] == [0x02, 0x12, 0x10]  # SYN, SYN-ACK, ACK
    syn, syn_ack, ack = decoded[:3]
    assert syn[5] == c_isn and syn_ack[5] == s_isn and syn_ack[6] == (c_isn + 1) & 0xFFFFFFFF
    assert ack[5] == (c_isn + 1) & 0xFFFFFFFF and ack[6] == (s_isn + 1) & 0xFFFFFFFF
    data_c = [d for d in decoded[3:] if d[8] and d[2] == 40000]
    data_s = [d for d in decoded[3:] if d[8] and d[2] == 27017]
    assert len(data_c) == 1 and len(data_s) == 4
    assert data_c[0][5] == (c_isn + 1) & 0xFFFFFFFF and data_c[0][6] == (s_isn + 1) & 0xFFFFFFFF
    assert b"".join(d[8] for d in data_s) == reply
    expect = (s_isn + 1) & 0xFFFFFFFF
    for d in data_s:
        assert d[5] == expect and d[6] == (c_isn + 1 + len(request)) & 0xFFFFFFFF
        expect = (expect + len(d[8])) & 0xFFFFFFFF
    assert [d[7] & 0x08 for d in data_s] == [0, 0, 0, 0x08]  # PSH on the last segment of the chunk
    fin_c, fin_s, last = decoded[-3:]
    assert fin_c[7] == 0x11 and fin_c[5] == (c_isn + 1 + len(request)) & 0xFFFFFFFF
    assert fin_s[7] == 0x11 and fin_s[5] == expect and fin_s[6] == (fin_c[5] + 1) & 0xFFFFFFFF
    assert last[7] == 0x10 and last[6] == (expect + 1) & 0xFFFFFFFF  # FIN takes one
    if ":" in client and ":" in server or ":" not in client and ":" not in server:
        assert {decoded[0][1], decoded[0][3]} == ends
    else:  # mixed families: the IPv4 side is shown IPv4-mapped
        assert {decoded[0][1], decoded[0][3]} == {"::ffff:127.0.0.1", "::1"}


def test_refused_connection_is_a_syn_answered_by_rst():
    flow = TcpFlow("10.0.0.1", 1, "10.0.0.2", 2)
    ((_, syn),) = flow.syn(0)
    ((_, rst),) = flow.refuse(1)
    s = decode_tcp(101, b"".join(syn))
    r = decode_tcp(101, b"".join(rst))
    assert s[6] == 0x02 and r[6] == 0x14 and r[5] == (s[4] + 1) & 0xFFFFFFFF
    assert flow.close(2)[-1]  # closing after a refusal writes only the last ACK, no second FIN
    assert len(flow.close(3)) == 1


def test_sequence_numbers_wrap():
    flow = TcpFlow("10.0.0.1", 1, "10.0.0.2", 2)
    flow.client_next = 0xFFFFFFF0
    ((_, parts),) = flow.data(True, bytes(32), 0)
    assert decode_tcp(101, b"".join(bytes(p) for p in parts))[4] == 0xFFFFFFF0
    assert flow.client_next == 0x10
