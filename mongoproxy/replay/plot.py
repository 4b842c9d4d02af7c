"""The latency plot: a CDF per busiest op, recorded against replayed, as PNG (needs matplotlib)."""

from __future__ import annotations

import math
from typing import Any

PLOT_EXTRA = "pip install 'mongoproxy[plot]'"


def write_plot(tally: Any, path: str) -> None:
    """A latency CDF per busiest op, recorded (dashed) against replayed (solid), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    counts: dict[str, int] = {}
    for (name, _), g in tally.groups.items():
        counts[name] = counts.get(name, 0) + g.count
    panels = [("all commands", None)] + [(name, name) for name, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:5]]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, group) in zip(axes.flat, panels):
        shown: list = []
        for label, values, style in (
            ("recorded", tally.latencies(group, replayed=False), "--"),
            ("replayed", tally.latencies(group), "-"),
        ):
            if not values:
                continue
            xs = sorted(v / 1e6 for v in values)
            shown += (xs[0], xs[-1])
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step([xs[0]] + xs, [0.0] + ys, style, where="post", label=f"{label} (n={len(xs)})")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ticks = FuncFormatter(lambda v, _: f"{v:.3g}")
        ax.xaxis.set_major_formatter(ticks)
        if shown:
            ax.set_xlim(max(min(shown), 1e-6) / 1.5, max(shown) * 1.5)
        lo, hi = ax.get_xlim()
        if hi < lo * 30:  # within about a decade there are too few powers of ten to read: label 2x and 5x too
            ax.xaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
            ax.xaxis.set_minor_formatter(ticks)
        else:
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(name)
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of commands")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("mongoproxy replay: latency CDF, recorded vs replayed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_sweep_plot(rows: list, path: str) -> None:
    """Latency (p50, p90, p99) against offered load (or throughput at --max-speed), one point per --scale step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    timed = all(r["offered_ops_per_s"] for r in rows)
    xs = [r["offered_ops_per_s"] if timed else r["ops_per_s"] for r in rows]
    for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        ax.plot(xs, [r[f"{q}_ms"] for r in rows], style, label=q)
    for x, r in zip(xs, rows):
        ax.annotate(f"x{r['scale']}", (x, r["p50_ms"]), textcoords="offset points", xytext=(4, -12), fontsize="small")
    ax.set_xlabel("offered load (ops/s)" if timed else "throughput (ops/s, --max-speed)")
    ax.set_ylabel("replayed latency (ms)")
    ax.set_title("mongoproxy replay --scale: latency against load")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
