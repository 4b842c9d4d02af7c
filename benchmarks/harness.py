"""`python -m benchmarks`: mongoproxy side by side with a direct connection and haproxy, goals P1-P7.

    python -m benchmarks [--quick] [--json PATH] [--plot PATH] [--only SCENARIO ...]

Runs every scenario in one run, on loopback, bounded in count and time;
prints one table per scenario and the goals marked met or missed; writes
JSON (default benchmarks-result.json) and, with --plot, a PNG
(matplotlib: `pip install 'mongoproxy[bench]'`). See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks import procs, scenarios, tlsbench

MiB = scenarios.MiB
VARIANTS = ("direct", "haproxy", "mongoproxy", "mongoproxy+log", "mongoproxy+trace")
PROXIES = ("haproxy", "mongoproxy", "mongoproxy+log", "mongoproxy+trace")
SCENARIOS = ("scanner", "hotpath", "memory", "driver", "tls")


@dataclass(frozen=True)
class Params:
    """How much each scenario does; --quick picks the small set."""

    raw_rounds: int = 20
    raw_per_round: int = 2500
    pymongo_rounds: int = 10
    pymongo_per_round: int = 500
    large_sizes: tuple = (4 * MiB, 16 * MiB)
    large_rounds: int = 10
    large_per_round: int = 3
    tap_pairs: int = 50_000
    idle_counts: tuple = (1000, 5000)
    stream_bytes: int = 40 * 1000 * 1000
    driver_rounds: int = 7
    driver_commands: int = 2000
    driver_docs: int = 1000
    driver_inserts: int = 300  # SecantusDB's inserts slow down as documents accumulate
    reply_size: int = 200
    tls_repeats: int = 3  # the TLS scenario is measured this many times in one run: median and spread
    tls_rounds: int = 10
    tls_per_round: int = 1000
    tls_large_rounds: int = 5
    tls_handshake_rounds: int = 5
    tls_handshakes_per_round: int = 100


QUICK = Params(
    raw_rounds=3,
    raw_per_round=1000,
    pymongo_rounds=2,
    pymongo_per_round=300,
    large_rounds=2,
    large_per_round=1,
    tap_pairs=10_000,
    idle_counts=(500, 1000),
    driver_rounds=2,
    driver_commands=200,
    driver_docs=200,
    driver_inserts=100,
    tls_repeats=2,
    tls_rounds=2,
    tls_per_round=300,
    tls_large_rounds=2,
    tls_handshake_rounds=2,
    tls_handshakes_per_round=20,
)


def log(msg: str) -> None:
    """Progress on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- running ----


def run_hotpath(p: Params, workdir: str, baseline: str | None = None) -> dict:
    """Scenarios 1-3 against the scripted backend: every variant up at once, interleaved.

    `baseline`: another checkout whose mongoproxy (metrics only) runs as one more variant, "baseline".
    """
    started: list[procs.Proc] = []
    try:
        backend = procs.start_backend(p.reply_size, workdir)
        started.append(backend)
        sink = procs.start_otlp_sink(workdir)
        started.append(sink)
        hap = procs.start_haproxy(backend.port, workdir)
        started.append(hap)
        logfile = os.path.join(workdir, "commands.log")
        mps = {
            "mongoproxy": (),
            "mongoproxy+log": ("--log-commands", "--log-file", logfile),
            "mongoproxy+trace": ("--trace-sample-ratio", "1", "--otlp-endpoint", f"http://127.0.0.1:{sink.port}"),
        }
        targets: dict[str, procs.Proc | None] = {"direct": None, "haproxy": hap}
        for name, args in mps.items():
            env = {"OTEL_BSP_SCHEDULE_DELAY": "500"} if "trace" in name else None  # the tail flushes quickly
            targets[name] = procs.start_mongoproxy(name, backend.port, workdir, args, env)
            started.append(targets[name])
        if baseline:
            targets["baseline"] = procs.start_mongoproxy("baseline", backend.port, workdir, root=baseline)
            started.append(targets["baseline"])
        ports = {name: (backend.port if t is None else t.port) for name, t in targets.items()}
        out: dict[str, Any] = {}
        log(f"small round trips, raw socket: {p.raw_rounds} rounds x {p.raw_per_round} per variant")
        out["raw"] = scenarios.small_round_trip_raw(targets, ports, p.raw_rounds, p.raw_per_round)
        log(f"small round trips, pymongo: {p.pymongo_rounds} rounds x {p.pymongo_per_round} per variant")
        out["pymongo"] = scenarios.small_round_trip_pymongo(ports, p.pymongo_rounds, p.pymongo_per_round)
        log(f"large replies {[s // MiB for s in p.large_sizes]} MiB: {p.large_rounds} rounds x {p.large_per_round}")
        out["large"] = scenarios.large_replies(targets, ports, p.large_sizes, p.large_rounds, p.large_per_round)
        if baseline:
            out["vs_baseline"] = _vs_baseline(out)
        checks = {}
        for name in [*mps, *(["baseline"] if baseline else [])]:
            proc = targets[name]
            checks[name] = {"commands_observed": scenarios.observed_commands(proc)}
            proc.stop()
            err = proc.stderr_text()
            checks[name]["warnings"] = [line for line in err.splitlines() if "WARNING" in line or "ERROR" in line][:5]
        if os.path.exists(logfile):
            with open(logfile, "rb") as f:
                checks["mongoproxy+log"]["log_lines"] = sum(1 for _ in f)
        out["checks"] = checks
        return out
    finally:
        for proc in reversed(started):
            proc.stop()


