"""Recording: what passes through the proxy, written as pcapng (`--record DIR`), replayable with `mongoproxy replay`.

The event loop only appends (connection, direction, chunk, time) to a bounded
queue; a writer thread frames messages, blanks secrets, optionally filters by
namespace and pseudonymises, synthesizes TCP segments and writes files.
Invariants:
- on_data is O(1) and never blocks: a dict lookup, a length check, a deque append.
- A recorded connection has no holes: when the queue would pass its byte
  limit, that connection stops being recorded from that point on (its flow is
  closed with a comment), and while the queue stays above half the limit new
  connections are not recorded at all. Both are counted in `dropped`,
  mongoproxy_capture_dropped_total and the file's section comment.
- Secrets are never written: hello/auth/user commands and their replies are
  held whole in the writer and their SCRAM payloads, passwords and
  speculativeAuthenticate blanked (mongoproxy.redact). Other messages stream
  through the writer without being buffered, unless --record-redact or
  --record-ns needs each whole message.
- Files are written as NAME.pcapng.part (mode 0600) and renamed to NAME.pcapng
  once complete; they rotate by size and by age. The format is documented in
  docs/capture-replay.md.
- The disk: finished files older than --record-max-age, then the oldest past
  --record-max-total-bytes, are deleted. A write that fails (ENOSPC, EIO...)
  stops recording: the unfinished .part file is deleted (no orphan), the
  connections being recorded are cut and counted, the error is counted, and
  recording resumes for new connections after a pause. Forwarding never notices.
- Each file's summary counts what was dropped while it was written (connections
  cut or not recorded, messages left out, disk errors); a summary that could not
  be written hands its counts on to the next file.
"""

from __future__ import annotations

import collections
import datetime
import errno
import ipaddress
import logging
import os
import re
import socket
import struct
import threading
import time
from typing import Any

from mongoproxy import __version__, redact
from mongoproxy.config import Option, non_negative_float
from mongoproxy.errors import ConfigError, DecodeError
from mongoproxy.events import wall_ns
from mongoproxy.namespaces import NamespaceFilter, ns_list_parser
from mongoproxy.pcapng import PcapngWriter, TcpFlow
from mongoproxy.protocol import compression
from mongoproxy.protocol.commands import HELLO_COMMANDS, SENSITIVE_COMMANDS, is_sensitive
from mongoproxy.protocol.framing import Framer
from mongoproxy.protocol.opcodes import (
    COMPRESSED_PREFIX,
    HEADER,
    HEADER_SIZE,
    MORE_TO_COME,
    OP_COMPRESSED,
    OP_MSG,
    OP_QUERY,
)

G = "recording"
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_ROTATE_SECONDS = 3600.0
DEFAULT_QUEUE_BYTES = 64 << 20
ITEM_OVERHEAD = 100  # bytes charged per queued chunk for the tuple and its references
WRITER_POLL_SECONDS = 0.02
FLUSH_SECONDS = 1.0
DISK_RETRY_SECONDS = 10.0
RETENTION_CHECK_SECONDS = 10.0
FILE_PATTERN = re.compile(r"^mongoproxy-\d{8}T\d{6}\.\d{6}Z-p\d+-\d{4,}\.pcapng$")  # finished recordings
SUMMARY_SPACE = 1024
PREFIX_MAX = 512  # request bytes the writer looks at to decide whether a message carries secrets
MAX_TRACKED_REQUESTS = 4096

DATA, OPEN, CLOSE, CUT, UPSTREAM_ERROR = range(5)
_UNDECIDED, _STREAM, _HOLD = range(3)
_DROP = "\0drop"  # request-tracking value: the request was filtered out, so is its reply

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
}


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(flag: str):
    """Seconds: 3600, 90m, 12h, 7d."""

    def parse(value: Any) -> float:
        text = str(value).strip().lower()
        digits = text.rstrip("smhd")
        unit = text[len(digits) :]
        try:
            seconds = float(digits) * _DURATION_UNITS[unit]
        except (ValueError, KeyError):
            raise ConfigError(f"{flag} {value!r} is not a duration: give seconds or e.g. 90m, 12h, 7d") from None
        if not 0 < seconds < float("inf"):
            raise ConfigError(f"{flag} must be positive, got {value!r}")
        return seconds

    return parse


def parse_size(flag: str):
    """A byte count: 1000000, 100MB, 64MiB, 1G."""

    def parse(value: Any) -> int:
        text = str(value).strip().lower().replace("_", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits) :].strip()
        try:
            number = float(digits)
        except ValueError:
            raise ConfigError(f"{flag} {value!r} is not a size: give bytes, e.g. 100000000, 100MB or 64MiB") from None
        if unit not in _SIZE_UNITS:
            raise ConfigError(f"{flag} {value!r}: unknown unit {unit!r}; use B, KB, MB, GB, KiB, MiB or GiB")
        n = int(number * _SIZE_UNITS[unit])
        if n <= 0:
            raise ConfigError(f"{flag} must be positive, got {value!r}")
        return n

    return parse


