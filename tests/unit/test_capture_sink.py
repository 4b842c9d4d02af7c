"""The recording sink, driven without sockets: byte-exact flows, comments, secrets, drops, rotation, redaction."""

from __future__ import annotations

import datetime
import os
import random
import struct
import time

import bson
import pytest
from bson import ObjectId
from prometheus_client import CollectorRegistry

from mongoproxy import config as config_mod
from mongoproxy import redact
from mongoproxy.errors import ConfigError
from mongoproxy.events import Connection, UpstreamConnectError, wall_ns
from mongoproxy.replay.extract import load
from mongoproxy.replay.reader import Reassembler, iter_packets
from mongoproxy.sinks import SinkContext
from mongoproxy.sinks import capture as capture_mod
from mongoproxy.sinks.capture import CaptureSink

SECRET = b"S3CR3T-SCRAM"


def op_msg(request_id: int, response_to: int, doc: dict, seqs=(), flags: int = 0) -> bytes:
    body = struct.pack("<I", flags) + b"\0" + bson.encode(doc)
    for ident, docs in seqs:
        payload = ident.encode() + b"\0" + b"".join(bson.encode(d) for d in docs)
        body += b"\1" + struct.pack("<i", 4 + len(payload)) + payload
    return struct.pack("<iiii", 16 + len(body), request_id, response_to, 2013) + body


def hello(rid: int = 1, app: str = "orders-api") -> bytes:
    return op_msg(
        rid,
        0,
        {
            "hello": 1,
            "client": {"application": {"name": app}, "driver": {"name": "PyMongo", "version": "4.20"}},
            "speculativeAuthenticate": {"saslStart": 1, "mechanism": "SCRAM-SHA-256", "payload": SECRET, "db": "admin"},
            "$db": "admin",
        },
    )


def hello_reply(rid: int, to: int) -> bytes:
    return op_msg(
        rid,
        to,
        {
            "isWritablePrimary": True,
            "maxWireVersion": 21,
            "speculativeAuthenticate": {"conversationId": 1, "done": False, "payload": SECRET},
            "ok": 1.0,
        },
    )


def conn(cid: int = 1, client=("10.0.0.5", 51000), server=("10.0.0.9", 27017)) -> Connection:
    return Connection(
        id=cid,
        client_host=client[0],
        client_port=client[1],
        upstream_host=server[0],
        upstream_port=server[1],
        listen_port=27111,
        opened_ns=time.monotonic_ns(),
    )


def chunks(data: bytes, rng: random.Random, max_size: int = 50):
    pos = 0
    while pos < len(data):
        n = rng.randint(1, max_size)
        yield data[pos : pos + n]
        pos += n


def new_sink(tmp_path, **kwargs) -> CaptureSink:
    return CaptureSink(str(tmp_path), **kwargs)


def finished_files(tmp_path) -> list[str]:
    names = sorted(os.listdir(tmp_path))
    assert not [n for n in names if n.endswith(".part")], names
    return [str(tmp_path / n) for n in names if n.endswith(".pcapng")]


def flows(paths):
    re = Reassembler()
    for p in sorted(paths):
        for pkt in iter_packets(p, []):
            re.add(pkt, p)
    return re.flows


def stream(flow, side) -> bytes:
    return b"".join(m.data for m in flow.halves[side].messages)


def epb_comments(path: str) -> list[tuple[int, str]]:
    """(packet index, comment) of every commented packet; also the section comments as index -1."""
    data = open(path, "rb").read()
    out = []
    pos = 0
    index = 0
    while pos < len(data):
        block_type, length = struct.unpack_from("<II", data, pos)
        block = data[pos : pos + length]
        if block_type in (6, 0x0A0D0D0A):
            if block_type == 6:
                caplen = struct.unpack_from("<I", block, 20)[0]
                opt = 28 + caplen + (-caplen % 4)
            else:
                opt = 24
            while opt + 4 <= len(block) - 4:
                code, olen = struct.unpack_from("<HH", block, opt)
                if code == 0:
                    break
                if code == 1:
                    out.append((index if block_type == 6 else -1, block[opt + 4 : opt + 4 + olen].decode().rstrip()))
                opt += 4 + olen + (-olen % 4)
            if block_type == 6:
                index += 1
        pos += length
    return out


