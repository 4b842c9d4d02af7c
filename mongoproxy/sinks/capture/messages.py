"""What of each message is recorded: stream it or hold it whole, blank its secrets, filter by namespace, pseudonymise."""

from __future__ import annotations

import struct
from typing import Any

from mongoproxy import redact
from mongoproxy.errors import DecodeError
from mongoproxy.protocol import compression
from mongoproxy.protocol.commands import HELLO_COMMANDS, SENSITIVE_COMMANDS, is_sensitive
from mongoproxy.protocol.framing import Framer
from mongoproxy.protocol.opcodes import (
    COMPRESSED_PREFIX,
    HEADER,
    HEADER_SIZE,
    MORE_TO_COME,
    OP_COMPRESSED,
    OP_MSG,
    OP_QUERY,
)
from mongoproxy.sinks.capture.state import CaptureState, _Conn

PREFIX_MAX = 512  # request bytes the writer looks at to decide whether a message carries secrets

_UNDECIDED, _STREAM, _HOLD = range(3)
_DROP = "\0drop"  # request-tracking value: the request was filtered out, so is its reply


class MessagePolicy(CaptureState):
    """Decides, in the writer thread, how a held message is recorded (or that it is left out)."""

    def process(self, c: _Conn, is_reply: bool, msg: bytes) -> bytes | None:
        """A held message as it is to be recorded, or None to leave it out (counted when it cannot be parsed)."""
        try:
            return self._process(c, is_reply, msg)
        except (DecodeError, struct.error, IndexError, ValueError):
            self.messages_dropped += 1  # the framer leaves it out and logs it once
            raise

    def _process(self, c: _Conn, is_reply: bool, msg: bytes) -> bytes | None:
        _, request_id, response_to, opcode = HEADER.unpack_from(msg)
        plain = compression.uncompressed(msg, self.max_message_bytes) if opcode == OP_COMPRESSED else msg
        flags = (
            struct.unpack_from("<I", plain, 16)[0] if len(plain) >= 20 and HEADER.unpack_from(plain)[3] == OP_MSG else 0
        )
        if is_reply:
            entry = c.requests.get(response_to)
            if entry is None:
                command, original = "", 0
            else:
                command, original = entry
                if flags & MORE_TO_COME:
                    c.track(request_id, command, original)
                    if response_to != original:
                        c.requests.pop(response_to, None)
                else:
                    c.requests.pop(response_to, None)
                    c.requests.pop(original, None)
            if command == _DROP:
                return None
        else:
            command, database, collection = self._attribute(plain)
            if (
                self._ns_match is not None
                and command not in SENSITIVE_COMMANDS
                and not self._ns_match(database, collection)
            ):
                if not flags & MORE_TO_COME:
                    c.track(request_id, _DROP, request_id)
                return None
            if command in HELLO_COMMANDS and c.app is None:
                self._handshake(c, plain)
            if (command in SENSITIVE_COMMANDS or self.hold_all) and not flags & MORE_TO_COME:
                c.track(request_id, command, request_id)
        if command not in SENSITIVE_COMMANDS and not self.pseudonymise:
            return msg
        return bytes(self._rewriter.message(bytearray(plain), is_reply, command))

    def _attribute(self, plain: bytes) -> tuple[str, str, str]:
        from mongoproxy import _bson_parser
        from mongoproxy.protocol.commands import COLLECTION_COMMANDS

        opcode = HEADER.unpack_from(plain)[3]
        try:
            r = _bson_parser.scan_body(opcode, False, memoryview(plain)[16:])
        except (DecodeError, ValueError):
            return "", "", ""
        command = r.command or ""
        if command:
            coll = r.collection or "" if command in COLLECTION_COMMANDS else ""
            return command.lower(), r.database or "", coll
        db, _, coll = (r.namespace or "").partition(".")
        return "", db, coll

    def _handshake(self, c: _Conn, plain: bytes) -> None:
        from mongoproxy import _bson_parser

        try:
            r = _bson_parser.scan_body(HEADER.unpack_from(plain)[3], False, memoryview(plain)[16:])
        except (DecodeError, ValueError):
            return
        c.app = r.app_name or ""
        c.driver = " ".join(x for x in (r.driver_name, r.driver_version) if x)


