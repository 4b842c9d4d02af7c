"""Seed inputs for each harness: the malformed corpus (tests/malformed/*.bin) and valid traffic."""

from __future__ import annotations

import random
import struct
from pathlib import Path

from tests.support import wire as tw

MALFORMED = Path(__file__).resolve().parents[1] / "malformed"


def _malformed() -> list[tuple[bool, bytes]]:
    return [(p.name.startswith("reply."), p.read_bytes()) for p in sorted(MALFORMED.glob("*.bin"))]


def requests() -> bytes:
    """A client's side of a conversation: handshake, CRUD, cursors, legacy ops, compression."""
    hello = {
        "hello": 1,
        "helloOk": True,
        "client": {"application": {"name": "seed"}, "driver": {"name": "PyMongo", "version": "4.9"}},
        "compression": ["zstd", "zlib", "snappy"],
        "$db": "admin",
    }
    insert = tw.encode_op_msg({"insert": "c", "$db": "d"}, sequences=[("documents", [{"_id": i} for i in range(3)])])
    msgs = [
        tw.encode_op_query({"isMaster": 1, "client": {"driver": {"name": "x", "version": "1"}}}, request_id=1),
        tw.encode_op_msg(hello, request_id=2),
        tw.encode_op_msg({"find": "c", "filter": {"a": {"$gt": 1}}, "comment": "x", "$db": "d"}, request_id=3),
        insert,
        tw.encode_op_msg({"getMore": 12345, "collection": "c", "$db": "d"}, request_id=5),
        tw.encode_op_msg({"update": "c", "updates": [{"q": {"a": 1}, "u": {"$set": {"b": 2}}}], "$db": "d"}),
        tw.encode_op_msg({"aggregate": "c", "pipeline": [{"$match": {"$comment": "m"}}], "cursor": {}, "$db": "d"}),
        tw.encode_op_msg({"insert": "c", "$db": "d"}, flags=tw.MORE_TO_COME, sequences=[("documents", [{}])]),
        tw.encode_op_msg({"ping": 1, "$db": "admin"}, checksum=True),
        tw.encode_op_msg({"saslStart": 1, "payload": b"secret", "$db": "admin"}),
        tw.compress_message(tw.encode_op_msg({"find": "z", "$db": "d"}), "zlib"),
        tw.compress_message(tw.encode_op_msg({"find": "s", "$db": "d"}), "snappy"),
        tw.compress_message(tw.encode_op_msg({"find": "t", "$db": "d"}), "zstd"),
        tw.encode_op_insert("d.c", [{"a": 1}, {"b": "x"}]),
        tw.encode_op_update("d.c", {"a": 1}, {"$set": {"a": 2}}),
        tw.encode_op_delete("d.c", {"a": 1}),
        tw.encode_op_get_more("d.c", 77),
        tw.encode_op_kill_cursors([77, 78]),
        tw.encode_op_query({"a": 1}, full_collection_name="d.c", flags=1 << 6),
    ]
    return b"".join(msgs)


def replies() -> bytes:
    """A server's side: hello, cursor batches, write results, errors, legacy OP_REPLY, compression."""
    msgs = [
        tw.encode_op_reply([{"ismaster": True, "maxWireVersion": 21, "ok": 1.0}], response_to=1),
        tw.encode_op_msg(
            {"isWritablePrimary": True, "setName": "rs0", "me": "h:1", "compression": ["zlib"], "ok": 1.0},
            response_to=2,
        ),
        tw.encode_op_msg({"cursor": {"id": 12345, "ns": "d.c", "firstBatch": [{"_id": 1}, {"_id": 2}]}, "ok": 1.0}),
        tw.encode_op_msg({"n": 3, "ok": 1.0}),
        tw.encode_op_msg({"cursor": {"id": 0, "ns": "d.c", "nextBatch": [{}]}, "ok": 1.0}, flags=tw.MORE_TO_COME),
        tw.encode_op_msg({"n": 1, "nModified": 1, "upserted": [{"index": 0, "_id": 5}], "ok": 1.0}),
        tw.encode_op_msg({"n": 0, "writeErrors": [{"index": 0, "code": 11000, "errmsg": "dup"}], "ok": 1.0}),
        tw.encode_op_msg({"ok": 0.0, "errmsg": "bad", "code": 2, "codeName": "BadValue"}),
        tw.encode_op_msg({"lastErrorObject": {"n": 1}, "value": None, "ok": 1.0}),
        tw.compress_message(tw.encode_op_msg({"ok": 1.0}), "zlib"),
        tw.encode_op_reply([{"$err": "x", "code": 13}], response_to=9, flags=2),
        tw.encode_op_reply([{"a": 1}] * 3, response_to=10, cursor_id=77),
    ]
    return b"".join(msgs)


def scanner() -> list[bytes]:
    """Scanner inputs: 3 option bytes, then a stream."""
    out = []
    for is_reply, data in _malformed():
        out.append(bytes([int(is_reply), 0, 1]) + data)
        out.append(bytes([int(is_reply) | 8, 5, 0]) + data)
    req, rep = requests(), replies()
    for opts, size in ((0, 0), (2, 1), (4, 16), (8, 0), (0, 255)):
        out.append(bytes([opts, size, 7]) + req)
        out.append(bytes([opts | 1, size, 7]) + rep)
    return out


def tracker() -> list[bytes]:
    """Tracker inputs: the harness reads them as a program, so random bytes are a fair start."""
    return [random.Random(i).randbytes(64 + 32 * (i % 8)) for i in range(24)]


def _pcap(pcapng_flows: list[tuple[int, list]]) -> bytes:
    head = struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 101)  # nanosecond pcap, raw IP
    recs = []
    for ts, parts in pcapng_flows:
        pkt = b"".join(bytes(p) for p in parts)
        recs.append(struct.pack("<IIII", ts // 10**9, ts % 10**9, len(pkt), len(pkt)) + pkt)
    return head + b"".join(recs)


def replay() -> list[bytes]:
    """Replay inputs: whole capture files (pcapng, pcap) and wire streams to wrap in a conversation."""
    from mongoproxy.pcapng import TcpFlow
    from tests.fuzz.harness_replay import conversation

    req, rep = requests(), replies()
    out = [b"\x00" + conversation(req, rep, 1400), b"\x00" + conversation(req, rep, 37)]
    flow = TcpFlow("10.0.0.1", 40000, "10.0.0.2", 27017, random.Random(3))
    ts = 1_700_000_000 * 10**9
    pkts = flow.handshake(ts) + flow.data(True, req, ts + 10) + flow.data(False, rep, ts + 20) + flow.close(ts + 30)
    out.append(b"\x00" + _pcap(pkts))
    out.append(bytes([(20 << 1) | 1]) + len(req).to_bytes(2, "little") + req + rep)
    for _, data in _malformed():
        out.append(bytes([(3 << 1) | 1]) + len(data).to_bytes(2, "little") + data + rep[:200])
    return out


SEEDS = {"scanner": scanner, "tracker": tracker, "replay": replay}
