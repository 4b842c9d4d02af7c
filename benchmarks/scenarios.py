"""The scenarios of `python -m benchmarks`, each returning a JSON-ready dict.

Variants of one scenario run side by side and interleaved: round after round,
each variant takes its turn (A B C A B C ...), so machine drift hits all of
them alike. Latencies are wall time seen by a client in this process; CPU is
user + system time of the proxy process from /proc/PID/stat.
"""

from __future__ import annotations

import socket
import statistics
import struct
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import bson

from benchmarks import procs

OP_MSG = 2013
HEADER = struct.Struct("<iiii")
MiB = 1024 * 1024


# ---- requests and a raw-socket client ----


def op_msg(doc: dict, request_id: int = 1) -> bytearray:
    """A whole OP_MSG with one kind-0 section."""
    body = b"\x00\x00\x00\x00\x00" + bson.encode(doc)
    return bytearray(HEADER.pack(16 + len(body), request_id, 0, OP_MSG) + body)


def small_find() -> bytearray:
    """What a driver sends for find_one by _id (without session fields)."""
    return op_msg({"find": "c", "filter": {"_id": 1}, "limit": 1, "singleBatch": True, "$db": "bench"})


def big_insert(total: int, doc_size: int = 1024) -> bytes:
    """An insert of about `total` bytes: a kind-1 `documents` sequence, as drivers send bulk inserts."""
    doc = bson.encode({"_id": 0, "pad": b"x" * (doc_size - 26)})
    n = max(1, (total - 200) // len(doc))
    seq = b"documents\x00" + doc * n
    body = (
        b"\x00\x00\x00\x00"
        + b"\x00"
        + bson.encode({"insert": "big", "ordered": False, "$db": "bench"})
        + b"\x01"
        + struct.pack("<i", 4 + len(seq))
        + seq
    )
    return HEADER.pack(16 + len(body), 7, 0, OP_MSG) + body


class RawClient:
    """A blocking socket that sends one request and reads one whole reply, with no allocation per call."""

    def __init__(self, port: int, max_reply: int = 1 << 16) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(max_reply)
        self.view = memoryview(self.buf)
        self.next_id = 1

    def roundtrip(self, req: bytearray) -> int:
        """Send `req` (its requestID renumbered) and read the reply; the reply's length."""
        self.next_id += 1
        struct.pack_into("<i", req, 4, self.next_id)
        self.sock.sendall(req)
        return self.read_reply()

    def read_reply(self) -> int:
        """Read one whole reply into the buffer; its length."""
        recv_into, view = self.sock.recv_into, self.view
        got = 0
        while got < 4:
            k = recv_into(view[got:])
            if not k:
                raise ConnectionError("closed by the peer")
            got += k
        length = int.from_bytes(self.buf[:4], "little")
        if length > len(self.buf):
            raise ValueError(f"reply of {length} bytes is larger than the buffer")
        while got < length:
            k = recv_into(view[got:length])
            if not k:
                raise ConnectionError("closed by the peer")
            got += k
        return length

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def turns(names: Sequence[str], r: int) -> list[str]:
    """The variants' order in round r: each leads in turn, so that none always runs right after the same one."""
    k = r % len(names)
    return [*names[k:], *names[:k]]


def _pct(samples: Sequence[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def _settle_cpu(proc: procs.Proc, quiet: float = 0.6, limit: float = 8.0) -> int:
    """CPU time once the process has stopped using CPU (background exports flushed); ns."""
    deadline = time.monotonic() + limit
    last = proc.cpu_ns()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = proc.cpu_ns()
        if now == last:
            return now
        last = now
    return last


def observed_commands(proc: procs.Proc) -> int | None:
    """Commands the proxy's metrics counted (sum of the latency histogram counts), or None."""
    port = getattr(proc, "admin_port", None)
    if not port:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("mongoproxy_response_latency_seconds_count")
        )
    )


# ---- scenarios 1 and 2: small round trips, latency and CPU ----


def small_round_trip_raw(
    targets: dict[str, procs.Proc | None],
    ports: dict[str, int],
    rounds: int,
    per_round: int,
    warmup: int = 200,
    connect: Callable[..., RawClient] = RawClient,
) -> dict:
    """Raw-socket small find round trips: latency per variant and CPU per request of each proxy process.

    `connect(port)` makes the client (benchmarks.tlsbench passes one that speaks TLS).
    """
    req = small_find()
    clients = {name: connect(port) for name, port in ports.items()}
    samples: dict[str, list[int]] = {name: [] for name in ports}
    try:
        for c in clients.values():
            for _ in range(warmup):
                c.roundtrip(req)
        cpu0 = {name: p.cpu_ns() for name, p in targets.items() if p is not None}
        clock = time.perf_counter_ns
        for r in range(rounds):
            for name in turns(list(clients), r):
                append, rt = samples[name].append, clients[name].roundtrip
                for _ in range(per_round):
                    t0 = clock()
                    rt(req)
                    append(clock() - t0)
        cpu1 = {name: _settle_cpu(p) for name, p in targets.items() if p is not None}
    finally:
        for c in clients.values():
            c.close()
    n = rounds * per_round
    lat = _latency_table(samples)
    cpu = {
        name: {
            "us_per_request": (cpu1[name] - cpu0[name]) / n / 1000,
            "requests": n,
            "cpu_ms": (cpu1[name] - cpu0[name]) / 1e6,
        }
        for name in cpu0
    }
    return {"latency": lat, "cpu": cpu, "requests_per_variant": n}


def _latency_table(samples: dict[str, list[int]]) -> dict:
    out: dict[str, Any] = {}
    for name, s in samples.items():
        out[name] = {
            "p50_us": _pct(s, 0.50) / 1000,
            "p99_us": _pct(s, 0.99) / 1000,
            "mean_us": statistics.fmean(s) / 1000,
            "n": len(s),
        }
    base = out.get("direct")
    if base:
        for row in out.values():
            row["added_p50_us"] = row["p50_us"] - base["p50_us"]
            row["added_p99_us"] = row["p99_us"] - base["p99_us"]
    return out


def small_round_trip_pymongo(ports: dict[str, int], rounds: int, per_round: int, warmup: int = 100) -> dict:
    """pymongo find_one by _id round trips: latency per variant."""
    import pymongo

    clients = {
        name: pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true", serverSelectionTimeoutMS=10000)
        for name, port in ports.items()
    }
    samples: dict[str, list[int]] = {name: [] for name in ports}
    try:
        colls = {name: c.bench.c for name, c in clients.items()}
        for coll in colls.values():
            for _ in range(warmup):
                coll.find_one({"_id": 1})
        clock = time.perf_counter_ns
        for r in range(rounds):
            for name in turns(list(colls), r):
                append, find_one = samples[name].append, colls[name].find_one
                for _ in range(per_round):
                    t0 = clock()
                    find_one({"_id": 1})
                    append(clock() - t0)
    finally:
        for c in clients.values():
            c.close()
    return {"latency": _latency_table(samples), "requests_per_variant": rounds * per_round}


# ---- scenario 3: large replies ----


def large_replies(
    targets: dict[str, procs.Proc | None],
    ports: dict[str, int],
    sizes: Sequence[int],
    rounds: int,
    per_round: int,
    connect: Callable[..., RawClient] = RawClient,
) -> dict:
    """MB/s of replies of each size per variant (request {benchReply: size}; reply of 1 KB documents),
    and the proxy process's CPU time per MB."""
    out: dict[str, Any] = {}
    clients = {name: connect(port, max_reply=max(sizes) + MiB) for name, port in ports.items()}
    try:
        for size in sizes:
            req = op_msg({"benchReply": size, "$db": "bench"})
            times: dict[str, list[int]] = {name: [] for name in ports}
            nbytes = 0
            for c in clients.values():
                nbytes = c.roundtrip(req)  # warm-up; the server caches the reply
            clock = time.perf_counter_ns
            cpu = {name: 0 for name in ports}
            for r in range(rounds):
                for name in turns(list(clients), r):
                    c = clients[name]
                    proc = targets.get(name)
                    c0 = proc.cpu_ns() if proc is not None else 0
                    for _ in range(per_round):
                        t0 = clock()
                        c.roundtrip(req)
                        times[name].append(clock() - t0)
                    if proc is not None:
                        cpu[name] += proc.cpu_ns() - c0
            rows = {}
            for name, t in times.items():
                med = statistics.median(t)
                rows[name] = {
                    "mb_s": nbytes / (med / 1e9) / 1e6,
                    "median_ms": med / 1e6,
                    "best_mb_s": nbytes / (min(t) / 1e9) / 1e6,
                    "n": len(t),
                }
                if targets.get(name) is not None:
                    rows[name]["cpu_ms_per_mb"] = cpu[name] / 1e6 / (nbytes * len(t) / 1e6)
            out[f"{size // MiB}MiB"] = {"reply_bytes": nbytes, "variants": rows}
    finally:
        for c in clients.values():
            c.close()
    return out


# ---- scenario 5: memory ----


def idle_connections(proc: procs.Proc, port: int, counts: Sequence[int], settle: float = 1.0) -> dict:
    """RSS of `proc` with each count of idle connection pairs open (each did one round trip first)."""
    req = small_find()
    time.sleep(settle)
    base = proc.rss_kb()
    socks: list[socket.socket] = []
    rows = []
    try:
        for target in counts:
            fresh = []
            while len(socks) < target:
                s = socket.create_connection(("127.0.0.1", port), timeout=30)
                socks.append(s)
                fresh.append(s)
            for s in fresh:  # pipelined: all requests out, then every reply in
                s.sendall(req)
            for s in fresh:
                c = RawClient.__new__(RawClient)
                c.sock, c.buf = s, bytearray(4096)
                c.view = memoryview(c.buf)
                c.read_reply()
            time.sleep(settle)
            rss = proc.rss_kb()
            rows.append({"connections": target, "rss_kb": rss, "kb_per_connection": (rss - base) / target})
    finally:
        for s in socks:
            s.close()
    return {"baseline_rss_kb": base, "points": rows}


def stream_big_message(proc: procs.Proc, port: int, total: int) -> dict:
    """RSS growth of `proc` while one `total`-byte insert streams through it (peak via VmHWM, else sampled)."""
    msg = big_insert(total)
    c = RawClient(port)
    try:
        c.roundtrip(small_find())
        time.sleep(0.5)
        base = proc.rss_kb()
        hwm_ok = procs.reset_peak_rss(proc.pid)
        peak = [base]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    peak[0] = max(peak[0], proc.rss_kb())
                except OSError:
                    return
                time.sleep(0.002)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.perf_counter()
        c.sock.sendall(msg)
        c.read_reply()
        elapsed = time.perf_counter() - t0
        stop.set()
        t.join()
        hwm = procs.status_kb(proc.pid, "VmHWM") if hwm_ok else 0
        top = max(peak[0], hwm)
        return {
            "message_bytes": len(msg),
            "baseline_rss_kb": base,
            "peak_rss_kb": top,
            "growth_kb": top - base,
            "peak_source": "VmHWM" if hwm_ok and hwm >= peak[0] else "sampled",
            "mb_s": len(msg) / elapsed / 1e6,
        }
    finally:
        c.close()


# ---- scenario 4: scanner micro-benchmark ----


def _tweet(i: int, pad: int = 0) -> dict:
    """A tweet-shaped document (nested user, entities, counters), about 1 KB with pad=0."""
    return {
        "_id": i,
        "text": "@someone this is tweet number %d with some words in it #benchmark" % i,
        "created_at": "Sun Jan 01 00:00:%02d +0000 2026" % (i % 60),
        "retweet_count": i % 17,
        "favorited": bool(i % 2),
        "truncated": False,
        "in_reply_to_status_id": None,
        "source": "web",
        "user": {
            "id": 1000 + i,
            "screen_name": "user%d" % i,
            "name": "User Number %d" % i,
            "location": "Somewhere, Earth",
            "description": "Writes benchmarks for fun and profit " * 3,
            "followers_count": 1234 + i,
            "friends_count": 321,
            "statuses_count": 99_999,
            "created_at": "Mon Feb 02 00:00:00 +0000 2015",
            "verified": False,
            "lang": "en",
            "profile_image_url": "http://example.com/images/%d/normal.png" % i,
        },
        "entities": {
            "hashtags": [{"text": "benchmark", "indices": [50, 60]}],
            "urls": [],
            "user_mentions": [{"screen_name": "someone", "id": 42, "indices": [0, 8]}],
        },
        "geo": None,
        "coordinates": None,
        "place": None,
        "pad": "x" * pad,
    }


def scanner(quick: bool) -> dict:
    """The scanner micro-benchmark (benchmarks.bench_scanner) in the harness's row shape."""
    from benchmarks import bench_scanner

    rows = bench_scanner.run(quick)
    chunked = {r["case"].split(",")[0]: r for r in rows if r["case"].endswith("KiB chunks")}
    cases = []
    for r in rows:
        if r["bson_decode_us"] is None:
            continue  # the chunked and rendering rows are folded in or left out
        row = {
            "case": r["case"],
            "bytes": r["bytes"],
            "scanner_us": r["scanner_us"],
            "bson_decode_us": r["bson_decode_us"],
            "speedup": r["bson_decode_us"] / r["scanner_us"],
        }
        if r["case"] in chunked:
            row["scanner_chunked_us"] = chunked[r["case"]]["scanner_us"]
        cases.append(row)
    return {"cases": cases}


def tap_cost(roots: dict[str, str], pairs: int, rounds: int = 2) -> dict:
    """The tap's in-process µs per small round trip (benchmarks/tapcost.py) for each checkout, interleaved."""
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tapcost.py")
    best: dict[str, dict] = {}
    for r in range(rounds):
        for name in turns(list(roots), r):
            root = roots[name]
            out = subprocess.run(
                [sys.executable, script, "--root", root, "--pairs", str(pairs), "--repeat", "3"],
                capture_output=True,
                text=True,
                timeout=300,
                cwd=root,
            )
            if out.returncode != 0:
                raise RuntimeError(f"tapcost.py --root {root} failed: {out.stderr[-2000:]}")
            row = json.loads(out.stdout)
            prev = best.get(name)
            best[name] = {k: min(row[k], prev[k]) if prev else row[k] for k in ("bare_us", "metrics_us")}
    return best


# ---- scenario 6: MongoDB driver benchmark tasks against SecantusDB ----


def small_doc(i: int) -> dict:
    """A SMALL_DOC-shaped document: a dozen short string and number fields (about 250 bytes)."""
    return {
        "oggiwa": "aAvjnfdjlwmmbxcb",
        "nmahlsw": 5 + i % 7,
        "qwertyu": "kWzIpQOrpAxrEsYi",
        "asdfgh": 43567,
        "zxcvbnm": "ZxYtbNgPqWuLmRoE",
        "poiuyt": 7788,
        "lkjhgf": "TeBwkZlFHtmNvPqU",
        "mnbvcxz": 19.5,
        "qazwsx": "rFvTgBhYuJmKiLoP",
        "edcrfv": 1,
        "tgbyhn": "wErTyUiOpAsDfGhJ",
        "ujmikl": 33.75,
    }


def driver_tasks(ports: dict[str, int], rounds: int, n_commands: int, n_docs: int, n_inserts: int) -> dict:
    """RunCommand, FindOneByID, SmallDocInsertOne, FindManyAndEmptyCursor: median seconds per variant."""
    import pymongo

    clients = {
        name: pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true", serverSelectionTimeoutMS=20000)
        for name, port in ports.items()
    }
    first = next(iter(clients.values()))
    db_name = "perftest"
    first.drop_database(db_name)
    corpus = first[db_name].corpus
    corpus.insert_many([_tweet(i) for i in range(n_docs)], ordered=True)

    def run_command(c: Any, name: str) -> None:
        admin = c.admin
        for _ in range(n_commands):
            admin.command("hello")

    def find_one_by_id(c: Any, name: str) -> None:
        coll = c[db_name].corpus
        for i in range(n_docs):
            coll.find_one({"_id": i})

    def insert_one(c: Any, name: str) -> None:
        coll = c[db_name]["small_" + name]
        for i in range(n_inserts):
            coll.insert_one(small_doc(i))

    def insert_setup(c: Any, name: str) -> None:
        c[db_name].create_collection("small_" + name)

    def insert_teardown(c: Any, name: str) -> None:
        # Dropped after each run: SecantusDB's inserts slow down several-fold once ~10k documents accumulate.
        c[db_name].drop_collection("small_" + name)

    def find_many(c: Any, name: str) -> None:
        for _ in c[db_name].corpus.find({}):
            pass

    tasks: list[tuple[str, Callable, Callable | None, Callable | None, int]] = [
        ("RunCommand", run_command, None, None, n_commands),
        ("FindOneByID", find_one_by_id, None, None, n_docs),
        ("SmallDocInsertOne", insert_one, insert_setup, insert_teardown, n_inserts),
        ("FindManyAndEmptyCursor", find_many, None, None, n_docs),
    ]
    out: dict[str, Any] = {}
    try:
        for c in clients.values():  # connect and warm up every variant
            c.admin.command("ping")
            c[db_name].corpus.find_one({"_id": 0})
        names = list(clients)
        for task, fn, setup, teardown, ops in tasks:
            times: dict[str, list[float]] = {name: [] for name in clients}
            for r in range(rounds):
                for name in turns(names, r):
                    c = clients[name]
                    if setup is not None:
                        setup(c, name)
                    t0 = time.perf_counter()
                    fn(c, name)
                    times[name].append(time.perf_counter() - t0)
                    if teardown is not None:
                        teardown(c, name)
            rows = {
                name: {
                    "median_s": statistics.median(t),
                    "best_s": min(t),
                    "runs": len(t),
                    "us_per_op": statistics.median(t) / ops * 1e6,
                    "runs_s": t,
                }
                for name, t in times.items()
            }
            out[task] = {"operations": ops, "variants": rows}
        first.drop_database(db_name)
    finally:
        for c in clients.values():
            c.close()
    return out
