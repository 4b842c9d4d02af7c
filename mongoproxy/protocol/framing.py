"""The one incremental framer, and the live tap's FrameScanner built on it.

Framer splits one direction of a connection into messages as the bytes are fed, holding at most a
partial header (16 bytes): subclasses get the header bytes, the parsed header, each body slice and the
end of each message. The live tap (FrameScanner below, behind mongoproxy._tap, which observes the whole
messages of a chunk in C and hands the framer the rest), the recorder (sinks/capture/) and replay's pcap
reader frame with it. Invariants:
- A bad header length stops framing of the direction for good (the stream is not MongoDB or is out of
  sync); what follows goes to _on_dead.
- FrameScanner.feed() never raises: problems become DecodeError reports; a bad body only skips that
  message, by its length, and scanning resumes at the next header. A bug (ours) is an `internal_error`
  whose traceback is logged at WARNING, once a minute per place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from mongoproxy.errors import DecodeError
from mongoproxy.protocol.compression import DEFAULT_MAX_BUFFERED, Inflater
from mongoproxy.protocol.opcodes import (
    BODY_OPCODES,
    COMPRESSED_PREFIX,
    DEFAULT_MAX_MESSAGE_BYTES,
    HEADER,
    HEADER_SIZE,
    OP_COMPRESSED,
    OP_MSG,
    OPCODE_NAMES,
)

try:
    from mongoproxy._bson_parser import DECODE_REASONS as SCANNER_REASONS
    from mongoproxy._bson_parser import BodyScanner
except ImportError as exc:  # pragma: no cover - a broken install must fail loudly
    raise ImportError(
        "mongoproxy's compiled scanner (mongoproxy._bson_parser) is missing: reinstall with "
        "`pip install .` (or `pip install -e .` in a checkout), which needs a C compiler and Cython"
    ) from exc

log = logging.getLogger("mongoproxy.protocol")

# Every DecodeError reason the framing adds to the scanner's (metric label values; server.py adds
# "truncated" for a message cut by the connection's close, which the scanner already names).
FRAMING_REASONS = (
    "bad_message_length",
    "message_too_large",
    "unknown_opcode",
    "unknown_compressor",
    "compressor_unavailable",
    "decompress_failed",
    "bad_uncompressed_size",
    "too_large_to_observe",
    "checksum_mismatch",
    "internal_error",
)
DECODE_REASONS = tuple(dict.fromkeys(SCANNER_REASONS + FRAMING_REASONS))
INTERNAL_ERROR_LOG_SECONDS = 60.0

_unpack_header = HEADER.unpack_from
_HEADER, _BODY, _DEAD = range(3)  # Framer states
_SCAN, _SKIP, _CPREFIX, _CBODY = range(4)  # FrameScanner body states

_internal_logged: dict[tuple[str, str], float] = {}


def log_internal_error(exc: BaseException) -> None:
    """Log a bug's traceback at WARNING, at most once a minute per exception type and place."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
    key = (type(exc).__name__, where)
    now = time.monotonic()
    last = _internal_logged.get(key)
    if last is not None and now - last < INTERNAL_ERROR_LOG_SECONDS:
        return
    if len(_internal_logged) > 1000:  # bounded: distinct bug sites are few
        _internal_logged.clear()
    _internal_logged[key] = now
    log.warning(
        "internal error while observing traffic (counted as decode error internal_error; forwarding goes on; "
        "logged at most once a minute per place): %r",
        exc,
        exc_info=exc,
    )


