"""A closed connection pair is freed by reference counting as it closes, not left to the cyclic gc.

Left as a reference cycle, each closed pair (protocols, scanners, tracker, transports: about 30 objects) waited for
a full collection, and a burst of 2,000 closed connections kept its memory (docs/hardening.md, fault survival).
The cyclic gc is disabled during each run, so a pair still alive at the end is one only a collection would free.
"""

import asyncio
import gc
import struct
import weakref

import bson
import pytest

from tests.support.inprocess import LOOP_KINDS, run, running_proxy
from tests.support.scripted_server import MongoHandler, ScriptedServer

PAIRS = 20


def op_msg(request_id: int, doc: dict) -> bytes:
    body = struct.pack("<I", 0) + b"\x00" + bson.encode(doc)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, 2013) + body


async def open_and_close(port: int, proxy, how: str) -> list[weakref.ref]:
    """PAIRS connections through the proxy, each closed as `how` says; weak references to their two protocols."""
    refs: list[weakref.ref] = []
    for i in range(PAIRS):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(op_msg(i + 1, {"ping": 1, "$db": "admin"}))
        head = await reader.readexactly(16)
        await reader.readexactly(int.from_bytes(head[:4], "little") - 16)
        (side,) = [c for c in proxy.connections if not any(r() is c for r in refs)]
        refs += [weakref.ref(side), weakref.ref(side.upstream)]
        del side
        if how == "mid-request":  # the client goes away inside a message: counted truncated, then freed alike
            writer.write(op_msg(100 + i, {"find": "c", "$db": "db"})[:30])
            await writer.drain()
        writer.close()
        await writer.wait_closed()
    for _ in range(200):  # bounded: both transports report connection_lost within a few loop turns
        if not proxy.connections and all(r() is None for r in refs):
            break
        await asyncio.sleep(0.01)
    return refs


@pytest.mark.parametrize("kind", LOOP_KINDS)
@pytest.mark.parametrize("how", ["after-reply", "mid-request"])
def test_closed_pairs_are_freed_without_the_cyclic_gc(kind, how):
    async def main():
        with ScriptedServer(MongoHandler()) as server:
            async with running_proxy(server.port) as proxy:
                refs = await open_and_close(proxy.ports[0], proxy, how)
                assert not proxy.connections
                alive = [type(r()).__name__ for r in refs if r() is not None]
                assert alive == [], f"{len(alive)} of {len(refs)} protocols of closed pairs still alive: {alive[:4]}"

    gc.collect()
    gc.disable()
    try:
        run(main(), kind)
    finally:
        gc.enable()
