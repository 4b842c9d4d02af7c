"""The capture sink's event-loop side: O(1) enqueueing of each chunk, dropping whole connections under pressure."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from mongoproxy.sinks.capture.state import (
    CLOSE,
    CUT,
    DATA,
    DEFAULT_MAX_BYTES,
    DEFAULT_QUEUE_BYTES,
    DEFAULT_ROTATE_SECONDS,
    DISK_RETRY_SECONDS,
    ITEM_OVERHEAD,
    OPEN,
    UPSTREAM_ERROR,
    _Conn,
)
from mongoproxy.sinks.capture.writer import CaptureWriter


class CaptureSink(CaptureWriter):
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
        super().__init__(
            directory,
            max_bytes,
            rotate_seconds,
            namespaces,
            pseudonymise,
            queue_bytes,
            registry,
            max_message_bytes,
            logger,
            max_total_bytes,
            max_age_seconds,
            disk_retry_seconds,
        )
        self._thread = threading.Thread(target=self._run, name="mongoproxy-capture", daemon=True)
        if start:
            self._thread.start()

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
