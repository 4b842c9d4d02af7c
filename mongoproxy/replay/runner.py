"""The scheduler and runner: ops stream in, a thread per recorded connection (and copy) sends each at its time.

Memory is bounded by the in-flight window: the dispatcher reads the next op only when fewer than `window`
are waiting or running, so a 10 GB recording replays in the memory of its busiest moment. `scale` copies of
every recorded connection run side by side, each copy with its own cursor and session maps (a getMore only
ever continues its own copy's cursor) and, with `ns_suffix`, its own collections.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from mongoproxy import compare
from mongoproxy.protocol.opcodes import OP_MSG
from mongoproxy.replay.model import SKIP_CURSOR, Op, RecordedConnection
from mongoproxy.replay.reader import NS_PER_S
from mongoproxy.replay.rewrite import CursorMap, SessionMap
from mongoproxy.replay.target import Target

DEFAULT_WINDOW = 512
TICK_S = 0.1


class Replayer:
    """Runs the replayable ops of a stream: a thread per recorded connection and copy, started at its first op."""

    DEPENDENCY_TIMEOUT_S = 60.0

    def __init__(
        self,
        ops: Iterable[Any],
        target: Target,
        speed: float | None,
        tally: Any,
        decide: Callable[[Op], None] | None = None,
        scale: int = 1,
        verify: str | None = None,
        ns_suffix: str | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self.ops = ops
        self.target = target
        self.speed = speed  # None: as fast as possible
        self.tally = tally
        self.decide = decide
        self.scale = max(1, scale)
        self.verify = verify  # None, "counts" or "documents"
        self.ns_suffix = ns_suffix
        self.cursors = [CursorMap() for _ in range(self.scale)]
        self.sessions = [SessionMap() for _ in range(self.scale)]
        self.documents = compare.CursorDocuments()  # unsorted cursors, keyed (copy, recorded cursor id)
        self._slots = threading.Semaphore(max(window, self.scale))
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.done_ops = 0
        self.max_lag_ns = 0
        self.current_lag_ns = 0
        self.errors = 0
        self.started_ns = 0
        self.finished_ns = 0
        self.connections = 0  # (recorded connection, copy) pairs replayed
        self.origin_ns: int | None = None
        self._t0 = time.perf_counter()
        from bson.codec_options import CodecOptions
        from bson.raw_bson import RawBSONDocument

        self.codec: Any = CodecOptions(document_class=RawBSONDocument)

    def _due(self, op: Op) -> float:
        """Seconds (perf_counter) at which op is due."""
        if self.speed is None or self.origin_ns is None:
            return 0.0
        return self._t0 + (op.ts_ns - self.origin_ns) / NS_PER_S / self.speed

    def run(self, on_tick: Any = None) -> None:
        """Replay the stream; on_tick(replayer) is called about ten times a second from this thread."""
        workers: dict[tuple[int, int], tuple[queue.SimpleQueue, threading.Thread]] = {}
        threads: list[threading.Thread] = []
        self._t0 = time.perf_counter()
        self.started_ns = time.time_ns()
        next_tick = time.perf_counter() + TICK_S
        try:
            for x in self.ops:
                if self.stop.is_set():
                    break
                if isinstance(x, RecordedConnection):  # it has ended: its threads finish what they hold, then exit
                    for k in range(self.scale):
                        w = workers.pop((x.index, k), None)
                        if w is not None:
                            w[0].put(None)
                    continue
                op: Op = x
                if self.decide is not None:
                    self.decide(op)
                self.tally.seen(op)
                if op.skip:
                    continue
                if self.origin_ns is None:  # the clock starts with the first replayed command
                    self.origin_ns = op.ts_ns
                    self._t0 = time.perf_counter()
                if op.recorded is not None and op.recorded.cursor_id and op.key != "getmore":
                    op.done = [threading.Event() for _ in range(self.scale)]
                for k in range(self.scale):
                    while not self._slots.acquire(timeout=TICK_S):
                        if on_tick is not None:
                            on_tick(self)
                    w = workers.get((op.conn.index, k))
                    if w is None:
                        q: queue.SimpleQueue = queue.SimpleQueue()
                        t = threading.Thread(
                            target=self._run_connection, args=(q, k), name=f"replay-{op.conn.index}-{k}", daemon=True
                        )
                        w = workers[(op.conn.index, k)] = (q, t)
                        t.start()
                        threads.append(t)
                        self.connections += 1
                    w[0].put(op)
                if on_tick is not None and time.perf_counter() >= next_tick:
                    on_tick(self)
                    next_tick = time.perf_counter() + TICK_S
            for q, _ in workers.values():
                q.put(None)
            for t in threads:
                while t.is_alive():
                    t.join(TICK_S)
                    if on_tick is not None:
                        on_tick(self)
        except KeyboardInterrupt:
            self.stop.set()
            for q, _ in workers.values():
                q.put(None)
            for t in threads:
                t.join(5)
            raise
        finally:
            self.finished_ns = time.time_ns()
            for s in self.sessions:
                s.end()
            if on_tick is not None:
                on_tick(self)

    def _run_connection(self, q: queue.SimpleQueue, copy: int) -> None:
        client = self.target.acquire()
        try:
            while True:
                op = q.get()
                if op is None:
                    return
                try:
                    if not self.stop.is_set():
                        self._one(client, op, copy)
                finally:
                    self._slots.release()
        finally:
            self.target.release(client)

    def _spec(self, op: Op, copy: int) -> dict:
        spec = dict(op.spec or {})
        if self.ns_suffix and copy > 0 and op.coll:
            renamed = f"{op.coll}{self.ns_suffix}{copy}"
            first = next(iter(spec), None)
            if first is not None and spec[first] == op.coll:
                spec[first] = renamed
            if op.key == "getmore":
                spec["collection"] = renamed
        return spec

    def _one(self, client: Any, op: Op, copy: int) -> None:
        """Replay one op (one copy of it) on its connection's pinned client when it is due."""
        from pymongo.errors import PyMongoError

        from mongoproxy import _bson_parser

        due = self._due(op)
        now = time.perf_counter()
        if self.speed is not None and due > now:
            if self.stop.wait(due - now):
                return
        spec = self._spec(op, copy)
        cursors = self.cursors[copy]
        if op.key in ("getmore", "killcursors"):
            # Cursor ids come from the target's answer to the command that opened the cursor, in this copy.
            creator = op.creator
            if creator is not None and creator.done is not None:
                creator.done[copy].wait(self.DEPENDENCY_TIMEOUT_S)
            if not cursors.rewrite(op, spec):
                self._finish(op, copy, None, None, 0, skip=SKIP_CURSOR)
                return
        session = None
        if op.lsid_key is not None:
            client, session = self.sessions[copy].get(op.lsid_key, client)
        start = time.perf_counter()
        lag = int(max(0.0, start - due) * NS_PER_S) if self.speed is not None else 0
        reply = None
        try:
            reply = client[op.db].command(spec, check=False, codec_options=self.codec, session=session)
            elapsed = int((time.perf_counter() - start) * NS_PER_S)
            outcome = compare.Outcome.from_scan(_bson_parser.scan_body(OP_MSG, True, b"\0\0\0\0\0" + reply.raw))
        except PyMongoError as exc:
            elapsed = int((time.perf_counter() - start) * NS_PER_S)
            outcome = compare.Outcome(exception=type(exc).__name__, errmsg=str(exc).split(", full error:")[0])
        except Exception as exc:  # noqa: BLE001 - an undecodable reply or a command pymongo refuses to encode
            elapsed = int((time.perf_counter() - start) * NS_PER_S)
            outcome = compare.Outcome(exception=type(exc).__name__, errmsg=str(exc))
        cursors.update(op, outcome)
        if op.key == "killcursors":
            for c in op.kill_ids:
                self.documents.forget((copy, c))
        kinds: list[tuple[str, str]] = []
        if self.verify and op.recorded is not None:
            b_docs = None
            if self.verify == "documents" and reply is not None and op.recorded_docs is not None:
                b_docs = compare.reply_documents(reply)
            first = op.key != "getmore"
            key = (copy, op.recorded.cursor_id if first else op.cursor_ref)
            ordered = _ordered(op)
            got = self.documents.judge(key, first, op.recorded, outcome, op.recorded_docs, b_docs, ordered)
            # A documents divergence of an unsorted cursor is over the whole cursor: this reply's _ids would not name it.
            alone = ordered or (first and not op.recorded.cursor_id)
            for kind in got:
                example = compare.describe(kind, op.recorded, outcome)
                ids = compare.id_difference(op.recorded_docs, b_docs) if alone or kind != compare.KIND_DOCUMENTS else ""
                kinds.append((kind, f"{example}; {ids}" if ids else example))
        self._finish(op, copy, outcome, elapsed, lag, kinds=kinds)

    def _finish(
        self,
        op: Op,
        copy: int,
        outcome: compare.Outcome | None,
        elapsed: int | None,
        lag: int,
        skip: str = "",
        kinds: list[tuple[str, str]] | None = None,
    ) -> None:
        with self._lock:
            self.done_ops += 1
            if lag > self.max_lag_ns:
                self.max_lag_ns = lag
            self.current_lag_ns = lag
            if outcome is not None and outcome.failed:
                self.errors += 1
            self.tally.result(op, copy, outcome, elapsed, skip, kinds or ())
            op.copies_done += 1
            if op.copies_done == self.scale:
                op.recorded_docs = None  # compared by every copy; an open cursor keeps its op, not its documents
        if op.done is not None:
            op.done[copy].set()


def _ordered(op: Op) -> bool:
    """Whether the op's documents come in a defined order (a getMore: its cursor's command's)."""
    src = op.creator if op.key == "getmore" and op.creator is not None else op
    return compare.is_ordered(src.op, src.spec)
