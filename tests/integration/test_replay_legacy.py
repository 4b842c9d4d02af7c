"""Old captures replay on current servers: scripted legacy clients recorded through the proxy, replayed into SecantusDB.

Each legacy client speaks one way (plain, or every request compressed with snappy, zlib or zstd): OP_COMMAND
insert/count/update, commands in OP_QUERY on $cmd, legacy OP_INSERT/OP_UPDATE/OP_DELETE, a find in OP_QUERY on a
collection and its OP_GET_MORE, and one closed by OP_KILL_CURSORS. The recorded server is scripted (it answers as a 3.x server would, keeping no
data); what its collections would hold is built with the equivalent modern commands on a reference SecantusDB.
"""

from __future__ import annotations

import json
import socket
import struct

import pymongo

from tests.support import wire
from tests.support.proxy import run_proxy_cli, run_proxy_process
from tests.support.secantus import SecantusServer

DB = "legacy"
COMPRESSORS = (None, "snappy", "zlib", "zstd")


async def legacy_server(conn) -> None:
    """A 3.x-era server: OP_REPLY to OP_QUERY/OP_GET_MORE, OP_COMMANDREPLY to OP_COMMAND, nothing to legacy writes."""
    while True:
        m = await conn.read_message()
        if m is None:
            return
        rto = m.request_id
        if m.opcode == wire.OP_QUERY:
            q = m.query
            if q.full_collection_name.endswith(".$cmd"):
                doc = {"ismaster": True, "maxWireVersion": 4, "minWireVersion": 0, "ok": 1.0}
                if next(iter(q.query)).lower() not in ("ismaster", "hello"):
                    doc = {"n": 1, "ok": 1.0}
                await conn.send_and_drain(wire.encode_op_reply([doc], response_to=rto))
            else:
                docs = [{"_id": 1}, {"_id": 2}]
                await conn.send_and_drain(wire.encode_op_reply(docs, response_to=rto, cursor_id=4242))
        elif m.opcode == wire.OP_GET_MORE:
            await conn.send_and_drain(wire.encode_op_reply([{"_id": 9}], response_to=rto, cursor_id=0))
        elif m.opcode == wire.OP_COMMAND:
            await conn.send_and_drain(wire.encode_op_commandreply({}, {"n": 1, "ok": 1.0}, response_to=rto))


class LegacyClient:
    """A blocking socket that sends raw legacy messages, compressed or not, and reads replies when one is due."""

    def __init__(self, address: tuple[str, int], compressor: str | None) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.compressor = compressor

    def send(self, raw: bytes, reply: bool) -> bytes | None:
        if self.compressor:
            raw = wire.compress_message(raw, self.compressor)
        self.sock.sendall(raw)
        if not reply:
            return None
        head = self._exactly(16)
        return head + self._exactly(struct.unpack("<i", head[:4])[0] - 16)

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "the proxy closed the connection"
            out += chunk
        return out

    def close(self) -> None:
        self.sock.close()


def legacy_session(c: LegacyClient, tag: str) -> None:
    """The requests of one legacy client; collections are suffixed with `tag` so the variants do not mix."""
    cmd, q, w = f"cmd_{tag}", f"q_{tag}", f"w_{tag}"
    c.send(wire.encode_op_query({"isMaster": 1}, full_collection_name="admin.$cmd"), True)
    c.send(
        wire.encode_op_command(DB, "insert", {}, {"insert": cmd, "documents": [{"_id": 1, "a": 1}, {"_id": 2}]}), True
    )
    c.send(wire.encode_op_command(DB, "count", {}, {"count": cmd}), True)
    upd = {"update": cmd, "updates": [{"q": {"_id": 1}, "u": {"$set": {"a": 10}}}]}
    c.send(wire.encode_op_command(DB, "update", {}, upd), True)
    c.send(
        wire.encode_op_query({"insert": q, "documents": [{"_id": 1, "b": 1}]}, full_collection_name=f"{DB}.$cmd"), True
    )
    dele = {"delete": cmd, "deletes": [{"q": {"_id": 2}, "limit": 1}]}
    c.send(wire.encode_op_query({"$query": dele}, full_collection_name=f"{DB}.$cmd"), True)
    ns = f"{DB}.{w}"
    c.send(wire.encode_op_insert(ns, [{"_id": i, "v": i} for i in range(1, 6)]), False)
    c.send(wire.encode_op_query({"getLastError": 1}, full_collection_name=f"{DB}.$cmd"), True)
    c.send(wire.encode_op_update(ns, {"_id": 1}, {"$set": {"v": 10}}), False)
    c.send(wire.encode_op_update(ns, {"v": {"$gte": 3}}, {"$inc": {"v": 100}}, flags=2), False)  # multi
    c.send(wire.encode_op_update(ns, {"_id": 9}, {"$set": {"v": 9}}, flags=1), False)  # upsert
    c.send(wire.encode_op_delete(ns, {"_id": 2}, flags=1), False)  # single remove
    c.send(
        wire.encode_op_query({"$query": {}, "$orderby": {"_id": 1}}, full_collection_name=ns, number_to_return=2), True
    )
    c.send(wire.encode_op_get_more(ns, 4242, number_to_return=2), True)
    # A second cursor, closed by OP_KILL_CURSORS before its end (no reply on the wire).
    c.send(
        wire.encode_op_query({"$query": {}, "$orderby": {"_id": 1}}, full_collection_name=ns, number_to_return=2), True
    )
    c.send(wire.encode_op_kill_cursors([4242]), False)