class Framer:
    """Incremental framing of one direction; subclasses override the _on_* hooks."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._state = _HEADER
        self._buf = bytearray()  # a partial header
        self._remaining = 0  # body bytes still to come for the current message

    @property
    def stopped(self) -> bool:
        """True once framing of this direction has stopped for good."""
        return self._state == _DEAD

    @property
    def mid_message(self) -> bool:
        """True while a message has started but not finished."""
        return self._state == _BODY or (self._state == _HEADER and bool(self._buf))

    def stop(self) -> None:
        """Stop framing this direction for good (a hook found it is not MongoDB); what follows goes to _on_dead."""
        self._state = _DEAD
        self._buf.clear()

    def _frame(self, data: Any, now_ns: int, pos: int = 0) -> None:
        """Frame data[pos:], calling the hooks in stream order."""
        n = len(data)
        while pos < n:
            state = self._state
            if state == _BODY:
                take = min(self._remaining, n - pos)
                self._on_body(data, pos, pos + take)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _HEADER
                    self._on_end(now_ns)
            elif state == _HEADER:
                buf = self._buf
                if not buf and n - pos >= HEADER_SIZE:
                    self._on_header_bytes(data, pos, pos + HEADER_SIZE, now_ns)
                    length, request_id, response_to, opcode = _unpack_header(data, pos)
                    pos += HEADER_SIZE
                else:
                    take = min(HEADER_SIZE - len(buf), n - pos)
                    self._on_header_bytes(data, pos, pos + take, now_ns)
                    buf += data[pos : pos + take]
                    pos += take
                    if len(buf) < HEADER_SIZE:
                        return
                    length, request_id, response_to, opcode = _unpack_header(buf)
                    buf.clear()
                if length < HEADER_SIZE or length > self.max_message_bytes:
                    self._state = _DEAD
                    self._on_bad_length(length, request_id, opcode)
                    continue
                self._remaining = length - HEADER_SIZE
                self._state = _BODY
                self._on_header(length, request_id, response_to, opcode)
                if self._state == _DEAD:  # the hook stopped framing: the body and the rest go to _on_dead
                    continue
                if self._remaining == 0:
                    self._state = _HEADER
                    self._on_end(now_ns)
            else:  # _DEAD
                self._on_dead(data, pos, n)
                return

    # ---- hooks ----

    def _on_header_bytes(self, data: Any, start: int, end: int, now_ns: int) -> None:
        """Bytes of a header, before it is complete (whole when the header lies in one chunk)."""

    def _on_header(self, length: int, request_id: int, response_to: int, opcode: int) -> None:
        """A complete header with a valid length; the body follows."""

    def _on_body(self, data: Any, start: int, end: int) -> None:
        """data[start:end] is the next slice of the current message's body."""

    def _on_end(self, now_ns: int) -> None:
        """The current message's last byte has been seen."""

    def _on_bad_length(self, length: int, request_id: int, opcode: int) -> None:
        """A header length below 16 or above the limit: framing stops for good."""

    def _on_dead(self, data: Any, start: int, end: int) -> None:
        """Bytes after framing stopped."""


class Message:
    """One observed message: header fields, timing, size and what the scanner extracted."""

    __slots__ = (
        "request_id",
        "response_to",
        "opcode",
        "wire_opcode",
        "length",
        "first_ns",
        "last_ns",
        "result",
        "compressor",
        "error",
    )

    def __init__(self, length: int, request_id: int, response_to: int, opcode: int, first_ns: int) -> None:
        self.length = length
        self.request_id = request_id
        self.response_to = response_to
        self.opcode = opcode  # the original opcode when compressed
        self.wire_opcode = opcode
        self.first_ns = first_ns
        self.last_ns = first_ns
        self.result: Any = None  # ScanResult, None when the body could not be scanned
        self.compressor: int | None = None
        self.error = ""  # DecodeError reason

    @property
    def flags(self) -> int:
        return self.result.flags if self.result is not None else 0

    def __repr__(self) -> str:
        op = OPCODE_NAMES.get(self.opcode, str(self.opcode))
        return f"<Message {op} id={self.request_id} to={self.response_to} len={self.length}>"


def checksum_function() -> Callable[[int, bytes], int]:
    """google_crc32c.extend(crc, data), or ConfigError naming the install."""
    try:
        import google_crc32c
    except ImportError:
        from mongoproxy.errors import ConfigError

        raise ConfigError("--verify-checksums needs the CRC-32C library: pip install 'mongoproxy[checksums]'") from None
    return google_crc32c.extend


