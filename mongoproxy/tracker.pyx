# cython: language_level=3
"""Per-connection request/reply matching: complete messages in, CommandEvents out (compiled).

Two ways in: the Python API (`on_request(msg)`, `on_reply(msg)` with a protocol.framing.Message, used by
the FrameScanner's slow path, the fault gate, the recorder's digest and the tests) and the C API
(`request()`/`reply()`, declared in tracker.pxd) that mongoproxy._tap calls for each whole message it
scanned in place, so that no Message is built on the fast path. Both run the same code.

Replies are matched to requests by responseTo. Invariants:
- A request flagged moreToCome (or a legacy fire-and-forget opcode) yields its event at once, with no reply.
- An exhaust stream (reply flagged moreToCome) stays matchable both by the original request id and by the
  previous reply's request id, since servers differ (the spec says the latter, some servers send the
  former); it is forgotten when a reply without moreToCome ends it.
- At most `max_pending` requests wait for replies; the oldest are dropped and counted past that. The
  exhaust table holds at most 2 * max_pending keys (two per stream); the oldest are forgotten past that.
- One call to bus.command() per completed command: the only Python-level call the fast path makes.
"""

cimport cython
from libc.stdint cimport int64_t
from mongoproxy._bson_parser cimport ScanResult

from mongoproxy.protocol import opcodes
from mongoproxy.protocol.commands import COLLECTION_COMMANDS, HELLO_COMMANDS

cdef int OP_MSG = opcodes.OP_MSG
cdef int OP_QUERY = opcodes.OP_QUERY
cdef int OP_REPLY = opcodes.OP_REPLY
cdef int OP_INSERT = opcodes.OP_INSERT
cdef int OP_UPDATE = opcodes.OP_UPDATE
cdef int OP_DELETE = opcodes.OP_DELETE
cdef int OP_GET_MORE = opcodes.OP_GET_MORE
cdef int OP_KILL_CURSORS = opcodes.OP_KILL_CURSORS
cdef unsigned int MORE_TO_COME = opcodes.MORE_TO_COME
cdef unsigned int EXHAUST_ALLOWED = opcodes.EXHAUST_ALLOWED
# OP_REPLY responseFlags bit 1: the one document is {$err, code}.
cdef unsigned int QUERY_FAILURE = 1 << 1
# OP_QUERY flags bit 6: the server streams OP_REPLYs until the cursor is exhausted (pre-5.1 servers).
cdef unsigned int QUERY_EXHAUST = 1 << 6

cdef frozenset _COLLECTION_COMMANDS = COLLECTION_COMMANDS
cdef frozenset _HELLO_COMMANDS = HELLO_COMMANDS


cdef inline object _legacy_op(int opcode):
    # The name of a legacy write/cursor opcode, or None.
    if opcode == OP_INSERT:
        return "op_insert"
    if opcode == OP_UPDATE:
        return "op_update"
    if opcode == OP_DELETE:
        return "op_delete"
    if opcode == OP_GET_MORE:
        return "op_get_more"
    if opcode == OP_KILL_CURSORS:
        return "op_kill_cursors"
    return None


cdef inline bint _no_reply(int opcode):
    # Legacy requests that never get a reply.
    return opcode == OP_INSERT or opcode == OP_UPDATE or opcode == OP_DELETE or opcode == OP_KILL_CURSORS


cdef inline bint _is_hello(object op):
    # protocol.commands.is_hello without lower-casing names that cannot be "hello" or "ismaster".
    cdef Py_ssize_t n = len(op)
    if n != 5 and n != 8:
        return False
    return op.lower() in _HELLO_COMMANDS


