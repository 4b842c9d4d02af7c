"""The cold pass: what one pass of observation costs between two socket reads, against one right after another.

    python -m benchmarks.coldpass [--repeat N] [--round-trips N] [--pinned] [--quick]

The in-process figures (benchmarks.tapcost, bench_sinks) run the tap in a loop, with every cache warm. In the
proxy a message arrives after the kernel, the client and the backend have run on the same cores, and one pass
runs alone before the proxy sleeps again. This measures the difference, over real sockets, by feeding each
chunk to several independent copies of a layer's observation (`breakdown --serve LAYER --copies K`: K taps,
each with its own tracker, connection and sinks, fed the same chunks one after another):

    cold pass = row(LAYER x1) - row(bare)              the first copy, with the caches as the others left them
    warm pass = (row(LAYER x4) - row(LAYER x2)) / 2    each further copy, right after the one before

Rows are user CPU µs per raw-socket round trip (utime from /proc/PID/stat: the kernel's share is the same for
every row, since every row makes the same system calls), the median over interleaved repetitions and the
min–max. Linux only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

from benchmarks import procs, scenarios

# (label, layer, copies); copies 0 loads the layer's modules and sinks and makes no tap (the imports' share).
ROWS = (
    ("bare", "bare", 1),
    ("tap x0", "tap", 0),
    ("tap x1", "tap", 1),
    ("tap x2", "tap", 2),
    ("tap x4", "tap", 4),
    ("+metrics x1", "+metrics", 1),
    ("+metrics x2", "+metrics", 2),
    ("+metrics x4", "+metrics", 4),
    ("+digest x1", "+digest", 1),
    ("+digest x2", "+digest", 2),
    ("+digest x4", "+digest", 4),
)


def run(workdir: str, repeats: int, round_trips: int, pinned: bool = False) -> dict:
    """Start every row's process and the backend; `repeats` interleaved runs; user CPU µs per round trip.

    pinned: the rows' processes on CPU 1, this client and the backend on CPU 0 (as benchmarks.pinned).
    """
    started: list[procs.Proc] = []
    if pinned:
        os.sched_setaffinity(0, {0})
    try:
        backend = procs.start_backend(200, workdir)
        started.append(backend)
        if pinned:
            os.sched_setaffinity(backend.pid, {0})
        targets = {}
        for label, layer, copies in ROWS:
            cmd = [sys.executable, "-m", "benchmarks.breakdown", "--serve", layer, "--upstream", str(backend.port)]
            p = procs.Proc(
                label,
                [*cmd, "--copies", str(copies)],
                0,
                procs._env(),
                os.path.join(workdir, f"coldpass-{label.strip('+').replace(' ', '-')}.err"),
            )
            started.append(p)
            if pinned:
                os.sched_setaffinity(p.pid, {1})
            p.read_ready(30)
            targets[label] = p
        request = scenarios.small_find()
        clients = {label: scenarios.RawClient(p.port) for label, p in targets.items()}
        for client in clients.values():  # warm up: connections, caches of names and shapes, the bin keys
            for _ in range(min(2000, round_trips)):
                client.roundtrip(request)
        runs: dict[str, list[float]] = {label: [] for label in targets}
        for i in range(repeats):
            print(f"[coldpass] repetition {i + 1}/{repeats}: {round_trips} round trips per row", file=sys.stderr)
            for label in scenarios.turns(list(targets), i):
                p, client = targets[label], clients[label]
                before = procs.user_ns(p.pid)
                for _ in range(round_trips):
                    client.roundtrip(request)
                runs[label].append((procs.user_ns(p.pid) - before) / round_trips / 1000)
        for client in clients.values():
            client.close()
    finally:
        for proc in reversed(started):
            proc.stop()
    rows = {
        label: {"median_us": statistics.median(xs), "min_us": min(xs), "max_us": max(xs), "runs_us": xs}
        for label, xs in runs.items()
    }
    return {
        "rows": rows,
        "repeats": repeats,
        "round_trips": round_trips,
        "pinned": pinned,
        "load_average": os.getloadavg(),
    }


def passes(res: dict) -> dict[str, dict[str, list[float]]]:
    """Per layer: the cold and warm pass of each repetition (µs), as the module's docstring defines them."""
    rows = res["rows"]
    out = {}
    for layer in ("tap", "+metrics", "+digest"):
        one, two, four = (rows[f"{layer} x{k}"]["runs_us"] for k in (1, 2, 4))
        base = rows["bare"]["runs_us"] if layer == "tap" else rows["tap x1"]["runs_us"]
        # x2 and x4 both carry the copies' wrapper (one Python frame per chunk), so their difference does not.
        out[layer] = {
            "cold_us": [a - b for a, b in zip(one, base)],
            "warm_us": [(f - t) / 2 for f, t in zip(four, two)],
        }
    return out


def render(res: dict) -> str:
    """The rows and the passes as Markdown."""
    lines = [
        f"User CPU µs per small round trip: median of {res['repeats']} interleaved repetitions of "
        f"{res['round_trips']} raw-socket round trips (min–max)"
        + (", the proxies pinned to CPU 1 and the client and the backend to CPU 0" if res["pinned"] else ""),
        "",
        "| row | user CPU µs / round trip | min–max |",
        "|---|---:|---:|",
    ]
    for label, row in res["rows"].items():
        lines.append(f"| {label} | {row['median_us']:.1f} | {row['min_us']:.1f}–{row['max_us']:.1f} |")
    lines += ["", "| layer | cold pass µs (min–max) | warm pass µs (min–max) |", "|---|---:|---:|"]
    for layer, p in passes(res).items():
        under = "bare" if layer == "tap" else "tap x1"
        cells = [f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f})" for xs in (p["cold_us"], p["warm_us"])]
        lines.append(f"| {layer} | {cells[0]} over {under} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print it."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.coldpass", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5, help="interleaved repetitions")
    ap.add_argument("--round-trips", type=int, default=20000, help="round trips per row and repetition")
    ap.add_argument("--quick", action="store_true", help="2 repetitions of 300 round trips (a smoke run)")
    ap.add_argument("--pinned", action="store_true", help="rows on CPU 1, the client and the backend on CPU 0")
    args = ap.parse_args(argv)
    if args.pinned and len(os.sched_getaffinity(0)) < 2:
        print("benchmarks.coldpass: --pinned needs 2 CPUs", file=sys.stderr)
        return 2
    repeats, round_trips = (2, 300) if args.quick else (args.repeat, args.round_trips)
    with tempfile.TemporaryDirectory(prefix="mongoproxy-coldpass-") as wd:
        res = run(wd, repeats, round_trips, args.pinned)
    print(render(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
