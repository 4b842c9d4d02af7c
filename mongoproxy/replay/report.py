"""The report: recorded against replayed latency per op and namespace, new and gone errors, count differences."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from mongoproxy.compare import MAX_CURSOR_DOCUMENTS, NOT_COMPARED, Outcome
from mongoproxy.replay.model import SKIP_CURSOR, SKIP_DESTRUCTIVE, Op, Stream, Workload
from mongoproxy.replay.target import redact_uri

if TYPE_CHECKING:
    from mongoproxy.replay.filters import Filters


def percentile(values: list, q: float) -> float | None:
    """Nearest-rank percentile of values (None when empty)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


SAMPLES = 20_000  # latencies kept per op and namespace; past it a uniform reservoir sample (percentiles estimated)
MAX_LISTED = 1000  # count differences and would-replay entries listed in the report (all are counted)
MAX_DIVERGENCE_ROWS = 500  # distinct (op, namespace, shape, kind) rows; later ones are counted in "other"


class _Reservoir:
    """Up to SAMPLES values, then a uniform sample of everything added (Vitter's algorithm R)."""

    __slots__ = ("values", "seen")

    def __init__(self) -> None:
        self.values: list = []
        self.seen = 0

    def add(self, v: int) -> None:
        self.seen += 1
        if len(self.values) < SAMPLES:
            self.values.append(v)
        else:
            j = random.randrange(self.seen)
            if j < SAMPLES:
                self.values[j] = v


class _Group:
    __slots__ = ("count", "rec", "rep", "rec_errors", "rep_errors")

    def __init__(self) -> None:
        self.count = 0
        self.rec = _Reservoir()
        self.rep = _Reservoir()
        self.rec_errors = 0
        self.rep_errors = 0


