"""mongoproxy.protocol: one table, one bounded decompressor, one framer; the defects they fix (issue 16 items 1, 2, 6)."""

from __future__ import annotations

import logging
import os
import random
import struct
import time
import tracemalloc
import zlib

import bson
import pytest

from mongoproxy import _bson_parser, querylog, redact
from mongoproxy.errors import DecodeError
from mongoproxy.protocol import commands, compression, framing, opcodes
from mongoproxy.sinks.capture import CaptureSink
from tests.support import wire as oracle
from tests.unit.test_capture_sink import SECRET, chunks, conn, finished_files, flows, op_msg

# ---- the one table ----


def test_scanner_opcodes_are_the_protocol_opcodes():
    for name in ("OP_REPLY", "OP_UPDATE", "OP_INSERT", "OP_QUERY", "OP_GET_MORE", "OP_DELETE", "OP_KILL_CURSORS"):
        assert getattr(_bson_parser, name) == getattr(opcodes, name), name
    for name in ("OP_COMMAND", "OP_COMMANDREPLY", "OP_MSG"):
        assert getattr(_bson_parser, name) == getattr(opcodes, name), name


@pytest.mark.parametrize("key", sorted(commands.SECRET_KEYS))
def test_scanner_rendering_blanks_exactly_the_secret_keys(key):
    body = b"\0\0\0\0\0" + bson.encode({"find": "c", "filter": {key: "hunter2", "other": "visible"}, "$db": "d"})
    scanner = _bson_parser.BodyScanner()
    scanner.reset(opcodes.OP_MSG, False, len(body), _bson_parser.RENDER_VALUES, 4096)
    scanner.feed(body, 0, len(body))
    r = scanner.result()
    assert "hunter2" not in r.query_shape and "visible" in r.query_shape


def test_every_module_uses_the_one_list_of_secrets():
    # Before: querylog's list lacked `payload` and redact's held its own copy; they disagreed.
    assert querylog.SECRET_KEYS is commands.SECRET_KEYS
    assert redact.SECRET_KEYS == {k.encode() for k in commands.CREDENTIAL_KEYS} >= {b"payload", b"pwd"}
    assert redact.SENSITIVE_COMMANDS is commands.SENSITIVE_COMMANDS
    assert commands.is_sensitive("SASLStart") and commands.is_hello("isMaster") and commands.is_hello("ismaster")
    assert not commands.is_sensitive("find")


def test_no_redact_still_blanks_connection_string_credentials():
    rendered = '{"addShard": "mongodb://admin:hunter2@rs1/h1:27017,h2:27017", "name": "s1"}'
    for show_values in (True, False):
        shown, _ = querylog.prepare(rendered, "addShard", show_values)
        assert "hunter2" not in shown and "rs1/h1:27017" in shown
    out = '{"aggregate": "c", "pipeline": [{"$out": {"s3": {"url": "s3://AKIA:s3cr3t@bucket/key"}}}]}'
    shown, _ = querylog.prepare(out, "aggregate", True)
    assert "s3cr3t" not in shown and "bucket/key" in shown


# ---- secrets in recordings (issue 16 item 1) ----


@pytest.mark.parametrize("compressor", ["zlib", "zstd", "snappy", "noop"])
def test_compressed_auth_commands_are_blanked_in_recordings(tmp_path, compressor):
    sink = CaptureSink(str(tmp_path))
    c = conn()
    sink.on_connection_open(c)
    t = time.monotonic_ns()
    exchange = [
        (True, op_msg(2, 0, {"saslStart": 1, "mechanism": "SCRAM-SHA-256", "payload": SECRET, "$db": "admin"})),
        (False, op_msg(51, 2, {"conversationId": 1, "done": False, "payload": SECRET, "ok": 1.0})),
        (True, op_msg(4, 0, {"createUser": "bob", "pwd": SECRET.decode(), "roles": [], "$db": "admin"})),
        (False, op_msg(53, 4, {"ok": 1.0})),
        (True, op_msg(5, 0, {"find": "c", "filter": {"x": SECRET.decode()}, "$db": "app"})),
    ]
    for from_client, msg in exchange:
        wrapped = oracle.compress_message(msg, compressor)
        for part in chunks(wrapped, random.Random(len(msg)), 7):
            sink.on_data(c, from_client, part, t)
    sink.close()
    [path] = finished_files(tmp_path)
    assert SECRET not in open(path, "rb").read()
    [flow] = flows([path])
    recorded = [m.data for m in flow.halves[flow.client].messages]
    plain = [oracle.decompress_message(m) if m[12:16] == b"\xdc\x07\x00\x00" else m for m in recorded]
    docs = [bson.decode(m[21:]) for m in plain]
    # Before: a compressed saslStart or createUser was streamed into the recording unchecked, secret and all.
    assert docs[0]["payload"] == bytes(len(SECRET)) and docs[0]["mechanism"] == "SCRAM-SHA-256"
    assert docs[1]["pwd"] == "*" * len(SECRET) and docs[1]["createUser"] == "bob"
    assert docs[2]["filter"]["x"] == SECRET.decode()  # not a credential: recorded as sent
    assert recorded[2] == oracle.compress_message(exchange[4][1], compressor)


