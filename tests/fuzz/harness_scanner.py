"""Fuzz the tap: an arbitrary byte stream, split at arbitrary points, through the frame scanner with the body
scanner, and whole through the compiled Tap (its fast path for whole messages, the frame scanner for the rest).

Input layout: byte 0 = options (bit 0: reply direction, bits 1-2: query-shape rendering 0..2,
bit 3: verify checksums), byte 1 = chunk size (0: random chunk sizes), byte 2 = seed of the random
chunking, then the stream. Invariants checked on every input:
- feed() never raises and never reports `internal_error` (a scanner bug); every reason is documented.
- Fatal errors are framing errors, and nothing is reported after one.
- The outcome does not depend on how the stream was split nor on the path: the stream whole through the Tap
  and split through the FrameScanner alone give the same tracker outcome (every event with its request and
  reply scan results, every pending request, unmatched replies, every decode error). A reply stream is
  answered: a request is fed first for each responseTo an independent framing finds.
- Where a message is a well-formed OP_MSG that pymongo's bson.decode accepts, the scanner reports no
  error and agrees with bson on the command name, $db, ok, and the kind-1 document count.
"""

from __future__ import annotations

import math
import random
import struct

import bson

from tests.fuzz.targets import (
    DECODE_REASONS,
    HEADER_SIZE,
    CollectingSink,
    Connection,
    FrameScanner,
    SinkBus,
    Tap,
    Tracker,
)
from tests.support import wire as tw

FATAL_REASONS = frozenset(("bad_message_length", "message_too_large"))
MAX_MESSAGE = 1 << 20  # small, so that "message_too_large" is reachable
OP_MSG = 2013
_HEADER = struct.Struct("<iiii")
_I32 = struct.Struct("<i")


def _comparable(value: object) -> object:
    """NaN (a reply's `ok` may be one) as a token, since NaN != NaN would make equal outcomes differ."""
    return "NaN" if isinstance(value, float) and math.isnan(value) else value


def chunks(stream: bytes, size: int, seed: int) -> list[bytes]:
    """The stream cut into chunks: `size` bytes each, or random sizes (1..64, sometimes larger) from `seed`."""
    if size:
        return [stream[i : i + size] for i in range(0, len(stream), size)]
    rng = random.Random(seed)
    out, pos = [], 0
    while pos < len(stream):
        n = rng.randint(1, 64) if rng.random() < 0.9 else rng.randint(65, 4096)
        out.append(stream[pos : pos + n])
        pos += n
    return out


def _result(r: object) -> object:
    return None if r is None else tuple(sorted((k, _comparable(v)) for k, v in r.as_dict().items()))


# CommandEvent fields compared between the two paths (not the times: they follow the chunking).
EVENT_FIELDS = (
    "op database collection request_id request_opcode request_size reply_opcode reply_size reply_request_id ok "
    "code code_name errmsg documents_returned documents_changed cursor_id more_to_come_request exhaust "
    "exhaust_index awaitable decode_error hello"
).split()


def primers(stream: bytes) -> list[bytes]:
    """A request for each responseTo of the messages an independent framing finds (a reply stream is answered)."""
    out, pos = [], 0
    while len(stream) - pos >= HEADER_SIZE and len(out) < 256:
        length, _, response_to, _ = _HEADER.unpack_from(stream, pos)
        if length < HEADER_SIZE or length > MAX_MESSAGE:
            break
        out.append(tw.encode_op_msg({"find": "c", "$db": "d"}, request_id=response_to))
        pos += length
    return out


def observe(
    stream_chunks: list[bytes], is_reply: bool, render: int, verify: bool, answers: list[bytes], via_tap: bool
) -> tuple[list, tuple, bool, bool]:
    """(messages and errors in order, the tracker's outcome, mid_message, stopped) for one way of feeding.

    Messages are seen only on the FrameScanner path (the Tap hands whole ones to the tracker in C).
    """
    events: list = []
    sink = CollectingSink()
    conn = Connection(id=1, client_host="127.0.0.1", client_port=1)
    tracker = Tracker(conn, SinkBus([sink]), 1 << 20)

    def on_message(m) -> None:
        events.append(
            (
                "msg",
                m.length,
                m.request_id,
                m.response_to,
                m.opcode,
                m.wire_opcode,
                m.compressor,
                m.error,
                _result(m.result),
            )
        )
        (tracker.on_reply if is_reply else tracker.on_request)(m)

    def on_error(reason: str, detail: str, fatal: bool) -> None:
        if reason == "internal_error":
            raise AssertionError(f"internal_error from the scanner: {detail}")
        events.append(("err", reason, fatal))

    asked = FrameScanner(False, tracker.on_request, on_error)
    for a in answers:
        asked.feed(a, 0)
    fs = FrameScanner(is_reply, on_message, on_error, MAX_MESSAGE, render, verify_checksums=verify)
    feed = Tap(fs, tracker, conn, is_reply).feed_at if via_tap else fs.feed
    for i, c in enumerate(stream_chunks):
        feed(c, i)
    outcome = (
        [
            tuple(_comparable(getattr(e, f)) for f in EVENT_FIELDS) + (_result(e.request), _result(e.reply))
            for e in sink.commands
        ],
        sorted(
            (k, p.op, p.database, p.collection, p.error, p.opcode, p.wire_opcode, p.length, _result(p.request))
            for k, p in tracker.pending.items()
        ),
        [rt for _, rt in sink.unmatched],
        sink.dropped,
        [e for e in events if e[0] == "err"],
    )
    return events, outcome, fs.mid_message, fs.stopped


