"""Legacy requests as commands a current server accepts, so that captures from the mongoreplay era replay.

OP_COMMAND becomes its command; OP_INSERT/OP_UPDATE/OP_DELETE become insert/update/delete; OP_QUERY on a
collection becomes find (with $query/$orderby/$hint unwrapped, numberToReturn as limit or batchSize);
OP_GET_MORE becomes getMore; OP_KILL_CURSORS becomes killCursors (it names no collection: the extractor takes it
from the op that opened the cursor, and the runner remaps the ids like a killCursors command's). Each is named by a conversion string the report counts, with the compressor
when the request was inside OP_COMPRESSED.
"""

from __future__ import annotations

import struct
from typing import Any

from mongoproxy.commandspec import spec_from_document

OP_UPDATE, OP_INSERT, OP_QUERY, OP_GET_MORE, OP_DELETE, OP_KILL_CURSORS, OP_COMMAND, OP_COMPRESSED = (
    2001,
    2002,
    2004,
    2005,
    2006,
    2007,
    2010,
    2012,
)
OP_NAMES = {
    OP_UPDATE: "OP_UPDATE",
    OP_INSERT: "OP_INSERT",
    OP_QUERY: "OP_QUERY",
    OP_GET_MORE: "OP_GET_MORE",
    OP_DELETE: "OP_DELETE",
    OP_KILL_CURSORS: "OP_KILL_CURSORS",
    OP_COMMAND: "OP_COMMAND",
}
COMPRESSORS = {0: "noop", 1: "snappy", 2: "zlib", 3: "zstd"}
I32 = struct.Struct("<i")
I64 = struct.Struct("<q")
# OP_QUERY modifiers and their find-command fields.
QUERY_MODIFIERS = {
    "$orderby": "sort",
    "orderby": "sort",
    "$hint": "hint",
    "$comment": "comment",
    "$maxTimeMS": "maxTimeMS",
    "$max": "max",
    "$min": "min",
    "$returnKey": "returnKey",
    "$showDiskLoc": "showRecordId",
    "$maxScan": None,  # removed in 4.2: dropped
    "$snapshot": None,  # removed in 4.0: dropped
    "$explain": None,
}


def compressor_of(wire: bytes) -> str:
    """The compressor's name of an OP_COMPRESSED message as it travelled ("" for others)."""
    if len(wire) > 24 and I32.unpack_from(wire, 12)[0] == OP_COMPRESSED:
        return COMPRESSORS.get(wire[24], f"compressor {wire[24]}")
    return ""


def conversion_name(src: str, command: str, compressor: str) -> str:
    """E.g. "OP_INSERT -> insert" or "OP_COMPRESSED(snappy) OP_COMMAND -> count"."""
    return (f"OP_COMPRESSED({compressor}) " if compressor else "") + f"{src} -> {command}"


def _cstring(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(b"\0", pos)
    return data[pos:end].decode("utf-8"), end + 1


def _doc(data: bytes, pos: int) -> tuple[bytes, int]:
    n = I32.unpack_from(data, pos)[0]
    if n < 5 or pos + n > len(data):
        raise ValueError(f"document length {n} at {pos}")
    return bytes(data[pos : pos + n]), pos + n


def _raw(doc: bytes) -> Any:
    from bson.raw_bson import RawBSONDocument

    return RawBSONDocument(doc)


def convert(data: bytes, opcode: int) -> tuple[str, str, str, dict, bytes | None] | None:
    """(command, db, collection, spec, lsid id) of an uncompressed legacy request; None when it has no equivalent."""
    from bson import Int64

    if opcode == OP_COMMAND:
        db, pos = _cstring(data, 16)
        name, pos = _cstring(data, pos)
        args, pos = _doc(data, pos)
        if pos < len(data):
            # commandArgs then metadata, as servers read it; a writer that put metadata first is read too.
            other = _doc(data, pos)[0]
            if (
                next(iter(_raw(args)), "").lower() != name.lower()
                and next(iter(_raw(other)), "").lower() == name.lower()
            ):
                args = other
        spec, lsid = spec_from_document(args)
        command = next(iter(spec), "")
        first = spec.get(command)
        return command, db, first if isinstance(first, str) else "", spec, lsid
    if opcode == OP_INSERT:
        flags = I32.unpack_from(data, 16)[0]
        ns, pos = _cstring(data, 20)
        docs = []
        while pos < len(data):
            d, pos = _doc(data, pos)
            docs.append(_raw(d))
        db, _, coll = ns.partition(".")
        return "insert", db, coll, {"insert": coll, "documents": docs, "ordered": not flags & 1}, None
    if opcode in (OP_UPDATE, OP_DELETE):
        ns, pos = _cstring(data, 20)
        flags = I32.unpack_from(data, pos)[0]
        selector, pos = _doc(data, pos + 4)
        db, _, coll = ns.partition(".")
        if opcode == OP_DELETE:
            spec = {"delete": coll, "deletes": [{"q": _raw(selector), "limit": 1 if flags & 1 else 0}]}
            return "delete", db, coll, spec, None
        update, pos = _doc(data, pos)
        u = {"q": _raw(selector), "u": _raw(update), "upsert": bool(flags & 1), "multi": bool(flags & 2)}
        return "update", db, coll, {"update": coll, "updates": [u]}, None
    if opcode == OP_GET_MORE:
        ns, pos = _cstring(data, 20)
        n = I32.unpack_from(data, pos)[0]
        cursor = I64.unpack_from(data, pos + 4)[0]
        db, _, coll = ns.partition(".")
        spec = {"getMore": Int64(cursor), "collection": coll}
        if n > 0:
            spec["batchSize"] = n
        return "getMore", db, coll, spec, None
    if opcode == OP_KILL_CURSORS:  # ZERO, numberOfCursorIDs, cursorIDs; no namespace on the wire
        count = I32.unpack_from(data, 20)[0]
        if count < 0 or 24 + 8 * count > len(data):
            raise ValueError(f"{count} cursor ids in a {len(data)}-byte OP_KILL_CURSORS")
        ids = [Int64(I64.unpack_from(data, 24 + 8 * i)[0]) for i in range(count)]
        return "killCursors", "", "", {"killCursors": "", "cursors": ids}, None
    if opcode == OP_QUERY:
        ns, pos = _cstring(data, 20)
        skip, n = struct.unpack_from("<ii", data, pos)
        query, pos = _doc(data, pos + 8)
        fields = _doc(data, pos)[0] if pos < len(data) else None
        db, _, coll = ns.partition(".")
        return "find", db, coll, _find_spec(coll, _raw(query), skip, n, fields), None
    return None


def _find_spec(coll: str, query: Any, skip: int, n: int, fields: bytes | None) -> dict:
    spec: dict[str, Any] = {"find": coll}
    wrapped = "$query" in query or "query" in query
    if wrapped:
        spec["filter"] = query["$query"] if "$query" in query else query["query"]
        for k, v in query.items():
            field = QUERY_MODIFIERS.get(k)
            if field:
                spec[field] = v
    else:
        spec["filter"] = query
    if fields is not None and len(fields) > 5:
        spec["projection"] = _raw(fields)
    if skip:
        spec["skip"] = skip
    if n < 0 or n == 1:  # a negative numberToReturn (or 1) asks for one batch, then the cursor closes
        spec["limit"] = abs(n)
        spec["singleBatch"] = True
    elif n > 1:
        spec["batchSize"] = n
    return spec
