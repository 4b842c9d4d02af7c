"""Framing: opcodes, the 16-byte header, an incremental frame scanner, OP_COMPRESSED.

A FrameScanner observes one direction of one connection. It is fed the same
chunks that are forwarded, never holds more than a header (16 bytes), an
OP_COMPRESSED prefix (9 bytes) and a decompressor's window, and hands each
message body to the Cython BodyScanner. Invariants:
- feed() never raises; problems become DecodeError reports.
- A bad header length stops observation of the direction for good (the
  stream is not MongoDB or is out of sync); a bad body only skips that
  message, by its length, and scanning resumes at the next header.
"""

from __future__ import annotations

import struct
import weakref
import zlib
from collections.abc import Callable
from typing import Any

from mongoproxy.errors import DecodeError

try:
    from mongoproxy._bson_parser import (
        DECODE_REASONS as SCANNER_REASONS,
    )
    from mongoproxy._bson_parser import (
        OP_COMMAND,
        OP_COMMANDREPLY,
        OP_DELETE,
        OP_GET_MORE,
        OP_INSERT,
        OP_KILL_CURSORS,
        OP_MSG,
        OP_QUERY,
        OP_REPLY,
        OP_UPDATE,
        BodyScanner,
    )
except ImportError as exc:  # pragma: no cover - a broken install must fail loudly
    raise ImportError(
        "mongoproxy's compiled scanner (mongoproxy._bson_parser) is missing: reinstall with "
        "`pip install .` (or `pip install -e .` in a checkout), which needs a C compiler and Cython"
    ) from exc

OP_COMPRESSED = 2012  # unwrapped here; the scanner never sees it

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
    "checksum_mismatch",
    "internal_error",
)
DECODE_REASONS = tuple(dict.fromkeys(SCANNER_REASONS + FRAMING_REASONS))

OP_NAMES = {
    OP_REPLY: "OP_REPLY",
    OP_UPDATE: "OP_UPDATE",
    OP_INSERT: "OP_INSERT",
    OP_QUERY: "OP_QUERY",
    OP_GET_MORE: "OP_GET_MORE",
    OP_DELETE: "OP_DELETE",
    OP_KILL_CURSORS: "OP_KILL_CURSORS",
    OP_COMMAND: "OP_COMMAND",
    OP_COMMANDREPLY: "OP_COMMANDREPLY",
    OP_COMPRESSED: "OP_COMPRESSED",
    OP_MSG: "OP_MSG",
}
# Opcodes whose body the scanner understands (everything but OP_COMPRESSED).
BODY_OPS = frozenset(OP_NAMES) - {OP_COMPRESSED}

# OP_MSG flagBits.
CHECKSUM_PRESENT = 1 << 0
MORE_TO_COME = 1 << 1
EXHAUST_ALLOWED = 1 << 16

COMPRESSOR_NAMES = {0: "noop", 1: "snappy", 2: "zlib", 3: "zstd"}

HEADER = struct.Struct("<iiii")
_unpack_header = HEADER.unpack_from
COMPRESSED_PREFIX = struct.Struct("<iiB")
HEADER_SIZE = 16
DEFAULT_MAX_MESSAGE_BYTES = 48_000_000
# zlib output is taken in slices of this size so one chunk cannot balloon memory.
_INFLATE_SLICE = 256 * 1024

_HEADER, _BODY, _SKIP, _CPREFIX, _CBODY, _DEAD = range(6)


class Message:
    """One observed message: header fields, timing, size and what the scanner extracted."""

    __slots__ = (
        "request_id",
        "response_to",
        "op_code",
        "wire_op_code",
        "length",
        "first_ns",
        "last_ns",
        "result",
        "compressor",
        "error",
    )

    def __init__(self, length: int, request_id: int, response_to: int, op_code: int, first_ns: int) -> None:
        self.length = length
        self.request_id = request_id
        self.response_to = response_to
        self.op_code = op_code  # the original opcode when compressed
        self.wire_op_code = op_code
        self.first_ns = first_ns
        self.last_ns = first_ns
        self.result: Any = None  # ScanResult, None when the body could not be scanned
        self.compressor: int | None = None
        self.error = ""  # DecodeError reason

    @property
    def flags(self) -> int:
        return self.result.flags if self.result is not None else 0

    def __repr__(self) -> str:
        op = OP_NAMES.get(self.op_code, str(self.op_code))
        return f"<Message {op} id={self.request_id} to={self.response_to} len={self.length}>"