OPTIONS: list[Option] = [
    Option(
        "record",
        ("--record",),
        "record the traffic as pcapng files in this directory (created if missing); "
        "replay them with `mongoproxy replay`, open them with Wireshark",
        str,
        None,
        metavar="DIR",
        group=G,
    ),
    Option(
        "record_max_bytes",
        ("--record-max-bytes",),
        "start a new file once a file reaches this size, e.g. 500MB",
        parse_size("--record-max-bytes"),
        DEFAULT_MAX_BYTES,
        metavar="N",
        group=G,
    ),
    Option(
        "record_rotate_seconds",
        ("--record-rotate-seconds",),
        "start a new file once a file is this old; 0 rotates by size only",
        non_negative_float("--record-rotate-seconds"),
        DEFAULT_ROTATE_SECONDS,
        metavar="S",
        group=G,
    ),
    Option(
        "record_max_total_bytes",
        ("--record-max-total-bytes",),
        "keep the recordings in the directory under this total, deleting the oldest finished files first "
        "(each file is then at most half of it), e.g. 10GB",
        parse_size("--record-max-total-bytes"),
        None,
        metavar="N",
        group=G,
    ),
    Option(
        "record_max_age",
        ("--record-max-age",),
        "delete finished recordings older than this, e.g. 7d or 12h",
        parse_duration("--record-max-age"),
        None,
        metavar="AGE",
        group=G,
    ),
    Option(
        "record_ns",
        ("--record-ns",),
        "record only commands on these namespaces (db.collection, db.* or db, "
        "comma-separated) and their replies; handshake and auth are always kept",
        ns_list_parser("--record-ns"),
        (),
        metavar="NS",
        group=G,
    ),
    Option(
        "record_redact",
        ("--record-redact",),
        "in the recording only, replace literal values by keyed "
        "hashes of the same type and size (equal values stay equal); the forwarded bytes are untouched",
        switch=True,
        default=False,
        group=G,
    ),
    Option(
        "record_queue_bytes",
        ("--record-queue-bytes",),
        "memory the recording queue may hold; when the "
        "writer falls further behind, whole connections stop being recorded (counted in "
        "mongoproxy_capture_dropped_total)",
        parse_size("--record-queue-bytes"),
        DEFAULT_QUEUE_BYTES,
        metavar="N",
        group=G,
    ),
]


class _Paused(OSError):
    """No file may be opened yet: recording is paused after a disk failure."""


class _Conn:
    """One connection's recording state. `recording` is the only field both threads write (to False only)."""

    __slots__ = (
        "conn",
        "recording",
        "done",
        "flow",
        "framers",
        "established",
        "comment_pending",
        "file_seq",
        "requests",
        "app",
        "driver",
        "server_ip",
    )

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.recording = True  # the event loop enqueues its data while True
        self.done = False  # writer: the flow is closed in the file; later items are ignored
        self.flow: TcpFlow | None = None
        self.framers: tuple = ()
        self.established = False
        self.comment_pending = [True, True]  # [server->client, client->server] first data segment
        self.file_seq = 0
        self.requests: dict[int, tuple[str, int]] = {}  # request id -> (command, original request id)
        self.app: str | None = None
        self.driver = ""
        self.server_ip = ""

    def track(self, request_id: int, command: str, original: int) -> None:
        requests = self.requests
        requests[request_id] = (command, original)
        if len(requests) > MAX_TRACKED_REQUESTS:
            del requests[next(iter(requests))]


