"""The recorder's shared state: limits, queue item kinds, one connection's record (_Conn), counters and metrics."""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

from mongoproxy import redact
from mongoproxy.namespaces import NamespaceFilter
from mongoproxy.pcapng import PcapngWriter, TcpFlow

DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_ROTATE_SECONDS = 3600.0
DEFAULT_QUEUE_BYTES = 64 << 20
ITEM_OVERHEAD = 100  # bytes charged per queued chunk for the tuple and its references
WRITER_POLL_SECONDS = 0.02
FLUSH_SECONDS = 1.0
DISK_RETRY_SECONDS = 10.0
MAX_TRACKED_REQUESTS = 4096

DATA, OPEN, CLOSE, CUT, UPSTREAM_ERROR = range(5)


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


class CaptureState:
    """Every field of the recorder, set in one place; the layers above it (files, messages, writer, sink) add only behaviour.

    Ownership: fields marked "loop only" are written by the event loop, "writer only" by the writer thread.
    """

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

    def _once(self, key: str, msg: str, *args: Any, exc_info: Any = None) -> None:
        if key not in self._errors_logged:
            self._errors_logged.add(key)
            self._log.error(msg, *args, exc_info=exc_info)

    def _stats(self, key: str) -> None:
        self._file_stats[key] = self._file_stats.get(key, 0) + 1

    def _app_comment(self, c: _Conn) -> str:
        conn = c.conn
        app = c.app if c.app is not None else conn.app_name
        driver = c.driver or " ".join(x for x in (conn.driver_name, conn.driver_version) if x)
        text = f"mongoproxy connection {conn.id}: app " + (f'"{app}"' if app else "(none)")
        if driver:
            text += f", driver {driver}"
        return text


class _DiskCollector:
    """mongoproxy_capture_messages_dropped_total, _disk_errors_total{reason}, _files_deleted_total{reason}."""

    def __init__(self, sink: CaptureState) -> None:
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
