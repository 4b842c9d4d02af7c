"""A scripted TCP server: each connection runs a handler coroutine that reads parsed messages and sends any bytes.

Sync tests: `with ScriptedServer(handler) as srv:` runs it on its own event loop in a background thread.
Async tests: the same threaded server works from any loop; `async with srv.serving():` runs it on the caller's loop.
`MongoHandler` answers the driver handshake, ping and canned replies, so pymongo can talk to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import struct
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import bson
from bson.raw_bson import RawBSONDocument

from . import wire
from .wire import Message

Handler = Callable[["ScriptedConnection"], Awaitable[None]]

# What a peer closing or resetting the connection raises; not a handler bug.
_DISCONNECTS = (ConnectionError, asyncio.IncompleteReadError, EOFError, BrokenPipeError)


class ScriptedConnection:
    """One accepted connection as seen by a handler."""

    def __init__(
        self, server: ScriptedServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.index = index
        self.peer = writer.get_extra_info("peername")
        self.sockname = writer.get_extra_info("sockname")
        self.bytes_received = 0
        self.bytes_sent = 0
        self.messages_received = 0
        self.closed = False

    # ---- reading
    async def read_raw_message(self, timeout: float | None = None) -> bytes | None:
        """Next whole message as bytes; None on EOF at a message boundary."""
        raw = await asyncio.wait_for(wire.read_message(self.reader), timeout)
        if raw is not None:
            self.bytes_received += len(raw)
            self.messages_received += 1
        return raw

    async def read_message(self, timeout: float | None = None) -> Message | None:
        """Next message decoded by tests.support.wire (OP_COMPRESSED unwrapped); None on EOF."""
        raw = await self.read_raw_message(timeout)
        return None if raw is None else wire.decode_message(raw)

    async def read(self, n: int = 65536) -> bytes:
        """Up to `n` raw bytes (b"" at EOF)."""
        data = await self.reader.read(n)
        self.bytes_received += len(data)
        return data

    async def read_exactly(self, n: int) -> bytes:
        """Exactly `n` raw bytes (IncompleteReadError at EOF)."""
        data = await self.reader.readexactly(n)
        self.bytes_received += n
        return data

    # ---- writing
    def send(self, data: bytes) -> None:
        """Queue raw bytes for sending (no wait)."""
        self.bytes_sent += len(data)
        self.writer.write(data)

    async def send_and_drain(self, data: bytes) -> None:
        """Send raw bytes and wait for the transport buffer to drain."""
        self.send(data)
        await self.writer.drain()

    async def send_in_chunks(self, data: bytes, sizes: Sequence[int], delay: float = 0.0) -> None:
        """Send `data` cut at the given chunk sizes (rest in one piece), draining after each chunk."""
        pos = 0
        for n in sizes:
            if pos >= len(data):
                break
            await self.send_and_drain(data[pos : pos + n])
            pos += n
            if delay:
                await asyncio.sleep(delay)
        if pos < len(data):
            await self.send_and_drain(data[pos:])

    def encode_reply(
        self,
        request: Message,
        doc: wire.Doc,
        *,
        flags: int = 0,
        compress: str | None = "auto",
        checksum: bool = False,
        response_to: int | None = None,
    ) -> bytes:
        """The reply to `request` as bytes: OP_REPLY for OP_QUERY, else OP_MSG; compressed like the request when 'auto'."""
        rto = request.request_id if response_to is None else response_to
        if request.opcode == wire.OP_QUERY:
            raw = wire.encode_op_reply([doc], response_to=rto)
        else:
            raw = wire.encode_op_msg(doc, flags=flags, checksum=checksum, response_to=rto)
        if compress == "auto":
            name = (request.command_name or "").lower()
            compress = request.compressor if name not in wire.UNCOMPRESSED_COMMANDS else None
        return wire.compress_message(raw, compress) if compress else raw

    async def reply(self, request: Message, doc: wire.Doc, **kwargs: Any) -> bytes:
        """Send the reply to `request` (see encode_reply) and drain; returns the bytes sent."""
        raw = self.encode_reply(request, doc, **kwargs)
        await self.send_and_drain(raw)
        return raw

    async def stream_exhaust(
        self,
        request: Message,
        docs: Sequence[wire.Doc],
        *,
        chain: str = "previous",
        delay: float = 0.0,
        compress: str | None = "auto",
    ) -> list[bytes]:
        """Send len(docs) replies to one request, all but the last flagged moreToCome.

        chain="previous": each reply's responseTo is the previous reply's requestID (the spec);
        chain="original": every reply answers the original request (what SecantusDB does).
        """
        sent = []
        rto = request.request_id
        for i, doc in enumerate(docs):
            flags = wire.MORE_TO_COME if i < len(docs) - 1 else 0
            raw = self.encode_reply(request, doc, flags=flags, compress=compress, response_to=rto)
            await self.send_and_drain(raw)
            sent.append(raw)
            if chain == "previous":
                rto = struct.unpack_from("<i", raw, 4)[0]
            if delay and i < len(docs) - 1:
                await asyncio.sleep(delay)
        return sent

    # ---- ending
    async def sleep(self, seconds: float) -> None:
        """asyncio.sleep (for readable scripts)."""
        await asyncio.sleep(seconds)

    async def half_close(self) -> None:
        """Send FIN (shutdown the write side) and keep reading possible."""
        await self.writer.drain()
        if self.writer.can_write_eof():
            self.writer.write_eof()

    async def close(self) -> None:
        """Flush and close gracefully (FIN)."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(*_DISCONNECTS):
            self.writer.close()
            await self.writer.wait_closed()

    def reset(self) -> None:
        """Abort with SO_LINGER 0 so the peer sees a TCP RST; unsent bytes are discarded."""
        if self.closed:
            return
        self.closed = True
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