class _Framer(Framer):
    """Frames one direction in the writer thread: streams ordinary messages, holds sensitive ones whole.

    feed() returns pieces (obj, start, end, ts) to write, in stream order; adjacent slices of one chunk
    are merged so that a chunk normally stays one segment. A compressed request is decided on the first
    PREFIX_MAX bytes its body inflates to (compression.peek, bounded), so a compressed auth command is
    held and blanked like a plain one.
    """

    __slots__ = ("sink", "c", "is_reply", "cur", "cur_len", "msg_len", "state", "header", "_out", "_ts")

    def __init__(self, sink: CaptureSink, c: _Conn, is_reply: bool) -> None:
        super().__init__(sink.max_message_bytes)
        self.sink = sink
        self.c = c
        self.is_reply = is_reply
        self.cur: list = []
        self.cur_len = 0
        self.msg_len = 0
        self.state = _UNDECIDED
        self.header: tuple = ()
        self._out: list = []
        self._ts = 0

    def feed(self, data: bytes, ts: int) -> list:
        out = self._out = []
        self._ts = ts
        self._frame(data, ts)
        self._out = []
        return out

    # ---- framer hooks ----

    def _on_header_bytes(self, data: Any, start: int, end: int, now_ns: int) -> None:
        self.cur.append((data, start, end, self._ts))
        self.cur_len += end - start

    def _on_bad_length(self, length: int, request_id: int, opcode: int) -> None:
        # Not MongoDB framing: everything from this header on passes as is (zeroed with --record-redact).
        pending, self.cur = self.cur, []
        for piece in pending:
            self._raw(*piece)

    def _on_dead(self, data: Any, start: int, end: int) -> None:
        self._raw(data, start, end, self._ts)

    def _on_header(self, length: int, request_id: int, response_to: int, opcode: int) -> None:
        self.msg_len = length
        self.header = (request_id, response_to, opcode)
        self._decide_now()

    def _on_body(self, data: Any, start: int, end: int) -> None:
        if self.state == _STREAM:
            _append(self._out, data, start, end, self._ts)
        else:
            self.cur.append((data, start, end, self._ts))
        self.cur_len += end - start
        if self.state == _UNDECIDED:
            self._decide_now()

    def _on_end(self, now_ns: int) -> None:
        if self.state == _UNDECIDED:
            self.state = _HOLD  # the whole message is here and still undecided: check it whole
        if self.state == _HOLD:
            self._finish_held(self._out)
        self.cur = []
        self.cur_len = self.msg_len = 0
        self.state = _UNDECIDED

    def _decide_now(self) -> None:
        decision = self._decide()
        if decision == _STREAM:
            for piece in self.cur:
                _append(self._out, *piece)
            self.cur = []
            self.state = _STREAM
        elif decision == _HOLD:
            self.state = _HOLD

    def _raw(self, obj: Any, start: int, end: int, ts: int) -> None:
        """Bytes that are not MongoDB framing: kept as they are, or zeroed with --record-redact."""
        if self.sink.pseudonymise:
            obj, start, end = bytes(end - start), 0, end - start
        _append(self._out, obj, start, end, ts)

    def _prefix(self, limit: int) -> bytes:
        parts = []
        got = 0
        for obj, s, e, _ in self.cur:
            take = min(e - s, limit - got)
            parts.append(obj[s : s + take])
            got += take
            if got >= limit:
                break
        return b"".join(parts)

    def _decide(self) -> int | None:
        sink = self.sink
        if sink.hold_all:
            return _HOLD
        if self.is_reply:
            return _HOLD if self.header[1] in self.c.requests else _STREAM
        opcode = self.header[2]
        if opcode == OP_COMPRESSED:
            prefix = self._inflated_prefix()
            if prefix is None:
                return _HOLD if self.cur_len >= PREFIX_MAX else None
        elif opcode in (OP_MSG, OP_QUERY):
            prefix = self._prefix(PREFIX_MAX)
        else:
            return _STREAM
        fk = redact.first_key(prefix)
        if fk is None:
            return _HOLD if self.cur_len >= PREFIX_MAX else None
        key, complete = fk
        if not complete or is_sensitive(key):
            return _HOLD
        return _STREAM

    def _inflated_prefix(self) -> bytes | None:
        """The message a compressed request wraps, as far as its first PREFIX_MAX compressed bytes inflate."""
        raw = self._prefix(PREFIX_MAX)
        if len(raw) < HEADER_SIZE + COMPRESSED_PREFIX.size:
            return None
        original, size, compressor = COMPRESSED_PREFIX.unpack_from(raw, HEADER_SIZE)
        request_id, response_to, _ = self.header
        try:
            body = compression.peek(compressor, memoryview(raw)[HEADER_SIZE + COMPRESSED_PREFIX.size :], PREFIX_MAX)
        except DecodeError:
            return b""  # cannot be checked: first_key() finds no name, so the message is held
        return HEADER.pack(HEADER_SIZE + size, request_id, response_to, original) + body

    def _finish_held(self, out: list) -> None:
        pieces = self.cur
        msg = b"".join(obj[s:e] for obj, s, e, _ in pieces)
        try:
            result = self.sink.process(self.c, self.is_reply, msg)
        except (DecodeError, struct.error, IndexError, ValueError) as exc:
            # A message that cannot be checked for secrets is not recorded.
            self.sink._once(
                "held",
                "recording: a message on connection %d could not be parsed and is left out "
                "(further ones are left out silently): %r",
                self.c.conn.id,
                exc,
            )
            result = None
        if result is None:
            return
        if len(result) == len(msg):
            at = 0
            for _obj, s, e, ts in pieces:
                _append(out, result, at, at + (e - s), ts)
                at += e - s
        else:
            _append(out, result, 0, len(result), pieces[-1][3])


def _append(out: list, obj: Any, start: int, end: int, ts: int) -> None:
    if start == end:
        return
    if out:
        last = out[-1]
        if last[0] is obj and last[2] == start and last[3] == ts:
            out[-1] = (obj, last[1], end, ts)
            return
    out.append((obj, start, end, ts))


