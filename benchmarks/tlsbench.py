"""The TLS scenario of `python -m benchmarks`: mongoproxy and haproxy terminating and originating TLS.

Every hop is encrypted: the client speaks TLS to the proxy, the proxy speaks
TLS to a TLS backend (benchmarks.backend with --tls-cert), verifying it
against the test CA. `direct` is the client speaking TLS to the backend. All
variants run at once and take turns (interleaved); the whole measurement is
repeated `tls_repeats` times in the same run, and each figure is reported as
the median of the repeats with its min-max spread.
"""

from __future__ import annotations

import os
import socket
import ssl
import statistics
import time
from typing import Any

from benchmarks import procs, scenarios

MiB = scenarios.MiB
VARIANTS = ("direct", "haproxy", "mongoproxy")


def make_certs(workdir: str) -> dict[str, str]:
    """A CA and a localhost/127.0.0.1 certificate (trustme), as files: cert, key, pem (both), ca."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    paths = {k: os.path.join(workdir, f"tls-{k}.pem") for k in ("cert", "key", "pem", "ca")}
    leaf.cert_chain_pems[0].write_to_path(paths["cert"])
    leaf.private_key_pem.write_to_path(paths["key"])
    leaf.private_key_and_cert_chain_pem.write_to_path(paths["pem"])
    ca.cert_pem.write_to_path(paths["ca"])
    return paths


def tls_connect(ctx: ssl.SSLContext):
    """A RawClient factory whose socket speaks TLS (verifying localhost against the CA)."""

    def connect(port: int, max_reply: int = 1 << 16) -> scenarios.RawClient:
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = scenarios.RawClient.__new__(scenarios.RawClient)
        c.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        c.buf = bytearray(max_reply)
        c.view = memoryview(c.buf)
        c.next_id = 1
        return c

    return connect


def handshakes(
    targets: dict[str, procs.Proc | None], ports: dict[str, int], ctx: ssl.SSLContext, rounds: int, per_round: int
) -> dict:
    """New TLS connections per second (connect, handshake, one round trip, close), and proxy CPU per connection."""
    connect = tls_connect(ctx)
    req = scenarios.small_find()
    elapsed = {name: 0.0 for name in ports}
    cpu = {name: 0 for name in ports}
    for r in range(rounds):
        for name in scenarios.turns(list(ports), r):
            port = ports[name]
            proc = targets.get(name)
            c0 = proc.cpu_ns() if proc is not None else 0
            t0 = time.perf_counter()
            for _ in range(per_round):
                c = connect(port)
                c.roundtrip(req)
                c.close()
            elapsed[name] += time.perf_counter() - t0
            if proc is not None:
                cpu[name] += proc.cpu_ns() - c0
    n = rounds * per_round
    out: dict[str, Any] = {}
    for name in ports:
        out[name] = {"per_s": n / elapsed[name], "connections": n}
        if targets.get(name) is not None:
            out[name]["cpu_ms_per_connection"] = cpu[name] / 1e6 / n
    return out


def run_tls(p: Any, workdir: str, log: Any) -> dict:
    """Start the TLS backend, haproxy and mongoproxy, measure `p.tls_repeats` times, summarise."""
    certs = make_certs(workdir)
    ctx = ssl.create_default_context(cafile=certs["ca"])
    started: list[procs.Proc] = []
    try:
        backend = procs.start_backend(p.reply_size, workdir, tls=(certs["cert"], certs["key"]))
        started.append(backend)
        hap = procs.start_haproxy(backend.port, workdir, tls=(certs["pem"], certs["ca"]))
        started.append(hap)
        args = (
            "--tls-cert",
            certs["cert"],
            "--tls-key",
            certs["key"],
            "--upstream-tls",
            "--upstream-tls-ca",
            certs["ca"],
        )
        mp = procs.start_mongoproxy("mongoproxy-tls", backend.port, workdir, args)
        started.append(mp)
        targets: dict[str, procs.Proc | None] = {"direct": None, "haproxy": hap, "mongoproxy": mp}
        ports = {name: (backend.port if t is None else t.port) for name, t in targets.items()}
        reps = []
        for i in range(p.tls_repeats):
            log(f"TLS repeat {i + 1}/{p.tls_repeats}: small round trips, 4 MiB replies, new connections")
            raw = scenarios.small_round_trip_raw(
                targets, ports, p.tls_rounds, p.tls_per_round, connect=tls_connect(ctx)
            )
            large = scenarios.large_replies(
                targets, ports, (4 * MiB,), p.tls_large_rounds, p.large_per_round, connect=tls_connect(ctx)
            )
            hs = handshakes(targets, ports, ctx, p.tls_handshake_rounds, p.tls_handshakes_per_round)
            reps.append({"raw": raw, "large": large["4MiB"], "handshakes": hs})
        observed = scenarios.observed_commands(mp)
        return {"repeats": reps, "summary": summarise(reps), "commands_observed": observed}
    finally:
        for proc in reversed(started):
            proc.stop()


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def summarise(reps: list[dict]) -> dict:
    """Per variant: added p50 µs, CPU µs per request, 4 MiB MB/s, connections/s; median and min-max of repeats."""
    out: dict[str, Any] = {}
    for name in VARIANTS:
        row: dict[str, Any] = {
            "p50_us": _spread([r["raw"]["latency"][name]["p50_us"] for r in reps]),
            "mb_s_4MiB": _spread([r["large"]["variants"][name]["mb_s"] for r in reps]),
            "handshakes_per_s": _spread([r["handshakes"][name]["per_s"] for r in reps]),
        }
        if name != "direct":
            row["added_p50_us"] = _spread([r["raw"]["latency"][name]["added_p50_us"] for r in reps])
            row["cpu_us_per_request"] = _spread([r["raw"]["cpu"][name]["us_per_request"] for r in reps])
            row["cpu_ms_per_connection"] = _spread([r["handshakes"][name]["cpu_ms_per_connection"] for r in reps])
        out[name] = row
    ratios = {}
    for key in ("added_p50_us", "cpu_us_per_request", "mb_s_4MiB", "handshakes_per_s", "cpu_ms_per_connection"):
        per = [_ratio(_at(reps, i, "mongoproxy", key), _at(reps, i, "haproxy", key)) for i in range(len(reps))]
        per = [x for x in per if x is not None]
        ratios[key] = _spread(per) if per else None
    out["mongoproxy_over_haproxy"] = ratios
    return out


def _at(reps: list[dict], i: int, name: str, key: str) -> float:
    r = reps[i]
    if key == "added_p50_us":
        return r["raw"]["latency"][name]["added_p50_us"]
    if key == "cpu_us_per_request":
        return r["raw"]["cpu"][name]["us_per_request"]
    if key == "mb_s_4MiB":
        return r["large"]["variants"][name]["mb_s"]
    if key == "handshakes_per_s":
        return r["handshakes"][name]["per_s"]
    return r["handshakes"][name]["cpu_ms_per_connection"]


def _ratio(a: float, b: float) -> float | None:
    return None if not b else a / b


def goals(tls: dict) -> list[dict]:
    """T1-T3: the TLS goals of issue 11, from the medians of the per-repeat ratios."""
    r = tls["summary"]["mongoproxy_over_haproxy"]
    out = []
    for gid, key, goal, ok in (
        ("T1", "added_p50_us", "TLS: added p50 latency <= 1.0x haproxy's", lambda x: x <= 1.0),
        ("T2", "cpu_us_per_request", "TLS: CPU per request <= 1.2x haproxy's", lambda x: x <= 1.2),
        ("T3", "mb_s_4MiB", "TLS: 4 MiB reply throughput >= 1.0x haproxy's", lambda x: x >= 1.0),
    ):
        s = r.get(key)
        measured = "n/a" if s is None else f"{s['median']:.2f}x (repeats {s['min']:.2f}-{s['max']:.2f}x)"
        out.append({"id": gid, "goal": goal, "measured": measured, "met": None if s is None else ok(s["median"])})
    s = r.get("handshakes_per_s")
    out.append(
        {
            "id": "T4",
            "goal": "TLS: new connections per second, reported against haproxy's",
            "measured": "n/a" if s is None else f"{s['median']:.2f}x (repeats {s['min']:.2f}-{s['max']:.2f}x)",
            "met": None,
        }
    )
    return out


def table_rows(tls: dict) -> list[tuple[str, ...]]:
    """Rows of the TLS table: variant, then each figure as 'median (min-max)'."""
    s = tls["summary"]

    def f(row: dict, key: str, fmt: str = "{:.1f}") -> str:
        v = row.get(key)
        if v is None:
            return ""
        return f"{fmt.format(v['median'])} ({fmt.format(v['min'])}-{fmt.format(v['max'])})"

    rows = []
    for name in VARIANTS:
        row = s[name]
        rows.append(
            (
                name,
                f(row, "p50_us"),
                f(row, "added_p50_us"),
                f(row, "cpu_us_per_request"),
                f(row, "mb_s_4MiB", "{:.0f}"),
                f(row, "handshakes_per_s", "{:.0f}"),
                f(row, "cpu_ms_per_connection", "{:.2f}"),
            )
        )
    ratios = s["mongoproxy_over_haproxy"]
    rows.append(
        (
            "mongoproxy ÷ haproxy",
            "",
            *(
                ""
                if ratios.get(k) is None
                else f"{ratios[k]['median']:.2f}x ({ratios[k]['min']:.2f}-{ratios[k]['max']:.2f})"
                for k in (
                    "added_p50_us",
                    "cpu_us_per_request",
                    "mb_s_4MiB",
                    "handshakes_per_s",
                    "cpu_ms_per_connection",
                )
            ),
        )
    )
    return rows


TABLE_COLUMNS = (
    "variant",
    "p50 µs",
    "added p50 µs",
    "CPU µs / request",
    "4 MiB MB/s",
    "new conn / s",
    "CPU ms / new conn",
)
