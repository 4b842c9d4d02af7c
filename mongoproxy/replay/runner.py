"""The scheduler and runner: a thread per recorded connection, each op sent at its recorded relative time."""

from __future__ import annotations

import threading
import time
from typing import Any

from mongoproxy.protocol.opcodes import OP_MSG
from mongoproxy.replay.model import SKIP_CURSOR, Op, Outcome, RecordedConnection, Workload
from mongoproxy.replay.reader import NS_PER_S
from mongoproxy.replay.rewrite import CursorMap, SessionMap
from mongoproxy.replay.target import Target


class Replayer:
    """Runs the replayable ops: a thread per recorded connection, started at its first op's time."""

    DEPENDENCY_TIMEOUT_S = 60.0

    def __init__(self, workload: Workload, target: Target, speed: float | None) -> None:
        self.workload = workload
        self.target = target
        self.speed = speed  # None: as fast as possible
        self.cursors = CursorMap()
        self.sessions = SessionMap()
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.done_ops = 0
        self.max_lag_ns = 0
        self.current_lag_ns = 0
        self.errors = 0
        self.started_ns = 0
        self.finished_ns = 0
        self.total = len(workload.replayable())
        # The clock starts with the first replayed command; skipped ones (handshakes) are not waited for.
        self.origin_ns = min((o.ts_ns for o in workload.replayable()), default=workload.start_ns)
        from bson.codec_options import CodecOptions
        from bson.raw_bson import RawBSONDocument

        self.codec: Any = CodecOptions(document_class=RawBSONDocument)
        self._t0 = time.perf_counter()
        for o in workload.replayable():
            if o.creator is not None:
                o.creator.done = o.creator.done or threading.Event()

    def _due(self, op: Op) -> float:
        """Seconds (perf_counter) at which op is due."""
        if self.speed is None:
            return 0.0
        return self._t0 + (op.ts_ns - self.origin_ns) / NS_PER_S / self.speed

    def run(self, on_tick: Any = None) -> None:
        """Replay everything; on_tick(replayer) is called about ten times a second from this thread."""
        conns = [c for c in self.workload.connections if c.replayable()]
        conns.sort(key=lambda c: c.replayable()[0].ts_ns)
        self.target.warm_up(_max_overlap(conns) if self.speed is not None else len(conns))
        self._t0 = time.perf_counter()
        self.started_ns = time.time_ns()
        threads: list[threading.Thread] = []
        pending = list(conns)
        try:
            while pending or any(t.is_alive() for t in threads):
                now = time.perf_counter()
                while pending and self._due(pending[0].replayable()[0]) <= now + 0.002:
                    c = pending.pop(0)
                    t = threading.Thread(target=self._run_connection, args=(c,), name=f"replay-{c.index}", daemon=True)
                    t.start()
                    threads.append(t)
                if on_tick is not None:
                    on_tick(self)
                wait = 0.1
                if pending:
                    wait = min(wait, max(0.0, self._due(pending[0].replayable()[0]) - time.perf_counter()))
                if threads and not pending:
                    alive = [t for t in threads if t.is_alive()]
                    if alive:
                        alive[0].join(wait)
                        continue
                time.sleep(wait)
        except KeyboardInterrupt:
            self.stop.set()
            for t in threads:
                t.join(5)
            raise
        finally:
            self.finished_ns = time.time_ns()
            self.sessions.end()
            if on_tick is not None:
                on_tick(self)

    def _run_connection(self, c: RecordedConnection) -> None:
        client = self.target.acquire()
        try:
            for op in c.replayable():
                if self.stop.is_set():
                    break
                self._one(client, op)
        finally:
            self.target.release(client)

    def _one(self, client: Any, op: Op) -> None:
        """Replay one op on its connection's pinned client when it is due."""
        from pymongo.errors import PyMongoError

        from mongoproxy import _bson_parser

        due = self._due(op)
        now = time.perf_counter()
        if self.speed is not None and due > now:
            if self.stop.wait(due - now):
                return
        spec = dict(op.spec or {})
        if op.key in ("getmore", "killcursors"):
            # Cursor ids come from the target's answer to the command that opened the cursor.
            if op.creator is not None and op.creator.done is not None:
                op.creator.done.wait(self.DEPENDENCY_TIMEOUT_S)
            if not self.cursors.rewrite(op, spec):
                self._finish(op, None, None, skip=SKIP_CURSOR)
                return
        session = None
        if op.lsid_key is not None:
            client, session = self.sessions.get(op.lsid_key, client)
        start = time.perf_counter()
        op.lag_ns = int(max(0.0, start - due) * NS_PER_S) if self.speed is not None else 0
        op.offset_ns = int((start - self._t0) * NS_PER_S)
        try:
            reply = client[op.db].command(spec, check=False, codec_options=self.codec, session=session)
            elapsed = int((time.perf_counter() - start) * NS_PER_S)
            outcome = Outcome.from_scan(_bson_parser.scan_body(OP_MSG, True, b"\0\0\0\0\0" + reply.raw))
        except PyMongoError as exc:
            elapsed = int((time.perf_counter() - start) * NS_PER_S)
            outcome = Outcome(exception=type(exc).__name__, errmsg=str(exc).split(", full error:")[0])
        except Exception as exc:  # noqa: BLE001 - an undecodable reply or a command pymongo refuses to encode
            elapsed = int((time.perf_counter() - start) * NS_PER_S)
            outcome = Outcome(exception=type(exc).__name__, errmsg=str(exc))
        self.cursors.update(op, outcome)
        self._finish(op, outcome, elapsed)

    def _finish(self, op: Op, outcome: Outcome | None, elapsed: int | None, skip: str = "") -> None:
        op.replayed = outcome
        op.replayed_ns = elapsed
        if skip:
            op.skip = skip
        with self._lock:
            self.done_ops += 1
            if op.lag_ns > self.max_lag_ns:
                self.max_lag_ns = op.lag_ns
            self.current_lag_ns = op.lag_ns
            if outcome is not None and outcome.failed:
                self.errors += 1
        if op.done is not None:
            op.done.set()


def _max_overlap(conns: list[RecordedConnection]) -> int:
    """The most recorded connections that have replayable ops in flight at once."""
    events = []
    for c in conns:
        ops = c.replayable()
        events.append((ops[0].ts_ns, 1))
        events.append((ops[-1].ts_ns + 1, -1))
    best = cur = 0
    for _, d in sorted(events):
        cur += d
        best = max(best, cur)
    return best
