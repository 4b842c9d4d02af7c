"""`python -m benchmarks --breakdown`: where the proxy's CPU per round trip goes, layer by layer.

Each layer is a process of its own, a uvloop pass-through that adds one piece of
the tap to the one before it, built from the proxy's own classes:

    bare       write each chunk to the other side, nothing else
    tap        + one mongoproxy._tap.Tap.feed per chunk: byte counting, the clock, framing, the Cython body
               scanner, request/reply matching and CommandEvents on an empty SinkBus (one C call since the
               compiled tap; before it, the rows framing, scanner and tracker measured these one by one)
    +metrics   tap + the metrics sink (on by default)
    +digest    tap + the query digest sink (on by default), with the scanner rendering each request's shape
    +log       tap + the command log sink (to a file)
    +trace     tap + the tracing sink at ratio 1, exporting to a discard-everything OTLP endpoint

and beside them the whole proxy (`python -m mongoproxy run`, metrics only) and haproxy. The raw-socket
small round trips of the hot-path scenario run against all of them interleaved, `repeats` times over;
each repetition gives one CPU figure per layer, so the table shows the median and the spread.

`python -m benchmarks.breakdown --serve LAYER --upstream PORT` runs one layer (it prints "ready PORT").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from typing import Any

LAYERS = ("bare", "tap", "+metrics", "+digest", "+log", "+trace")


# ---- one layer: the server ----


def _make_tap(layer: str, otlp: str, logfile: str) -> Any:
    """A factory: (request feed, reply feed) for one connection, or None for the bare layer."""
    if layer == "bare":
        return None
    from prometheus_client import CollectorRegistry

    from mongoproxy import __version__, config
    from mongoproxy._tap import Tap
    from mongoproxy.events import Connection, SinkBus
    from mongoproxy.protocol.framing import FrameScanner
    from mongoproxy.sinks import SinkContext, build_sinks
    from mongoproxy.tracker import Tracker

    sinks: list = []
    if layer.startswith("+"):
        flags: dict[str, Any] = {}
        if layer == "+log":
            flags = {"log_commands": True, "log_file": logfile}
        elif layer == "+trace":
            flags = {"trace_sample_ratio": "1", "otlp_endpoint": otlp}
        cfg = config.build(flags, env={})
        ctx = SinkContext(registry=CollectorRegistry(), version=__version__, mode="static")
        kind = {"+metrics": "MetricsSink", "+digest": "DigestSink", "+log": "CommandLogSink", "+trace": "TracingSink"}[
            layer
        ]
        sinks = [s for s in build_sinks(cfg, ctx) if type(s).__name__ == kind]
        if len(sinks) != 1:
            raise SystemExit(f"breakdown: no {kind} among {[type(s).__name__ for s in build_sinks(cfg, ctx)]}")
    bus = SinkBus(sinks)
    ids = iter(range(1, 1 << 30))
    render = 1 if layer == "+digest" else 0  # RENDER_REDACTED: what the proxy does while the digest is on

    def noop(*args: Any) -> None:
        pass

    def tap() -> tuple[Any, Any]:
        """The request and reply feeds of one connection, built as server.ClientSide builds them."""
        conn = Connection(id=next(ids), client_host="127.0.0.1", client_port=1, upstream_host="127.0.0.1")
        tracker = Tracker(conn, bus, 1000)
        requests = FrameScanner(False, tracker.on_request, noop, render=render)
        replies = FrameScanner(True, tracker.on_reply, noop)
        return Tap(requests, tracker, conn, False).feed, Tap(replies, tracker, conn, True).feed

    return tap


def _copies(make_tap: Any, k: int) -> Any:
    """A factory that feeds each chunk to k independent taps of one layer (benchmarks.coldpass)."""

    def tap() -> tuple[Any, Any]:
        pairs = [make_tap() for _ in range(k)]
        requests = tuple(p[0] for p in pairs)
        replies = tuple(p[1] for p in pairs)

        def feed_requests(data: bytes) -> None:
            for feed in requests:
                feed(data)

        def feed_replies(data: bytes) -> None:
            for feed in replies:
                feed(data)

        return feed_requests, feed_replies

    return tap


async def _serve(layer: str, upstream: int, otlp: str, logfile: str, copies: int = 1) -> None:
    loop = asyncio.get_running_loop()
    make_tap = _make_tap(layer, otlp, logfile)
    if make_tap is not None and copies != 1:
        make_tap = _copies(make_tap, copies)

    class Up(asyncio.Protocol):
        def __init__(self, client: Any) -> None:
            self.client = client

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            c = self.client
            c.transport.write(data)
            if c.feed_rep is not None:
                c.feed_rep(data)

        def connection_lost(self, exc: Any) -> None:
            self.client.transport.close()

    class Client(asyncio.Protocol):
        feed_req: Any = None
        feed_rep: Any = None
        write_up: Any = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.up: Any = None
            self.early: list[bytes] = []
            if make_tap is not None:
                self.feed_req, self.feed_rep = make_tap()
            transport.pause_reading()
            loop.create_task(self._connect())

        async def _connect(self) -> None:
            _, self.up = await loop.create_connection(lambda: Up(self), "127.0.0.1", upstream)
            self.write_up = self.up.transport.write
            for chunk in self.early:
                self.data_received(chunk)
            self.transport.resume_reading()

        def data_received(self, data: bytes) -> None:
            if self.write_up is None:  # pause_reading() in connection_made() may be ignored (uvloop)
                self.early.append(data)
                self.transport.pause_reading()
                return
            self.write_up(data)
            if self.feed_req is not None:
                self.feed_req(data)

        def connection_lost(self, exc: Any) -> None:
            if self.up is not None:
                self.up.transport.close()

    server = await loop.create_server(Client, "127.0.0.1", 0)
    for sock in server.sockets:
        import socket

        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print(f"ready {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def serve_main(argv: list[str] | None = None) -> int:
    """Run one layer until killed."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.breakdown")
    ap.add_argument("--serve", choices=LAYERS, required=True)
    ap.add_argument("--upstream", type=int, required=True)
    ap.add_argument("--otlp-endpoint", default="")
    ap.add_argument("--log-file", default=os.devnull)
    ap.add_argument("--copies", type=int, default=1, help="independent taps per connection, each fed every chunk")
    args = ap.parse_args(argv)
    import uvloop

    uvloop.run(_serve(args.serve, args.upstream, args.otlp_endpoint, args.log_file, args.copies))
    return 0


