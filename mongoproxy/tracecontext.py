"""Trace context carried in a MongoDB command's comment: W3C traceparent/tracestate and Jaeger uber-trace-id.

Pure functions with no OpenTelemetry dependency. Accepted shapes:

- a W3C traceparent as the whole comment: ``00-<32 hex>-<16 hex>-<2 hex>``;
- ``traceparent=<value>`` (or ``traceparent:<value>``, optionally quoted, as
  sqlcommenter, logfmt or a JSON text write it) inside a longer string, with an
  optional ``tracestate=<value>`` next to it;
- a document comment's ``traceparent`` and ``tracestate`` fields;
- Jaeger's ``uber-trace-id:<trace>:<span>:<parent>:<flags>`` (``=`` works too,
  and a URL-encoded value is decoded).

A comment that names a context whose value does not parse raises
MalformedContext; a comment that names none gives None.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote

from mongoproxy.errors import MalformedContext

__all__ = [
    "TraceContext",
    "MalformedContext",
    "parse_traceparent",
    "parse_tracestate",
    "parse_uber_trace_id",
    "from_comment",
    "from_document",
    "format_traceparent",
]

MAX_TRACESTATE_MEMBERS = 32


class TraceContext(NamedTuple):
    """A caller's span context: our span becomes its child."""

    trace_id: int  # 128-bit, never 0
    span_id: int  # the caller's span id, 64-bit, never 0
    sampled: bool
    tracestate: tuple[tuple[str, str], ...] = ()  # W3C tracestate members, in order
    format: str = "w3c"  # "w3c" or "jaeger"


# W3C Trace Context level 1: lowercase hex only; versions above 00 may append "-..." fields.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.S)
_TS_KEY = re.compile(r"[a-z0-9][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13}")
_TS_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_HEX = re.compile(r"[0-9a-fA-F]+")

# `key` followed by `=` or `:` (JSON text may put a quote between), then an optional opening quote.
_TP_KEY = re.compile(r"""(?i:traceparent)["']?\s*[:=]\s*(["']?)""")
_TS_KEY_IN_TEXT = re.compile(r"""(?i:tracestate)["']?\s*[:=]\s*(["']?)""")
_UBER_KEY = re.compile(r"""(?i:uber-trace-id)["']?\s*[:=]\s*(["']?)""")
_TOKEN_END = re.compile(r"""[\s"',;&}]""")
_STATE_END = re.compile(r"""[\s"';&}]""")  # a tracestate value is itself a comma-separated list


def parse_traceparent(value: str) -> TraceContext:
    """Parse a W3C traceparent header value; raise MalformedContext when it is not one."""
    text = value.strip()
    m = _TRACEPARENT.fullmatch(text)
    if m is None:
        raise MalformedContext(f"traceparent {_show(text)} is not 00-<32 lowercase hex>-<16 hex>-<2 hex>")
    version, trace_hex, span_hex, flags_hex, rest = m.groups()
    if version == "ff":
        raise MalformedContext("traceparent version ff is invalid")
    if version == "00" and rest is not None:
        raise MalformedContext("traceparent version 00 has exactly four fields")
    trace_id = int(trace_hex, 16)
    span_id = int(span_hex, 16)
    if trace_id == 0:
        raise MalformedContext("traceparent trace id is all zeros")
    if span_id == 0:
        raise MalformedContext("traceparent parent id is all zeros")
    return TraceContext(trace_id, span_id, bool(int(flags_hex, 16) & 1))


def parse_tracestate(value: str | None) -> tuple[tuple[str, str], ...]:
    """Parse a W3C tracestate value into (key, value) members; () when absent or malformed (the spec says discard)."""
    if not value:
        return ()
    members: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in value.split(","):
        member = raw.strip(" \t")
        if not member:
            continue
        key, sep, val = member.partition("=")
        if not sep or not _TS_KEY.fullmatch(key) or not _TS_VALUE.fullmatch(val) or key in seen:
            return ()
        seen.add(key)
        members.append((key, val))
        if len(members) > MAX_TRACESTATE_MEMBERS:
            return ()
    return tuple(members)