class _Inflater:
    """Streaming decompressor for one OP_COMPRESSED body.

    Each output slice (at most _INFLATE_SLICE bytes for zlib and zstd) goes
    to `emit` as soon as it exists, so a highly compressed body never has
    more than one slice in memory. Snappy's block format does not stream: its
    compressed bytes are buffered (up to the message limit) and decompressed
    at the end.
    """

    __slots__ = ("_obj", "_kind", "_pending", "_limit", "_emit")

    def __init__(self, compressor_id: int, limit: int, emit: Callable[[Any], None]) -> None:
        self._kind = compressor_id
        self._limit = limit
        self._emit = emit
        self._pending: bytearray | None = None
        if compressor_id == 2:
            self._obj: Any = zlib.decompressobj()
        elif compressor_id == 3:
            try:
                import zstandard
            except ImportError:
                raise DecodeError(
                    "compressor_unavailable",
                    "zstd needs the zstandard package (a mongoproxy dependency): `pip install zstandard`",
                ) from None
            self._obj = zstandard.ZstdDecompressor().stream_writer(
                _Emitter(emit),  # type: ignore[arg-type]  # stream_writer only calls write()
                write_size=_INFLATE_SLICE,
                closefd=False,
            )
        elif compressor_id == 1:
            try:
                import cramjam  # noqa: F401
            except ImportError:
                raise DecodeError(
                    "compressor_unavailable",
                    "snappy needs the cramjam package (a mongoproxy dependency): `pip install cramjam`",
                ) from None
            self._pending = bytearray()
            self._obj = None
        elif compressor_id == 0:
            self._obj = None
        else:
            raise DecodeError("unknown_compressor", f"compressorId {compressor_id}")

    def feed(self, data: Any) -> None:
        """Decompress one wire chunk, emitting its output slice by slice."""
        kind = self._kind
        if kind == 0:
            self._emit(data)
            return
        if kind == 1:
            self._pending += data
            if len(self._pending) > self._limit:
                raise DecodeError("bad_uncompressed_size", "snappy body exceeds the message limit")
            return
        try:
            if kind == 2:
                obj = self._obj
                self._emit(obj.decompress(data, _INFLATE_SLICE))
                while obj.unconsumed_tail:
                    self._emit(obj.decompress(obj.unconsumed_tail, _INFLATE_SLICE))
                return
            self._obj.write(data)
        except DecodeError:
            raise
        except Exception as exc:  # zlib.error, zstandard.ZstdError
            raise DecodeError("decompress_failed", str(exc)) from None

    def finish(self) -> None:
        """The body's last byte was fed: emit what is left, check the stream ended."""
        kind = self._kind
        try:
            if kind == 1:
                import cramjam

                self._emit(memoryview(cramjam.snappy.decompress_raw(self._pending)))
            elif kind == 2:
                out = self._obj.flush()
                if out:
                    self._emit(out)
                if not self._obj.eof:
                    raise DecodeError("decompress_failed", "zlib stream ended early")
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError("decompress_failed", str(exc)) from None


class _Emitter:
    """The file-like sink zstandard's stream_writer writes each decompressed slice to.

    It holds the scanner's method weakly: the writer is a C object the cycle collector cannot traverse, so a
    strong reference would keep a scanner whose connection ended mid-body (and its zstd context) alive forever.
    """

    __slots__ = ("write",)

    def __init__(self, emit: Callable[[Any], None]) -> None:
        ref = weakref.WeakMethod(emit)

        def write(data: Any) -> None:
            target = ref()
            if target is not None:
                target(data)

        self.write = write


def checksum_function() -> Callable[[int, bytes], int]:
    """google_crc32c.extend(crc, data), or ConfigError naming the install."""
    try:
        import google_crc32c
    except ImportError:
        from mongoproxy.errors import ConfigError

        raise ConfigError("--verify-checksums needs the CRC-32C library: pip install 'mongoproxy[checksums]'") from None
    return google_crc32c.extend