# ---- the run: every layer side by side ----


def run(workdir: str, rounds: int, per_round: int, repeats: int, baseline: str | None = None) -> dict:
    """Start every layer, the whole proxy and haproxy; `repeats` interleaved raw-socket runs; CPU µs per trip.

    `baseline`: another checkout whose whole proxy runs beside this one's, as row "baseline".
    """
    from benchmarks import procs, scenarios

    started: list[procs.Proc] = []
    try:
        backend = procs.start_backend(200, workdir)
        started.append(backend)
        sink = procs.start_otlp_sink(workdir)
        started.append(sink)
        targets: dict[str, procs.Proc | None] = {}
        for layer in LAYERS:
            env = {"OTEL_BSP_SCHEDULE_DELAY": "500"} if layer == "+trace" else None
            p = procs.Proc(
                f"layer {layer}",
                [
                    sys.executable,
                    "-m",
                    "benchmarks.breakdown",
                    "--serve",
                    layer,
                    "--upstream",
                    str(backend.port),
                    "--otlp-endpoint",
                    f"http://127.0.0.1:{sink.port}",
                    "--log-file",
                    os.path.join(workdir, "breakdown-commands.log"),
                ],
                0,
                procs._env(env),
                os.path.join(workdir, f"layer-{layer.strip('+')}.err"),
            )
            started.append(p)
            p.read_ready(30)
            targets[layer] = p
        targets["mongoproxy"] = procs.start_mongoproxy("mongoproxy", backend.port, workdir)
        started.append(targets["mongoproxy"])
        if baseline:
            targets["baseline"] = procs.start_mongoproxy("baseline", backend.port, workdir, root=baseline)
            started.append(targets["baseline"])
        targets["haproxy"] = procs.start_haproxy(backend.port, workdir)
        started.append(targets["haproxy"])
        ports = {name: t.port for name, t in targets.items() if t is not None}
        ports["direct"] = backend.port  # for the latency each layer adds (no CPU figure: not a proxy)
        runs: list[dict] = []
        latency: list[dict] = []
        for i in range(repeats):
            print(f"[breakdown] repetition {i + 1}/{repeats}: {rounds} rounds x {per_round}", file=sys.stderr)
            out = scenarios.small_round_trip_raw(targets, ports, rounds, per_round)
            runs.append({n: r["us_per_request"] for n, r in out["cpu"].items()})
            latency.append({n: (r["added_p50_us"], r["added_p99_us"]) for n, r in out["latency"].items()})
        observed = scenarios.observed_commands(targets["mongoproxy"])
    finally:
        for proc in reversed(started):
            proc.stop()
    rows = {}
    for name in targets:
        xs = [r[name] for r in runs]
        rows[name] = {
            "median_us": statistics.median(xs),
            "min_us": min(xs),
            "max_us": max(xs),
            "runs_us": xs,
            "added_p50_us": [lat[name][0] for lat in latency],
            "added_p99_us": [lat[name][1] for lat in latency],
        }
    return {
        "rows": rows,
        "repeats": repeats,
        "requests_per_repeat": rounds * per_round,
        "mongoproxy_commands_observed": observed,
        "load_average": os.getloadavg(),
    }


