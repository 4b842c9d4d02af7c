"""Replay's target against a scripted server that sees every command: pinned connections, lsid remapping,
the denylist of destructive admin commands and the socket timeout."""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid

import bson
from bson.binary import Binary

from mongoproxy.replay import add_parser
from mongoproxy.replay.extract import iter_ops
from mongoproxy.replay.filters import Filters, StreamFilter
from mongoproxy.replay.model import Stream
from mongoproxy.replay.report import Tally
from mongoproxy.replay.runner import Replayer
from mongoproxy.replay.target import Target
from tests.support.proxy import run_proxy_cli
from tests.support.scripted_server import MongoHandler
from tests.unit.test_replay_reader import T0, Capture, op_msg, reply, write_pcap_exact

LSID_X = uuid.UUID(int=1).bytes
LSID_Y = uuid.UUID(int=2).bytes


def insert(rid: int, _id: str, lsid: bytes | None, txn: int | None = None) -> bytes:
    doc: dict = {"insert": "items", "documents": [{"_id": _id}], "$db": "shop"}
    if lsid is not None:
        doc["lsid"] = {"id": Binary(lsid, 4)}
    if txn is not None:
        doc["txnNumber"] = bson.Int64(txn)
    return op_msg(rid, 0, doc)


def recorded_connection(port: int, requests: list[tuple[int, bytes]]) -> Capture:
    """A recorded connection sending each request at T0 + its offset in ms, each answered at once."""
    c = Capture(client=("10.0.0.1", port))
    c.t = T0 + requests[0][0] * 1_000_000 - 5_000_000
    c.handshake()
    for at_ms, m in requests:
        c.t = T0 + at_ms * 1_000_000
        rid = int.from_bytes(m[4:8], "little")
        c.send(True, m)
        c.send(False, reply(rid, {"n": 1, "ok": 1.0}))
    c.close()
    return c


class Recorder(MongoHandler):
    """Answers inserts and finds, and notes (server connection, command document, documents) for each."""

    def __init__(self) -> None:
        self.received: list[tuple[int, dict, list | None]] = []
        super().__init__(commands={"insert": self.note, "find": self.note})

    def note(self, request, conn) -> dict:
        docs = request.msg.sequence("documents") if request.command_name == "insert" else None
        self.received.append((conn.index, request.doc, docs))
        return {"n": 1, "ok": 1.0}


def replay_into(tmp_path, server, connections: list[Capture], speed: float | None = 1.0) -> Replayer:
    frames = sorted(f for c in connections for f in c.frames)
    path = write_pcap_exact(tmp_path / "rec.pcap", frames)
    stream = Stream([])
    tally = Tally(stream, Filters(), server.uri, speed)
    target = Target(server.uri, connect_timeout=5.0, retries=2)
    try:
        target.wait_ready()
        replayer = Replayer(iter_ops([path], stream), target, speed, tally, StreamFilter(Filters(), []))
        replayer.run()
    finally:
        target.close()
    return replayer


def test_each_recorded_connection_is_pinned_and_each_lsid_maps_to_one_fresh_session(tmp_path, scripted_server):
    handler = Recorder()
    server = scripted_server(handler)
    # A and B are open at the same time. A uses session X; B uses session Y, then X once A is done with it,
    # as a driver's session pool does.
    find = op_msg(2, 0, {"find": "items", "filter": {}, "comment": "a-find", "$db": "shop"})
    a = recorded_connection(40000, [(10, insert(1, "a1", LSID_X, 1)), (100, find), (600, insert(3, "a2", LSID_X, 2))])
    b = recorded_connection(
        40001, [(200, insert(1, "b1", LSID_Y, 1)), (300, insert(2, "b2", LSID_Y, 2)), (800, insert(3, "b3", LSID_X, 3))]
    )
    replayer = replay_into(tmp_path, server, [a, b])
    assert replayer.errors == 0 and len(replayer.sessions[0]) == 2

    by_id = {}
    for conn_index, doc, docs in handler.received:
        key = docs[0]["_id"] if docs else doc["comment"]
        by_id[key] = (conn_index, bytes(doc["lsid"]["id"]), doc.get("txnNumber"))
    assert sorted(by_id) == ["a-find", "a1", "a2", "b1", "b2", "b3"]
    # Pinned: each recorded connection's commands share one server connection, and the two differ.
    assert by_id["a1"][0] == by_id["a2"][0] == by_id["a-find"][0]
    assert by_id["b1"][0] == by_id["b2"][0] != by_id["a1"][0]
    # Each recorded lsid maps to one fresh id, the same on every command that carried it; txnNumber is kept.
    x, y = by_id["a1"][1], by_id["b1"][1]
    assert len({x, y, LSID_X, LSID_Y}) == 4
    assert by_id["a2"][1] == by_id["b3"][1] == x and by_id["b2"][1] == y
    assert [by_id[k][2] for k in ("a1", "a2", "b3", "b1", "b2")] == [1, 2, 3, 1, 2]
    # pymongo binds a session to one client: B's command on session X runs on the connection that owns X.
    assert by_id["b3"][0] == by_id["a1"][0]


