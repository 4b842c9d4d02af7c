"""Types for the compiled request/reply tracker (mongoproxy/tracker.pyx)."""

from typing import Any

class CommandEvent:
    """One command: a request and its reply (or none, for moreToCome requests)."""

    connection: Any  # events.Connection
    op: str  # command name ("find", "getMore", "insert"), or legacy op ("query", "op_insert")
    database: str
    collection: str  # "" when the command has none; getMore: its cursor's collection
    request_id: int
    request_opcode: int
    request_size: int
    request_first_ns: int
    request_last_ns: int
    request: Any  # ScanResult
    reply_opcode: int
    reply_size: int
    reply_first_ns: int
    reply_last_ns: int
    reply: Any  # ScanResult, None when no reply is expected or none came
    reply_request_id: int
    # Outcome, from the reply.
    ok: bool | None
    code: int | None
    code_name: str
    errmsg: str
    documents_returned: int | None
    documents_changed: int | None
    cursor_id: int | None  # open cursor after this reply (0 = exhausted)
    more_to_come_request: bool  # unacknowledged write: no reply will come
    exhaust: bool  # this reply arrived as a moreToCome continuation
    exhaust_index: int  # 0 for the direct reply, 1.. for streamed replies
    awaitable: bool  # a monitoring hello the server may hold for maxAwaitTimeMS (exhaustAllowed)
    decode_error: str  # reason token when the request or reply failed to decode
    query_cache: Any  # the querylog.Query once a sink asked for it: the shape is computed once per command
    fault: str  # the fault rule applied to this command (mongoproxy.faults), "" when none
    hello: bool  # the handshake/monitoring command (protocol.commands.is_hello(op)), computed once

    def __init__(
        self,
        connection: Any,
        op: str,
        database: str,
        collection: str,
        request_id: int,
        request_opcode: int,
        request_size: int,
        request_first_ns: int,
        request_last_ns: int,
        request: Any,
        reply_opcode: int = 0,
        reply_size: int = 0,
        reply_first_ns: int = 0,
        reply_last_ns: int = 0,
        reply: Any = None,
        reply_request_id: int = 0,
        ok: bool | None = None,
        code: int | None = None,
        code_name: str = "",
        errmsg: str = "",
        documents_returned: int | None = None,
        documents_changed: int | None = None,
        cursor_id: int | None = None,
        more_to_come_request: bool = False,
        exhaust: bool = False,
        exhaust_index: int = 0,
        awaitable: bool = False,
        decode_error: str = "",
        query_cache: Any = None,
        fault: str = "",
    ) -> None: ...
    @property
    def duration_ns(self) -> int:
        """Request first byte to reply last byte; 0 when there is no reply."""
    @property
    def failed(self) -> bool:
        """ok:0, a write error or a write-concern error."""

class Pending:
    """A request waiting for its reply, or an exhaust stream waiting for its next one."""

    request: Any  # ScanResult or None
    op: str
    database: str
    collection: str
    error: str
    request_id: int
    opcode: int
    wire_opcode: int
    length: int
    first_ns: int
    last_ns: int
    hello: bool
    exhaust_index: int
    last_reply_id: int
    last_reply_ns: int

class Tracker:
    """Matches one connection's replies to its requests and emits events on the bus."""

    conn: Any
    bus: Any
    max_pending: int
    pending: dict[int, Pending]
    exhaust: dict[int, Pending]

    def __init__(self, conn: Any, bus: Any, max_pending: int = 1000) -> None: ...
    @property
    def in_flight(self) -> int: ...
    def on_request(self, msg: Any) -> None: ...
    def on_reply(self, msg: Any) -> None: ...
    def unanswered(self, request_id: int) -> None: ...

class Fanout:
    """SinkBus.command, compiled: calls each sink's on_command with the event; one that raises goes to `failed`."""

    def __init__(self, hooks: list[Any], failed: Any) -> None: ...
    def __call__(self, event: CommandEvent) -> None:
        """Deliver one CommandEvent to every sink; a sink's exception never reaches the caller."""
