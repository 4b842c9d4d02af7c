"""Byte-exact forwarding: pipelined OP_MSG streams (1 byte to 20 MB bodies) and non-MongoDB bytes, randomly chunked."""

import asyncio
import hashlib
import random
import struct

import bson
import pytest

from tests.support.inprocess import LOOP_KINDS, run, running_proxy

PAYLOAD_SIZES = [1, 7, 100, 1000, 16 * 1024, 65_535, 65_536, 300_000, 1_000_000, 20_000_000]


def op_msg(request_id: int, response_to: int, doc: dict) -> bytes:
    body = struct.pack("<I", 0) + b"\x00" + bson.encode(doc)
    return struct.pack("<iiii", 16 + len(body), request_id, response_to, 2013) + body


def request_stream(rng: random.Random) -> tuple[bytes, list[int]]:
    msgs, ids = [], []
    for i, size in enumerate(PAYLOAD_SIZES):
        rid = 1000 + i
        ids.append(rid)
        msgs.append(
            op_msg(rid, 0, {"insert": "blobs", "$db": "fwd", "documents": [{"_id": i, "b": rng.randbytes(size)}]})
        )
    return b"".join(msgs), ids


def reply_messages(rng: random.Random, ids: list[int]) -> list[bytes]:
    sizes = list(reversed(PAYLOAD_SIZES))
    return [
        op_msg(
            5000 + i,
            rid,
            {"cursor": {"id": 0, "ns": "fwd.blobs", "firstBatch": [{"b": rng.randbytes(sizes[i])}]}, "ok": 1.0},
        )
        for i, rid in enumerate(ids)
    ]


async def write_randomly(writer: asyncio.StreamWriter, data: bytes, rng: random.Random, eof: bool = True) -> None:
    pos = 0
    while pos < len(data):
        n = rng.choice((1, 3, 16, 17, 100, 4096, 65536, 300_000))
        writer.write(data[pos : pos + n])
        pos += n
        if rng.random() < 0.3:
            await writer.drain()
    await writer.drain()
    if eof:
        writer.write_eof()


async def read_all_hash(reader: asyncio.StreamReader) -> tuple[str, int]:
    h = hashlib.sha256()
    total = 0
    while True:
        chunk = await reader.read(1 << 20)
        if not chunk:
            return h.hexdigest(), total
        h.update(chunk)
        total += len(chunk)


async def exchange(up: bytes, down: list, seed: int):
    """Client sends `up` through the proxy; the server answers each message it reads with the next of `down`
    (or, when `down` is bytes, streams it regardless); returns (received at server, at client, sink)."""
    rng_c, rng_s = random.Random(seed), random.Random(seed + 1)
    server_got: asyncio.Future = asyncio.get_running_loop().create_future()

    async def answer_each(reader, writer):
        h, total = hashlib.sha256(), 0
        for reply in down:
            head = await reader.readexactly(16)
            body = await reader.readexactly(int.from_bytes(head[:4], "little") - 16)
            h.update(head + body)
            total += len(head) + len(body)
            await write_randomly(writer, reply, rng_s, eof=False)
        rest_hash, rest = await read_all_hash(reader)
        assert rest == 0
        writer.write_eof()
        server_got.set_result((h.hexdigest(), total))

    async def stream(reader, writer):
        send = asyncio.ensure_future(write_randomly(writer, down, rng_s))
        server_got.set_result(await read_all_hash(reader))
        await send

    async def handle(reader, writer):
        await (stream if isinstance(down, bytes) else answer_each)(reader, writer)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with running_proxy(port) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
            send = asyncio.ensure_future(write_randomly(writer, up, rng_c))
            client_got = await read_all_hash(reader)
            await send
            writer.close()
            at_server = await asyncio.wait_for(server_got, 60)
            for _ in range(100):  # the proxy closes its side once both halves are done
                if not proxy.connections:
                    break
                await asyncio.sleep(0.02)
            return at_server, client_got, proxy.sink
    finally:
        server.close()


def sha(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_pipelined_op_msg_streams_are_byte_exact(loop_kind):
    rng = random.Random(7)
    up, ids = request_stream(rng)
    replies = reply_messages(rng, ids)
    down = b"".join(replies)
    at_server, at_client, sink = run(exchange(up, replies, seed=11), loop_kind)
    assert at_server == sha(up)
    assert at_client == sha(down)
    # The tap saw every message and matched every reply, without decode errors.
    assert sink.decode_errors == []
    assert [e.request_id for e in sink.commands] == ids
    assert all(e.op == "insert" and e.collection == "blobs" and e.database == "fwd" for e in sink.commands)
    assert [e.documents_returned for e in sink.commands] == [1] * len(ids)
    assert sum(e.request_size for e in sink.commands) == len(up)
    assert sum(e.reply_size for e in sink.commands) == len(down)
    assert len(sink.opened) == len(sink.closed) == 1
    assert sink.closed[0].bytes_from_client == len(up) and sink.closed[0].bytes_from_server == len(down)


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_non_mongodb_bytes_pass_unchanged(loop_kind):
    rng = random.Random(3)
    up = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + rng.randbytes(3_000_000)
    down = b"\xff\xff\xff\x7f" + rng.randbytes(2_000_000)
    at_server, at_client, sink = run(exchange(up, down, seed=5), loop_kind)
    assert at_server == sha(up)
    assert at_client == sha(down)
    # Each direction gives up observing once, with a counted reason, and forwarding goes on.
    reasons = sorted((e.direction, e.reason, e.fatal) for e in sink.decode_errors)
    assert reasons == [("reply", "message_too_large", True), ("request", "message_too_large", True)]
    assert sink.commands == []


@pytest.mark.parametrize("seed", range(3))
def test_small_streams_every_chunking(seed):
    rng = random.Random(seed)
    docs = [{"ping": 1, "$db": "admin", "pad": "x" * rng.randrange(0, 300)} for _ in range(200)]
    up = b"".join(op_msg(i + 1, 0, d) for i, d in enumerate(docs))
    replies = [op_msg(10_000 + i, i + 1, {"ok": 1.0}) for i in range(200)]
    down = b"".join(replies)
    at_server, at_client, sink = run(exchange(up, replies, seed=seed))
    assert at_server == sha(up) and at_client == sha(down)
    assert len(sink.commands) == 200 and all(e.ok is True and e.op == "ping" for e in sink.commands)