def _new_loop(loop_kind: str) -> asyncio.AbstractEventLoop:
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class ScriptedServer:
    """A TCP server running `handler(conn)` per connection; errors raised by handlers fail stop()."""

    def __init__(
        self,
        handler: Handler,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        loop_kind: str = "asyncio",
        backlog: int = 128,
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.loop_kind = loop_kind
        self.backlog = backlog
        self.connections: list[ScriptedConnection] = []
        self.errors: list[BaseException] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._thread: threading.Thread | None = None
        self._accepted = threading.Condition()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) it listens on."""
        return (self.host, self.port)

    @property
    def uri(self) -> str:
        """mongodb:// URI with directConnection=true."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mongodb://{host}:{self.port}/?directConnection=true"

    @property
    def accepted(self) -> int:
        """Number of connections accepted so far."""
        return len(self.connections)

    # ---- lifecycle on the current loop
    async def astart(self) -> ScriptedServer:
        """Start listening on the running loop."""
        self.loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._on_connect, self.host, self.port, backlog=self.backlog)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def astop(self) -> None:
        """Stop listening, cancel handlers, close their connections."""
        if self._server is not None:
            self._server.close()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in self.connections:
            if not c.closed:
                c.closed = True
                c.writer.transport.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    @contextlib.asynccontextmanager
    async def serving(self):
        """`async with srv.serving():` runs the server on the caller's loop."""
        await self.astart()
        try:
            yield self
        finally:
            await self.astop()
        self.check()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        conn = ScriptedConnection(self, reader, writer, len(self.connections))
        with self._accepted:
            self.connections.append(conn)
            self._accepted.notify_all()
        try:
            await self.handler(conn)
        except asyncio.CancelledError:
            pass
        except _DISCONNECTS:
            pass
        except BaseException as exc:  # recorded and re-raised by check()/stop()
            self.errors.append(exc)
        finally:
            self._tasks.discard(task)
            if not conn.closed:
                conn.closed = True
                with contextlib.suppress(Exception):
                    writer.close()

    # ---- lifecycle in a background thread
    def start(self, timeout: float = 10.0) -> ScriptedServer:
        """Run on a new event loop in a daemon thread; returns once listening."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = _new_loop(self.loop_kind)
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.astart())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"scripted-server-{id(self):x}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("scripted server did not start")
        if failure:
            raise failure[0]
        return self

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 10.0) -> Any:
        """Run fn(*args) (a plain function or a coroutine function) on the server's loop from another thread."""

        async def wrapper():
            res = fn(*args)
            if asyncio.iscoroutine(res):
                res = await res
            return res

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def wait_for_connections(self, n: int, timeout: float = 10.0) -> list[ScriptedConnection]:
        """Block (from another thread) until `n` connections were accepted."""
        with self._accepted:
            if not self._accepted.wait_for(lambda: len(self.connections) >= n, timeout):
                raise TimeoutError(f"{len(self.connections)} of {n} connections accepted after {timeout}s")
            return list(self.connections)

    def stop(self, timeout: float = 10.0, check: bool = True) -> None:
        """Stop the threaded server; with check=True re-raise the first handler error."""
        if self._thread is not None and self.loop is not None and self.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self.astop(), self.loop)
            with contextlib.suppress(Exception):
                fut.result(timeout)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        self._thread = None
        if check:
            self.check()

    def check(self) -> None:
        """Raise the first exception a handler raised (other than disconnects)."""
        if self.errors:
            raise AssertionError(f"scripted server handler failed: {self.errors[0]!r}") from self.errors[0]

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(check=exc_type is None)


# ---------------------------------------------------------------- a MongoDB-speaking handler

SUPPORTED_COMPRESSORS = ("snappy", "zlib", "zstd", "noop")


