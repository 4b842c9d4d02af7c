"""`mongoproxy replay`: the command line, from flags to the report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from mongoproxy.errors import ConfigError, ReplayError
from mongoproxy.replay.extract import expand_inputs, iter_ops
from mongoproxy.replay.filters import Filters, StreamFilter
from mongoproxy.replay.model import Op, Stream
from mongoproxy.replay.plot import PLOT_EXTRA, write_plot, write_sweep_plot
from mongoproxy.replay.reader import REPLAY_EXTRA
from mongoproxy.replay.report import Tally, percentile, print_report
from mongoproxy.replay.runner import DEFAULT_WINDOW, Replayer
from mongoproxy.replay.target import Target


def _positive_float(flag: str) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number (e.g. 2 or 0.5)") from None
        if not x > 0 or x == float("inf"):
            raise argparse.ArgumentTypeError(f"{flag} must be a positive number, got {value!r}")
        return x

    return parse


def _non_negative_float(flag: str) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number (e.g. 30 or 0.5)") from None
        if not x >= 0 or x == float("inf"):
            raise argparse.ArgumentTypeError(f"{flag} must be 0 (no timeout) or a positive number, got {value!r}")
        return x

    return parse


def _items(values: list | None) -> tuple:
    out: list[str] = []
    for v in values or ():
        out.extend(x.strip() for x in str(v).split(",") if x.strip())
    return tuple(out)


def _scales(value: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give a number of copies or a list such as 1,2,4,8") from None
    if not steps or any(n < 1 or n > 1000 for n in steps):
        raise argparse.ArgumentTypeError(f"--scale {value!r}: each step must be from 1 to 1000")
    return steps


def add_parser(subparsers: Any) -> None:
    """Register `mongoproxy replay`."""
    p = subparsers.add_parser(
        "replay",
        help="replay recorded traffic against a server and compare",
        description="Replay MongoDB traffic recorded by `mongoproxy run --record DIR` (pcapng) or captured with "
        "tcpdump (pcap/pcapng) against a target server, keeping each connection's order and the relative timing, "
        "and report recorded against replayed latency, new or gone errors and document count differences.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="capture files; a directory stands for its *.pcapng/*.pcap")
    p.add_argument("--target", metavar="URI", help="MongoDB URI to replay against (its credentials are used)")
    timing = p.add_mutually_exclusive_group()
    timing.add_argument(
        "--speed",
        type=_positive_float("--speed"),
        default=1.0,
        metavar="X",
        help="replay X times as fast as recorded (default 1)",
    )
    timing.add_argument(
        "--max-speed",
        action="store_true",
        help="ignore recorded timing: each connection runs its commands back to back",
    )
    p.add_argument(
        "--read-only",
        action="store_true",
        help="replay only find, aggregate without $out/$merge, count, "
        "distinct, getMore (and killCursors for their cursors)",
    )
    p.add_argument(
        "--include-ns",
        action="append",
        metavar="NS",
        help="replay only these namespaces: db.collection, db.* or db (comma-separated, repeatable)",
    )
    p.add_argument("--exclude-ns", action="append", metavar="NS", help="do not replay these namespaces")
    p.add_argument(
        "--ops",
        action="append",
        metavar="OPS",
        help="replay only these commands (find,insert); !name leaves one out (!count)",
    )
    p.add_argument(
        "--allow-destructive",
        action="store_true",
        help="also replay destructive admin commands (dropDatabase, dropUser, shutdown, replSetReconfig, ...), "
        "which are not sent by default",
    )
    p.add_argument("--report", metavar="PATH.json", help="write the report as JSON")
    p.add_argument(
        "--plot",
        metavar="PATH.png",
        help="write a latency CDF plot, recorded against replayed (needs matplotlib: " + PLOT_EXTRA + ")",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be replayed, with the filters applied, and send nothing"
    )
    p.add_argument(
        "--connect-timeout",
        type=_positive_float("--connect-timeout"),
        default=5.0,
        metavar="S",
        help="seconds to wait for the target on each attempt (default 5)",
    )
    p.add_argument(
        "--connect-retries",
        type=int,
        default=5,
        metavar="N",
        help="attempts to reach the target, with backoff, before giving up (default 5)",
    )
    p.add_argument(
        "--socket-timeout",
        type=_non_negative_float("--socket-timeout"),
        default=60.0,
        metavar="S",
        help="seconds to wait for each reply before counting a NetworkTimeout error (default 60; 0: no timeout)",
    )
    p.add_argument(
        "--verify",
        nargs="?",
        const="counts",
        choices=("counts", "documents"),
        help="compare each replayed reply with the recorded one: ok, error code and document counts, or with "
        "`documents` also the normalised documents; the report gains a divergence table",
    )
    p.add_argument(
        "--max-divergences",
        type=int,
        default=0,
        metavar="N",
        help="with --verify: exit with status 1 when more than N replies diverge (default 0), to gate a pipeline",
    )
    p.add_argument(
        "--scale",
        type=_scales,
        default=(1,),
        metavar="N[,N...]",
        help="run N copies of every recorded connection at once; a list (1,2,4,8) runs a sweep and reports "
        "throughput and latency per step (--plot then plots latency against offered load)",
    )
    p.add_argument(
        "--scale-ns-suffix",
        metavar="SUFFIX",
        help="copy k>0 of --scale uses collection<SUFFIX>k instead of the recorded collection (its writes and reads)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=DEFAULT_WINDOW,
        metavar="N",
        help=f"operations read ahead of the replay at most (default {DEFAULT_WINDOW}); memory is bounded by it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run `mongoproxy replay`."""
    try:
        from rich.console import Console
    except ImportError:
        raise ConfigError(
            f"replay shows its progress and report with rich, which is not installed: {REPLAY_EXTRA}"
        ) from None
    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False) if sys.stdout.isatty() else Console(width=160, highlight=False)
    if not args.dry_run and not args.target:
        raise ConfigError("replay needs --target URI (the server to replay against), or --dry-run")
    if args.connect_retries < 1:
        raise ConfigError("--connect-retries must be at least 1")
    if args.window < 1:
        raise ConfigError("--window must be at least 1")
    if args.max_divergences < 0:
        raise ConfigError("--max-divergences must be 0 or more")
    for flag, path in (("--report", args.report), ("--plot", args.plot)):
        if path:
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                raise ConfigError(f"{flag} {path}: directory {directory} does not exist")
    if args.plot and not args.dry_run:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ConfigError(f"--plot needs matplotlib: {PLOT_EXTRA}") from None
    filters = Filters(
        read_only=args.read_only,
        include_ns=_items(args.include_ns),
        exclude_ns=_items(args.exclude_ns),
        ops=_items(args.ops),
        allow_destructive=args.allow_destructive,
    )
    for ns in filters.include_ns + filters.exclude_ns:
        if not ns.split(".", 1)[0]:
            raise ConfigError(f"namespace {ns!r}: give db.collection, db.* or db")
    speed = None if args.max_speed else args.speed
    expand_inputs(args.files)  # a missing file is named before anything connects
    if args.dry_run:
        stream = Stream([])
        tally = Tally(stream, filters, args.target or "", speed, dry_run=True)
        decide = StreamFilter(filters, [])
        for x in iter_ops(args.files, stream):
            if isinstance(x, Op):
                decide(x)
                tally.seen(x)
        decide.files = stream.files
        decide.check(stream.operations, stream.warnings)
        report = tally.report()
        print_report(report, out)
        if args.report:
            _write_json(args.report, report)
        return 0
    target = Target(args.target, args.connect_timeout, args.connect_retries, args.socket_timeout)
    sweep: list[dict] = []
    try:
        target.wait_ready(lambda msg: err.print(msg, style="yellow"))
        for scale in args.scale:
            stream = Stream([])
            tally = Tally(stream, filters, args.target, speed, verify=args.verify)
            decide = StreamFilter(filters, [])
            ops = iter_ops(args.files, stream, keep_documents=args.verify == "documents")
            replayer = Replayer(
                ops, target, speed, tally, decide, scale, args.verify, args.scale_ns_suffix, args.window
            )
            _run_with_progress(replayer, err, not args.no_progress and err.is_terminal)
            decide.files = stream.files
            decide.check(stream.operations, stream.warnings)
            report = tally.report(replayer)
            sweep.append(_sweep_row(scale, report, tally))
    finally:
        target.close()
    if len(args.scale) > 1:
        report["scale_sweep"] = sweep
    print_report(report, out)
    if args.report:
        _write_json(args.report, report)
        err.print(f"report written to {args.report}")
    if args.plot:
        if len(args.scale) > 1:
            write_sweep_plot(sweep, args.plot)
        else:
            write_plot(tally, args.plot)
        err.print(f"plot written to {args.plot}")
    if args.verify and report["divergences_total"] > args.max_divergences:
        err.print(
            f"{report['divergences_total']} replies diverge from the recording, more than --max-divergences "
            f"{args.max_divergences}"
        )
        return 1
    return 0


