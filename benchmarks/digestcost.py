"""The query digest's CPU cost per command, side by side with the digest off, in one run.

    python benchmarks/digestcost.py [--pairs N] [--rounds R]

Feeds N request/reply pairs (tapcost.py's find and its one-document reply, a new _id each time) through what
server.py builds per connection (two FrameScanners, a Tracker, a SinkBus with the default sinks), in four variants:
  off        the metrics sink, no rendering: `mongoproxy run --no-digest` (the default before the digest)
  render     + the scanner renders each request's redacted shape, nobody reads it (the rendering's own cost)
  digest     + the digest and the live-view sinks (no browser subscribed): the new default
  digest100  as digest, with requests spread over 100 shapes (more keys, the same cached shape lookups)
Variants run interleaved, their order rotating each round, so machine noise hits them alike. Each figure is the
thread CPU time per round trip; the JSON line gives min/median/max over the rounds, and each variant minus `off`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = ("off", "render", "digest", "digest100")


def build_pairs(pairs: int, shapes: int) -> tuple[list[bytes], list[bytes]]:
    """Requests (find by a field named after one of `shapes` shapes, a new value each) and their replies."""
    import bson

    from benchmarks.tapcost import build_pair

    head = struct.Struct("<iiii")
    _, rep = build_pair()
    reqs, reps = [], []
    for i in range(pairs):
        body = b"\x00\x00\x00\x00\x00" + bson.encode(
            {"find": "c", "filter": {f"f{i % shapes}": i}, "limit": 1, "singleBatch": True, "$db": "bench"}
        )
        reqs.append(head.pack(16 + len(body), i + 1, 0, 2013) + body)
        p = bytearray(rep)
        struct.pack_into("<ii", p, 4, 1_000_000 + i, i + 1)
        reps.append(bytes(p))
    return reqs, reps


def run_once(variant: str, reqs: list[bytes], reps: list[bytes]) -> float:
    """Thread CPU µs per round trip for one pass of `variant`."""
    from prometheus_client import CollectorRegistry

    from mongoproxy import wire
    from mongoproxy.events import Connection, SinkBus
    from mongoproxy.sinks.digest import DigestSink
    from mongoproxy.sinks.live import LiveSink
    from mongoproxy.sinks.metrics import MetricsSink

    sinks: list = [MetricsSink(CollectorRegistry())]
    if variant.startswith("digest"):
        digest, live = DigestSink(), LiveSink()
        digest.live = live  # as sinks.live.create wires them
        sinks += [digest, live]
    render = 0 if variant == "off" else 1
    bus = SinkBus(sinks)
    conn = Connection(id=1, client_host="127.0.0.1", client_port=40000, upstream_host="127.0.0.1", upstream_port=27017)
    from mongoproxy._tap import Tap
    from mongoproxy.tracker import Tracker

    tracker = Tracker(conn, bus, 1000)
    errors: list = []
    requests = wire.FrameScanner(False, tracker.on_request, lambda *a: errors.append(a), render=render)
    replies = wire.FrameScanner(True, tracker.on_reply, lambda *a: errors.append(a))
    # As server.py builds them: a compiled Tap in front of each FrameScanner.
    feed_req, feed_rep = Tap(requests, tracker, conn, False).feed, Tap(replies, tracker, conn, True).feed
    t0 = time.thread_time_ns()
    for i in range(len(reqs)):
        feed_req(reqs[i])
        feed_rep(reps[i])
    us = (time.thread_time_ns() - t0) / len(reqs) / 1000
    if errors or tracker.in_flight:
        raise RuntimeError(f"the tap did not match every pair: {errors[:3]}")
    if variant.startswith("digest") and sum(e.count for e in sinks[1].digest.entries.values()) != len(reqs):
        raise RuntimeError("the digest did not count every command")
    return us


def main(argv: list[str] | None = None) -> int:
    """Print one JSON object: per variant min/median/max µs per round trip, and the medians minus `off`."""
    ap = argparse.ArgumentParser(prog="benchmarks/digestcost.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=20_000)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args(argv)
    inputs = {v: build_pairs(args.pairs, 100 if v == "digest100" else 1) for v in VARIANTS}
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            samples[v].append(run_once(v, *inputs[v]))
    out: dict = {"pairs": args.pairs, "rounds": args.rounds, "us_per_round_trip": {}, "median_minus_off_us": {}}
    for v in VARIANTS:
        s = samples[v]
        out["us_per_round_trip"][v] = {
            "min": round(min(s), 2),
            "median": round(statistics.median(s), 2),
            "max": round(max(s), 2),
        }
    off = statistics.median(samples["off"])
    for v in VARIANTS[1:]:
        out["median_minus_off_us"][v] = round(statistics.median(samples[v]) - off, 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
