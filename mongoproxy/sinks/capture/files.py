"""The recording files on disk: open, rotate, summarise and finish them; a failed write; retention by age and total size."""

from __future__ import annotations

import datetime
import errno
import os
import re
import time

from mongoproxy import __version__
from mongoproxy.events import wall_ns
from mongoproxy.pcapng import PcapngWriter
from mongoproxy.sinks.capture.state import CaptureState, _Conn

RETENTION_CHECK_SECONDS = 10.0
FILE_PATTERN = re.compile(r"^mongoproxy-\d{8}T\d{6}\.\d{6}Z-p\d+-\d{4,}\.pcapng$")  # finished recordings
SUMMARY_SPACE = 1024


class _Paused(OSError):
    """No file may be opened yet: recording is paused after a disk failure."""


class RecordingFiles(CaptureState):
    """Writes packets to the current file, in the writer thread; rotates, finishes and deletes files."""

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
