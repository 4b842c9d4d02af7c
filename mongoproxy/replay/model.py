"""What replay works on: recorded connections, their operations, and the outcome of each reply."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

# Why an operation is not replayed (report keys).
SKIP_HANDSHAKE = "handshake"
SKIP_MONITORING = "monitoring"
SKIP_AUTH = "auth"
SKIP_SESSIONS = "endSessions"
SKIP_LEGACY = "legacy opcode"
SKIP_UNPARSEABLE = "unparseable"
SKIP_FILTERED = "filtered"
SKIP_DESTRUCTIVE = "destructive"
SKIP_CURSOR = "cursor not open on target"


@dataclasses.dataclass(slots=True)
class Outcome:
    """What a reply said: success, error, and the counts that are compared."""

    ok: bool | None = None
    code: int | None = None
    code_name: str = ""
    errmsg: str = ""
    returned: int | None = None
    cursor_id: int | None = None
    n: int | None = None
    write_errors: int = 0
    write_concern_error: bool = False
    exception: str = ""  # a client-side failure (network, timeout) instead of a reply

    @property
    def failed(self) -> bool:
        return self.ok is False or self.write_errors > 0 or self.write_concern_error or bool(self.exception)

    @property
    def error_name(self) -> str:
        if self.exception:
            return self.exception
        if self.ok is False:
            return self.code_name or (f"code {self.code}" if self.code is not None else "error")
        return self.code_name or (f"code {self.code}" if self.code is not None else "write error")

    @classmethod
    def from_scan(cls, r: Any) -> Outcome:
        ok = None if r.ok is None else r.ok == 1.0
        code, name = r.code, r.code_name or ""
        if ok is not False and r.write_errors:
            code, name = r.write_error_code, r.write_error_code_name or ""
        elif ok is not False and r.write_concern_error_code is not None:
            code, name = r.write_concern_error_code, r.write_concern_error_code_name or ""
        return cls(
            ok=ok,
            code=code,
            code_name=name,
            errmsg=r.errmsg or "",
            returned=r.returned,
            cursor_id=r.cursor_id,
            n=r.n,
            write_errors=r.write_errors or 0,
            write_concern_error=r.write_concern_error_code is not None,
        )


@dataclasses.dataclass(eq=False)
class Op:
    """One recorded request, what it got, and (after replay) what the target answered."""

    conn: RecordedConnection
    index: int  # position in its connection
    ts_ns: int  # first byte of the request, Unix ns
    op: str  # command name as sent ("find", "getMore")
    db: str
    coll: str
    request_id: int
    skip: str = ""  # why it is not replayed ("" = replayed)
    spec: dict | None = None  # the command without $db/lsid/$clusterTime, ready for pymongo
    lsid_key: bytes | None = None
    cursor_ref: int | None = None  # getMore: the recorded cursor id
    kill_ids: tuple = ()  # killCursors: recorded cursor ids
    creator: Op | None = None  # the op whose reply opened cursor_ref
    recorded: Outcome | None = None
    recorded_ns: int | None = None  # request first byte to reply last byte
    unacknowledged: bool = False
    # Filled by replay.
    replayed: Outcome | None = None
    replayed_ns: int | None = None
    lag_ns: int = 0
    offset_ns: int = 0  # scheduled time relative to the start
    done: threading.Event | None = None  # set once replayed, for getMores on other connections

    @property
    def ns(self) -> str:
        return f"{self.db}.{self.coll}" if self.coll else self.db

    @property
    def key(self) -> str:
        return self.op.lower()


@dataclasses.dataclass(eq=False)
class RecordedConnection:
    """One recorded client connection and its operations, in order."""

    index: int
    label: str
    source: str
    app: str = ""
    ops: list = dataclasses.field(default_factory=list)

    def replayable(self) -> list:
        return [o for o in self.ops if not o.skip]


@dataclasses.dataclass
class Workload:
    """Everything read from the capture files, with skip reasons and warnings."""

    files: list
    connections: list
    ops: list  # every op, in time order
    warnings: list
    packets: int = 0
    flows: int = 0
    mongo_flows: int = 0
    start_ns: int = 0
    end_ns: int = 0

    def replayable(self) -> list:
        return [o for o in self.ops if not o.skip]

    def skipped(self) -> dict:
        out: dict[str, int] = {}
        for o in self.ops:
            if o.skip:
                out[o.skip] = out.get(o.skip, 0) + 1
        return out
