"""A fast scripted MongoDB server for the hot-path benchmarks: canned replies, no database.

    python -m benchmarks.backend [--port P] [--reply-size BYTES] [--tls-cert PEM --tls-key PEM]

Prints "ready PORT" on stdout once listening (port 0 picks a free one) and
serves until killed. One uvloop asyncio.Protocol per connection; requests are
framed by their 16-byte header, only the first key of the command is read,
and the bodies of large requests are skipped, never buffered. Replies are
cached bytes with the responseTo patched in, so this server stays far from
being the bottleneck:

- hello / isMaster (OP_MSG or the legacy OP_QUERY handshake): a primary's hello reply;
- {benchReply: N}: a cursor reply whose firstBatch holds 1 KB documents up to about N bytes;
- ping, endSessions, buildInfo, insert, ...: {ok: 1} (insert also gets n);
- anything else (find, ...): a cursor reply with one document of --reply-size bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import socket
import struct
import sys
from typing import Any

import bson

OP_REPLY = 1
OP_QUERY = 2004
OP_MSG = 2013
MORE_TO_COME = 2
HEADER = struct.Struct("<iiii")
HEAD_KEEP = 512  # bytes of each request kept to find its command; the rest is skipped
BIG_DOC = 1024  # documents of a {benchReply: N} batch


def cursor_reply(docs: list[bytes], ns: str = "bench.c") -> bytes:
    """The BSON of {cursor: {firstBatch: [docs], id: 0, ns}, ok: 1.0}, built without decoding docs."""
    items = b"".join(b"\x03" + str(i).encode() + b"\x00" + d for i, d in enumerate(docs))
    arr = struct.pack("<i", len(items) + 5) + items + b"\x00"
    nsb = ns.encode() + b"\x00"
    cur = b"\x04firstBatch\x00" + arr + b"\x12id\x00" + bytes(8) + b"\x02ns\x00" + struct.pack("<i", len(nsb)) + nsb
    cur = struct.pack("<i", len(cur) + 5) + cur + b"\x00"
    body = b"\x03cursor\x00" + cur + b"\x01ok\x00" + struct.pack("<d", 1.0)
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


def document(size: int, i: int = 0) -> bytes:
    """One BSON document of exactly `size` bytes (>= 26): {_id: i, pad: <binary>}."""
    base = len(bson.encode({"_id": i, "pad": b""}))
    return bson.encode({"_id": i, "pad": b"x" * max(0, size - base)})


HELLO = {
    "helloOk": True,
    "isWritablePrimary": True,
    "ismaster": True,
    "maxBsonObjectSize": 16 * 1024 * 1024,
    "maxMessageSizeBytes": 48_000_000,
    "maxWriteBatchSize": 100_000,
    "localTime": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
    "minWireVersion": 0,
    "maxWireVersion": 21,
    "readOnly": False,
    "ok": 1.0,
}


class Replies:
    """Cached reply payloads (everything after the 16-byte header) by kind."""

    def __init__(self, reply_size: int) -> None:
        self.msg_hello = b"\x00\x00\x00\x00\x00" + bson.encode(HELLO)
        self.query_hello = struct.pack("<iqii", 8, 0, 0, 1) + bson.encode(HELLO)  # OP_REPLY, AwaitCapable
        self.ok = b"\x00\x00\x00\x00\x00" + bson.encode({"ok": 1.0})
        self.canned = b"\x00\x00\x00\x00\x00" + cursor_reply([document(reply_size)] if reply_size else [])
        self.big: dict[int, bytes] = {}

    def sized(self, total: int) -> bytes:
        p = self.big.get(total)
        if p is None:
            n = max(1, total // (BIG_DOC + 8))
            doc = document(BIG_DOC)
            p = self.big[total] = b"\x00\x00\x00\x00\x00" + cursor_reply([doc] * n)
        return p


_OK_COMMANDS = frozenset(
    (
        b"ping",
        b"endSessions",
        b"buildInfo",
        b"buildinfo",
        b"insert",
        b"update",
        b"delete",
        b"killCursors",
        b"drop",
        b"create",
        b"getLastError",
    )
)


class BackendProtocol(asyncio.Protocol):
    """One client connection: frame requests, answer each at once."""

    def __init__(self, replies: Replies) -> None:
        self.replies = replies
        self.transport: Any = None
        self.head = bytearray()  # the current message's first bytes (<= HEAD_KEEP)
        self.length = 0  # the current message's length, 0 between messages
        self.left = 0  # bytes of the current message not yet seen
        self.next_id = 1

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        out = []
        pos, n = 0, len(data)
        while pos < n:
            if not self.length and n - pos >= 16:
                length = int.from_bytes(data[pos : pos + 4], "little", signed=True)
                if length < 16:
                    self.transport.abort()
                    return
                if n - pos >= length:  # fast path: a whole message in this chunk
                    r = self._answer(memoryview(data)[pos : pos + min(length, HEAD_KEEP)])
                    if r is not None:
                        out.append(r)
                    pos += length
                    continue
            # slow path: a message spread over chunks
            if not self.length:
                take = min(16 - len(self.head), n - pos)
                self.head += data[pos : pos + take]
                pos += take
                if len(self.head) < 16:
                    break
                self.length = int.from_bytes(self.head[:4], "little", signed=True)
                if self.length < 16:
                    self.transport.abort()
                    return
                self.left = self.length - 16
            take = min(self.left, n - pos)
            keep = HEAD_KEEP - len(self.head)
            if keep > 0:
                self.head += data[pos : pos + min(take, keep)]
            pos += take
            self.left -= take
            if self.left == 0:
                r = self._answer(memoryview(bytes(self.head)))
                if r is not None:
                    out.append(r)
                self.head.clear()
                self.length = 0
        if out:
            write = self.transport.write
            if len(out) == 1 and len(out[0][1]) < 65536:
                write(out[0][0] + out[0][1])
            else:
                for head, payload in out:  # large payloads are written as they are, not copied
                    write(head)
                    write(payload)

    def _answer(self, m: memoryview) -> Any:
        """(header, payload) of the reply to the message whose first bytes are `m`, or None."""
        _, request_id, _, op = HEADER.unpack_from(m)
        replies = self.replies
        if op == OP_MSG:
            if m[16] & MORE_TO_COME:
                return None
            name, value_at = _first_key(m, 26) if len(m) > 26 and m[20] == 0 else (b"", 0)
            if name in (b"hello", b"isMaster", b"ismaster"):
                payload = replies.msg_hello
            elif name == b"benchReply":
                payload = replies.sized(int.from_bytes(m[value_at : value_at + 4], "little"))
            elif name in _OK_COMMANDS:
                payload = replies.ok
            else:
                payload = replies.canned
            rop = OP_MSG
        elif op == OP_QUERY:
            end = bytes(m[20:]).find(b"\x00") + 20  # fullCollectionName
            payload = (
                replies.query_hello
                if _first_key(m, end + 14)[0] in (b"isMaster", b"ismaster", b"hello")
                else struct.pack("<iqii", 8, 0, 0, 1) + bson.encode({"ok": 1.0})
            )
            rop = OP_REPLY
        else:
            return None
        self.next_id += 1
        return HEADER.pack(16 + len(payload), self.next_id, request_id, rop), payload


def _first_key(m: memoryview, at: int) -> tuple[bytes, int]:
    """(the key of the element whose name starts at `at`, offset of its value)."""
    raw = bytes(m[at : at + 64])
    end = raw.find(b"\x00")
    return (raw[:end], at + end + 1) if end >= 0 else (b"", 0)


async def serve(port: int, reply_size: int, host: str = "127.0.0.1", tls: tuple[str, str] | None = None) -> None:
    """Listen (over TLS when `tls` = (cert, key)) and print "ready PORT"; runs until cancelled."""
    replies = Replies(reply_size)
    loop = asyncio.get_running_loop()
    ctx = None
    if tls:
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*tls)
    server = await loop.create_server(
        lambda: BackendProtocol(replies), host, port, backlog=4096, reuse_address=True, ssl=ctx
    )
    print("ready", server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m benchmarks.backend`."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.backend", description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--reply-size", type=int, default=200, help="BSON bytes of the canned document (default 200)")
    ap.add_argument("--tls-cert", help="serve TLS with this PEM certificate (and --tls-key)")
    ap.add_argument("--tls-key")
    args = ap.parse_args(argv)
    try:
        import uvloop

        uvloop.run(serve(args.port, args.reply_size, tls=(args.tls_cert, args.tls_key) if args.tls_cert else None))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
