"""FrameScanner: framing over any chunking, OP_COMPRESSED, and decode errors that never stop forwarding."""

import random
import struct
import tracemalloc

import pytest

from mongoproxy import wire
from tests.support import wire as tw

MAX = wire.DEFAULT_MAX_MESSAGE_BYTES


class Recorder:
    def __init__(self, is_reply=False, **kw):
        self.messages, self.errors = [], []
        self.scanner = wire.FrameScanner(
            is_reply, self.messages.append, lambda r, d, f: self.errors.append((r, f)), **kw
        )

    def feed_chunks(self, data, sizes):
        pos, t = 0, 0
        for n in sizes:
            self.scanner.feed(data[pos : pos + n], t)
            pos += n
            t += 1
        assert pos >= len(data)
        return self

    def feed_random(self, data, rng, max_chunk=50):
        sizes = []
        left = len(data)
        while left > 0:
            n = min(left, rng.randint(1, max_chunk))
            sizes.append(n)
            left -= n
        return self.feed_chunks(data, sizes)


def summary(m):
    r = m.result
    return (
        m.request_id,
        m.response_to,
        m.opcode,
        m.wire_opcode,
        m.length,
        m.error,
        r and (r.command, r.collection, r.database, r.documents, r.flags),
    )


def mixed_stream():
    return b"".join(
        [
            tw.encode_op_msg({"find": "users", "filter": {"_id": 1}, "$db": "app"}, request_id=1),
            tw.encode_op_msg(
                {"insert": "users", "$db": "app"},
                sequences=[("documents", [{"_id": i} for i in range(5)])],
                request_id=2,
            ),
            tw.encode_op_msg({"ping": 1, "$db": "admin"}, checksum=True, request_id=3),
            tw.encode_op_query({"isMaster": 1, "client": {"application": {"name": "a"}}}, request_id=4),
            tw.encode_op_insert("app.users", [{"a": 1}, {"b": 2}], request_id=5),
            tw.encode_op_get_more("app.users", 42, request_id=6),
            tw.encode_op_kill_cursors([42], request_id=7),
            tw.encode_op_msg({"getMore": 42, "collection": "users", "$db": "app"}, request_id=8),
        ]
    )


def test_every_split_point_gives_the_same_messages():
    data = mixed_stream()
    whole = [summary(m) for m in Recorder().feed_chunks(data, [len(data)]).messages]
    assert [s[0] for s in whole] == list(range(1, 9))
    assert whole[0][6] == ("find", "users", "app", 0, 0)
    assert whole[1][6][3] == 5
    assert whole[2][6][4] & wire.CHECKSUM_PRESENT
    for cut in range(1, len(data)):
        rec = Recorder().feed_chunks(data, [cut, len(data) - cut])
        assert [summary(m) for m in rec.messages] == whole, cut
        assert rec.errors == []


def test_byte_at_a_time_and_random_chunks():
    data = mixed_stream()
    whole = [summary(m) for m in Recorder().feed_chunks(data, [len(data)]).messages]
    assert [summary(m) for m in Recorder().feed_chunks(data, [1] * len(data)).messages] == whole
    rng = random.Random(1)
    for _ in range(50):
        assert [summary(m) for m in Recorder().feed_random(data, rng).messages] == whole


def test_timestamps_are_first_and_last_chunk():
    msg = tw.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=1)
    rec = Recorder().feed_chunks(msg, [3, 10, len(msg) - 13])
    (m,) = rec.messages
    assert (m.first_ns, m.last_ns) == (0, 2)


@pytest.mark.parametrize(
    "length,reason",
    [(0, "bad_message_length"), (15, "bad_message_length"), (-5, "bad_message_length"), (MAX + 1, "message_too_large")],
)
def test_impossible_header_length_stops_observation(length, reason):
    bad = struct.pack("<iiii", length, 1, 0, 2013) + b"\x00" * 40
    good = tw.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=2)
    rec = Recorder().feed_chunks(bad + good, [len(bad) + len(good)])
    assert rec.errors == [(reason, True)]
    assert rec.messages == [] and rec.scanner.stopped
    rec.scanner.feed(good, 0)  # further feeding is harmless and observes nothing
    assert rec.messages == []


def test_max_message_bytes_is_configurable():
    msg = tw.encode_op_msg({"ping": 1, "$db": "admin", "pad": "x" * 200}, request_id=1)
    rec = Recorder(max_message_bytes=100).feed_chunks(msg, [len(msg)])
    assert rec.errors == [("message_too_large", True)]


def test_unknown_opcode_is_skipped_and_scanning_resumes():
    unknown = tw.encode_message(4242, b"\x01\x02\x03\x04\x05", request_id=1)
    good = tw.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=2)
    rec = Recorder().feed_chunks(unknown + good, [7, 100])
    assert rec.errors == [("unknown_opcode", False)]
    assert [(m.request_id, m.error) for m in rec.messages] == [(1, "unknown_opcode"), (2, "")]
    assert rec.messages[1].result.command == "ping"


def test_malformed_body_is_skipped_by_its_length():
    body = bytearray(tw.encode_op_msg({"find": "c", "$db": "d"}, request_id=1))
    body[21:25] = struct.pack("<i", 999)  # the kind-0 document claims more bytes than the message has
    good = tw.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=2)
    rec = Recorder().feed_random(bytes(body) + good, random.Random(2), 9)
    assert len(rec.errors) == 1 and rec.errors[0][1] is False
    assert [m.request_id for m in rec.messages] == [1, 2]
    assert rec.messages[0].result is None and rec.messages[0].error == rec.errors[0][0]
    assert rec.messages[1].result.command == "ping"