class _Framer(Framer):
    """Frames one direction in the writer thread: streams ordinary messages, holds sensitive ones whole.

    feed() returns pieces (obj, start, end, ts) to write, in stream order; adjacent slices of one chunk
    are merged so that a chunk normally stays one segment. A compressed request is decided on the first
    PREFIX_MAX bytes its body inflates to (compression.peek, bounded), so a compressed auth command is
    held and blanked like a plain one.
    """

    __slots__ = ("sink", "c", "is_reply", "cur", "cur_len", "msg_len", "state", "header", "_out", "_ts")

    def __init__(self, sink: MessagePolicy, c: _Conn, is_reply: bool) -> None:
        super().__init__(sink.max_message_bytes)
        self.sink = sink
        self.c = c
        self.is_reply = is_reply
        self.cur: list = []
        self.cur_len = 0
        self.msg_len = 0
        self.state = _UNDECIDED
        self.header: tuple = ()
        self._out: list = []
        self._ts = 0

    def feed(self, data: bytes, ts: int) -> list:
        out = self._out = []
        self._ts = ts
        self._frame(data, ts)
        self._out = []
        return out

    # ---- framer hooks ----

    def _on_header_bytes(self, data: Any, start: int, end: int, now_ns: int) -> None:
        self.cur.append((data, start, end, self._ts))
        self.cur_len += end - start

    def _on_bad_length(self, length: int, request_id: int, opcode: int) -> None:
        # Not MongoDB framing: everything from this header on passes as is (zeroed with --record-redact).
        pending, self.cur = self.cur, []
        for piece in pending:
            self._raw(*piece)

    def _on_dead(self, data: Any, start: int, end: int) -> None:
        self._raw(data, start, end, self._ts)

    def _on_header(self, length: int, request_id: int, response_to: int, opcode: int) -> None:
        self.msg_len = length
        self.header = (request_id, response_to, opcode)
        self._decide_now()

    def _on_body(self, data: Any, start: int, end: int) -> None:
        if self.state == _STREAM:
            _append(self._out, data, start, end, self._ts)
        else:
            self.cur.append((data, start, end, self._ts))
        self.cur_len += end - start
        if self.state == _UNDECIDED:
            self._decide_now()

    def _on_end(self, now_ns: int) -> None:
        if self.state == _UNDECIDED:
            self.state = _HOLD  # the whole message is here and still undecided: check it whole
        if self.state == _HOLD:
            self._finish_held(self._out)
        self.cur = []
        self.cur_len = self.msg_len = 0
        self.state = _UNDECIDED

    def _decide_now(self) -> None:
        decision = self._decide()
        if decision == _STREAM:
            for piece in self.cur:
                _append(self._out, *piece)
            self.cur = []
            self.state = _STREAM
        elif decision == _HOLD:
            self.state = _HOLD

    def _raw(self, obj: Any, start: int, end: int, ts: int) -> None:
        """Bytes that are not MongoDB framing: kept as they are, or zeroed with --record-redact."""
        if self.sink.pseudonymise:
            obj, start, end = bytes(end - start), 0, end - start
        _append(self._out, obj, start, end, ts)

    def _prefix(self, limit: int) -> bytes:
        parts = []
        got = 0
        for obj, s, e, _ in self.cur:
            take = min(e - s, limit - got)
            parts.append(obj[s : s + take])
            got += take
            if got >= limit:
                break
        return b"".join(parts)

    def _decide(self) -> int | None:
        sink = self.sink
        if sink.hold_all:
            return _HOLD
        if self.is_reply:
            return _HOLD if self.header[1] in self.c.requests else _STREAM
        opcode = self.header[2]
        if opcode == OP_COMPRESSED:
            prefix = self._inflated_prefix()
            if prefix is None:
                return _HOLD if self.cur_len >= PREFIX_MAX else None
        elif opcode in (OP_MSG, OP_QUERY):
            prefix = self._prefix(PREFIX_MAX)
        else:
            return _STREAM
        fk = redact.first_key(prefix)
        if fk is None:
            return _HOLD if self.cur_len >= PREFIX_MAX else None
        key, complete = fk
        if not complete or is_sensitive(key):
            return _HOLD
        return _STREAM

    def _inflated_prefix(self) -> bytes | None:
        """The message a compressed request wraps, as far as its first PREFIX_MAX compressed bytes inflate."""
        raw = self._prefix(PREFIX_MAX)
        if len(raw) < HEADER_SIZE + COMPRESSED_PREFIX.size:
            return None
        original, size, compressor = COMPRESSED_PREFIX.unpack_from(raw, HEADER_SIZE)
        request_id, response_to, _ = self.header
        try:
            body = compression.peek(compressor, memoryview(raw)[HEADER_SIZE + COMPRESSED_PREFIX.size :], PREFIX_MAX)
        except DecodeError:
            return b""  # cannot be checked: first_key() finds no name, so the message is held
        return HEADER.pack(HEADER_SIZE + size, request_id, response_to, original) + body

    def _finish_held(self, out: list) -> None:
        pieces = self.cur
        msg = b"".join(obj[s:e] for obj, s, e, _ in pieces)
        try:
            result = self.sink.process(self.c, self.is_reply, msg)
        except (DecodeError, struct.error, IndexError, ValueError) as exc:
            # A message that cannot be checked for secrets is not recorded.
            self.sink._once(
                "held",
                "recording: a message on connection %d could not be parsed and is left out "
                "(further ones are left out silently): %r",
                self.c.conn.id,
                exc,
            )
            result = None
        if result is None:
            return
        if len(result) == len(msg):
            at = 0
            for _obj, s, e, ts in pieces:
                _append(out, result, at, at + (e - s), ts)
                at += e - s
        else:
            _append(out, result, 0, len(result), pieces[-1][3])


def _append(out: list, obj: Any, start: int, end: int, ts: int) -> None:
    if start == end:
        return
    if out:
        last = out[-1]
        if last[0] is obj and last[2] == start and last[3] == ts:
            out[-1] = (obj, last[1], end, ts)
            return
    out.append((obj, start, end, ts))
