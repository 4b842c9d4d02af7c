"""Per-connection request/reply matching: Messages in, CommandEvents out.

Replies are matched to requests by responseTo. Invariants:
- A request flagged moreToCome (or a legacy fire-and-forget opcode) yields
  its event at once, with no reply.
- An exhaust stream (reply flagged moreToCome) stays matchable both by the
  original request id and by the previous reply's request id, since servers
  differ (the spec says the latter, some servers send the former); it is
  forgotten when a reply without moreToCome ends it.
- At most `max_pending` requests wait for replies; the oldest are dropped
  and counted past that. The exhaust table holds at most 2 * max_pending
  keys (two per stream); the oldest are forgotten past that.
"""

from __future__ import annotations

from typing import Any

from mongoproxy.events import CommandEvent, Connection, SinkBus
from mongoproxy.protocol import opcodes
from mongoproxy.protocol.commands import is_hello
from mongoproxy.protocol.framing import Message

# Commands whose first value, when a string, names a collection. Others
# (usersInfo: "name", getLog: "global", ...) would leak non-collection values.
COLLECTION_COMMANDS = frozenset(
    """
    find insert update delete aggregate count distinct findAndModify findandmodify getMore create drop
    createIndexes dropIndexes listIndexes collMod killCursors mapReduce validate compact collStats reIndex
    geoNear geoSearch planCacheClear planCacheClearFilters planCacheListFilters planCacheSetFilter analyze
    createSearchIndexes dropSearchIndex updateSearchIndex listSearchIndexes cleanupOrphaned
    """.split()
)

LEGACY_OPS = {
    opcodes.OP_INSERT: "op_insert",
    opcodes.OP_UPDATE: "op_update",
    opcodes.OP_DELETE: "op_delete",
    opcodes.OP_GET_MORE: "op_get_more",
    opcodes.OP_KILL_CURSORS: "op_kill_cursors",
}
# Legacy requests whose reply documents are user data, not a command reply.
LEGACY_DATA_OPS = frozenset(("query", "op_get_more"))
# Legacy requests that never get a reply.
NO_REPLY_OPS = frozenset((opcodes.OP_INSERT, opcodes.OP_UPDATE, opcodes.OP_DELETE, opcodes.OP_KILL_CURSORS))
# OP_REPLY responseFlags bit 1.
QUERY_FAILURE = 1 << 1
# OP_QUERY flags bit 6: the server streams OP_REPLYs until the cursor is exhausted (pre-5.1 servers).
QUERY_EXHAUST = 1 << 6
_OP_MSG = opcodes.OP_MSG
_OP_REPLY = opcodes.OP_REPLY
_MORE_TO_COME = opcodes.MORE_TO_COME


class _Pending:
    __slots__ = ("msg", "op", "database", "collection", "exhaust_index", "last_reply_id", "last_reply_ns")

    def __init__(self, msg: Message, op: str, database: str, collection: str) -> None:
        self.msg = msg
        self.op = op
        self.database = database
        self.collection = collection
        self.exhaust_index = 0
        self.last_reply_id = 0
        self.last_reply_ns = 0


def attribute(msg: Message) -> tuple[str, str, str]:
    """(op, database, collection) for a request message."""
    r = msg.result
    opcode = msg.opcode
    if r is None:
        return "unknown", "", ""
    if opcode != _OP_MSG and (opcode in LEGACY_OPS or (opcode == opcodes.OP_QUERY and r.command is None)):
        db, _, coll = (r.namespace or "").partition(".")
        return LEGACY_OPS.get(opcode, "query"), db, coll
    op = r.command or "unknown"
    coll = r.collection or ""
    if coll and op not in COLLECTION_COMMANDS:
        coll = ""
    return op, r.database or "", coll


