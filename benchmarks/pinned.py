"""CPU per small round trip with the proxies pinned to CPU 1 and the client and backend to CPU 0.

    python -m benchmarks.pinned [--baseline CHECKOUT] [--repeat N]

The hot-path scenario lets the scheduler place each process, and a process keeps its placement for a whole run:
its repetitions agree while runs disagree by more than an optimisation moves. Pinning removes that: every proxy
(mongoproxy, haproxy, and another checkout's mongoproxy with --baseline) shares CPU 1, the client and the
backend CPU 0. Prints each repetition's CPU µs per round trip and added p50 latency, then the medians and the
ratios (Linux only: sched_setaffinity; needs 2 CPUs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

from benchmarks import procs, scenarios


def main(argv: list[str] | None = None) -> int:
    """Run the pinned comparison and print it."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pinned", description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", metavar="DIR", help="another checkout (built in place) to run beside this one")
    ap.add_argument("--repeat", type=int, default=6, help="interleaved repetitions of 10 x 1,000 round trips")
    args = ap.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        print("benchmarks.pinned: needs 2 CPUs", file=sys.stderr)
        return 2
    wd = tempfile.mkdtemp(prefix="mongoproxy-pinned-")
    os.sched_setaffinity(0, {0})
    started: list[procs.Proc] = []
    try:
        backend = procs.start_backend(200, wd)
        started.append(backend)
        os.sched_setaffinity(backend.pid, {0})
        targets = {"mongoproxy": procs.start_mongoproxy("mongoproxy", backend.port, wd)}
        if args.baseline:
            targets["baseline"] = procs.start_mongoproxy("baseline", backend.port, wd, root=args.baseline)
        targets["haproxy"] = procs.start_haproxy(backend.port, wd)
        for p in targets.values():
            started.append(p)
            for tid in os.listdir(f"/proc/{p.pid}/task"):
                os.sched_setaffinity(int(tid), {1})
        ports = {n: p.port for n, p in targets.items()} | {"direct": backend.port}
        runs = []
        for _ in range(args.repeat):
            out = scenarios.small_round_trip_raw(targets, ports, 10, 1000)
            row = {n: out["cpu"][n]["us_per_request"] for n in targets}
            row |= {f"{n} added p50": out["latency"][n]["added_p50_us"] for n in targets}
            runs.append(row)
            print("  ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    finally:
        for p in reversed(started):
            p.stop()
    for key in runs[0]:
        xs = [r[key] for r in runs]
        print(f"{key}: median {statistics.median(xs):.1f} (min {min(xs):.1f}, max {max(xs):.1f})")
    pairs = [("mongoproxy", "haproxy")] + (
        [("mongoproxy", "baseline"), ("baseline", "haproxy")] if args.baseline else []
    )
    for a, b in pairs:
        rs = [r[a] / r[b] for r in runs]
        print(f"{a} ÷ {b}: {statistics.median(rs):.2f}× ({min(rs):.2f}–{max(rs):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
