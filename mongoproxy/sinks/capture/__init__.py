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

This package's one job is to be the recorder's public face: OPTIONS, create() and CaptureSink are
importable from `mongoproxy.sinks.capture` as before the split. Its modules, one job each (each imports
only those listed above it):
  state     limits, queue item kinds, one connection's record, every field of the recorder, its metrics
  messages  stream or hold each message; blank secrets, filter by namespace, pseudonymise (writer thread)
  files     open, rotate, summarise and finish files; a failed write; retention by age and total size
  writer    the writer thread: queued items in order, each connection a TCP flow in the current file
  sink      CaptureSink, the event-loop side: O(1) enqueueing, whole connections dropped under pressure
  options   --record and its companions, their parsers, and create()
"""

from __future__ import annotations

from mongoproxy.sinks.capture.files import FILE_PATTERN, RETENTION_CHECK_SECONDS, SUMMARY_SPACE
from mongoproxy.sinks.capture.messages import PREFIX_MAX
from mongoproxy.sinks.capture.options import OPTIONS, G, create, parse_duration, parse_size
from mongoproxy.sinks.capture.sink import CaptureSink
from mongoproxy.sinks.capture.state import (
    CLOSE,
    CUT,
    DATA,
    DEFAULT_MAX_BYTES,
    DEFAULT_QUEUE_BYTES,
    DEFAULT_ROTATE_SECONDS,
    DISK_RETRY_SECONDS,
    FLUSH_SECONDS,
    ITEM_OVERHEAD,
    MAX_TRACKED_REQUESTS,
    OPEN,
    UPSTREAM_ERROR,
    WRITER_POLL_SECONDS,
)

__all__ = [
    "CLOSE",
    "CUT",
    "CaptureSink",
    "DATA",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_QUEUE_BYTES",
    "DEFAULT_ROTATE_SECONDS",
    "DISK_RETRY_SECONDS",
    "FILE_PATTERN",
    "FLUSH_SECONDS",
    "G",
    "ITEM_OVERHEAD",
    "MAX_TRACKED_REQUESTS",
    "OPEN",
    "OPTIONS",
    "PREFIX_MAX",
    "RETENTION_CHECK_SECONDS",
    "SUMMARY_SPACE",
    "UPSTREAM_ERROR",
    "WRITER_POLL_SECONDS",
    "create",
    "parse_duration",
    "parse_size",
]
