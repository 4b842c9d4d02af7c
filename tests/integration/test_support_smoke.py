"""The test support pieces work: SecantusDB fixture, scripted server with pymongo, the oracle wire codec."""

from __future__ import annotations

import asyncio
import socket
import struct
import zlib

import bson
import pymongo
import pytest
from bson import Int64, ObjectId

from tests.support import wire
from tests.support.ports import free_port, free_port6, wait_for_port
from tests.support.proxy import PORT, prepare_args
from tests.support.scripted_server import MongoHandler, ScriptedServer, canned_document
from tests.support.system import require_ipv6_loopback, unavailable

COMPRESSORS = ["noop", "snappy", "zlib", "zstd"]


# ---------------------------------------------------------------- SecantusDB


def test_secantus_answers_ping_insert_and_id_find(secantus_client, db_name):
    assert secantus_client.admin.command("ping")["ok"] == 1
    coll = secantus_client[db_name].items
    oid = ObjectId()
    coll.insert_one({"_id": oid, "n": 7})
    assert coll.find_one({"_id": oid}) == {"_id": oid, "n": 7}
    assert coll.find_one({"_id": ObjectId()}) is None


def test_db_name_is_unique_per_test(db_name, secantus_client):
    assert db_name not in secantus_client.list_database_names()
    assert len(db_name.encode()) < 64 and not set(db_name) & set('/\\. "$*<>:|?')


# ---------------------------------------------------------------- scripted server


@pytest.mark.parametrize("compressor", [None, "zlib", "snappy"])
def test_scripted_server_speaks_to_pymongo(scripted_server, loop_kind, compressor):
    handler = MongoHandler(reply_size=300, compressors=("zlib", "snappy", "zstd"))
    srv = scripted_server(handler, loop_kind=loop_kind)
    kwargs = {"compressors": compressor} if compressor else {}
    with pymongo.MongoClient(srv.uri, serverSelectionTimeoutMS=5000, **kwargs) as client:
        assert client.admin.command("ping") == {"ok": 1.0}
        docs = list(client.bench.c.find({}))
    assert len(docs) == 1 and len(bson.encode(docs[0])) == 300
    assert handler.seen["ping"] == 1 and handler.seen["find"] == 1
    assert handler.seen["ismaster"] + handler.seen["hello"] >= 1
    if compressor:
        assert [compressor] in handler.negotiated
        assert handler.request_compressors[compressor] >= 2  # ping and find travelled compressed
    else:
        assert handler.request_compressors[None] == sum(handler.request_compressors.values())


def test_scripted_server_reset_close_delay_and_exhaust(scripted_server):
    async def handler(conn):
        request = await conn.read_message()
        if request.doc.get("mode") == "reset":
            conn.reset()
        elif request.doc.get("mode") == "exhaust":
            await conn.stream_exhaust(request, [{"i": i, "ok": 1} for i in range(3)], delay=0.01)
        elif request.doc.get("mode") == "close":
            await conn.sleep(0.05)
            await conn.close()

    srv = scripted_server(handler)

    with socket.create_connection(srv.address, timeout=5) as s:
        req = wire.encode_op_msg({"x": 1, "mode": "exhaust", "$db": "a"}, flags=wire.EXHAUST_ALLOWED)
        s.sendall(req)
        replies = [wire.decode_message(wire.recv_message(s)) for _ in range(3)]
        assert [r.doc["i"] for r in replies] == [0, 1, 2]
        assert [r.more_to_come for r in replies] == [True, True, False]
        want_rto = [struct.unpack_from("<i", req, 4)[0], replies[0].request_id, replies[1].request_id]
        assert [r.response_to for r in replies] == want_rto
        assert wire.recv_message(s) is None  # handler returned: connection closed at a boundary

    with socket.create_connection(srv.address, timeout=5) as s:
        s.sendall(wire.encode_op_msg({"x": 1, "mode": "close", "$db": "a"}))
        assert s.recv(1) == b""

    with socket.create_connection(srv.address, timeout=5) as s:
        s.sendall(wire.encode_op_msg({"x": 1, "mode": "reset", "$db": "a"}))
        with pytest.raises(ConnectionResetError):
            s.recv(1)
    assert srv.accepted == 3


