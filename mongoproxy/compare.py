"""Comparing two replies to the same command, once for both the live mirror and `replay --verify` (sans-io).

A reply is reduced to an Outcome (ok, error code, document counts) and, when documents are compared, to its
documents normalised: volatile fields ($clusterTime, operationTime, ...) are dropped, and for a query without
a sort the documents are compared as a multiset (`_id` order and any other order ignored). An unsorted cursor's
documents are compared over the whole cursor (CursorDocuments: firstBatch and every nextBatch up to its end), since
two servers may spread the same documents differently over the batches; a cursor holding more than
MAX_CURSOR_DOCUMENTS, or forgotten past MAX_CURSORS, is counted as not compared.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Iterable, Mapping
from typing import Any

# Divergence kinds (metric label values and report keys), in the order they are checked.
KIND_OK = "ok"  # one side succeeded, the other failed
KIND_CODE = "error_code"  # both failed, with different codes
KIND_COUNT = "document_count"  # documents returned (or n) differ
KIND_DOCUMENTS = "documents"  # same count, different (normalised) documents
KINDS = (KIND_OK, KIND_CODE, KIND_COUNT, KIND_DOCUMENTS)
# Not a divergence: an unsorted cursor whose documents were too many (or held too long) to compare.
NOT_COMPARED = "not_compared"
MAX_CURSOR_DOCUMENTS = 10_000  # documents held per side of one unsorted cursor; past it the cursor is not compared
MAX_HELD_DOCUMENTS = 200_000  # documents held over all open cursors; past it the oldest cursor is forgotten

# Reply fields that differ between two servers answering the same thing.
VOLATILE_FIELDS = frozenset(
    {
        "$clusterTime",
        "operationTime",
        "$gleStats",
        "lastCommittedOpTime",
        "$configTime",
        "$topologyTime",
        "$configServerState",
        "electionId",
        "opTime",
    }
)


@dataclasses.dataclass(slots=True)
class Outcome:
    """What a reply said: success, error, and the counts that are compared."""

    ok: bool | None = None
    code: int | None = None
    code_name: str = ""
    errmsg: str = ""
    returned: int | None = None
    cursor_id: int | None = None
    n: int | None = None
    write_errors: int = 0
    write_concern_error: bool = False
    exception: str = ""  # a client-side failure (network, timeout) instead of a reply

    @property
    def failed(self) -> bool:
        return self.ok is False or self.write_errors > 0 or self.write_concern_error or bool(self.exception)

    @property
    def error_name(self) -> str:
        if self.exception:
            return self.exception
        if self.ok is False:
            return self.code_name or (f"code {self.code}" if self.code is not None else "error")
        return self.code_name or (f"code {self.code}" if self.code is not None else "write error")

    @classmethod
    def from_scan(cls, r: Any) -> Outcome:
        """From the scanner's ScanResult of a reply."""
        ok = None if r.ok is None else r.ok == 1.0
        code, name = r.code, r.code_name or ""
        if ok is not False and r.write_errors:
            code, name = r.write_error_code, r.write_error_code_name or ""
        elif ok is not False and r.write_concern_error_code is not None:
            code, name = r.write_concern_error_code, r.write_concern_error_code_name or ""
        return cls(
            ok=ok,
            code=code,
            code_name=name,
            errmsg=r.errmsg or "",
            returned=r.returned,
            cursor_id=r.cursor_id,
            n=r.n,
            write_errors=r.write_errors or 0,
            write_concern_error=r.write_concern_error_code is not None,
        )


def is_ordered(command: str, spec: Mapping[str, Any] | None) -> bool:
    """Whether the command's result order is defined (a find with a sort, an aggregate with a $sort stage)."""
    key = command.lower()
    if spec is None:
        return False
    if key == "find":
        sort = spec.get("sort")
        return isinstance(sort, Mapping) and len(sort) > 0
    if key == "aggregate":
        for stage in spec.get("pipeline") or ():
            try:
                if "$sort" in stage:
                    return True
            except TypeError:
                continue
    return False


def reply_documents(reply: Mapping[str, Any]) -> list | None:
    """The documents a reply carries: a cursor batch, distinct's values (None when it carries none)."""
    cursor = reply.get("cursor")
    if cursor is not None:
        for key in ("firstBatch", "nextBatch"):
            if key in cursor:
                return list(cursor[key])
        return None
    if "values" in reply:
        return list(reply["values"])
    return None


def _strip(value: Any) -> Any:
    """A plain Python value of a (raw) document without volatile fields, for encoding back to canonical bytes."""
    if isinstance(value, Mapping):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE_FIELDS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def normalise(docs: Iterable[Any], ordered: bool) -> list[bytes]:
    """Canonical BSON of each document without volatile fields; sorted when the order is not defined."""
    import bson

    out = []
    for d in docs:
        v = _strip(d)
        out.append(bson.encode(v) if isinstance(v, Mapping) else bson.encode({"v": v}))
    return out if ordered else sorted(out)


