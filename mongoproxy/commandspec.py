"""A request message as a command document pymongo can send again (sans-io; used by replay and the mirror).

The spec is the command without $db, lsid and $clusterTime (the sender's own session and cluster-time
machinery replaces them); nested values stay RawBSONDocument so their types survive, int64 stays Int64, and
OP_MSG document sequences become arrays. readConcern's afterClusterTime/atClusterTime are dropped: they name
the recorded deployment's clock.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from mongoproxy import redact
from mongoproxy.errors import DecodeError
from mongoproxy.protocol.opcodes import OP_MSG

I32 = struct.Struct("<i")
CHECKSUM_PRESENT = 1 << 0
# Fields never sent as recorded: the target session/cluster-time machinery replaces them.
DROPPED_FIELDS = frozenset({"$db", "lsid", "$clusterTime"})


def query_document(data: bytes) -> Any:
    """The query document of an OP_QUERY message, as a RawBSONDocument."""
    from bson.raw_bson import RawBSONDocument

    pos = data.index(b"\0", 20) + 1 + 8
    n = I32.unpack_from(data, pos)[0]
    return RawBSONDocument(bytes(data[pos : pos + n]))


def elements(doc: bytes) -> Iterator[tuple[str, int, int, int]]:
    """(key, type, value start, value end) of each top-level element of a BSON document."""
    end = I32.unpack_from(doc)[0]
    i = 4
    while i < end - 1:
        t = doc[i]
        k_end = doc.index(b"\0", i + 1)
        key = doc[i + 1 : k_end].decode("utf-8", "replace")
        stop = redact.value_end(doc, t, k_end + 1, end - 1)
        yield key, t, k_end + 1, stop
        i = stop


def message_body(data: bytes, opcode: int) -> tuple[bytes, list[tuple[str, list]]]:
    """(the command document's bytes, OP_MSG document sequences) of an uncompressed OP_MSG or OP_QUERY."""
    from bson.raw_bson import RawBSONDocument

    sequences: list[tuple[str, list]] = []
    if opcode != OP_MSG:
        return query_document(data).raw, sequences
    flags = I32.unpack_from(data, 16)[0] & 0xFFFFFFFF
    end = len(data) - (4 if flags & CHECKSUM_PRESENT else 0)
    pos = 20
    doc = None
    while pos < end:
        kind = data[pos]
        pos += 1
        if kind == 0:
            n = I32.unpack_from(data, pos)[0]
            doc = bytes(data[pos : pos + n])
            pos += n
        elif kind == 1:
            size = I32.unpack_from(data, pos)[0]
            stop = pos + size
            name_end = data.index(b"\0", pos + 4)
            ident = data[pos + 4 : name_end].decode()
            docs = []
            d = name_end + 1
            while d < stop:
                n = I32.unpack_from(data, d)[0]
                docs.append(RawBSONDocument(bytes(data[d : d + n])))
                d += n
            sequences.append((ident, docs))
            pos = stop
        else:
            raise DecodeError("bad_section_kind", f"kind {kind}")
    if doc is None:
        raise DecodeError("truncated", "no kind-0 section")
    return doc, sequences


def spec_from_document(doc: bytes, sequences: Sequence[tuple[str, list]] = ()) -> tuple[dict[str, Any], bytes | None]:
    """(the command as a dict ready for pymongo, the recorded lsid's id bytes or None) of a command document."""
    from bson import Int64
    from bson.raw_bson import RawBSONDocument

    raw = RawBSONDocument(doc)
    first = next(iter(raw), "")
    if first in ("$query", "query") and isinstance(raw[first], RawBSONDocument):  # a wrapped OP_QUERY command
        raw = raw[first]
        doc = raw.raw
    int64_keys = {k for k, t, _, _ in elements(doc) if t == 0x12}
    spec: dict[str, Any] = {}
    lsid_key = None
    for k, v in raw.items():
        if k in DROPPED_FIELDS:
            if k == "lsid" and isinstance(v, RawBSONDocument) and "id" in v:
                lid = v["id"]
                lsid_key = bytes(lid.bytes if isinstance(lid, uuid.UUID) else lid)
            continue
        if k in int64_keys and isinstance(v, int):
            v = Int64(v)
        spec[k] = v
    for ident, docs in sequences:
        spec[ident] = docs
    rc = spec.get("readConcern")
    if isinstance(rc, RawBSONDocument) and ("afterClusterTime" in rc or "atClusterTime" in rc):
        spec["readConcern"] = {k: v for k, v in rc.items() if k not in ("afterClusterTime", "atClusterTime")}
    return spec, lsid_key


def command_spec(data: bytes, opcode: int) -> tuple[dict[str, Any], bytes | None]:
    """(spec, recorded lsid id) of an uncompressed OP_MSG or OP_QUERY-on-$cmd message."""
    doc, sequences = message_body(data, opcode)
    return spec_from_document(doc, sequences)
