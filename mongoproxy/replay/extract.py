"""Extracting operations: capture files to a Workload of recorded connections and their commands.

Handshake, auth, user management and endSessions are kept but marked not replayed. Each command becomes a
pymongo-ready spec without $db/lsid/$clusterTime (nested values stay RawBSONDocument so their types survive),
and getMore/killCursors are linked to the op whose reply opened their cursor.
"""

from __future__ import annotations

import collections
import io
import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from mongoproxy.commandspec import command_spec, query_document
from mongoproxy.errors import DecodeError, ReplayError
from mongoproxy.protocol.commands import AUTH_COMMANDS, HELLO_COMMANDS, USER_MANAGEMENT_COMMANDS
from mongoproxy.protocol.opcodes import HEADER, MORE_TO_COME, OP_MSG, OP_QUERY, REQUEST_OPCODES
from mongoproxy.replay import legacy
from mongoproxy.replay.legacy import compressor_of, conversion_name
from mongoproxy.replay.model import (
    SKIP_AUTH,
    SKIP_GLE,
    SKIP_HANDSHAKE,
    SKIP_LEGACY,
    SKIP_MONITORING,
    SKIP_SESSIONS,
    SKIP_UNPARSEABLE,
    Op,
    Outcome,
    RecordedConnection,
    Stream,
    Workload,
)
from mongoproxy.replay.reader import (
    Flow,
    Opener,
    Reassembler,
    WireMessage,
    iter_packets,
    open_capture,
    require_dpkt,
    uncompressed,
)

SESSION_COMMANDS = frozenset({"endsessions"})
# Fields never sent as recorded: the target session/cluster-time machinery replaces them.
DROPPED_FIELDS = frozenset({"$db", "lsid", "$clusterTime"})