def test_flow_is_byte_exact_with_real_addresses_and_times(tmp_path):
    rng = random.Random(1)
    sink = new_sink(tmp_path)
    c = conn()
    requests = [
        hello(1),
        op_msg(2, 0, {"find": "orders", "filter": {"x": 1}, "$db": "shop"}),
        op_msg(3, 0, {"insert": "orders", "$db": "shop"}, [("documents", [{"_id": i} for i in range(50)])]),
    ]
    replies = [
        hello_reply(101, 1),
        op_msg(102, 2, {"cursor": {"firstBatch": [{"x": 1}] * 3, "id": 0, "ns": "shop.orders"}, "ok": 1.0}),
        op_msg(103, 3, {"n": 50, "ok": 1.0}),
    ]
    sink.on_connection_open(c)
    t = time.monotonic_ns()
    first_chunk_ts = {}
    for req, rep in zip(requests, replies):
        for _i, part in enumerate(chunks(req, rng)):
            t += 1000
            first_chunk_ts.setdefault(req, t)
            sink.on_data(c, True, part, t)
        for part in chunks(rep, rng, 7):
            t += 1000
            sink.on_data(c, False, part, t)
    # Two pipelined messages in one chunk become one segment.
    pipelined = op_msg(4, 0, {"ping": 1, "$db": "admin"}) + op_msg(5, 0, {"ping": 1, "$db": "admin"})
    t += 1000
    sink.on_data(c, True, pipelined, t)
    c.closed_ns = t + 1000
    sink.on_connection_close(c)
    sink.close()
    [path] = finished_files(tmp_path)
    [flow] = flows([path])
    assert flow.client == ("10.0.0.5", 51000) and flow.server == ("10.0.0.9", 27017)
    sent = stream(flow, flow.client)
    blank_hello = redact.Rewriter().message(bytearray(requests[0]), False, "hello")
    assert sent == bytes(blank_hello) + b"".join(requests[1:]) + pipelined
    assert stream(flow, flow.server) == bytes(
        redact.Rewriter().message(bytearray(replies[0]), True, "hello")
    ) + b"".join(replies[1:])
    msgs = flow.halves[flow.client].messages
    for req, m in zip(requests[1:], msgs[1:]):
        assert m.first_ns == wall_ns(first_chunk_ts[req])  # nanosecond timestamps survive
    assert msgs[3].first_ns == msgs[4].first_ns
    assert flow.closed


def test_first_segments_carry_the_app_name(tmp_path):
    sink = new_sink(tmp_path)
    c = conn()
    sink.on_connection_open(c)
    t = time.monotonic_ns()
    for part in chunks(hello(1, "billing job"), random.Random(2), 9):  # the app name arrives in pieces
        sink.on_data(c, True, part, t)
    sink.on_data(c, False, hello_reply(9, 1), t + 1)
    sink.on_data(c, True, op_msg(2, 0, {"ping": 1, "$db": "admin"}), t + 2)
    sink.close()  # with the connection still open
    [path] = finished_files(tmp_path)
    got = epb_comments(path)
    packet_comments = [text for i, text in got if i >= 0]
    assert packet_comments[0].startswith("mongoproxy connection 1: client 10.0.0.5:51000 -> server 10.0.0.9:27017")
    app = 'mongoproxy connection 1: app "billing job", driver PyMongo 4.20'
    assert packet_comments[1:] == [
        app,
        app,  # the first data segment of each direction
        "mongoproxy: the recording stopped while connection 1 was open",
    ]
    section = [text for i, text in got if i < 0]
    assert "No connection was dropped" in section[1]


