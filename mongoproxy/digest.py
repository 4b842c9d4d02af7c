"""The query digest: per (shape, db, collection, op, app) counts, errors, latency percentiles, bytes and an example.

Sans-io: `Digest.add` takes plain values, so the live sink (mongoproxy.sinks.digest), `mongoproxy digest` (recordings)
and `mongoproxy top` (merging several proxies' JSON) share one table and one JSON schema (docs/digest.md).

Latency percentiles come from a DDSketch (relative error 1%): sketches with the same mapping merge exactly, bin by bin,
so the merged percentiles of two proxies equal the percentiles of one sketch fed both streams. Latencies are recorded
in milliseconds rounded to the microsecond, the value the command log prints, so both can be compared.
The table is bounded: past `max_shapes` keys the least recently seen one is evicted and counted.
"""

from __future__ import annotations

import sys
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from itertools import accumulate
from typing import Any

from ddsketch.ddsketch import BaseDDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.store import DenseStore

from mongoproxy._digest import Counting, EntryBase
from mongoproxy.namespaces import NamespaceFilter

SCHEMA_VERSION = 1
RELATIVE_ACCURACY = 0.01
DEFAULT_MAX_SHAPES = 5000
SORTS = {
    "total_time": lambda e: e.total_ms,
    "p99": lambda e: e.quantiles()[2] or 0.0,
    "count": lambda e: e.count,
    "errors": lambda e: sum(e.errors.values()),
}
# One mapping for every sketch: same parameters is what makes merges exact, and it is immutable.
_MAPPING = LogarithmicMapping(RELATIVE_ACCURACY)

Key = tuple[str, str, str, str, str]  # (shape, db, collection, op, app)


# Latencies are ms rounded to the µs, so the same values recur: their bin keys are looked up, not recomputed.
# Cleared when full. 4,096 entries hold about 0.4 MB; at 100,000 the table grew to 10.7 MB over a 30-minute soak
# (docs/hardening.md), and a miss costs only about 0.3 µs more than a hit.
_KEYS: dict[float, int] = {}
_KEYS_MAX = 4096


class LatencySketch(BaseDDSketch):
    """A DDSketch (the one mapping, dense stores) with a quicker add for the data path; its bins are add()'s.

    add_ms() leaves the sketch's own min/max/sum alone: Entry keeps those, the sketch serves quantiles and merges.
    """

    def __init__(self) -> None:
        super().__init__(_MAPPING, DenseStore(), DenseStore(), 0.0)

    def add_ms(self, ms: float) -> None:
        """Count one latency in milliseconds (>= 0)."""
        if ms <= _MAPPING.min_possible:
            self.add(ms)  # the zero bucket
        else:
            self.add_keys({bin_key(ms): 1})

    def add_keys(self, counts: dict[int, int]) -> None:
        """Count latencies given as {bin key (from bin_key), count}; ZERO_KEY is the zero bucket."""
        store = self._store
        for key, n in counts.items():
            if key == ZERO_KEY:
                self.add(0.0, float(n))
                continue
            store.add(key, float(n))
            self._count += n


# A bin key no positive latency maps to (keys of values >= 1 µs are far above it): the zero bucket.
ZERO_KEY = -(1 << 62)


def bin_key(ms: float) -> int:
    """The sketch bin of a latency in ms, as DDSketch.add would choose it; looked up for recurring values."""
    key = _KEYS.get(ms)
    if key is None:
        key = _MAPPING.key(ms) if ms > _MAPPING.min_possible else ZERO_KEY
        if len(_KEYS) >= _KEYS_MAX:
            _KEYS.clear()
        _KEYS[ms] = key
    return key


def new_sketch() -> LatencySketch:
    """An empty latency sketch (ms), mergeable with every other one made here."""
    return LatencySketch()


QUANTILES = (0.50, 0.95, 0.99)


def quantiles(sketch: BaseDDSketch, qs: Sequence[float]) -> list[float | None]:
    """sketch.get_quantile_value(q) for each q, in one pass over the bins instead of one per quantile.

    The same ranks and keys as DDSketch: rank q*(count-1); the zero bucket first; then the first bin whose running
    count exceeds the rest of the rank (DenseStore.key_at_rank with lower=True).
    """
    count = sketch.count
    if not count:
        return [None] * len(qs)
    if sketch._negative_store.count:  # never here (latencies are >= 0), but then the library decides
        return [sketch.get_quantile_value(q) for q in qs]
    store, zero = sketch._store, sketch._zero_count
    running = list(accumulate(store.bins))
    out: list[float | None] = []
    for q in qs:
        rank = q * (count - 1)
        if rank < zero:
            out.append(0.0)
            continue
        i = bisect_right(running, rank - zero)
        out.append(_MAPPING.value(store.offset + i if i < len(running) else store.max_key))
    return out


