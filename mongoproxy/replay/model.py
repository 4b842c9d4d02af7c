"""What replay works on: recorded connections, their operations, and the outcome of each reply."""

from __future__ import annotations

import dataclasses

from mongoproxy.compare import Outcome

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
SKIP_GLE = "getLastError (the converted write is acknowledged itself)"


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
    conversion: str = ""  # how a legacy request became a command ("OP_INSERT -> insert"), "" for none
    recorded_docs: list | None = None  # the recorded reply's documents (replay --verify documents)
    # Filled by replay.
    replayed: Outcome | None = None
    replayed_ns: int | None = None
    lag_ns: int = 0
    offset_ns: int = 0  # scheduled time relative to the start
    copies_done: int = 0  # copies (--scale) replayed so far
    done: list | None = None  # per copy, a threading.Event set once replayed (for getMores on other connections)

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
class Stream:
    """What reading the capture found besides the operations: counts, warnings, conversions (filled as it goes)."""

    files: list
    warnings: list = dataclasses.field(default_factory=list)
    packets: int = 0
    tcp_packets: int = 0
    flows: int = 0
    mongo_flows: int = 0
    connections: int = 0
    operations: int = 0
    start_ns: int = 0
    end_ns: int = 0
    conversions: dict = dataclasses.field(default_factory=dict)  # conversion name -> count
    finished: bool = False


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
    conversions: dict = dataclasses.field(default_factory=dict)

    def replayable(self) -> list:
        return [o for o in self.ops if not o.skip]

    def skipped(self) -> dict:
        out: dict[str, int] = {}
        for o in self.ops:
            if o.skip:
                out[o.skip] = out.get(o.skip, 0) + 1
        return out
