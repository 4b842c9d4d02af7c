"""The command log: one line per command, as text (coloured on a terminal) or JSON lines.

The event loop only filters and enqueues; a writer thread formats and
writes. A full queue drops the event and counts it in `dropped`, so a slow
disk or terminal never slows the proxy. Field names of the JSON form are a
stable contract, documented in docs/command-log.md and
docs/command-log.schema.json.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, TextIO

from mongoproxy import querylog
from mongoproxy.config import Option, non_negative_float
from mongoproxy.errors import ConfigError
from mongoproxy.events import duration_ms, wall_ns
from mongoproxy.namespaces import NamespaceFilter, ns_list_parser

QUEUE_SIZE = 10000
# The writer drains the queue this often (and at once on close): the event loop never signals it.
WRITER_POLL_SECONDS = 0.02
# Without --slow-ms, text lines of commands at least this slow are coloured yellow.
DEFAULT_SLOW_COLOR_MS = 100.0

_RED, _YELLOW, _RESET = "\x1b[31m", "\x1b[33m", "\x1b[0m"


def parse_format(value: Any) -> str:
    """text or json."""
    v = str(value).strip().lower()
    if v not in ("text", "json"):
        raise ConfigError(f"--log-format {value!r} is not valid: use text or json")
    return v


def _items(value: Any) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(x).strip() for x in items if str(x).strip()]


def parse_ops(value: Any) -> tuple[str, ...]:
    """`find,update` (only these) and/or `!hello` (all but these)."""
    ops = _items(value)
    for op in ops:
        if not op.lstrip("!"):
            raise ConfigError(f"--log-ops {value!r}: empty command name; give e.g. find,update or !hello,!ping")
    return tuple(ops)


G = "command log"
OPTIONS: list[Option] = [
    Option(
        "log_commands",
        ("--log-commands",),
        "log one line per command (to stderr unless --log-file)",
        switch=True,
        default=False,
        group=G,
    ),
    Option(
        "log_mongo_messages",
        ("--log-mongo-messages",),
        "same as --log-commands (the Rust mongoproxy's name)",
        switch=True,
        default=False,
        group=G,
    ),
    Option(
        "log_format",
        ("--log-format",),
        "command log format: text or json (one JSON object per line, see docs/command-log.md)",
        parse_format,
        "text",
        metavar="FORMAT",
        group=G,
    ),
    Option(
        "log_file",
        ("--log-file",),
        "append the command log to this file instead of stderr (implies --log-commands)",
        str,
        None,
        metavar="PATH",
        group=G,
    ),
    Option(
        "slow_ms",
        ("--slow-ms",),
        "log only commands that took at least this many milliseconds (implies --log-commands)",
        non_negative_float("--slow-ms"),
        None,
        metavar="MS",
        group=G,
    ),
    Option(
        "log_ops",
        ("--log-ops",),
        "log only these commands, comma-separated (e.g. find,update); !name excludes one (e.g. !hello,!ping)",
        parse_ops,
        (),
        metavar="OPS",
        group=G,
    ),
    Option(
        "log_ns",
        ("--log-ns",),
        "log only these namespaces, comma-separated: db.collection, db.* or db",
        ns_list_parser("--log-ns"),
        (),
        metavar="NS",
        group=G,
    ),
    Option(
        "log_query",
        ("--log-query",),
        "add each command's body with every literal replaced by ? and a shape hash (implies --log-commands)",
        switch=True,
        default=False,
        group=G,
    ),
    Option(
        "no_redact",
        ("--no-redact",),
        "with --log-query and in the web view's command stream, show literal values (credentials are still hidden)",
        switch=True,
        default=False,
        group=G,
    ),
]


def enabled(config: Any) -> bool:
    """Whether the config asks for a command log."""
    return bool(
        getattr(config, "log_commands", False)
        or getattr(config, "log_mongo_messages", False)
        or getattr(config, "log_file", None)
        or getattr(config, "slow_ms", None) is not None
        or getattr(config, "log_query", False)
    )


def _iso(mono_ns: int, digits: int) -> str:
    ns = wall_ns(mono_ns)
    secs, frac = divmod(ns, 1_000_000_000)
    frac_text = f"{frac:09d}"[:digits]
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac_text}Z"


class CommandLogSink:
    """Filters on the event loop, formats and writes on a writer thread; drops (and counts) when behind."""

    name = "commandlog"

    def __init__(
        self,
        stream: TextIO,
        fmt: str = "text",
        slow_ms: float | None = None,
        ops: Iterable[str] = (),
        namespaces: Iterable[str] = (),
        log_query: bool = False,
        show_values: bool = False,
        color: bool | None = None,
        queue_size: int = QUEUE_SIZE,
        owns_stream: bool = False,
        logger: logging.Logger | None = None,
        path: str | None = None,
    ) -> None:
        self.stream = stream
        self.path = path  # the file to reopen on reload() (log rotation); None for stderr
        self._reopen = threading.Event()
        self.fmt = fmt
        self.slow_ms = slow_ms
        self._slow_ns = None if slow_ms is None else int(slow_ms * 1e6)
        self._color_slow_ns = int((DEFAULT_SLOW_COLOR_MS if slow_ms is None else slow_ms) * 1e6)
        ops = tuple(ops)
        include = {o.lower() for o in ops if not o.startswith("!")}
        self._ops_include = frozenset(include) if include else None
        self._ops_exclude = frozenset(o[1:].lower() for o in ops if o.startswith("!"))
        self._ns = NamespaceFilter(tuple(namespaces))
        self.log_query = log_query
        self.show_values = show_values
        if color is None:
            color = fmt == "text" and _isatty(stream) and "NO_COLOR" not in os.environ
        self.color = color
        self._owns_stream = owns_stream
        self._log = logger or logging.getLogger("mongoproxy.commandlog")
        # deque.append/popleft are atomic: the loop appends, the writer pops, and neither takes a lock.
        self._queue: collections.deque = collections.deque()
        self._queue_size = queue_size
        self._stop = threading.Event()
        self._queue_dropped = 0  # written by the event loop only
        self._lost = 0  # written by the writer thread only: lines that failed to format or write
        self.written = 0
        self._warned = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mongoproxy-commandlog", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Commands not logged: queue full, or a write that failed."""
        return self._queue_dropped + self._lost

    # ---- event loop side ----

    def on_command(self, event: Any) -> None:
        """Apply the filters and hand the event to the writer thread."""
        if event.awaitable and (self._ops_include is None or event.op.lower() not in self._ops_include):
            return  # a driver's monitoring long poll, shown only when --log-ops names it
        if self._ops_include is not None or self._ops_exclude:
            op = event.op.lower()
            if op in self._ops_exclude or (self._ops_include is not None and op not in self._ops_include):
                return
        if self._ns and not self._ns(event.database, event.collection):
            return
        if self._slow_ns is not None:
            d = event.duration_ns
            if not d or d < self._slow_ns:
                return
        q = self._queue
        if len(q) < self._queue_size:
            q.append(event)
        else:
            self._queue_dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (up to `timeout` seconds), then stop the writer."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join(timeout)
        if self._owns_stream:
            try:
                self.stream.close()
            except OSError:
                pass

    def reload(self) -> None:
        """SIGHUP: reopen the log file (after logrotate moved it); done by the writer before its next write."""
        if self.path is not None:
            self._reopen.set()

    # ---- writer thread ----

    def _reopen_file(self) -> None:
        self._reopen.clear()
        if self.path is None:
            return
        try:
            stream = _open_append(self.path)
        except OSError as exc:
            self._log.warning("cannot reopen the command log %s (%s): writing on to the old file", self.path, exc)
            return
        old, self.stream = self.stream, stream
        try:
            old.close()
        except (OSError, ValueError):
            pass
        self._log.info("command log %s reopened", self.path)

    def _run(self) -> None:
        q = self._queue
        stop = self._stop
        while True:
            stopping = stop.wait(WRITER_POLL_SECONDS)
            if self._reopen.is_set():
                self._reopen_file()
            while q:
                lines: list[str] = []
                while q and len(lines) < 1024:
                    event = q.popleft()
                    try:
                        lines.append(self.format(event))
                    except Exception as exc:  # noqa: BLE001 - a bad event must not stop the log
                        self._lost += 1
                        self._warn("cannot format a command log line", exc)
                if lines:
                    try:
                        self.stream.write("".join(lines))
                        self.stream.flush()
                        self.written += len(lines)
                    except (OSError, ValueError) as exc:
                        self._lost += len(lines)
                        self._warn("cannot write the command log", exc)
            if stopping:
                return

    def _warn(self, what: str, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            self._log.error("%s (further failures are only counted in mongoproxy_events_dropped_total): %s", what, exc)

    # ---- formatting (writer thread) ----

    def format(self, event: Any) -> str:
        """One log line, newline included."""
        if self.fmt == "json":
            return json.dumps(self.record(event), separators=(",", ":"), ensure_ascii=False) + "\n"
        return self.text(event) + "\n"

    def _query(self, event: Any) -> tuple[str | None, str | None]:
        if not self.log_query:
            return None, None
        q = querylog.event_query(event, self.show_values)
        return (q.text, q.shape) if q is not None else (None, None)

    def _errmsg(self, event: Any) -> str:
        msg = event.errmsg or ""
        return msg if self.show_values else querylog.redact_errmsg(msg)

    def record(self, event: Any) -> dict:
        """The JSON log object (field names are a documented contract)."""
        conn = event.connection
        reply = event.reply
        duration = event.duration_ns
        has_reply = bool(event.reply_last_ns)
        query, shape = self._query(event)
        wcode = getattr(reply, "write_error_code", None) if reply is not None else None
        return {
            "time": _iso(event.request_first_ns, 6),
            "connection_id": conn.id,
            "client": conn.client,
            "server": conn.server,
            "app": conn.app_name,
            "replicaset": conn.replica_set,
            "member_state": conn.member_state or None,  # set only on --upstream listeners (topology.MemberSpec)
            "client_cert_subject": conn.client_cert_subject or None,
            "db": event.database,
            "collection": event.collection,
            "ns": _ns(event),
            "op": event.op,
            "request_id": event.request_id,
            "duration_ms": duration_ms(duration) if has_reply else None,
            "slow": bool(has_reply and duration >= self._color_slow_ns),
            "documents_returned": event.documents_returned,
            "documents_changed": event.documents_changed,
            "request_bytes": event.request_size,
            "reply_bytes": event.reply_size if has_reply else None,
            "ok": event.ok,
            "code": event.code,
            "code_name": (
                querylog.code_name(event.code_name, event.code) if event.code is not None else event.code_name or None
            ),
            "errmsg": self._errmsg(event) or None,
            "write_errors": (reply.write_errors or 0) if reply is not None else None,
            "write_error_code": wcode,
            "write_error_code_name": querylog.code_name(reply.write_error_code_name, wcode)
            if reply is not None and wcode is not None
            else None,
            "write_concern_error_code": getattr(reply, "write_concern_error_code", None) if reply is not None else None,
            "write_concern_error_code_name": querylog.code_name(
                reply.write_concern_error_code_name, reply.write_concern_error_code
            )
            if reply is not None and reply.write_concern_error_code is not None
            else None,
            "failed": bool(event.failed),
            "cursor_id": event.cursor_id,
            "comment": (getattr(event.request, "comment", None) if event.request is not None else None),
            "unacknowledged": bool(event.more_to_come_request),
            "exhaust": bool(event.exhaust),
            "decode_error": event.decode_error or None,
            "query": query,
            "shape": shape,
            "fault": event.fault or None,
        }

    def text(self, event: Any) -> str:
        """The human-readable line, coloured when writing to a terminal."""
        conn = event.connection
        has_reply = bool(event.reply_last_ns)
        duration = event.duration_ns
        parts = [
            _iso(event.request_first_ns, 3),
            conn.client,
            "app=" + _word(conn.app_name),
            _ns(event) or "-",
            event.op,
        ]
        parts.append(f"{duration / 1e6:.2f}ms" if has_reply else "-")
        if event.documents_returned is not None:
            parts.append(f"returned={event.documents_returned}")
        if event.documents_changed is not None:
            parts.append(f"changed={event.documents_changed}")
        parts.append(f"req={event.request_size}B")
        parts.append(f"reply={event.reply_size}B" if has_reply else "reply=-")
        parts.append(self._outcome(event, has_reply))
        if event.exhaust:
            parts.append(f"exhaust={event.exhaust_index}")
        comment = getattr(event.request, "comment", None) if event.request is not None else None
        if comment:
            parts.append("comment=" + json.dumps(comment, ensure_ascii=False))
        if event.fault:
            parts.append("fault=" + _word(event.fault))
        query, shape = self._query(event)
        if query is not None:
            parts.append(f"shape={shape} query={query}")
        line = " ".join(parts)
        if self.color:
            if event.failed or event.decode_error:
                line = _RED + line + _RESET
            elif has_reply and duration >= self._color_slow_ns:
                line = _YELLOW + line + _RESET
        return line

    def _outcome(self, event: Any, has_reply: bool) -> str:
        if event.decode_error:
            return f"decode-error={event.decode_error}"
        if event.more_to_come_request:
            return "unacknowledged"
        if not has_reply:
            return "no-reply"
        out = []
        if event.ok is False:
            msg = self._errmsg(event)
            out.append(_code(event.code, event.code_name) + (f": {msg}" if msg else ""))
        reply = event.reply
        if reply is not None and reply.write_errors:
            n = reply.write_errors
            out.append(
                _code(reply.write_error_code, reply.write_error_code_name) + f": {n} write error{'s' * (n != 1)}"
            )
        if reply is not None and reply.write_concern_error_code is not None:
            out.append(
                _code(reply.write_concern_error_code, reply.write_concern_error_code_name) + ": write concern error"
            )
        return "; ".join(out) if out else "ok"


def _code(code: int | None, name: str | None) -> str:
    if code is None:
        return name or "error"
    return f"{code} {querylog.code_name(name, code)}"


def _ns(event: Any) -> str:
    return f"{event.database}.{event.collection}" if event.collection else event.database


def _word(text: str) -> str:
    if not text:
        return "-"
    if any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _open_append(path: str) -> TextIO:
    """PATH opened for appending; a file it creates is readable by its owner only (0600): it may hold queries."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    return open(fd, "a", encoding="utf-8", errors="replace", buffering=1 << 16)


def open_log_file(path: str) -> TextIO:
    """Open PATH for appending, or raise the one-line ConfigError naming the fix."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(f"--log-file {path}: directory {directory} does not exist; create it or choose another path")
    if os.path.isdir(path):
        raise ConfigError(
            f"--log-file {path} is a directory; give a file path, e.g. {os.path.join(path, 'commands.log')}"
        )
    try:
        return _open_append(path)
    except OSError as exc:
        raise ConfigError(
            f"--log-file {path}: cannot open for writing ({exc.strerror}); check its permissions or choose another path"
        ) from None


def create(config: Any, ctx: Any) -> CommandLogSink | None:
    """The command log when any of --log-commands/--log-file/--slow-ms/--log-query asks for it."""
    logger = getattr(ctx, "logger", None) or logging.getLogger("mongoproxy")
    if not enabled(config):
        for dest, flag, default in (
            ("log_format", "--log-format", "text"),
            ("log_ops", "--log-ops", ()),
            ("log_ns", "--log-ns", ()),
            ("no_redact", "--no-redact", False),
        ):
            if getattr(config, dest, default) not in (default, None):
                logger.warning("%s has no effect without --log-commands", flag)
        return None
    if getattr(config, "no_redact", False) and not getattr(config, "log_query", False):
        logger.warning("--no-redact has no effect without --log-query")
    path = getattr(config, "log_file", None)
    if path and path != "-":
        stream, owns = open_log_file(path), True
    else:
        stream, owns = sys.stderr, False
    return CommandLogSink(
        stream,
        fmt=getattr(config, "log_format", "text"),
        slow_ms=getattr(config, "slow_ms", None),
        ops=getattr(config, "log_ops", ()),
        namespaces=getattr(config, "log_ns", ()),
        log_query=bool(getattr(config, "log_query", False)),
        show_values=bool(getattr(config, "no_redact", False)),
        owns_stream=owns,
        logger=logger,
        path=path if owns else None,
    )
