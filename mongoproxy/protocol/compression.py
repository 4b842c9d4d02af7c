"""OP_COMPRESSED: the one decompressor, streaming and bounded.

Every decompression (the live tap, the recorder, replay) goes through Inflater, which emits output in
slices of at most SLICE bytes and stops with `bad_uncompressed_size` as soon as the output passes the
message's declared uncompressedSize, itself refused above the message limit. So a 65 KB zlib bomb
never inflates past its declared size anywhere. Snappy's block format does not stream in any library
here: a body of up to `max_buffered` compressed bytes (--max-observed-compressed-bytes) is buffered and
decompressed whole by cramjam, after its length preamble is checked against uncompressedSize; a larger
one is not observed (`too_large_to_observe`, counted) while it is forwarded as always, so memory stays
bounded whatever the client sends. Decoding it in Python as it streams was measured at 0.7-1.7 s of CPU
for 6-40 MB bodies, time the event loop would not forward anything: observation must never cost that.
SnappyStream (bounded window) serves only `peek`, which decodes a few hundred bytes.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from mongoproxy.errors import DecodeError
from mongoproxy.protocol.opcodes import (
    COMPRESSED_PREFIX,
    DEFAULT_MAX_MESSAGE_BYTES,
    HEADER,
    HEADER_SIZE,
    OP_COMPRESSED,
)

# Output is taken in slices of this size so one chunk cannot balloon memory.
SLICE = 256 * 1024
# Default of --max-observed-compressed-bytes: compressed snappy bytes held to be decompressed whole.
DEFAULT_MAX_BUFFERED = 1_000_000


def peek(compressor_id: int, data: Any, n: int) -> bytes:
    """At most the first n uncompressed bytes of a compressed body, or of a prefix of it; DecodeError if bad.

    Inflates at most n bytes (snappy: at most 32 times the input): used to read a command's name.
    """
    try:
        if compressor_id == 0:
            return bytes(data[:n])
        if compressor_id == 2:
            return zlib.decompressobj().decompress(data, n)
        if compressor_id == 3:
            import io

            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(bytes(data)), read_across_frames=False)
            return reader.read(n)
        if compressor_id == 1:
            out = bytearray()
            # Every snappy tag yields at least one output byte per three input bytes: 3n + 8 input bytes
            # give the first n output bytes (a cut tag is kept as SnappyStream's tail, never misread).
            SnappyStream(out.extend).feed(data[: 3 * n + 8])
            return bytes(out[:n])
    except ImportError as exc:
        raise DecodeError("compressor_unavailable", f"{exc.name} is not installed") from None
    except DecodeError:
        raise
    except Exception as exc:  # zlib.error, zstandard.ZstdError
        raise DecodeError("decompress_failed", str(exc)) from None
    raise DecodeError("unknown_compressor", f"compressorId {compressor_id}")


def _snappy_length(data: Any) -> int | None:
    """The uncompressed length a snappy block announces (its varint preamble); None if cut short or bad."""
    value = shift = 0
    for i in range(min(len(data), 5)):
        b = data[i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value
        shift += 7
    return None


class Inflater:
    """Streaming decompressor of one OP_COMPRESSED body; `emit` gets each output slice as it exists.

    Raises DecodeError from feed()/finish(): unknown_compressor, compressor_unavailable, decompress_failed,
    bad_uncompressed_size (output past `size`, or short of it at the end), too_large_to_observe.
    """

    __slots__ = ("_obj", "_kind", "_pending", "_size", "_max_buffered", "_emit", "produced")

    def __init__(
        self, compressor_id: int, size: int, emit: Callable[[Any], None], max_buffered: int = DEFAULT_MAX_BUFFERED
    ) -> None:
        self._kind = compressor_id
        self._size = size
        self._max_buffered = max_buffered
        self._emit = emit
        self._pending: bytearray | None = None
        self.produced = 0
        self._obj: Any  # zlib's decompressobj, zstandard's stream writer, or None
        if compressor_id == 2:
            self._obj = zlib.decompressobj()
        elif compressor_id == 3:
            try:
                import zstandard
            except ImportError:
                raise DecodeError(
                    "compressor_unavailable",
                    "zstd needs the zstandard package (a mongoproxy dependency): `pip install zstandard`",
                ) from None
            self._obj = zstandard.ZstdDecompressor().stream_writer(
                _Writer(self._out),  # type: ignore[arg-type]  # stream_writer only calls write()
                write_size=SLICE,
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

    def _out(self, out: Any) -> None:
        if not out:
            return
        self.produced += len(out)
        if self.produced > self._size:
            raise DecodeError("bad_uncompressed_size", f"more than uncompressedSize {self._size} bytes")
        self._emit(out)

    def feed(self, data: Any) -> None:
        """Decompress one wire chunk, emitting its output slice by slice."""
        kind = self._kind
        if kind == 0:
            self._out(data)
            return
        if kind == 1:
            self._pending += data
            if len(self._pending) > self._max_buffered:
                self._pending = bytearray()
                raise DecodeError(
                    "too_large_to_observe",
                    f"snappy body over --max-observed-compressed-bytes {self._max_buffered}: forwarded, not observed",
                )
            return
        try:
            if kind == 2:
                obj = self._obj
                self._out(obj.decompress(data, SLICE))
                while obj.unconsumed_tail:
                    self._out(obj.decompress(obj.unconsumed_tail, SLICE))
                return
            self._obj.write(data)
        except DecodeError:
            raise
        except Exception as exc:  # zlib.error, zstandard.ZstdError
            raise DecodeError("decompress_failed", str(exc)) from None

    def finish(self) -> None:
        """The body's last byte was fed: emit what is left, check the stream ended at uncompressedSize."""
        kind = self._kind
        try:
            if kind == 1:
                import cramjam

                # The preamble sizes the output buffer, so it is checked first: a little past uncompressedSize is
                # decompressed (and reported as bad_uncompressed_size by _out), far past it is not.
                announced = _snappy_length(self._pending)
                if announced is None or announced > self._size + SLICE:
                    raise DecodeError(
                        "decompress_failed", f"snappy length preamble {announced} (uncompressedSize {self._size})"
                    )
                out = bytearray(announced)
                n = cramjam.snappy.decompress_raw_into(bytes(self._pending), out)
                self._out(memoryview(out)[:n])
            elif kind == 2:
                self._out(self._obj.flush())
                if not self._obj.eof:
                    raise DecodeError("decompress_failed", "zlib stream ended early")
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError("decompress_failed", str(exc)) from None
        if self.produced != self._size:
            raise DecodeError("bad_uncompressed_size", f"uncompressedSize {self._size}, got {self.produced}")