class FrameScanner:
    """Frames one direction of a connection and scans each message body as it streams past.

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
    ) -> None:
        self.is_reply = is_reply
        self.on_message = on_message
        self.on_error = on_error
        self.max_message_bytes = max_message_bytes
        self.render = 0 if is_reply else render
        self.render_limit = render_limit
        self.scanner = BodyScanner()
        self.messages = 0
        self._state = _HEADER
        self._buf = bytearray()  # a partial header or OP_COMPRESSED prefix
        self._msg: Message | None = None
        self._remaining = 0  # wire body bytes still to come for the current message
        self._first_ns = 0
        self._inflater: _Inflater | None = None
        self._inflated = 0
        self._inflated_limit = 0
        # A scanner error inside a compressed body waits for the body's end: a wrong uncompressedSize
        # (found only there, or as soon as output passes it) is the reason then, whatever the chunking.
        self._scan_error: DecodeError | None = None
        # CRC-32C over an uncompressed OP_MSG: header and body up to its last 4 bytes.
        self._crc_extend = checksum_function() if verify_checksums else None
        self._fast = self._crc_extend is None  # feed()'s fast path does not checksum
        self._crc = 0
        self._crc_left = 0

    @property
    def stopped(self) -> bool:
        """True once observation of this direction has stopped for good."""
        return self._state == _DEAD

    @property
    def mid_message(self) -> bool:
        """True while a message has started but not finished."""
        return self._state != _DEAD and (self._state != _HEADER or bool(self._buf))

    def feed(self, data: Any, now_ns: int) -> None:
        """Observe one forwarded chunk. Never raises."""
        try:
            pos = 0
            if self._state == _HEADER and self._fast and not self._buf:
                # Fast path: each whole uncompressed message inside the chunk is scanned in one call, with the
                # outcome the state machine (_feed) would reach. The rest of the chunk goes to _feed.
                n = len(data)
                scanner = self.scanner
                while n - pos >= HEADER_SIZE:
                    length, request_id, response_to, op_code = _unpack_header(data, pos)
                    if not (
                        HEADER_SIZE < length <= n - pos and op_code in BODY_OPS and length <= self.max_message_bytes
                    ):
                        break
                    msg = Message(length, request_id, response_to, op_code, now_ns)
                    scanner.reset(op_code, self.is_reply, length - HEADER_SIZE, self.render, self.render_limit)
                    try:
                        scanner.feed(data, pos + HEADER_SIZE, pos + length)
                        if not scanner.done:
                            raise DecodeError("truncated", "message ended inside its body")
                        msg.result = scanner.result()
                    except DecodeError as exc:
                        msg.error = exc.reason
                        self.on_error(exc.reason, exc.detail, False)
                    pos += length
                    self.messages += 1
                    self.on_message(msg)
                if pos == n:
                    return
            self._feed(data, now_ns, pos)
        except Exception as exc:  # noqa: BLE001 - a scanner bug must not reach the data path
            self._state = _DEAD
            self.on_error("internal_error", repr(exc), True)

    def _feed(self, data: Any, now_ns: int, pos: int = 0) -> None:
        n = len(data)
        while pos < n:
            state = self._state
            if state == _HEADER:
                if not self._buf and n - pos >= HEADER_SIZE:
                    length, request_id, response_to, op_code = HEADER.unpack_from(data, pos)
                    if self._crc_extend is not None:
                        self._crc = self._crc_extend(0, bytes(data[pos : pos + HEADER_SIZE]))
                    pos += HEADER_SIZE
                    self._first_ns = now_ns
                else:
                    if not self._buf:
                        self._first_ns = now_ns
                    take = min(HEADER_SIZE - len(self._buf), n - pos)
                    self._buf += data[pos : pos + take]
                    pos += take
                    if len(self._buf) < HEADER_SIZE:
                        return
                    length, request_id, response_to, op_code = HEADER.unpack_from(self._buf)
                    if self._crc_extend is not None:
                        self._crc = self._crc_extend(0, bytes(self._buf))
                    self._buf.clear()
                self._start(length, request_id, response_to, op_code)
                if self._state == _DEAD:
                    return
                if self._remaining == 0:
                    self._finish(now_ns)
            elif state == _BODY:
                take = min(self._remaining, n - pos)
                if self._crc_left > 0:
                    covered = min(take, self._crc_left)
                    self._crc = self._crc_extend(self._crc, bytes(data[pos : pos + covered]))
                    self._crc_left -= covered
                try:
                    self.scanner.feed(data, pos, pos + take)
                except DecodeError as exc:
                    self._fail(exc)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._finish(now_ns)
            elif state == _SKIP:
                take = min(self._remaining, n - pos)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._finish(now_ns)
            elif state == _CPREFIX:
                take = min(COMPRESSED_PREFIX.size - len(self._buf), n - pos, self._remaining)
                self._buf += data[pos : pos + take]
                pos += take
                self._remaining -= take
                if len(self._buf) == COMPRESSED_PREFIX.size:
                    self._start_compressed()
                if self._remaining == 0:
                    self._finish(now_ns)
            elif state == _CBODY:
                take = min(self._remaining, n - pos)
                try:
                    self._inflater.feed(data[pos : pos + take])
                except DecodeError as exc:
                    self._fail(exc)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._finish(now_ns)
            else:  # _DEAD
                return

    def _start(self, length: int, request_id: int, response_to: int, op_code: int) -> None:
        if length < HEADER_SIZE or length > self.max_message_bytes:
            reason = "message_too_large" if length > self.max_message_bytes else "bad_message_length"
            self._state = _DEAD
            self.on_error(reason, f"messageLength {length} (opCode {op_code}, requestID {request_id})", True)
            return
        msg = self._msg = Message(length, request_id, response_to, op_code, self._first_ns)
        self._remaining = length - HEADER_SIZE
        if op_code in BODY_OPS:
            self.scanner.reset(op_code, self.is_reply, self._remaining, self.render, self.render_limit)
            self._state = _BODY
            self._crc_left = self._remaining - 4 if self._crc_extend is not None and op_code == OP_MSG else 0
            if self._remaining == 0:
                self._fail(DecodeError("truncated", f"{OP_NAMES[op_code]} with an empty body"))
        elif op_code == OP_COMPRESSED:
            msg.compressor = -1
            self._state = _CPREFIX
            if self._remaining < COMPRESSED_PREFIX.size:
                self._fail(DecodeError("truncated", "OP_COMPRESSED shorter than its 9-byte prefix"))
        else:
            self._fail(DecodeError("unknown_opcode", f"opCode {op_code}"))

    def _start_compressed(self) -> None:
        original, size, compressor = COMPRESSED_PREFIX.unpack_from(self._buf)
        self._buf.clear()
        msg = self._msg
        msg.op_code = original
        msg.wire_op_code = OP_COMPRESSED
        msg.compressor = compressor
        try:
            if original not in BODY_OPS:
                raise DecodeError("unknown_opcode", f"compressed originalOpcode {original}")
            if size < 0 or size > self.max_message_bytes:
                raise DecodeError("bad_uncompressed_size", f"uncompressedSize {size}")
            self._inflater = _Inflater(compressor, self.max_message_bytes, self._scan_inflated)
        except DecodeError as exc:
            self._fail(exc)
            return
        self._inflated = 0
        self._inflated_limit = size
        self._scan_error = None
        self.scanner.reset(original, self.is_reply, size, self.render, self.render_limit)
        self._state = _CBODY

    def _scan_inflated(self, out: Any) -> None:
        if not out:
            return
        self._inflated += len(out)
        if self._inflated > self._inflated_limit:
            # Too much output: _finish reports bad_uncompressed_size unless the decompressor fails later in the
            # body, so the reason does not depend on where the chunks were cut (zlib drops a failing call's
            # output). Inflating on, unscanned, is bounded by the message limit.
            if self._inflated > self.max_message_bytes:
                raise DecodeError("bad_uncompressed_size", f"more than uncompressedSize {self._inflated_limit} bytes")
            return
        if self._scan_error is None:
            try:
                self.scanner.feed(out, 0, len(out))
            except DecodeError as exc:
                self._scan_error = exc

    def _fail(self, exc: DecodeError) -> None:
        """Skip the rest of the current message and report; scanning resumes at the next header."""
        self._msg.error = exc.reason
        self._state = _SKIP
        self._inflater = None
        self.on_error(exc.reason, exc.detail, False)

    def _finish(self, now_ns: int) -> None:
        msg = self._msg
        state = self._state
        try:
            if state == _CBODY:
                self._inflater.finish()
                if self._inflated != self._inflated_limit:
                    raise DecodeError(
                        "bad_uncompressed_size", f"uncompressedSize {self._inflated_limit}, got {self._inflated}"
                    )
                if self._scan_error is not None:
                    raise self._scan_error
            if state in (_BODY, _CBODY):
                if not self.scanner.done:
                    raise DecodeError("truncated", "message ended inside its body")
                msg.result = result = self.scanner.result()
                if (
                    self._crc_extend is not None
                    and state == _BODY
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
        self._msg = None
        self._state = _HEADER
        msg.last_ns = now_ns
        self.messages += 1
        self.on_message(msg)