def test_scripted_server_handler_errors_fail_stop():
    async def handler(conn):
        await conn.read_message()
        raise ValueError("boom")

    srv = ScriptedServer(handler).start()
    with socket.create_connection(srv.address, timeout=5) as s:
        s.sendall(wire.encode_op_msg({"ping": 1, "$db": "a"}))
        assert s.recv(1) == b""
    with pytest.raises(AssertionError, match="boom"):
        srv.stop()


def test_scripted_server_on_callers_loop(arun):
    async def main():
        handler = MongoHandler()
        srv = ScriptedServer(handler)
        async with srv.serving():
            reader, writer = await asyncio.open_connection(*srv.address)
            writer.write(wire.encode_op_query({"isMaster": 1, "compression": ["zlib"]}))
            reply = wire.decode_message(await wire.read_message(reader))
            writer.close()
            await writer.wait_closed()
        return reply

    reply = arun(main())
    assert reply.opcode == wire.OP_REPLY
    assert reply.doc["ismaster"] is True and reply.doc["maxWireVersion"] >= 21
    assert reply.doc["compression"] == []


def test_scripted_server_ipv6(scripted_server):
    require_ipv6_loopback()
    srv = scripted_server(MongoHandler(), host="::1")
    with pymongo.MongoClient(srv.uri, serverSelectionTimeoutMS=5000) as client:
        assert client.admin.command("ping")["ok"] == 1


def test_ports_helpers():
    port = free_port()
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", port, timeout=0.2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        wait_for_port("127.0.0.1", port, timeout=5)
    try:
        assert free_port6() > 0
    except OSError:
        unavailable("IPv6 loopback unavailable")


def test_run_proxy_process_forwards_and_drains(scripted_server):
    import signal

    from tests.support.proxy import run_proxy_process

    handler = MongoHandler()
    srv = scripted_server(handler)
    with run_proxy_process(upstream=srv.address) as proxy:
        assert proxy.admin_get("/healthz")[0] == 200
        with proxy.client() as client:
            assert client.admin.command("ping") == {"ok": 1.0}
        assert handler.seen["ping"] == 1
        assert "mongoproxy_info" in proxy.metrics_text()
        assert proxy.metric("mongoproxy_info") == 1.0
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(30) == 0
    assert srv.accepted >= 1


def test_run_proxy_process_reports_early_exit():
    from tests.support.proxy import run_proxy_process

    with pytest.raises(AssertionError, match="exited with 2 before /readyz") as info:
        with run_proxy_process(["--proxy", "not-a-spec"]):
            pass
    assert "stderr:" in str(info.value)


def test_prepare_args_fills_ports():
    args = prepare_args(["--proxy", f"{PORT}:db:1", "--proxy", f"{PORT}:db:2"])
    assert args[0] == "--proxy" and args[4] == "--admin-port"
    p1, p2 = (int(a.split(":")[0]) for a in (args[1], args[3]))
    assert p1 != p2 and int(args[5]) not in (p1, p2)
    assert prepare_args([], upstream=("::1", 27017))[1].endswith(":[::1]:27017")
    assert "--admin-port" not in prepare_args(["--admin-port", "1234"])[2:]


# ---------------------------------------------------------------- wire codec vs pymongo's bson


def test_crc32c_known_values():
    assert wire.crc32c(b"") == 0
    assert wire.crc32c(b"123456789") == 0xE3069283
    assert wire.crc32c(b"56789", wire.crc32c(b"1234")) == 0xE3069283


