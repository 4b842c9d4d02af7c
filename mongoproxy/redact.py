"""Rewriting recorded messages: blanking secrets and pseudonymising literal values.

Used by the capture writer thread (never on the data path) and by replay.
Invariants:
- Rewrites are in place and keep every length: a document stays a valid BSON
  document of the same size, so message and section lengths stay right.
- Secrets (protocol.commands.CREDENTIAL_KEYS: SASL/SCRAM `payload`s, `pwd`, legacy
  `key`/`nonce`, the whole `speculativeAuthenticate` subtree) are blanked: strings become '*', binary
  and other values zero bytes. This is always done for recordings.
- Pseudonymising (--record-redact) replaces a literal by a keyed hash of it of
  the same type and size, so equal values stay equal within one recording
  (an `_id` inserted and later queried still matches) while the values
  themselves are gone; the key lives in memory only. Structure stays: keys,
  types, nesting, array lengths, booleans, nulls, field paths ("$a"), and the
  command options replay and tools need (collection names, cursor ids,
  sessions, limits, sort/projection/index specs, write concerns).
- A document that does not parse is blanked whole (zero bytes inside its
  length prefix) rather than passed through.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import cast

from mongoproxy.errors import DecodeError
from mongoproxy.protocol import opcodes
from mongoproxy.protocol.commands import (  # noqa: F401 - AUTH_COMMANDS is read by replay
    AUTH_COMMANDS,
    CREDENTIAL_KEYS_BYTES,
    HELLO_COMMANDS,
    SENSITIVE_COMMANDS,
    USER_MANAGEMENT_COMMANDS,
)
from mongoproxy.protocol.compression import uncompressed  # noqa: F401 - read by replay

_I32 = struct.Struct("<i")
_HEADER = opcodes.HEADER
# Names replay reads from here (mongoproxy.replay is being split into a package; it moves to protocol then).
USER_COMMANDS = USER_MANAGEMENT_COMMANDS
# Keys whose value is a secret wherever it appears in a sensitive message; the subtree is blanked.
SECRET_KEYS = CREDENTIAL_KEYS_BYTES

# Request top-level fields kept verbatim when pseudonymising: what routing, sessions and replay depend on.
REQUEST_KEEP = frozenset(
    k.encode()
    for k in """
    $db lsid txnNumber autocommit startTransaction $clusterTime $readPreference readConcern writeConcern
    batchSize limit skip singleBatch ordered maxTimeMS maxAwaitTimeMS collection cursors cursor
    bypassDocumentValidation apiVersion apiStrict apiDeprecationErrors allowDiskUse new upsert remove
    sort projection fields hint key indexes tailable awaitData noCursorTimeout allowPartialResults
    returnKey showRecordId nameOnly authorizedCollections verbosity index dropTarget
    """.split()
)
# Kept verbatim at any depth (their values steer the server, not the data).
KEEP_ANYWHERE = frozenset(
    k.encode()
    for k in """
    limit skip batchSize multi upsert ordered $limit $skip $sample $sort $project sort projection hint w j
    wtimeout level
    """.split()
)
# Reply top-level fields kept verbatim; `cursor` keeps id and ns and pseudonymises its batches.
REPLY_KEEP = frozenset(
    k.encode()
    for k in """
    ok code codeName n nModified $clusterTime operationTime electionId opTime topologyVersion
    writeConcernError errorLabels cursorsKilled cursorsNotFound cursorsAlive cursorsUnknown
    """.split()
)

KEEP, PSEUDO, BLANK = 0, 1, 2


def _cstring_end(buf: bytearray, pos: int, end: int) -> int:
    i = buf.find(b"\0", pos, end)
    if i < 0:
        raise DecodeError("string_not_terminated", f"at {pos}")
    return i


class Rewriter:
    """In-place rewriting of BSON documents inside a message; one per recording (it holds the hash key)."""

    def __init__(self, pseudonymise: bool = False, key: bytes | None = None) -> None:
        self.pseudonymise = pseudonymise
        self._key = key if key is not None else os.urandom(32)
        self._secrets = False  # blank SECRET_KEYS in the message being rewritten

    # ---- values ----

    def _stream(self, tag: bytes, value: bytes, n: int) -> bytes:
        """n pseudo-random bytes determined by (tag, value) under the key."""
        out = b""
        counter = 0
        while len(out) < n:
            h = hashlib.blake2b(tag + value, key=self._key, digest_size=64, salt=counter.to_bytes(16, "little"))
            out += h.digest()
            counter += 1
        return out[:n]

    def _pseudo_text(self, tag: bytes, value: bytes) -> bytes:
        hexchars = self._stream(tag, value, (len(value) + 1) // 2).hex()
        return hexchars[: len(value)].encode()

    def _value(self, buf: bytearray, t: int, pos: int, end: int, mode: int) -> int:
        """Rewrite one value of type t at pos per mode; return the position after it."""
        if t in (0x01, 0x09, 0x11, 0x12):  # double, date, timestamp, int64
            stop = pos + 8
            if stop > end:
                raise DecodeError("bad_length", "value past the document end")
            if mode == BLANK:
                buf[pos:stop] = bytes(8)
            elif mode == PSEUDO and t != 0x11:  # timestamps are server clock values, not data
                h = self._stream(bytes((t,)), bytes(buf[pos:stop]), 8)
                if t == 0x01:  # a finite double: exponent 0x3FF..0x43F (1.0 to 2**64)
                    v = int.from_bytes(h, "little")
                    v = (v & 0x000FFFFFFFFFFFFF) | ((0x3FF + (v >> 58) % 64) << 52)
                    buf[pos:stop] = v.to_bytes(8, "little")
                elif t == 0x09:  # a date between 1970 and about 2039
                    v = int.from_bytes(h, "little") & ((1 << 41) - 1)
                    buf[pos:stop] = v.to_bytes(8, "little")
                else:
                    buf[pos:stop] = (int.from_bytes(h, "little") & ((1 << 62) - 1)).to_bytes(8, "little")
            return stop
        if t == 0x10:  # int32
            stop = pos + 4
            if stop > end:
                raise DecodeError("bad_length", "value past the document end")
            if mode == BLANK:
                buf[pos:stop] = bytes(4)
            elif mode == PSEUDO:
                h = self._stream(b"\x10", bytes(buf[pos:stop]), 4)
                buf[pos:stop] = (int.from_bytes(h, "little") & 0x3FFFFFFF).to_bytes(4, "little")
            return stop
        if t in (0x02, 0x0D, 0x0E):  # string, code, symbol
            n = _I32.unpack_from(buf, pos)[0]
            stop = pos + 4 + n
            if n < 1 or stop > end or buf[stop - 1] != 0:
                raise DecodeError("bad_length", "bad string length")
            s, e = pos + 4, stop - 1
            if mode == BLANK:
                buf[s:e] = b"*" * (e - s)
            elif mode == PSEUDO and not (t == 0x02 and buf[s : s + 1] == b"$"):  # "$path" names a field
                buf[s:e] = self._pseudo_text(bytes((t,)), bytes(buf[s:e]))
            return stop
        if t in (0x03, 0x04):
            n = _I32.unpack_from(buf, pos)[0]
            if n < 5 or pos + n > end:
                raise DecodeError("bad_length", "bad document length")
            self.document(buf, pos, mode, t == 0x04)
            return pos + n
        if t == 0x05:  # binary
            n = _I32.unpack_from(buf, pos)[0]
            s = pos + 5
            stop = s + n
            if n < 0 or stop > end:
                raise DecodeError("bad_length", "bad binary length")
            if mode == BLANK:
                buf[s:stop] = bytes(n)
            elif mode == PSEUDO:
                buf[s:stop] = self._stream(b"\x05" + bytes(buf[pos + 4 : s]), bytes(buf[s:stop]), n)
            return stop
        if t == 0x07:  # ObjectId
            stop = pos + 12
            if stop > end:
                raise DecodeError("bad_length", "value past the document end")
            if mode == BLANK:
                buf[pos:stop] = bytes(12)
            elif mode == PSEUDO:
                buf[pos:stop] = self._stream(b"\x07", bytes(buf[pos:stop]), 12)
            return stop
        if t == 0x08:  # bool: one bit of structure, kept
            if pos + 1 > end:
                raise DecodeError("bad_length", "value past the document end")
            return pos + 1
        if t in (0x06, 0x0A, 0xFF, 0x7F):  # undefined, null, minKey, maxKey
            return pos
        if t == 0x0B:  # regex: pattern and options cstrings
            p_end = _cstring_end(buf, pos, end)
            o_end = _cstring_end(buf, p_end + 1, end)
            if mode != KEEP:
                buf[pos:p_end] = b"x" * (p_end - pos)
            return o_end + 1
        if t == 0x0C:  # DBPointer: string then ObjectId
            stop = self._value(buf, 0x02, pos, end, mode)
            return self._value(buf, 0x07, stop, end, mode)
        if t == 0x0F:  # code with scope: int32 total, string, document
            n = _I32.unpack_from(buf, pos)[0]
            if n < 14 or pos + n > end:
                raise DecodeError("bad_length", "bad code-with-scope length")
            stop = self._value(buf, 0x02, pos + 4, pos + n, mode)
            self._value(buf, 0x03, stop, pos + n, mode)
            return pos + n
        if t == 0x13:  # decimal128: a pseudonymised one is a positive integer coefficient, exponent 0
            stop = pos + 16
            if stop > end:
                raise DecodeError("bad_length", "value past the document end")
            if mode == BLANK:
                buf[pos:stop] = bytes(8) + (0x3040 << 48).to_bytes(8, "little")
            elif mode == PSEUDO:
                coeff = int.from_bytes(self._stream(b"\x13", bytes(buf[pos:stop]), 8), "little") & ((1 << 53) - 1)
                buf[pos:stop] = coeff.to_bytes(8, "little") + (0x3040 << 48).to_bytes(8, "little")
            return stop
        raise DecodeError("unknown_type", f"type 0x{t:02x}")

    def document(self, buf: bytearray, pos: int, mode: int, is_array: bool = False, top: str = "") -> int:
        """Rewrite the document at pos; `top` is "request" or "reply" for a command body's own rules."""
        n = _I32.unpack_from(buf, pos)[0]
        end = pos + n
        if n < 5 or end > len(buf) or buf[end - 1] != 0:
            raise DecodeError("bad_length", "bad document length")
        i = pos + 4
        first = True
        while i < end - 1:
            t = buf[i]
            k_end = _cstring_end(buf, i + 1, end)
            key = bytes(buf[i + 1 : k_end])
            child = mode
            if self._secrets and key in SECRET_KEYS and not is_array:
                child = BLANK
            elif mode == PSEUDO:
                if top == "request" and (first or key in REQUEST_KEEP):
                    child = KEEP
                elif top == "reply" and key in REPLY_KEEP:
                    child = KEEP
                elif top == "reply" and key == b"cursor" and t == 0x03:
                    child = -1  # id and ns kept, batches pseudonymised
                elif key in KEEP_ANYWHERE and not is_array:
                    child = KEEP
            if child == -1:
                self._cursor(buf, k_end + 1, end)
                i = k_end + 1 + _I32.unpack_from(buf, k_end + 1)[0]
            else:
                i = self._value(buf, t, k_end + 1, end - 1, child)
            first = False
        if i != end - 1:
            raise DecodeError("bad_length", "document elements overrun its length")
        return end

    def _cursor(self, buf: bytearray, pos: int, end: int) -> None:
        n = _I32.unpack_from(buf, pos)[0]
        stop = pos + n
        if n < 5 or stop > end:
            raise DecodeError("bad_length", "bad cursor document")
        i = pos + 4
        while i < stop - 1:
            t = buf[i]
            k_end = _cstring_end(buf, i + 1, stop)
            key = bytes(buf[i + 1 : k_end])
            mode = KEEP if key in (b"id", b"ns", b"postBatchResumeToken") else PSEUDO
            i = self._value(buf, t, k_end + 1, stop - 1, mode)

    def _doc_safely(self, buf: bytearray, pos: int, limit: int, mode: int, top: str = "") -> int:
        """Rewrite one document; on malformed BSON blank it whole (or the rest of the message)."""
        try:
            n = _I32.unpack_from(buf, pos)[0]
        except struct.error:
            buf[pos:limit] = bytes(limit - pos)
            return limit
        if n < 5 or pos + n > limit:
            buf[pos:limit] = bytes(limit - pos)
            return limit
        try:
            self.document(buf, pos, mode, top=top)
        except (DecodeError, struct.error, IndexError):
            buf[pos + 4 : pos + n - 1] = bytes(n - 5)
        return pos + n

    # ---- messages ----

    def message(self, msg: bytearray, is_reply: bool, command: str = "") -> bytearray:
        """Rewrite one whole uncompressed message in place and return it.

        `command` is the lower-cased command name of the request (for a reply: of its request). The
        secrets of hello/auth/user commands are blanked; with pseudonymising, every document of other
        commands is rewritten as well (hello and its reply carry no data and are kept).
        """
        sensitive = command in SENSITIVE_COMMANDS
        if command in HELLO_COMMANDS or not self.pseudonymise:
            if not sensitive:
                return msg
            mode, top = KEEP, ""
        else:
            mode, top = PSEUDO, ("reply" if is_reply else "request")
        self._secrets = sensitive
        length, _, _, opcode = _HEADER.unpack_from(msg)
        end = min(length, len(msg))
        if opcode == opcodes.OP_MSG:
            pos = 20
            flags = _I32.unpack_from(msg, 16)[0] & 0xFFFFFFFF
            if flags & 1:
                end -= 4
            while pos < end:
                kind = msg[pos]
                pos += 1
                if kind == 0:
                    pos = self._doc_safely(msg, pos, end, mode, top)
                elif kind == 1:
                    size = _I32.unpack_from(msg, pos)[0]
                    stop = min(pos + size, end)
                    d = _cstring_end(msg, pos + 4, stop) + 1
                    while d < stop:
                        d = self._doc_safely(msg, d, stop, mode)
                    pos = stop
                else:
                    msg[pos:end] = bytes(end - pos)
                    break
        elif opcode == opcodes.OP_QUERY:
            pos = _cstring_end(msg, 20, end) + 9
            top_q = top
            while pos < end:
                pos = self._doc_safely(msg, pos, end, mode, top_q)
                top_q = ""
        elif opcode == opcodes.OP_REPLY:
            pos = 36
            while pos < end:
                pos = self._doc_safely(msg, pos, end, mode, top)
        elif opcode in (opcodes.OP_INSERT, opcodes.OP_UPDATE, opcodes.OP_DELETE):
            pos = _cstring_end(msg, 20, end) + 1
            if opcode != opcodes.OP_INSERT:
                pos += 4
            while pos < end:
                pos = self._doc_safely(msg, pos, end, mode)
        elif opcode in (opcodes.OP_GET_MORE, opcodes.OP_KILL_CURSORS):
            pass  # namespaces and cursor ids only
        elif self.pseudonymise or sensitive:
            msg[16:end] = bytes(end - 16)  # an opcode we cannot walk: its body is not recorded
        return msg


