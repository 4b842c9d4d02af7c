"""The reply gate of an --upstream listener, sans-io: hold a hello reply until complete, rewrite it, forward it.

Requests are watched (never held) for hello/isMaster commands; a reply whose responseTo names one of
them, or a later reply of the same exhaust stream, is held until complete (at most `max_hello_bytes`),
re-encoded by protocol.hello and written. Every other reply is written at once, unchanged. Only the
bytes of a reply header (at most 15) wait for the next chunk, so that the header can be read whole.
State per direction is O(1): a header buffer, one held hello reply, a bounded set of request ids.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from mongoproxy.protocol import hello
from mongoproxy.protocol.commands import HELLO_COMMANDS
from mongoproxy.protocol.opcodes import OP_MSG, OP_QUERY, OP_REPLY

HELLO_NAMES = frozenset(name.encode() for name in HELLO_COMMANDS)
REQUEST_PREFIX = 256  # bytes of each request kept to read its command name
MAX_TRACKED = 128  # hello request ids (and exhaust reply ids) remembered per connection
DEFAULT_MAX_HELLO_BYTES = 64 * 1024


def command_name(prefix: bytes) -> bytes | None:
    """The lower-case command name of an OP_MSG or OP_QUERY request from its first bytes; None if unknown."""
    if len(prefix) < 16:
        return None
    op = struct.unpack_from("<i", prefix, 12)[0]
    if op == OP_MSG:
        if len(prefix) < 26 or prefix[20] != 0:
            return None
        start = 26
    elif op == OP_QUERY:
        nul = prefix.find(b"\x00", 20)
        if nul < 0:
            return None
        start = nul + 1 + 8 + 5  # skip, return, document length, element type
    else:
        return None
    end = prefix.find(b"\x00", start)
    return prefix[start:end].lower() if end > start else None


class RequestWatch:
    """Frames the client's requests and notes the ids of hello/isMaster commands in `ids`."""

    def __init__(self, ids: OrderedDict) -> None:
        self.ids = ids
        self._buf = bytearray()  # the current request's first bytes (up to REQUEST_PREFIX)
        self._left = 0  # bytes of the current request not yet seen
        self._noted = False  # the current request's name was read
        self.stopped = False

    def feed(self, data: bytes) -> None:
        """Observe one chunk of the request direction."""
        pos, n = 0, len(data)
        while pos < n and not self.stopped:
            if self._left and len(self._buf) >= 16:
                take = min(self._left, n - pos)
                room = REQUEST_PREFIX - len(self._buf)
                if room > 0:
                    self._buf += data[pos : pos + min(room, take)]
                pos += take
                self._left -= take
            else:
                take = min(16 - len(self._buf), n - pos)
                self._buf += data[pos : pos + take]
                pos += take
                if len(self._buf) < 16:
                    return
                length = struct.unpack_from("<i", self._buf)[0]
                if length < 16:
                    self.stopped = True  # not the wire protocol: stop watching, rewriting nothing
                    return
                self._left = length - 16
            if self._left == 0 or len(self._buf) >= REQUEST_PREFIX:
                self._note()

    def _note(self) -> None:
        buf = self._buf
        if len(buf) >= 16 and not self._noted:
            if command_name(bytes(buf)) in HELLO_NAMES:
                remember(self.ids, struct.unpack_from("<i", buf, 4)[0])
            self._noted = True
        if self._left == 0:
            self._buf = bytearray()
            self._noted = False


def remember(ids: OrderedDict, request_id: int) -> None:
    """Add an id to the bounded set, forgetting the oldest past MAX_TRACKED."""
    ids[request_id] = None
    if len(ids) > MAX_TRACKED:
        ids.popitem(last=False)


