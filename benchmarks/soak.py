"""`python -m benchmarks.soak`: a steady mixed pymongo workload through one proxy process against SecantusDB.

    python -m benchmarks.soak [--minutes 30] [--rate 1000] [--threads 8] [--plot soak.png] [--json soak.json]

Samples the proxy's RSS and fds (/proc) and its connections, pending-table sizes and asyncio tasks
(/metrics) every --sample-seconds, plots them to PNG (matplotlib) and judges the goals: RSS flat within
5 % after warm-up, fds and tasks flat, zero decode errors, zero unmatched replies. The rate is a target:
the rate achieved is reported (SecantusDB is a Python server). See docs/hardening.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from typing import Any

from benchmarks import procs
from benchmarks.observe import Sample, sample

KEYSPACE = 2000  # documents are upserted and deleted by _id in this range: the collection stays bounded
SMALL = 100  # documents of the read-only collection the scans run on


def log(msg: str) -> None:
    """Progress on stderr."""
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Workload:
    """Worker threads sharing one MongoClient, paced to a total rate; one more thread churns short-lived clients."""

    # (name, weight): a mix of point reads, writes, cursors with getMore, aggregation and counts.
    MIX = (
        ("find_one", 30),
        ("upsert", 15),
        ("update", 15),
        ("find_batches", 10),
        ("delete", 8),
        ("insert_many", 5),
        ("aggregate", 7),
        ("count", 5),
        ("ping", 5),
    )

    def __init__(self, uri: str, rate: float, threads: int, churn_seconds: float) -> None:
        from pymongo import MongoClient

        self.uri = uri
        self.client: Any = MongoClient(uri, maxPoolSize=threads, serverSelectionTimeoutMS=10_000)
        self.coll = self.client.soak.docs
        self.small = self.client.soak.small  # scans (cursors, aggregation, counts) run here: SecantusDB scans in Python
        self.rate = rate
        self.threads = threads
        self.churn_seconds = churn_seconds
        self.stop = threading.Event()
        self.ops = 0
        self.errors: dict[str, int] = {}
        self.churned = 0
        self._lock = threading.Lock()
        names, weights = zip(*self.MIX)
        self._names = names
        self._weights = weights
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        """Seed the collection, then start the workers."""
        self.coll.drop()
        self.coll.insert_many([{"_id": i, "n": i, "g": i % 10, "pad": "x" * 200} for i in range(KEYSPACE // 2)])
        self.small.drop()
        self.small.insert_many([{"_id": i, "g": i % 10, "pad": "z" * 100} for i in range(SMALL)])
        for i in range(self.threads):
            t = threading.Thread(target=self._work, args=(random.Random(i),), daemon=True)
            t.start()
            self._workers.append(t)
        t = threading.Thread(target=self._churn, daemon=True)
        t.start()
        self._workers.append(t)

    def finish(self) -> None:
        """Stop the workers and close the client."""
        self.stop.set()
        for t in self._workers:
            t.join(30)
        self.client.close()

    def _op(self, name: str, rng: random.Random) -> None:
        coll = self.coll
        key = rng.randrange(KEYSPACE)
        if name == "find_one":
            coll.find_one({"_id": key})
        elif name == "upsert":
            coll.replace_one({"_id": key}, {"n": key, "g": key % 10, "pad": "y" * 200}, upsert=True)
        elif name == "update":
            coll.update_one({"_id": key}, {"$inc": {"n": 1}})
        elif name == "find_batches":  # a cursor that needs getMores
            list(self.small.find({"g": key % 10}, batch_size=4))
        elif name == "delete":
            coll.delete_one({"_id": key})
        elif name == "insert_many":  # ids outside the keyspace, removed again at once; random so threads never collide
            base = KEYSPACE + rng.getrandbits(40) * 10
            coll.insert_many([{"_id": base + j, "n": j} for j in range(5)])
            coll.delete_many({"_id": {"$in": [base + j for j in range(5)]}})
        elif name == "aggregate":
            match = {"$match": {"g": {"$lte": key % 10}}}
            list(self.small.aggregate([match, {"$group": {"_id": "$g", "n": {"$sum": 1}}}]))
        elif name == "count":
            self.small.count_documents({"g": key % 10})
        else:
            self.client.admin.command("ping")

    def _work(self, rng: random.Random) -> None:
        interval = self.threads / self.rate
        due = time.monotonic()
        while not self.stop.is_set():
            name = rng.choices(self._names, self._weights)[0]
            try:
                self._op(name, rng)
                with self._lock:
                    self.ops += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported: a soak must not stop on one error
                with self._lock:
                    key = f"{name}: {type(exc).__name__}"
                    self.errors[key] = self.errors.get(key, 0) + 1
            due += interval
            now = time.monotonic()
            if due > now:
                self.stop.wait(due - now)
            elif now - due > 1.0:  # behind by more than a second: do not burst to catch up
                due = now

    def _churn(self) -> None:
        # New client connections all along: a handshake, a few commands, a close.
        from pymongo import MongoClient

        while not self.stop.wait(self.churn_seconds):
            try:
                with MongoClient(self.uri, serverSelectionTimeoutMS=10_000) as c:
                    c.soak.docs.find_one({"_id": 1})
                    c.admin.command("ping")
                with self._lock:
                    self.churned += 1
            except Exception as exc:  # noqa: BLE001
                with self._lock:
                    key = f"churn: {type(exc).__name__}"
                    self.errors[key] = self.errors.get(key, 0) + 1


def summarize(samples: list[Sample], warmup_s: float, ops: int, seconds: float, target: float) -> dict:
    """The goals, judged on the samples taken after warm-up."""
    steady = [s for s in samples if s.t >= warmup_s] or samples
    rss = [s.rss_kb for s in steady]
    ref = rss[0]
    rss_span = (max(rss) - min(rss)) / ref * 100 if ref else 0.0
    rss_drift = (rss[-1] - ref) / ref * 100 if ref else 0.0
    fds = [s.fds for s in steady]
    # A short-lived client may be open at a sample (and /proc and /metrics are read a moment apart), so single
    # samples jump by a few fds. A leak raises the floor: compare the lowest fd count of each fifth of the run.
    fifth = max(1, -(-len(steady) // 5))  # ceiling: five windows, the last one possibly shorter
    fd_floors = [min(s.fds for s in steady[i : i + fifth]) for i in range(0, len(steady), fifth)]
    tasks = [s.tasks for s in steady]
    pending = [s.pending for s in samples]
    last = samples[-1]
    rates = [
        (b.commands - a.commands) / (b.t - a.t) for a, b in zip(samples, samples[1:]) if b.t > a.t
    ]  # commands the proxy observed per second, each interval
    out = {
        "seconds": round(seconds, 1),
        "target_rate": target,
        "client_ops": ops,
        "client_ops_per_s": round(ops / seconds, 1) if seconds else 0,
        "proxy_commands_per_s_min": round(min(rates), 1) if rates else None,
        "proxy_commands_per_s_max": round(max(rates), 1) if rates else None,
        "warmup_s": warmup_s,
        "rss_mb_after_warmup": round(ref / 1024, 1),
        "rss_mb_end": round(rss[-1] / 1024, 1),
        "rss_mb_min": round(min(rss) / 1024, 1),
        "rss_mb_max": round(max(rss) / 1024, 1),
        "rss_span_pct": round(rss_span, 2),
        "rss_drift_pct": round(rss_drift, 2),
        "fds_min": min(fds),
        "fds_max": max(fds),
        "fd_floor_per_fifth": fd_floors,
        "tasks_min": min(tasks),
        "tasks_max": max(tasks),
        "pending_max": max(pending),
        "decode_errors": last.decode_errors,
        "unmatched_replies": last.unmatched,
        "requests_dropped": last.requests_dropped,
        "connections_established": last.established,
    }
    out["goals"] = {
        "rss_flat_5pct": rss_span <= 5.0,
        "fds_flat": max(fd_floors) - min(fd_floors) <= 2,
        "tasks_flat": max(tasks) - min(tasks) <= 2,
        "zero_decode_errors": last.decode_errors == 0,
        "zero_unmatched_replies": last.unmatched == 0,
    }
    return out


def plot(samples: list[Sample], warmup_s: float, title: str, path: str) -> None:
    """Four panels over time: RSS, fds and connections, tasks and pending requests, commands per second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    axes[0].plot(t, [s.rss_kb / 1024 for s in samples], color="tab:blue")
    axes[0].set_ylabel("proxy RSS (MB)")
    axes[1].plot(t, [s.fds for s in samples], label="fds")
    axes[1].plot(t, [s.connections for s in samples], label="client connections")
    axes[1].legend(loc="lower right")
    axes[2].plot(t, [s.tasks for s in samples], label="asyncio tasks")
    axes[2].plot(t, [s.pending for s in samples], label="pending requests")
    axes[2].legend(loc="lower right")
    rates = [0.0] + [
        (b.commands - a.commands) / (b.t - a.t) if b.t > a.t else 0.0 for a, b in zip(samples, samples[1:])
    ]
    axes[3].plot(t, rates, color="tab:green")
    axes[3].set_ylabel("commands/s")
    axes[3].set_xlabel("minutes")
    for ax in axes:
        ax.axvline(warmup_s / 60, color="grey", linestyle=":", linewidth=1)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def resummarize(path: str, warmup_s: float, plot_path: str) -> int:
    """Judge and plot the samples saved by an earlier run (the client-side figures are kept as they were)."""
    with open(path) as f:
        saved = json.load(f)
    old = saved["summary"]
    samples = [Sample(**d) for d in saved["samples"]]
    res = summarize(samples, warmup_s, old["client_ops"], old["seconds"], old["target_rate"])
    for k in ("client_errors", "short_lived_clients", "threads"):
        res[k] = old.get(k)
    title = (
        f"soak: {old['seconds'] / 60:.0f} min, {res['client_ops_per_s']:.0f} ops/s achieved "
        f"(target {old['target_rate']:g}), RSS span {res['rss_span_pct']:.1f}% after warm-up"
    )
    plot(samples, warmup_s, title, plot_path)
    print(json.dumps(res, indent=1))
    return 0 if all(res["goals"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    """Run the soak; exit 0 when every goal is met, 1 otherwise."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=1000.0, help="target operations per second, all threads")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--sample-seconds", type=float, default=10.0)
    ap.add_argument("--warmup-minutes", type=float, default=None, help="default: a sixth of the run, at most 5")
    ap.add_argument("--churn-seconds", type=float, default=5.0, help="a short-lived client connects this often")
    ap.add_argument("--plot", default="soak.png")
    ap.add_argument("--json", default="soak.json")
    ap.add_argument("--resummarize", metavar="JSON", help="judge and plot the samples of an earlier run; no run")
    args = ap.parse_args(argv)
    warmup_s = 60 * (args.warmup_minutes if args.warmup_minutes is not None else min(5.0, args.minutes / 6))
    if args.resummarize:
        return resummarize(args.resummarize, warmup_s, args.plot)
    workdir = procs.make_workdir()
    log(f"workdir {workdir}")
    db = procs.start_secantus(workdir)
    proxy = None
    samples: list[Sample] = []
    try:
        proxy = procs.start_mongoproxy("mongoproxy", db.port, workdir)
        uri = f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true"
        load = Workload(uri, args.rate, args.threads, args.churn_seconds)
        load.start()
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        next_sample = t0
        while True:
            now = time.monotonic()
            if now >= next_sample:
                s = sample(proxy, t0)
                samples.append(s)
                log(
                    f"t={s.t:5.0f}s rss={s.rss_kb / 1024:.1f}MB fds={s.fds} conns={s.connections:.0f} "
                    f"tasks={s.tasks:.0f} pending={s.pending:.0f} commands={s.commands:.0f} ops={load.ops} "
                    f"decode_errors={s.decode_errors:.0f} unmatched={s.unmatched:.0f} client_errors={sum(load.errors.values())}"
                )
                next_sample += args.sample_seconds
            if now >= end:
                break
            time.sleep(max(0.0, min(next_sample, end) - time.monotonic()))
        seconds = time.monotonic() - t0
        ops = load.ops
        load.finish()
    finally:
        if proxy is not None:
            proxy.stop()
        db.stop()
    res = summarize(samples, warmup_s, ops, seconds, args.rate)
    res["client_errors"] = load.errors
    res["short_lived_clients"] = load.churned
    res["threads"] = args.threads
    with open(args.json, "w") as f:
        json.dump({"summary": res, "samples": [s.as_dict() for s in samples]}, f, indent=1)
    title = (
        f"soak: {args.minutes:g} min, {res['client_ops_per_s']:.0f} ops/s achieved (target {args.rate:g}), "
        f"RSS span {res['rss_span_pct']:.1f}% after warm-up"
    )
    plot(samples, warmup_s, title, args.plot)
    print(json.dumps(res, indent=1))
    log(f"wrote {args.json} and {args.plot}")
    return 0 if all(res["goals"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