def test_secrets_are_blanked_even_when_chunked(tmp_path):
    sink = new_sink(tmp_path)
    c = conn()
    sink.on_connection_open(c)
    t = time.monotonic_ns()
    exchange = [
        (True, hello(1)),
        (False, hello_reply(50, 1)),
        (True, op_msg(2, 0, {"saslStart": 1, "mechanism": "SCRAM-SHA-256", "payload": SECRET, "$db": "admin"})),
        (False, op_msg(51, 2, {"conversationId": 1, "done": False, "payload": SECRET, "ok": 1.0})),
        (True, op_msg(3, 0, {"saslContinue": 1, "conversationId": 1, "payload": SECRET, "$db": "admin"})),
        (False, op_msg(52, 3, {"conversationId": 1, "done": True, "payload": SECRET, "ok": 1.0})),
        (True, op_msg(4, 0, {"createUser": "bob", "pwd": SECRET.decode(), "roles": [], "$db": "admin"})),
        (False, op_msg(53, 4, {"ok": 1.0})),
    ]
    for from_client, msg in exchange:
        for part in chunks(msg, random.Random(len(msg)), 3):
            sink.on_data(c, from_client, part, t)
    sink.close()
    [path] = finished_files(tmp_path)
    assert SECRET not in open(path, "rb").read()
    [flow] = flows([path])
    msgs = flow.halves[flow.client].messages + flow.halves[flow.server].messages
    assert len(msgs) == len(exchange)
    docs = [bson.decode(m.data[21:]) for m in msgs]  # still valid BSON, lengths unchanged
    assert [len(m.data) for m in flow.halves[flow.client].messages] == [len(m) for f, m in exchange if f]
    by_first = {next(iter(d)): d for d in docs}
    assert by_first["saslStart"]["payload"] == bytes(len(SECRET))
    assert by_first["saslStart"]["mechanism"] == "SCRAM-SHA-256"
    assert by_first["createUser"]["pwd"] == "*" * len(SECRET) and by_first["createUser"]["createUser"] == "bob"
    assert by_first["hello"]["client"]["application"]["name"] == "orders-api"
    assert by_first["conversationId"]["payload"] == bytes(len(SECRET))


def test_full_queue_cuts_the_connection_cleanly_and_counts_it(tmp_path):
    registry = CollectorRegistry()
    overhead = capture_mod.ITEM_OVERHEAD
    sink = new_sink(tmp_path, queue_bytes=2 * (500 + overhead) + 300, registry=registry, start=False)
    a, b, c = conn(1), conn(2, client=("10.0.0.6", 52000)), conn(3, client=("10.0.0.7", 53000))
    msg = op_msg(7, 0, {"insert": "t", "pad": "x" * 439, "$db": "d"})
    assert len(msg) == 500
    sink.on_connection_open(a)
    t = time.monotonic_ns()
    sink.on_data(a, True, msg, t)
    sink.on_data(a, True, msg, t + 1)
    assert sink.dropped == 0
    sink.on_data(a, True, msg, t + 2)  # over the limit: a stops being recorded here
    sink.on_data(a, True, op_msg(8, 0, {"ping": 1, "$db": "d"}), t + 3)  # and stays stopped
    assert sink.dropped == 1
    sink.on_connection_open(b)  # the queue is still over half full: b is not recorded at all
    sink.on_data(b, True, msg, t + 4)
    assert sink.dropped == 2
    assert registry.get_sample_value("mongoproxy_capture_dropped_total") == 2
    sink.start()
    deadline = time.monotonic() + 10
    while sink.queued_bytes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.queued_bytes == 0
    sink.on_connection_open(c)  # drained: recording resumes for new connections
    sink.on_data(c, True, msg, t + 5)
    sink.on_connection_close(a)
    sink.close()
    [path] = finished_files(tmp_path)
    got = flows([path])
    assert [f.client for f in got] == [("10.0.0.5", 51000), ("10.0.0.7", 53000)]
    assert stream(got[0], got[0].client) == msg * 2  # a prefix of whole messages: no hole
    assert got[0].closed
    comments = epb_comments(path)
    assert any("recording of connection 1 stops here: the recorder fell behind" in text for _, text in comments)
    summary = [text for i, text in comments if i < 0][1]
    assert "2 connection(s) were not recorded or were cut short" in summary
    assert registry.get_sample_value("mongoproxy_capture_files_total") == 1


