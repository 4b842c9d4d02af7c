"""Live mirroring: a copy of each selected request goes to a shadow deployment, its reply is compared, then discarded.

On the event loop the sink only frames the client's requests (keeping those up to MAX_MESSAGE_BYTES, a few per
connection), picks the ones to mirror when the primary's reply is seen (op, namespace, ratio) and puts them on
a bounded queue; a full queue drops the copy and counts it. A thread of its own runs an asyncio loop with
pymongo's AsyncMongoClient to the shadow (its own pool, the URI's credentials), so neither the shadow's
latency nor its errors ever reach a client. Sessions, transactions and $clusterTime are stripped; cursor ids
are remapped so that a getMore continues the shadow's own cursor. Replies are compared by mongoproxy.compare,
the same code as `replay --verify`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import random
import struct
import threading
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from mongoproxy import compare
from mongoproxy.config import Option
from mongoproxy.errors import ConfigError
from mongoproxy.namespaces import NamespaceFilter, ns_list_parser
from mongoproxy.protocol.commands import pipeline_writes
from mongoproxy.protocol.framing import Framer
from mongoproxy.protocol.opcodes import HEADER, OP_COMPRESSED, OP_MSG, OP_QUERY, OP_REPLY

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # larger requests (bulk writes) are not mirrored: counted as too_large
PENDING_PER_CONNECTION = 64  # requests kept per connection awaiting their reply (pipelined, moreToCome)
MAX_CURSORS = 100_000  # primary -> shadow cursor ids remapped at once; past it the oldest is forgotten
CURSORS_PER_CONNECTION = 1000  # mirrored cursors followed per client connection; past it the oldest is forgotten
MAX_COLLECTIONS = 500  # distinct collection label values; later ones become _other
IN_FLIGHT = 32  # copies sent to the shadow at once (the queue fills behind them)
POLL_SECONDS = 0.005
READ_OPS = ("find", "aggregate", "count", "distinct", "getMore")
WRITE_OPS = ("insert", "update", "delete", "findAndModify")
WRITE_KEYS = frozenset(o.lower() for o in WRITE_OPS)
# The shadow's timeouts unless its URI sets them: a copy never waits long for an unreachable or stuck shadow.
SHADOW_TIMEOUTS_MS = {"serverSelectionTimeoutMS": 5000, "connectTimeoutMS": 5000, "socketTimeoutMS": 30000}
# Stripped from every mirrored command: the shadow has its own sessions and clock.
SESSION_FIELDS = frozenset(
    {"lsid", "txnNumber", "autocommit", "startTransaction", "$clusterTime", "$readPreference", "$db"}
)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def parse_ratio(value: Any) -> float:
    """A sampling ratio from 0 to 1."""
    try:
        x = float(str(value).strip())
    except ValueError:
        raise ConfigError(f"--mirror-ratio {value!r} is not a number: give a fraction from 0 to 1, e.g. 0.1") from None
    if not 0.0 <= x <= 1.0:
        raise ConfigError(f"--mirror-ratio must be from 0 to 1, got {value!r}")
    return x


def parse_compare(value: Any) -> str:
    """counts or documents."""
    v = str(value).strip().lower()
    if v not in ("counts", "documents"):
        raise ConfigError(f"--mirror-compare {value!r} is not valid: use counts or documents")
    return v


def parse_ops(value: Any) -> tuple[str, ...]:
    """Command names, comma-separated."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    ops = tuple(str(x).strip() for x in items if str(x).strip())
    if not ops:
        raise ConfigError(f"--mirror-ops {value!r}: give command names, e.g. find,aggregate")
    return ops


def parse_queue(value: Any) -> int:
    """A positive queue size."""
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"--mirror-queue {value!r} is not a whole number") from None
    if n < 1:
        raise ConfigError(f"--mirror-queue must be at least 1, got {n}")
    return n