def _vs_baseline(hot: dict) -> dict:
    """mongoproxy ÷ baseline (another checkout) on each hot-path figure: below 1 is better, for MB/s above 1."""
    lat, cpu = hot["raw"]["latency"], hot["raw"]["cpu"]
    out = {
        key: _ratio(lat["mongoproxy"][key], lat["baseline"][key])
        for key in ("p50_us", "p99_us", "added_p50_us", "added_p99_us")
    }
    out["cpu_us_per_request"] = _ratio(cpu["mongoproxy"]["us_per_request"], cpu["baseline"]["us_per_request"])
    for size, row in hot["large"].items():
        v = row["variants"]
        out[f"mb_s_{size}"] = _ratio(v["mongoproxy"]["mb_s"], v["baseline"]["mb_s"])
        out[f"cpu_ms_per_mb_{size}"] = _ratio(v["mongoproxy"]["cpu_ms_per_mb"], v["baseline"]["cpu_ms_per_mb"])
    return out


def run_memory(p: Params, workdir: str) -> dict:
    """Scenario 5: a fresh mongoproxy (and haproxy, for comparison) per measurement."""
    procs.raise_nofile(4 * max(p.idle_counts) + 1000)
    out: dict[str, Any] = {}
    backend = procs.start_backend(p.reply_size, workdir)
    try:
        for name in ("mongoproxy", "haproxy"):
            start = (
                (lambda: procs.start_mongoproxy("mem-mongoproxy", backend.port, workdir))
                if name == "mongoproxy"
                else (lambda: procs.start_haproxy(backend.port, workdir, maxconn=max(p.idle_counts) + 500))
            )
            row: dict[str, Any] = {}
            proc = start()
            try:
                log(f"memory, {name}: one {p.stream_bytes / 1e6:.0f} MB message")
                row["stream"] = scenarios.stream_big_message(proc, proc.port, p.stream_bytes)
            finally:
                proc.stop()
            proc = start()
            try:
                log(f"memory, {name}: idle connections {list(p.idle_counts)}")
                row["idle"] = scenarios.idle_connections(proc, proc.port, p.idle_counts)
            finally:
                proc.stop()
            out[name] = row
    finally:
        backend.stop()
    return out


def run_driver(p: Params, workdir: str) -> dict:
    """Scenario 6: driver-benchmark tasks against SecantusDB, direct, through haproxy and mongoproxy."""
    started: list[procs.Proc] = []
    try:
        db = procs.start_secantus(workdir)
        started.append(db)
        hap = procs.start_haproxy(db.port, workdir)
        started.append(hap)
        mp = procs.start_mongoproxy("driver-mongoproxy", db.port, workdir)
        started.append(mp)
        ports = {"direct": db.port, "haproxy": hap.port, "mongoproxy": mp.port}
        log(f"driver tasks against SecantusDB: {p.driver_rounds} rounds")
        return scenarios.driver_tasks(ports, p.driver_rounds, p.driver_commands, p.driver_docs, p.driver_inserts)
    finally:
        for proc in reversed(started):
            proc.stop()


