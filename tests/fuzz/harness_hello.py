"""Fuzz the hello rewriter (`mongoproxy.protocol.hello.rewrite_reply`): arbitrary bytes, and valid hello replies.

Input layout: byte 0 even = the rest is one message, as is; byte 0 odd = the rest drives a builder (`Draw`) that
makes a valid hello reply, OP_MSG (flags, checksum, kind-1 sequences) or OP_REPLY (several documents), from
fuzzer-chosen members, address fields (of the right type or not), nested look-alikes and other fields.
Invariants for arbitrary bytes, with a swap that, like the topology, gives a listener to every unknown member:
- rewrite_reply returns or raises HelloRewriteError; nothing else escapes.
- A result has a messageLength equal to its size and the request's requestID, responseTo and opCode.
- With no field changed, the result is the message itself (an OP_MSG checksum only dropped, with its flag).
- Rewriting is idempotent: the result, rewritten again by a swap that fixes listener addresses, comes back
  unchanged with no change counted.
For a valid hello reply the rewritten message is exactly the one built from the expected document (the
address fields swapped, every other byte the same), its document decodes with bson.decode, and the changes
counted are the address fields that changed.
"""

from __future__ import annotations

import struct

import bson

from tests.fuzz.targets import HelloRewriteError, make_hello_swap, rewrite_hello

OP_MSG, OP_REPLY = 2013, 1
CHECKSUM_PRESENT, MORE_TO_COME, EXHAUST_ALLOWED = 1, 2, 1 << 16
LISTENER = "127.0.0.1:"  # listener addresses the swaps hand out; the swaps leave them as they are
ADDRESS_STRINGS = ("primary", "me")
ADDRESS_LISTS = ("hosts", "passives", "arbiters")
HEADER = struct.Struct("<iiii")
# Host names from a small alphabet, so that members repeat and differ only by case (the map is case-blind).
HOSTS = ("db0.example.net", "DB0.example.net", "10.0.0.5", "[::1]", "host-a", "Host-A", "é.example", "")


