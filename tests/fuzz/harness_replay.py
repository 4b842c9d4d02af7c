"""Fuzz replay's capture reader: pcap/pcapng parsing, TCP reassembly and the wire-message extraction.

Input layout: byte 0 even = the rest is a capture file, as is (pcap, pcapng or garbage);
byte 0 odd = bytes 1-2 give L, the next L bytes are what the client sent and the rest what the server
sent, wrapped into a valid pcapng TCP conversation cut into segments of (byte 0 >> 1) * 16 + 1 bytes,
so that arbitrary wire bytes reach reassembly and extraction. The file is read from memory by load_bytes(),
which is load() with a BytesIO for the file (the same reader and extraction code, no file per input).
Invariants:
- load_bytes() returns a Workload or raises ReplayError (one line for the user); nothing else escapes.
- A Workload is consistent: its operations are sorted by time, each belongs to one of its connections,
  and it counts at least as many packets as flows and at least as many flows as MongoDB flows.
"""

from __future__ import annotations

import io
import random

from mongoproxy.pcapng import PcapngWriter, TcpFlow
from tests.fuzz.targets import ReplayError, replay_load_bytes


def conversation(client: bytes, server: bytes, segment: int, seed: int = 1) -> bytes:
    """A pcapng file: one TCP connection in which the client sends `client` and the server `server`."""
    f = io.BytesIO()
    w = PcapngWriter(f)
    flow = TcpFlow("10.0.0.1", 40000, "10.0.0.2", 27017, random.Random(seed))
    ts = 1_700_000_000 * 10**9
    for t, parts in flow.handshake(ts):
        w.write_packet(t, parts)
    # Interleave: a client segment, then a server segment, as a request/reply conversation would.
    c = s = 0
    while c < len(client) or s < len(server):
        for data, pos, from_client in ((client, c, True), (server, s, False)):
            if pos < len(data):
                ts += 1000
                for t, parts in flow.data(from_client, data[pos : pos + segment], ts):
                    w.write_packet(t, parts)
        c += segment
        s += segment
    for t, parts in flow.close(ts + 1000):
        w.write_packet(t, parts)
    return f.getvalue()


def file_bytes(data: bytes) -> bytes:
    """The capture file an input stands for (see the module docstring)."""
    if not data or not data[0] & 1:
        return data[1:]
    if len(data) < 3:
        return b""
    n = int.from_bytes(data[1:3], "little")
    rest = data[3:]
    return conversation(rest[:n], rest[n:], (data[0] >> 1) * 16 + 1)


def test_one_input(data: bytes) -> None:
    """One fuzz input: see the module docstring."""
    try:
        w = replay_load_bytes(file_bytes(data), "input.pcapng")
    except ReplayError as exc:
        text = str(exc)
        assert text and "\n" not in text.strip(), f"ReplayError is not one line: {text!r}"
        return
    conns = {id(c) for c in w.connections}
    keys = [(o.ts_ns, o.conn.index, o.index) for o in w.ops]
    assert keys == sorted(keys), "operations are not in time order"
    for o in w.ops:
        assert id(o.conn) in conns, "an operation of a connection the workload does not hold"
    assert w.packets >= w.flows >= w.mongo_flows >= 1, (w.packets, w.flows, w.mongo_flows)
