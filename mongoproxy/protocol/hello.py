"""Rewriting the member addresses of a hello/isMaster reply, sans-io: the one message the proxy alters.

`rewrite_reply(message, address_map)` takes the bytes of one whole reply (OP_MSG or legacy OP_REPLY,
never OP_COMPRESSED) and returns it re-encoded: the strings in `hosts`, `passives`, `arbiters`,
`primary` and `me` of the reply document that name a known member are replaced by the proxy's listener
address for it, every other element is copied byte for byte, and the header's messageLength is fixed.
requestID and responseTo are kept, so the chaining of exhaust (moreToCome) replies is never broken.
An OP_MSG checksum, if present, is dropped with its flag: it would no longer match.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping

from mongoproxy.protocol.opcodes import CHECKSUM_PRESENT, HEADER, MORE_TO_COME, OP_MSG, OP_REPLY

__all__ = ["CHECKSUM_PRESENT", "HEADER", "MORE_TO_COME", "OP_MSG", "OP_REPLY", "HelloRewriteError", "rewrite_reply"]

# Top-level fields of a hello reply that name members: string arrays, then single strings.
ADDRESS_LISTS = frozenset((b"hosts", b"passives", b"arbiters"))
ADDRESS_STRINGS = frozenset((b"primary", b"me"))
ADDRESS_FIELDS = ADDRESS_LISTS | ADDRESS_STRINGS
ADDRESS_FIELDS_STR = frozenset(f.decode() for f in ADDRESS_FIELDS)


class HelloRewriteError(ValueError):
    """The message is not a hello reply this module can re-encode; forward it unchanged."""


# Fixed sizes of BSON element values by type byte (variable-length types are handled in _value_end).
_FIXED = {0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8, 0x12: 8, 0x13: 16, 0xFF: 0, 0x7F: 0}


def _cstring_end(buf: bytes, pos: int, end: int) -> int:
    nul = buf.find(b"\x00", pos, end)
    if nul < 0:
        raise HelloRewriteError("unterminated key or cstring")
    return nul + 1


def _value_end(buf: bytes, kind: int, pos: int, end: int) -> int:
    """Offset just past the value of type `kind` starting at `pos`."""
    if kind in _FIXED:
        n = pos + _FIXED[kind]
    elif kind in (0x02, 0x0D, 0x0E):  # string, code, symbol: int32 length (with NUL) + bytes
        n = pos + 4 + _int32(buf, pos, end)
    elif kind in (0x03, 0x04, 0x0F):  # document, array, code with scope: int32 total length
        n = pos + _int32(buf, pos, end)
    elif kind == 0x05:  # binary: int32 length + subtype + bytes
        n = pos + 5 + _int32(buf, pos, end)
    elif kind == 0x0B:  # regex: two cstrings
        n = _cstring_end(buf, _cstring_end(buf, pos, end), end)
    elif kind == 0x0C:  # DBPointer: string + 12-byte ObjectId
        n = pos + 16 + _int32(buf, pos, end)
    else:
        raise HelloRewriteError(f"unknown BSON type 0x{kind:02x}")
    if n > end or n < pos:
        raise HelloRewriteError("a value runs past its document")
    return n


def _int32(buf: bytes, pos: int, end: int) -> int:
    if pos + 4 > end:
        raise HelloRewriteError("truncated length")
    return struct.unpack_from("<i", buf, pos)[0]


def _string(value: str) -> bytes:
    raw = value.encode()
    return struct.pack("<i", len(raw) + 1) + raw + b"\x00"


def _read_string(buf: bytes, pos: int, end: int) -> str:
    n = _int32(buf, pos, end)
    if n < 1 or pos + 4 + n > end or buf[pos + 4 + n - 1] != 0:
        raise HelloRewriteError("malformed string")
    return buf[pos + 4 : pos + 3 + n].decode("utf-8", "surrogateescape")


def _rewrite_array(buf: bytes, pos: int, end: int, swap: Callable[[str], str]) -> tuple[bytes, bool]:
    """An array of strings with each element swapped; non-string elements are copied."""
    out = bytearray()
    changed = False
    i = pos + 4
    last = end - 1
    if buf[last] != 0:
        raise HelloRewriteError("array not NUL-terminated")
    while i < last:
        kind = buf[i]
        key_end = _cstring_end(buf, i + 1, last)
        v_end = _value_end(buf, kind, key_end, last)
        if kind == 0x02:
            old = _read_string(buf, key_end, v_end)
            new = swap(old)
            if new != old:
                changed = True
                out += buf[i:key_end] + _string(new)
                i = v_end
                continue
        out += buf[i:v_end]
        i = v_end
    body = bytes(out) + b"\x00"
    return struct.pack("<i", len(body) + 4) + body, changed


def rewrite_document(doc: bytes, swap: Callable[[str], str]) -> tuple[bytes, int]:
    """(the document with its address fields swapped, how many strings changed); other elements byte-exact."""
    end = len(doc)
    if end < 5 or _int32(doc, 0, end) != end or doc[end - 1] != 0:
        raise HelloRewriteError("document length does not match")
    out = bytearray()
    changes = 0
    i = 4
    last = end - 1
    while i < last:
        kind = doc[i]
        key_end = _cstring_end(doc, i + 1, last)
        key = doc[i + 1 : key_end - 1]
        v_end = _value_end(doc, kind, key_end, last)
        if key in ADDRESS_FIELDS:
            if kind == 0x02 and key in ADDRESS_STRINGS:
                old = _read_string(doc, key_end, v_end)
                new = swap(old)
                if new != old:
                    changes += 1
                    out += doc[i:key_end] + _string(new)
                    i = v_end
                    continue
            elif kind == 0x04 and key in ADDRESS_LISTS:
                arr, changed = _rewrite_array(doc, key_end, v_end, swap)
                if changed:
                    changes += 1
                    out += doc[i:key_end] + arr
                    i = v_end
                    continue
        out += doc[i:v_end]
        i = v_end
    body = bytes(out) + b"\x00"
    return struct.pack("<i", len(body) + 4) + body, changes


def make_swap(
    address_map: Mapping[str, str], unknown: Callable[[str], str | None] | None = None
) -> Callable[[str], str]:
    """A swap function: host:port -> listener address (keys compared lower-case); `unknown` may supply one."""

    def swap(address: str) -> str:
        key = address.lower()
        new = address_map.get(key)
        if new is None and unknown is not None:
            new = unknown(key)
        return address if new is None else new

    return swap


def rewrite_reply(message: bytes, swap: Callable[[str], str]) -> tuple[bytes, int]:
    """(the re-encoded reply, how many fields changed); HelloRewriteError when it cannot be rewritten."""
    if len(message) < 21:
        raise HelloRewriteError("message too short")
    length, request_id, response_to, opcode = HEADER.unpack_from(message)
    if length != len(message):
        raise HelloRewriteError("messageLength does not match the bytes given")
    if opcode == OP_MSG:
        flags = struct.unpack_from("<I", message, 16)[0]
        end = length - 4 if flags & CHECKSUM_PRESENT else length
        pos = 20
        parts: list[bytes] = []
        changes = 0
        while pos < end:
            kind = message[pos]
            if kind == 0:
                size = _int32(message, pos + 1, end)
                if size < 5 or pos + 1 + size > end:
                    raise HelloRewriteError("body section runs past the message")
                doc, n = rewrite_document(message[pos + 1 : pos + 1 + size], swap)
                changes += n
                parts.append(b"\x00" + doc)
                pos += 1 + size
            elif kind == 1:  # a document sequence: copied as it is
                size = _int32(message, pos + 1, end)
                if size < 4 or pos + 1 + size > end:
                    raise HelloRewriteError("document sequence runs past the message")
                parts.append(message[pos : pos + 1 + size])
                pos += 1 + size
            else:
                raise HelloRewriteError(f"unknown OP_MSG section kind {kind}")
        body = struct.pack("<I", flags & ~CHECKSUM_PRESENT) + b"".join(parts)
    elif opcode == OP_REPLY:
        if length < 36:
            raise HelloRewriteError("OP_REPLY too short")
        number = struct.unpack_from("<i", message, 32)[0]
        pos = 36
        docs = []
        changes = 0
        for index in range(number):
            size = _int32(message, pos, length)
            if size < 5 or pos + size > length:
                raise HelloRewriteError("OP_REPLY document runs past the message")
            raw = message[pos : pos + size]
            if index == 0:
                raw, changes = rewrite_document(raw, swap)
            docs.append(raw)
            pos += size
        if pos != length:
            raise HelloRewriteError("OP_REPLY has bytes after its documents")
        body = message[16:36] + b"".join(docs)
    else:
        raise HelloRewriteError(f"opcode {opcode} is not a hello reply form")
    return HEADER.pack(16 + len(body), request_id, response_to, opcode) + body, changes