def expand_inputs(paths: Iterable[str]) -> list[str]:
    """Files as given; a directory stands for its finished *.pcapng/*.pcap/*.cap files, in name order."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(
                os.path.join(p, n)
                for n in os.listdir(p)
                if n.endswith((".pcapng", ".pcap", ".cap")) and os.path.isfile(os.path.join(p, n))
            )
            if not found:
                raise ReplayError(
                    f"{p}: the directory holds no .pcapng or .pcap files (unfinished recordings end in "
                    ".part; name one explicitly to read it)"
                )
            out.extend(found)
        elif not os.path.exists(p):
            raise ReplayError(f"{p}: no such file")
        else:
            out.append(p)
    return out


def _first_ts(path: str, opener: Opener) -> int:
    warnings: list[str] = []
    for pkt in iter_packets(path, warnings, opener):
        return pkt.ts_ns
    return 0


# A connection whose client sends this many requests without any reply has its oldest emitted unanswered.
MAX_PIPELINE = 1000
# Recorded cursors followed at once (getMore/killCursors to their opening op); past it the oldest is forgotten.
MAX_OPEN_CURSORS = 100_000


class _FlowState:
    """Extraction state of one TCP connection: whether it is MongoDB, its requests awaiting their replies."""

    __slots__ = ("conn", "decided", "dead", "order", "inflight", "first_hello", "requests", "bad_warned", "emitted")

    def __init__(self) -> None:
        self.conn: RecordedConnection | None = None
        self.decided = False
        self.dead = False
        self.order: collections.deque[Op] = collections.deque()
        self.inflight: dict[int, Op] = {}
        self.first_hello = True
        self.requests = 0
        self.bad_warned = False
        self.emitted = False


def iter_ops(paths: Iterable[str], stream: Stream | None = None, keep_documents: bool = False) -> Iterator[Any]:
    """Operations as the capture is read, each once its reply is seen; a RecordedConnection once it has ended.

    Memory is bounded by what is in flight in the capture (open connections, requests awaiting replies, open
    cursors), not by the file size. ReplayError for bad input, at the point where it is found.
    """
    yield from _iter_ops(expand_inputs(paths), open_capture, stream, keep_documents)


def _iter_ops(files: list[str], opener: Opener, stream: Stream | None, keep_documents: bool) -> Iterator[Any]:
    """iter_ops on files given by name and opened with `opener` (files on disk, or a capture in memory)."""
    require_dpkt()
    if stream is None:
        stream = Stream(files)
    stream.files = files
    if len(files) > 1:  # connections may continue from one file into the next
        files.sort(key=lambda path: _first_ts(path, opener))
    re = Reassembler(keep_flows=False)
    states: dict[Flow, _FlowState] = {}
    creators: collections.OrderedDict[int, Op] = collections.OrderedDict()
    warnings = stream.warnings
    for path in files:
        for pkt in iter_packets(path, warnings, opener):
            try:
                flow = re.add(pkt, path)
            except ReplayError as exc:
                raise ReplayError(f"{path}: packet at offset {pkt.offset}: {exc}") from None
            stream.packets = re.packets
            if flow is None:
                continue
            st = states.get(flow)
            if st is None:
                st = states[flow] = _FlowState()
            yield from _advance(flow, st, stream, creators, keep_documents)
            if flow.closed and not st.dead:
                yield from _finish(flow, st, stream, creators)
                states.pop(flow, None)
                re.forget(flow)
    for flow, st in list(states.items()):
        if not st.dead:
            yield from _finish(flow, st, stream, creators)
    stream.tcp_packets, stream.flows = re.tcp_packets, re.flow_count
    where = files[0] if len(files) == 1 else f"{len(files)} files ({', '.join(files)})"
    if not re.packets:
        raise ReplayError(f"{where}: no packets")
    if not stream.mongo_flows:
        raise ReplayError(
            f"{where}: no MongoDB traffic ({re.packets} packets, {re.tcp_packets} TCP, "
            f"{re.flow_count} TCP connections, none carrying the MongoDB wire protocol)"
        )
    stream.finished = True


def _decide(flow: Flow, st: _FlowState, stream: Stream) -> bool:
    """Whether the flow is a MongoDB connection to extract, once enough of it is seen (marks it dead if not)."""
    ha, hb = flow.halves[flow.a], flow.halves[flow.b]
    if not (ha.messages or hb.messages):
        if ha.bad or hb.bad:
            st.dead = True
            if ha.midstream or hb.midstream:
                stream.mongo_flows += 1
                stream.warnings.append(
                    f"connection {flow.label()} ({flow.source}): the capture began in the middle of a message; skipped"
                )
        return False
    if (ha.bad and not ha.messages) or (hb.bad and not hb.messages):
        st.dead = True
        if ha.midstream or hb.midstream:
            stream.mongo_flows += 1
            stream.warnings.append(
                f"connection {flow.label()} ({flow.source}): the capture began in the middle of a message; skipped"
            )
        return False
    if flow.client is None:
        flow.client = _guess_client(flow)
        if flow.client is None:
            if ha.messages and hb.messages:
                st.dead = True
                stream.mongo_flows += 1
                stream.warnings.append(
                    f"connection {flow.label()} ({flow.source}): cannot tell client from server (the capture "
                    "began after it opened and neither side looks like a MongoDB client); skipped"
                )
            return False
    stream.mongo_flows += 1
    client = flow.halves[flow.client]
    if flow.halves[flow.client].midstream or flow.halves[flow.server].midstream:  # type: ignore[index]
        msgs = client.messages
        if msgs and (msgs[0].header[2] != 0 or msgs[0].header[3] not in REQUEST_OPCODES):
            st.dead = True
            stream.warnings.append(
                f"connection {flow.label()} ({flow.source}): the capture began in the middle of it and "
                "it does not start at a request; skipped"
            )
            return False
    st.decided = True
    st.conn = RecordedConnection(flow.index, flow.label(), flow.source)
    return True


def _advance(
    flow: Flow, st: _FlowState, stream: Stream, creators: collections.OrderedDict, keep_documents: bool
) -> Iterator[Any]:
    """Turn the flow's newly framed messages into ops; yield those whose reply has come, in request order."""
    if st.dead:
        for half in flow.halves.values():
            half.messages.clear()
        return
    if not st.decided and not _decide(flow, st, stream):
        if st.dead:
            for half in flow.halves.values():
                half.messages.clear()
        return
    conn = st.conn
    assert conn is not None and flow.client is not None and flow.server is not None
    client, server = flow.halves[flow.client], flow.halves[flow.server]
    for m in client.messages:
        op = _op_from_message(conn, st.requests, m, stream.warnings, keep_documents)
        st.requests += 1
        if op is None:
            continue
        if op.key in HELLO_COMMANDS:
            op.skip = SKIP_HANDSHAKE if st.first_hello else SKIP_MONITORING
            st.first_hello = False
        st.order.append(op)
        if not op.unacknowledged and not op.skip:
            st.inflight[op.request_id] = op
    client.messages.clear()
    for m in server.messages:
        op = st.inflight.pop(m.header[2], None)  # later replies to the same request (exhaust) are not compared
        if op is not None:
            op.recorded_ns = m.last_ns - op.ts_ns
            op.recorded, docs = _reply_outcome(m, keep_documents)
            if keep_documents:
                op.recorded_docs = docs
    server.messages.clear()
    for half, side in ((client, "client"), (server, "server")):
        if half.bad and not st.bad_warned:
            st.bad_warned = True
            stream.warnings.append(
                f"connection {conn.label} ({conn.source}): the {side}'s stream stops parsing as MongoDB "
                f"after {st.requests} requests ({half.bad}); the rest is not replayed"
            )
    order = st.order
    while order and (order[0].request_id not in st.inflight or len(order) > MAX_PIPELINE):
        yield _emit(order.popleft(), st, stream, creators)


