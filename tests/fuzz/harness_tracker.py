"""Fuzz the tracker: a program of requests and replies (ids that collide, moreToCome both ways, exhaust
streams, legacy opcodes, bodies of arbitrary bytes) fed through real frame scanners into one Tracker.

Invariants checked after every step:
- Nothing raises (a tracker exception would surface as the scanner's `internal_error`).
- The pending table never exceeds max_pending; the exhaust table never exceeds 2 * max_pending.
- Requests are conserved: every request that expects a reply is pending, answered by a direct reply,
  or counted as dropped. Replies are conserved: every reply yields an event or is counted as unmatched.
- A request that expects no reply yields its event at once; no event has a negative duration.
"""

from __future__ import annotations

import functools
import struct

import atheris

from tests.fuzz.targets import CollectingSink, Connection, FrameScanner, SinkBus, Tracker
from tests.support import wire as tw

OP_MSG, OP_QUERY, OP_REPLY = 2013, 2004, 1
NO_REPLY_OPS = frozenset((2001, 2002, 2006, 2007))  # OP_UPDATE, OP_INSERT, OP_DELETE, OP_KILL_CURSORS
MORE_TO_COME, EXHAUST_ALLOWED = 1 << 1, 1 << 16
COMMANDS = ("find", "insert", "hello", "isMaster", "getMore", "aggregate", "update", "ping", "delete")
BODY_OPS = (1, 2001, 2002, 2004, 2005, 2006, 2007, 2010, 2011, 2012, 2013, 0, 4242)
MAX_STEPS = 48