def sketch_to_json(sketch: BaseDDSketch) -> dict:
    """The sketch's bins: enough to rebuild it exactly (positive values only; latencies are never negative)."""
    store = sketch._store
    bins = list(store.bins)
    lo = next((i for i, c in enumerate(bins) if c), len(bins))
    hi = len(bins)
    while hi > lo and not bins[hi - 1]:
        hi -= 1
    return {
        "relative_accuracy": RELATIVE_ACCURACY,
        "offset": store.offset + lo,
        "bins": [int(c) if c == int(c) else c for c in bins[lo:hi]],  # counts: whole numbers
        "zero_count": sketch._zero_count,
    }


def sketch_from_json(doc: dict) -> BaseDDSketch:
    """Rebuild a sketch serialised by sketch_to_json; ValueError when its accuracy differs (no exact merge)."""
    if float(doc.get("relative_accuracy", -1)) != RELATIVE_ACCURACY:
        raise ValueError(f"sketch relative accuracy {doc.get('relative_accuracy')!r} != {RELATIVE_ACCURACY}")
    store = DenseStore()
    offset = int(doc["offset"])
    for i, c in enumerate(doc["bins"]):
        if c:
            store.add(offset + i, float(c))
    sketch = LatencySketch()
    sketch.merge(BaseDDSketch(_MAPPING, store, DenseStore(), float(doc.get("zero_count", 0.0))))
    return sketch


def iso(ns: int) -> str:
    """Unix ns as ISO 8601 UTC with milliseconds."""
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac // 1_000_000:03d}Z"


def parse_iso(text: str) -> int:
    """The inverse of iso() (Unix ns)."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


class Entry(EntryBase):
    """One key's aggregates: the fields are C fields of EntryBase (mongoproxy/_digest.pyx), counted there."""

    __slots__ = ()

    def __init__(self, example: str, at_ns: int) -> None:
        self.pending = {}  # sketch bin key -> latencies not yet in the sketch
        self.cached = None  # QUANTILES of the sketch, until it changes
        self.count = 0
        self.errors = {}
        self.sketch = new_sketch()
        self.min_ms = float("inf")
        self.max_ms = 0.0
        self.total_ms = 0.0
        self.docs_returned = 0
        self.docs_changed = 0
        self.request_bytes = 0
        self.reply_bytes = 0
        self.first_ns = at_ns
        self.last_ns = at_ns
        self.example = example

    def flush(self) -> LatencySketch:
        """The sketch with every latency counted so far (readers call this; the data path only buffers)."""
        pending = self.pending
        if pending:
            self.pending = {}
            self.sketch.add_keys(pending)
            self.cached = None
        return self.sketch

    def quantiles(self) -> list[float | None]:
        """p50, p95, p99 (ms) of the latencies so far, recomputed only when some came since the last call."""
        sketch = self.flush()
        if self.cached is None:
            self.cached = quantiles(sketch, QUANTILES)
        return self.cached

    def memory(self) -> int:
        """Approximate bytes held by this entry."""
        store = self.sketch._store
        return (
            _ENTRY_BASE
            + sys.getsizeof(store.bins)
            + 8 * len(store.bins)  # a float per bin
            + sys.getsizeof(self.pending)
            + sys.getsizeof(self.example)
            + sum(sys.getsizeof(k) + 64 for k in self.errors)
        )


# An Entry, its sketch (two stores, their lists) and the key tuple with its strings, measured once.
_ENTRY_BASE = 1024

# The data path's counting: one C call per command (Digest.add and the digest sink's hook use it).
COUNT = Counting(Entry, _KEYS, bin_key)