def expected_state(client: pymongo.MongoClient, tag: str) -> None:
    """What the recorded server's collections would hold: the same requests as modern commands."""
    db = client[DB]
    db[f"cmd_{tag}"].insert_many([{"_id": 1, "a": 1}, {"_id": 2}])
    db[f"cmd_{tag}"].update_one({"_id": 1}, {"$set": {"a": 10}})
    db[f"q_{tag}"].insert_one({"_id": 1, "b": 1})
    db[f"cmd_{tag}"].delete_one({"_id": 2})
    w = db[f"w_{tag}"]
    w.insert_many([{"_id": i, "v": i} for i in range(1, 6)])
    w.update_one({"_id": 1}, {"$set": {"v": 10}})
    w.update_many({"v": {"$gte": 3}}, {"$inc": {"v": 100}})
    w.update_one({"_id": 9}, {"$set": {"v": 9}}, upsert=True)
    w.delete_one({"_id": 2})


def snapshot(client: pymongo.MongoClient) -> dict:
    db = client[DB]
    return {name: list(db[name].find().sort("_id", 1)) for name in sorted(db.list_collection_names())}


def test_legacy_capture_replays_into_a_current_server(tmp_path, scripted_server):
    server = scripted_server(legacy_server)
    rec = tmp_path / "rec"
    rec.mkdir()
    with run_proxy_process(["--record", str(rec)], upstream=server.address) as proxy:
        for comp in COMPRESSORS:
            c = LegacyClient(proxy.address, comp)
            try:
                legacy_session(c, comp or "plain")
            finally:
                c.close()
    with SecantusServer() as target, SecantusServer() as reference:
        report_path = tmp_path / "r.json"
        done = run_proxy_cli(["replay", str(rec), "--target", target.uri, "--max-speed", "--report", str(report_path)])
        print(done.stdout)
        assert done.returncode == 0, done.stderr
        with reference.client() as ref:
            for comp in COMPRESSORS:
                expected_state(ref, comp or "plain")
            want = snapshot(ref)
        with target.client() as t:
            assert snapshot(t) == want
    report = json.loads(report_path.read_text())
    conv = report["conversions"]
    for comp in COMPRESSORS:
        prefix = f"OP_COMPRESSED({comp}) " if comp else ""
        for name in (
            "OP_COMMAND -> insert",
            "OP_COMMAND -> count",
            "OP_COMMAND -> update",
            "OP_QUERY $cmd -> insert",
            "OP_QUERY $cmd -> delete",
            "OP_INSERT -> insert",
            "OP_UPDATE -> update",
            "OP_DELETE -> delete",
            "OP_QUERY -> find",
            "OP_GET_MORE -> getMore",
            "OP_KILL_CURSORS -> killCursors",
        ):
            want = {"OP_UPDATE -> update": 3, "OP_QUERY -> find": 2}.get(name, 1)
            assert conv.get(prefix + name) == want, (prefix + name, conv)
    assert report["skipped"]["getLastError (the converted write is acknowledged itself)"] == 4
    assert "legacy requests converted: " in done.stdout
    assert report["replayed"]["errors"] == 0 and report["new_errors"] == []
    # Every killCursors reached the target with the target's own cursor id (none skipped for want of a cursor).
    assert not any("cursor" in reason for reason in report["skipped"]), report["skipped"]
