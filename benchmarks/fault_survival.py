"""`python -m benchmarks.fault_survival`: faults under load against one proxy process; a table of how it recovered.

    python -m benchmarks.fault_survival [--minutes 5] [--workers 4] [--slow-mb 40] [--idle 2000]

One proxy process, two listeners: A forwards to SecantusDB (the pymongo workload and the upstream
restarts), B to the scripted backend (benchmarks/backend.py: the 40 MB reply, the idle connections, and
half of the RST clients). Phases, one per slot of the run: baseline; upstream restart 1; clients killed
with RST; a slow reader holding a 40 MB reply; 2,000 idle connections opened and closed; upstream
restart 2; cool-down. After each the run waits until every worker has succeeded again and the proxy's
connections are back to the baseline, then samples fds, RSS and the counters. Exit 0 when every phase
recovered and fds and RSS are back to the baseline (fds exactly, RSS within --rss-tolerance percent).
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import threading
import time
from typing import Any

import bson

from benchmarks import procs
from benchmarks.observe import Sample, fd_count, sample

SO_LINGER_RST = struct.pack("ii", 1, 0)  # close() sends RST instead of FIN


def log(msg: str) -> None:
    """Progress on stderr."""
    print(f"[faults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def op_msg(doc: dict, request_id: int = 1) -> bytes:
    """A whole OP_MSG with one kind-0 section."""
    body = b"\x00\x00\x00\x00\x00" + bson.encode(doc)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, 2013) + body


class Workers:
    """pymongo clients doing a steady trickle of commands through listener A, recording successes and errors."""

    def __init__(self, uri: str, n: int, interval: float) -> None:
        from pymongo import MongoClient

        self.clients = [
            MongoClient(uri, serverSelectionTimeoutMS=3000, socketTimeoutMS=5000, connectTimeoutMS=2000)
            for _ in range(n)
        ]
        self.interval = interval
        self.stop = threading.Event()
        self.last_ok = [0.0] * n
        self.ok = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def start(self) -> None:
        """Start every worker."""
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        coll = self.clients[i].fault.docs
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                if n % 3:
                    coll.find_one({"_id": n % 50})
                else:
                    coll.replace_one({"_id": n % 50}, {"w": i, "n": n}, upsert=True)
                with self._lock:
                    self.ok += 1
                self.last_ok[i] = time.monotonic()
            except Exception:  # noqa: BLE001 - errors are the point here: counted per phase
                with self._lock:
                    self.errors += 1
            self.stop.wait(self.interval)

    def all_ok_since(self, t: float) -> bool:
        """Every worker has succeeded after monotonic time t."""
        return all(x > t for x in self.last_ok)

    def finish(self) -> None:
        """Stop the workers and close their clients."""
        self.stop.set()
        for t in self._threads:
            t.join(15)
        for c in self.clients:
            c.close()


class Peaks:
    """Samples the proxy's RSS and fds from /proc every 0.2 s; peak() since the last reset()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss = 0
        self.fds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.rss = max(self.rss, procs.status_kb(self.pid, "VmRSS"))
                self.fds = max(self.fds, fd_count(self.pid))
            except (OSError, KeyError):
                return

    def reset(self) -> None:
        """Start a new peak."""
        self.rss = self.fds = 0

    def close(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(2)


class Run:
    """The processes, the workload and the table being built."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = procs.make_workdir()
        self.db_port = procs.free_port()
        self.db = self._start_db()
        self.backend = procs.start_backend(200, self.workdir)
        self.port_b = procs.free_port()
        self.proxy = procs.start_mongoproxy(
            "mongoproxy",
            self.db_port,
            self.workdir,
            ("--proxy", f"{self.port_b}:127.0.0.1:{self.backend.port}", "--connect-timeout", "2"),
        )
        self.port_a = self.proxy.port
        self.peaks = Peaks(self.proxy.pid)
        self.t0 = time.monotonic()
        self.rows: list[dict] = []
        self.baseline: Sample | None = None
        self.workers = Workers(f"mongodb://127.0.0.1:{self.port_a}/?directConnection=true", args.workers, args.interval)

    def _start_db(self) -> procs.Proc:
        p = procs.Proc(
            "secantus",
            [sys.executable, "-m", "secantus", "--port", str(self.db_port), "--storage-path", ":memory:"],
            self.db_port,
            procs._env(),
            f"{self.workdir}/secantus-{int(time.time())}.err",
        )
        p.wait_listening(60)
        return p

    def stop(self) -> None:
        """Stop everything this run started."""
        self.workers.finish()
        self.peaks.close()
        for p in (self.proxy, self.backend, self.db):
            p.stop()

    # ---- phases ----

    def restart_upstream(self) -> str:
        """Stop SecantusDB (SIGTERM), leave it down for 2 s, start it again on the same port."""
        self.db.stop()
        time.sleep(2)
        self.db = self._start_db()
        return f"SecantusDB stopped, down 2 s, restarted on port {self.db_port}"

    def rst_clients(self) -> str:
        """Clients that vanish with RST: mid-request on A, mid-reply (1 MB) on B."""
        n = self.args.rst
        for i in range(n):
            port = self.port_a if i % 2 else self.port_b
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if port == self.port_a:
                s.sendall(op_msg({"find": "docs", "filter": {}, "$db": "fault"}, i + 1)[:30])  # cut mid-request
            else:
                s.sendall(op_msg({"benchReply": 1_000_000, "$db": "bench"}, i + 1))
                s.recv(65536)  # part of the reply: the rest is in flight when the RST comes
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, SO_LINGER_RST)
            s.close()
        return f"{n} clients reset: {n // 2} mid-request (A), {n - n // 2} mid-reply of 1 MB (B)"

    def slow_reader(self) -> str:
        """One client asks B for a --slow-mb reply and reads it at about 4 MB/s, 64 KB at a time."""
        size = int(self.args.slow_mb * 1_000_000)
        s = socket.create_connection(("127.0.0.1", self.port_b), timeout=30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(op_msg({"benchReply": size, "$db": "bench"}, 7))
        head = b""
        while len(head) < 16:
            head += s.recv(16 - len(head))
        length = struct.unpack_from("<i", head)[0]
        got = len(head)
        t = time.monotonic()
        while got < length:
            chunk = s.recv(min(65536, length - got))
            if not chunk:
                break
            got += len(chunk)
            time.sleep(0.016)
        s.close()
        return f"read a {length / 1e6:.1f} MB reply in {time.monotonic() - t:.0f} s ({got == length and 'complete' or 'INCOMPLETE'})"

    def idle_connections(self) -> str:
        """--idle connections to B: opened, held until the proxy counts them, closed."""
        socks = []
        for _ in range(self.args.idle):
            socks.append(socket.create_connection(("127.0.0.1", self.port_b), timeout=10))
        base = self.baseline.connections if self.baseline else 0
        deadline = time.monotonic() + 30
        seen = 0.0
        while time.monotonic() < deadline:
            seen = sample(self.proxy, self.t0).connections
            if seen >= base + self.args.idle:
                break
            time.sleep(0.5)
        for s in socks:
            s.close()
        return f"{self.args.idle} idle connections opened (proxy counted {seen:.0f} open), then closed"

    # ---- bookkeeping ----

    def settle(self, since: float, until: float) -> float | None:
        """Wait until every worker has succeeded after `since` (None if never) and the slot has ended."""
        recovered = None
        while True:
            now = time.monotonic()
            if recovered is None and self.workers.all_ok_since(since):
                recovered = now - since
            if recovered is not None and now >= until:
                return recovered
            if now >= until + 60:  # never recovered: the row says so
                return recovered
            time.sleep(0.25)

    def phase(self, name: str, action: Any, slot: float) -> None:
        """Run one fault, wait for recovery and the end of its slot, and add a table row."""
        before = sample(self.proxy, self.t0)
        ok0, err0 = self.workers.ok, self.workers.errors
        self.peaks.reset()
        start = time.monotonic()
        log(f"{name} ...")
        what = action() if action else "steady load"
        # Recovery counts from the end of the fault (the upstream listening again, the sockets closed).
        recovered = self.settle(time.monotonic(), start + slot)
        after = sample(self.proxy, self.t0)
        row = {
            "phase": name,
            "what": what,
            "t_start_s": round(start - self.t0, 1),
            "worker_ok": self.workers.ok - ok0,
            "worker_errors": self.workers.errors - err0,
            "recovered_s": None if recovered is None else round(recovered, 1),
            "fds": [before.fds, max(self.peaks.fds, before.fds, after.fds), after.fds],
            "rss_mb": [
                round(before.rss_kb / 1024, 1),
                round(max(self.peaks.rss, before.rss_kb, after.rss_kb) / 1024, 1),
                round(after.rss_kb / 1024, 1),
            ],
            "connections_after": after.connections,
            "established": after.established - before.established,
            "disconnections": after.disconnections - before.disconnections,
            "upstream_errors": after.upstream_errors - before.upstream_errors,
            "decode_errors": after.decode_errors - before.decode_errors,
            "unmatched": after.unmatched - before.unmatched,
            "requests_dropped": after.requests_dropped - before.requests_dropped,
        }
        self.rows.append(row)
        log(f"{name}: {what}; recovered in {row['recovered_s']} s; fds {row['fds']}; RSS MB {row['rss_mb']}")


def print_table(rows: list[dict]) -> None:
    """The fault-survival table, plain text."""
    cols = (
        ("phase", 18, lambda r: r["phase"]),
        ("ok/err", 11, lambda r: f"{r['worker_ok']}/{r['worker_errors']}"),
        ("recov s", 7, lambda r: "NO" if r["recovered_s"] is None else f"{r['recovered_s']:.1f}"),
        ("fds bef/peak/aft", 17, lambda r: "/".join(map(str, r["fds"]))),
        ("RSS MB bef/peak/aft", 20, lambda r: "/".join(f"{x:.0f}" for x in r["rss_mb"])),
        ("conns", 5, lambda r: f"{r['connections_after']:.0f}"),
        ("estab", 6, lambda r: f"{r['established']:.0f}"),
        ("closed", 6, lambda r: f"{r['disconnections']:.0f}"),
        ("up_err", 6, lambda r: f"{r['upstream_errors']:.0f}"),
        ("dec_err", 7, lambda r: f"{r['decode_errors']:.0f}"),
        ("unmatch", 7, lambda r: f"{r['unmatched']:.0f}"),
    )
    print("| " + " | ".join(name.ljust(w) for name, w, _ in cols) + " |")
    print("|" + "|".join("-" * (w + 2) for _, w, _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(str(f(r)).ljust(w) for _, w, f in cols) + " |")
    print()
    for r in rows:
        print(f"- {r['phase']}: {r['what']}")


def main(argv: list[str] | None = None) -> int:
    """Run the phases; print the table; exit 1 when a phase did not recover or something leaked."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fault_survival", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--interval", type=float, default=0.02, help="pause between one worker's commands")
    ap.add_argument("--slow-mb", type=float, default=40.0)
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--rst", type=int, default=200)
    ap.add_argument("--rss-tolerance", type=float, default=10.0, help="percent over baseline still 'back'")
    ap.add_argument("--json", default="fault-survival.json")
    args = ap.parse_args(argv)
    phases = [
        ("baseline", None),
        ("upstream restart 1", "restart_upstream"),
        ("RST clients", "rst_clients"),
        (f"slow {args.slow_mb:g} MB reader", "slow_reader"),
        (f"{args.idle} idle conns", "idle_connections"),
        ("upstream restart 2", "restart_upstream"),
        ("cool-down", None),
    ]
    slot = args.minutes * 60 / len(phases)
    procs.raise_nofile(2 * args.idle + 1024)  # before the children start: they inherit it
    run = Run(args)
    try:
        run.workers.start()
        time.sleep(min(10.0, slot))  # warm-up: every worker connected, pools filled
        run.baseline = sample(run.proxy, run.t0)
        for name, method in phases:
            run.phase(name, getattr(run, method) if method else None, slot)
        total = time.monotonic() - run.t0
    finally:
        run.stop()
    base, last = run.rows[0], run.rows[-1]
    fds_back = last["fds"][2] <= base["fds"][2]
    rss_back = last["rss_mb"][2] <= base["rss_mb"][2] * (1 + args.rss_tolerance / 100)
    recovered = all(r["recovered_s"] is not None for r in run.rows)
    print(f"fault survival: {total / 60:.1f} min, {args.workers} pymongo workers, proxy pid {run.proxy.pid}")
    print_table(run.rows)
    print(
        f"\nrecovered every time: {recovered}; fds back to baseline: {fds_back} "
        f"({base['fds'][2]} -> {last['fds'][2]}); RSS back within {args.rss_tolerance:g}%: {rss_back} "
        f"({base['rss_mb'][2]} -> {last['rss_mb'][2]} MB)"
    )
    with open(args.json, "w") as f:
        json.dump({"rows": run.rows, "recovered": recovered, "fds_back": fds_back, "rss_back": rss_back}, f, indent=1)
    return 0 if recovered and fds_back and rss_back else 1


if __name__ == "__main__":
    sys.exit(main())