class Run:
    """One tracker, its scanners, and the counts the invariants compare."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.sink = CollectingSink()
        conn = Connection(id=1, client_host="127.0.0.1", client_port=1, upstream_host="127.0.0.1", upstream_port=2)
        self.tracker = Tracker(conn, SinkBus([self.sink]), max_pending)
        self.requests = FrameScanner(False, self._on_request, self._on_error)
        self.replies = FrameScanner(True, self._on_reply, self._on_error)
        self.t = 0
        self.expecting = 0  # requests that wait for a reply
        self.no_reply = 0
        self.replies_seen = 0

    def _on_error(self, reason: str, detail: str, fatal: bool) -> None:
        if reason == "internal_error":
            raise AssertionError(f"internal_error (a tracker or scanner exception): {detail}")

    def _on_request(self, msg) -> None:
        r = msg.result
        before = len(self.sink.commands)
        self.tracker.on_request(msg)
        if (msg.opcode == OP_MSG and r is not None and r.flags & MORE_TO_COME) or msg.opcode in NO_REPLY_OPS:
            self.no_reply += 1
            assert len(self.sink.commands) == before + 1, "a request that expects no reply yielded no event"
            assert self.sink.commands[-1].more_to_come_request
        else:
            self.expecting += 1

    def _on_reply(self, msg) -> None:
        self.replies_seen += 1
        self.tracker.on_reply(msg)

    def send(self, data: bytes) -> None:
        self.t += 7
        self.requests.feed(data, self.t)

    def answer(self, data: bytes) -> None:
        self.t += 7
        self.replies.feed(data, self.t)

    def check(self) -> None:
        tr, sink = self.tracker, self.sink
        assert len(tr.pending) <= self.max_pending, f"pending {len(tr.pending)} > {self.max_pending}"
        assert len(tr.exhaust) <= 2 * self.max_pending, f"exhaust table {len(tr.exhaust)} > 2 * {self.max_pending}"
        replies = [e for e in sink.commands if not e.more_to_come_request]
        direct = sum(1 for e in replies if not e.exhaust)
        assert self.expecting == direct + sink.dropped + len(tr.pending), (
            f"requests not conserved: {self.expecting} expecting = {direct} answered + {sink.dropped} dropped"
            f" + {len(tr.pending)} pending?"
        )
        assert self.replies_seen == len(replies) + len(sink.unmatched), (
            f"replies not conserved: {self.replies_seen} != {len(replies)} events + {len(sink.unmatched)} unmatched"
        )
        assert len(sink.commands) == len(replies) + self.no_reply
        for e in sink.commands:
            assert e.duration_ns >= 0, f"negative duration {e}"


@functools.cache
def _msg(kind: str, *args: int | str | bool) -> bytes:
    """The encoded message for one choice of the program (a small finite set: cached, encoded once)."""
    if kind == "request":
        cmd, flags, rid = args
        body = {cmd: "c" if cmd != "getMore" else 1, "$db": "d"}
        if cmd == "hello":
            body.update(client={"application": {"name": "a"}, "driver": {"name": "x", "version": "1"}})
            body.update(compression=["zlib", "zstd"])
        return tw.encode_op_msg(body, flags=flags, request_id=rid)
    if kind == "ismaster":
        return tw.encode_op_query({"isMaster": 1}, request_id=args[0])
    if kind == "query":
        flags, rid = args
        return tw.encode_op_query({"a": 1}, full_collection_name="d.c", flags=flags, request_id=rid)
    if kind == "insert":
        return tw.encode_op_insert("d.c", [{"a": 1}], request_id=args[0])
    if kind == "reply":
        body_kind, cursor, flags, rid, to = args
        return tw.encode_op_msg(_reply_body(body_kind, cursor), flags=flags, request_id=rid, response_to=to)
    cursor, flags, rid, to = args  # "op_reply"
    return tw.encode_op_reply([{"ok": 1}], response_to=to, cursor_id=cursor, flags=flags, request_id=rid)


def _reply_body(k: int, cursor: int) -> dict:
    if k == 0:
        return {"cursor": {"id": cursor, "ns": "d.c", "firstBatch": [{}]}, "ok": 1.0}
    if k == 1:
        return {"ok": 0.0, "code": 11000, "codeName": "DuplicateKey", "errmsg": "dup"}
    if k == 2:
        return {"isWritablePrimary": True, "setName": "rs", "maxWireVersion": 21, "compression": ["zlib"], "ok": 1}
    if k == 3:
        return {"n": 2, "nModified": 1, "upserted": [{"_id": 1}], "ok": 1}
    return {"ok": 1}


def step(run: Run, fdp: atheris.FuzzedDataProvider) -> None:
    """One request or reply, chosen by the input."""
    kind = fdp.ConsumeIntInRange(0, 9)
    rid = fdp.ConsumeIntInRange(0, 15)
    if kind <= 2:  # OP_MSG request
        cmd = COMMANDS[fdp.ConsumeIntInRange(0, len(COMMANDS) - 1)]
        flags = (0, MORE_TO_COME, EXHAUST_ALLOWED)[fdp.ConsumeIntInRange(0, 2)]
        run.send(_msg("request", cmd, flags, rid))
    elif kind == 3:  # OP_QUERY: a command, or a legacy query that may ask for exhaust
        if fdp.ConsumeBool():
            run.send(_msg("ismaster", rid))
        else:
            run.send(_msg("query", (1 << 6) if fdp.ConsumeBool() else 0, rid))
    elif kind == 4:  # legacy fire-and-forget
        run.send(_msg("insert", rid))
    elif kind <= 7:  # OP_MSG reply
        to = fdp.ConsumeIntInRange(0, 15)
        flags = MORE_TO_COME if fdp.ConsumeBool() else 0
        body_kind = fdp.ConsumeIntInRange(0, 4)
        cursor = fdp.ConsumeIntInRange(0, 3) if body_kind == 0 else 0
        run.answer(_msg("reply", body_kind, cursor, flags, rid, to))
    elif kind == 8:  # OP_REPLY, maybe with an open cursor (a legacy exhaust stream) or QueryFailure
        to = fdp.ConsumeIntInRange(0, 15)
        cursor = fdp.ConsumeIntInRange(0, 2)
        flags = (1 << 1) if fdp.ConsumeBool() else 8
        run.answer(_msg("op_reply", cursor, flags, rid, to))
    else:  # a well-framed message with an arbitrary opcode and body, either way
        op = BODY_OPS[fdp.ConsumeIntInRange(0, len(BODY_OPS) - 1)]
        to = fdp.ConsumeIntInRange(0, 15)
        body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))
        raw = struct.pack("<iiii", 16 + len(body), rid, to, op) + body
        (run.answer if fdp.ConsumeBool() else run.send)(raw)


def test_one_input(data: bytes) -> None:
    """One fuzz input: see the module docstring."""
    fdp = atheris.FuzzedDataProvider(data)
    run = Run(fdp.ConsumeIntInRange(1, 6))
    for _ in range(MAX_STEPS):
        if fdp.remaining_bytes() == 0:
            break
        step(run, fdp)
        run.check()