class ReplyGate:
    """Writes replies through `write`, rewriting hello replies with `swap` (see protocol.hello.make_swap)."""

    def __init__(
        self,
        ids: OrderedDict,
        write: Callable[[bytes], Any],
        swap: Callable[[str], str],
        on_rewritten: Callable[[], None],
        on_error: Callable[[str, str], None],
        max_hello_bytes: int = DEFAULT_MAX_HELLO_BYTES,
    ) -> None:
        self.ids = ids
        self.write = write
        self.swap = swap
        self.on_rewritten = on_rewritten
        self.on_error = on_error
        self.max_hello_bytes = max_hello_bytes
        self._hdr = bytearray()
        self._left = 0  # bytes of a passed-through reply still to come
        self._hold: bytearray | None = None  # the hello reply being held
        self._need = 0  # its total length
        self.stopped = False  # after a malformed header: plain forwarding from then on

    def feed(self, data: bytes) -> None:
        """Forward one chunk of the reply direction (all of it, possibly rewritten)."""
        if self.stopped:
            self.write(data)
            return
        pos, n = 0, len(data)
        run = 0  # start of the pending pass-through run in data
        while pos < n:
            if self._left:
                take = min(self._left, n - pos)
                pos += take
                self._left -= take
                continue
            if self._hold is not None:
                take = min(self._need - len(self._hold), n - pos)
                self._hold += data[pos : pos + take]
                pos += take
                run = pos
                if len(self._hold) == self._need:
                    held, self._hold = bytes(self._hold), None
                    self._release(held)
                continue
            # At a message boundary. Fast path: a whole header of a reply that is no hello stays in the run.
            if not self._hdr and n - pos >= 16:
                length, _, response_to, op = hello.HEADER.unpack_from(data, pos)
                if response_to not in self.ids and length >= 16:
                    self._left = length - 16
                    pos += 16
                    continue
            # Otherwise flush the pass-through run, then read the header on its own.
            if run < pos:
                self.write(data[run:pos])
            take = min(16 - len(self._hdr), n - pos)
            self._hdr += data[pos : pos + take]
            pos += take
            run = pos
            if len(self._hdr) < 16:
                return  # the rest of the header comes with the next chunk
            hdr, self._hdr = bytes(self._hdr), bytearray()
            length, _, response_to, op = hello.HEADER.unpack(hdr)
            if length < 16:
                self.stopped = True
                self.write(hdr + data[pos:])
                return
            if response_to in self.ids:
                if op not in (OP_MSG, OP_REPLY):
                    self.on_error("hello_compressed", f"hello reply in opcode {op}: forwarded unchanged")
                elif length > self.max_hello_bytes:
                    self.on_error("hello_too_large", f"hello reply of {length} bytes: forwarded unchanged")
                else:
                    self._hold = bytearray(hdr)
                    self._need = length
                    if length == 16:
                        self._hold = None
                        self._release(hdr)
                    continue
            self.write(hdr)
            self._left = length - 16
        if run < n:
            self.write(data[run:])

    def _release(self, message: bytes) -> None:
        response_to = struct.unpack_from("<i", message, 8)[0]
        op = struct.unpack_from("<i", message, 12)[0]
        if op == OP_MSG and len(message) >= 20 and struct.unpack_from("<I", message, 16)[0] & hello.MORE_TO_COME:
            # Exhaust: the next reply answers this one (the spec) or the original request (some servers).
            remember(self.ids, struct.unpack_from("<i", message, 4)[0])
        else:
            self.ids.pop(response_to, None)
        try:
            out, changes = hello.rewrite_reply(message, self.swap)
        except Exception as exc:  # noqa: BLE001 - nothing may raise into the pump: forward it as it came, counted
            self.on_error("hello_malformed", f"hello reply not rewritten: {exc}")
            self.write(message)
            return
        if changes:
            self.on_rewritten()
            self.write(out)
        else:
            self.write(message)

    @property
    def mid_message(self) -> bool:
        """True while part of a reply is buffered here."""
        return bool(self._hdr) or self._hold is not None