class Tally:
    """The report's figures, gathered op by op as the stream is replayed (nothing per op is kept)."""

    def __init__(
        self,
        stream: Stream,
        filters: Filters,
        target: str,
        speed: float | None,
        dry_run: bool = False,
        verify: str | None = None,
    ) -> None:
        self.stream = stream
        self.filters = filters
        self.target = target
        self.speed = speed
        self.dry_run = dry_run
        self.verify = verify
        self.skipped: dict[str, int] = {}
        self.destructive: dict[str, int] = {}
        self.groups: dict[tuple, _Group] = {}
        self.new_errors: dict[tuple, dict] = {}
        self.gone_errors: dict[tuple, dict] = {}
        self.differences: list[dict] = []
        self.differences_total = 0
        self.divergences: dict[tuple, dict] = {}
        self.divergences_total = 0
        self.not_compared = 0  # unsorted cursors whose documents were too many to compare (compare.NOT_COMPARED)
        self.would_replay: list[dict] = []
        self.replayable = 0
        self.replayed_ops = 0
        self.replayed_errors = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None

    def _group(self, op: Op) -> _Group:
        g = self.groups.get((op.op, op.ns))
        if g is None:
            g = self.groups[(op.op, op.ns)] = _Group()
        return g

    def seen(self, op: Op) -> None:
        """Every op read from the capture, once, after the filters."""
        if op.skip:
            self.skipped[op.skip] = self.skipped.get(op.skip, 0) + 1
            if op.skip == SKIP_DESTRUCTIVE:
                self.destructive[op.op] = self.destructive.get(op.op, 0) + 1
            return
        self.replayable += 1
        self.first_ns = op.ts_ns if self.first_ns is None else min(self.first_ns, op.ts_ns)
        self.last_ns = op.ts_ns if self.last_ns is None else max(self.last_ns, op.ts_ns)
        if self.dry_run:
            g = self._group(op)
            g.count += 1
            if op.recorded_ns is not None:
                g.rec.add(op.recorded_ns)
            if len(self.would_replay) < MAX_LISTED:
                self.would_replay.append(
                    {"at_s": self._at(op, 6), "connection": op.conn.index, "op": op.op, "ns": op.ns}
                )

    def _at(self, op: Op, digits: int = 3) -> float:
        return round((op.ts_ns - self.stream.start_ns) / 1e9, digits)

    def result(
        self,
        op: Op,
        copy: int,
        outcome: Outcome | None,
        elapsed: int | None,
        skip: str = "",
        kinds: Iterable[tuple[str, str]] = (),
    ) -> None:
        """One copy of one op was replayed (or, skip, not sent after all)."""
        rec = op.recorded
        if skip:
            self.skipped[skip] = self.skipped.get(skip, 0) + 1
            if skip == SKIP_CURSOR and rec is not None and rec.returned:
                self._difference(
                    op, "returned", rec.returned, None, note="not sent: the cursor was already closed on the target"
                )
            return
        if outcome is None:
            return
        self.replayed_ops += 1
        g = self._group(op)
        g.count += 1
        if copy == 0 and op.recorded_ns is not None:
            g.rec.add(op.recorded_ns)
        if elapsed is not None:
            g.rep.add(elapsed)
        rec_failed = rec is not None and rec.failed
        g.rec_errors += rec_failed
        g.rep_errors += outcome.failed
        self.replayed_errors += outcome.failed
        if outcome.failed and not rec_failed:
            self._error(self.new_errors, op, outcome)
        elif rec_failed and not outcome.failed:
            assert rec is not None
            self._error(self.gone_errors, op, rec)
        if rec is not None:
            for field in ("returned", "n"):
                a, b = getattr(rec, field), getattr(outcome, field)
                if a is not None and b is not None and a != b:
                    self._difference(op, field, a, b)
        for kind, example in kinds:
            self._divergence(op, kind, example)

    def _error(self, table: dict, op: Op, o: Outcome) -> None:
        k = (op.op, op.ns, o.error_name)
        e = table.get(k)
        if e is None:
            e = table[k] = {
                "op": op.op,
                "ns": op.ns,
                "error": o.error_name,
                "code": o.code,
                "count": 0,
                "example": o.errmsg[:300],
            }
        e["count"] += 1

    def _difference(self, op: Op, field: str, a: Any, b: Any, note: str = "") -> None:
        self.differences_total += 1
        if len(self.differences) < MAX_LISTED:
            d = {
                "op": op.op,
                "ns": op.ns,
                "connection": op.conn.index,
                "field": field,
                "recorded": a,
                "replayed": b,
                "at_s": self._at(op),
            }
            if note:
                d["note"] = note
            self.differences.append(d)

    def _divergence(self, op: Op, kind: str, example: str) -> None:
        if kind == NOT_COMPARED:
            self.not_compared += 1
            return
        self.divergences_total += 1
        shape = command_shape(op.spec)
        key = (op.op, op.ns, shape, kind)
        row = self.divergences.get(key)
        if row is None:
            if len(self.divergences) >= MAX_DIVERGENCE_ROWS:
                key = ("other", "", "", kind)
                row = self.divergences.get(key)
            if row is None:
                row = self.divergences[key] = {
                    "op": key[0],
                    "ns": key[1],
                    "shape": key[2],
                    "kind": kind,
                    "count": 0,
                    "example": f"{example} (connection {op.conn.index}, at {self._at(op)}s)",
                }
        row["count"] += 1

    def report(self, replayer: Any = None) -> dict:
        """The JSON report (its field names are documented in docs/capture-replay.md)."""
        st = self.stream
        by_op = []
        for (name, ns), g in sorted(self.groups.items(), key=lambda kv: (-kv[1].count, kv[0])):
            rec, rep = g.rec.values, g.rep.values
            by_op.append(
                {
                    "op": name,
                    "ns": ns,
                    "count": g.count,
                    "recorded_ms": {f"p{q}": _ms(percentile(rec, q)) for q in (50, 90, 99)},
                    "replayed_ms": {f"p{q}": _ms(percentile(rep, q)) for q in (50, 90, 99)},
                    "recorded_errors": g.rec_errors,
                    "replayed_errors": g.rep_errors,
                }
            )
        span = (st.end_ns - st.start_ns) / 1e9
        first, last = self.first_ns, self.last_ns
        replayable_span = (last - first) / 1e9 if first is not None and last is not None else 0.0
        speed = self.speed
        report: dict[str, Any] = {
            "files": st.files,
            "target": redact_uri(self.target) if self.target else None,
            "dry_run": self.dry_run,
            "speed": "max" if speed is None else speed,
            "filters": self.filters.describe(),
            "recorded": {
                "start": _iso(st.start_ns),
                "span_s": round(span, 3),
                "connections": st.connections,
                "operations": st.operations,
                "packets": st.packets,
                "tcp_connections": st.flows,
                "mongodb_connections": st.mongo_flows,
                "ops_per_s": round(st.operations / span, 1) if span > 0 else None,
                "replayable_span_s": round(replayable_span, 3),
            },
            "skipped": dict(self.skipped),
            "not_sent_destructive": dict(sorted(self.destructive.items())),
            "conversions": dict(sorted(st.conversions.items())),
            "by_op": by_op,
            "new_errors": sorted(self.new_errors.values(), key=lambda e: -e["count"]),
            "gone_errors": sorted(self.gone_errors.values(), key=lambda e: -e["count"]),
            "count_differences": list(self.differences),
            "count_differences_total": self.differences_total,
            "warnings": st.warnings,
        }
        if self.verify:
            report["verify"] = self.verify
            report["divergences"] = sorted(self.divergences.values(), key=lambda r: (-r["count"], r["op"], r["ns"]))
            report["divergences_total"] = self.divergences_total
            report["documents_not_compared"] = self.not_compared
        if replayer is not None:
            duration = (replayer.finished_ns - replayer.started_ns) / 1e9
            n = self.replayed_ops
            report["replayed"] = {
                "operations": n,
                "duration_s": round(duration, 3),
                "ops_per_s": round(n / duration, 1) if duration > 0 else None,
                "errors": self.replayed_errors,
                "max_lag_ms": None if speed is None else _ms(replayer.max_lag_ns),
                "schedule_s": None if speed is None else round(replayable_span / speed, 3),
                "sessions": _size(replayer.sessions),
                "cursors": _size(replayer.cursors),
                "connections": getattr(replayer, "connections", None),
                "scale": getattr(replayer, "scale", 1),
            }
        else:
            report["would_replay"] = list(self.would_replay)
            report["would_replay_total"] = self.replayable
        return report

    def latencies(self, op: str | None = None, replayed: bool = True) -> list:
        """The kept latency samples (ns) of one op, or of all."""
        out: list = []
        for (name, _), g in self.groups.items():
            if op is None or name == op:
                out.extend((g.rep if replayed else g.rec).values)
        return out


