"""The writer thread: takes queued items in order and turns each connection into a TCP flow in the current file."""

from __future__ import annotations

import ipaddress
import socket
import time

from mongoproxy.pcapng import TcpFlow
from mongoproxy.sinks.capture.files import RecordingFiles, _Paused
from mongoproxy.sinks.capture.messages import MessagePolicy, _Framer
from mongoproxy.sinks.capture.state import (
    CLOSE,
    CUT,
    DATA,
    FLUSH_SECONDS,
    ITEM_OVERHEAD,
    OPEN,
    UPSTREAM_ERROR,
    WRITER_POLL_SECONDS,
    _Conn,
)


class CaptureWriter(RecordingFiles, MessagePolicy):
    """The writer thread's loop and the connection flows it writes; never lets an error stop the thread."""

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
