"""The report: recorded against replayed latency per op and namespace, new and gone errors, count differences."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from mongoproxy.replay.model import SKIP_CURSOR, SKIP_DESTRUCTIVE, Workload
from mongoproxy.replay.target import redact_uri

if TYPE_CHECKING:
    from mongoproxy.replay.filters import Filters
    from mongoproxy.replay.runner import Replayer


def percentile(values: list, q: float) -> float | None:
    """Nearest-rank percentile of values (None when empty)."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


def build_report(
    workload: Workload,
    replayer: Replayer | None,
    filters: Filters,
    target: str,
    speed: float | None,
    dry_run: bool = False,
) -> dict:
    """The JSON report (its field names are documented in docs/capture-replay.md)."""
    ops = workload.ops
    replayed = [o for o in ops if not o.skip and (dry_run or o.replayed is not None)]
    groups: dict[tuple, list] = {}
    for o in replayed:
        groups.setdefault((o.op, o.ns), []).append(o)
    by_op = []
    for (name, ns), group in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        rec = [o.recorded_ns for o in group if o.recorded_ns is not None]
        rep = [o.replayed_ns for o in group if o.replayed_ns is not None]
        by_op.append(
            {
                "op": name,
                "ns": ns,
                "count": len(group),
                "recorded_ms": {f"p{q}": _ms(percentile(rec, q)) for q in (50, 90, 99)},
                "replayed_ms": {f"p{q}": _ms(percentile(rep, q)) for q in (50, 90, 99)},
                "recorded_errors": sum(1 for o in group if o.recorded is not None and o.recorded.failed),
                "replayed_errors": sum(1 for o in group if o.replayed is not None and o.replayed.failed),
            }
        )
    new_errors: dict[tuple, dict] = {}
    gone_errors: dict[tuple, dict] = {}
    differences = []
    for o in replayed:
        rec, rep = o.recorded, o.replayed
        if rep is None:
            continue
        rec_failed = rec is not None and rec.failed
        if rep.failed and not rec_failed:
            k = (o.op, o.ns, rep.error_name)
            e = new_errors.setdefault(
                k,
                {
                    "op": o.op,
                    "ns": o.ns,
                    "error": rep.error_name,
                    "code": rep.code,
                    "count": 0,
                    "example": rep.errmsg[:300],
                },
            )
            e["count"] += 1
        elif rec_failed and not rep.failed:
            k = (o.op, o.ns, rec.error_name)
            e = gone_errors.setdefault(
                k,
                {
                    "op": o.op,
                    "ns": o.ns,
                    "error": rec.error_name,
                    "code": rec.code,
                    "count": 0,
                    "example": rec.errmsg[:300],
                },
            )
            e["count"] += 1
        if rec is not None:
            for field in ("returned", "n"):
                a, b = getattr(rec, field), getattr(rep, field)
                if a is not None and b is not None and a != b:
                    differences.append(
                        {
                            "op": o.op,
                            "ns": o.ns,
                            "connection": o.conn.index,
                            "field": field,
                            "recorded": a,
                            "replayed": b,
                            "at_s": round((o.ts_ns - workload.start_ns) / 1e9, 3),
                        }
                    )
    cursor_skips = [o for o in ops if o.skip == SKIP_CURSOR]
    for o in cursor_skips:
        if o.recorded is not None and o.recorded.returned:
            differences.append(
                {
                    "op": o.op,
                    "ns": o.ns,
                    "connection": o.conn.index,
                    "field": "returned",
                    "recorded": o.recorded.returned,
                    "replayed": None,
                    "at_s": round((o.ts_ns - workload.start_ns) / 1e9, 3),
                    "note": "not sent: the cursor was already closed on the target",
                }
            )
    span = (workload.end_ns - workload.start_ns) / 1e9
    times = [o.ts_ns for o in workload.ops if not o.skip or o.skip == SKIP_CURSOR]
    replayable_span = (max(times) - min(times)) / 1e9 if times else 0.0
    report: dict[str, Any] = {
        "files": workload.files,
        "target": redact_uri(target) if target else None,
        "dry_run": dry_run,
        "speed": "max" if speed is None else speed,
        "filters": filters.describe(),
        "recorded": {
            "start": _iso(workload.start_ns),
            "span_s": round(span, 3),
            "connections": len(workload.connections),
            "operations": len(ops),
            "packets": workload.packets,
            "tcp_connections": workload.flows,
            "mongodb_connections": workload.mongo_flows,
            "ops_per_s": round(len(ops) / span, 1) if span > 0 else None,
            "replayable_span_s": round(replayable_span, 3),
        },
        "skipped": workload.skipped(),
        "not_sent_destructive": _count(o.op for o in ops if o.skip == SKIP_DESTRUCTIVE),
        "by_op": by_op,
        "new_errors": sorted(new_errors.values(), key=lambda e: -e["count"]),
        "gone_errors": sorted(gone_errors.values(), key=lambda e: -e["count"]),
        "count_differences": differences[:1000],
        "count_differences_total": len(differences),
        "warnings": workload.warnings,
    }
    if replayer is not None:
        duration = (replayer.finished_ns - replayer.started_ns) / 1e9
        n = len(replayed)
        report["replayed"] = {
            "operations": n,
            "duration_s": round(duration, 3),
            "ops_per_s": round(n / duration, 1) if duration > 0 else None,
            "errors": sum(1 for o in replayed if o.replayed is not None and o.replayed.failed),
            "max_lag_ms": None if speed is None else _ms(replayer.max_lag_ns),
            "schedule_s": None if speed is None else round(replayable_span / speed, 3),
            "sessions": len(replayer.sessions),
            "cursors": len(replayer.cursors),
        }
    else:
        report["would_replay"] = [
            {"at_s": round((o.ts_ns - workload.start_ns) / 1e9, 6), "connection": o.conn.index, "op": o.op, "ns": o.ns}
            for o in replayed
        ]
    return report


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
    if dry:
        console.print(
            f"would replay {len(report['would_replay'])} operations"
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
    for w in report["warnings"][:50]:
        console.print(f"warning: {w}", style="yellow")