G = "mirror"
OPTIONS: list[Option] = [
    Option(
        "mirror", ("--mirror",), "send a copy of matching requests to this shadow MongoDB URI", metavar="URI", group=G
    ),
    Option(
        "mirror_ops",
        ("--mirror-ops",),
        "commands to mirror (default: find, aggregate without $out/$merge, count, distinct, getMore)",
        parse=parse_ops,
        metavar="OPS",
        group=G,
    ),
    Option(
        "mirror_ns",
        ("--mirror-ns",),
        "mirror only these namespaces: db.collection, db.* or db (comma-separated)",
        parse=ns_list_parser("--mirror-ns"),
        default=(),
        metavar="NS",
        group=G,
    ),
    Option(
        "mirror_ratio",
        ("--mirror-ratio",),
        "fraction of matching requests to mirror, 0 to 1",
        parse=parse_ratio,
        default=1.0,
        metavar="R",
        group=G,
    ),
    Option(
        "mirror_writes",
        ("--mirror-writes",),
        "also mirror insert, update, delete and findAndModify (they CHANGE the shadow's data)",
        switch=True,
        default=False,
        group=G,
    ),
    Option(
        "mirror_compare",
        ("--mirror-compare",),
        "counts (ok, error code, document counts) or documents (also the normalised documents)",
        parse=parse_compare,
        default="counts",
        metavar="WHAT",
        group=G,
    ),
    Option(
        "mirror_queue",
        ("--mirror-queue",),
        "copies waiting for the shadow before new ones are dropped",
        parse=parse_queue,
        default=1000,
        metavar="N",
        group=G,
    ),
]


class _Framer(Framer):
    """Splits one direction into whole messages (protocol's Framer), keeping those `keep(header)` wants.

    A message larger than MAX_MESSAGE_BYTES is passed over, not kept; a bad length stops the direction.
    """

    __slots__ = ("buf", "keeping", "keep", "out")

    def __init__(self) -> None:
        super().__init__()
        self.buf = bytearray()
        self.keeping = False
        self.keep: Any = None
        self.out: list[bytes] = []

    def feed(self, data: bytes, keep: Any) -> list[bytes]:
        """The messages data completes (the ones keep(header bytes) wanted)."""
        self.keep = keep
        self.out = []
        self._frame(data, 0)
        return self.out

    def _on_header_bytes(self, data: Any, start: int, end: int, now_ns: int) -> None:
        self.buf += data[start:end]

    def _on_header(self, length: int, request_id: int, response_to: int, opcode: int) -> None:
        self.keeping = length <= MAX_MESSAGE_BYTES and self.keep(self.buf)
        if not self.keeping:
            self.buf.clear()

    def _on_body(self, data: Any, start: int, end: int) -> None:
        if self.keeping:
            self.buf += data[start:end]

    def _on_end(self, now_ns: int) -> None:
        if self.keeping:
            self.out.append(bytes(self.buf))
        self.buf.clear()
        self.keeping = False

    def _on_bad_length(self, length: int, request_id: int, opcode: int) -> None:
        self.buf.clear()


class _ConnState:
    """What the loop keeps per client connection: the framers, requests awaiting replies, copies awaiting bytes."""

    __slots__ = ("requests", "replies", "pending", "awaiting", "cursors")

    def __init__(self) -> None:
        self.requests = _Framer()
        self.replies = _Framer()  # --mirror-compare documents only: the primary's documents
        self.pending: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        # request id -> the copy, until the reply's last byte passes on_data (its event comes just before).
        self.awaiting: collections.OrderedDict[int, tuple] = collections.OrderedDict()
        self.cursors: collections.OrderedDict[int, None] = collections.OrderedDict()  # mirrored primary cursor ids