# ---- goals ----


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def goals(res: dict) -> list[dict]:
    """P1-P7 from one run's results: the measured figure, the target and met/missed (None: not measured)."""
    sc = res.get("scenarios", {})
    out = []

    def add(gid: str, goal: str, measured: str, met: bool | None) -> None:
        out.append({"id": gid, "goal": goal, "measured": measured, "met": met})

    hot = sc.get("hotpath")
    if hot:
        lat = hot["raw"]["latency"]
        r50 = _ratio(lat["mongoproxy"]["added_p50_us"], lat["haproxy"]["added_p50_us"])
        r99 = _ratio(lat["mongoproxy"]["added_p99_us"], lat["haproxy"]["added_p99_us"])
        add(
            "P1",
            "added p50 and p99 latency <= 1.0x haproxy's (metrics on)",
            f"p50 {_fmt_x(r50)} ({lat['mongoproxy']['added_p50_us']:.1f} vs {lat['haproxy']['added_p50_us']:.1f} µs), "
            f"p99 {_fmt_x(r99)} ({lat['mongoproxy']['added_p99_us']:.1f} vs {lat['haproxy']['added_p99_us']:.1f} µs)",
            None if r50 is None or r99 is None else (r50 <= 1.0 and r99 <= 1.0),
        )
        cpu = hot["raw"]["cpu"]
        rc = _ratio(cpu["mongoproxy"]["us_per_request"], cpu["haproxy"]["us_per_request"])
        add(
            "P2",
            "CPU per request <= 1.10x haproxy's (metrics on)",
            f"{_fmt_x(rc)} ({cpu['mongoproxy']['us_per_request']:.1f} vs {cpu['haproxy']['us_per_request']:.1f} µs)",
            None if rc is None else rc <= 1.10,
        )
        parts, ok = [], True
        for size, row in hot["large"].items():
            r = _ratio(row["variants"]["mongoproxy"]["mb_s"], row["variants"]["haproxy"]["mb_s"])
            parts.append(f"{size} {_fmt_x(r)}")
            ok = ok and r is not None and r >= 1.2
        add("P3", "large-reply throughput >= 1.2x haproxy's (default configuration)", ", ".join(parts), ok)
        base = cpu["mongoproxy"]["us_per_request"]
        tr = cpu["mongoproxy+trace"]["us_per_request"] - base
        lg = cpu["mongoproxy+log"]["us_per_request"] - base
        add(
            "P6",
            "tracing at ratio 1.0 <= +30 µs CPU per command; command log <= +10 µs",
            f"tracing {tr:+.1f} µs, command log {lg:+.1f} µs",
            tr <= 30 and lg <= 10,
        )
    scan = sc.get("scanner")
    if scan:
        by = {c["case"]: c for c in scan["cases"]}
        small, big = by["find command"]["speedup"], by["4 MB reply"]["speedup"]
        add(
            "P4",
            "scanner >= 5x bson.decode on a small command and >= 30x on a 4 MB reply",
            f"small command {small:.1f}x, 4 MB reply {big:.0f}x",
            small >= 5 and big >= 30,
        )
    mem = sc.get("memory", {}).get("mongoproxy")
    if mem:
        kb = max(pt["kb_per_connection"] for pt in mem["idle"]["points"])
        growth = mem["stream"]["growth_kb"] / 1024
        counts = "/".join(str(pt["connections"]) for pt in mem["idle"]["points"])
        add(
            "P5",
            "<= 8 KB RSS per idle connection pair; < 8 MB RSS growth streaming 40 MB",
            f"{kb:.1f} KB per pair (worst of {counts}), {growth:.1f} MB growth",
            kb <= 8 and growth < 8,
        )
    drv = sc.get("driver")
    if drv:
        parts, ok = [], True
        for task, row in drv.items():
            r = _ratio(row["variants"]["mongoproxy"]["median_s"], row["variants"]["direct"]["median_s"])
            parts.append(f"{task} {_fmt_x(r)}")
            ok = ok and r is not None and r <= 1.10
        add("P7", "driver-benchmark tasks through the proxy <= 1.10x direct", ", ".join(parts), ok)
    order = {f"P{i}": i for i in range(1, 8)}
    out = sorted(out, key=lambda g: order[g["id"]])
    if sc.get("tls"):
        out += tlsbench.goals(sc["tls"])
    return out