def parse_uber_trace_id(value: str) -> TraceContext:
    """Parse a Jaeger `{trace}:{span}:{parent}:{flags}` value; raise MalformedContext when it is not one."""
    text = value.strip()
    if "%" in text:
        text = unquote(text)
    parts = text.split(":")
    if len(parts) != 4:
        raise MalformedContext(f"uber-trace-id {_show(text)} is not <trace>:<span>:<parent>:<flags>")
    trace_hex, span_hex, parent_hex, flags_text = parts
    if not (0 < len(trace_hex) <= 32 and _HEX.fullmatch(trace_hex)):
        raise MalformedContext(f"uber-trace-id trace id {_show(trace_hex)} is not 1-32 hex digits")
    if not (0 < len(span_hex) <= 16 and _HEX.fullmatch(span_hex)):
        raise MalformedContext(f"uber-trace-id span id {_show(span_hex)} is not 1-16 hex digits")
    if not (0 < len(parent_hex) <= 16 and _HEX.fullmatch(parent_hex)):
        raise MalformedContext(f"uber-trace-id parent id {_show(parent_hex)} is not 1-16 hex digits")
    if not (0 < len(flags_text) <= 2 and _HEX.fullmatch(flags_text)):
        raise MalformedContext(f"uber-trace-id flags {_show(flags_text)} is not one hex byte")
    trace_id = int(trace_hex, 16)
    span_id = int(span_hex, 16)
    if trace_id == 0:
        raise MalformedContext("uber-trace-id trace id is zero")
    if span_id == 0:
        raise MalformedContext("uber-trace-id span id is zero")
    flags = int(flags_text, 16)
    # Bit 0 is "sampled"; bit 1 is "debug", which Jaeger treats as sampled too.
    return TraceContext(trace_id, span_id, bool(flags & 0b11), (), "jaeger")


def from_comment(comment: str | None) -> TraceContext | None:
    """The context a string comment carries, None when it carries none; MalformedContext when it names a bad one."""
    if not comment:
        return None
    # Cheapest first: a bare traceparent is the commonest form, and most comments carry no marker at all.
    if (
        comment[2:3] == "-"
        and 55 <= len(comment)
        and comment[35:36] == "-"
        and comment[52:53] == "-"
        and (len(comment) == 55 or comment[55:56] in "- \t\r\n")
    ):
        return parse_traceparent(comment)
    low = comment.lower()
    if "traceparent" in low:
        m = _TP_KEY.search(comment)
        if m is not None:
            ctx = parse_traceparent(_value_after(comment, m))
            if "tracestate" in low:
                ts = _TS_KEY_IN_TEXT.search(comment)
                if ts is not None:
                    state = _value_after(comment, ts, _STATE_END)
                    if "%" in state:
                        state = unquote(state)
                    ctx = ctx._replace(tracestate=parse_tracestate(state))
            return ctx
    if "uber-trace-id" in low:
        m = _UBER_KEY.search(comment)
        if m is not None:
            return parse_uber_trace_id(_value_after(comment, m))
    text = comment.strip()
    if text is not comment and len(text) >= 55 and text[2:3] == "-" and text[35:36] == "-" and text[52:53] == "-":
        return parse_traceparent(text)
    return None


def from_document(traceparent: str | None, tracestate: str | None = None) -> TraceContext | None:
    """The context of a document comment's traceparent/tracestate fields; None when it has no traceparent."""
    if traceparent is None:
        return None
    ctx = parse_traceparent(traceparent)
    if tracestate:
        ctx = ctx._replace(tracestate=parse_tracestate(tracestate))
    return ctx


def format_traceparent(trace_id: int, span_id: int, sampled: bool = True) -> str:
    """The W3C traceparent value for a span (what an application puts in its comment)."""
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def _value_after(text: str, m: re.Match, token_end: re.Pattern = _TOKEN_END) -> str:
    """The value that follows a `key=` match: up to the closing quote if it was quoted, else to a delimiter."""
    start = m.end()
    quote = m.group(1)
    if quote:
        end = text.find(quote, start)
        return text[start:] if end < 0 else text[start:end]
    stop = token_end.search(text, start)
    return text[start:] if stop is None else text[start : stop.start()]


def _show(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