class SnappyStream:
    """Incremental decoder of a raw snappy block, holding only WINDOW bytes of output and a partial tag.

    Copies may reach back WINDOW bytes, which covers every encoder that compresses in 64 KiB blocks
    (the reference one, snap, cramjam, the drivers'); a copy reaching further back cannot be observed with
    bounded memory and is `too_large_to_observe`. Output goes to `emit` in slices of about SLICE bytes.
    """

    WINDOW = 1 << 16

    __slots__ = ("_emit", "_window", "_mark", "_tail", "_literal", "_preamble", "_total")

    def __init__(self, emit: Callable[[Any], None]) -> None:
        self._emit = emit
        self._window = bytearray()  # the last output, at least WINDOW bytes of it once there are that many
        self._mark = 0  # window[:_mark] has been emitted
        self._tail = b""  # an incomplete tag (at most 4 bytes)
        self._literal = 0  # literal bytes still to come
        self._preamble = True  # the length varint has not been read yet
        self._total = 0  # output bytes produced

    def feed(self, data: Any) -> None:
        """Decode one piece of the block."""
        buf = self._tail + bytes(data) if self._tail else data
        self._tail = b""
        pos, n = 0, len(buf)
        window = self._window
        if self._preamble:
            while pos < n and buf[pos] & 0x80:
                pos += 1
            if pos == n:
                self._tail = bytes(buf)
                return
            pos += 1
            self._preamble = False
        while pos < n:
            if self._literal:
                take = min(self._literal, n - pos)
                window += buf[pos : pos + take]
                pos += take
                self._literal -= take
            else:
                tag = buf[pos]
                kind = tag & 3
                if kind == 0:
                    size = tag >> 2
                    width = 1 + (size - 59 if size >= 60 else 0)
                    if pos + width > n:
                        break
                    if size >= 60:
                        size = int.from_bytes(buf[pos + 1 : pos + width], "little")
                    self._literal = size + 1
                    pos += width
                    continue
                width = (0, 2, 3, 5)[kind]
                if pos + width > n:
                    break
                if kind == 1:
                    size, offset = ((tag >> 2) & 7) + 4, ((tag >> 5) << 8) | buf[pos + 1]
                else:
                    size, offset = (tag >> 2) + 1, int.from_bytes(buf[pos + 1 : pos + width], "little")
                pos += width
                have = len(window)
                if offset == 0 or offset > self._total + have - self._mark:
                    raise DecodeError("decompress_failed", "snappy copy before its source")
                if offset > have:
                    raise DecodeError("too_large_to_observe", f"snappy copy {offset} bytes back, past the window")
                start = have - offset
                if offset >= size:
                    window += window[start : start + size]
                else:  # overlapping: the last `offset` bytes repeat
                    pattern = window[start:]
                    window += (pattern * (size // offset + 1))[:size]
            if len(window) - self._mark >= SLICE:
                self._flush()
        self._tail = bytes(buf[pos:])
        self._flush()

    def _flush(self) -> None:
        window = self._window
        if len(window) > self._mark:
            out = bytes(window[self._mark :])
            self._total += len(out)
            self._mark = len(window)
            self._emit(out)
        if self._mark > 2 * self.WINDOW:
            cut = self._mark - self.WINDOW
            del window[:cut]
            self._mark -= cut

    def finish(self) -> None:
        """The block's last byte was fed: it must end on a tag boundary."""
        if self._tail or self._literal or self._preamble:
            raise DecodeError("decompress_failed", "snappy block ended early")


class _Writer:
    """The file-like sink zstandard's stream_writer writes each decompressed slice to."""

    __slots__ = ("write",)

    def __init__(self, write: Callable[[Any], None]) -> None:
        self.write = write


def decompress(
    compressor_id: int,
    data: Any,
    size: int,
    limit: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_buffered: int = DEFAULT_MAX_BUFFERED,
) -> bytes:
    """The original body of an OP_COMPRESSED message, at most min(size, limit) bytes; DecodeError otherwise."""
    if size < 0 or size > limit:
        raise DecodeError("bad_uncompressed_size", f"uncompressedSize {size} (limit {limit})")
    out = bytearray()
    inflater = Inflater(compressor_id, size, out.extend, max_buffered)
    inflater.feed(data)
    inflater.finish()
    return bytes(out)


def uncompressed(msg: bytes, limit: int = DEFAULT_MAX_MESSAGE_BYTES, max_buffered: int = DEFAULT_MAX_BUFFERED) -> bytes:
    """An OP_COMPRESSED message as the message it wraps (same requestID/responseTo); others unchanged."""
    length, request_id, response_to, opcode = HEADER.unpack_from(msg)
    if opcode != OP_COMPRESSED:
        return msg
    if len(msg) < HEADER_SIZE + COMPRESSED_PREFIX.size:
        raise DecodeError("truncated", "OP_COMPRESSED shorter than its 9-byte prefix")
    original, size, compressor = COMPRESSED_PREFIX.unpack_from(msg, HEADER_SIZE)
    body = decompress(
        compressor, memoryview(msg)[HEADER_SIZE + COMPRESSED_PREFIX.size : length], size, limit, max_buffered
    )
    return HEADER.pack(HEADER_SIZE + len(body), request_id, response_to, original) + body
