"""Extracting operations: capture files to a Workload of recorded connections and their commands.

Handshake, auth, user management and endSessions are kept but marked not replayed. Each command becomes a
pymongo-ready spec without $db/lsid/$clusterTime (nested values stay RawBSONDocument so their types survive),
and getMore/killCursors are linked to the op whose reply opened their cursor.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from mongoproxy import redact
from mongoproxy.errors import DecodeError, ReplayError
from mongoproxy.protocol.commands import AUTH_COMMANDS, HELLO_COMMANDS, USER_MANAGEMENT_COMMANDS
from mongoproxy.protocol.opcodes import CHECKSUM_PRESENT, HEADER, MORE_TO_COME, OP_MSG, OP_QUERY, REQUEST_OPCODES
from mongoproxy.replay.model import (
    SKIP_AUTH,
    SKIP_HANDSHAKE,
    SKIP_LEGACY,
    SKIP_MONITORING,
    SKIP_SESSIONS,
    SKIP_UNPARSEABLE,
    Op,
    Outcome,
    RecordedConnection,
    Workload,
)
from mongoproxy.replay.reader import (
    I32,
    Flow,
    Reassembler,
    WireMessage,
    iter_packets,
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


def _first_ts(path: str) -> int:
    warnings: list[str] = []
    for pkt in iter_packets(path, warnings):
        return pkt.ts_ns
    return 0


def load(paths: Iterable[str]) -> Workload:
    """Read, reassemble and parse capture files into a Workload; ReplayError for bad input."""
    files = expand_inputs(paths)
    require_dpkt()
    warnings: list[str] = []
    files.sort(key=_first_ts)  # connections may continue from one file into the next
    re = Reassembler()
    for path in files:
        for pkt in iter_packets(path, warnings):
            try:
                re.add(pkt, path)
            except ReplayError as exc:
                raise ReplayError(f"{path}: packet at offset {pkt.offset}: {exc}") from None
    where = files[0] if len(files) == 1 else f"{len(files)} files ({', '.join(files)})"
    if not re.packets:
        raise ReplayError(f"{where}: no packets")
    connections: list[RecordedConnection] = []
    mongo_flows = 0
    for flow in re.flows:
        conn, is_mongo = _connection_from_flow(flow, warnings)
        flow.halves = {}  # the messages are parsed; let their bytes go
        mongo_flows += is_mongo
        if conn is not None and conn.ops:
            conn.index = len(connections)
            connections.append(conn)
    if not mongo_flows:
        raise ReplayError(
            f"{where}: no MongoDB traffic ({re.packets} packets, {re.tcp_packets} TCP, "
            f"{len(re.flows)} TCP connections, none carrying the MongoDB wire protocol)"
        )
    ops = sorted((o for c in connections for o in c.ops), key=lambda o: (o.ts_ns, o.conn.index, o.index))
    _link_cursors(ops)
    start = min((o.ts_ns for o in ops), default=0)
    end = max((o.ts_ns for o in ops), default=0)
    return Workload(files, connections, ops, warnings, re.packets, len(re.flows), mongo_flows, start, end)


def _connection_from_flow(flow: Flow, warnings: list[str]) -> tuple[RecordedConnection | None, bool]:
    """(the flow's requests and replies as a connection or None when skipped, whether it is MongoDB)."""
    ha, hb = flow.halves[flow.a], flow.halves[flow.b]
    if not (ha.messages or hb.messages):
        return None, False  # no complete message: not MongoDB (or nothing was said)
    if (ha.bad and not ha.messages) or (hb.bad and not hb.messages):
        if ha.midstream or hb.midstream:
            warnings.append(
                f"connection {flow.label()} ({flow.source}): the capture began in the middle of a message; skipped"
            )
            return None, True
        return None, False  # one side never parsed as MongoDB
    if flow.client is None:
        flow.client = _guess_client(flow)
        if flow.client is None:
            warnings.append(
                f"connection {flow.label()} ({flow.source}): cannot tell client from server (the capture "
                "began after it opened and neither side looks like a MongoDB client); skipped"
            )
            return None, True
    assert flow.server is not None  # flow.client is known, so the other endpoint is the server
    client, server = flow.halves[flow.client], flow.halves[flow.server]
    for half, side in ((client, "client"), (server, "server")):
        if half.gap:
            warnings.append(
                f"connection {flow.label()} ({flow.source}): {half.gap} bytes from the {side} follow a "
                f"gap at stream offset {half.next} (packets missing from the capture); skipped"
            )
            return None, True
        if half.bad:
            warnings.append(
                f"connection {flow.label()} ({flow.source}): the {side}'s stream stops parsing as MongoDB "
                f"after {len(half.messages)} messages ({half.bad}); skipped"
            )
            return None, True
    if client.midstream or server.midstream:
        msgs = client.messages
        if msgs and (msgs[0].header[2] != 0 or msgs[0].header[3] not in REQUEST_OPCODES):
            warnings.append(
                f"connection {flow.label()} ({flow.source}): the capture began in the middle of it and "
                "it does not start at a request; skipped"
            )
            return None, True
    conn = RecordedConnection(flow.index, flow.label(), flow.source)
    replies: dict[int, list[WireMessage]] = {}
    for m in server.messages:
        replies.setdefault(m.header[2], []).append(m)
    first_hello = True
    for i, m in enumerate(client.messages):
        op = _op_from_message(conn, i, m, replies, warnings)
        if op is None:
            continue
        if op.key in HELLO_COMMANDS:
            op.skip = SKIP_HANDSHAKE if first_hello else SKIP_MONITORING
            first_hello = False
        conn.ops.append(op)
    trailing = len(client.buf)
    if trailing:
        warnings.append(
            f"connection {flow.label()} ({flow.source}): its last request is incomplete ({trailing} bytes "
            "at the end of the capture); left out"
        )
    return conn, True


def _guess_client(flow: Flow) -> tuple | None:
    """Without a SYN: the side whose first message is a request (responseTo 0) is the client."""
    scores = {}
    for ep in (flow.a, flow.b):
        msgs = flow.halves[ep].messages
        if msgs:
            _, _, response_to, op_code = msgs[0].header
            scores[ep] = op_code in REQUEST_OPCODES and response_to == 0
    clients = [ep for ep, yes in scores.items() if yes]
    if len(clients) == 1:
        return clients[0]
    return None


def _op_from_message(
    conn: RecordedConnection, index: int, m: WireMessage, replies: dict, warnings: list[str]
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
    op_code = HEADER.unpack_from(data)[3]
    body = memoryview(data)[16:]
    try:
        r = _bson_parser.scan_body(op_code, False, body)
    except (DecodeError, ValueError) as exc:
        warnings.append(f"connection {conn.label}: request {request_id} does not parse ({exc}); not replayed")
        return Op(conn, index, m.first_ns, "unknown", "", "", request_id, skip=SKIP_UNPARSEABLE)
    flags = r.flags or 0
    if r.command is None or op_code not in (OP_MSG, OP_QUERY):
        db, _, coll = (r.namespace or "").partition(".")
        return Op(conn, index, m.first_ns, f"opcode {op_code}", db, coll, request_id, skip=SKIP_LEGACY)
    command = r.command
    coll = (r.collection or "") if command in COLLECTION_COMMANDS else ""
    if op_code == OP_QUERY and command in ("$query", "query"):  # a wrapped legacy command
        try:
            inner = _query_document(data)[command]
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
    op.unacknowledged = bool(op_code == OP_MSG and flags & MORE_TO_COME)
    got = replies.get(request_id)
    if got and not op.unacknowledged:
        reply = got[0]
        op.recorded_ns = reply.last_ns - m.first_ns
        op.recorded = _reply_outcome(reply)
    if op.skip or key in HELLO_COMMANDS:
        return op
    try:
        _prepare(op, data, op_code)
    except (DecodeError, struct.error, ValueError, IndexError, KeyError, TypeError) as exc:
        op.skip = SKIP_UNPARSEABLE
        warnings.append(
            f"connection {conn.label}: {command} (request {request_id}) cannot be decoded ({exc}); not replayed"
        )
    return op


def _reply_outcome(reply: WireMessage) -> Outcome | None:
    from mongoproxy import _bson_parser

    try:
        data = uncompressed(reply.data)
        op_code = HEADER.unpack_from(data)[3]
        return Outcome.from_scan(_bson_parser.scan_body(op_code, True, memoryview(data)[16:]))
    except (DecodeError, ValueError):
        return None


def bson_errors() -> type[Exception]:
    """bson's base error class (imported late: bson comes with pymongo, which replay imports only when used)."""
    from bson.errors import BSONError

    return BSONError


def _query_document(data: bytes) -> Any:
    """The query document of an OP_QUERY message, as a RawBSONDocument."""
    from bson.raw_bson import RawBSONDocument

    pos = data.index(b"\0", 20) + 1 + 8
    n = I32.unpack_from(data, pos)[0]
    return RawBSONDocument(bytes(data[pos : pos + n]))


def _elements(doc: bytes) -> Iterator[tuple[str, int, int, int]]:
    """(key, type, value start, value end) of each top-level element of a BSON document."""
    end = I32.unpack_from(doc)[0]
    i = 4
    while i < end - 1:
        t = doc[i]
        k_end = doc.index(b"\0", i + 1)
        key = doc[i + 1 : k_end].decode("utf-8", "replace")
        stop = redact.value_end(doc, t, k_end + 1, end - 1)
        yield key, t, k_end + 1, stop
        i = stop


def _prepare(op: Op, data: bytes, op_code: int) -> None:
    """Build op.spec (top-level dict, nested values as RawBSONDocument so their types survive) and the refs."""
    from bson import Int64
    from bson.raw_bson import RawBSONDocument

    sequences: list[tuple[str, list]] = []
    if op_code == OP_MSG:
        flags = I32.unpack_from(data, 16)[0] & 0xFFFFFFFF
        end = len(data) - (4 if flags & CHECKSUM_PRESENT else 0)
        pos = 20
        doc = None
        while pos < end:
            kind = data[pos]
            pos += 1
            if kind == 0:
                n = I32.unpack_from(data, pos)[0]
                doc = bytes(data[pos : pos + n])
                pos += n
            elif kind == 1:
                size = I32.unpack_from(data, pos)[0]
                stop = pos + size
                name_end = data.index(b"\0", pos + 4)
                ident = data[pos + 4 : name_end].decode()
                docs = []
                d = name_end + 1
                while d < stop:
                    n = I32.unpack_from(data, d)[0]
                    docs.append(RawBSONDocument(bytes(data[d : d + n])))
                    d += n
                sequences.append((ident, docs))
                pos = stop
            else:
                raise DecodeError("bad_section_kind", f"kind {kind}")
        if doc is None:
            raise DecodeError("truncated", "no kind-0 section")
    else:  # OP_QUERY on db.$cmd
        doc = _query_document(data).raw
    raw = RawBSONDocument(doc)
    if op_code == OP_QUERY and next(iter(raw), "") in ("$query", "query"):
        inner = raw[next(iter(raw))]
        doc = inner.raw
        raw = inner
    int64_keys = {k for k, t, _, _ in _elements(doc) if t == 0x12}
    spec: dict[str, Any] = {}
    for k, v in raw.items():
        if k in DROPPED_FIELDS:
            if k == "lsid" and isinstance(v, RawBSONDocument) and "id" in v:
                lid = v["id"]
                op.lsid_key = bytes(lid.bytes if isinstance(lid, uuid.UUID) else lid)
            continue
        if k in int64_keys and isinstance(v, int):
            v = Int64(v)
        spec[k] = v
    for ident, docs in sequences:
        spec[ident] = docs
    rc = spec.get("readConcern")
    if isinstance(rc, RawBSONDocument) and ("afterClusterTime" in rc or "atClusterTime" in rc):
        spec["readConcern"] = {k: v for k, v in rc.items() if k not in ("afterClusterTime", "atClusterTime")}
    key = op.key
    if key == "getmore":
        op.cursor_ref = int(spec["getMore"])
    elif key == "killcursors":
        op.kill_ids = tuple(int(x) for x in spec.get("cursors", ()))
    op.spec = spec


def _link_cursors(ops: list) -> None:
    """Point each getMore/killCursors at the op whose recorded reply opened its cursor."""
    creators: dict[int, Op] = {}
    for o in ops:
        key = o.key
        if key == "getmore":
            o.creator = creators.get(o.cursor_ref)
        elif key == "killcursors":
            o.creator = next((creators[c] for c in o.kill_ids if c in creators), None)
        if o.recorded is not None and o.recorded.cursor_id and key != "getmore":
            creators.setdefault(o.recorded.cursor_id, o)
