"""The first section of a request held by the gate: inflating OP_COMPRESSED bodies, and the query-shape hash."""

from __future__ import annotations

import struct

from mongoproxy import querylog
from mongoproxy._bson_parser import BodyScanner
from mongoproxy.protocol import compression
from mongoproxy.protocol.opcodes import MORE_TO_COME, OP_MSG, OP_QUERY

_I32 = struct.Struct("<i")
_COMPRESSED_PREFIX = struct.Struct("<iiB")  # originalOpcode, uncompressedSize, compressorId


def inflate(compressor: int, data: bytes, size: int, limit: int) -> bytes:
    """An OP_COMPRESSED body's original bytes, through protocol's one bounded decompressor (DecodeError if bad)."""
    return compression.decompress(compressor, data, size, limit)


def compressed_first_doc(message: bytes, limit: int) -> tuple[int, bytes, int, str, bytes] | None:
    """(original opcode, first document, moreToCome bit, OP_QUERY namespace, body) of a whole OP_COMPRESSED."""
    original, size, compressor = _COMPRESSED_PREFIX.unpack_from(message, 16)
    if not 0 < size <= limit:
        return None
    body = inflate(compressor, message[25:], size, limit)
    if original == OP_MSG and len(body) > 9 and body[4] == 0:
        doc_len = _I32.unpack_from(body, 5)[0]
        if 5 <= doc_len <= len(body) - 5:
            return original, body[5 : 5 + doc_len], body[0] & MORE_TO_COME, "", body
    elif original == OP_QUERY:
        nul = body.find(b"\x00", 4)
        if nul > 0 and nul + 13 <= len(body):
            doc_len = _I32.unpack_from(body, nul + 9)[0]
            if 5 <= doc_len <= len(body) - nul - 9:
                ns = body[4:nul].decode("utf-8", "replace")
                return original, body[nul + 9 : nul + 9 + doc_len], 0, ns, body
    return None


def shape_hash(opcode: int, body_head: bytes, body_length: int, op: str) -> str:
    """The command log's query-shape hash of a request whose first section is `body_head`."""
    scanner = BodyScanner()
    scanner.reset(opcode, False, body_length, 1, 4096)
    try:
        scanner.feed(body_head, 0, len(body_head))
    except Exception:  # noqa: BLE001 - the head ends mid-body; what was rendered so far is what we need
        pass
    rendered = scanner.result().query_shape
    if not rendered:
        return ""
    return querylog.prepare(rendered, op, False)[1] or ""
