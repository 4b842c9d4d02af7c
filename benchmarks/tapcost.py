"""The observation tap's CPU cost per small round trip, in process, without sockets.

    python benchmarks/tapcost.py [--root CHECKOUT] [--pairs N] [--repeat R]

Feeds N request/reply pairs (a driver's find by _id and its one-document
reply, each arriving as one chunk, as on the data path) through the same
objects server.py builds per connection: two Taps (mongoproxy._tap, in a
checkout that has them) in front of two FrameScanners, a Tracker and a
SinkBus, bare and with the default metrics sink. Prints one JSON object with
the best-of-R µs per round trip. This is the Python work the proxy adds per
command beyond forwarding; unlike the socket scenarios it does not depend on
scheduling, so it resolves small optimisations.

Run by path (not -m) so that --root can point at another checkout's
mongoproxy: the harness uses that for --baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time


def build_pair() -> tuple[bytes, bytes]:
    """(request, reply): find {_id: 1} and a cursor reply with one 200-byte document."""
    import bson

    head = struct.Struct("<iiii")
    body = b"\x00\x00\x00\x00\x00" + bson.encode(
        {"find": "c", "filter": {"_id": 1}, "limit": 1, "singleBatch": True, "$db": "bench"}
    )
    req = head.pack(16 + len(body), 1, 0, 2013) + body
    doc = {"_id": 0, "pad": b""}
    doc["pad"] = b"x" * (200 - len(bson.encode(doc)))
    body = b"\x00\x00\x00\x00\x00" + bson.encode({"cursor": {"firstBatch": [doc], "id": 0, "ns": "bench.c"}, "ok": 1.0})
    rep = head.pack(16 + len(body), 2, 1, 2013) + body
    return req, rep


def measure(pairs: int, repeat: int, with_metrics: bool) -> float:
    """Best-of-`repeat` µs per request/reply pair through framing, scanning, matching (and metrics)."""
    from prometheus_client import CollectorRegistry

    from mongoproxy import wire
    from mongoproxy.events import Connection, SinkBus
    from mongoproxy.sinks.metrics import MetricsSink
    from mongoproxy.tracker import Tracker

    try:
        from mongoproxy._tap import Tap
    except ImportError:  # a checkout from before the compiled tap
        Tap = None  # noqa: N806

    req, rep = build_pair()
    reqs, reps = [], []
    for i in range(pairs):  # distinct ids, as a driver sends them
        r = bytearray(req)
        struct.pack_into("<i", r, 4, i + 1)
        reqs.append(bytes(r))
        p = bytearray(rep)
        struct.pack_into("<ii", p, 4, 1_000_000 + i, i + 1)
        reps.append(bytes(p))
    best = float("inf")
    for _ in range(repeat):
        bus = SinkBus([MetricsSink(CollectorRegistry())] if with_metrics else [])
        conn = Connection(
            id=1, client_host="127.0.0.1", client_port=40000, upstream_host="127.0.0.1", upstream_port=27017
        )
        tracker = Tracker(conn, bus, 1000)
        errors: list = []
        requests = wire.FrameScanner(False, tracker.on_request, lambda *a: errors.append(a))  # noqa: B023 - called within this iteration
        replies = wire.FrameScanner(True, tracker.on_reply, lambda *a: errors.append(a))  # noqa: B023 - called within this iteration
        if Tap is not None:  # the compiled tap counts bytes and reads the clock itself
            feed_req, feed_rep = Tap(requests, tracker, conn, False).feed, Tap(replies, tracker, conn, True).feed
            t0 = time.thread_time_ns()
            for i in range(pairs):
                feed_req(reqs[i])
                feed_rep(reps[i])
        else:  # an older checkout: what its server.py did per chunk
            feed_req, feed_rep, clock = requests.feed, replies.feed, time.monotonic_ns
            t0 = time.thread_time_ns()
            for i in range(pairs):
                conn.bytes_from_client += len(reqs[i])
                feed_req(reqs[i], clock())
                conn.bytes_from_server += len(reps[i])
                feed_rep(reps[i], clock())
        best = min(best, (time.thread_time_ns() - t0) / pairs / 1000)
        if errors or tracker.in_flight:
            raise RuntimeError(f"the tap did not match every pair: {errors[:3]}, {tracker.in_flight} in flight")
    return best


def main(argv: list[str] | None = None) -> int:
    """Print {"root", "bare_us", "metrics_us"} as JSON."""
    ap = argparse.ArgumentParser(prog="benchmarks/tapcost.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", help="checkout whose mongoproxy to import (default: this one)")
    ap.add_argument("--pairs", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    sys.path.insert(0, args.root or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import mongoproxy

    out = {
        "root": mongoproxy.__file__.rsplit("/mongoproxy/", 1)[0],
        "bare_us": measure(args.pairs, args.repeat, False),
        "metrics_us": measure(args.pairs, args.repeat, True),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