def compare(
    a: Outcome,
    b: Outcome,
    a_docs: Iterable[Any] | None = None,
    b_docs: Iterable[Any] | None = None,
    ordered: bool = False,
) -> list[str]:
    """The kinds of divergence between reply a (primary or recorded) and reply b (shadow or replayed)."""
    if a.exception or b.exception:
        return []  # no reply to compare: the caller counts a client-side failure on its own
    a_failed, b_failed = a.failed, b.failed
    if a_failed != b_failed:
        return [KIND_OK]
    if a_failed:
        return [KIND_CODE] if a.code != b.code else []
    kinds = []
    for field in ("returned", "n"):
        x, y = getattr(a, field), getattr(b, field)
        if x is not None and y is not None and x != y:
            kinds.append(KIND_COUNT)
            break
    if not kinds and a_docs is not None and b_docs is not None:
        if normalise(a_docs, ordered) != normalise(b_docs, ordered):
            kinds.append(KIND_DOCUMENTS)
    return kinds


def describe(kind: str, a: Outcome, b: Outcome) -> str:
    """One line saying what differed (no document values: they may hold personal data)."""
    if kind == KIND_OK:
        return f"{a.error_name if a.failed else 'ok'} vs {b.error_name if b.failed else 'ok'}"
    if kind == KIND_CODE:
        return f"error {a.error_name} vs {b.error_name}"
    if kind == KIND_COUNT:
        if a.returned is not None and b.returned is not None and a.returned != b.returned:
            return f"returned {a.returned} vs {b.returned}"
        return f"n {a.n} vs {b.n}"
    return "same number of documents, different contents"


def id_difference(a_docs: Iterable[Any] | None, b_docs: Iterable[Any] | None, limit: int = 5) -> str:
    """Which `_id`s one side returned and the other did not ("" when unknown or none); for local reports only."""
    if a_docs is None or b_docs is None:
        return ""

    def ids(docs: Iterable[Any]) -> dict:
        out = {}
        for d in docs:
            if isinstance(d, Mapping) and "_id" in d:
                out[repr(d["_id"])] = d["_id"]
        return out

    a, b = ids(a_docs), ids(b_docs)
    missing = [k for k in a if k not in b][:limit]
    extra = [k for k in b if k not in a][:limit]
    parts = []
    if missing:
        parts.append("missing _id " + ", ".join(missing))
    if extra:
        parts.append("extra _id " + ", ".join(extra))
    return "; ".join(parts)


class CursorDocuments:
    """Both sides' documents of open unsorted cursors, compared as one multiset when a cursor ends (bounded).

    A cursor is keyed by the a side's (primary's, recorded) cursor id as the caller scopes it. Memory: at most
    max_documents normalised documents per side of a cursor, and max_held in all; past the latter the oldest
    cursor is forgotten, and a batch of a forgotten (or never seen) cursor ends as NOT_COMPARED. Thread-safe.
    """

    def __init__(self, max_documents: int = MAX_CURSOR_DOCUMENTS, max_held: int = MAX_HELD_DOCUMENTS) -> None:
        self.max_documents = max_documents
        self.max_held = max_held
        # key -> [a's documents, b's documents], or _OVER / _DIVERGED (nothing held, the cursor's end still awaited).
        self.open: collections.OrderedDict[Any, Any] = collections.OrderedDict()
        self.held = 0
        self._lock = threading.Lock()

    def judge(
        self,
        key: Any,
        first: bool,
        a: Outcome,
        b: Outcome,
        a_docs: Iterable[Any] | None,
        b_docs: Iterable[Any] | None,
        ordered: bool,
    ) -> list[str]:
        """compare() of one reply, with an unsorted cursor's documents compared once over the whole cursor."""
        if ordered or a.cursor_id is None or a_docs is None or b_docs is None:
            return compare(a, b, a_docs, b_docs, ordered)
        kinds = compare(a, b)
        ended = not a.cursor_id or a.failed or b.failed or bool(a.exception or b.exception)
        return kinds + self._add(key, first, a_docs, b_docs, ended, bool(kinds))

    def _add(
        self, key: Any, first: bool, a_docs: Iterable[Any], b_docs: Iterable[Any], ended: bool, diverged: bool
    ) -> list[str]:
        with self._lock:
            state = self.open.pop(key, None)
            if first:
                self._drop(state)
                state = [[], []]
            elif state is None:
                state = _OVER  # forgotten (or its first batch never seen): what is held would be a part of it
            if diverged and state is not _OVER:
                self._drop(state)
                state = _DIVERGED  # counted already: the contents are not compared as well
            if isinstance(state, list):
                held_before = len(state[0]) + len(state[1])
                state[0].extend(normalise(a_docs, True))
                state[1].extend(normalise(b_docs, True))
                self.held += len(state[0]) + len(state[1]) - held_before
                if max(len(state[0]), len(state[1])) > self.max_documents:
                    self._drop(state)
                    state = _OVER
            if not ended:
                self.open[key] = state
                while self.held > self.max_held and self.open:
                    _, old = self.open.popitem(last=False)
                    self._drop(old)
                return []
            self._drop(state)
        if state is _OVER:
            return [NOT_COMPARED]
        if state is _DIVERGED:
            return []
        return [] if sorted(state[0]) == sorted(state[1]) else [KIND_DOCUMENTS]

    def _drop(self, state: Any) -> None:
        if isinstance(state, list):
            self.held -= len(state[0]) + len(state[1])

    def forget(self, key: Any) -> None:
        """Drop a cursor that will not be continued (killed)."""
        with self._lock:
            self._drop(self.open.pop(key, None))

    def __len__(self) -> int:
        return len(self.open)


_OVER = "over"
_DIVERGED = "diverged"