def canned_document(size: int) -> bytes:
    """One BSON document of exactly `size` bytes (size >= 32): {_id: 0, pad: <binary>}."""
    base = len(bson.encode({"_id": 0, "pad": b""}))
    if size < base:
        raise ValueError(f"a canned document is at least {base} bytes")
    return bson.encode({"_id": 0, "pad": b"x" * (size - base)})


class MongoHandler:
    """Answers hello/isMaster, ping, buildInfo, endSessions and, for anything else, a canned cursor reply.

    - `reply_size`: BSON bytes of the one document in each canned reply's firstBatch (0: empty batch).
    - `compressors`: what the server accepts; the hello reply lists those the client offered, and replies
      are compressed with the compressor of the request (as mongod does).
    - `commands`: {lower-case command name: fn(message, conn) -> reply document (or awaitable)} overrides.
    - `delay`: seconds to wait before each non-handshake reply.
    """

    def __init__(
        self,
        *,
        reply_size: int = 0,
        compressors: Sequence[str] = (),
        max_wire_version: int = 25,
        set_name: str | None = None,
        commands: dict[str, Callable] | None = None,
        delay: float = 0.0,
        hello_extra: dict | None = None,
    ) -> None:
        self.reply_size = reply_size
        self.compressors = tuple(compressors)
        self.max_wire_version = max_wire_version
        self.set_name = set_name
        self.commands = {k.lower(): v for k, v in (commands or {}).items()}
        self.delay = delay
        self.hello_extra = dict(hello_extra or {})
        self.seen: Counter = Counter()  # command name -> count
        self.request_compressors: Counter = Counter()  # compressor of each request (None: uncompressed)
        self.negotiated: list[list[str]] = []  # compression lists sent in hello replies
        self._canned: dict[tuple[str, int], bytes] = {}
        self._connection_ids = 0

    def hello_reply(self, request: Message, conn: ScriptedConnection) -> dict:
        """The handshake/monitoring reply."""
        cmd = request.doc or {}
        legacy = request.command_name.lower() == "ismaster"
        reply: dict[str, Any] = {
            "ismaster" if legacy else "isWritablePrimary": True,
            "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000,
            "localTime": datetime.datetime.now(datetime.UTC),
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": conn.index + 1,
            "minWireVersion": 0,
            "maxWireVersion": self.max_wire_version,
            "readOnly": False,
        }
        if cmd.get("helloOk"):
            reply["helloOk"] = True
        if self.set_name:
            reply.update(
                setName=self.set_name,
                hosts=[f"{conn.sockname[0]}:{conn.sockname[1]}"],
                me=f"{conn.sockname[0]}:{conn.sockname[1]}",
                secondary=False,
            )
        offered = cmd.get("compression")
        if offered is not None:
            accepted = [c for c in offered if c in self.compressors]
            reply["compression"] = accepted
            self.negotiated.append(accepted)
        reply.update(self.hello_extra)
        reply["ok"] = 1.0
        return reply

    def canned_reply(self, request: Message) -> bytes:
        """A cursor reply whose firstBatch holds one document of `reply_size` bytes (cached BSON)."""
        db = (request.doc or {}).get("$db", "test")
        coll = (request.doc or {}).get(request.command_name) if request.command_name else None
        ns = f"{db}.{coll if isinstance(coll, str) else '$cmd'}"
        key = (ns, self.reply_size)
        raw = self._canned.get(key)
        if raw is None:
            batch = [RawBSONDocument(canned_document(self.reply_size))] if self.reply_size else []
            raw = self._canned[key] = bson.encode(
                {"cursor": {"firstBatch": batch, "id": bson.Int64(0), "ns": ns}, "ok": 1.0}
            )
        return raw

    async def respond(self, request: Message, conn: ScriptedConnection) -> wire.Doc | None:
        """The reply document for `request` (None: send nothing)."""
        name = (request.command_name or "").lower()
        self.seen[name] += 1
        self.request_compressors[request.compressor] += 1
        if name in self.commands:
            res = self.commands[name](request, conn)
            return await res if asyncio.iscoroutine(res) else res
        if name in ("hello", "ismaster"):
            return self.hello_reply(request, conn)
        if self.delay:
            await asyncio.sleep(self.delay)
        if name in ("ping", "endsessions", "killcursors", "aborttransaction", "committransaction"):
            return {"ok": 1.0}
        if name == "buildinfo":
            return {"version": "8.0.0", "versionArray": [8, 0, 0, 0], "maxBsonObjectSize": 16 * 1024 * 1024, "ok": 1.0}
        return self.canned_reply(request)

    async def __call__(self, conn: ScriptedConnection) -> None:
        while True:
            request = await conn.read_message()
            if request is None:
                return
            doc = await self.respond(request, conn)
            if doc is None or request.more_to_come:  # unacknowledged request: no reply
                continue
            await conn.reply(request, doc)
