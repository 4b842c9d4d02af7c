"""Gates: the hold-and-decide layer between a gated connection's sockets, installed only while a rule could match.

A gate replaces the connection's write function in one direction, so an
ungated connection runs the plain data path with no extra call. The request
gate holds each message's head until its first section is complete (bounded
by that section's size, never the whole message), decides once per command,
then forwards, delays or swallows the rest by length. The reply gate frames
replies by their headers (16 bytes held at most) so that a delay, a pace or
a reply the proxy built lands between messages, never inside one.

The observation tap is fed unchanged chunks as before: a swallowed request
is still seen by the tracker, and the proxy's own reply is handed to it as a
scanned message, so the command log, metrics and spans show the fault.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
from typing import Any

import bson

from mongoproxy._bson_parser import scan_body
from mongoproxy.faults import firstsection
from mongoproxy.faults.engine import client_ip
from mongoproxy.faults.valve import Valve
from mongoproxy.protocol import builders
from mongoproxy.protocol.commands import COLLECTION_COMMANDS, HELLO_COMMANDS
from mongoproxy.protocol.framing import Message
from mongoproxy.protocol.opcodes import HEADER, MORE_TO_COME, OP_COMPRESSED, OP_MSG, OP_QUERY

log = logging.getLogger("mongoproxy.faults")

_I32 = struct.Struct("<i")
MAX_TAGS = 1024
_OP_MSG_HEAD = 16 + 4 + 1 + 4  # header, flagBits, section kind, section length
_QUERY_PREFIX_MAX = 16 + 4 + 512 + 8 + 4  # header, flags, fullCollectionName (bounded), skip/return, doc length
COMPRESSED_HOLD_MAX = 1 << 20  # an OP_COMPRESSED request up to this size is held whole to read its command


class TaggingBus:
    """Stands in for the SinkBus on a gated connection: marks events of faulted requests with their rule."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus
        self.tags: dict[int, str] = {}

    def command(self, event: Any) -> None:
        rule = self.tags.pop(event.request_id, None)
        if rule is not None:
            event.fault = rule
        self.bus.command(event)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bus, name)


def install(engine: Any, client: Any) -> None:
    """Gate `client` (a server.ClientSide) when a live rule could match it; no-op when gated or not connected."""
    if client.closed or client.upstream is None or getattr(client, "fault_gate", None) is not None:
        return
    ip = client_ip(client.conn.client_host)
    app = client.conn.app_name or None
    if not engine.could_match(ip, app):
        return
    client.fault_gate = RequestGate(engine, client, ip, app)


