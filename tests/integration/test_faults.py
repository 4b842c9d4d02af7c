"""Faults: upstream refuses, upstream dies mid-reply, client resets, slow readers; all without harming forwarding."""

import asyncio
import socket
import struct
import time

import bson
import pytest

from mongoproxy.server import WRITE_HIGH_WATER
from tests.support.inprocess import LOOP_KINDS, run, running_proxy
from tests.support.ports import free_port


def op_msg(request_id: int, response_to: int, doc: dict) -> bytes:
    body = struct.pack("<I", 0) + b"\x00" + bson.encode(doc)
    return struct.pack("<iiii", 16 + len(body), request_id, response_to, 2013) + body


PING = op_msg(1, 0, {"ping": 1, "$db": "admin"})


async def start_server(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_upstream_refused_closes_client_promptly(loop_kind):
    dead_port = free_port()  # nothing listens here

    async def main():
        async with running_proxy(dead_port) as proxy:
            started = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
            writer.write(PING)
            try:
                data = await asyncio.wait_for(reader.read(), 5)
            except ConnectionResetError:  # closed with our unread request in its buffer: the kernel sends RST
                data = b""
            elapsed = time.monotonic() - started
            writer.close()
            return data, elapsed, proxy.sink.upstream_errors

    data, elapsed, errors = run(main(), loop_kind)
    assert data == b""
    assert elapsed < 1.0, f"client saw the close after {elapsed:.3f}s"
    assert [e.reason for e in errors] == ["refused"]


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_upstream_dies_mid_reply_client_gets_eof(loop_kind):
    reply = op_msg(9, 1, {"ok": 1.0, "pad": "y" * 5000})

    async def handler(reader, writer):
        await reader.readexactly(len(PING))
        writer.write(reply[:2000])
        await writer.drain()
        writer.transport.abort()  # dies mid-reply

    async def main():
        server, port = await start_server(handler)
        async with running_proxy(port) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
            writer.write(PING)
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            for _ in range(100):
                if proxy.sink.closed:
                    break
                await asyncio.sleep(0.01)
            sink = proxy.sink
        server.close()
        return data, sink

    data, sink = run(main(), loop_kind)
    assert data == reply[:2000]  # what was sent arrived, then EOF
    assert len(sink.closed) == 1
    assert sink.commands == []  # the reply never completed


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_client_reset_closes_upstream(loop_kind):
    async def main():
        upstream_closed = asyncio.get_running_loop().create_future()

        async def handler(reader, writer):
            await reader.readexactly(len(PING))
            started = time.monotonic()
            try:
                rest = await reader.read()
            except ConnectionError:
                rest = b""
            upstream_closed.set_result((rest, time.monotonic() - started))

        server, port = await start_server(handler)
        async with running_proxy(port) as proxy:
            sock = socket.create_connection(("127.0.0.1", proxy.ports[0]))
            sock.sendall(PING)
            await asyncio.sleep(0.2)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST
            rest, waited = await asyncio.wait_for(upstream_closed, 5)
            sink = proxy.sink
        server.close()
        return rest, waited, sink

    rest, waited, sink = run(main(), loop_kind)
    assert rest == b""
    assert waited < 1.0
    assert len(sink.closed) == 1


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_slow_reader_keeps_buffers_bounded(loop_kind):
    """A server streams 64 MB to a client that does not read: the proxy stops reading instead of buffering."""
    total = 64 * 1024 * 1024
    block = b"\x00" * (1 << 20)

    async def main():
        sent = 0
        server_blocked = asyncio.Event()

        async def handler(reader, writer):
            nonlocal sent
            while sent < total:
                writer.write(block)
                sent += len(block)
                try:
                    await asyncio.wait_for(writer.drain(), 0.5)
                except TimeoutError:
                    server_blocked.set()  # the proxy stopped reading: backpressure reached the server
                    await writer.drain()
            writer.close()

        server, port = await start_server(handler)
        async with running_proxy(port) as proxy:
            sock = socket.create_connection(("127.0.0.1", proxy.ports[0]))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(b"\x00" * 8)  # any bytes: the proxy only needs the connection up
            await asyncio.wait_for(server_blocked.wait(), 20)
            (conn,) = list(proxy.connections)
            buffered = conn.transport.get_write_buffer_size()
            in_flight_at_block = sent
            # Now read everything slowly; every byte still arrives.
            sock.setblocking(False)
            got = 0
            loop = asyncio.get_running_loop()
            while got < total:
                chunk = await loop.sock_recv(sock, 1 << 16)
                if not chunk:
                    break
                got += len(chunk)
            sock.close()
        server.close()
        return buffered, in_flight_at_block, got

    buffered, in_flight_at_block, got = run(main(), loop_kind)
    print(f"proxy write buffer toward the stalled client: {buffered} bytes; server had sent {in_flight_at_block}")
    assert buffered <= WRITE_HIGH_WATER + (1 << 20)
    assert in_flight_at_block < total  # the server was blocked long before it could send everything
    assert got == total


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_upstream_connect_timeout_closes_client(loop_kind):
    """An upstream whose accept queue is full never completes the handshake: the connect times out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue; later SYNs are dropped
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.2)

        async def main():
            async with running_proxy(port, connect_timeout="0.5") as proxy:
                started = time.monotonic()
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
                writer.write(PING)
                try:
                    data = await asyncio.wait_for(reader.read(), 10)
                except ConnectionResetError:
                    data = b""
                elapsed = time.monotonic() - started
                writer.close()
                return data, elapsed, proxy.sink.upstream_errors

        data, elapsed, errors = run(main(), loop_kind)
    finally:
        for s in fillers:
            s.close()
        listener.close()
    assert data == b""
    assert [e.reason for e in errors] == ["timeout"]
    assert elapsed < 5  # the 0.5 s --connect-timeout fired, not the 10 s default
