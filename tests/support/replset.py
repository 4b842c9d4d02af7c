"""A scripted replica set (or a set of mongos routers) on one background event loop, for --upstream tests.

Each member is a ScriptedServer whose handler answers hello/isMaster with the set's configuration
(setName, hosts, primary, me, topologyVersion; streaming exhaust hellos for monitors that ask) and
serves a small shared in-memory CRUD store (insert, find, update, delete), so pymongo with
replicaSet=NAME works against it. `step_down(i)` makes member i the primary, `add_member()` starts a
new member and names it in every hello. Writes to a non-primary fail with NotWritablePrimary (10107),
as mongod's do, so the driver rediscovers and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import Counter
from typing import Any

import bson

from . import wire
from .scripted_server import MongoHandler, ScriptedConnection, ScriptedServer


class Member:
    """One scripted member: its server and the peers it saw."""

    def __init__(self, rs: ScriptedReplicaSet, index: int, port: int = 0) -> None:
        self.rs = rs
        self.index = index
        self.handler = MongoHandler(set_name=rs.set_name)
        self.server = ScriptedServer(self.serve, port=port)
        self.peers: list[tuple[str, int]] = []
        self.commands: Counter = Counter()
        self.arbiter = False
        self.removed = False
        self.streams = 0  # exhaust hello streams served (drivers' streaming monitors)

    @property
    def address(self) -> str:
        """host:port as the set names it."""
        return f"127.0.0.1:{self.server.port}"

    def hello(self, request: wire.Message, conn: ScriptedConnection) -> dict:
        """The member's hello reply: the set's configuration as this member sees it."""
        doc = self.handler.hello_reply(request, conn)
        rs = self.rs
        state = rs.state_of(self.index)
        legacy = (request.command_name or "").lower() == "ismaster"
        doc.pop("ismaster", None)
        doc.pop("isWritablePrimary", None)
        doc["ismaster" if legacy else "isWritablePrimary"] = state == "primary"
        if rs.mongos or self.removed:
            for k in ("setName", "hosts", "me", "secondary"):
                doc.pop(k, None)
            if rs.mongos:
                doc["msg"] = "isdbgrid"
            else:  # what mongod answers once it is no longer in the set's config
                doc.update(secondary=False, isreplicaset=True, info="Does not have a valid replica set config")
        else:
            doc.update(
                setName=rs.set_name,
                hosts=[m.address for m in rs.members if not m.arbiter and not m.removed],
                me=self.address,
                secondary=state == "secondary",
                setVersion=rs.version,
                topologyVersion={"processId": rs.process_ids[self.index], "counter": bson.Int64(rs.version)},
            )
            arbiters = [m.address for m in rs.members if m.arbiter]
            if arbiters:
                doc["arbiters"] = arbiters
            if self.arbiter:
                doc["arbiterOnly"] = True
            if rs.primary is not None:
                doc["primary"] = rs.members[rs.primary].address
            doc["$clusterTime"] = {
                "clusterTime": bson.Timestamp(1_700_000_000 + rs.version, 1),
                "signature": {"hash": b"\x00" * 20, "keyId": bson.Int64(0)},
            }
        return doc

    async def serve(self, conn: ScriptedConnection) -> None:
        """The connection loop: hello (streaming when asked), CRUD on the shared store, the rest canned."""
        self.peers.append(conn.peer)
        while True:
            request = await conn.read_message()
            if request is None:
                return
            name = (request.command_name or "").lower()
            self.commands[name] += 1
            doc = request.doc or {}
            if name in ("hello", "ismaster"):
                if request.msg is not None and request.msg.exhaust_allowed and "topologyVersion" in doc:
                    await self._stream(conn, request, doc)
                    return
                if "topologyVersion" in doc and "maxAwaitTimeMS" in doc:
                    await self.rs.wait_change(doc, doc["maxAwaitTimeMS"] / 1000)
                await conn.reply(request, self.hello(request, conn))
                continue
            reply = self.rs.crud(self, name, request)
            if reply is None:
                reply = await self.handler.respond(request, conn)
            if request.more_to_come or reply is None:
                continue
            await conn.reply(request, reply)

    async def _stream(self, conn: ScriptedConnection, request: wire.Message, doc: dict) -> None:
        """Exhaust hello: one reply per change (or maxAwaitTimeMS), each with moreToCome, chained by responseTo."""
        self.streams += 1
        response_to = request.request_id
        wait = doc.get("maxAwaitTimeMS", 10000) / 1000
        seen = doc.get("topologyVersion")
        eof = asyncio.ensure_future(conn.reader.read(1))  # the monitor closing its connection ends the stream
        change: asyncio.Future | None = None
        try:
            for _ in range(100_000):  # ends when the client goes away or the server stops
                change = asyncio.ensure_future(self.rs.wait_change({"topologyVersion": seen}, wait))
                await asyncio.wait((eof, change), return_when=asyncio.FIRST_COMPLETED)
                if eof.done():
                    return
                reply = self.hello(request, conn)
                seen = reply.get("topologyVersion")
                raw = conn.encode_reply(request, reply, flags=wire.MORE_TO_COME, compress=None, response_to=response_to)
                await conn.send_and_drain(raw)
                response_to = int.from_bytes(raw[4:8], "little", signed=True)
        finally:
            for task in (eof, change):
                if task is not None:
                    task.cancel()


class ScriptedReplicaSet:
    """`n` members named 127.0.0.1:PORT, member 0 primary; or, with mongos=True, `n` routers."""

    def __init__(self, n: int = 3, set_name: str = "rs0", *, mongos: bool = False, ports: tuple[int, ...] = ()) -> None:
        self.set_name = set_name
        self.mongos = mongos
        self.members: list[Member] = []
        self.process_ids: list[bson.ObjectId] = []
        self.primary: int | None = 0
        self.version = 1
        self.store: dict[str, list[dict]] = {}
        self.writes: list[tuple[int, str]] = []  # (member index, command) of each write served
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="scripted-replset", daemon=True)
        self._changed: asyncio.Event | None = None
        self._n = n
        self._ports = list(ports)

    # ---- lifecycle
    def start(self) -> ScriptedReplicaSet:
        """Start the loop and the members."""
        self._thread.start()
        self.call(self._init)
        for _ in range(self._n):
            self.add_member()
        return self

    async def _init(self) -> None:
        self._changed = asyncio.Event()

    def stop(self) -> None:
        """Stop every member and the loop; re-raise a handler error."""
        for m in self.members:
            with contextlib.suppress(Exception):
                self.call(m.server.astop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        for m in self.members:
            m.server.check()

    def __enter__(self) -> ScriptedReplicaSet:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def call(self, fn: Any, *args: Any, timeout: float = 10.0) -> Any:
        """Run fn(*args) (plain or coroutine function) on the set's loop."""

        async def run() -> Any:
            res = fn(*args)
            return await res if asyncio.iscoroutine(res) else res

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    # ---- the set's configuration
    @property
    def addresses(self) -> list[str]:
        """host:port of every member."""
        return [m.address for m in self.members]

    @property
    def seed_uri(self) -> str:
        """mongodb://first-member/?replicaSet=NAME (or the routers for mongos)."""
        if self.mongos:
            return "mongodb://" + ",".join(self.addresses) + "/"
        return f"mongodb://{self.members[0].address}/?replicaSet={self.set_name}"

    def state_of(self, index: int) -> str:
        """primary, secondary or arbiter."""
        if self.mongos:
            return "mongos"
        if self.members[index].arbiter:
            return "arbiter"
        return "primary" if index == self.primary else "secondary"

    def add_member(self, arbiter: bool = False) -> Member:
        """Start a member and name it in every hello from now on."""
        m = Member(self, len(self.members), self._ports.pop(0) if self._ports else 0)
        m.arbiter = arbiter
        self.process_ids.append(bson.ObjectId())
        self.call(m.server.astart)
        self.members.append(m)
        self._bump()
        return m

    def remove_member(self, index: int) -> None:
        """Take member `index` out of the set's config (it keeps running, as a removed mongod does)."""
        self.members[index].removed = True
        self._bump()

    def step_down(self, new_primary: int) -> None:
        """The primary steps down and member `new_primary` becomes primary."""
        self.primary = new_primary
        self._bump()

    def _bump(self) -> None:
        self.version += 1

        def notify() -> None:
            if self._changed is not None:
                self._changed.set()
                self._changed = asyncio.Event()

        self.loop.call_soon_threadsafe(notify)

    async def wait_change(self, doc: dict, timeout: float) -> None:
        """Wait until the topologyVersion in `doc` is stale, or `timeout` seconds."""
        tv = doc.get("topologyVersion") or {}
        if tv.get("counter") != self.version:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # ---- CRUD on the shared store
    def crud(self, member: Member, name: str, request: wire.Message) -> dict | None:
        """The reply to a CRUD command, or None for other commands."""
        doc = request.doc or {}
        if name not in ("insert", "find", "update", "delete"):
            return None
        coll = f"{doc.get('$db', 'test')}.{doc[request.command_name]}"
        is_write = name != "find"
        state = self.state_of(member.index)
        if state != "primary" and not self.mongos and (is_write or not _secondary_ok(doc)):
            code, codename = (10107, "NotWritablePrimary") if is_write else (13435, "NotPrimaryNoSecondaryOk")
            error = {"ok": 0.0, "errmsg": "not primary", "code": code, "codeName": codename}
            if is_write and "txnNumber" in doc:  # as mongod labels it, so the driver retries the write
                error["errorLabels"] = ["RetryableWriteError"]
            return error
        rows = self.store.setdefault(coll, [])
        if name == "insert":
            docs = (request.msg.sequence("documents") if request.msg else None) or doc.get("documents", [])
            rows.extend(docs)
            self.writes.append((member.index, name))
            return {"n": len(docs), "ok": 1.0}
        if name == "find":
            filt = doc.get("filter") or {}
            batch = [r for r in rows if all(r.get(k) == v for k, v in filt.items())]
            return {"cursor": {"firstBatch": batch, "id": bson.Int64(0), "ns": coll}, "ok": 1.0}
        ops = (request.msg.sequence(name + "s") if request.msg else None) or doc.get(name + "s", [])
        n = 0
        for op in ops:
            q = op.get("q") or {}
            hits = [r for r in rows if all(r.get(k) == v for k, v in q.items())]
            if name == "delete":
                for r in hits[: 1 if op.get("limit") else None]:
                    rows.remove(r)
                    n += 1
            else:
                for r in hits[: None if op.get("multi") else 1]:
                    r.update((op.get("u") or {}).get("$set", {}))
                    n += 1
        self.writes.append((member.index, name))
        return {"n": n, "nModified": n, "ok": 1.0} if name == "update" else {"n": n, "ok": 1.0}


def _secondary_ok(doc: dict) -> bool:
    pref = doc.get("$readPreference") or {}
    return pref.get("mode", "primary") != "primary"


def local_ports_of(pid: int) -> set[int]:
    """Local TCP ports of the sockets process `pid` holds (from /proc, IPv4 and IPv6)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(os.path.join(fd_dir, fd))
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[9] in inodes:
                    ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def main() -> None:
    """`python -m tests.support.replset N SETNAME`: run a set until stdin closes; print its addresses as JSON."""
    import json
    import sys

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    with ScriptedReplicaSet(n, sys.argv[2] if len(sys.argv) > 2 else "rs0") as rs:
        print(json.dumps(rs.addresses), flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