def reference_op_msg(body: bytes) -> dict | None:
    """What bson says about a well-formed OP_MSG body (after the header), or None when it is not one."""
    if len(body) < 5:
        return None
    flags = struct.unpack_from("<I", body)[0]
    if flags & ~0x10003:
        return None
    end = len(body) - 4 if flags & 1 else len(body)
    pos, doc, kind1 = 4, None, 0
    try:
        while pos < end:
            kind = body[pos]
            pos += 1
            if kind == 0:
                if doc is not None or end - pos < 5:
                    return None
                n = _I32.unpack_from(body, pos)[0]
                if n < 5 or pos + n > end:
                    return None
                doc = bson.decode(body[pos : pos + n])
                pos += n
            elif kind == 1:
                if end - pos < 4:
                    return None
                size = _I32.unpack_from(body, pos)[0]
                if size < 5 or pos + size > end:
                    return None
                seq_end = pos + size
                nul = body.find(b"\0", pos + 4, seq_end)
                if nul < 0:
                    return None
                body[pos + 4 : nul].decode("utf-8")
                q = nul + 1
                while q < seq_end:
                    if seq_end - q < 5:
                        return None
                    n = _I32.unpack_from(body, q)[0]
                    if n < 5 or q + n > seq_end:
                        return None
                    bson.decode(body[q : q + n])
                    q += n
                    kind1 += 1
                pos = seq_end
            else:
                return None
    except Exception:  # noqa: BLE001 - whatever bson rejects is simply not a reference case
        return None
    if doc is None:
        return None
    return {"doc": doc, "kind1": kind1, "flags": flags}


def check_reference(stream: bytes, events: list, is_reply: bool) -> None:
    """Frame the stream independently; compare each well-formed OP_MSG with what the scanner reported."""
    messages = [e for e in events if e[0] == "msg"]
    pos, i = 0, 0
    while len(stream) - pos >= HEADER_SIZE and i < len(messages):
        length, _, _, opcode = _HEADER.unpack_from(stream, pos)
        if length < HEADER_SIZE or length > MAX_MESSAGE or pos + length > len(stream):
            return
        msg = messages[i]
        assert msg[1] == length, f"message {i}: scanner framed {msg[1]} bytes, the header says {length}"
        if opcode == OP_MSG:
            ref = reference_op_msg(stream[pos + HEADER_SIZE : pos + length])
            if ref is not None and not ref["flags"] & 1:  # checksums: another test's business (verify on/off)
                _agree(i, ref, msg, is_reply)
        pos += length
        i += 1


def _agree(i: int, ref: dict, msg: tuple, is_reply: bool) -> None:
    assert msg[7] == "", f"message {i}: valid OP_MSG (bson.decode accepts it) but the scanner says {msg[7]!r}"
    r = dict(msg[8])
    doc = ref["doc"]
    assert r["flags"] == ref["flags"], (r["flags"], ref["flags"])
    if not is_reply:
        first = next(iter(doc), None)
        if first is not None and len(first.encode()) < 256:
            assert r["command"] == first, f"message {i}: command {r['command']!r}, bson says {first!r}"
        db = doc.get("$db")
        if isinstance(db, str) and len(db.encode()) < 256:
            assert r["database"] == db, f"message {i}: $db {r['database']!r}, bson says {db!r}"
        assert r["documents"] >= ref["kind1"], f"message {i}: {r['documents']} documents < {ref['kind1']} in kind 1"
    else:
        ok = doc.get("ok")
        if isinstance(ok, (int, float)) and not isinstance(ok, bool) and not (isinstance(ok, float) and math.isnan(ok)):
            assert r["ok"] == float(ok), f"message {i}: ok {r['ok']!r}, bson says {ok!r}"


def test_one_input(data: bytes) -> None:
    """One fuzz input: see the module docstring."""
    if len(data) < 3:
        return
    opts, size, seed = data[0], data[1], data[2]
    is_reply, render, verify = bool(opts & 1), min((opts >> 1) & 3, 2), bool(opts & 8)
    stream = data[3:]
    answers = primers(stream) if is_reply else []
    _, whole, mid_a, stop_a = observe([stream], is_reply, render, verify, answers, via_tap=True)
    events, split, mid_b, stop_b = observe(chunks(stream, size, seed), is_reply, render, verify, answers, False)
    assert whole == split, "the outcome depends on the chunking or the path:\n" + _diff(whole, split)
    assert (mid_a, stop_a) == (mid_b, stop_b)
    fatal_seen = False
    for e in events:
        if e[0] == "msg":
            continue
        assert not fatal_seen, f"{e} reported after a fatal error"
        if e[0] == "err":
            assert e[1] in DECODE_REASONS, f"undocumented reason {e[1]!r}"
            assert e[2] == (e[1] in FATAL_REASONS), f"{e[1]} reported with fatal={e[2]}"
            fatal_seen = e[2]
    assert stop_a == fatal_seen
    if not verify:
        check_reference(stream, events, is_reply)


def _diff(a: tuple, b: tuple) -> str:
    for part, (xs, ys) in zip(("events", "pending", "unmatched", "dropped", "errors"), zip(a, b)):
        if xs == ys:
            continue
        if isinstance(xs, list):
            for i, (x, y) in enumerate(zip(xs, ys)):
                if x != y:
                    return f"{part} {i}: whole via the Tap {x}\n          split {y}"
            return f"{part}: {len(xs)} whole via the Tap, {len(ys)} split"
        return f"{part}: whole via the Tap {xs}, split {ys}"
    return "equal"