def test_op_msg_roundtrip_with_sequences_and_checksum():
    body = {"insert": "c", "ordered": True, "$db": "d", "lsid": {"id": bson.Binary(b"\x01" * 16, 4)}}
    docs = [{"_id": i, "v": "x" * i} for i in range(5)]
    for checksum in (False, True):
        raw = wire.encode_op_msg(
            body,
            sequences=[("documents", docs)],
            checksum=checksum,
            request_id=42,
            response_to=7,
            flags=wire.EXHAUST_ALLOWED,
        )
        assert struct.unpack_from("<iiii", raw) == (len(raw), 42, 7, wire.OP_MSG)
        m = wire.decode_message(raw)
        assert (m.request_id, m.response_to, m.opcode, m.compressor) == (42, 7, wire.OP_MSG, None)
        assert m.msg.body == bson.decode(bson.encode(body)) and m.command_name == "insert"
        assert m.msg.sequence("documents") == docs
        assert m.msg.exhaust_allowed and not m.more_to_come
        assert (m.msg.checksum is not None) == checksum
        # Layout check independent of the decoder: kind 0 sits right after flagBits.
        assert raw[20] == 0 and raw[21 : 21 + len(bson.encode(body))] == bson.encode(body)
    corrupt = bytearray(wire.encode_op_msg({"ping": 1}, checksum=True))
    corrupt[-6] ^= 0xFF
    with pytest.raises(wire.WireFormatError, match="checksum"):
        wire.decode_message(bytes(corrupt))


def test_op_query_and_op_reply_roundtrip():
    q = {"isMaster": 1, "client": {"driver": {"name": "x", "version": "1"}}, "compression": ["zstd"]}
    raw = wire.encode_op_query(q, full_collection_name="admin.$cmd", fields={"a": 1}, request_id=9)
    m = wire.decode_message(raw)
    assert (m.opcode, m.request_id, m.command_name) == (wire.OP_QUERY, 9, "isMaster")
    assert m.query.query == q and m.query.fields == {"a": 1} and m.query.database == "admin"
    assert m.query.number_to_return == -1

    docs = [{"ismaster": True, "ok": 1.0}, {"n": Int64(2)}]
    raw = wire.encode_op_reply(docs, response_to=9, cursor_id=77, starting_from=3)
    r = wire.decode_message(raw)
    assert (r.opcode, r.response_to) == (wire.OP_REPLY, 9)
    assert (r.reply.cursor_id, r.reply.starting_from, r.reply.number_returned) == (77, 3, 2)
    assert r.reply.documents == docs and r.doc == docs[0]


def test_legacy_opcodes_roundtrip():
    cases = [
        (wire.encode_op_insert("d.c", [{"a": 1}, {"b": 2}], flags=1), {"documents": [{"a": 1}, {"b": 2}]}),
        (wire.encode_op_update("d.c", {"a": 1}, {"$set": {"b": 2}}), {"update": {"$set": {"b": 2}}}),
        (wire.encode_op_delete("d.c", {"a": 1}, flags=1), {"selector": {"a": 1}, "flags": 1}),
        (wire.encode_op_get_more("d.c", 2**40, number_to_return=5), {"cursor_id": 2**40}),
        (wire.encode_op_kill_cursors([1, 2, 3]), {"cursor_ids": [1, 2, 3]}),
        (wire.encode_op_command("d", "ping", {}, {"ping": 1}, [{"x": 1}]), {"command_name": "ping"}),
        (wire.encode_op_commandreply({}, {"ok": 1}, [], response_to=3), {"command_reply": {"ok": 1}}),
    ]
    for raw, expect in cases:
        m = wire.decode_message(raw)
        assert m.legacy is not None and m.opcode == struct.unpack_from("<i", raw, 12)[0]
        for k, v in expect.items():
            assert m.legacy.fields[k] == v


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_op_compressed_roundtrip(compressor):
    big = {"find": "c", "filter": {"s": "abc" * 5000}, "$db": "d"}
    for original in (
        wire.encode_op_msg(big, request_id=5, response_to=1),
        wire.encode_op_query({"isMaster": 1}, request_id=6),
        wire.encode_op_reply([{"ok": 1.0}], response_to=6, request_id=7),
    ):
        packed = wire.compress_message(original, compressor)
        length, rid, rto, op = struct.unpack_from("<iiii", packed)
        assert (length, op) == (len(packed), wire.OP_COMPRESSED)
        assert (rid, rto) == struct.unpack_from("<ii", original, 4)
        orig_op, size, cid = struct.unpack_from("<iiB", packed, 16)
        assert (orig_op, size, cid) == (
            struct.unpack_from("<i", original, 12)[0],
            len(original) - 16,
            wire.COMPRESSOR_IDS[compressor],
        )
        assert wire.decompress_message(packed) == original
        m = wire.decode_message(packed)
        assert m.compressor == compressor and m.payload == original[16:] and m.raw == packed
    if compressor == "zlib":
        assert zlib.decompress(packed[25:]) == original[16:]  # independent of our decompressor