def _sweep_row(scale: int, report: dict, tally: Tally) -> dict:
    """One step of a --scale sweep: offered load, throughput and latency."""
    rp = report["replayed"]
    span = report["recorded"]["replayable_span_s"]
    schedule = rp["schedule_s"]
    offered = round(rp["operations"] / schedule, 1) if schedule else None
    lat = tally.latencies()
    return {
        "scale": scale,
        "connections": rp["connections"],
        "operations": rp["operations"],
        "duration_s": rp["duration_s"],
        "ops_per_s": rp["ops_per_s"],
        "offered_ops_per_s": offered if span else None,
        "p50_ms": _ms(percentile(lat, 50)),
        "p90_ms": _ms(percentile(lat, 90)),
        "p99_ms": _ms(percentile(lat, 99)),
        "errors": rp["errors"],
    }


def _ms(ns: float | None) -> float | None:
    return None if ns is None else round(ns / 1e6, 3)


def _write_json(path: str, report: dict) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
            f.write("\n")
    except OSError as exc:
        raise ReplayError(f"--report {path}: cannot write ({exc.strerror})") from None


def _run_with_progress(replayer: Replayer, console: Any, show: bool) -> None:
    if not show:
        replayer.run()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("replaying"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("ops"),
        TextColumn("lag {task.fields[lag]}"),
        TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("replay", total=None, lag="-", errors=0)

        def tick(r: Replayer) -> None:
            lag = "n/a" if r.speed is None else f"{r.current_lag_ns / 1e6:.0f} ms (max {r.max_lag_ns / 1e6:.0f})"
            progress.update(task, completed=r.done_ops, lag=lag, errors=r.errors)

        replayer.run(tick)