cdef int _attribute(Pending p, object result, int opcode) except -1:
    # (op, database, collection) of a request.
    cdef ScanResult r
    cdef object legacy
    if result is None:
        p.op = "unknown"
        p.database = ""
        p.collection = ""
        return 0
    r = <ScanResult>result
    legacy = _legacy_op(opcode) if opcode != OP_MSG else None
    if opcode != OP_MSG and (legacy is not None or (opcode == OP_QUERY and r.command is None)):
        db, _, coll = (r.namespace or "").partition(".")
        p.op = legacy if legacy is not None else "query"
        p.database = db
        p.collection = coll
        return 0
    op = r.command or "unknown"
    coll = r.collection or ""
    if coll and op not in _COLLECTION_COMMANDS:
        coll = ""
    p.op = op
    p.database = r.database or ""
    p.collection = coll
    return 0


# Not tracked by the garbage collector (one fewer container per command to scan): an event refers to its
# Connection, ScanResults, strings, numbers and its Query, none of which refers back to an event.
@cython.no_gc
cdef class CommandEvent:
    """One command: a request and its reply (or none, for moreToCome requests).

    `request` and `reply` are the scanner's ScanResult objects (see mongoproxy._bson_parser.pyi) for the
    raw extracted fields; the attributes here are the attributed view that sinks should prefer. Sinks may
    keep an event but must not change it, except `query_cache` (the querylog.Query, computed once).
    """

    def __init__(
        self,
        connection,
        op,
        database,
        collection,
        int64_t request_id,
        int request_opcode,
        int64_t request_size,
        int64_t request_first_ns,
        int64_t request_last_ns,
        request,
        int reply_opcode=0,
        int64_t reply_size=0,
        int64_t reply_first_ns=0,
        int64_t reply_last_ns=0,
        reply=None,
        int64_t reply_request_id=0,
        ok=None,
        code=None,
        code_name="",
        errmsg="",
        documents_returned=None,
        documents_changed=None,
        cursor_id=None,
        bint more_to_come_request=False,
        bint exhaust=False,
        int exhaust_index=0,
        bint awaitable=False,
        decode_error="",
        query_cache=None,
        fault="",
    ):
        self.connection = connection
        self.op = op
        self.database = database
        self.collection = collection
        self.request_id = request_id
        self.request_opcode = request_opcode
        self.request_size = request_size
        self.request_first_ns = request_first_ns
        self.request_last_ns = request_last_ns
        self.request = request
        self.reply_opcode = reply_opcode
        self.reply_size = reply_size
        self.reply_first_ns = reply_first_ns
        self.reply_last_ns = reply_last_ns
        self.reply = reply
        self.reply_request_id = reply_request_id
        self.ok = ok
        self.code = code
        self.code_name = code_name
        self.errmsg = errmsg
        self.documents_returned = documents_returned
        self.documents_changed = documents_changed
        self.cursor_id = cursor_id
        self.more_to_come_request = more_to_come_request
        self.exhaust = exhaust
        self.exhaust_index = exhaust_index
        self.awaitable = awaitable
        self.decode_error = decode_error
        self.query_cache = query_cache
        self.fault = fault
        self.hello = _is_hello(op) if isinstance(op, str) else False

    @property
    def duration_ns(self):
        """Request first byte to reply last byte; 0 when there is no reply."""
        if not self.reply_last_ns:
            return 0
        return self.reply_last_ns - self.request_first_ns

    @property
    def failed(self):
        """ok:0, a write error or a write-concern error."""
        return self.is_failed()

    cdef bint is_failed(self) except -1:
        # `failed`, for the compiled sinks (sinks/_series.pyx, _digest.pyx).
        if self.ok is False:
            return True
        reply = self.reply
        if reply is None:
            return False
        return bool(reply.write_errors) or reply.write_concern_error_code is not None

    def __repr__(self):
        return (
            f"CommandEvent(op={self.op!r}, database={self.database!r}, collection={self.collection!r}, "
            f"request_id={self.request_id}, ok={self.ok!r}, duration_ns={self.duration_ns})"
        )


@cython.final
cdef class Fanout:
    """SinkBus.command, compiled: calls each sink's on_command with the event; one that raises goes to `failed`."""

    cdef list hooks
    cdef object failed

    def __init__(self, list hooks not None, failed):
        self.hooks = hooks  # the bus's list of on_command hooks (bound methods or compiled hook objects)
        self.failed = failed  # SinkBus._failed(hook, exc): logs once per sink, counts; never raises

    def __call__(self, event):
        """Deliver one CommandEvent to every sink; a sink's exception never reaches the caller."""
        for m in self.hooks:
            try:
                m(event)
            except Exception as exc:  # a sink bug must never reach the data path
                self.failed(m, exc)