def command_shape(spec: dict | None, limit: int = 200) -> str:
    """The command with every value but its collection replaced by "?" (no data in a report)."""

    def walk(v: Any, depth: int) -> Any:
        if depth > 6:
            return "?"
        if isinstance(v, Mapping):
            return {k: walk(x, depth + 1) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x, depth + 1) for x in v[:1]]
        return "?"

    if not spec:
        return ""
    items = list(spec.items())
    out = {items[0][0]: items[0][1] if isinstance(items[0][1], str) else "?"}
    for k, v in items[1:]:
        out[k] = walk(v, 0)
    text = json.dumps(out, separators=(",", ":"), default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _size(x: Any) -> int:
    if isinstance(x, list):
        return sum(len(m) for m in x)
    return len(x)


def build_report(
    workload: Workload,
    replayer: Any,
    filters: Filters,
    target: str,
    speed: float | None,
    dry_run: bool = False,
) -> dict:
    """The report of a Workload held in memory whose ops carry their replayed outcomes (tools and tests)."""
    stream = Stream(
        workload.files,
        workload.warnings,
        workload.packets,
        0,
        workload.flows,
        workload.mongo_flows,
        len(workload.connections),
        len(workload.ops),
        workload.start_ns,
        workload.end_ns,
        dict(workload.conversions),
    )
    tally = Tally(stream, filters, target, speed, dry_run)
    for o in workload.ops:
        skip = o.skip if o.skip == SKIP_CURSOR else ""
        if not skip:
            tally.seen(o)
        if not dry_run and (o.replayed is not None or skip):
            tally.result(o, 0, o.replayed, o.replayed_ns, skip)
    return tally.report(replayer)


def _count(names: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return dict(sorted(out.items()))


def _skipped_text(report: dict) -> str:
    """The "not replayed" line: each reason and its count; destructive commands by name, with the flag."""
    parts = []
    for k, v in sorted(report["skipped"].items()):
        if k == SKIP_DESTRUCTIVE and report.get("not_sent_destructive"):
            names = ", ".join(report["not_sent_destructive"])
            parts.append(f"{k} {v} ({names}: --allow-destructive sends them)")
        else:
            parts.append(f"{k} {v}")
    return "not replayed: " + ", ".join(parts)


def _iso(ns: int) -> str | None:
    if not ns:
        return None
    import datetime

    return datetime.datetime.fromtimestamp(ns / 1e9, datetime.UTC).isoformat(timespec="milliseconds")


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def print_report(report: dict, console: Any) -> None:
    """The terminal form of the report: a table per op and namespace, then errors, differences and lag."""
    from rich.table import Table

    dry = report["dry_run"]
    title = "would replay" if dry else "replay report"
    table = Table(title=f"{title}: recorded vs replayed latency (ms)" if not dry else title, show_lines=False)
    table.add_column("op")
    table.add_column("namespace")
    table.add_column("count", justify="right")
    table.add_column("rec p50", justify="right")
    table.add_column("rec p90", justify="right")
    table.add_column("rec p99", justify="right")
    if not dry:
        table.add_column("replay p50", justify="right")
        table.add_column("replay p90", justify="right")
        table.add_column("replay p99", justify="right")
        table.add_column("errors rec/replay", justify="right")
    for row in report["by_op"]:
        r, p = row["recorded_ms"], row["replayed_ms"]
        cells = [row["op"], row["ns"] or "-", str(row["count"]), _fmt(r["p50"]), _fmt(r["p90"]), _fmt(r["p99"])]
        if not dry:
            cells += [
                _fmt(p["p50"]),
                _fmt(p["p90"]),
                _fmt(p["p99"]),
                f"{row['recorded_errors']}/{row['replayed_errors']}",
            ]
        table.add_row(*cells)
    console.print(table)
    rec = report["recorded"]
    console.print(
        f"recorded: {rec['operations']} commands on {rec['connections']} connections over "
        f"{rec['span_s']:.3f}s ({rec['ops_per_s'] or '-'} ops/s) from {len(report['files'])} file(s)"
    )
    if report["skipped"]:
        console.print(_skipped_text(report))
    if report.get("conversions"):
        console.print("legacy requests converted: " + ", ".join(f"{k} x{v}" for k, v in report["conversions"].items()))
    if dry:
        console.print(
            f"would replay {report['would_replay_total']} operations"
            + (f" with {report['filters']}" if report["filters"] else "")
        )
    else:
        rp = report["replayed"]
        lag = "n/a (--max-speed)" if rp["max_lag_ms"] is None else f"{rp['max_lag_ms']:.1f} ms"
        console.print(
            f"replayed: {rp['operations']} operations in {rp['duration_s']:.3f}s ({rp['ops_per_s']} ops/s), "
            f"speed {report['speed']}, max lag behind schedule {lag}, {rp['sessions']} session(s), "
            f"{rp['cursors']} cursor(s) remapped"
        )
        for label, key in (("new errors", "new_errors"), ("errors gone", "gone_errors")):
            rows = report[key]
            console.print(f"{label}: {sum(e['count'] for e in rows)}")
            for e in rows[:20]:
                console.print(f"  {e['count']} x {e['op']} {e['ns']}: {e['error']}: {e['example']}")
        diffs = report["count_differences"]
        console.print(f"document count differences: {report['count_differences_total']}")
        for d in diffs[:20]:
            console.print(
                f"  {d['op']} {d['ns']} (connection {d['connection']}, at {d['at_s']}s): {d['field']} "
                f"recorded {d['recorded']}, replayed {d['replayed']}" + (f" ({d['note']})" if d.get("note") else "")
            )
    if "divergences" in report:
        print_divergences(report, console)
    if report.get("scale_sweep"):
        print_sweep(report["scale_sweep"], console)
    for w in report["warnings"][:50]:
        console.print(f"warning: {w}", style="yellow")


def print_divergences(report: dict, console: Any) -> None:
    """The divergence table of `--verify`: by shape and kind, with an example."""
    from rich.table import Table

    rows = report["divergences"]
    console.print(f"divergences ({report['verify']}): {report['divergences_total']}")
    if report.get("documents_not_compared"):
        console.print(
            f"cursors whose documents were not compared (over {MAX_CURSOR_DOCUMENTS} documents, or forgotten): "
            f"{report['documents_not_compared']}"
        )
    if not rows:
        return
    table = Table(title="divergences: recorded vs replayed reply")
    for col in ("op", "namespace", "kind", "count", "shape", "example"):
        table.add_column(col, justify="right" if col == "count" else "left")
    for r in rows[:50]:
        table.add_row(r["op"], r["ns"] or "-", r["kind"], str(r["count"]), r["shape"], r["example"])
    console.print(table)


def print_sweep(rows: list, console: Any) -> None:
    """The --scale sweep: throughput and latency per step."""
    from rich.table import Table

    table = Table(title="scale sweep: throughput and latency per step")
    for col in ("scale", "connections", "operations", "offered ops/s", "ops/s", "p50 ms", "p90 ms", "p99 ms", "errors"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["scale"]),
            str(r["connections"]),
            str(r["operations"]),
            _fmt(r["offered_ops_per_s"]),
            _fmt(r["ops_per_s"]),
            _fmt(r["p50_ms"]),
            _fmt(r["p90_ms"]),
            _fmt(r["p99_ms"]),
            str(r["errors"]),
        )
    console.print(table)
