"""Types for the compiled incremental, selective message-body scanner.

DecodeError reasons raised by the scanner (a fixed vocabulary, see DECODE_REASONS):
unknown_opcode, truncated, trailing_bytes, bad_length, missing_terminator,
string_not_terminated, unknown_type, bad_section_kind, invalid_utf8.
"""

# Op codes the scanner understands (the header is parsed by mongoproxy.protocol.framing).
OP_REPLY: int  # 1
OP_UPDATE: int  # 2001
OP_INSERT: int  # 2002
OP_QUERY: int  # 2004
OP_GET_MORE: int  # 2005
OP_DELETE: int  # 2006
OP_KILL_CURSORS: int  # 2007
OP_COMMAND: int  # 2010
OP_COMMANDREPLY: int  # 2011
OP_MSG: int  # 2013

MAX_STRING: int  # 512: captured strings are cut to this many bytes (at a UTF-8 boundary)

RENDER_OFF: int  # 0
RENDER_REDACTED: int  # 1: literal values become "?"
RENDER_VALUES: int  # 2: literal values shown; secrets still "?"
RENDER_STRING_MAX: int  # 128: rendered string values are cut here (RENDER_VALUES)

DECODE_REASONS: tuple[str, ...]  # every DecodeError.reason the scanner raises (metric label values)

class ScanResult:
    """Fields extracted from one message body. Absent fields are None."""

    opcode: int
    flags: int  # OP_MSG flagBits, OP_QUERY flags, OP_REPLY responseFlags, OP_INSERT/UPDATE/DELETE flags; else 0
    checksum: int | None  # OP_MSG CRC-32C when checksumPresent

    # requests
    command: str | None  # first key of the command body (OP_MSG, OP_QUERY on $cmd, OP_COMMAND)
    collection: str | None  # first value when a string; getMore: its `collection` field
    database: str | None  # `$db`; legacy: the part of fullCollectionName before the first '.'
    namespace: str | None  # legacy ops: fullCollectionName as sent
    cursor_id: int | None  # getMore's first value; killCursors `cursors.0`; reply: cursor.id / OP_REPLY cursorID;
    # legacy OP_GET_MORE cursorID, OP_KILL_CURSORS first id
    comment: str | None  # `comment` when a string (wherever its section lies), else the first legacy
    # `$comment` string in body order: filter/q/query/pipeline.0.$match/updates.0.q/deletes.0.q, and
    # q.$comment in the first document of an OP_MSG kind-1 `updates`/`deletes` sequence
    comment_traceparent: str | None  # `comment.traceparent` when comment is a document
    comment_tracestate: str | None
    app_name: str | None  # client.application.name
    driver_name: str | None  # client.driver.name
    driver_version: str | None  # client.driver.version
    compression: list[str] | None  # request or hello reply `compression` array
    documents: int  # docs in kind-1 sections + elements of root `documents`/`updates`/`deletes`;
    # OP_INSERT docs; OP_COMMAND inputDocs
    query_shape: str | None  # JSON text of the body when rendering was asked for (see BodyScanner.reset)

    # replies
    ok: float | None
    code: int | None
    code_name: str | None
    errmsg: str | None
    cursor_ns: str | None
    returned: int | None  # cursor.firstBatch / cursor.nextBatch elements; else OP_REPLY numberReturned
    n: int | None
    n_modified: int | None
    upserted: int | None  # element count
    write_errors: int | None  # element count
    write_error_code: int | None  # writeErrors.0.code
    write_error_code_name: str | None  # writeErrors.0.codeName
    write_concern_error_code: int | None
    write_concern_error_code_name: str | None
    last_error_n: int | None  # lastErrorObject.n
    set_name: str | None
    me: str | None
    max_wire_version: int | None

    def __init__(self, **fields: object) -> None:
        """Build one by hand (tests, replay); unnamed fields stay None (flags, documents: 0)."""
    def as_dict(self) -> dict[str, object]:
        """All fields as a dict (None for absent ones)."""

class BodyScanner:
    """Scans one message body at a time, chunk by chunk, with O(1) state.

    reset() before each body; feed() slices until done. Raises
    mongoproxy.errors.DecodeError on malformed input; the caller then skips
    the rest of the body by its length. After an error feed() raises again
    until the next reset(); once done, feed() returns 0. reset() raises
    DecodeError("unknown_opcode") for op codes it does not know (not OP_COMPRESSED).
    """

    done: bool
    consumed: int  # body bytes consumed so far

    def __init__(self, max_string: int = ...) -> None: ...
    def reset(self, opcode: int, is_reply: bool, body_length: int, render: int = ..., render_limit: int = ...) -> None:
        """Start a new body of body_length bytes (everything after the 16-byte header).

        render (default RENDER_OFF) fills ScanResult.query_shape with compact JSON of the
        command/reply document (OP_MSG kind 0, OP_QUERY query, OP_REPLY first document,
        OP_COMMAND commandArgs, OP_COMMANDREPLY commandReply). An OP_MSG request's first
        statement of its first kind-1 `updates`/`deletes` sequence is added before the closing
        brace as `"updates":[{...}]` / `"deletes":[{...}]` (what a one-statement command sent in
        kind 0 renders), whichever section comes first; inserted `documents` never render:
          RENDER_REDACTED: every literal is "?"; keys and nesting kept; the command's
            collection string, root `$db` and root `collection` strings are shown.
          RENDER_VALUES: strings cut at RENDER_STRING_MAX bytes (+ "…"), binary
            "<binary n>", ObjectId {"$oid": hex}, datetime {"$date": ms}, timestamp
            {"$timestamp": {"t", "i"}}, regex "/pattern/flags", decimal128 "<decimal128>".
          Always "?": values of `payload`, `pwd` and `speculativeAuthenticate` (any depth)
            and every value of an `authenticate` command.
        Past render_limit (default 4096, >= 16) bytes, or nesting deeper than 100, the
        text ends with "…" (and is no longer valid JSON); scanning and extraction go on.
        """
    def feed(self, data: bytes | bytearray | memoryview, start: int = ..., end: int = ...) -> int:
        """Consume data[start:end] up to the body's end; return the bytes consumed."""
    def result(self) -> ScanResult:
        """A new ScanResult for the body scanned so far (complete once done)."""
    def scan(
        self,
        data: bytes | bytearray | memoryview,
        start: int,
        end: int,
        opcode: int,
        is_reply: bool,
        render: int = ...,
        render_limit: int = ...,
    ) -> ScanResult:
        """One whole body, data[start:end], in one call: reset + feed + result.

        DecodeError("truncated") when the body ends before its layout does.
        """

def scan_body(opcode: int, is_reply: bool, body: bytes | bytearray | memoryview) -> ScanResult:
    """Convenience: scan a complete body in one call."""