class CaptureSink:
    """Records forwarded bytes as pcapng through a bounded queue and a writer thread."""

    name = "capture"

    def __init__(
        self,
        directory: str,
        max_bytes: int = DEFAULT_MAX_BYTES,
        rotate_seconds: float = DEFAULT_ROTATE_SECONDS,
        namespaces: tuple[str, ...] = (),
        pseudonymise: bool = False,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        registry: Any = None,
        max_message_bytes: int = 48_000_000,
        logger: logging.Logger | None = None,
        start: bool = True,
        max_total_bytes: int | None = None,
        max_age_seconds: float | None = None,
        disk_retry_seconds: float = DISK_RETRY_SECONDS,
    ) -> None:
        self.directory = directory
        self.max_total_bytes = max_total_bytes
        self.max_age_seconds = max_age_seconds
        self.disk_retry_seconds = disk_retry_seconds
        if max_total_bytes:  # so that deleting older files can always bring the total under the cap
            max_bytes = min(max_bytes, max(max_total_bytes // 2, 1))
        self.max_bytes = max_bytes
        self.rotate_ns = int(rotate_seconds * 1e9)
        self.namespaces = tuple(namespaces)
        self._ns_match = NamespaceFilter(self.namespaces) if self.namespaces else None
        self.pseudonymise = pseudonymise
        self.hold_all = pseudonymise or bool(self.namespaces)
        self.max_message_bytes = max_message_bytes
        self.queue_limit = queue_bytes
        self._resume_bytes = queue_bytes // 2
        self._log = logger or logging.getLogger("mongoproxy.capture")
        self._rewriter = redact.Rewriter(pseudonymise)
        # Event-loop side. deque.append/popleft are atomic; the byte counts each have one writer thread.
        self._q: collections.deque = collections.deque()
        self._conns: dict[int, _Conn] = {}
        self._enqueued = 0  # loop only
        self._dequeued = 0  # writer only
        self._pressure = False
        self._closed = False
        self._loop_dropped = 0  # loop only
        self._writer_dropped = 0  # writer only
        self._fail_until_ns = 0
        # Writer side.
        self._active: dict[int, _Conn] = {}
        self._writer: PcapngWriter | None = None
        self._file: Any = None
        self._part_path = ""
        self._path = ""
        self._file_seq = 0
        self._file_opened_ns = 0
        self._file_stats: dict[str, int] = {}
        self._reported = (0, 0, 0)  # (connections, messages, disk errors) counted in finished summaries
        self.messages_dropped = 0  # writer only: held messages left out because they could not be checked
        self.disk_errors: dict[str, int] = {}  # writer only: errno name -> failures
        self.files_deleted: dict[str, int] = {}  # writer only: "max_age"/"max_total_bytes" -> files deleted
        self._next_retention_ns = 0
        self._last_flush_ns = 0
        self._resolved: dict[str, str] = {}
        self._errors_logged: set[str] = set()
        self.files: list[str] = []  # finished files, in order
        self.bytes_recorded = 0
        self._metrics(registry)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mongoproxy-capture", daemon=True)
        if start:
            self._thread.start()

    def _metrics(self, registry: Any) -> None:
        self._m_dropped = self._m_bytes = self._m_files = None
        if registry is None:
            return
        from prometheus_client import Counter, Gauge

        registry.register(_DiskCollector(self))

        self._m_dropped = Counter(
            "mongoproxy_capture_dropped",
            "Connections not recorded, or cut short, because the recorder fell behind or the disk failed",
            registry=registry,
        )
        self._m_bytes = Counter("mongoproxy_capture_bytes", "Payload bytes written to recordings", registry=registry)
        self._m_files = Counter("mongoproxy_capture_files", "Recording files completed", registry=registry)
        queued = Gauge("mongoproxy_capture_queue_bytes", "Bytes waiting in the recording queue", registry=registry)
        queued.set_function(lambda: max(0, self._enqueued - self._dequeued))

    @property
    def dropped(self) -> int:
        """Connections not recorded or cut short (queue full, disk failure)."""
        return self._loop_dropped + self._writer_dropped

    @property
    def queued_bytes(self) -> int:
        """Bytes (with per-item overhead) waiting for the writer."""
        return self._enqueued - self._dequeued

    # ---- event loop side ----

    def on_connection_open(self, conn: Any) -> None:
        """Start recording the connection unless the writer is behind or failing."""
        if self._closed:
            return
        if self._pressure:
            if self._enqueued - self._dequeued > self._resume_bytes:
                self._drop_count()
                return
            self._pressure = False
        if self._fail_until_ns and time.monotonic_ns() < self._fail_until_ns:
            self._drop_count()
            return
        c = _Conn(conn)
        self._conns[conn.id] = c
        self._q.append((OPEN, c, conn.opened_ns or time.monotonic_ns()))

    def on_data(self, conn: Any, from_client: bool, data: bytes, now_ns: int) -> None:
        """O(1): queue the chunk, or stop recording this connection when the queue is full."""
        c = self._conns.get(conn.id)
        if c is None or not c.recording:
            return
        n = len(data) + ITEM_OVERHEAD
        if self._enqueued - self._dequeued + n > self.queue_limit:
            c.recording = False
            self._pressure = True
            self._drop_count()
            self._q.append((CUT, c, now_ns))
            return
        self._enqueued += n
        self._q.append((DATA, c, from_client, data, now_ns))

    def on_connection_close(self, conn: Any) -> None:
        c = self._conns.pop(conn.id, None)
        if c is not None and c.recording:
            self._q.append((CLOSE, c, conn.closed_ns or time.monotonic_ns()))

    def on_upstream_error(self, event: Any) -> None:
        c = self._conns.get(event.connection.id)
        if c is not None and c.recording:
            self._q.append((UPSTREAM_ERROR, c, event.at_ns, event.reason, event.detail))

    def _drop_count(self) -> None:
        self._loop_dropped += 1
        if self._m_dropped is not None:
            self._m_dropped.inc()

    def start(self) -> None:
        """Start the writer thread (when created with start=False)."""
        if not self._thread.is_alive():
            self._thread.start()

    def close(self, timeout: float = 15.0) -> None:
        """Write what is queued (up to `timeout` seconds), close open flows and finish the file."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if not self._thread.is_alive() and self._thread.ident is None:
            self._thread.start()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._log.warning(
                "recording writer still busy after %gs at exit; %s is left unfinished",
                timeout,
                self._part_path or "the current file",
            )

    # ---- writer thread ----

    def _run(self) -> None:
        q = self._q
        stop = self._stop
        while True:
            if not q:
                if stop.is_set() and not q:
                    break
                self._idle()
                stop.wait(WRITER_POLL_SECONDS)
                continue
            item = q.popleft()
            try:
                self._handle(item)
            except _Paused:
                self._writer_cut(item[1])  # its connection opened before the failure; it is not recorded
            except OSError as exc:
                self._disk_failed(exc)
            except Exception as exc:  # noqa: BLE001 - a writer bug cuts one connection, never the thread
                self._once(
                    "bug",
                    "recording failed for connection %d (it is cut short; further failures are only counted): %r",
                    item[1].conn.id,
                    exc,
                    exc_info=exc,
                )
                self._writer_cut(item[1])
            finally:
                if item[0] == DATA:
                    self._dequeued += len(item[3]) + ITEM_OVERHEAD
        try:
            now = time.monotonic_ns()
            for c in list(self._active.values()):
                self._close_flow(c, now, f"mongoproxy: the recording stopped while connection {c.conn.id} was open")
            self._finish_file()
        except _Paused:
            pass
        except OSError as exc:
            self._disk_failed(exc)
        except Exception as exc:  # noqa: BLE001
            self._log.error("cannot finish the recording %s: %r", self._part_path, exc, exc_info=exc)

    def _once(self, key: str, msg: str, *args: Any, exc_info: Any = None) -> None:
        if key not in self._errors_logged:
            self._errors_logged.add(key)
            self._log.error(msg, *args, exc_info=exc_info)

    def _idle(self) -> None:
        self._enforce_retention()
        if self._writer is None:
            return
        now = time.monotonic_ns()
        try:
            if self.rotate_ns and now - self._file_opened_ns >= self.rotate_ns:
                self._finish_file()
            elif now - self._last_flush_ns >= FLUSH_SECONDS * 1e9:
                self._file.flush()
                self._last_flush_ns = now
        except OSError as exc:
            self._disk_failed(exc)

    def _handle(self, item: tuple) -> None:
        kind, c = item[0], item[1]
        if c.done:
            return
        if kind == DATA:
            _, _, from_client, data, ts = item
            framer = c.framers[from_client]
            pieces = framer.feed(data, ts)
            for obj, s, e, t in pieces:
                self._emit(c, from_client, memoryview(obj)[s:e], t)
            if self.rotate_ns and self._writer is not None and ts - self._file_opened_ns >= self.rotate_ns:
                self._finish_file()
        elif kind == OPEN:
            self._open(c, item[2])
        elif kind == CLOSE:
            self._close_flow(c, item[2], "")
        elif kind == CUT:
            self._close_flow(
                c,
                item[2],
                f"mongoproxy: recording of connection {c.conn.id} stops here: the "
                f"recorder fell behind (queue over {self.queue_limit} bytes); the connection went on "
                "but the rest of it is not recorded",
                cut=True,
            )
        elif kind == UPSTREAM_ERROR:
            _, _, ts, reason, detail = item
            if not c.established and c.flow is not None:
                ((p_ts, parts),) = c.flow.refuse(ts)
                self._write_packet(
                    c, p_ts, parts, f"mongoproxy: upstream {c.conn.server} unreachable ({reason}): {detail}"
                )
                c.established = True
            self._active.pop(c.conn.id, None)
            c.done = True

    def _open(self, c: _Conn, ts: int) -> None:
        conn = c.conn
        c.server_ip = self._resolve(conn.upstream_host)
        c.flow = TcpFlow(conn.client_host or "0.0.0.0", conn.client_port, c.server_ip, conn.upstream_port)
        c.framers = (_Framer(self, c, True), _Framer(self, c, False))  # indexed by from_client
        self._active[conn.id] = c
        via = f"listener port {conn.listen_port}" + (", transparent" if conn.transparent else "")
        resolved = f" ({conn.upstream_host} resolved to {c.server_ip})" if c.server_ip != conn.upstream_host else ""
        comment = f"mongoproxy connection {conn.id}: client {conn.client} -> server {conn.server}{resolved} via {via}"
        if conn.client_tls or conn.upstream_tls:  # the wire was encrypted: these are the decrypted messages
            sides = " and ".join(n for n, on in (("client", conn.client_tls), ("server", conn.upstream_tls)) if on)
            comment += f"; TLS on the {sides} side, recorded decrypted"
        ((p_ts, parts),) = c.flow.syn(ts)
        self._write_packet(c, p_ts, parts, comment, fresh=True)
        self._stats("connections")

    def _establish(self, c: _Conn, ts: int) -> None:
        c.established = True
        conn = c.conn
        at = conn.opened_ns + conn.upstream_connect_ns if conn.upstream_connect_ns else ts
        for p_ts, parts in c.flow.accept(min(at, ts)):
            self._write_packet(c, p_ts, parts)

    def _emit(self, c: _Conn, from_client: bool, data: memoryview, ts: int) -> None:
        if not c.established:
            self._establish(c, ts)
        first = True
        for p_ts, parts in c.flow.data(from_client, data, ts):
            comment = ""
            if first and c.comment_pending[from_client]:
                c.comment_pending[from_client] = False
                comment = self._app_comment(c)
            first = False
            self._write_packet(c, p_ts, parts, comment)
        self.bytes_recorded += len(data)
        if self._m_bytes is not None:
            self._m_bytes.inc(len(data))

    def _close_flow(self, c: _Conn, ts: int, comment: str, cut: bool = False) -> None:
        if c.done or c.flow is None:
            c.done = True
            return
        if not c.established:
            self._establish(c, ts)
        packets = c.flow.close(ts)
        for i, (p_ts, parts) in enumerate(packets):
            self._write_packet(c, p_ts, parts, comment if i == 0 else "")
        c.done = True
        self._active.pop(c.conn.id, None)
        if cut:
            self._stats("cut")

    def _writer_cut(self, c: _Conn) -> None:
        if c.recording:
            c.recording = False
            self._writer_dropped += 1
            if self._m_dropped is not None:
                self._m_dropped.inc()
        try:
            if not c.done and self._writer is not None:
                self._close_flow(
                    c,
                    time.monotonic_ns(),
                    f"mongoproxy: recording of connection {c.conn.id} stops here after an internal error",
                    cut=True,
                )
        except Exception:  # noqa: BLE001
            pass
        c.done = True
        self._active.pop(c.conn.id, None)

    def _app_comment(self, c: _Conn) -> str:
        conn = c.conn
        app = c.app if c.app is not None else conn.app_name
        driver = c.driver or " ".join(x for x in (conn.driver_name, conn.driver_version) if x)
        text = f"mongoproxy connection {conn.id}: app " + (f'"{app}"' if app else "(none)")
        if driver:
            text += f", driver {driver}"
        return text

    def _resolve(self, host: str) -> str:
        if not host:
            return "0.0.0.0"
        got = self._resolved.get(host)
        if got is not None:
            return got
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
            got = host
        except ValueError:
            try:
                got = str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
            except (OSError, IndexError):
                got = "0.0.0.0"
        self._resolved[host] = got
        return got

    # ---- messages (called by framers for held messages) ----

    def process(self, c: _Conn, is_reply: bool, msg: bytes) -> bytes | None:
        """A held message as it is to be recorded, or None to leave it out (counted when it cannot be parsed)."""
        try:
            return self._process(c, is_reply, msg)
        except (DecodeError, struct.error, IndexError, ValueError):
            self.messages_dropped += 1  # the framer leaves it out and logs it once
            raise

    def _process(self, c: _Conn, is_reply: bool, msg: bytes) -> bytes | None:
        _, request_id, response_to, op_code = HEADER.unpack_from(msg)
        plain = compression.uncompressed(msg, self.max_message_bytes) if op_code == OP_COMPRESSED else msg
        flags = (
            struct.unpack_from("<I", plain, 16)[0] if len(plain) >= 20 and HEADER.unpack_from(plain)[3] == OP_MSG else 0
        )
        if is_reply:
            entry = c.requests.get(response_to)
            if entry is None:
                command, original = "", 0
            else:
                command, original = entry
                if flags & MORE_TO_COME:
                    c.track(request_id, command, original)
                    if response_to != original:
                        c.requests.pop(response_to, None)
                else:
                    c.requests.pop(response_to, None)
                    c.requests.pop(original, None)
            if command == _DROP:
                return None
        else:
            command, database, collection = self._attribute(plain)
            if (
                self._ns_match is not None
                and command not in SENSITIVE_COMMANDS
                and not self._ns_match(database, collection)
            ):
                if not flags & MORE_TO_COME:
                    c.track(request_id, _DROP, request_id)
                return None
            if command in HELLO_COMMANDS and c.app is None:
                self._handshake(c, plain)
            if (command in SENSITIVE_COMMANDS or self.hold_all) and not flags & MORE_TO_COME:
                c.track(request_id, command, request_id)
        if command not in SENSITIVE_COMMANDS and not self.pseudonymise:
            return msg
        return bytes(self._rewriter.message(bytearray(plain), is_reply, command))

    def _attribute(self, plain: bytes) -> tuple[str, str, str]:
        from mongoproxy import _bson_parser
        from mongoproxy.tracker import COLLECTION_COMMANDS

        op_code = HEADER.unpack_from(plain)[3]
        try:
            r = _bson_parser.scan_body(op_code, False, memoryview(plain)[16:])
        except (DecodeError, ValueError):
            return "", "", ""
        command = r.command or ""
        if command:
            coll = r.collection or "" if command in COLLECTION_COMMANDS else ""
            return command.lower(), r.database or "", coll
        db, _, coll = (r.namespace or "").partition(".")
        return "", db, coll

    def _handshake(self, c: _Conn, plain: bytes) -> None:
        from mongoproxy import _bson_parser

        try:
            r = _bson_parser.scan_body(HEADER.unpack_from(plain)[3], False, memoryview(plain)[16:])
        except (DecodeError, ValueError):
            return
        c.app = r.app_name or ""
        c.driver = " ".join(x for x in (r.driver_name, r.driver_version) if x)

    # ---- files ----

    def _write_packet(self, c: _Conn, ts: int, parts: list, comment: str = "", fresh: bool = False) -> None:
        if self._writer is None:
            self._open_file()
        if fresh:
            c.file_seq = self._file_seq
        elif c.file_seq != self._file_seq:
            c.file_seq = self._file_seq
            self._stats("continued")
            note = (
                f"mongoproxy connection {c.conn.id} ({c.conn.client} -> {c.conn.server}) continues from the "
                f"previous file"
            )
            app = self._app_comment(c).split(": ", 1)[1]
            comment = f"{note}; {app}" + (f"; {comment}" if comment else "")
        self._writer.write_packet(wall_ns(ts), parts, comment)
        if self._writer.bytes_written >= self.max_bytes:
            self._finish_file()

    def _stats(self, key: str) -> None:
        self._file_stats[key] = self._file_stats.get(key, 0) + 1

    def _open_file(self) -> None:
        if self._fail_until_ns and time.monotonic_ns() < self._fail_until_ns:
            raise _Paused("recording is paused after a disk failure")
        self._file_seq += 1
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"mongoproxy-{stamp}-p{os.getpid()}-{self._file_seq:04d}.pcapng"
        self._path = os.path.join(self.directory, name)
        self._part_path = self._path + ".part"
        # 0600: a recording holds the application's data.
        fd = os.open(self._part_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        f = open(fd, "wb", buffering=1 << 20)
        comment = (
            f"mongoproxy {__version__} recording. Each proxied connection is a TCP flow between the real "
            "client and server addresses; segments are synthesized from the forwarded bytes at the time the "
            "proxy forwarded them. Secrets (SCRAM payloads, passwords) are blanked"
            + ("; literal values are pseudonymised (--record-redact)" if self.pseudonymise else "")
            + (f"; only namespaces {','.join(self.namespaces)} (--record-ns)" if self.namespaces else "")
            + ". See docs/capture-replay.md."
        )
        try:
            self._writer = PcapngWriter(
                f,
                comment=comment,
                application=f"mongoproxy {__version__}",
                interface_name="mongoproxy",
                interface_description="connections through mongoproxy, client <-> upstream",
                summary_space=SUMMARY_SPACE,
            )
        except BaseException:
            f.close()
            raise
        self._file = f
        self._file_opened_ns = self._last_flush_ns = time.monotonic_ns()
        self._file_stats = {}
        self._log.info("recording to %s", self._part_path)

    def _counts(self) -> tuple[int, int, int]:
        return self.dropped, self.messages_dropped, sum(self.disk_errors.values())

    def _summary(self, w: PcapngWriter, counts: tuple[int, int, int]) -> str:
        st = self._file_stats
        # Since the last summary that was written: a file lost to a disk failure hands its counts on.
        conns, messages, disk = (now - before for now, before in zip(counts, self._reported))
        text = (
            f"mongoproxy summary: {w.packets} packets; {st.get('connections', 0)} connection(s) started in this "
            f"file, {st.get('continued', 0)} continued from the previous one. "
        )
        if conns:
            text += (
                f"{conns} connection(s) were not recorded or were cut short, because the recorder fell behind "
                f"(queue limit {self.queue_limit} bytes) or the disk failed; a cut connection ends with a comment "
                "saying so. "
            )
        if messages:
            text += f"{messages} message(s) were left out because they could not be checked for secrets. "
        if disk:
            text += f"{disk} disk error(s) stopped the recording for a while; the file being written was deleted. "
        if not (conns or messages or disk):
            text += "No connection was dropped; no message was left out."
        elif not messages:
            text += "No recorded connection has a hole."
        return text.rstrip()

    def _finish_file(self) -> None:
        w, f = self._writer, self._file
        if w is None:
            return
        self._writer = self._file = None
        counts = self._counts()
        try:
            w.finish_summary(self._summary(w, counts))
            f.close()
        except OSError:
            try:
                f.close()
            except OSError:
                pass
            raise
        os.replace(self._part_path, self._path)
        self._reported = counts
        self.files.append(self._path)
        if self._m_files is not None:
            self._m_files.inc()
        self._enforce_retention(force=True)
        self._log.info("recording %s finished (%d packets, %d bytes)", self._path, w.packets, w.bytes_written)

    def _disk_failed(self, exc: OSError) -> None:
        reason = errno.errorcode.get(exc.errno or 0, "error").lower()
        self.disk_errors[reason] = self.disk_errors.get(reason, 0) + 1
        self._log.error(
            "recording to %s failed (%s): recording pauses for %gs; the connections being recorded "
            "are cut short and counted in mongoproxy_capture_dropped_total",
            self.directory,
            exc.strerror or exc,
            self.disk_retry_seconds,
        )
        self._fail_until_ns = time.monotonic_ns() + int(self.disk_retry_seconds * 1e9)
        for c in list(self._active.values()):
            c.done = True
            if c.recording:
                c.recording = False
                self._writer_dropped += 1
                if self._m_dropped is not None:
                    self._m_dropped.inc()
        self._active.clear()
        f, self._writer, self._file = self._file, None, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        if self._part_path:
            # An unfinished file cannot be read to its end; deleting it frees the space that failed.
            try:
                os.unlink(self._part_path)
                self._log.error("the unfinished recording %s was deleted", self._part_path)
            except FileNotFoundError:
                pass
            except OSError as err:
                self._log.error("cannot delete the unfinished recording %s: %s", self._part_path, err.strerror)
        self._enforce_retention(force=True)

    # ---- retention ----

    def _enforce_retention(self, force: bool = False) -> None:
        """Delete finished files past --record-max-age, then the oldest past --record-max-total-bytes."""
        if not (self.max_total_bytes or self.max_age_seconds):
            return
        now_ns = time.monotonic_ns()
        if not force and now_ns < self._next_retention_ns:
            return
        self._next_retention_ns = now_ns + int(RETENTION_CHECK_SECONDS * 1e9)
        files = []
        try:
            with os.scandir(self.directory) as it:
                for e in it:
                    if FILE_PATTERN.match(e.name):
                        try:
                            st = e.stat()
                        except OSError:
                            continue
                        files.append((st.st_mtime, e.name, st.st_size))
        except OSError as exc:
            self._once("retention", "cannot list %s to apply retention: %s", self.directory, exc.strerror)
            return
        files.sort()
        now = time.time()
        total = sum(size for _, _, size in files) + (self._writer.bytes_written if self._writer is not None else 0)
        for mtime, name, size in files:
            if self.max_age_seconds and now - mtime > self.max_age_seconds:
                why = "max_age"
            elif self.max_total_bytes and total > self.max_total_bytes:
                why = "max_total_bytes"
            else:
                continue
            try:
                os.unlink(os.path.join(self.directory, name))
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._once("retention-unlink", "cannot delete the old recording %s: %s", name, exc.strerror)
                continue
            total -= size
            self.files_deleted[why] = self.files_deleted.get(why, 0) + 1
            self._log.info(
                "recording %s deleted (%s)",
                name,
                "older than --record-max-age" if why == "max_age" else "over --record-max-total-bytes",
            )


class _DiskCollector:
    """mongoproxy_capture_messages_dropped_total, _disk_errors_total{reason}, _files_deleted_total{reason}."""

    def __init__(self, sink: CaptureSink) -> None:
        self._sink = sink

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        sink = self._sink
        yield CounterMetricFamily(
            "mongoproxy_capture_messages_dropped",
            "Messages left out of a recorded connection because they could not be checked for secrets.",
            value=sink.messages_dropped,
        )
        disk = CounterMetricFamily(
            "mongoproxy_capture_disk_errors",
            "Failed writes to the recording directory (recording pauses, forwarding goes on), by errno.",
            labels=["reason"],
        )
        for reason, n in sorted({"enospc": 0, **sink.disk_errors}.items()):
            disk.add_metric([reason], n)
        yield disk
        deleted = CounterMetricFamily(
            "mongoproxy_capture_files_deleted",
            "Finished recordings deleted by --record-max-age or --record-max-total-bytes.",
            labels=["reason"],
        )
        for reason in ("max_age", "max_total_bytes"):
            deleted.add_metric([reason], sink.files_deleted.get(reason, 0))
        yield deleted

    def describe(self):
        from prometheus_client.core import CounterMetricFamily

        return [
            CounterMetricFamily("mongoproxy_capture_messages_dropped", ""),
            CounterMetricFamily("mongoproxy_capture_disk_errors", "", labels=["reason"]),
            CounterMetricFamily("mongoproxy_capture_files_deleted", "", labels=["reason"]),
        ]


def create(config: Any, ctx: Any) -> CaptureSink | None:
    """A CaptureSink when --record DIR is given; ConfigError when the directory cannot be used."""
    directory = getattr(config, "record", None)
    if not directory:
        sources = getattr(config, "sources", {})
        given = [o.flag for o in OPTIONS[1:] if sources.get(o.dest, "default") != "default"]
        if given:
            raise ConfigError(f"{', '.join(given)} need(s) --record DIR: add --record with a directory to write to")
        return None
    directory = os.path.abspath(os.path.expanduser(str(directory)))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"--record {directory} is a file: give a directory for the recordings")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"--record {directory}: cannot create the directory ({exc.strerror}); create it or choose another path"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--record {directory}: the directory is not writable; fix its permissions or choose another path"
        )
    logger = getattr(ctx, "logger", None)
    return CaptureSink(
        directory,
        max_bytes=config.record_max_bytes,
        rotate_seconds=config.record_rotate_seconds,
        namespaces=tuple(config.record_ns or ()),
        pseudonymise=bool(config.record_redact),
        queue_bytes=config.record_queue_bytes,
        registry=getattr(ctx, "registry", None),
        max_message_bytes=getattr(config, "max_message_bytes", 48_000_000),
        logger=logger.getChild("capture") if logger is not None else None,
        max_total_bytes=getattr(config, "record_max_total_bytes", None),
        max_age_seconds=getattr(config, "record_max_age", None),
    )