def admin(rid: int, name: str, db: str = "admin", **fields) -> bytes:
    return op_msg(rid, 0, {name: 1, **fields, "$db": db})


def destructive_recording(tmp_path) -> str:
    """An insert among destructive admin commands, on one recorded connection."""
    requests = [
        admin(1, "dropDatabase", db="shop"),
        op_msg(2, 0, {"dropUser": "ann", "$db": "shop"}),
        admin(3, "replSetReconfig", config={"_id": "rs"}),
        insert(4, "kept", None),
        admin(5, "shutdown", force=True),
    ]
    c = recorded_connection(40000, [(10 + 10 * i, m) for i, m in enumerate(requests)])
    return write_pcap_exact(tmp_path / "destructive.pcap", c.frames)


def test_destructive_admin_commands_are_not_replayed_unless_allowed(tmp_path, scripted_server):
    path = destructive_recording(tmp_path)
    handler = Recorder()
    server = scripted_server(handler)
    done = run_proxy_cli(["replay", path, "--target", server.uri, "--max-speed", "--report", tmp_path / "r.json"])
    assert done.returncode == 0, done.stderr
    sent = {name for name, n in handler.seen.items() if n and name not in ("hello", "ismaster", "ping", "endsessions")}
    assert sent == {"insert"}
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["skipped"]["destructive"] == 4
    assert report["not_sent_destructive"] == {"dropDatabase": 1, "dropUser": 1, "replSetReconfig": 1, "shutdown": 1}
    line = next(x for x in done.stdout.splitlines() if x.startswith("not replayed:"))
    assert "destructive 4 (dropDatabase, dropUser, replSetReconfig, shutdown: --allow-destructive sends them)" in line

    allowed = run_proxy_cli(["replay", path, "--target", server.uri, "--max-speed", "--allow-destructive"])
    assert allowed.returncode == 0, allowed.stderr
    assert {"dropdatabase", "dropuser", "replsetreconfig", "shutdown"} <= set(handler.seen)
    assert "destructive" not in allowed.stdout


def test_only_destructive_commands_is_nothing_to_replay_with_the_reason(tmp_path):
    c = recorded_connection(40000, [(10, admin(1, "dropDatabase", db="shop"))])
    path = write_pcap_exact(tmp_path / "drop.pcap", c.frames)
    done = run_proxy_cli(["replay", path, "--dry-run"])
    assert done.returncode == 2
    assert "1 destructive admin command (dropDatabase) not sent without --allow-destructive" in done.stderr


def test_a_reply_slower_than_the_socket_timeout_is_a_timeout_error(tmp_path, scripted_server):
    async def slow(request, conn) -> dict:
        await asyncio.sleep(5)
        return {"n": 1, "ok": 1.0}

    server = scripted_server(MongoHandler(commands={"insert": slow}))
    c = recorded_connection(40000, [(10, insert(1, "slow", None))])
    path = write_pcap_exact(tmp_path / "slow.pcap", c.frames)
    args = ["replay", path, "--target", server.uri, "--max-speed", "--socket-timeout", "0.5", "--report"]
    done = run_proxy_cli([*args, tmp_path / "r.json"])
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["replayed"]["errors"] == 1
    assert [e["error"] for e in report["new_errors"]] == ["NetworkTimeout"]


def test_the_socket_timeout_has_a_default_and_zero_means_none():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    assert parser.parse_args(["replay", "f", "--target", "mongodb://h"]).socket_timeout == 60.0
    assert Target("mongodb://h", socket_timeout=60.0).options["socketTimeoutMS"] == 60_000
    assert Target("mongodb://h", socket_timeout=0).options["socketTimeoutMS"] is None
    bad = run_proxy_cli(["replay", "f", "--target", "mongodb://h", "--socket-timeout", "-1"])
    assert bad.returncode == 2 and "--socket-timeout" in bad.stderr