# ---- decompression bombs (issue 16 item 2, issue 15 item 5) ----


def _bomb(size_declared: int, inflated: int = 64 << 20) -> bytes:
    body = zlib.compress(bytes(inflated), 9)  # about 65 KB
    prefix = struct.pack("<iiB", opcodes.OP_MSG, size_declared, 2)
    return struct.pack("<iiii", 16 + 9 + len(body), 7, 0, opcodes.OP_COMPRESSED) + prefix + body


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("where", ["recorder", "replay"])
def test_a_65kb_zlib_message_never_inflates_past_its_declared_size(where):
    from mongoproxy.replay import reader

    msg = _bomb(1000)
    assert len(msg) < 70_000
    undo = redact.uncompressed if where == "recorder" else reader.uncompressed

    def run():
        with pytest.raises(DecodeError) as info:
            undo(msg)
        assert info.value.reason == "bad_uncompressed_size"

    # Before: zlib.decompress inflated all 64 MB, then compared the size.
    assert _peak(run) < 4 << 20


def test_declared_size_is_bounded_by_the_message_limit():
    with pytest.raises(DecodeError) as info:
        compression.uncompressed(_bomb(2**31 - 1), limit=48_000_000)
    assert info.value.reason == "bad_uncompressed_size"
    with pytest.raises(DecodeError):
        compression.decompress(3, b"\x28\xb5\x2f\xfd", 100, limit=50)


def test_snappy_above_the_bound_is_not_observed_and_memory_stays_bounded():
    import cramjam

    rng = random.Random(5)
    plain = oracle.encode_op_msg(
        {"insert": "c", "$db": "d"},
        sequences=[("documents", [{"_id": i, "s": os.urandom(rng.randint(0, 200)).hex()} for i in range(4000)])],
    )
    wrapped = oracle.compress_message(plain, "snappy")
    assert len(wrapped) > 600_000
    after = oracle.encode_op_msg({"ping": 1, "$db": "admin"})
    seen, errors = [], []
    scanner = framing.FrameScanner(
        False, seen.append, lambda r, d, f: errors.append((r, f)), max_observed_compressed_bytes=50_000
    )

    stream = wrapped + after

    def run():
        for pos in range(0, len(stream), 65536):
            scanner.feed(stream[pos : pos + 65536], 0)

    # Before: the whole compressed body was buffered (and inflated whole) before the scanner saw a byte.
    assert _peak(run) < 500_000
    # Counted once, not fatal: the next message is observed as usual.
    assert errors == [("too_large_to_observe", False)]
    assert [m.result.command for m in seen if not m.error] == ["ping"]
    # Under the bound the body is decompressed whole, however it is cut.
    body = bytes(cramjam.snappy.compress_raw(plain[16:]))
    out = bytearray()
    inflater = compression.Inflater(1, len(plain) - 16, out.extend, max_buffered=len(body) + 1)
    for part in chunks(body, rng, 5000):
        inflater.feed(part)
    inflater.finish()
    assert out == plain[16:]
    with pytest.raises(DecodeError) as info:
        compression.Inflater(1, len(plain) - 16, out.extend, max_buffered=len(body) - 1).feed(body)
    assert info.value.reason == "too_large_to_observe"


def test_peek_reads_a_snappy_prefix_without_decoding_the_whole_body():
    import cramjam

    plain = b"saslStart" + os.urandom(2_000_000)
    body = bytes(cramjam.snappy.compress_raw(plain))
    assert compression.peek(1, body, 64) == plain[:64]