def test_empty_body_is_truncated():
    rec = Recorder().feed_chunks(struct.pack("<iiii", 16, 1, 0, 2013), [16])
    assert rec.errors == [("truncated", False)]
    assert rec.messages[0].error == "truncated"


def compressed(inner: bytes, compressor: str, size_delta: int = 0, compressor_id=None) -> bytes:
    length, rid, rto, op = struct.unpack_from("<iiii", inner)
    body = inner[16:]
    payload = struct.pack(
        "<iiB", op, len(body) + size_delta, tw.COMPRESSOR_IDS[compressor] if compressor_id is None else compressor_id
    )
    payload += tw.compress_bytes(body, compressor)
    return tw.encode_message(wire.OP_COMPRESSED, payload, rid, rto)


@pytest.mark.parametrize("compressor", ["noop", "zlib", "zstd", "snappy"])
def test_compressed_messages_are_observed_inside(compressor):
    inner = tw.encode_op_msg(
        {"insert": "logs", "$db": "app", "pad": "z" * 100_000},
        sequences=[("documents", [{"n": i, "s": "q" * 1000} for i in range(300)])],
        request_id=7,
    )
    data = compressed(inner, compressor)
    rec = Recorder().feed_random(data, random.Random(3), 5000)
    assert rec.errors == []
    (m,) = rec.messages
    assert (m.opcode, m.wire_opcode, m.compressor, m.length) == (
        wire.OP_MSG,
        wire.OP_COMPRESSED,
        tw.COMPRESSOR_IDS[compressor],
        len(data),
    )
    assert (m.result.command, m.result.collection, m.result.documents) == ("insert", "logs", 300)


@pytest.mark.parametrize("compressor", ["zlib", "zstd", "snappy", "noop"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_wrong_uncompressed_size_is_a_decode_error(compressor, delta):
    inner = tw.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=1)
    good = tw.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=2)
    rec = Recorder().feed_chunks(compressed(inner, compressor, delta) + good, [10**6])
    assert rec.errors == [("bad_uncompressed_size", False)]
    assert [m.request_id for m in rec.messages] == [1, 2]
    assert rec.messages[1].result.command == "ping"


def test_unknown_compressor_and_corrupt_stream():
    inner = tw.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=1)
    rec = Recorder().feed_chunks(compressed(inner, "zlib", compressor_id=9), [10**6])
    assert rec.errors == [("unknown_compressor", False)]
    data = bytearray(compressed(inner, "zlib"))
    data[30:34] = b"\xde\xad\xbe\xef"
    rec = Recorder().feed_chunks(bytes(data), [10**6])
    assert rec.errors and rec.errors[0] == ("decompress_failed", False)


def test_large_document_sequence_is_counted_while_streaming():
    docs = [{"_id": i, "blob": b"\x00" * 40_000} for i in range(1000)]  # ~40 MB
    data = tw.encode_op_msg({"insert": "big", "$db": "app"}, sequences=[("documents", docs)], request_id=1)
    assert len(data) > 40_000_000
    rec = Recorder()
    view = memoryview(data)
    for pos in range(0, len(data), 65536):
        rec.scanner.feed(view[pos : pos + 65536], 0)
    assert rec.errors == []
    assert rec.messages[0].result.documents == 1000


def test_checksums_verified_when_asked():
    good = tw.encode_op_msg({"ping": 1, "$db": "admin"}, checksum=True, request_id=1)
    bad = bytearray(tw.encode_op_msg({"ping": 2, "$db": "admin"}, checksum=True, request_id=2))
    bad[-1] ^= 0xFF
    plain = tw.encode_op_msg({"ping": 3, "$db": "admin"}, request_id=3)
    data = good + bytes(bad) + plain
    for sizes in ([len(data)], [1] * len(data), [5, 17, 3, 40, 1000]):
        rec = Recorder(verify_checksums=True).feed_chunks(data, sizes)
        assert rec.errors == [("checksum_mismatch", False)]
        assert [(m.request_id, m.error) for m in rec.messages] == [(1, ""), (2, "checksum_mismatch"), (3, "")]
    # Not asked: the checksum is skipped, never checked.
    assert Recorder().feed_chunks(data, [len(data)]).errors == []


class _SliceRecorder:
    """Wraps the BodyScanner to record the size of every slice it is fed."""

    def __init__(self, inner):
        self.inner, self.slices = inner, []

    def reset(self, *args):
        return self.inner.reset(*args)

    def feed(self, data, start=0, end=None):
        end = len(data) if end is None else end
        self.slices.append(end - start)
        return self.inner.feed(data, start, end)

    def result(self):
        return self.inner.result()

    @property
    def done(self):
        return self.inner.done


@pytest.mark.parametrize("compressor", ["zlib", "zstd"])
def test_highly_compressed_body_is_inflated_slice_by_slice(compressor):
    """40 MB of zeros compress to a few KB: one wire chunk must not become 40 MB in memory at once."""
    inner = tw.encode_op_msg(
        {"insert": "zeros", "$db": "app"},
        sequences=[("documents", [{"_id": i, "z": b"\x00" * 10_000_000} for i in range(4)])],
        request_id=1,
    )
    data = compressed(inner, compressor)
    assert len(data) < 100_000 < 40_000_000 < len(inner)
    rec = Recorder()
    rec.scanner.scanner = spy = _SliceRecorder(rec.scanner.scanner)
    tracemalloc.start()
    try:
        rec.feed_chunks(data, [len(data)])  # the whole compressed message in one chunk
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, f"inflating held {peak} bytes at once"
    assert rec.errors == []
    (m,) = rec.messages
    assert (m.result.command, m.result.collection, m.result.documents) == ("insert", "zeros", 4)
    assert sum(spy.slices) == len(inner) - 16
    assert max(spy.slices) <= 256 * 1024, max(spy.slices)
