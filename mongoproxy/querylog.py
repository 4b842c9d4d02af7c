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
from typing import Any

REDACTED = "?"

# Driver/session bookkeeping that every command carries; noise in a log and would split shapes.
ENVELOPE_FIELDS = frozenset({"$db", "lsid", "$clusterTime", "txnNumber", "autocommit", "startTransaction"})

# Commands whose whole body is a credential exchange: every value is redacted, even with --no-redact.
SECRET_COMMANDS = frozenset(
    {"saslstart", "saslcontinue", "authenticate", "copydbsaslstart", "copydbgetnonce", "getnonce"}
)
# Keys whose value (the whole subtree) is a secret wherever they appear: createUser/updateUser passwords and the
# SASL exchange a handshake hello carries.
SECRET_KEYS = frozenset({"pwd", "speculativeAuthenticate"})

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

    Without `show_values` every literal is '?'. With it, values are shown
    except secrets (credential commands, pwd, SASL payloads), which are
    redacted in every case.
    """
    try:
        body = json.loads(rendered)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        redacted = redact_text(rendered)
        shown = rendered if show_values and op.lower() not in SECRET_COMMANDS else redacted
        return shown, shape_hash(redacted)
    display = {k: v for i, (k, v) in enumerate(body.items()) if i == 0 or k not in ENVELOPE_FIELDS}
    if show_values and op.lower() not in SECRET_COMMANDS:
        shown_doc = _scrub(display)
    else:
        first = next(iter(display), None)
        shown_doc = {k: (v if k == first and isinstance(v, str) else _redact_all(v)) for k, v in display.items()}
    return _dumps(shown_doc), shape_hash(_dumps(_shape(body, top=True)))


def redact_errmsg(errmsg: str) -> str:
    """Hide the key values that a duplicate-key error message quotes."""
    if "dup key" not in errmsg:
        return errmsg
    return _DUP_KEY.sub(r"\1{ ? }", errmsg)


# Names of the codes a writeErrors / writeConcernError entry usually carries. Servers send codeName for
# ok:0 replies but not inside writeErrors, so without this a duplicate key would be labelled "11000".
CODE_NAMES = {
    2: "BadValue",
    9: "FailedToParse",
    13: "Unauthorized",
    14: "TypeMismatch",
    20: "IllegalOperation",
    26: "NamespaceNotFound",
    28: "PathNotViable",
    40: "ConflictingUpdateOperators",
    50: "MaxTimeMSExpired",
    52: "DollarPrefixedFieldName",
    53: "InvalidIdField",
    55: "InvalidDBRef",
    56: "EmptyFieldName",
    57: "DottedFieldName",
    61: "ShardKeyNotFound",
    64: "WriteConcernTimeout",
    66: "ImmutableField",
    79: "UnknownReplWriteConcern",
    91: "ShutdownInProgress",
    100: "UnsatisfiableWriteConcern",
    112: "WriteConflict",
    121: "DocumentValidationFailure",
    189: "PrimarySteppedDown",
    10003: "CannotGrowDocumentInCappedNamespace",
    10107: "NotWritablePrimary",
    10334: "BSONObjectTooLarge",
    11000: "DuplicateKey",
    11600: "InterruptedAtShutdown",
    11601: "Interrupted",
    11602: "InterruptedDueToReplStateChange",
    13435: "NotPrimaryNoSecondaryOk",
}


def code_name(name: str | None, code: int | None) -> str:
    """The codeName sent, else the known name of `code`, else the code as text, else "unknown"."""
    if name:
        return name
    if code is None:
        return "unknown"
    return CODE_NAMES.get(code) or str(code)