class RequestGate:
    """The request direction of one gated connection, with its reply gate."""

    def __init__(self, engine: Any, client: Any, ip: Any, app: str | None) -> None:
        self.engine = engine
        self.client = client
        self.ip = ip
        self.app = app
        self.generation = engine.generation
        upstream = client.upstream
        # The writes in place (the transport's, or an --upstream listener's hello gate) are kept and restored.
        self._plain = (client._write_upstream, upstream._write_client)
        self.valve = Valve(client._write_upstream, self._block, self._unblock)
        self.replies = ReplyGate(client)
        self.bus = TaggingBus(client.tracker.bus)
        client.tracker.bus = self.bus
        self._head = bytearray()
        self._need = 16
        self._remaining = 0  # bytes of the current message still to forward or drop
        self._drop = False
        self._after: Any = None  # run once the current message's last byte is in
        self._synced = not client.requests.mid_message  # installed mid-message: wait for the next boundary
        self._dead = False  # not MongoDB framing: forward everything
        client._write_upstream = self.feed
        upstream._write_client = self.replies.feed

    def _block(self) -> None:
        self.client._block_reading("fault")

    def _unblock(self) -> None:
        self.client._unblock_reading("fault")

    # ---- teardown ----

    def _uninstall(self) -> bool:
        """Back to the plain data path when idle in both directions; True when done."""
        replies = self.replies
        if not (self.valve.idle and replies.at_boundary and replies.valve.idle and not self.bus.tags):
            return False
        client = self.client
        client._write_upstream, client.upstream._write_client = self._plain
        client.tracker.bus = self.bus.bus
        client.fault_gate = None
        return True

    def close(self) -> None:
        """The connection is closing: drop what is held."""
        self.valve.cancel()
        self.replies.valve.cancel()

    # ---- the request stream ----

    def feed(self, data: Any) -> None:
        """Stands in for upstream.transport.write on a gated connection."""
        if _passed_through(self, self.client.requests, data):
            return
        pos, n = 0, len(data)
        while pos < n:
            if self._remaining:
                take = min(self._remaining, n - pos)
                if not self._drop:
                    self.valve.send(data if take == n else data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._message_done()
                continue
            if not self._head and self.generation != self.engine.generation:
                self.generation = self.engine.generation
                if not self.engine.could_match(self.ip, self.app) and self._uninstall():
                    self.client._write_upstream(data[pos:] if pos else data)
                    return
            if not self._head and n - pos >= _OP_MSG_HEAD:
                # The usual case, an OP_MSG whose section header is in this chunk: aim at its end at once.
                length, _, _, opcode = HEADER.unpack_from(data, pos)
                if opcode == OP_MSG and data[pos + 20] == 0:
                    need = 21 + _I32.unpack_from(data, pos + 21)[0]
                    if _OP_MSG_HEAD < need <= length:
                        self._need = need
            take = min(self._need - len(self._head), n - pos)
            self._head += data[pos : pos + take]
            pos += take
            if len(self._head) == self._need:
                self._step()

    def _message_done(self) -> None:
        after, self._after = self._after, None
        if after is not None:
            # Runs after this chunk reached the tap, so the tracker already holds the request.
            asyncio.get_running_loop().call_soon(after)

    def _pass_head(self, length: int) -> None:
        head = bytes(self._head)
        self._head.clear()
        self._need = 16
        self.valve.send(head)
        self._remaining = length - len(head)
        self._drop = False
        if not self._remaining:
            self._message_done()

    def _step(self) -> None:
        head = self._head
        length, request_id, _, opcode = HEADER.unpack_from(head)
        if length < 16 or length > self.client.proxy.config.max_message_bytes:
            self._dead = True
            data = bytes(head)
            head.clear()
            self.valve.send(data)
            return
        if opcode == OP_MSG:
            if len(head) == 16:
                self._need = min(length, _OP_MSG_HEAD)
                if self._need > 16:
                    return
            elif len(head) == _OP_MSG_HEAD and head[20] == 0:
                doc_len = _I32.unpack_from(head, 21)[0]
                need = 21 + doc_len
                if 5 <= doc_len and need <= length and need > len(head):
                    self._need = need
                    return
            elif len(head) > _OP_MSG_HEAD:
                self._decide(length, request_id, opcode, bytes(head[21:]), head[16] & MORE_TO_COME)
                return
        elif opcode == OP_QUERY:
            if len(head) == 16:
                self._need = min(length, _QUERY_PREFIX_MAX)
                if self._need > 16:
                    return
            else:
                nul = head.find(b"\x00", 20)
                if nul > 0 and nul + 13 <= len(head):
                    start = nul + 9
                    doc_len = _I32.unpack_from(head, start)[0]
                    need = start + doc_len
                    if 5 <= doc_len and need <= length:
                        if need > len(head):
                            self._need = need
                            return
                        ns = bytes(head[20:nul]).decode("utf-8", "replace")
                        self._decide(length, request_id, opcode, bytes(head[start:need]), 0, ns)
                        return
        elif opcode == OP_COMPRESSED and length <= COMPRESSED_HOLD_MAX:
            # The first section is inside the compressed body: this message is held whole (bounded above).
            if len(head) == 16:
                self._need = length
                if length > 16:
                    return
            else:
                try:
                    found = firstsection.compressed_first_doc(bytes(head), self.client.proxy.config.max_message_bytes)
                except Exception:  # noqa: BLE001 - a body we cannot inflate is forwarded for the server to judge
                    found = None
                if found is not None:
                    original, doc, more, ns, inflated = found
                    self._decide(length, request_id, original, doc, more, ns, inflated)
                    return
        self._pass_head(length)  # another opcode, or not what it should be: forward

    def _decide(
        self,
        length: int,
        request_id: int,
        opcode: int,
        doc: bytes,
        more: int,
        ns: str = "",
        inflated: bytes | None = None,
    ) -> None:
        try:
            rule, command = self._match(opcode, doc, ns, length, not more, inflated)
        except Exception as exc:  # noqa: BLE001 - a request we cannot read (or a bug here) is forwarded as it is
            log.debug("connection %d: fault gate forwards a request it cannot read: %r", self.client.conn.id, exc)
            rule, command = None, True
        if rule is None:
            self._pass_head(length)
            return
        self._apply(rule, length, request_id, opcode, command)

    def _match(
        self, opcode: int, doc: bytes, ns: str, length: int, answerable: bool, inflated: bytes | None
    ) -> tuple[Any, bool]:
        body = bson.decode(doc)
        op = next(iter(body), "")
        command = True
        if opcode == OP_QUERY:
            db, _, coll = ns.partition(".")
            if coll != "$cmd":
                op, command = "query", False
            else:
                coll = ""
        else:
            db = body.get("$db", "") if isinstance(body.get("$db"), str) else ""
            coll = ""
        if command and op:
            first = body[op]
            if op == "getMore":
                first = body.get("collection")
            if isinstance(first, str) and op in COLLECTION_COMMANDS:
                coll = first
        if op.lower() in HELLO_COMMANDS and self.app is None:
            client_doc = body.get("client")
            app = client_doc.get("application", {}).get("name") if isinstance(client_doc, dict) else None
            self.app = app if isinstance(app, str) else ""
            self.generation = -1  # the app is known now: at the next message, check whether any rule still could match
        comment = body.get("comment")
        comment = comment if isinstance(comment, str) or comment is None else str(comment)

        def shape() -> str:
            if inflated is not None:  # the body of an OP_COMPRESSED request
                return firstsection.shape_hash(opcode, inflated, len(inflated), op)
            return firstsection.shape_hash(opcode, bytes(self._head[16:]), length - 16, op)

        return self.engine.decide(self.ip, self.app, op, db, coll, comment, shape, answerable), command

    def _apply(self, rule: Any, length: int, request_id: int, opcode: int, command: bool) -> None:
        action = rule.action
        self.bus.tags[request_id] = rule.name
        if len(self.bus.tags) > MAX_TAGS:
            del self.bus.tags[next(iter(self.bus.tags))]
        if action == "delay":
            seconds = (rule.ms + random.uniform(0, rule.jitter_ms)) / 1000.0
            if rule.where == "request":
                self.valve.wait(seconds)
            else:
                self.replies.delays[request_id] = seconds
            self._pass_head(length)
            return
        if action == "throttle":
            self.replies.throttles[request_id] = rule.bytes_per_second
            self._pass_head(length)
            return
        # The rest never forward the request: its bytes are swallowed by length.
        self._remaining = length - len(self._head)
        self._head.clear()
        self._need = 16
        self._drop = True
        client = self.client
        if action in ("error", "write_error"):
            reply_id = 0x7F000000 | (request_id & 0xFFFFFF)
            if opcode == OP_QUERY:
                reply = builders.query_error_reply(reply_id, request_id, rule.code, rule.errmsg, rule.labels, command)
            elif action == "error":
                reply = builders.error_reply(reply_id, request_id, rule.code, rule.errmsg, rule.labels)
            else:
                reply = builders.write_error_reply(reply_id, request_id, rule.code, rule.errmsg)
            self._after = lambda: self.replies.inject(reply)
        elif action == "close":

            def close() -> None:
                client.tracker.unanswered(request_id)
                client.close()

            if rule.after_ms:
                self._after = lambda: asyncio.get_running_loop().call_later(rule.after_ms / 1000.0, close)
            else:
                self._after = close
        else:  # blackhole: the request is gone and no reply will come; the client times out
            self._after = lambda: client.tracker.unanswered(request_id)
        if not self._remaining:
            self._message_done()


class ReplyGate:
    """The reply direction of a gated connection: frames by headers and applies delays, paces and injections."""

    def __init__(self, client: Any) -> None:
        self.client = client
        upstream = client.upstream
        self.valve = Valve(upstream._write_client, upstream.transport.pause_reading, self._resume_upstream)
        self.delays: dict[int, float] = {}
        self.throttles: dict[int, int] = {}
        self._pending: list[bytes] = []  # injected replies waiting for a message boundary
        self._head = bytearray()
        self._remaining = 0
        self._synced = not client.replies.mid_message
        self._dead = False

    def _resume_upstream(self) -> None:
        if not self.client.closed:
            self.client.upstream.transport.resume_reading()

    @property
    def at_boundary(self) -> bool:
        """Between two replies (or no longer framing)."""
        return self._dead or (self._synced and not self._remaining and not self._head and not self._pending)

    def inject(self, reply: bytes) -> None:
        """Send a reply the proxy built, between two upstream replies, and show it to the tracker."""
        if self.client.closed:
            return
        if self._dead or (self._synced and not self._remaining and not self._head):
            self._deliver(reply)
        else:
            self._pending.append(reply)

    def _deliver(self, reply: bytes) -> None:
        self.valve.send(reply)
        client = self.client
        length, request_id, response_to, opcode = HEADER.unpack_from(reply)
        msg = Message(length, request_id, response_to, opcode, time.monotonic_ns())
        msg.result = scan_body(opcode, True, memoryview(reply)[16:])
        client.tracker.on_reply(msg)

    def feed(self, data: Any) -> None:
        """Stands in for client.transport.write on a gated connection."""
        if _passed_through(self, self.client.replies, data):
            return
        n = len(data)
        if not (self.delays or self.throttles or self._pending or self._head):
            # Nothing to apply to any reply: follow the framing by lengths and write the chunk whole.
            end = self._remaining
            while end + 16 <= n:
                length = _I32.unpack_from(data, end)[0]
                if length < 16:
                    break
                end += length
            if end >= n:
                self._remaining = end - n
                self.valve.send(data)
                return
        pos = 0
        while pos < n:
            if self._remaining:
                take = min(self._remaining, n - pos)
                self.valve.send(data if take == n else data[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._boundary()
                continue
            take = min(16 - len(self._head), n - pos)
            self._head += data[pos : pos + take]
            pos += take
            if len(self._head) < 16:
                continue
            length, _, response_to, _ = HEADER.unpack_from(self._head)
            head = bytes(self._head)
            self._head.clear()
            if length < 16:
                self._dead = True
                self.valve.send(head)
                self.valve.send(data[pos:])
                return
            delay = self.delays.pop(response_to, None)
            if delay is not None:
                self.valve.wait(delay)
            rate = self.throttles.pop(response_to, None)
            if rate is not None:
                self.valve.pace(length, rate)
            self.valve.send(head)
            self._remaining = length - 16
            if not self._remaining:
                self._boundary()
        if not self._remaining and not self._head and self._pending:
            self._boundary()

    def _boundary(self) -> None:
        pending, self._pending = self._pending, []
        for reply in pending:
            self._deliver(reply)


def _passed_through(gate: Any, framer: Any, data: Any) -> bool:
    """The gates' common prologue: True when `data` was forwarded as is (the gate does not look at it).

    That is when the direction is not MongoDB framing (observation stopped, or a TLS stream passed through:
    what the gate held goes first, and the gate stays open for good), or while a gate installed mid-message
    waits for the next message boundary.
    """
    if gate._dead or framer.stopped or getattr(gate.client, "passthrough", False):
        if gate._head:
            gate.valve.send(bytes(gate._head))
            gate._head.clear()
        gate._dead = True
        gate.valve.send(data)
        return True
    if not gate._synced:
        if framer.mid_message:
            gate.valve.send(data)
            return True
        gate._synced = True
    return False