_MEASURE = Rewriter()


def value_end(doc: bytes, t: int, pos: int, end: int) -> int:
    """Where the BSON value of type t at pos ends (DecodeError when it runs past `end`); nothing is changed."""
    return _MEASURE._value(cast(bytearray, doc), t, pos, end, KEEP)  # KEEP only reads


def first_key(msg: bytes) -> tuple[str, bool] | None:
    """(first key of the command body, complete) of a request prefix; None when the prefix is too short.

    complete is False when the body is wrapped (OP_QUERY $query) or the first section is not kind 0,
    in which case the caller should treat the message as sensitive.
    """
    if len(msg) < 16:
        return None
    opcode = _HEADER.unpack_from(msg)[3]
    if opcode == opcodes.OP_MSG:
        if len(msg) < 26:
            return None
        if msg[20] != 0:
            return "", False
        pos = 26
    elif opcode == opcodes.OP_QUERY:
        ns_end = msg.find(b"\0", 20)
        if ns_end < 0:
            return None
        if not msg[20:ns_end].endswith(b".$cmd"):
            return "", True  # a legacy query, not a command
        pos = ns_end + 1 + 8 + 4 + 1
        if len(msg) < pos:
            return None
    else:
        return "", True
    k_end = msg.find(b"\0", pos)
    if k_end < 0:
        return None
    key = msg[pos:k_end].decode("utf-8", "replace")
    if opcode == opcodes.OP_QUERY and key in ("$query", "query"):
        return key, False
    return key, True