def test_disk_failure_cuts_connections_and_pauses_recording(tmp_path, caplog):
    directory = tmp_path / "gone"
    directory.mkdir()
    registry = CollectorRegistry()
    sink = CaptureSink(str(directory), registry=registry, start=False)
    a, b = conn(1), conn(2, client=("10.0.0.6", 52000))
    sink.on_connection_open(a)
    sink.on_data(a, True, op_msg(1, 0, {"ping": 1, "$db": "admin"}), time.monotonic_ns())
    directory.rmdir()  # the first file cannot be created
    sink.start()
    deadline = time.monotonic() + 10
    while sink.dropped < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.dropped == 1 and not a_recording(sink, a)
    sink.on_data(a, True, op_msg(2, 0, {"ping": 1, "$db": "admin"}), time.monotonic_ns())
    sink.on_connection_open(b)  # paused: not recorded
    assert sink.dropped == 2 and registry.get_sample_value("mongoproxy_capture_dropped_total") == 2
    sink.close()
    assert "recording to" in caplog.text and "failed" in caplog.text and "pauses for 10s" in caplog.text


def a_recording(sink: CaptureSink, c: Connection) -> bool:
    state = sink._conns.get(c.id)
    return state is not None and state.recording


def test_rotation_by_size_keeps_connections_whole_across_files(tmp_path):
    sink = new_sink(tmp_path, max_bytes=4000)
    c = conn()
    sink.on_connection_open(c)
    t = time.monotonic_ns()
    sent = b""
    for i in range(40):
        m = op_msg(i + 1, 0, {"find": "c", "filter": {"_id": i}, "$db": "d"})
        sent += m
        sink.on_data(c, True, m, t + i)
        sink.on_data(
            c, False, op_msg(1000 + i, i + 1, {"cursor": {"firstBatch": [], "id": 0, "ns": "d.c"}, "ok": 1.0}), t + i
        )
    sink.close()
    files = finished_files(tmp_path)
    assert len(files) >= 3 and all(os.path.getsize(f) < 4000 + 400 for f in files[:-1])
    [flow] = flows(files)
    assert stream(flow, flow.client) == sent
    assert any("continues from the previous file" in text for _, text in epb_comments(files[1]))
    workload = load([str(tmp_path)])
    assert [o.op for o in workload.ops] == ["find"] * 40