def _fmt_x(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


# ---- output ----


class _PlainTable:
    """The part of rich.table.Table used here, printed as aligned plain text (when rich is missing)."""

    def __init__(self, title: str = "", **_: Any) -> None:
        self.title = title
        self.columns: list[tuple[str, str]] = []
        self.rows: list[tuple[str, ...]] = []

    def add_column(self, name: str, justify: str = "left") -> None:
        self.columns.append((name, justify))

    def add_row(self, *cells: str) -> None:
        self.rows.append(tuple(_MARKUP.sub("", c) for c in cells))

    def render(self) -> str:
        widths = [max([len(name)] + [len(r[i]) for r in self.rows]) for i, (name, _) in enumerate(self.columns)]

        def line(cells: tuple) -> str:
            return "  ".join(
                c.ljust(w) if j == "left" else c.rjust(w) for c, w, (_, j) in zip(cells, widths, self.columns)
            ).rstrip()

        out = [self.title, line(tuple(n for n, _ in self.columns)), "  ".join("-" * w for w in widths)]
        return "\n".join(out + [line(r) for r in self.rows]) + "\n"


class _PlainConsole:
    def print(self, obj: Any = "") -> None:
        print(obj.render() if isinstance(obj, _PlainTable) else _MARKUP.sub("", str(obj)))


_MARKUP = re.compile(r"\[/?[a-z ]+\]")


def print_tables(res: dict) -> None:
    """Every scenario's table and the goals (with rich when it is installed, else plain text)."""
    try:
        from rich.console import Console
        from rich.table import Table

        con: Any = Console(width=max(110, shutil.get_terminal_size((110, 24)).columns))
    except ImportError:
        Table, con = _PlainTable, _PlainConsole()  # type: ignore[assignment,misc]
    sc = res["scenarios"]

    def table(title: str, *cols: str, text: bool = False) -> Table:
        t = Table(title=title, title_justify="left")
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i == 0 or text else "right")
        return t

    hot = sc.get("hotpath")
    if hot:
        for key, title in (
            ("raw", "1. Small round trip, raw socket (find by _id, 200-byte document)"),
            ("pymongo", "1. Small round trip, pymongo find_one"),
        ):
            lat = hot[key]["latency"]
            t = table(
                f"{title}: {hot[key]['requests_per_variant']} per variant",
                "variant",
                "p50 µs",
                "p99 µs",
                "added p50",
                "added p99",
                "added ÷ haproxy's (p50 / p99)",
            )
            hp = lat["haproxy"]
            for name, row in lat.items():
                rel = (
                    ""
                    if name in ("direct", "haproxy")
                    else f"{_fmt_x(_ratio(row['added_p50_us'], hp['added_p50_us']))} / "
                    f"{_fmt_x(_ratio(row['added_p99_us'], hp['added_p99_us']))}"
                )
                t.add_row(
                    name,
                    f"{row['p50_us']:.1f}",
                    f"{row['p99_us']:.1f}",
                    "" if name == "direct" else f"{row['added_p50_us']:+.1f}",
                    "" if name == "direct" else f"{row['added_p99_us']:+.1f}",
                    rel,
                )
            con.print(t)
        cpu = hot["raw"]["cpu"]
        t = table(
            f"2. CPU per request of the proxy process (/proc/PID/stat, {hot['raw']['requests_per_variant']} "
            "raw round trips)",
            "variant",
            "µs / request",
            "÷ haproxy",
            "over metrics-only",
        )
        for name, row in cpu.items():
            t.add_row(
                name,
                f"{row['us_per_request']:.1f}",
                _fmt_x(_ratio(row["us_per_request"], cpu["haproxy"]["us_per_request"])),
                ""
                if name in ("haproxy", "mongoproxy")
                else f"{row['us_per_request'] - cpu['mongoproxy']['us_per_request']:+.1f} µs",
            )
        con.print(t)
        sizes = list(hot["large"])
        t = table(
            "3. Large replies: MB/s (median transfer) and the proxy's CPU ms per MB",
            "variant",
            *[f"{s} MB/s" for s in sizes],
            *[f"{s} ÷ haproxy" for s in sizes],
            *[f"{s} CPU ms/MB" for s in sizes],
        )
        for name in hot["large"][sizes[0]]["variants"]:
            rows = [hot["large"][s]["variants"][name] for s in sizes]
            rel = [
                _fmt_x(
                    _ratio(hot["large"][s]["variants"][name]["mb_s"], hot["large"][s]["variants"]["haproxy"]["mb_s"])
                )
                for s in sizes
            ]
            cpu_mb = [f"{r['cpu_ms_per_mb']:.2f}" if "cpu_ms_per_mb" in r else "" for r in rows]
            t.add_row(name, *[f"{r['mb_s']:.0f}" for r in rows], *rel, *cpu_mb)
        con.print(t)
        vs = hot.get("vs_baseline")
        if vs:
            t = table(f"mongoproxy ÷ baseline ({res.get('baseline')})", "figure", "ratio")
            for key, r in vs.items():
                t.add_row(key, _fmt_x(r))
            con.print(t)
        checks = hot.get("checks", {})
        if checks:
            con.print(
                "   sanity: commands counted by each proxy's metrics: "
                + ", ".join(f"{n} {c.get('commands_observed')}" for n, c in checks.items())
                + (
                    f"; command log lines {checks['mongoproxy+log'].get('log_lines')}"
                    if "log_lines" in checks.get("mongoproxy+log", {})
                    else ""
                )
            )
            for n, c in checks.items():
                for w in c.get("warnings", []):
                    con.print(f"   {n}: {w}")
    scan = sc.get("scanner")
    if scan:
        t = table(
            "4. Scanner (reset + feed + result) vs bson.decode, µs per message",
            "case",
            "bytes",
            "scanner",
            "scanner, 64 KiB chunks",
            "bson.decode",
            "speedup",
        )
        for c in scan["cases"]:
            t.add_row(
                c["case"],
                f"{c['bytes']:,}",
                f"{c['scanner_us']:.2f}",
                f"{c['scanner_chunked_us']:.2f}" if "scanner_chunked_us" in c else "",
                f"{c['bson_decode_us']:.2f}",
                f"{c['speedup']:.1f}x",
            )
        con.print(t)
        tap = scan.get("tap", {})
        if tap:
            t = table(
                "4. The tap in process: framing + scanning + matching per small round trip, µs (tapcost.py)",
                "checkout",
                "bare bus",
                "with the metrics sink",
            )
            for name, row in tap.items():
                t.add_row(name, f"{row['bare_us']:.2f}", f"{row['metrics_us']:.2f}")
            if "baseline" in tap:
                t.add_row(
                    "mongoproxy ÷ baseline",
                    _fmt_x(_ratio(tap["mongoproxy"]["bare_us"], tap["baseline"]["bare_us"])),
                    _fmt_x(_ratio(tap["mongoproxy"]["metrics_us"], tap["baseline"]["metrics_us"])),
                )
            con.print(t)
    mem = sc.get("memory")
    if mem:
        names = list(mem)
        counts = [pt["connections"] for pt in mem[names[0]]["idle"]["points"]]
        t = table(
            "5. Memory (RSS)",
            "proxy",
            "baseline MB",
            *[f"KB / pair at {n}" for n in counts],
            "40 MB message: growth MB",
            "MB/s",
        )
        for name in names:
            row = mem[name]
            t.add_row(
                name,
                f"{row['idle']['baseline_rss_kb'] / 1024:.1f}",
                *[f"{pt['kb_per_connection']:.1f}" for pt in row["idle"]["points"]],
                f"{row['stream']['growth_kb'] / 1024:.1f}",
                f"{row['stream']['mb_s']:.0f}",
            )
        con.print(t)
    drv = sc.get("driver")
    if drv:
        variants = list(next(iter(drv.values()))["variants"])
        t = table(
            "6. Driver-benchmark tasks against SecantusDB (median of runs)",
            "task",
            "ops",
            *[f"{v} ms" for v in variants],
            *[f"{v} ÷ direct" for v in variants if v != "direct"],
        )
        for task, row in drv.items():
            v = row["variants"]
            t.add_row(
                task,
                str(row["operations"]),
                *[f"{v[n]['median_s'] * 1000:.0f}" for n in variants],
                *[_fmt_x(_ratio(v[n]["median_s"], v["direct"]["median_s"])) for n in variants if n != "direct"],
            )
        con.print(t)
    tls = sc.get("tls")
    if tls:
        t = table(
            f"7. TLS termination + origination, median of {len(tls['repeats'])} interleaved repeats (min-max)",
            *tlsbench.TABLE_COLUMNS,
        )
        for row in tlsbench.table_rows(tls):
            t.add_row(*row)
        con.print(t)
        con.print(f"   sanity: commands counted by mongoproxy's metrics: {tls.get('commands_observed')}")
    t = table("Goals", "goal", "target", "measured", "", text=True)
    for g in res["goals"]:
        mark = "[green]met[/green]" if g["met"] else ("[red]missed[/red]" if g["met"] is False else "n/a")
        t.add_row(g["id"], g["goal"], g["measured"], mark)
    con.print(t)


