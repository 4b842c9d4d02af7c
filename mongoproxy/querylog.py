"""Query text for logs and traces: scrub secrets, drop the session envelope, and hash the query shape.

Input is the scanner's rendering of a command body (ScanResult.query_shape:
JSON text, literal values as "?" or, with --no-redact, as extended JSON).
The shape hash is computed from a normalised redacted form, so it is the
same whichever rendering was asked for and however long the arrays are:
`{"$in": [1, 2, 3]}` and `{"$in": [4]}` share a shape.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from mongoproxy.protocol.builders import CODE_NAMES
from mongoproxy.protocol.commands import SECRET_KEYS, is_secret

REDACTED = "?"

# Driver/session bookkeeping that every command carries; noise in a log and would split shapes.
ENVELOPE_FIELDS = frozenset({"$db", "lsid", "$clusterTime", "txnNumber", "autocommit", "startTransaction"})

# Credentials in a connection string (addShard, $out/$merge to a URI, ...): user:password@ before the host.
_URI_CREDENTIALS = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s\"?#]+@")

# Extended-JSON wrappers of one BSON value: a scalar for shape purposes.
_EXT_JSON = frozenset(
    {
        "$oid",
        "$date",
        "$numberLong",
        "$numberInt",
        "$numberDouble",
        "$numberDecimal",
        "$binary",
        "$uuid",
        "$regularExpression",
        "$regex",
        "$timestamp",
        "$symbol",
        "$code",
        "$minKey",
        "$maxKey",
        "$undefined",
        "$dbPointer",
        "$type",
    }
)

# One JSON token: a string, or a bare literal (number, true, false, null).
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|-?\d[\d.eE+-]*|true|false|null')
_DUP_KEY = re.compile(r"(dup key: )\{.*\}", re.DOTALL)


def _is_scalar(value: Any) -> bool:
    if isinstance(value, dict):
        return len(value) in (1, 2) and next(iter(value), "") in _EXT_JSON
    return not isinstance(value, list)


def _redact_all(value: Any) -> Any:
    """Every literal becomes '?'; structure (keys, nesting, array lengths) stays."""
    if _is_scalar(value):
        return REDACTED
    if isinstance(value, dict):
        return {k: _redact_all(v) for k, v in value.items()}
    return [_redact_all(v) for v in value]


def _scrub(value: Any) -> Any:
    """Secret subtrees become '?'; everything else is kept as is."""
    if isinstance(value, dict):
        if _is_scalar(value):
            return value
        return {k: (_redact_all(v) if k in SECRET_KEYS else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, str):
        return _URI_CREDENTIALS.sub(r"\1?@", value)
    return value


def _shape(value: Any, top: bool = False) -> Any:
    """The canonical redacted form: literals '?', arrays reduced to their distinct element shapes."""
    if _is_scalar(value):
        return REDACTED
    if isinstance(value, dict):
        items: Any = value.items()
        if top:  # the command name's value is a collection name (or 1) and stays
            items = list(items)
            first = items[:1]
            return dict(
                [(k, v if isinstance(v, str) else REDACTED) for k, v in first]
                + [(k, _shape(v)) for k, v in items[1:] if k not in ENVELOPE_FIELDS]
            )
        return {k: _shape(v) for k, v in items}
    out: list = []
    for v in value:
        s = _shape(v)
        if s not in out:
            out.append(s)
    return out


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def redact_text(text: str) -> str:
    """Token-level redaction for text that is not valid JSON (e.g. a rendering cut at its limit)."""

    def sub(m: re.Match) -> str:
        tok = m.group(0)
        if tok.startswith('"'):
            rest = text[m.end() : m.end() + 8].lstrip()
            if rest.startswith(":"):
                return tok  # a key
        return '"?"'

    return _TOKEN.sub(sub, text)


def shape_hash(redacted_canonical: str) -> str:
    """16 hex digits identifying a query shape."""
    return hashlib.sha1(redacted_canonical.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def prepare(rendered: str, op: str, show_values: bool) -> tuple[str, str]:
    """(text to log, shape hash) for a rendered command body.

    Without `show_values` every literal is '?' (but the command name's value). With it, values are shown
    except secrets (credential commands, SECRET_KEYS, the user:password of a connection string), which
    are redacted in every case.
    """
    try:
        body = json.loads(rendered)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        redacted = redact_text(rendered)
        shown = _URI_CREDENTIALS.sub(r"\1?@", rendered) if show_values and not is_secret(op) else redacted
        return shown, shape_hash(redacted)
    display = {k: v for i, (k, v) in enumerate(body.items()) if i == 0 or k not in ENVELOPE_FIELDS}
    if show_values and not is_secret(op):
        shown_doc = _scrub(display)
    else:
        first = next(iter(display), None)
        shown_doc = {
            k: (_scrub(v) if k == first and isinstance(v, str) else _redact_all(v)) for k, v in display.items()
        }
    return _dumps(shown_doc), shape_hash(_dumps(_shape(body, top=True)))


@dataclass(slots=True, frozen=True)
class Query:
    """One command's query text, computed once and shared by the command log, tracing and the digest."""

    text: str  # what a log shows: literals '?' unless values were asked for (secrets always '?')
    redacted: str  # every literal '?', whatever was asked for
    shape: str  # 16 hex digits: the same for every command of this shape
    values: bool = False  # whether `text` may show literal values (it was asked for with show_values)


# Redacted renderings repeat (literals are already '?'), so their Query is looked up, not recomputed:
# only the first command of each rendering pays for the parse. Cleared when full: bounded, O(1).
_CACHE_MAX = 4096
_cache: dict[str, Query] = {}


def query_of(rendered: str, op: str, show_values: bool) -> Query:
    """The Query of a rendered command body (see prepare); redacted renderings come from a bounded cache."""
    if not show_values:
        q = _cache.get(rendered)
        if q is None:
            text, shape = prepare(rendered, op, False)
            q = Query(text, text, shape)
            if len(_cache) >= _CACHE_MAX:
                _cache.clear()
            _cache[rendered] = q
        return q
    text, shape = prepare(rendered, op, True)
    redacted, _ = prepare(rendered, op, False)
    return Query(text, redacted, shape, True)


def event_query(event: Any, show_values: bool) -> Query | None:
    """The event's Query, computed on first use and kept on the event; None when its body was not rendered."""
    q = event.query_cache
    if q is not None and q.values is show_values:
        return q
    request = event.request
    rendered = request.query_shape if request is not None else None
    if not rendered:
        return None
    q = None if show_values else _cache.get(rendered)  # the usual case, without a call
    if q is None:
        q = query_of(rendered, event.op, show_values)
    event.query_cache = q
    return q


def redact_errmsg(errmsg: str) -> str:
    """Hide the key values that a duplicate-key error message quotes."""
    if "dup key" not in errmsg:
        return errmsg
    return _DUP_KEY.sub(r"\1{ ? }", errmsg)


# Servers send codeName for ok:0 replies but not inside writeErrors: without a table a duplicate key would be
# labelled "11000". The table of real server codes lives with the replies the proxy builds.
def code_name(name: str | None, code: int | None) -> str:
    """The codeName sent, else the known name of `code`, else the code as text, else "unknown"."""
    if name:
        return name
    if code is None:
        return "unknown"
    return CODE_NAMES.get(code) or str(code)