@cython.no_gc  # holds a ScanResult, strings and numbers: no reference cycles
cdef class Pending:
    """A request waiting for its reply, or an exhaust stream waiting for its next one."""

    def __repr__(self):
        return f"<Pending {self.op} id={self.request_id}>"


cdef class Tracker:
    """Matches one connection's replies to its requests and emits events on the bus."""

    def __init__(self, conn, bus, Py_ssize_t max_pending=1000):
        self.conn = conn
        self.bus = bus
        self.max_pending = max_pending
        self.pending = {}
        self.exhaust = {}

    @property
    def in_flight(self):
        """Requests still waiting for a reply (exhaust streams not included)."""
        return len(self.pending)

    def on_request(self, msg):
        """A complete client-to-server message (a protocol.framing.Message)."""
        self.request(msg.result, msg.opcode, msg.wire_opcode, msg.request_id, msg.length, msg.first_ns,
                     msg.last_ns, msg.error)

    def on_reply(self, msg):
        """A complete server-to-client message (a protocol.framing.Message)."""
        self.reply(msg.result, msg.opcode, msg.wire_opcode, msg.request_id, msg.response_to, msg.length,
                   msg.first_ns, msg.last_ns, msg.error)

    def unanswered(self, request_id):
        """Emit, without a reply, the event of a request that will never get one (the proxy swallowed it)."""
        p = self.pending.pop(request_id, None)
        if p is not None:
            self.bus.command(self._event(<Pending>p))

    cdef int request(self, object result, int opcode, int wire_opcode, int64_t request_id, int64_t length,
                     int64_t first_ns, int64_t last_ns, object error) except -1:
        cdef Pending p = Pending.__new__(Pending)
        cdef CommandEvent event
        cdef dict pending
        p.request = result
        p.opcode = opcode
        p.wire_opcode = wire_opcode
        p.request_id = request_id
        p.length = length
        p.first_ns = first_ns
        p.last_ns = last_ns
        p.error = error
        _attribute(p, result, opcode)
        p.hello = _is_hello(p.op)
        if p.hello and result is not None:
            self._handshake_request(result)
        if (opcode == OP_MSG and result is not None and (<ScanResult>result).flags & MORE_TO_COME) or _no_reply(
                opcode):
            event = self._event(p)
            event.more_to_come_request = True
            self.bus.command(event)
            return 0
        pending = self.pending
        key = request_id
        if key in pending:  # a reused id: the old request will never be matched now
            del pending[key]
            self.bus.requests_dropped(self.conn, 1)
        pending[key] = p
        if len(pending) > self.max_pending:
            del pending[next(iter(pending))]
            self.bus.requests_dropped(self.conn, 1)
        return 0

    cdef int reply(self, object result, int opcode, int wire_opcode, int64_t request_id, int64_t response_to,
                   int64_t length, int64_t first_ns, int64_t last_ns, object error) except -1:
        cdef Pending p
        cdef ScanResult r
        cdef CommandEvent event
        cdef bint more
        cdef unsigned int flags
        cdef dict exhaust
        key = response_to
        found = self.pending.pop(key, None)
        if found is None:
            found = self.exhaust.get(key)
            if found is None:
                self.bus.unmatched_reply(self.conn, response_to)
                return 0
        p = <Pending>found
        event = self._event(p)
        event.reply_opcode = wire_opcode
        event.reply_size = length
        event.reply_first_ns = first_ns
        event.reply_last_ns = last_ns
        event.reply = result
        event.reply_request_id = request_id
        if error:
            event.decode_error = p.error or error
        if p.exhaust_index:
            event.exhaust = True
            event.exhaust_index = p.exhaust_index
            # A streamed reply's latency runs from the previous reply's last byte.
            event.request_first_ns = event.request_last_ns = p.last_reply_ns
        if result is None:
            more = False
        else:
            r = <ScanResult>result
            flags = r.flags
            if opcode == OP_MSG:
                more = (flags & MORE_TO_COME) != 0
            else:  # a legacy exhaust query: OP_REPLYs keep coming while the cursor is open
                more = (
                    opcode == OP_REPLY
                    and bool(r.cursor_id)
                    and p.opcode == OP_QUERY
                    and p.request is not None
                    and ((<ScanResult>p.request).flags & QUERY_EXHAUST) != 0
                )
            _outcome(event, r, opcode, p.op)
        exhaust = self.exhaust
        if p.last_reply_id:
            exhaust.pop(p.last_reply_id, None)
        if more:
            p.exhaust_index += 1
            p.last_reply_id = request_id
            p.last_reply_ns = last_ns
            exhaust[p.request_id] = p
            exhaust[request_id] = p
            # Each new stream adds two keys: evict until the bound holds again, oldest first.
            while len(exhaust) > 2 * self.max_pending:
                exhaust.pop(next(iter(exhaust)))
        elif p.exhaust_index:  # the stream's last reply
            exhaust.pop(p.request_id, None)
        if p.hello:
            if result is not None:
                self._handshake_reply(result)
            # A monitoring hello that allows exhaust may be held for maxAwaitTimeMS: a long poll.
            event.awaitable = p.request is not None and ((<ScanResult>p.request).flags & EXHAUST_ALLOWED) != 0
        self.bus.command(event)
        return 0

    cdef CommandEvent _event(self, Pending p):
        # The request half of an event; the reply half and the outcome are filled in by reply().
        cdef CommandEvent e = CommandEvent.__new__(CommandEvent)
        e.connection = self.conn
        e.op = p.op
        e.database = p.database
        e.collection = p.collection
        e.request_id = p.request_id
        e.request_opcode = p.wire_opcode
        e.request_size = p.length
        e.request_first_ns = p.first_ns
        e.request_last_ns = p.last_ns
        e.request = p.request
        e.code_name = ""
        e.errmsg = ""
        e.decode_error = p.error
        e.fault = ""
        e.hello = p.hello
        return e

    cdef int _handshake_request(self, object result) except -1:
        cdef ScanResult r = <ScanResult>result
        conn = self.conn
        if r.app_name and not conn.app_name:
            conn.app_name = r.app_name
        if r.driver_name and not conn.driver_name:
            conn.driver_name = r.driver_name
            conn.driver_version = r.driver_version or ""
        if r.compression is not None and not conn.compression_offered:
            conn.compression_offered = tuple(r.compression)
        return 0

    cdef int _handshake_reply(self, object result) except -1:
        cdef ScanResult r = <ScanResult>result
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
        return 0


cdef int _outcome(CommandEvent event, ScanResult r, int opcode, object op) except -1:
    # How the command went, from its reply.
    if op == "query" or op == "op_get_more":
        # A legacy query's first reply document is user data: only the flags and, on QueryFailure, the
        # {$err, code} document say how it went.
        failed = (r.flags & QUERY_FAILURE) != 0
        event.ok = not failed
        if failed:
            event.code = r.code
        event.documents_returned = r.returned
        event.cursor_id = r.cursor_id
        return 0
    if r.ok is not None:
        event.ok = r.ok == 1.0
    elif opcode == OP_REPLY:
        event.ok = (r.flags & QUERY_FAILURE) == 0
    event.code = r.code
    event.code_name = r.code_name or ""
    event.errmsg = r.errmsg or ""
    event.documents_returned = r.returned
    event.cursor_id = r.cursor_id
    if op == "insert" or op == "delete":
        event.documents_changed = r.n
    elif op == "update":
        if r.n_modified is not None or r.upserted is not None:
            event.documents_changed = (r.n_modified or 0) + (r.upserted or 0)
    elif op == "findAndModify" or op == "findandmodify":
        event.documents_changed = r.last_error_n
    return 0