class FrameScanner(Framer):
    """Frames one direction of a connection and scans each message body as it streams past.

    It never holds more than a header (16 bytes), an OP_COMPRESSED prefix (9 bytes), a decompressor's
    window and, for snappy, at most max_observed_compressed_bytes of compressed body.
    on_message(Message) is called when a message's last byte has been seen.
    on_error(reason, detail, fatal) is called for each decode error.
    """

    def __init__(
        self,
        is_reply: bool,
        on_message: Callable[[Message], None],
        on_error: Callable[[str, str, bool], None],
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        render: int = 0,
        render_limit: int = 4096,
        verify_checksums: bool = False,
        max_observed_compressed_bytes: int = DEFAULT_MAX_BUFFERED,
    ) -> None:
        super().__init__(max_message_bytes)
        self.is_reply = is_reply
        self.on_message = on_message
        self.on_error = on_error
        self.render = 0 if is_reply else render
        self.render_limit = render_limit
        self.max_observed_compressed_bytes = max_observed_compressed_bytes
        self._scanner: Any = None  # this direction's own BodyScanner, made when a body first spans chunks
        self.messages = 0
        self._body_state = _SCAN
        self._prefix = bytearray()  # a partial OP_COMPRESSED prefix
        self._msg: Message | None = None
        self._first_ns = 0
        self._inflater: Inflater | None = None
        # A scanner error inside a compressed body waits for the body's end: a wrong uncompressedSize
        # (found only there, or as soon as output passes it) is the reason then, whatever the chunking.
        self._scan_error: DecodeError | None = None
        # CRC-32C over an uncompressed OP_MSG: header and body up to its last 4 bytes.
        self._crc_extend = checksum_function() if verify_checksums else None
        self._fast = self._crc_extend is None  # mongoproxy._tap's fast path does not checksum
        self._crc = 0
        self._crc_left = 0

    @property
    def scanner(self) -> Any:
        """This direction's own BodyScanner (made on first use): it holds a body's state across chunks."""
        scanner = self._scanner
        if scanner is None:
            scanner = self._scanner = BodyScanner()
        return scanner

    @scanner.setter
    def scanner(self, scanner: Any) -> None:
        self._scanner = scanner

    @property
    def at_boundary(self) -> bool:
        """True between messages with nothing held, when no checksum is verified: mongoproxy._tap may take over."""
        return self._state == _HEADER and self._fast and not self._buf

    def feed(self, data: Any, now_ns: int, pos: int = 0) -> None:
        """Observe one forwarded chunk from data[pos:]. Never raises."""
        try:
            self._frame(data, now_ns, pos)
        except Exception as exc:  # noqa: BLE001 - a scanner or tracker bug must not reach the data path
            self._state = _DEAD
            log_internal_error(exc)
            self.on_error("internal_error", repr(exc), True)

    # ---- framer hooks ----

    def _on_header_bytes(self, data: Any, start: int, end: int, now_ns: int) -> None:
        if not self._buf:
            self._first_ns = now_ns
        if self._crc_extend is not None:
            self._crc = self._crc_extend(self._crc if self._buf else 0, bytes(data[start:end]))

    def _on_bad_length(self, length: int, request_id: int, opcode: int) -> None:
        reason = "message_too_large" if length > self.max_message_bytes else "bad_message_length"
        self.on_error(reason, f"messageLength {length} (opCode {opcode}, requestID {request_id})", True)

    def _on_header(self, length: int, request_id: int, response_to: int, opcode: int) -> None:
        msg = self._msg = Message(length, request_id, response_to, opcode, self._first_ns)
        remaining = length - HEADER_SIZE
        if opcode in BODY_OPCODES:
            self.scanner.reset(opcode, self.is_reply, remaining, self.render, self.render_limit)
            self._body_state = _SCAN
            self._crc_left = remaining - 4 if self._crc_extend is not None and opcode == OP_MSG else 0
            if remaining == 0:
                self._fail(DecodeError("truncated", f"{OPCODE_NAMES[opcode]} with an empty body"))
        elif opcode == OP_COMPRESSED:
            msg.compressor = -1
            self._body_state = _CPREFIX
            if remaining < COMPRESSED_PREFIX.size:
                self._fail(DecodeError("truncated", "OP_COMPRESSED shorter than its 9-byte prefix"))
        else:
            self._fail(DecodeError("unknown_opcode", f"opCode {opcode}"))

    def _on_body(self, data: Any, pos: int, end: int) -> None:
        state = self._body_state
        if state == _SCAN:
            if self._crc_left > 0:
                covered = min(end - pos, self._crc_left)
                self._crc = self._crc_extend(self._crc, bytes(data[pos : pos + covered]))
                self._crc_left -= covered
            try:
                self.scanner.feed(data, pos, end)
            except DecodeError as exc:
                self._fail(exc)
        elif state == _CPREFIX:
            take = min(COMPRESSED_PREFIX.size - len(self._prefix), end - pos)
            self._prefix += data[pos : pos + take]
            if len(self._prefix) == COMPRESSED_PREFIX.size:
                self._start_compressed()
                if pos + take < end:
                    self._on_body(data, pos + take, end)
        elif state == _CBODY:
            try:
                self._inflater.feed(data[pos:end])
            except DecodeError as exc:
                self._fail(exc)
        # _SKIP: the rest of a failed message passes unobserved

    def _start_compressed(self) -> None:
        original, size, compressor = COMPRESSED_PREFIX.unpack_from(self._prefix)
        self._prefix.clear()
        msg = self._msg
        msg.opcode = original
        msg.wire_opcode = OP_COMPRESSED
        msg.compressor = compressor
        try:
            if original not in BODY_OPCODES:
                raise DecodeError("unknown_opcode", f"compressed originalOpcode {original}")
            if size < 0 or size > self.max_message_bytes:
                raise DecodeError("bad_uncompressed_size", f"uncompressedSize {size}")
            self._inflater = Inflater(compressor, size, self._scan_inflated, self.max_observed_compressed_bytes)
        except DecodeError as exc:
            self._fail(exc)
            return
        self._scan_error = None
        self.scanner.reset(original, self.is_reply, size, self.render, self.render_limit)
        self._body_state = _CBODY

    def _scan_inflated(self, out: Any) -> None:
        if self._scan_error is None:
            try:
                self.scanner.feed(out, 0, len(out))
            except DecodeError as exc:
                self._scan_error = exc

    def _fail(self, exc: DecodeError) -> None:
        """Skip the rest of the current message and report; scanning resumes at the next header."""
        self._msg.error = exc.reason
        self._body_state = _SKIP
        self._inflater = None
        self._prefix.clear()
        self.on_error(exc.reason, exc.detail, False)

    def _on_end(self, now_ns: int) -> None:
        msg = self._msg
        state = self._body_state
        try:
            if state == _CBODY:
                self._inflater.finish()
                if self._scan_error is not None:
                    raise self._scan_error
            if state in (_SCAN, _CBODY):
                if not self.scanner.done:
                    raise DecodeError("truncated", "message ended inside its body")
                msg.result = result = self.scanner.result()
                if (
                    self._crc_extend is not None
                    and state == _SCAN
                    and result.checksum is not None
                    and result.checksum != self._crc
                ):
                    raise DecodeError(
                        "checksum_mismatch", f"CRC-32C {self._crc:#010x}, message says {result.checksum:#010x}"
                    )
            elif state == _CPREFIX:
                raise DecodeError("truncated", "OP_COMPRESSED ended inside its prefix")
        except DecodeError as exc:
            msg.error = exc.reason
            self.on_error(exc.reason, exc.detail, False)
        self._inflater = None
        self._prefix.clear()
        self._msg = None
        msg.last_ns = now_ns
        self.messages += 1
        self.on_message(msg)
