"""Tables of a digest document (docs/digest.md): plain text for pipes and recordings, rich for `mongoproxy top`."""

from __future__ import annotations

from typing import Any

COLUMNS = ("total ms", "%", "count", "err", "p50", "p95", "p99", "max", "namespace", "op", "app", "shape")
SORT_KEYS = {"t": "total_time", "p": "p99", "c": "count", "e": "errors"}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def ns_of(s: dict) -> str:
    """db.collection, or db alone."""
    return f"{s['db']}.{s['collection']}" if s["collection"] else s["db"] or "-"


def rows(doc: dict) -> list[tuple[str, ...]]:
    """One text tuple per shape, in COLUMNS order."""
    grand = sum(s["latency_ms"]["total"] for s in doc["shapes"]) or 1.0
    out: list[tuple[str, ...]] = []
    for s in doc["shapes"]:
        lat = s["latency_ms"]
        errors = sum(s["errors"].values())
        out.append(
            (
                f"{lat['total']:.1f}",
                f"{100 * lat['total'] / grand:.1f}",
                str(s["count"]),
                str(errors),
                _ms(lat["p50"]),
                _ms(lat["p95"]),
                _ms(lat["p99"]),
                _ms(lat["max"]),
                ns_of(s),
                s["op"],
                s["app"] or "-",
                s["shape"] or "-",
            )
        )
    return out


def plain_table(doc: dict, examples: bool = False) -> str:
    """Fixed-width text table (no colour), then each shape's example and errors when `examples`."""
    body = rows(doc)
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(COLUMNS)]
    numeric = 8

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i < numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [
        f"# digest since {doc['since']}: {len(doc['shapes'])} of {doc['shape_count']} shapes, "
        f"{doc['evictions']} evicted; latency in ms",
        line(COLUMNS),
    ]
    out += [line(r) for r in body]
    if examples:
        for rank, s in enumerate(doc["shapes"], 1):
            out.append("")
            out.append(f"# {rank}. {ns_of(s)} {s['op']} app={s['app'] or '-'} shape={s['shape'] or '-'}")
            out.append(f"#    first seen {s['first_seen']}, last seen {s['last_seen']}")
            out.append(
                f"#    docs returned {s['docs_returned']}, changed {s['docs_changed']}; "
                f"bytes in {s['request_bytes']}, out {s['reply_bytes']}"
            )
            if s["errors"]:
                out.append("#    errors " + ", ".join(f"{k}={v}" for k, v in sorted(s["errors"].items())))
            out.append(s["example"] or "(no query text)")
    return "\n".join(out) + "\n"


def rich_table(doc: dict, selected: int, sort: str) -> Any:
    """A rich Table of the document; the selected row is highlighted."""
    from rich.table import Table

    sort_col = {"total_time": 0, "p99": 6, "count": 2, "errors": 3}.get(sort, 0)
    table = Table(expand=True, header_style="bold", pad_edge=False, box=None)
    for i, c in enumerate(COLUMNS):
        name = c + (" ▼" if i == sort_col else "")
        if i < 8:
            table.add_column(name, justify="right", no_wrap=True)
        else:
            table.add_column(name, no_wrap=True, overflow="ellipsis", ratio=1 if c in ("namespace", "shape") else None)
    for i, (r, s) in enumerate(zip(rows(doc), doc["shapes"])):
        style = "reverse" if i == selected else ("red" if s["errors"] else None)
        table.add_row(*r, style=style)
    return table
