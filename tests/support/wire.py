"""Test-side MongoDB wire codec: encode/decode every opcode with pymongo's bson; independent of mongoproxy.wire.

Messages are plain bytes. `decode_message(raw)` gives a `Message` with the decoded body of its opcode;
OP_COMPRESSED is unwrapped transparently (`Message.compressor` says how it travelled).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import bson

OP_REPLY = 1
OP_UPDATE = 2001
OP_INSERT = 2002
OP_QUERY = 2004
OP_GET_MORE = 2005
OP_DELETE = 2006
OP_KILL_CURSORS = 2007
OP_COMMAND = 2010
OP_COMMANDREPLY = 2011
OP_COMPRESSED = 2012
OP_MSG = 2013

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

# OP_MSG flagBits
CHECKSUM_PRESENT = 1 << 0
MORE_TO_COME = 1 << 1
EXHAUST_ALLOWED = 1 << 16

# OP_REPLY responseFlags
REPLY_CURSOR_NOT_FOUND = 1 << 0
REPLY_QUERY_FAILURE = 1 << 1
REPLY_AWAIT_CAPABLE = 1 << 3

COMPRESSOR_IDS = {"noop": 0, "snappy": 1, "zlib": 2, "zstd": 3}
COMPRESSOR_NAMES = {v: k for k, v in COMPRESSOR_IDS.items()}

# Commands whose messages are never compressed (compression spec).
UNCOMPRESSED_COMMANDS = frozenset(
    {
        "hello",
        "ismaster",
        "saslstart",
        "saslcontinue",
        "getnonce",
        "authenticate",
        "createuser",
        "updateuser",
        "copydbsaslstart",
        "copydbgetnonce",
        "copydb",
    }
)

HEADER = struct.Struct("<iiii")
HEADER_SIZE = 16
DEFAULT_MAX_MESSAGE = 48_000_000

Doc = Mapping[str, Any] | bytes


class WireFormatError(ValueError):
    """The bytes are not a well-formed MongoDB message."""


_request_ids = itertools.count(1)


def next_request_id() -> int:
    """A fresh positive requestID (process-wide counter)."""
    return next(_request_ids) & 0x7FFFFFFF


# ---------------------------------------------------------------- CRC-32C (Castagnoli), pure Python


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C of `data` (continuing from `crc`); check value: crc32c(b"123456789") == 0xE3069283."""
    crc ^= 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------- BSON helpers


def encode_doc(doc: Doc) -> bytes:
    """BSON bytes of a mapping (pymongo's encoder), or `doc` itself when already bytes."""
    if isinstance(doc, (bytes, bytearray, memoryview)):
        return bytes(doc)
    return bson.encode(doc)


def _cstring(s: str) -> bytes:
    b = s.encode("utf-8")
    if b"\x00" in b:
        raise ValueError(f"cstring contains NUL: {s!r}")
    return b + b"\x00"