def plot(res: dict, path: str) -> None:
    """A PNG with one panel per scenario (needs matplotlib: the [bench] extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'mongoproxy[bench]'") from None
    sc = res["scenarios"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    axes = axes.ravel()
    hot = sc.get("hotpath")
    if hot:
        lat = hot["raw"]["latency"]
        names = list(lat)
        xs = range(len(names))
        axes[0].bar([x - 0.2 for x in xs], [lat[n]["p50_us"] for n in names], 0.4, label="p50")
        axes[0].bar([x + 0.2 for x in xs], [lat[n]["p99_us"] for n in names], 0.4, label="p99")
        axes[0].set_yscale("log")
        axes[0].set_title("small round trip (raw socket), µs (log)")
        axes[0].set_xticks(list(xs), names, rotation=20)
        axes[0].legend()
        cpu = hot["raw"]["cpu"]
        axes[1].bar(list(cpu), [r["us_per_request"] for r in cpu.values()], color="tab:orange")
        axes[1].set_title("CPU per request of the proxy, µs")
        axes[1].tick_params(axis="x", rotation=20)
        sizes = list(hot["large"])
        names = list(hot["large"][sizes[0]]["variants"])
        width = 0.8 / len(sizes)
        for i, s in enumerate(sizes):
            axes[2].bar(
                [x + i * width for x in range(len(names))],
                [hot["large"][s]["variants"][n]["mb_s"] for n in names],
                width,
                label=s,
            )
        axes[2].set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=20)
        axes[2].set_title("large replies, MB/s")
        axes[2].legend()
    scan = sc.get("scanner")
    if scan:
        axes[3].barh([c["case"] for c in scan["cases"]], [c["speedup"] for c in scan["cases"]], color="tab:green")
        axes[3].set_xscale("log")
        axes[3].set_title("scanner speedup over bson.decode (log)")
    mem = sc.get("memory")
    if mem:
        for name, row in mem.items():
            pts = row["idle"]["points"]
            axes[4].plot([p["connections"] for p in pts], [p["kb_per_connection"] for p in pts], marker="o", label=name)
        axes[4].axhline(8, color="grey", linestyle="--", label="P5 target")
        axes[4].set_title("RSS per idle connection pair, KB")
        axes[4].legend()
    drv = sc.get("driver")
    if drv:
        tasks = list(drv)
        variants = [v for v in next(iter(drv.values()))["variants"] if v != "direct"]
        width = 0.8 / len(variants)
        for i, v in enumerate(variants):
            axes[5].bar(
                [x + i * width for x in range(len(tasks))],
                [drv[t]["variants"][v]["median_s"] / drv[t]["variants"]["direct"]["median_s"] for t in tasks],
                width,
                label=v,
            )
        axes[5].axhline(1.10, color="grey", linestyle="--", label="P7 target")
        axes[5].set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))], tasks, rotation=15)
        axes[5].set_ylim(bottom=0.8)
        axes[5].set_title("driver tasks vs SecantusDB, time ÷ direct")
        axes[5].legend()
    fig.suptitle(f"mongoproxy benchmarks ({'quick' if res['quick'] else 'full'}), {res['started']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# ---- entry point ----


def _breakdown(args: argparse.Namespace) -> int:
    """`--breakdown`: the layer-by-layer CPU table (Markdown on stdout, JSON to --json)."""
    from benchmarks import breakdown

    p = QUICK if args.quick else Params()
    workdir = procs.make_workdir()
    load0 = os.getloadavg()
    try:
        res = breakdown.run(workdir, p.raw_rounds, p.raw_per_round // 2, args.repeat, args.baseline)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res["load_average_at_start"] = load0
    print(breakdown.render(res))
    print(
        f"load average {load0[0]:.2f} at start, {res['load_average'][0]:.2f} at end; "
        f"commands counted by the whole proxy: {res['mongoproxy_commands_observed']}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"breakdown": res}, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios, print the tables, write JSON (and a plot)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts: a smoke run in under 2 minutes")
    ap.add_argument(
        "--json",
        metavar="PATH",
        default="benchmarks-result.json",
        help="write the results here (default benchmarks-result.json)",
    )
    ap.add_argument("--plot", metavar="PATH", help="also draw a PNG (needs matplotlib)")
    ap.add_argument(
        "--only", nargs="+", choices=SCENARIOS, metavar="SCENARIO", help=f"run only these: {', '.join(SCENARIOS)}"
    )
    ap.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run the mongoproxy of another checkout (built in place) as variant 'baseline' in "
        "the hot-path scenarios: a before/after comparison in one interleaved run",
    )
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="instead of the scenarios: CPU per round trip layer by layer (bare uvloop, the compiled tap, each "
        "sink), the whole proxy and haproxy, interleaved and repeated (benchmarks/breakdown.py)",
    )
    ap.add_argument("--repeat", type=int, default=3, help="--breakdown: interleaved repetitions (default 3)")
    args = ap.parse_args(argv)
    if args.breakdown:
        return _breakdown(args)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("--plot needs matplotlib: pip install 'mongoproxy[bench]'", file=sys.stderr)
            return 2
    from mongoproxy import __version__

    p = QUICK if args.quick else Params()
    wanted = args.only or list(SCENARIOS)
    workdir = procs.make_workdir()
    t0 = time.monotonic()
    res: dict[str, Any] = {
        "benchmark": "mongoproxy",
        "version": __version__,
        "quick": args.quick,
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "params": asdict(p),
        "baseline": args.baseline,
        "scenarios": {},
    }
    try:
        if "scanner" in wanted:
            log("scanner micro-benchmark")
            res["scenarios"]["scanner"] = scenarios.scanner(args.quick)
            roots = {"mongoproxy": procs.REPO_ROOT, **({"baseline": args.baseline} if args.baseline else {})}
            res["scenarios"]["scanner"]["tap"] = scenarios.tap_cost(roots, p.tap_pairs)
        if "hotpath" in wanted:
            res["scenarios"]["hotpath"] = run_hotpath(p, workdir, args.baseline)
        if "memory" in wanted:
            res["scenarios"]["memory"] = run_memory(p, workdir)
        if "driver" in wanted:
            res["scenarios"]["driver"] = run_driver(p, workdir)
        if "tls" in wanted:
            res["scenarios"]["tls"] = tlsbench.run_tls(p, workdir, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    res["duration_s"] = round(time.monotonic() - t0, 1)
    res["load_average_at_end"] = os.getloadavg()
    res["goals"] = goals(res)
    print_tables(res)
    print(
        f"{res['duration_s']:.0f} s; load average {res['load_average_at_start'][0]:.2f} at start, "
        f"{res['load_average_at_end'][0]:.2f} at end"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"results: {args.json}")
    if args.plot:
        plot(res, args.plot)
        print(f"plot: {args.plot}")
    return 0