class Tracker:
    """Matches one connection's replies to its requests and emits events on the bus."""

    def __init__(self, conn: Connection, bus: SinkBus, max_pending: int = 1000) -> None:
        self.conn = conn
        self.bus = bus
        self.max_pending = max_pending
        self.pending: dict[int, _Pending] = {}
        self.exhaust: dict[int, _Pending] = {}

    @property
    def in_flight(self) -> int:
        """Requests still waiting for a reply (exhaust streams not included)."""
        return len(self.pending)

    def on_request(self, msg: Message) -> None:
        """A complete client-to-server message."""
        op, database, collection = attribute(msg)
        r = msg.result
        if r is not None and is_hello(op):
            self._handshake_request(r)
        if (msg.opcode == _OP_MSG and r is not None and r.flags & _MORE_TO_COME) or msg.opcode in NO_REPLY_OPS:
            event = self._event(_Pending(msg, op, database, collection))
            event.more_to_come_request = True
            self.bus.command(event)
            return
        pending = self.pending
        if msg.request_id in pending:  # a reused id: the old request will never be matched now
            del pending[msg.request_id]
            self.bus.requests_dropped(self.conn, 1)
        pending[msg.request_id] = _Pending(msg, op, database, collection)
        if len(pending) > self.max_pending:
            del pending[next(iter(pending))]
            self.bus.requests_dropped(self.conn, 1)

    def unanswered(self, request_id: int) -> None:
        """Emit, without a reply, the event of a request that will never get one (the proxy swallowed it)."""
        p = self.pending.pop(request_id, None)
        if p is not None:
            self.bus.command(self._event(p))

    def on_reply(self, msg: Message) -> None:
        """A complete server-to-client message."""
        p = self.pending.pop(msg.response_to, None)
        if p is None:
            p = self.exhaust.get(msg.response_to)
            if p is None:
                self.bus.unmatched_reply(self.conn, msg.response_to)
                return
        r = msg.result
        event = self._event(p, msg)
        if p.exhaust_index:
            event.exhaust = True
            event.exhaust_index = p.exhaust_index
            # A streamed reply's latency runs from the previous reply's last byte.
            event.request_first_ns = event.request_last_ns = p.last_reply_ns
        if r is None:
            more = False
        elif msg.opcode == _OP_MSG:
            more = bool(r.flags & _MORE_TO_COME)
        else:  # a legacy exhaust query: OP_REPLYs keep coming while the cursor is open
            more = (
                msg.opcode == _OP_REPLY
                and bool(r.cursor_id)
                and p.msg.opcode == opcodes.OP_QUERY
                and bool(p.msg.flags & QUERY_EXHAUST)
            )
        exhaust = self.exhaust
        if p.last_reply_id:
            exhaust.pop(p.last_reply_id, None)
        if more:
            p.exhaust_index += 1
            p.last_reply_id = msg.request_id
            p.last_reply_ns = msg.last_ns
            exhaust[p.msg.request_id] = p
            exhaust[msg.request_id] = p
            # Each new stream adds two keys: evict until the bound holds again, oldest first.
            while len(exhaust) > 2 * self.max_pending:
                exhaust.pop(next(iter(exhaust)))
        elif p.exhaust_index:  # the stream's last reply
            exhaust.pop(p.msg.request_id, None)
        if is_hello(p.op):
            if r is not None:
                self._handshake_reply(r)
            req = p.msg.result
            # A monitoring hello that allows exhaust may be held for maxAwaitTimeMS: a long poll.
            event.awaitable = req is not None and bool(req.flags & opcodes.EXHAUST_ALLOWED)
        self.bus.command(event)

    def _event(self, p: _Pending, reply: Message | None = None) -> CommandEvent:
        req = p.msg
        if reply is None:
            return CommandEvent(
                self.conn,
                p.op,
                p.database,
                p.collection,
                req.request_id,
                req.wire_opcode,
                req.length,
                req.first_ns,
                req.last_ns,
                req.result,
                decode_error=req.error,
            )
        r = reply.result
        # Positional arguments, in CommandEvent's field order (events.py).
        event = CommandEvent(
            self.conn,
            p.op,
            p.database,
            p.collection,
            req.request_id,
            req.wire_opcode,
            req.length,
            req.first_ns,
            req.last_ns,
            req.result,
            reply.wire_opcode,
            reply.length,
            reply.first_ns,
            reply.last_ns,
            r,
            reply.request_id,
            decode_error=req.error or reply.error,
        )
        if r is None:
            return event
        op = p.op
        if op in LEGACY_DATA_OPS:
            # A legacy query's first reply document is user data: only the flags and, on
            # QueryFailure, the {$err, code} document say how it went.
            failed = bool(r.flags & QUERY_FAILURE)
            event.ok = not failed
            if failed:
                event.code = r.code
            event.documents_returned = r.returned
            event.cursor_id = r.cursor_id
            return event
        if r.ok is not None:
            event.ok = r.ok == 1.0
        elif reply.opcode == _OP_REPLY:
            event.ok = not (r.flags & QUERY_FAILURE)
        event.code = r.code
        event.code_name = r.code_name or ""
        event.errmsg = r.errmsg or ""
        event.documents_returned = r.returned
        event.cursor_id = r.cursor_id
        if op in ("insert", "delete"):
            event.documents_changed = r.n
        elif op == "update":
            if r.n_modified is not None or r.upserted is not None:
                event.documents_changed = (r.n_modified or 0) + (r.upserted or 0)
        elif op in ("findAndModify", "findandmodify"):
            event.documents_changed = r.last_error_n
        return event

    def _handshake_request(self, r: Any) -> None:
        conn = self.conn
        if r.app_name and not conn.app_name:
            conn.app_name = r.app_name
        if r.driver_name and not conn.driver_name:
            conn.driver_name = r.driver_name
            conn.driver_version = r.driver_version or ""
        if r.compression is not None and not conn.compression_offered:
            conn.compression_offered = tuple(r.compression)

    def _handshake_reply(self, r: Any) -> None:
        conn = self.conn
        if r.set_name:
            conn.replica_set = r.set_name
        if r.max_wire_version is not None:
            conn.max_wire_version = r.max_wire_version
        if r.compression and not conn.compression:
            # The client uses the first of its own compressors that the server accepts.
            accepted = set(r.compression)
            chosen = [c for c in conn.compression_offered if c in accepted] or list(r.compression)
            conn.compression = chosen[0]