class MirrorSink:
    """The mirror: selection on the event loop, a bounded queue, the shadow client in a thread of its own."""

    name = "mirror"

    def __init__(
        self,
        uri: str,
        registry: Any,
        ops: tuple[str, ...] | None = None,
        namespaces: tuple[str, ...] = (),
        ratio: float = 1.0,
        writes: bool = False,
        documents: bool = False,
        queue_size: int = 1000,
        logger: logging.Logger | None = None,
    ) -> None:
        self.uri = uri
        self.log = logger or logging.getLogger("mongoproxy.mirror")
        default = READ_OPS + (WRITE_OPS if writes else ())
        self.ops = frozenset(o.lower() for o in (ops or default))
        self.writes = writes
        self.ns = NamespaceFilter(tuple(namespaces))
        self.ratio = ratio
        self.documents = documents
        self.queue: queue.Queue = queue.Queue(queue_size)
        self.conns: dict[int, _ConnState] = {}
        self._collections: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # primary cursor id -> (shadow cursor id, ordered); only the shadow thread touches it.
        self.shadow_cursors: collections.OrderedDict[int, tuple[int, bool]] = collections.OrderedDict()
        self._log_budget = 10.0  # divergence log lines: 10 a minute, bursts of 10
        self._log_at = time.monotonic()
        self.suppressed_logs = 0
        self.mirrored = Counter(
            "mongoproxy_mirror_requests_total", "Copies sent to the shadow", ["op"], registry=registry
        )
        self.dropped = Counter(
            "mongoproxy_mirror_dropped_total",
            "Copies not sent: queue_full (the shadow is behind), too_large, undecodable, no_cursor, write_aggregate, fault",
            ["reason"],
            registry=registry,
        )
        self.latency = Histogram(
            "mongoproxy_mirror_latency_seconds",
            "Latency of mirrored commands on the primary (request to reply, as the proxy saw it) and on the shadow",
            ["target", "op", "collection"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.divergences = Counter(
            "mongoproxy_mirror_divergences_total",
            "Mirrored commands whose shadow reply differs: ok, error_code, document_count, documents",
            ["op", "collection", "kind"],
            registry=registry,
        )
        self.shadow_errors = Counter(
            "mongoproxy_mirror_shadow_errors_total",
            "Mirrored commands that got no reply from the shadow (network, timeout), by exception",
            ["op", "error"],
            registry=registry,
        )
        self.compared = Counter(
            "mongoproxy_mirror_compared_total", "Shadow replies compared with the primary's", ["op"], registry=registry
        )
        self.not_compared = Counter(
            "mongoproxy_mirror_documents_not_compared_total",
            f"Unsorted mirrored cursors whose documents were not compared (over {compare.MAX_CURSOR_DOCUMENTS} "
            "documents, or forgotten)",
            ["op"],
            registry=registry,
        )
        # Documents of open unsorted cursors, compared over the whole cursor; only the shadow thread touches it.
        self.cursor_documents = compare.CursorDocuments()
        depth = Gauge("mongoproxy_mirror_queue_depth", "Copies waiting for the shadow", registry=registry)
        depth.set_function(self.queue.qsize)
        if writes:
            self.log.warning(
                "--mirror-writes: insert, update, delete and findAndModify are sent to the shadow %s and CHANGE "
                "its data; mirror writes only to a disposable copy",
                _redact_uri(uri),
            )

    # ------------------------------------------------------------------ the event loop's side (cheap)

    def start(self) -> None:
        """Start the shadow thread."""
        self._thread = threading.Thread(target=self._thread_main, name="mirror", daemon=True)
        self._thread.start()

    def on_data(self, conn: Any, from_client: bool, data: bytes, now_ns: int) -> None:
        st = self.conns.get(conn.id)
        if st is None:
            st = self.conns[conn.id] = _ConnState()
        if not from_client:
            if self.documents:
                self._replies(st, data)
            return
        for msg in st.requests.feed(data, _is_request):
            pending = st.pending
            pending[HEADER.unpack_from(msg)[1]] = msg
            if len(pending) > PENDING_PER_CONNECTION:  # unacknowledged requests never get an event
                pending.popitem(last=False)

    def _replies(self, st: _ConnState, data: bytes) -> None:
        """Complete the copies awaiting the primary's reply bytes."""

        def wanted(header: bytes) -> bool:
            rto = HEADER.unpack_from(header)[2]
            return rto in st.awaiting or rto in st.pending

        for msg in st.replies.feed(data, wanted):
            item = st.awaiting.pop(HEADER.unpack_from(msg)[2], None)
            if item is not None:
                self._enqueue(item + (msg,))

    def on_connection_close(self, conn: Any) -> None:
        self.conns.pop(conn.id, None)

    def on_command(self, event: Any) -> None:
        conn = event.connection
        st = self.conns.get(conn.id)
        request = st.pending.pop(event.request_id, None) if st is not None else None
        key = event.op.lower()
        if key not in self.ops or event.exhaust or event.reply is None:
            return
        if getattr(event, "fault", ""):  # the primary's reply was a drill (mongoproxy.faults): nothing to compare
            self.dropped.labels("fault").inc()
            return
        if key == "getmore":
            if st is None or event.request.cursor_id not in st.cursors:
                return
            if not event.cursor_id:
                del st.cursors[event.request.cursor_id]
        else:
            if self.ns and not self.ns(event.database, event.collection):
                return
            if self.ratio < 1.0 and random.random() >= self.ratio:
                return
        if request is None:
            self.dropped.labels("too_large").inc()
            return
        primary = compare.Outcome.from_scan(event.reply)
        if key in ("find", "aggregate") and event.cursor_id and st is not None:
            st.cursors[event.cursor_id] = None
            if len(st.cursors) > CURSORS_PER_CONNECTION:
                st.cursors.popitem(last=False)
        item = (conn.id, event.op, event.database, event.collection, request, primary, event.duration_ns)
        if self.documents and st is not None:
            st.awaiting[event.request_id] = item
            if len(st.awaiting) > PENDING_PER_CONNECTION:  # a reply too large to keep never completes its copy
                st.awaiting.popitem(last=False)
                self.dropped.labels("too_large").inc()
        else:
            self._enqueue(item + (None,))

    # ------------------------------------------------------------------ admin API (admin_routes contract)

    def admin_routes(self) -> list:
        """GET /mirror: divergence counts per op, collection and kind; drops; queue depth."""
        from aiohttp import web

        return [web.get("/mirror", self.handle_get)]

    def document(self) -> dict:
        """The /mirror JSON, read from the sink's counters (bounded: ops x MAX_COLLECTIONS x kinds rows)."""
        divergences = [
            {"op": labels["op"], "collection": labels["collection"], "kind": labels["kind"], "count": int(v)}
            for labels, v in _samples(self.divergences)
        ]
        divergences.sort(key=lambda r: (-r["count"], r["op"], r["collection"], r["kind"]))
        return {
            "shadow": _redact_uri(self.uri),
            "compare": "documents" if self.documents else "counts",
            "ratio": self.ratio,
            "writes": self.writes,
            "queue": {"depth": self.queue.qsize(), "capacity": self.queue.maxsize},
            "mirrored": {labels["op"]: int(v) for labels, v in _samples(self.mirrored)},
            "compared": {labels["op"]: int(v) for labels, v in _samples(self.compared)},
            "dropped": {labels["reason"]: int(v) for labels, v in _samples(self.dropped)},
            "shadow_errors": [
                {"op": labels["op"], "error": labels["error"], "count": int(v)}
                for labels, v in _samples(self.shadow_errors)
            ],
            "documents_not_compared": {labels["op"]: int(v) for labels, v in _samples(self.not_compared)},
            "divergences_total": sum(r["count"] for r in divergences),
            "divergences": divergences,
        }

    async def handle_get(self, request: Any) -> Any:
        """GET /mirror."""
        from aiohttp import web

        return web.json_response(self.document())

    def _enqueue(self, item: tuple) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.dropped.labels("queue_full").inc()
            # A getMore of a dropped find would find no cursor on the shadow: it is counted as no_cursor.

    # ------------------------------------------------------------------ the shadow's side (its own thread)

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._run())
        except Exception as exc:  # noqa: BLE001 - the mirror failing must never reach the proxy
            self.log.error("mirror stopped: %r", exc)
        finally:
            loop.close()

    async def _run(self) -> None:
        from bson.codec_options import CodecOptions
        from bson.raw_bson import RawBSONDocument
        from pymongo import AsyncMongoClient

        self.codec = CodecOptions(document_class=RawBSONDocument)
        from pymongo.uri_parser import parse_uri

        given = {k.lower() for k in parse_uri(self.uri)["options"]}
        timeouts: dict[str, Any] = {k: v for k, v in SHADOW_TIMEOUTS_MS.items() if k.lower() not in given}
        client: Any = AsyncMongoClient(
            self.uri,
            appname="mongoproxy-mirror",
            retryReads=False,
            retryWrites=False,
            maxPoolSize=IN_FLIGHT,
            **timeouts,
        )
        chains: dict[int, asyncio.Task] = {}
        slots = asyncio.Semaphore(IN_FLIGHT)
        try:
            while not self._stop.is_set():
                await slots.acquire()  # the queue fills (and drops) while every slot is busy
                item = None
                while item is None and not self._stop.is_set():
                    try:
                        item = self.queue.get_nowait()
                    except queue.Empty:
                        await asyncio.sleep(POLL_SECONDS)
                if item is None:
                    break
                # Commands of one client connection run in order (a getMore after the find that opened its cursor).
                prev = chains.get(item[0])
                chains[item[0]] = asyncio.ensure_future(self._after(prev, client, item, slots))
                if len(chains) > 4 * IN_FLIGHT:
                    chains = {k: t for k, t in chains.items() if not t.done()}
        finally:
            for t in list(chains.values()):
                t.cancel()
            await client.close()

    async def _after(self, prev: asyncio.Task | None, client: Any, item: tuple, slots: asyncio.Semaphore) -> None:
        try:
            if prev is not None and not prev.done():
                await asyncio.wait([prev])
            await self._mirror(client, item)
        except Exception as exc:  # noqa: BLE001 - one bad copy is counted, the mirror goes on
            self.dropped.labels("undecodable").inc()
            self.log.debug("mirror copy failed: %r", exc)
        finally:
            slots.release()

    async def _mirror(self, client: Any, item: tuple) -> None:
        from pymongo.errors import OperationFailure, PyMongoError

        from mongoproxy import _bson_parser
        from mongoproxy.commandspec import command_spec
        from mongoproxy.protocol.compression import uncompressed

        conn_id, op, db, coll, request, primary, primary_ns, primary_reply = item
        data = uncompressed(request)
        opcode = HEADER.unpack_from(data)[3]
        spec, _ = command_spec(data, opcode)
        for k in SESSION_FIELDS & spec.keys():
            del spec[k]
        key = op.lower()
        ordered = False
        ref = 0
        if key == "getmore":
            ref = int(spec["getMore"])
            got = self.shadow_cursors.get(ref)
            if got is None:
                self.dropped.labels("no_cursor").inc()
                return
            ordered = got[1]
            if not got[0]:  # the shadow's cursor ended first: it would return nothing more
                self.mirrored.labels(op).inc()
                shadow = compare.Outcome(ok=True, returned=0, cursor_id=0)
                a_docs = _reply_documents(primary_reply) if primary_reply is not None else None
                b_docs: list | None = [] if a_docs is not None else None
                self._judge(op, db, coll, primary, shadow, data, opcode, a_docs, b_docs, ordered, ref, False)
                if not primary.cursor_id:
                    self.shadow_cursors.pop(ref, None)
                return
            from bson import Int64

            spec["getMore"] = Int64(got[0])
        elif key == "aggregate" and pipeline_writes(spec.get("pipeline")):
            if not self.writes:
                self.dropped.labels("write_aggregate").inc()
                return
        else:
            ordered = compare.is_ordered(op, spec)
        label = self._collection(coll)
        self.mirrored.labels(op).inc()
        started = time.perf_counter()
        try:
            reply = await client[db].command(spec, check=False, codec_options=self.codec)
        except OperationFailure as exc:  # check=False: only what pymongo itself refuses
            reply = None
            shadow = compare.Outcome(ok=False, code=exc.code, code_name=str(exc.code), errmsg=str(exc))
        except PyMongoError as exc:
            self.shadow_errors.labels(op, type(exc).__name__).inc()
            return
        elapsed = time.perf_counter() - started
        if reply is not None:
            shadow = compare.Outcome.from_scan(_bson_parser.scan_body(OP_MSG, True, b"\0\0\0\0\0" + reply.raw))
        self.latency.labels("primary", op, label).observe(primary_ns / 1e9)
        self.latency.labels("shadow", op, label).observe(elapsed)
        if primary.cursor_id and key in ("find", "aggregate"):
            self.shadow_cursors[primary.cursor_id] = (shadow.cursor_id or 0, ordered)
            if len(self.shadow_cursors) > MAX_CURSORS:  # cursors a client never exhausted nor killed
                self.shadow_cursors.popitem(last=False)
        elif key == "getmore":
            if primary.cursor_id:
                self.shadow_cursors[ref] = (shadow.cursor_id or 0, ordered)
            else:
                self.shadow_cursors.pop(ref, None)
        a_docs = b_docs = None
        if primary_reply is not None and reply is not None:
            a_docs = _reply_documents(primary_reply)
            b_docs = compare.reply_documents(reply) if a_docs is not None else None
        first = key != "getmore"
        self._judge(
            op,
            db,
            coll,
            primary,
            shadow,
            data,
            opcode,
            a_docs,
            b_docs,
            ordered,
            primary.cursor_id if first else ref,
            first,
        )

    def _judge(
        self,
        op: str,
        db: str,
        coll: str,
        primary: compare.Outcome,
        shadow: compare.Outcome,
        data: bytes,
        opcode: int,
        a_docs: list | None = None,
        b_docs: list | None = None,
        ordered: bool = False,
        cursor: int | None = None,
        first: bool = True,
    ) -> None:
        label = self._collection(coll)
        self.compared.labels(op).inc()
        for kind in self.cursor_documents.judge(cursor, first, primary, shadow, a_docs, b_docs, ordered):
            if kind == compare.NOT_COMPARED:
                self.not_compared.labels(op).inc()
                continue
            self.divergences.labels(op, label, kind).inc()
            self._log_divergence(op, db, coll, kind, primary, shadow, data, opcode)

    def _collection(self, coll: str) -> str:
        if coll in self._collections or not coll:
            return coll
        if len(self._collections) >= MAX_COLLECTIONS:
            return "_other"
        self._collections.add(coll)
        return coll

    def _log_divergence(self, op: str, db: str, coll: str, kind: str, a: Any, b: Any, data: bytes, opcode: int) -> None:
        now = time.monotonic()
        self._log_budget = min(10.0, self._log_budget + (now - self._log_at) * 10 / 60)
        self._log_at = now
        if self._log_budget < 1:
            self.suppressed_logs += 1
            return
        self._log_budget -= 1
        self.log.warning(
            "mirror divergence %s on %s %s.%s: %s; shape %s",
            kind,
            op,
            db,
            coll,
            compare.describe(kind, a, b),
            _shape(data, opcode),
        )

    def close(self, timeout: float = 5.0) -> None:
        """Stop the shadow thread (copies still queued are discarded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def _samples(counter: Any) -> list[tuple[dict, float]]:
    """(labels, value) of a labelled Counter's _total samples."""
    return [(s.labels, s.value) for m in counter.collect() for s in m.samples if s.name.endswith("_total")]


def _is_request(header: bytes) -> bool:
    """Keep OP_MSG, OP_QUERY and OP_COMPRESSED requests (their replies' events pick them up)."""
    return HEADER.unpack_from(header)[3] in (OP_MSG, OP_QUERY, OP_COMPRESSED)


def _reply_documents(reply: bytes) -> list | None:
    """The documents of the primary's OP_MSG (or OP_REPLY) reply."""
    from bson.raw_bson import RawBSONDocument

    from mongoproxy.commandspec import message_body
    from mongoproxy.protocol.compression import uncompressed

    data = uncompressed(reply)
    opcode = HEADER.unpack_from(data)[3]
    if opcode == OP_REPLY:  # flags, cursorID, startingFrom, numberReturned, then documents
        doc = RawBSONDocument(_first_doc(data, 36))
    else:
        doc = RawBSONDocument(message_body(data, opcode)[0])
    return compare.reply_documents(doc)


def _first_doc(data: bytes, pos: int) -> bytes:
    n = struct.unpack_from("<i", data, pos)[0]
    return bytes(data[pos : pos + n])


def _shape(data: bytes, opcode: int) -> str:
    """The command's redacted shape (every literal a "?")."""
    from mongoproxy import _bson_parser

    try:
        scanner = _bson_parser.BodyScanner()
        body = memoryview(data)[16:]
        scanner.reset(opcode, False, len(body), _bson_parser.RENDER_REDACTED, 300)
        scanner.feed(body)
        return scanner.result().query_shape or "?"
    except Exception:  # noqa: BLE001 - the shape is a courtesy of the log line
        return "?"


def _redact_uri(uri: str) -> str:
    from mongoproxy.replay.target import redact_uri

    return redact_uri(uri)


def create(config: Any, ctx: Any) -> MirrorSink | None:
    """The mirror when --mirror URI is given."""
    uri = getattr(config, "mirror", None)
    if not uri:
        return None
    try:
        from pymongo.uri_parser import parse_uri

        parse_uri(uri)
    except Exception as exc:  # noqa: BLE001 - any reason the URI is unusable is the user's to fix
        raise ConfigError(f"--mirror {_redact_uri(uri)} is not a usable MongoDB URI: {exc}") from None
    ops = getattr(config, "mirror_ops", None) or ()
    writes = sorted({o for o in ops if o.lower() in WRITE_KEYS})
    if writes and not getattr(config, "mirror_writes", False):
        raise ConfigError(
            f"--mirror-ops {','.join(writes)}: writes are mirrored only with --mirror-writes (they change the "
            "shadow's data)"
        )
    sink = MirrorSink(
        uri,
        ctx.registry,
        ops=getattr(config, "mirror_ops", None),
        namespaces=getattr(config, "mirror_ns", ()),
        ratio=getattr(config, "mirror_ratio", 1.0),
        writes=bool(getattr(config, "mirror_writes", False)),
        documents=getattr(config, "mirror_compare", "counts") == "documents",
        queue_size=getattr(config, "mirror_queue", 1000),
        logger=logging.getLogger("mongoproxy.mirror"),
    )
    sink.start()
    return sink