def test_a_snappy_copy_past_the_window_is_too_large_to_observe():
    first = os.urandom(400_000)
    # A literal of 400,000 bytes, then a copy of 64 bytes from 300,000 bytes back (4-byte offset tag).
    block = bytes([0xC0, 0xB5, 0x18])  # preamble: 400,064
    block += bytes([62 << 2]) + (400_000 - 1).to_bytes(3, "little") + first
    block += bytes([(63 << 2) | 3]) + (300_000).to_bytes(4, "little")
    out = bytearray()
    stream = compression.SnappyStream(out.extend)
    with pytest.raises(DecodeError) as info:
        for pos in range(0, len(block), 50_000):
            stream.feed(block[pos : pos + 50_000])
    assert info.value.reason == "too_large_to_observe"


# ---- internal errors (issue 16 item 6) ----


def test_a_tracker_bug_is_an_internal_error_logged_at_warning_once_a_minute(caplog):
    framing._internal_logged.clear()
    errors = []

    def broken_tracker(msg):
        raise KeyError("a bug")

    msg = op_msg(1, 0, {"ping": 1, "$db": "admin"})
    with caplog.at_level(logging.WARNING, logger="mongoproxy.protocol"):
        for _ in range(3):
            scanner = framing.FrameScanner(False, broken_tracker, lambda r, d, f: errors.append((r, f)))
            scanner.feed(msg, 0)
            assert scanner.stopped
    assert errors == [("internal_error", True)] * 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].exc_info is not None
    assert "broken_tracker" in caplog.text  # the traceback names the failing code


# ---- the one framer ----


class _Collect(framing.Framer):
    """Rebuilds each message from the hooks; stops at an opcode it does not know."""

    def __init__(self) -> None:
        super().__init__(1000)
        self.cur = bytearray()
        self.messages: list[bytes] = []
        self.dead = bytearray()
        self.bad: tuple = ()

    def _on_header_bytes(self, data, start, end, now_ns):
        self.cur += data[start:end]

    def _on_header(self, length, request_id, response_to, opcode):
        if opcode not in opcodes.OPCODE_NAMES:
            self.bad = ("opcode", opcode)
            self.stop()

    def _on_body(self, data, start, end):
        self.cur += data[start:end]

    def _on_end(self, now_ns):
        self.messages.append(bytes(self.cur))
        self.cur.clear()

    def _on_bad_length(self, length, request_id, opcode):
        self.bad = ("length", length)

    def _on_dead(self, data, start, end):
        self.dead += data[start:end]


def test_the_framer_gives_the_same_messages_however_the_stream_is_cut():
    msgs = [op_msg(i, 0, {"ping": 1, "pad": "x" * i * 7, "$db": "a"}) for i in range(1, 30)]
    msgs.append(struct.pack("<iiii", 16, 99, 0, opcodes.OP_MSG))  # an empty body is still a message
    stream = b"".join(msgs)
    rng = random.Random(3)
    for _ in range(50):
        f = _Collect()
        for part in chunks(stream, rng, rng.choice((1, 5, 40, 400))):
            f._frame(part, 0)
        assert f.messages == msgs and not f.mid_message and not f.bad


def test_the_framer_stops_at_a_bad_length_or_when_a_hook_stops_it():
    good = op_msg(1, 0, {"ping": 1, "$db": "a"})
    f = _Collect()
    f._frame(good + struct.pack("<iiii", 5000, 2, 0, opcodes.OP_MSG) + b"rest", 0)
    assert f.messages == [good] and f.bad == ("length", 5000) and f.stopped and f.dead == b"rest"
    f = _Collect()
    f._frame(good + struct.pack("<iiii", 20, 2, 0, 4242) + b"body", 0)
    assert f.messages == [good] and f.bad == ("opcode", 4242) and f.stopped and f.dead == b"body"


def test_an_aggregate_writes_only_with_out_or_merge_and_one_rule_serves_replay_and_the_mirror():
    from mongoproxy.protocol.commands import pipeline_writes
    from mongoproxy.replay import filters
    from mongoproxy.sinks import mirror

    assert pipeline_writes([{"$match": {}}, {"$merge": {"into": "x"}}])
    assert pipeline_writes([{"$out": "x"}])
    assert not pipeline_writes([{"$match": {"$out": 1}}])  # a field named $out inside a stage is not a stage
    assert not pipeline_writes([{"$group": {"_id": 1}}, "not a stage"])
    assert not pipeline_writes(None) and not pipeline_writes({"$out": "x"})
    assert filters.pipeline_writes is pipeline_writes and mirror.pipeline_writes is pipeline_writes