class Digest:
    """The bounded table; `to_wall` turns the timestamps given to add() into Unix ns."""

    def __init__(self, max_shapes: int = DEFAULT_MAX_SHAPES, to_wall: Callable[[int], int] = int) -> None:
        self.max_shapes = max_shapes
        self.to_wall = to_wall
        self.entries: OrderedDict[Key, Entry] = OrderedDict()
        self.evictions = 0
        self.since_ns = time.time_ns()

    def __len__(self) -> int:
        return len(self.entries)

    def add(
        self,
        key: Key,
        example: str,
        at_ns: int,
        duration_ms: float | None,
        error: str | None,
        docs_returned: int | None,
        docs_changed: int | None,
        request_bytes: int,
        reply_bytes: int,
    ) -> None:
        """Count one command under `key` (compiled: mongoproxy/_digest.pyx)."""
        COUNT(self, key, example, at_ns, duration_ms, error, docs_returned, docs_changed, request_bytes, reply_bytes)

    def reset(self) -> None:
        """Forget every key (evictions are a process-lifetime counter and stay)."""
        self.entries = OrderedDict()
        self.since_ns = time.time_ns()

    def memory(self) -> int:
        """Approximate bytes held by the table."""
        entries = list(self.entries.values())  # one C-level copy: safe against the loop adding meanwhile
        return sys.getsizeof(self.entries) + sum(e.memory() for e in entries)

    # ---- JSON (docs/digest.md) ----

    def select(
        self, sort: str = "total_time", limit: int | None = None, ns: Iterable[str] = (), app: str | None = None
    ) -> list[tuple[Key, Entry]]:
        """The keys a document shows: filtered, sorted (descending) and cut to `limit`; ValueError for a bad sort."""
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {', '.join(SORTS)}, got {sort!r}")
        flt = NamespaceFilter(tuple(ns))
        items = [
            (k, e)
            for k, e in list(self.entries.items())
            if (not flt or flt(k[1], k[2])) and (app is None or k[4] == app)
        ]
        key_fn = SORTS[sort]
        items.sort(key=lambda ke: key_fn(ke[1]), reverse=True)
        return items if limit is None else items[:limit]

    def header(self) -> dict:
        """The document without its shapes."""
        return {
            "version": SCHEMA_VERSION,
            "since": iso(self.since_ns),
            "max_shapes": self.max_shapes,
            "evictions": self.evictions,
            "shape_count": len(self.entries),
            "memory_bytes": self.memory(),
            "shapes": [],
        }

    def to_json(
        self,
        sort: str = "total_time",
        limit: int | None = None,
        ns: Iterable[str] = (),
        app: str | None = None,
        sketch: bool = False,
    ) -> dict:
        """The versioned document (docs/digest.md) in one go."""
        doc = self.header()
        doc["shapes"] = [self.shape_json(k, e, sketch) for k, e in self.select(sort, limit, ns, app)]
        return doc

    def shape_json(self, key: Key, e: Entry, with_sketch: bool = False) -> dict:
        """One shape's object of the document."""
        s = e.flush()
        timed = s.count > 0
        p50, p95, p99 = e.quantiles()

        def q(v: float | None) -> float | None:
            if v is None:
                return None
            # A bin's representative value may lie up to 1% past the extremes seen: clamp it to them.
            return round(min(max(v, e.min_ms), e.max_ms), 3)

        out = {
            "shape": key[0],
            "db": key[1],
            "collection": key[2],
            "op": key[3],
            "app": key[4],
            "count": e.count,
            "errors": dict(e.errors),
            "latency_ms": {
                "p50": q(p50),
                "p95": q(p95),
                "p99": q(p99),
                "min": round(e.min_ms, 3) if timed else None,
                "max": round(e.max_ms, 3) if timed else None,
                "total": round(e.total_ms, 3),
            },
            "docs_returned": e.docs_returned,
            "docs_changed": e.docs_changed,
            "request_bytes": e.request_bytes,
            "reply_bytes": e.reply_bytes,
            "first_seen": iso(self.to_wall(e.first_ns)),
            "last_seen": iso(self.to_wall(e.last_ns)),
            "example": e.example,
        }
        if with_sketch:
            out["sketch"] = sketch_to_json(s)
        return out

    def merge_json(self, doc: dict) -> None:
        """Fold another digest's document (fetched with sketch=1) into this one; ValueError when it cannot be exact."""
        if doc.get("version") != SCHEMA_VERSION:
            raise ValueError(f"digest schema version {doc.get('version')!r}, expected {SCHEMA_VERSION}")
        since = parse_iso(doc["since"])
        if not self.entries or since < self.since_ns:
            self.since_ns = since
        self.evictions += int(doc.get("evictions", 0))
        for s in doc["shapes"]:
            if "sketch" not in s:
                raise ValueError("a digest without sketches cannot be merged exactly: fetch it with sketch=1")
            key = (s["shape"], s["db"], s["collection"], s["op"], s["app"])
            lat = s["latency_ms"]
            first, last = parse_iso(s["first_seen"]), parse_iso(s["last_seen"])
            e = self.entries.get(key)
            if e is None:
                e = self.entries[key] = Entry(s["example"], first)
                e.last_ns = last
            e.first_ns, e.last_ns = min(e.first_ns, first), max(e.last_ns, last)
            e.count += s["count"]
            for name, n in s["errors"].items():
                e.errors[name] = e.errors.get(name, 0) + n
            e.flush().merge(sketch_from_json(s["sketch"]))
            e.cached = None
            if lat["min"] is not None:
                e.min_ms = min(e.min_ms, lat["min"])
                e.max_ms = max(e.max_ms, lat["max"])
            e.total_ms += lat["total"]
            e.docs_returned += s["docs_returned"]
            e.docs_changed += s["docs_changed"]
            e.request_bytes += s["request_bytes"]
            e.reply_bytes += s["reply_bytes"]
        self.max_shapes = max(self.max_shapes, len(self.entries))


def error_name(event: Any) -> str | None:
    """The codeName a failed command is counted under (ok:0, else its first write error, else write concern)."""
    from mongoproxy.querylog import code_name

    if event.ok is False:
        return code_name(event.code_name, event.code)
    reply = event.reply
    if reply is None:
        return None
    if reply.write_errors:
        return code_name(reply.write_error_code_name, reply.write_error_code)
    if reply.write_concern_error_code is not None:
        return code_name(reply.write_concern_error_code_name, reply.write_concern_error_code)
    return None