def test_rotation_by_time_and_part_files(tmp_path):
    sink = new_sink(tmp_path, rotate_seconds=1.0)
    c = conn()
    sink.on_connection_open(c)
    t = time.monotonic_ns()
    sink.on_data(c, True, op_msg(1, 0, {"ping": 1, "$db": "admin"}), t)
    deadline = time.monotonic() + 10
    while not os.listdir(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    [name] = os.listdir(tmp_path)
    assert name.endswith(".pcapng.part")  # not renamed while it is written
    sink.on_data(c, True, op_msg(2, 0, {"ping": 1, "$db": "admin"}), t + 2 * 10**9)  # two seconds later
    sink.close()
    assert len(finished_files(tmp_path)) == 2


def test_record_redact_pseudonymises_consistently(tmp_path):
    sink = new_sink(tmp_path, pseudonymise=True)
    c = conn()
    oid = ObjectId()
    when = datetime.datetime(1985, 5, 17, tzinfo=datetime.UTC)
    doc = {
        "_id": oid,
        "name": "alice",
        "n": 42,
        "big": 2**40,
        "score": 3.5,
        "born": when,
        "vip": True,
        "tags": ["red", "blue"],
        "nested": {"name": "alice"},
        "nothing": None,
    }
    lsid = {"id": bson.Binary(os.urandom(16), 4)}
    msgs = [
        (True, op_msg(1, 0, {"insert": "people", "ordered": True, "lsid": lsid, "$db": "crm"}, [("documents", [doc])])),
        (False, op_msg(101, 1, {"n": 1, "ok": 1.0})),
        (
            True,
            op_msg(
                2,
                0,
                {
                    "find": "people",
                    "filter": {"name": "alice", "age": {"$gt": 30}},
                    "projection": {"name": 1},
                    "limit": 5,
                    "lsid": lsid,
                    "$db": "crm",
                },
            ),
        ),
        (False, op_msg(102, 2, {"cursor": {"firstBatch": [doc], "id": 0, "ns": "crm.people"}, "ok": 1.0})),
    ]
    sink.on_connection_open(c)
    for from_client, m in msgs:
        sink.on_data(c, from_client, m, time.monotonic_ns())
    sink.close()
    [path] = finished_files(tmp_path)
    raw = open(path, "rb").read()
    assert b"alice" not in raw and b"blue" not in raw and oid.binary not in raw
    [flow] = flows([path])
    req = flow.halves[flow.client].messages
    rep = flow.halves[flow.server].messages
    assert [len(m.data) for m in req] == [len(m) for f, m in msgs if f]
    insert_body = bson.decode(req[0].data[21 : 21 + struct.unpack_from("<i", req[0].data, 21)[0]])
    assert insert_body == {"insert": "people", "ordered": True, "lsid": lsid, "$db": "crm"}  # kept verbatim
    seq = req[0].data[21 + struct.unpack_from("<i", req[0].data, 21)[0] :]
    stored = bson.decode(seq[1 + 4 + len(b"documents\0") :])
    find = bson.decode(req[1].data[21:])
    batch = bson.decode(rep[1].data[21:])["cursor"]["firstBatch"][0]
    assert stored == batch  # the same value gets the same pseudonym everywhere
    assert stored["_id"] != oid and stored["name"] != "alice" and len(stored["name"]) == 5
    assert find["filter"]["name"] == stored["name"] == stored["nested"]["name"]
    assert stored["vip"] is True and stored["nothing"] is None and len(stored["tags"]) == 2
    assert stored["n"] != 42 and stored["big"] != 2**40 and stored["score"] != 3.5 and stored["born"] != when
    assert find["limit"] == 5 and find["projection"] == {"name": 1} and find["find"] == "people"
    assert find["filter"]["age"]["$gt"] != 30
    assert bson.decode(rep[1].data[21:])["cursor"]["ns"] == "crm.people"


def test_record_ns_keeps_only_matching_commands_and_their_replies(tmp_path):
    sink = new_sink(tmp_path, namespaces=("shop.orders", "audit.*"))
    c = conn()
    sink.on_connection_open(c)
    t = time.monotonic_ns()
    exchange = [
        (1, "admin", {"hello": 1}),
        (2, "shop", {"find": "orders"}),
        (3, "shop", {"find": "users"}),
        (4, "audit", {"insert": "log"}),
        (5, "other", {"ping": 1}),
        (6, "shop", {"getMore": bson.Int64(5), "collection": "orders"}),
    ]
    for rid, db, body in exchange:
        sink.on_data(c, True, op_msg(rid, 0, dict(body, **{"$db": db})), t)
        sink.on_data(c, False, op_msg(100 + rid, rid, {"ok": 1.0, "marker": rid}), t)
    sink.close()
    [flow] = flows(finished_files(tmp_path))
    kept = [m.header[1] for m in flow.halves[flow.client].messages]
    assert kept == [1, 2, 4, 6]
    assert [m.header[2] for m in flow.halves[flow.server].messages] == [1, 2, 4, 6]


def test_non_mongodb_bytes_are_recorded_as_they_are(tmp_path):
    sink = new_sink(tmp_path)
    c = conn()
    sink.on_connection_open(c)
    junk = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    sink.on_data(c, True, junk, time.monotonic_ns())
    sink.close()
    [path] = finished_files(tmp_path)
    assert junk in open(path, "rb").read()


def test_unreachable_upstream_is_a_syn_answered_by_a_reset(tmp_path):
    sink = new_sink(tmp_path)
    c = conn()
    sink.on_connection_open(c)
    sink.on_upstream_error(UpstreamConnectError(c, "refused", "connection refused", time.monotonic_ns()))
    sink.on_connection_close(c)
    sink.close()
    [path] = finished_files(tmp_path)
    from mongoproxy.replay.reader import decode_tcp

    flags = [decode_tcp(p.linktype, p.data)[6] for p in iter_packets(path, [])]
    assert flags == [0x02, 0x14]
    assert any("unreachable (refused)" in text for _, text in epb_comments(path))


def test_create_checks_the_directory_and_needs_record(tmp_path):
    ctx = SinkContext(registry=CollectorRegistry(), version="t", mode="static")
    assert capture_mod.create(config_mod.build({}, env={}), ctx) is None
    with pytest.raises(ConfigError, match="need.*--record DIR"):
        capture_mod.create(config_mod.build({"record_ns": "a.b"}, env={}), ctx)
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        capture_mod.create(config_mod.build({"record": str(afile)}, env={}), ctx)
    with pytest.raises(ConfigError, match="not a size"):
        config_mod.build({"record": str(tmp_path), "record_max_bytes": "lots"}, env={})
    cfg = config_mod.build(
        {"record": str(tmp_path / "new" / "dir"), "record_max_bytes": "10MiB", "record_ns": "a.b,c.*"}, env={}
    )
    sink = capture_mod.create(cfg, ctx)
    try:
        assert os.path.isdir(tmp_path / "new" / "dir")
        assert sink.max_bytes == 10 * 1024 * 1024 and sink.namespaces == ("a.b", "c.*")
    finally:
        sink.close()


# ---- mongoproxy.redact


ALL_TYPES = {
    "double": 1.25,
    "string": "héllo",
    "doc": {"a": 1},
    "array": [1, "x", None],
    "binary": bson.Binary(b"\x01\x02", 0),
    "uuid": bson.Binary(os.urandom(16), 4),
    "oid": ObjectId(),
    "bool": False,
    "date": datetime.datetime(2020, 1, 1),
    "null": None,
    "regex": bson.Regex("^ab+c", "i"),
    "code": bson.Code("function(){return 1}"),
    "codews": bson.Code("x", {"y": 2}),
    "int32": 7,
    "ts": bson.Timestamp(5, 6),
    "int64": bson.Int64(9),
    "dec": bson.Decimal128("1.5"),
    "min": bson.MinKey(),
    "max": bson.MaxKey(),
    "field": "$path",
}


@pytest.mark.parametrize("pseudonymise", [True, False])
def test_rewriter_keeps_every_length_and_type(pseudonymise):
    rw = redact.Rewriter(pseudonymise, key=b"k" * 32)
    msg = bytearray(op_msg(1, 0, {"find": "c", "filter": ALL_TYPES, "payload": SECRET, "$db": "d"}))
    before = bson.decode(bytes(msg[21:]))
    rw.message(msg, False, "saslstart" if not pseudonymise else "find")
    after = bson.decode(bytes(msg[21:]))
    assert list(after["filter"]) == list(before["filter"])
    for k, v in before["filter"].items():
        assert type(after["filter"][k]) is type(v), k
    if pseudonymise:
        assert after["filter"]["string"] != "héllo" and len(after["filter"]["string"].encode()) == len("héllo".encode())
        assert after["filter"]["field"] == "$path" and after["filter"]["bool"] is False
        assert after["filter"]["ts"] == before["filter"]["ts"]
        assert after["find"] == "c" and after["$db"] == "d"
    else:
        assert after["payload"] == bytes(len(SECRET)) and after["filter"] == before["filter"]


def test_rewriter_blanks_a_malformed_document_whole():
    rw = redact.Rewriter(True)
    doc = bytearray(bson.encode({"find": "c", "filter": {"name": "alice"}}))
    doc[12] = 0x42  # an unknown type byte inside
    msg = bytearray(struct.pack("<iiiiI", 21 + len(doc), 1, 0, 2013, 0) + b"\0" + doc)
    rw.message(msg, False, "find")
    assert b"alice" not in msg and len(msg) == 21 + len(doc)


def test_first_key_and_decompress():
    assert redact.first_key(op_msg(1, 0, {"saslStart": 1})) == ("saslStart", True)
    assert redact.first_key(op_msg(1, 0, {"saslStart": 1})[:27]) is None
    import zlib

    plain = op_msg(3, 0, {"find": "c", "$db": "d"})
    body = zlib.compress(plain[16:])
    comp = struct.pack("<iiii", 16 + 9 + len(body), 3, 0, 2012) + struct.pack("<iiB", 2013, len(plain) - 16, 2) + body
    assert redact.uncompressed(comp) == plain


def _finished_names(tmp_path) -> list[str]:
    return sorted(n for n in os.listdir(tmp_path) if n.endswith(".pcapng"))


def test_recordings_are_created_mode_0600(tmp_path):
    """A recording holds application data: owner-only, whatever the umask."""
    old = os.umask(0o022)
    try:
        sink = new_sink(tmp_path)
        c = conn()
        sink.on_connection_open(c)
        sink.on_data(c, True, op_msg(1, 0, {"ping": 1, "$db": "admin"}), time.monotonic_ns())
        deadline = time.monotonic() + 10
        while not os.listdir(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.01)
        [part] = os.listdir(tmp_path)
        assert oct(os.stat(tmp_path / part).st_mode & 0o777) == "0o600"
        sink.close()
    finally:
        os.umask(old)
    [path] = finished_files(tmp_path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"


def test_max_total_bytes_deletes_the_oldest_files_first(tmp_path):
    """--record-max-total-bytes: the directory stays under the cap, the newest files are kept, deletions counted."""
    registry = CollectorRegistry()
    older = tmp_path / "mongoproxy-20200101T000000.000000Z-p1-0001.pcapng"  # a previous run's file
    older.write_bytes(b"\0" * 3000)
    os.utime(older, (1_600_000_000, 1_600_000_000))
    unrelated = tmp_path / "notes.txt"
    unrelated.write_bytes(b"\0" * 5000)
    sink = new_sink(tmp_path, max_total_bytes=8000, registry=registry)
    assert sink.max_bytes == 4000  # a file is at most half of the total
    c = conn()
    sink.on_connection_open(c)
    t = time.monotonic_ns()
    for i in range(60):
        sink.on_data(c, True, op_msg(i + 1, 0, {"find": "c", "filter": {"_id": i}, "$db": "d"}), t + i)
    sink.close()
    names = _finished_names(tmp_path)
    total = sum(os.path.getsize(tmp_path / n) for n in names)
    assert total <= 8000, (names, total)
    assert not older.exists() and unrelated.exists()
    own = sorted(os.path.basename(p) for p in sink.files)
    assert len(own) >= 4 and names == own[-len(names) :]  # what is left is the newest
    deleted = registry.get_sample_value("mongoproxy_capture_files_deleted_total", {"reason": "max_total_bytes"})
    assert deleted == len(own) - len(names) + 1


def test_max_age_deletes_old_files(tmp_path):
    registry = CollectorRegistry()
    old = tmp_path / "mongoproxy-20200101T000000.000000Z-p1-0001.pcapng"
    young = tmp_path / "mongoproxy-20200101T000000.000000Z-p1-0002.pcapng"
    old_part = tmp_path / "mongoproxy-20200101T000000.000000Z-p1-0003.pcapng.part"  # maybe another writer's
    for f in (old, young, old_part):
        f.write_bytes(b"x")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    os.utime(old_part, (hour_ago, hour_ago))
    sink = new_sink(tmp_path, max_age_seconds=600, registry=registry)
    c = conn()
    sink.on_connection_open(c)
    sink.on_data(c, True, op_msg(1, 0, {"ping": 1, "$db": "admin"}), time.monotonic_ns())
    sink.close()
    assert not old.exists() and young.exists() and old_part.exists()
    assert registry.get_sample_value("mongoproxy_capture_files_deleted_total", {"reason": "max_age"}) == 1


def test_record_max_options():
    cfg = config_mod.build({"record": "/tmp/x", "record_max_total_bytes": "10GB", "record_max_age": "7d"}, env={})
    assert cfg.record_max_total_bytes == 10 * 1000**3 and cfg.record_max_age == 7 * 86400
    with pytest.raises(ConfigError, match="duration"):
        config_mod.build({"record_max_age": "soon"}, env={})


def test_a_message_left_out_is_counted_and_the_summary_says_so(tmp_path):
    """A held message that cannot be checked for secrets is left out: counted on /metrics and in the summary."""
    registry = CollectorRegistry()
    sink = new_sink(tmp_path, pseudonymise=True, registry=registry)
    c = conn()
    sink.on_connection_open(c)
    body = struct.pack("<iiB", 2013, 100, 2) + b"this is not zlib data at all"
    bad = struct.pack("<iiii", 16 + len(body), 5, 0, 2012) + body
    t = time.monotonic_ns()
    sink.on_data(c, True, op_msg(1, 0, {"ping": 1, "$db": "admin"}), t)
    sink.on_data(c, True, bad, t + 1)
    sink.on_connection_close(c)
    sink.close()
    [path] = finished_files(tmp_path)
    summary = [text for i, text in epb_comments(path) if i < 0][1]
    assert "1 message(s) were left out" in summary
    assert "No connection was dropped" not in summary
    assert registry.get_sample_value("mongoproxy_capture_messages_dropped_total") == 1