class Draw:
    """Values read from fuzzer bytes; zeros once they run out, so every input builds a message."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        """The next byte (0 past the end)."""
        b = self.data[self.pos] if self.pos < len(self.data) else 0
        self.pos += 1
        return b

    def below(self, n: int) -> int:
        """An integer in [0, n)."""
        return self.byte() % n

    def int32(self) -> int:
        """A signed 32-bit integer."""
        return struct.unpack("<i", bytes(self.byte() for _ in range(4)))[0]

    def text(self, limit: int = 12) -> str:
        """A short string (any code point but NUL, which a key cannot hold)."""
        return "".join(
            chr(self.byte() % 0x7F + 1) if self.below(4) else chr(0xE9 + self.byte()) for _ in range(self.below(limit))
        )

    def address(self) -> str:
        """host:port."""
        return f"{HOSTS[self.below(len(HOSTS))]}:{self.byte() * 256 + self.byte()}"

    def scalar(self) -> object:
        """A value of one of the BSON types a hello reply carries, and some it does not."""
        k = self.below(10)
        if k == 0:
            return self.int32()
        if k == 1:
            return bson.Int64(self.int32() * 65537)
        if k == 2:
            return struct.unpack("<d", bytes(self.byte() for _ in range(8)))[0]
        if k == 3:
            return self.text()
        if k == 4:
            return bool(self.byte() & 1)
        if k == 5:
            return None
        if k == 6:
            return bytes(self.byte() for _ in range(self.below(20)))
        if k == 7:
            return bson.Timestamp(self.byte(), self.int32() & 0x7FFFFFFF)
        if k == 8:
            return bson.ObjectId(bytes(self.byte() for _ in range(12)))
        return self.address()


def listener_swap(address_map: dict) -> object:
    """make_swap over `address_map`, giving each unknown member a new listener address (as the topology does)."""

    def unknown(address: str) -> str | None:
        if address.startswith(LISTENER) or len(address_map) >= 64:
            return None
        address_map[address] = f"{LISTENER}{27100 + len(address_map)}"
        return address_map[address]

    return make_hello_swap(address_map, unknown)


def check_arbitrary(message: bytes) -> None:
    """The invariants for any bytes (module docstring)."""
    swap = listener_swap({"db0.example.net:27017": LISTENER + "27017"})
    try:
        out, changes = rewrite_hello(message, swap)
    except HelloRewriteError:
        return
    assert HEADER.unpack_from(out)[0] == len(out), "messageLength differs from the size"
    assert out[4:16] == message[4:16], "requestID, responseTo or opCode changed"
    op_code = HEADER.unpack_from(message)[3]
    checksum = op_code == OP_MSG and struct.unpack_from("<I", message, 16)[0] & CHECKSUM_PRESENT
    if not changes:
        if checksum:
            flags = struct.pack("<I", struct.unpack_from("<I", message, 16)[0] & ~CHECKSUM_PRESENT)
            assert out == HEADER.pack(len(message) - 4, *HEADER.unpack_from(message)[1:]) + flags + message[20:-4]
        else:
            assert out == message, "nothing changed, yet the message was re-encoded differently"
    again, changes_again = rewrite_hello(out, swap)
    assert (again, changes_again) == (out, 0), "rewriting is not idempotent"


def hello_document(d: Draw, members: list) -> dict:
    """A hello reply document: address fields (mostly of their type), other fields, nested look-alikes."""
    doc: dict = {}
    for _ in range(d.below(8)):
        k = d.below(6)
        if k == 0:
            key, value = d.text(), d.scalar()
        elif k == 1:
            key = ADDRESS_STRINGS[d.below(2)]
            value = members[d.below(len(members))] if d.below(4) else d.scalar()  # sometimes the wrong type
        elif k in (2, 3):
            key = ADDRESS_LISTS[d.below(3)]
            value = [members[d.below(len(members))] if d.below(5) else d.scalar() for _ in range(d.below(6))]
            if not d.below(8):
                value = members[0]  # a string where a list belongs: not an address list, left alone
        elif k == 4:  # only top-level fields are addresses: a nested one is copied
            key, value = "topologyVersion", {"hosts": [members[0]], "me": members[-1], "counter": bson.Int64(1)}
        else:
            key, value = ("isWritablePrimary", "setName", "maxWireVersion")[d.below(3)], d.scalar()
        doc[key] = value
    doc["ok"] = 1.0
    return doc


def expected_document(doc: dict, mapping: dict) -> tuple[dict, int]:
    """The document with its top-level address fields swapped, and how many fields changed."""
    out, changes = dict(doc), 0
    for key, value in doc.items():
        if key in ADDRESS_STRINGS and isinstance(value, str):
            out[key] = mapping.get(value.lower(), value)
            changes += out[key] != value
        elif key in ADDRESS_LISTS and isinstance(value, list):
            out[key] = [mapping.get(v.lower(), v) if isinstance(v, str) else v for v in value]
            changes += out[key] != value
    return out, changes


def op_msg(d: Draw, body: bytes, new_body: bytes, rid: int, rto: int) -> tuple[bytes, bytes, int]:
    """(an OP_MSG whose body is `body`, the one expected after rewriting, the offset of its body document)."""
    flags = (d.byte() & (CHECKSUM_PRESENT | MORE_TO_COME)) | (EXHAUST_ALLOWED if d.below(2) else 0)
    before = b"".join(sequence(d) for _ in range(d.below(2)))
    after = b"".join(sequence(d) for _ in range(d.below(2)))
    tail = bytes(d.byte() for _ in range(4)) if flags & CHECKSUM_PRESENT else b""
    payload = struct.pack("<I", flags) + before + b"\x00" + body + after + tail
    # The checksum would no longer match: it is dropped with its flag.
    want = struct.pack("<I", flags & ~CHECKSUM_PRESENT) + before + b"\x00" + new_body + after
    return (
        HEADER.pack(16 + len(payload), rid, rto, OP_MSG) + payload,
        HEADER.pack(16 + len(want), rid, rto, OP_MSG) + want,
        21 + len(before),
    )


def sequence(d: Draw) -> bytes:
    """A kind-1 section: an identifier and documents (which may hold address fields: never rewritten)."""
    docs = b"".join(bson.encode({"hosts": [d.address()], "n": d.int32()}) for _ in range(d.below(3)))
    ident = (d.text(6) or "documents").encode()
    return b"\x01" + struct.pack("<i", 4 + len(ident) + 1 + len(docs)) + ident + b"\x00" + docs


def check_valid(d: Draw) -> None:
    """Build a valid hello reply from the input; the rewrite is exactly the expected message."""
    members = [d.address() for _ in range(1 + d.below(5))]
    mapping = {m.lower(): f"{LISTENER}{27100 + i}" for i, m in enumerate(members) if d.below(4)}
    doc = hello_document(d, members)
    want, want_changes = expected_document(doc, mapping)
    body, new_body = bson.encode(doc), bson.encode(want)
    rid, rto = d.int32(), d.int32()
    if d.below(2):
        message, expected, doc_at = op_msg(d, body, new_body, rid, rto)
    else:
        others = [bson.encode({"me": members[0], "n": i}) for i in range(d.below(3))]  # only the first is the reply
        head = struct.pack("<iqii", d.int32(), d.int32(), d.int32(), 1 + len(others))
        message = HEADER.pack(16 + len(head) + len(body) + sum(map(len, others)), rid, rto, OP_REPLY) + head
        message += body + b"".join(others)
        tail = head + new_body + b"".join(others)
        expected = HEADER.pack(16 + len(tail), rid, rto, OP_REPLY) + tail
        doc_at = 36
    out, changes = rewrite_hello(message, make_hello_swap(mapping))
    assert HEADER.unpack_from(out)[0] == len(out), "messageLength differs from the size"
    size = struct.unpack_from("<i", out, doc_at)[0]
    decoded = bson.decode(out[doc_at : doc_at + size])
    assert list(decoded) == list(doc), "fields added, lost or reordered"
    assert out == expected, "a byte other than the address fields changed, or an address was not swapped"
    assert changes == want_changes, (changes, want_changes)


def test_one_input(data: bytes) -> None:
    """One fuzz input: see the module docstring."""
    if not data or not data[0] & 1:
        check_arbitrary(data[1:])
    else:
        check_valid(Draw(data[1:]))