def test_malformed_messages_raise_wire_format_error():
    good = wire.encode_op_msg({"ping": 1, "$db": "a"})
    bad = [
        good[:-1],  # length mismatch
        struct.pack("<i", len(good)) + good[4:12] + struct.pack("<i", 9999) + good[16:],  # unknown opcode
        good[:20] + b"\x02" + good[21:],  # unknown section kind
        good[:16] + b"\x00\x00\x00\x00",  # no kind-0 section (length fixed below)
    ]
    bad[-1] = struct.pack("<i", 20) + bad[-1][4:]
    for raw in bad:
        with pytest.raises(wire.WireFormatError):
            wire.decode_message(raw)
    with pytest.raises(wire.WireFormatError):
        wire.message_length(struct.pack("<i", 15))


def test_split_and_stream_readers(arun):
    msgs = [wire.encode_op_msg({"ping": i, "$db": "a"}) for i in range(4)]
    stream = b"".join(msgs)
    assert wire.split_messages(stream[:-3]) == (msgs[:3], msgs[3][:-3])

    async def read_all():
        reader = asyncio.StreamReader()
        for i in range(0, len(stream), 7):
            reader.feed_data(stream[i : i + 7])
        reader.feed_eof()
        out = []
        while (m := await wire.read_message(reader)) is not None:
            out.append(m)
        return out

    assert arun(read_all()) == msgs

    a, b = socket.socketpair()
    with a, b:
        a.sendall(stream[:-1])
        a.shutdown(socket.SHUT_WR)
        assert [wire.recv_message(b) for _ in range(3)] == msgs[:3]
        with pytest.raises(EOFError):
            wire.recv_message(b)


def test_canned_document_has_exact_size():
    for size in (32, 100, 4 * 1024 * 1024):
        assert len(canned_document(size)) == size


# ---------------------------------------------------------------- system requirements


def test_require_tool_skips_or_fails_by_env(monkeypatch):
    from tests.support.system import require_tool

    monkeypatch.delenv("MONGOPROXY_REQUIRE_SYSTEM", raising=False)
    assert require_tool("sh").endswith("/sh")
    with pytest.raises(pytest.skip.Exception, match="apt-get install tshark"):
        monkeypatch.setenv("PATH", "/nonexistent")
        require_tool("tshark-not-here", reason="tshark not found: apt-get install tshark")
    monkeypatch.setenv("MONGOPROXY_REQUIRE_SYSTEM", "1")
    with pytest.raises(pytest.fail.Exception, match="MONGOPROXY_REQUIRE_SYSTEM=1"):
        require_tool("no-such-tool-anywhere")


@pytest.mark.system
def test_node_modules_mongosh_runs():
    import subprocess

    from tests.support.system import require_node_modules

    mods = require_node_modules()
    out = subprocess.run(
        [mods.mongosh, "--nodb", "--quiet", "--eval", "print(6 * 7)"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr
    out = subprocess.run(
        [mods.node, "-e", "console.log(typeof require('mongodb').MongoClient)"],
        capture_output=True,
        text=True,
        timeout=60,
        env=mods.env(),
        cwd="/",
    )
    assert out.stdout.strip() == "function", out.stderr