def render(res: dict) -> str:
    """The table as Markdown: median and spread per layer, the step from the layer above, ÷ haproxy.

    "÷ haproxy" is the median over repetitions of each repetition's own ratio, which the machine's drift
    between repetitions does not move as much as the absolute figures.
    """
    rows = res["rows"]
    runs = [{n: rows[n]["runs_us"][i] for n in rows} for i in range(res["repeats"])]
    lines = [
        f"CPU µs per small round trip: median of {res['repeats']} interleaved repetitions of "
        f"{res['requests_per_repeat']} raw-socket round trips each (min–max over the repetitions)",
        "",
        "| layer | CPU µs / round trip | min–max | step | ÷ haproxy (min–max) |",
        "|---|---:|---:|---:|---:|",
    ]
    prev = None
    for name, row in rows.items():
        med = row["median_us"]
        if name in LAYERS[:2]:
            step = "" if prev is None else f"{med - prev:+.1f}"
            prev = med
        elif name.startswith("+"):
            step = f"{med - rows['tap']['median_us']:+.1f} over tap"
        else:
            step = ""
        ratios = [r[name] / r["haproxy"] for r in runs]
        lines.append(
            f"| {name} | {med:.1f} | {row['min_us']:.1f}–{row['max_us']:.1f} | {step} | "
            f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f}) |"
        )
    if all("added_p50_us" in row for row in rows.values()):
        lines += [
            "",
            "Latency each process adds to the round trip (over the direct connection), median over repetitions of "
            "the added p50 and p99, and its ratio to haproxy's in the same repetition:",
            "",
            "| layer | added p50 µs | added p99 µs | p50 ÷ haproxy's (min–max) | p99 ÷ haproxy's (min–max) |",
            "|---|---:|---:|---:|---:|",
        ]
        hap = rows["haproxy"]
        for name, row in rows.items():
            cells = []
            for key in ("added_p50_us", "added_p99_us"):
                ratios = [x / h for x, h in zip(row[key], hap[key]) if h > 0]
                cells.append(
                    f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})" if ratios else ""
                )
            lines.append(
                f"| {name} | {statistics.median(row['added_p50_us']):.1f} | "
                f"{statistics.median(row['added_p99_us']):.1f} | {cells[0]} | {cells[1]} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(serve_main())