def _finish(flow: Flow, st: _FlowState, stream: Stream, creators: collections.OrderedDict) -> Iterator[Any]:
    """The flow has ended (or the capture has): emit what is left, warn about gaps, then the connection."""
    st.dead = True
    conn = st.conn
    if conn is None:
        return
    while st.order:
        yield _emit(st.order.popleft(), st, stream, creators)
    st.inflight.clear()
    assert flow.client is not None and flow.server is not None
    for half, side in ((flow.halves[flow.client], "client"), (flow.halves[flow.server], "server")):
        if half.gap:
            stream.warnings.append(
                f"connection {conn.label} ({conn.source}): {half.gap} bytes from the {side} follow a "
                f"gap at stream offset {half.next} (packets missing from the capture); skipped from there on"
            )
    trailing = len(flow.halves[flow.client].buf)
    if trailing:
        stream.warnings.append(
            f"connection {conn.label} ({conn.source}): its last request is incomplete ({trailing} bytes "
            "at the end of the capture); left out"
        )
    for half in flow.halves.values():
        half.buf.clear()
    if st.emitted:
        yield conn


def _emit(op: Op, st: _FlowState, stream: Stream, creators: collections.OrderedDict) -> Op:
    """Number the connection on its first op, count the op, and link cursors to the op that opened them."""
    if not st.emitted:
        st.emitted = True
        assert st.conn is not None
        st.conn.index = stream.connections
        stream.connections += 1
    stream.operations += 1
    if not stream.start_ns or op.ts_ns < stream.start_ns:
        stream.start_ns = op.ts_ns
    stream.end_ns = max(stream.end_ns, op.ts_ns)
    if op.conversion and not op.skip:
        stream.conversions[op.conversion] = stream.conversions.get(op.conversion, 0) + 1
    key = op.key
    rec = op.recorded
    if key == "getmore":
        op.creator = creators.get(op.cursor_ref or 0)
        if rec is not None and rec.cursor_id == 0:
            creators.pop(op.cursor_ref or 0, None)
    elif key == "killcursors":
        op.creator = next((creators[c] for c in op.kill_ids if c in creators), None)
        if op.spec is not None and not op.spec.get("killCursors") and op.creator is not None:
            # OP_KILL_CURSORS names no namespace: the cursor's opening op does.
            op.db, op.coll = op.creator.db, op.creator.coll
            op.spec["killCursors"] = op.creator.coll
        for c in op.kill_ids:
            creators.pop(c, None)
    elif rec is not None and rec.cursor_id:
        creators[rec.cursor_id] = op
        if len(creators) > MAX_OPEN_CURSORS:
            creators.popitem(last=False)
    return op


def load(paths: Iterable[str], keep_documents: bool = False) -> Workload:
    """Read, reassemble and parse capture files into a Workload held in memory; ReplayError for bad input."""
    stream = Stream([])
    return _collect(iter_ops(paths, stream, keep_documents), stream)


def load_bytes(data: bytes, name: str = "capture", keep_documents: bool = False) -> Workload:
    """load() of one capture file's content already in memory (named `name` in messages): the same reading code."""
    stream = Stream([])
    return _collect(_iter_ops([name], lambda _: io.BytesIO(data), stream, keep_documents), stream)