class _Reader:
    """Bounds-checked cursor over a message payload."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise WireFormatError(f"{self.what}: need {n} bytes at offset {self.pos}, have {self.remaining()}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def int32(self) -> int:
        return struct.unpack("<i", self.take(4))[0]

    def uint32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def int64(self) -> int:
        return struct.unpack("<q", self.take(8))[0]

    def cstring(self) -> str:
        end = self.data.find(b"\x00", self.pos)
        if end < 0:
            raise WireFormatError(f"{self.what}: cstring without NUL at offset {self.pos}")
        s = self.data[self.pos : end].decode("utf-8")
        self.pos = end + 1
        return s

    def doc_bytes(self) -> bytes:
        if self.remaining() < 5:
            raise WireFormatError(f"{self.what}: truncated document at offset {self.pos}")
        n = struct.unpack_from("<i", self.data, self.pos)[0]
        if n < 5:
            raise WireFormatError(f"{self.what}: document length {n} at offset {self.pos}")
        return self.take(n)

    def doc(self) -> dict:
        raw = self.doc_bytes()
        try:
            return bson.decode(raw)
        except Exception as exc:  # bson.errors.InvalidBSON and friends
            raise WireFormatError(f"{self.what}: invalid BSON: {exc}") from exc

    def docs_to_end(self) -> list[dict]:
        out = []
        while self.remaining():
            out.append(self.doc())
        return out


# ---------------------------------------------------------------- decoded bodies


@dataclass
class OpMsg:
    """OP_MSG body: flagBits, the kind-0 document, kind-1 sequences, the checksum if present."""

    flags: int
    body: dict
    sequences: list[tuple[str, list[dict]]] = field(default_factory=list)
    checksum: int | None = None

    @property
    def more_to_come(self) -> bool:
        """moreToCome flag bit."""
        return bool(self.flags & MORE_TO_COME)

    @property
    def exhaust_allowed(self) -> bool:
        """exhaustAllowed flag bit."""
        return bool(self.flags & EXHAUST_ALLOWED)

    def sequence(self, identifier: str) -> list[dict] | None:
        """Documents of the kind-1 section named `identifier`, or None."""
        for ident, docs in self.sequences:
            if ident == identifier:
                return docs
        return None


@dataclass
class OpQuery:
    """Legacy OP_QUERY body."""

    flags: int
    full_collection_name: str
    number_to_skip: int
    number_to_return: int
    query: dict
    fields: dict | None = None

    @property
    def database(self) -> str:
        """Database part of fullCollectionName."""
        return self.full_collection_name.split(".", 1)[0]


@dataclass
class OpReply:
    """Legacy OP_REPLY body."""

    response_flags: int
    cursor_id: int
    starting_from: int
    number_returned: int
    documents: list[dict]


@dataclass
class LegacyOp:
    """A removed opcode (OP_INSERT, OP_UPDATE, OP_DELETE, OP_GET_MORE, OP_KILL_CURSORS, OP_COMMAND[REPLY])."""

    opcode: int
    fields: dict


@dataclass
class Message:
    """One framed message; for OP_COMPRESSED, the unwrapped original (opcode/payload) plus `compressor`."""

    request_id: int
    response_to: int
    opcode: int
    payload: bytes  # the body after the 16-byte header (decompressed)
    raw: bytes  # the bytes exactly as they travelled
    compressor: str | None = None
    msg: OpMsg | None = None
    query: OpQuery | None = None
    reply: OpReply | None = None
    legacy: LegacyOp | None = None

    @property
    def op_name(self) -> str:
        """OP_MSG, OP_QUERY, ... (of the unwrapped message)."""
        return OP_NAMES.get(self.opcode, f"OP_{self.opcode}")

    @property
    def doc(self) -> dict | None:
        """The command or reply document: OP_MSG kind 0, OP_QUERY query, first OP_REPLY document."""
        if self.msg is not None:
            return self.msg.body
        if self.query is not None:
            return self.query.query
        if self.reply is not None:
            return self.reply.documents[0] if self.reply.documents else None
        if self.legacy is not None and self.opcode == OP_COMMAND:
            return self.legacy.fields["command_args"]
        if self.legacy is not None and self.opcode == OP_COMMANDREPLY:
            return self.legacy.fields["command_reply"]
        return None

    @property
    def command_name(self) -> str | None:
        """First key of the command document (OP_MSG/OP_QUERY), if any."""
        d = self.doc if self.reply is None else None
        return next(iter(d), None) if d else None

    @property
    def flags(self) -> int:
        """OP_MSG flagBits / OP_QUERY flags / OP_REPLY responseFlags; 0 otherwise."""
        if self.msg is not None:
            return self.msg.flags
        if self.query is not None:
            return self.query.flags
        if self.reply is not None:
            return self.reply.response_flags
        return 0

    @property
    def more_to_come(self) -> bool:
        """OP_MSG moreToCome."""
        return self.msg is not None and self.msg.more_to_come


# ---------------------------------------------------------------- encoders


def encode_message(opcode: int, payload: bytes, request_id: int | None = None, response_to: int = 0) -> bytes:
    """Header + payload."""
    rid = next_request_id() if request_id is None else request_id
    return HEADER.pack(HEADER_SIZE + len(payload), rid, response_to, opcode) + payload


def op_msg_payload(body: Doc, sequences: Iterable[tuple[str, Sequence[Doc]]] = (), flags: int = 0) -> bytes:
    """OP_MSG payload without checksum: flagBits, kind 0, then kind-1 sections."""
    parts = [struct.pack("<I", flags), b"\x00", encode_doc(body)]
    for identifier, docs in sequences:
        seq = _cstring(identifier) + b"".join(encode_doc(d) for d in docs)
        parts += [b"\x01", struct.pack("<i", 4 + len(seq)), seq]
    return b"".join(parts)


def encode_op_msg(
    body: Doc,
    *,
    sequences: Iterable[tuple[str, Sequence[Doc]]] = (),
    flags: int = 0,
    checksum: bool = False,
    request_id: int | None = None,
    response_to: int = 0,
) -> bytes:
    """A whole OP_MSG; `checksum=True` sets checksumPresent and appends the CRC-32C."""
    if checksum:
        flags |= CHECKSUM_PRESENT
    payload = op_msg_payload(body, sequences, flags)
    if not flags & CHECKSUM_PRESENT:
        return encode_message(OP_MSG, payload, request_id, response_to)
    rid = next_request_id() if request_id is None else request_id
    head = HEADER.pack(HEADER_SIZE + len(payload) + 4, rid, response_to, OP_MSG)
    return head + payload + struct.pack("<I", crc32c(head + payload))


def encode_op_query(
    query: Doc,
    *,
    full_collection_name: str = "admin.$cmd",
    flags: int = 0,
    number_to_skip: int = 0,
    number_to_return: int = -1,
    fields: Doc | None = None,
    request_id: int | None = None,
) -> bytes:
    """A whole legacy OP_QUERY (the driver handshake's form by default)."""
    payload = (
        struct.pack("<i", flags)
        + _cstring(full_collection_name)
        + struct.pack("<ii", number_to_skip, number_to_return)
        + encode_doc(query)
        + (encode_doc(fields) if fields is not None else b"")
    )
    return encode_message(OP_QUERY, payload, request_id)


def encode_op_reply(
    documents: Sequence[Doc],
    *,
    response_to: int,
    cursor_id: int = 0,
    starting_from: int = 0,
    flags: int = REPLY_AWAIT_CAPABLE,
    request_id: int | None = None,
) -> bytes:
    """A whole legacy OP_REPLY."""
    payload = struct.pack("<iqii", flags, cursor_id, starting_from, len(documents)) + b"".join(
        encode_doc(d) for d in documents
    )
    return encode_message(OP_REPLY, payload, request_id, response_to)


def encode_op_insert(
    full_collection_name: str, documents: Sequence[Doc], *, flags: int = 0, request_id: int | None = None
) -> bytes:
    """A whole legacy OP_INSERT."""
    payload = struct.pack("<i", flags) + _cstring(full_collection_name) + b"".join(encode_doc(d) for d in documents)
    return encode_message(OP_INSERT, payload, request_id)


def encode_op_update(
    full_collection_name: str, selector: Doc, update: Doc, *, flags: int = 0, request_id: int | None = None
) -> bytes:
    """A whole legacy OP_UPDATE."""
    payload = (
        b"\x00\x00\x00\x00"
        + _cstring(full_collection_name)
        + struct.pack("<i", flags)
        + encode_doc(selector)
        + encode_doc(update)
    )
    return encode_message(OP_UPDATE, payload, request_id)


def encode_op_delete(
    full_collection_name: str, selector: Doc, *, flags: int = 0, request_id: int | None = None
) -> bytes:
    """A whole legacy OP_DELETE."""
    payload = b"\x00\x00\x00\x00" + _cstring(full_collection_name) + struct.pack("<i", flags) + encode_doc(selector)
    return encode_message(OP_DELETE, payload, request_id)


def encode_op_get_more(
    full_collection_name: str, cursor_id: int, *, number_to_return: int = 0, request_id: int | None = None
) -> bytes:
    """A whole legacy OP_GET_MORE."""
    payload = b"\x00\x00\x00\x00" + _cstring(full_collection_name) + struct.pack("<iq", number_to_return, cursor_id)
    return encode_message(OP_GET_MORE, payload, request_id)


def encode_op_kill_cursors(cursor_ids: Sequence[int], *, request_id: int | None = None) -> bytes:
    """A whole legacy OP_KILL_CURSORS."""
    payload = struct.pack("<ii", 0, len(cursor_ids)) + b"".join(struct.pack("<q", c) for c in cursor_ids)
    return encode_message(OP_KILL_CURSORS, payload, request_id)


def encode_op_command(
    database: str,
    command_name: str,
    metadata: Doc,
    command_args: Doc,
    input_docs: Sequence[Doc] = (),
    *,
    request_id: int | None = None,
) -> bytes:
    """A whole removed OP_COMMAND."""
    payload = (
        _cstring(database)
        + _cstring(command_name)
        + encode_doc(metadata)
        + encode_doc(command_args)
        + b"".join(encode_doc(d) for d in input_docs)
    )
    return encode_message(OP_COMMAND, payload, request_id)


def encode_op_commandreply(
    metadata: Doc,
    command_reply: Doc,
    output_docs: Sequence[Doc] = (),
    *,
    response_to: int,
    request_id: int | None = None,
) -> bytes:
    """A whole removed OP_COMMANDREPLY."""
    payload = encode_doc(metadata) + encode_doc(command_reply) + b"".join(encode_doc(d) for d in output_docs)
    return encode_message(OP_COMMANDREPLY, payload, request_id, response_to)


# ---------------------------------------------------------------- compression


def _zstd():
    """A module with compress/decompress for zstd: zstandard, stdlib compression.zstd or backports.zstd."""
    try:
        import zstandard

        return zstandard
    except ImportError:
        pass
    try:
        from compression import zstd  # Python 3.14+
    except ImportError:
        try:
            from backports import zstd  # what pymongo[zstd] installs before 3.14
        except ImportError:
            raise ImportError("no zstd codec: pip install zstandard (or pymongo[zstd])") from None
    return zstd


def _snappy():
    """(compress, uncompress) for raw snappy: python-snappy, else cramjam."""
    try:
        import snappy

        return snappy.compress, snappy.uncompress
    except ImportError:
        pass
    try:
        import cramjam
    except ImportError:
        raise ImportError("no snappy codec: pip install python-snappy (or pymongo[snappy])") from None
    return (lambda b: bytes(cramjam.snappy.compress_raw(b))), (lambda b: bytes(cramjam.snappy.decompress_raw(b)))


def compress_bytes(data: bytes, compressor: str, level: int | None = None) -> bytes:
    """Compress `data` the way drivers do for `compressor` (noop, snappy, zlib, zstd)."""
    if compressor == "noop":
        return bytes(data)
    if compressor == "zlib":
        return zlib.compress(data, -1 if level is None else level)
    if compressor == "zstd":
        z = _zstd()
        if z.__name__ == "zstandard":
            return z.ZstdCompressor(level=3 if level is None else level).compress(data)
        return z.compress(data) if level is None else z.compress(data, level)
    if compressor == "snappy":
        return _snappy()[0](data)
    raise ValueError(f"unknown compressor {compressor!r}")


def decompress_bytes(data: bytes, compressor: str) -> bytes:
    """Inverse of compress_bytes."""
    if compressor == "noop":
        return bytes(data)
    if compressor == "zlib":
        return zlib.decompress(data)
    if compressor == "zstd":
        z = _zstd()
        if z.__name__ == "zstandard":
            return z.ZstdDecompressor().decompress(data, max_output_size=DEFAULT_MAX_MESSAGE)
        return z.decompress(data)
    if compressor == "snappy":
        return _snappy()[1](data)
    raise ValueError(f"unknown compressor {compressor!r}")


def compress_message(raw: bytes, compressor: str = "zlib", level: int | None = None) -> bytes:
    """Wrap a whole message in OP_COMPRESSED, keeping its requestID and responseTo."""
    length, rid, rto, op = HEADER.unpack_from(raw)
    body = raw[HEADER_SIZE:length]
    payload = struct.pack("<iiB", op, len(body), COMPRESSOR_IDS[compressor]) + compress_bytes(body, compressor, level)
    return encode_message(OP_COMPRESSED, payload, rid, rto)


def decompress_message(raw: bytes) -> bytes:
    """The original message inside an OP_COMPRESSED (header rebuilt with the original opcode)."""
    length, rid, rto, op = HEADER.unpack_from(raw)
    if op != OP_COMPRESSED:
        raise WireFormatError(f"not OP_COMPRESSED: opcode {op}")
    r = _Reader(raw[HEADER_SIZE:length], "OP_COMPRESSED")
    original_op = r.int32()
    size = r.int32()
    cid = r.take(1)[0]
    if cid not in COMPRESSOR_NAMES:
        raise WireFormatError(f"OP_COMPRESSED: unknown compressorId {cid}")
    body = decompress_bytes(r.data[r.pos :], COMPRESSOR_NAMES[cid])
    if len(body) != size:
        raise WireFormatError(f"OP_COMPRESSED: uncompressedSize {size} but got {len(body)} bytes")
    return HEADER.pack(HEADER_SIZE + size, rid, rto, original_op) + body


# ---------------------------------------------------------------- decoders


def decode_op_msg(payload: bytes, header: bytes = b"", *, verify_checksum: bool = True) -> OpMsg:
    """Decode an OP_MSG payload; `header` is needed to verify a checksum."""
    r = _Reader(payload, "OP_MSG")
    flags = r.uint32()
    end = len(payload)
    checksum = None
    if flags & CHECKSUM_PRESENT:
        if len(payload) < 8:
            raise WireFormatError("OP_MSG: checksumPresent but no room for it")
        end -= 4
        checksum = struct.unpack_from("<I", payload, end)[0]
        if verify_checksum and header:
            want = crc32c(header + payload[:end])
            if want != checksum:
                raise WireFormatError(f"OP_MSG: checksum {checksum:#010x} != CRC-32C {want:#010x}")
    r = _Reader(payload[:end], "OP_MSG")
    r.pos = 4
    body = None
    sequences: list[tuple[str, list[dict]]] = []
    while r.remaining():
        kind = r.take(1)[0]
        if kind == 0:
            if body is not None:
                raise WireFormatError("OP_MSG: more than one kind-0 section")
            body = r.doc()
        elif kind == 1:
            size = r.int32()
            if size < 5:
                raise WireFormatError(f"OP_MSG: kind-1 size {size}")
            sr = _Reader(r.take(size - 4), "OP_MSG kind 1")
            ident = sr.cstring()
            sequences.append((ident, sr.docs_to_end()))
        else:
            raise WireFormatError(f"OP_MSG: unknown section kind {kind}")
    if body is None:
        raise WireFormatError("OP_MSG: no kind-0 section")
    return OpMsg(flags, body, sequences, checksum)


def decode_op_query(payload: bytes) -> OpQuery:
    """Decode a legacy OP_QUERY payload."""
    r = _Reader(payload, "OP_QUERY")
    flags = r.int32()
    fcn = r.cstring()
    skip, ret = r.int32(), r.int32()
    query = r.doc()
    fields = r.doc() if r.remaining() else None
    if r.remaining():
        raise WireFormatError(f"OP_QUERY: {r.remaining()} trailing bytes")
    return OpQuery(flags, fcn, skip, ret, query, fields)


def decode_op_reply(payload: bytes) -> OpReply:
    """Decode a legacy OP_REPLY payload."""
    r = _Reader(payload, "OP_REPLY")
    flags, cursor_id, starting_from, n = r.int32(), r.int64(), r.int32(), r.int32()
    docs = r.docs_to_end()
    if len(docs) != n:
        raise WireFormatError(f"OP_REPLY: numberReturned {n} but {len(docs)} documents")
    return OpReply(flags, cursor_id, starting_from, n, docs)


def decode_legacy(opcode: int, payload: bytes) -> LegacyOp:
    """Decode one of the removed opcodes into a field dict."""
    r = _Reader(payload, OP_NAMES.get(opcode, str(opcode)))
    f: dict[str, Any] = {}
    if opcode == OP_INSERT:
        f["flags"] = r.int32()
        f["full_collection_name"] = r.cstring()
        f["documents"] = r.docs_to_end()
    elif opcode == OP_UPDATE:
        r.int32()
        f["full_collection_name"] = r.cstring()
        f["flags"] = r.int32()
        f["selector"] = r.doc()
        f["update"] = r.doc()
    elif opcode == OP_DELETE:
        r.int32()
        f["full_collection_name"] = r.cstring()
        f["flags"] = r.int32()
        f["selector"] = r.doc()
    elif opcode == OP_GET_MORE:
        r.int32()
        f["full_collection_name"] = r.cstring()
        f["number_to_return"] = r.int32()
        f["cursor_id"] = r.int64()
    elif opcode == OP_KILL_CURSORS:
        r.int32()
        n = r.int32()
        f["cursor_ids"] = [r.int64() for _ in range(n)]
    elif opcode == OP_COMMAND:
        f["database"] = r.cstring()
        f["command_name"] = r.cstring()
        f["metadata"] = r.doc()
        f["command_args"] = r.doc()
        f["input_docs"] = r.docs_to_end()
    elif opcode == OP_COMMANDREPLY:
        f["metadata"] = r.doc()
        f["command_reply"] = r.doc()
        f["output_docs"] = r.docs_to_end()
    else:
        raise WireFormatError(f"unknown opcode {opcode}")
    if r.remaining():
        raise WireFormatError(f"{OP_NAMES[opcode]}: {r.remaining()} trailing bytes")
    return LegacyOp(opcode, f)


def message_length(buf: bytes, max_size: int = DEFAULT_MAX_MESSAGE) -> int | None:
    """messageLength of the message starting `buf`, or None if fewer than 4 bytes; WireFormatError if impossible."""
    if len(buf) < 4:
        return None
    n = struct.unpack_from("<i", buf)[0]
    if n < HEADER_SIZE or n > max_size:
        raise WireFormatError(f"impossible messageLength {n}")
    return n


def decode_message(raw: bytes, *, verify_checksum: bool = True) -> Message:
    """Decode one whole message (exactly messageLength bytes)."""
    raw = bytes(raw)
    if len(raw) < HEADER_SIZE:
        raise WireFormatError(f"message of {len(raw)} bytes is shorter than a header")
    length, rid, rto, op = HEADER.unpack_from(raw)
    if length != len(raw):
        raise WireFormatError(f"messageLength {length} but {len(raw)} bytes given")
    compressor = None
    inner = raw
    if op == OP_COMPRESSED:
        cid = raw[HEADER_SIZE + 8] if len(raw) > HEADER_SIZE + 8 else -1
        inner = decompress_message(raw)
        compressor = COMPRESSOR_NAMES[cid]
        length, _, _, op = HEADER.unpack_from(inner)
    payload = inner[HEADER_SIZE:]
    m = Message(rid, rto, op, payload, raw, compressor)
    if op == OP_MSG:
        m.msg = decode_op_msg(payload, inner[:HEADER_SIZE], verify_checksum=verify_checksum)
    elif op == OP_QUERY:
        m.query = decode_op_query(payload)
    elif op == OP_REPLY:
        m.reply = decode_op_reply(payload)
    elif op in OP_NAMES:
        m.legacy = decode_legacy(op, payload)
    else:
        raise WireFormatError(f"unknown opcode {op}")
    return m


def split_messages(data: bytes, max_size: int = DEFAULT_MAX_MESSAGE) -> tuple[list[bytes], bytes]:
    """Cut a byte stream into whole messages; returns (messages, leftover partial bytes)."""
    out = []
    pos = 0
    while True:
        n = message_length(data[pos : pos + 4], max_size)
        if n is None or pos + n > len(data):
            return out, bytes(data[pos:])
        out.append(bytes(data[pos : pos + n]))
        pos += n


# ---------------------------------------------------------------- reading from streams


async def read_message(reader: asyncio.StreamReader, max_size: int = DEFAULT_MAX_MESSAGE) -> bytes | None:
    """Next whole message from an asyncio stream; None on EOF at a message boundary.

    EOF inside a message raises asyncio.IncompleteReadError.
    """
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    n = message_length(head, max_size)
    return head + await reader.readexactly(n - 4)


def _recv_exactly(sock: socket.socket, n: int, allow_eof: bool) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            if allow_eof and not buf:
                return None
            raise EOFError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_message(sock: socket.socket, max_size: int = DEFAULT_MAX_MESSAGE) -> bytes | None:
    """Next whole message from a blocking socket; None on EOF at a message boundary, EOFError inside one."""
    head = _recv_exactly(sock, 4, allow_eof=True)
    if head is None:
        return None
    n = message_length(head, max_size)
    return head + _recv_exactly(sock, n - 4, allow_eof=False)


def roundtrip(sock: socket.socket, request: bytes) -> Message:
    """Send one request on a blocking socket and decode the one reply."""
    sock.sendall(request)
    raw = recv_message(sock)
    if raw is None:
        raise EOFError("connection closed before the reply")
    return decode_message(raw)
