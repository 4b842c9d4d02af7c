"""Writes the malformed-stream corpus: `python -m tests.malformed.generate` (from the repository root).

Each file is named DIRECTION.REASON.SLUG.bin: the direction it travels (request: client to server, reply: server to
client), the decode-error reason the proxy must count for it, and what is wrong. A slug ending in `-at-eof` is a
stream that ends inside a message: the sender closes after it. README.md describes every file.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import bson

from tests.support import wire as tw

HERE = Path(__file__).resolve().parent

# The request id of every malformed request; reply files answer request id 1.
RID = 1


def _op_msg(body: bytes, opcode: int = tw.OP_MSG, request_id: int = RID, response_to: int = 0) -> bytes:
    return struct.pack("<iiii", 16 + len(body), request_id, response_to, opcode) + body


def _kind0(doc: bytes, flags: int = 0) -> bytes:
    return struct.pack("<I", flags) + b"\x00" + doc


def _find() -> bytearray:
    return bytearray(bson.encode({"find": "orders", "filter": {"_id": 7}, "$db": "shop"}))


def _compressed(
    inner: bytes,
    compressor: str,
    size_delta: int = 0,
    compressor_id: int | None = None,
    original_op: int | None = None,
    corrupt_at: int | None = None,
) -> bytes:
    length, rid, rto, op = struct.unpack_from("<iiii", inner)
    body = inner[16:]
    payload = bytearray(tw.compress_bytes(body, compressor))
    if corrupt_at is not None:
        payload[corrupt_at : corrupt_at + 4] = b"\xde\xad\xbe\xef"
    prefix = struct.pack(
        "<iiB",
        op if original_op is None else original_op,
        len(body) + size_delta,
        tw.COMPRESSOR_IDS[compressor] if compressor_id is None else compressor_id,
    )
    return tw.encode_message(tw.OP_COMPRESSED, prefix + bytes(payload), rid, rto)


def _patch(doc: bytearray, needle: bytes, offset: int, new: bytes) -> bytearray:
    i = doc.index(needle) + offset
    doc[i : i + len(new)] = new
    return doc


def build() -> dict[str, bytes]:
    """File name -> bytes, for the whole corpus."""
    c: dict[str, bytes] = {}
    ping = tw.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=RID)
    find = tw.encode_op_msg({"find": "orders", "filter": {"_id": 7}, "$db": "shop"}, request_id=RID)

    # ---- framing: truncated streams and impossible lengths
    c["request.truncated.partial-header-at-eof.bin"] = ping + struct.pack("<iiii", 60, RID + 1, 0, tw.OP_MSG)[:10]
    c["request.truncated.partial-body-at-eof.bin"] = find[: len(find) - 9]
    c["request.message_too_large.over-maximum.bin"] = struct.pack("<iiii", 48_000_001, RID, 0, tw.OP_MSG) + b"\x00" * 64
    c["request.message_too_large.int32-max.bin"] = struct.pack("<iiii", 0x7FFFFFFF, RID, 0, tw.OP_MSG) + b"\x00" * 64
    c["request.bad_message_length.negative.bin"] = struct.pack("<iiii", -1, RID, 0, tw.OP_MSG) + find[16:]
    c["request.bad_message_length.below-16.bin"] = struct.pack("<iiii", 15, RID, 0, tw.OP_MSG) + find[16:]
    c["request.bad_message_length.zero.bin"] = struct.pack("<iiii", 0, RID, 0, tw.OP_MSG) + find[16:]
    c["request.truncated.empty-op-msg.bin"] = struct.pack("<iiii", 16, RID, 0, tw.OP_MSG)

    # ---- BSON with wrong internal lengths, bad terminators and types
    doc = _find()
    doc[0:4] = struct.pack("<i", len(doc) + 50)
    c["request.bad_length.document-longer-than-message.bin"] = _op_msg(_kind0(bytes(doc)))
    doc = _find()
    doc[0:4] = struct.pack("<i", len(doc) - 3)
    c["request.bad_length.document-shorter-than-its-elements.bin"] = _op_msg(_kind0(bytes(doc)))
    doc = _find()
    doc[0:4] = struct.pack("<i", 3)
    c["request.bad_length.document-length-3.bin"] = _op_msg(_kind0(bytes(doc)))
    c["request.bad_length.string-length-past-document.bin"] = _op_msg(
        _kind0(bytes(_patch(_find(), b"orders", -4, struct.pack("<i", 1000))))
    )
    c["request.string_not_terminated.string-length-zero.bin"] = _op_msg(
        _kind0(bytes(_patch(_find(), b"orders", -4, struct.pack("<i", 0))))
    )
    c["request.string_not_terminated.string-without-nul.bin"] = _op_msg(
        _kind0(bytes(_patch(_find(), b"orders", 6, b"X")))
    )
    doc = _find()
    doc[-1] = 1
    c["request.missing_terminator.document-without-trailing-nul.bin"] = _op_msg(_kind0(bytes(doc)))
    doc = _find()
    doc[4] = 0x77
    c["request.unknown_type.element-type-0x77.bin"] = _op_msg(_kind0(bytes(doc)))
    c["request.bad_section_kind.section-kind-5.bin"] = _op_msg(struct.pack("<I", 0) + b"\x05" + bytes(_find()))
    seq = b"documents\x00" + bson.encode({"a": 1})
    c["request.bad_length.kind1-size-past-message.bin"] = _op_msg(
        _kind0(bson.encode({"insert": "orders", "$db": "shop"})) + b"\x01" + struct.pack("<i", 500) + seq
    )
    seq_doc = bytearray(bson.encode({"a": 1}))
    seq_doc[0:4] = struct.pack("<i", 40)
    c["request.bad_length.kind1-document-length.bin"] = _op_msg(
        _kind0(bson.encode({"insert": "orders", "$db": "shop"}))
        + b"\x01"
        + struct.pack("<i", 4 + 10 + len(seq_doc))
        + b"documents\x00"
        + bytes(seq_doc)
    )
    killc = struct.pack("<ii", 0, -5) + struct.pack("<q", 1)
    c["request.bad_length.op-kill-cursors-negative-count.bin"] = tw.encode_message(tw.OP_KILL_CURSORS, killc, RID)
    q = tw.encode_op_query({"isMaster": 1}, fields={"a": 1}, request_id=RID) + b"\x01\x02\x03"
    c["request.trailing_bytes.op-query-extra-bytes.bin"] = struct.pack("<i", len(q)) + q[4:]

    # ---- bad UTF-8 in the strings the proxy extracts
    c["request.invalid_utf8.collection-name.bin"] = _op_msg(_kind0(bytes(_patch(_find(), b"orders", 1, b"\xc3\x28"))))
    c["request.invalid_utf8.command-name.bin"] = _op_msg(_kind0(bytes(_patch(_find(), b"find\x00", 1, b"\xff\xfe"))))
    c["request.invalid_utf8.database-name.bin"] = _op_msg(_kind0(bytes(_patch(_find(), b"shop\x00", 2, b"\xed\xa0"))))
    q = tw.encode_op_query({"find": "orders"}, full_collection_name="sh\u00e9p.$cmd", request_id=RID)
    c["request.invalid_utf8.op-query-namespace.bin"] = q.replace(b"sh\xc3\xa9p", b"sh\xff\xfep")

    # ---- OP_COMPRESSED
    for comp in ("zlib", "snappy", "zstd"):
        c[f"request.bad_uncompressed_size.{comp}-size-too-small.bin"] = _compressed(find, comp, size_delta=-1)
        c[f"request.bad_uncompressed_size.{comp}-size-too-large.bin"] = _compressed(find, comp, size_delta=+7)
    c["request.bad_uncompressed_size.negative-size.bin"] = _compressed(find, "zlib", size_delta=-10_000)
    c["request.unknown_compressor.compressor-id-9.bin"] = _compressed(find, "zlib", compressor_id=9)
    c["request.unknown_compressor.compressor-id-255.bin"] = _compressed(find, "zlib", compressor_id=255)
    c["request.decompress_failed.corrupt-zlib.bin"] = _compressed(find, "zlib", corrupt_at=2)
    c["request.decompress_failed.corrupt-zstd.bin"] = _compressed(find, "zstd", corrupt_at=0)
    c["request.decompress_failed.corrupt-snappy.bin"] = _compressed(find, "snappy", corrupt_at=0)

    # ---- opcodes
    c["request.unknown_opcode.opcode-4242.bin"] = tw.encode_message(4242, b"not a mongodb body", RID)
    c["request.unknown_opcode.opcode-0.bin"] = tw.encode_message(0, b"not a mongodb body", RID)
    c["request.unknown_opcode.compressed-original-opcode-4242.bin"] = _compressed(find, "zlib", original_op=4242)

    # ---- checksums (the proxy runs with --verify-checksums)
    bad = bytearray(tw.encode_op_msg({"ping": 1, "$db": "admin"}, checksum=True, request_id=RID))
    bad[-1] ^= 0xFF
    c["request.checksum_mismatch.wrong-crc32c.bin"] = bytes(bad)

    # ---- replies (each answers request id 1)
    r = bytearray(tw.encode_op_reply([{"ok": 1.0}], response_to=RID, request_id=501))
    r[32:36] = struct.pack("<i", 5)
    c["reply.truncated.op-reply-number-returned-too-high.bin"] = bytes(r)
    r = bytearray(tw.encode_op_reply([{"ok": 1.0}], response_to=RID, request_id=502))
    r[36:40] = struct.pack("<i", 900)
    c["reply.bad_length.op-reply-document-length.bin"] = bytes(r)
    r = tw.encode_op_msg({"ok": 0.0, "errmsg": "b\u00e9d", "code": 2}, response_to=RID, request_id=503)
    c["reply.invalid_utf8.errmsg.bin"] = r.replace(b"b\xc3\xa9d", b"b\xff\xa9d")
    c["reply.invalid_utf8.cursor-ns.bin"] = tw.encode_op_msg(
        {"cursor": {"id": bson.Int64(0), "ns": "shop.\u00e9", "firstBatch": []}, "ok": 1.0},
        response_to=RID,
        request_id=504,
    ).replace(b"shop.\xc3\xa9", b"shop.\xff\xa9")
    c["reply.bad_message_length.negative.bin"] = struct.pack("<iiii", -100, 505, RID, tw.OP_MSG) + b"\x00" * 20
    c["reply.bad_uncompressed_size.zlib-size-too-large.bin"] = _compressed(
        tw.encode_op_msg({"ok": 1.0}, response_to=RID, request_id=506), "zlib", size_delta=+1
    )
    reply = tw.encode_op_msg(
        {"cursor": {"id": bson.Int64(0), "ns": "shop.orders", "firstBatch": [{"_id": 7}]}, "ok": 1.0},
        response_to=RID,
        request_id=507,
    )
    c["reply.truncated.partial-reply-at-eof.bin"] = reply[: len(reply) // 2]
    return c


def main() -> int:
    corpus = build()
    for old in HERE.glob("*.bin"):
        if old.name not in corpus:
            old.unlink()
    for name, data in sorted(corpus.items()):
        (HERE / name).write_bytes(data)
    print(f"wrote {len(corpus)} files to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