def _collect(items: Iterator[Any], stream: Stream) -> Workload:
    """The Workload of what iter_ops yields (stream is the one it fills)."""
    connections: dict[int, RecordedConnection] = {}
    ops: list[Op] = []
    for x in items:
        if isinstance(x, Op):
            ops.append(x)
            if x.conn.index not in connections:
                connections[x.conn.index] = x.conn
            x.conn.ops.append(x)
    conns = [connections[i] for i in sorted(connections)]
    for c in conns:
        c.ops.sort(key=lambda o: o.index)
    ops.sort(key=lambda o: (o.ts_ns, o.conn.index, o.index))
    start = min((o.ts_ns for o in ops), default=0)
    end = max((o.ts_ns for o in ops), default=0)
    return Workload(
        stream.files,
        conns,
        ops,
        stream.warnings,
        stream.packets,
        stream.flows,
        stream.mongo_flows,
        start,
        end,
        dict(stream.conversions),
    )


def _guess_client(flow: Flow) -> tuple | None:
    """Without a SYN: the side whose first message is a request (responseTo 0) is the client."""
    scores = {}
    for ep in (flow.a, flow.b):
        msgs = flow.halves[ep].messages
        if msgs:
            _, _, response_to, opcode = msgs[0].header
            scores[ep] = opcode in REQUEST_OPCODES and response_to == 0
    clients = [ep for ep, yes in scores.items() if yes]
    if len(clients) == 1:
        return clients[0]
    return None


def _op_from_message(
    conn: RecordedConnection, index: int, m: WireMessage, warnings: list[str], keep_documents: bool = False
) -> Op | None:
    from mongoproxy import _bson_parser
    from mongoproxy.tracker import COLLECTION_COMMANDS

    length, request_id, response_to, wire_op = m.header
    try:
        data = uncompressed(m.data)
    except DecodeError as exc:
        op = Op(conn, index, m.first_ns, "unknown", "", "", request_id, skip=SKIP_UNPARSEABLE)
        warnings.append(f"connection {conn.label}: request {request_id} cannot be decompressed ({exc}); not replayed")
        return op
    opcode = HEADER.unpack_from(data)[3]
    body = memoryview(data)[16:]
    try:
        r = _bson_parser.scan_body(opcode, False, body)
    except (DecodeError, ValueError) as exc:
        warnings.append(f"connection {conn.label}: request {request_id} does not parse ({exc}); not replayed")
        return Op(conn, index, m.first_ns, "unknown", "", "", request_id, skip=SKIP_UNPARSEABLE)
    flags = r.flags or 0
    if r.command is None or opcode not in (OP_MSG, OP_QUERY):
        return _legacy_op(conn, index, m, data, opcode, r, warnings)
    command = r.command
    coll = (r.collection or "") if command in COLLECTION_COMMANDS else ""
    if opcode == OP_QUERY and command in ("$query", "query"):  # a wrapped legacy command
        try:
            inner = query_document(data)[command]
            command = next(iter(inner))
            first = inner[command]
            coll = first if isinstance(first, str) and command in COLLECTION_COMMANDS else ""
        except (KeyError, StopIteration, TypeError, ValueError, bson_errors()) as exc:
            warnings.append(f"connection {conn.label}: request {request_id} does not parse ({exc}); not replayed")
            return Op(conn, index, m.first_ns, "unknown", "", "", request_id, skip=SKIP_UNPARSEABLE)
    op = Op(conn, index, m.first_ns, command, r.database or "", coll, request_id)
    if r.app_name and not conn.app:
        conn.app = r.app_name
    key = command.lower()
    if key in AUTH_COMMANDS or key in USER_MANAGEMENT_COMMANDS:  # recorded passwords are blanked
        op.skip = SKIP_AUTH
    elif key in SESSION_COMMANDS:
        op.skip = SKIP_SESSIONS
    elif key == "getlasterror":
        op.skip = SKIP_GLE
    op.unacknowledged = bool(opcode == OP_MSG and flags & MORE_TO_COME)
    if opcode == OP_QUERY:
        op.conversion = conversion_name("OP_QUERY $cmd", command, compressor_of(m.data))
    if op.skip or key in HELLO_COMMANDS:
        return op
    try:
        _prepare(op, data, opcode)
    except (DecodeError, struct.error, ValueError, IndexError, KeyError, TypeError, bson_errors()) as exc:
        # bson_errors(): a recorded string that is not UTF-8 (InvalidBSON) is an undecodable command, not a crash.
        op.skip = SKIP_UNPARSEABLE
        warnings.append(
            f"connection {conn.label}: {command} (request {request_id}) cannot be decoded ({exc}); not replayed"
        )
    return op


def _legacy_op(
    conn: RecordedConnection, index: int, m: WireMessage, data: bytes, opcode: int, r: Any, warnings: list[str]
) -> Op:
    """A legacy request converted to a command (legacy.convert), or kept as not replayed when it has none."""
    request_id = m.header[1]
    try:
        got = legacy.convert(data, opcode)
    except (
        DecodeError,
        struct.error,
        ValueError,
        IndexError,
        KeyError,
        TypeError,
        UnicodeDecodeError,
        bson_errors(),
    ) as exc:
        warnings.append(f"connection {conn.label}: opcode {opcode} (request {request_id}) does not parse ({exc})")
        got = None
    if got is None:
        db, _, coll = (r.namespace or "").partition(".")
        return Op(conn, index, m.first_ns, f"opcode {opcode}", db, coll, request_id, skip=SKIP_LEGACY)
    command, db, coll, spec, lsid = got
    op = Op(conn, index, m.first_ns, command, db, coll, request_id, spec=spec, lsid_key=lsid)
    op.conversion = conversion_name(legacy.OP_NAMES.get(opcode, str(opcode)), command, compressor_of(m.data))
    # No reply on the wire to these.
    op.unacknowledged = opcode in (legacy.OP_INSERT, legacy.OP_UPDATE, legacy.OP_DELETE, legacy.OP_KILL_CURSORS)
    key = op.key
    if key in HELLO_COMMANDS:
        op.spec = None
    elif key in AUTH_COMMANDS or key in USER_MANAGEMENT_COMMANDS:
        op.skip = SKIP_AUTH
    elif key == "getlasterror":
        op.skip = SKIP_GLE
    else:
        _refs(op)
    return op


def _reply_outcome(reply: WireMessage, keep_documents: bool = False) -> tuple[Outcome | None, list | None]:
    """What the recorded reply said, and (keep_documents) the documents it carried."""
    from mongoproxy import _bson_parser

    try:
        data = uncompressed(reply.data)
        opcode = HEADER.unpack_from(data)[3]
        outcome = Outcome.from_scan(_bson_parser.scan_body(opcode, True, memoryview(data)[16:]))
    except (DecodeError, ValueError):
        return None, None
    if not keep_documents:
        return outcome, None
    try:
        return outcome, reply_documents(data, opcode)
    except (DecodeError, struct.error, ValueError, IndexError, bson_errors()):
        return outcome, None


def reply_documents(data: bytes, opcode: int) -> list | None:
    """The documents of an uncompressed reply: OP_MSG/OP_COMMANDREPLY cursor batch or values, OP_REPLY's documents."""
    from bson.raw_bson import RawBSONDocument

    from mongoproxy import compare
    from mongoproxy.commandspec import message_body

    if opcode == 1:  # OP_REPLY: responseFlags, cursorID, startingFrom, numberReturned, documents
        docs, pos = [], 36
        while pos < len(data):
            n = struct.unpack_from("<i", data, pos)[0]
            docs.append(RawBSONDocument(bytes(data[pos : pos + n])))
            pos += n
        if len(docs) == 1 and ("cursor" in docs[0] or "values" in docs[0]):  # a command's reply
            return compare.reply_documents(docs[0])
        return docs
    if opcode == 2011:  # OP_COMMANDREPLY: commandReply, metadata, outputDocs
        n = struct.unpack_from("<i", data, 16)[0]
        return compare.reply_documents(RawBSONDocument(bytes(data[16 : 16 + n])))
    return compare.reply_documents(RawBSONDocument(message_body(data, opcode)[0]))


def bson_errors() -> type[Exception]:
    """bson's base error class (imported late: bson comes with pymongo, which replay imports only when used)."""
    from bson.errors import BSONError

    return BSONError


def _prepare(op: Op, data: bytes, opcode: int) -> None:
    """Build op.spec (top-level dict, nested values as RawBSONDocument so their types survive) and the refs."""
    op.spec, op.lsid_key = command_spec(data, opcode)
    _refs(op)


def _refs(op: Op) -> None:
    """The recorded cursor ids a getMore continues or a killCursors closes."""
    spec = op.spec or {}
    key = op.key
    if key == "getmore":
        op.cursor_ref = int(spec["getMore"])
    elif key == "killcursors":
        op.kill_ids = tuple(int(x) for x in spec.get("cursors", ()))
