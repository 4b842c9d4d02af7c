"""Scanner micro-benchmark: metadata extraction (reset+feed+result) vs pymongo's bson.decode.

    python -m benchmarks.bench_scanner [--json PATH] [--quick]

Each case times the scanner on a whole OP_MSG body and bson.decode on the same
section document; the best of several repeats is reported (the machine may be busy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import struct
import sys
import timeit
import uuid

import bson
from bson import Int64, ObjectId, Timestamp
from bson.binary import Binary

from mongoproxy import _bson_parser as bp

GOALS = {"find command": 5.0, "4 MB reply": 30.0}


def op_msg(doc: dict) -> tuple[bytes, bytes]:
    """(OP_MSG body, the kind-0 document) for a document."""
    raw = bson.encode(doc)
    return struct.pack("<I", 0) + b"\x00" + raw, raw


def cluster_time() -> dict:
    return {
        "clusterTime": Timestamp(1_700_000_000, 7),
        "signature": {"hash": Binary(b"\x00" * 20, 0), "keyId": Int64(0)},
    }


def find_command() -> dict:
    """What pymongo sends for collection.find_one({"_id": 1})."""
    return {
        "find": "users",
        "filter": {"_id": 1},
        "limit": 1,
        "singleBatch": True,
        "lsid": {"id": Binary(uuid.UUID("9c1e5f9a-3b1d-4b4e-8f8e-0d5c2f1a7b63").bytes, 4)},
        "$clusterTime": cluster_time(),
        "$db": "shop",
    }


def hello_reply() -> dict:
    now = datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC)
    optime = {"ts": Timestamp(1_700_000_000, 3), "t": Int64(12)}
    return {
        "topologyVersion": {"processId": ObjectId("65f1a2b3c4d5e6f708192a3b"), "counter": Int64(6)},
        "hosts": ["db-0.db:27017", "db-1.db:27017", "db-2.db:27017"],
        "setName": "rs0",
        "setVersion": 3,
        "isWritablePrimary": True,
        "secondary": False,
        "primary": "db-0.db:27017",
        "me": "db-0.db:27017",
        "electionId": ObjectId("7fffffff000000000000000c"),
        "lastWrite": {"opTime": optime, "lastWriteDate": now, "majorityOpTime": optime, "majorityWriteDate": now},
        "maxBsonObjectSize": 16777216,
        "maxMessageSizeBytes": 48000000,
        "maxWriteBatchSize": 100000,
        "localTime": now,
        "logicalSessionTimeoutMinutes": 30,
        "connectionId": 4711,
        "minWireVersion": 0,
        "maxWireVersion": 21,
        "readOnly": False,
        "compression": ["zstd", "snappy"],
        "saslSupportedMechs": ["SCRAM-SHA-1", "SCRAM-SHA-256"],
        "ok": 1.0,
        "$clusterTime": cluster_time(),
        "operationTime": Timestamp(1_700_000_000, 3),
    }


def user(i: int) -> dict:
    return {
        "_id": ObjectId(b"%012d" % i),
        "name": f"user {i}",
        "email": f"user{i}@example.com",
        "age": 20 + i % 50,
        "address": {"street": f"{i} Main St", "city": "Springfield", "zip": f"{10000 + i}"},
        "tags": ["a", "b", "c"][: 1 + i % 3],
        "created": datetime.datetime(2024, 1, 1 + i % 28),
        "balance": 12.5 * i,
        "active": i % 2 == 0,
    }


def cursor_reply(docs: list) -> dict:
    return {
        "cursor": {"firstBatch": docs, "id": Int64(0), "ns": "shop.users"},
        "ok": 1.0,
        "$clusterTime": cluster_time(),
        "operationTime": Timestamp(1_700_000_000, 3),
    }


def big_reply(target: int = 4 * 1024 * 1024) -> dict:
    docs, size = [], 0
    while size < target:
        docs.append(user(len(docs)))
        size += len(bson.encode(docs[-1])) + 8  # + element type, index key, NUL
    return cursor_reply(docs)


def best_us(fn, number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def run(quick: bool = False) -> list[dict]:
    cases = [
        ("find command", False, find_command(), 20000),
        ("hello reply", True, hello_reply(), 10000),
        ("100-document reply", True, cursor_reply([user(i) for i in range(100)]), 500),
        ("4 MB reply", True, big_reply(), 3),
    ]
    repeat = 3 if quick else 7
    scanner = bp.BodyScanner()
    rows = []
    for name, is_reply, doc, number in cases:
        body, raw = op_msg(doc)
        length = len(body)
        number = max(1, number // (10 if quick else 1))

        def scan(body=body, length=length, is_reply=is_reply):
            scanner.reset(bp.OP_MSG, is_reply, length)
            scanner.feed(body)
            return scanner.result()

        def decode(raw=raw):
            return bson.decode(raw)

        scan()  # warm up, and check it works
        assert scanner.done
        scan_us = best_us(scan, number, repeat)
        decode_us = best_us(decode, max(1, number // 4), repeat)
        rows.append(
            {
                "case": name,
                "bytes": length,
                "scanner_us": round(scan_us, 3),
                "bson_decode_us": round(decode_us, 3),
                "ratio": round(decode_us / scan_us, 1),
                "goal_ratio": GOALS.get(name),
            }
        )
    # streaming shape: the 4 MB reply arriving in 64 KiB chunks
    body, _ = op_msg(big_reply())
    chunks = [body[i : i + 65536] for i in range(0, len(body), 65536)]

    def scan_chunked():
        scanner.reset(bp.OP_MSG, True, len(body))
        for c in chunks:
            scanner.feed(c)
        return scanner.result()

    rows.append(
        {
            "case": "4 MB reply, 64 KiB chunks",
            "bytes": len(body),
            "scanner_us": round(best_us(scan_chunked, 3, repeat), 3),
            "bson_decode_us": None,
            "ratio": None,
            "goal_ratio": None,
        }
    )
    # rendering is opt-in; show its price on the small command
    fbody, _ = op_msg(find_command())

    def scan_render():
        scanner.reset(bp.OP_MSG, False, len(fbody), render=bp.RENDER_REDACTED)
        scanner.feed(fbody)
        return scanner.result()

    rows.append(
        {
            "case": "find command, RENDER_REDACTED",
            "bytes": len(fbody),
            "scanner_us": round(best_us(scan_render, 20000 // (10 if quick else 1), repeat), 3),
            "bson_decode_us": None,
            "ratio": None,
            "goal_ratio": None,
        }
    )
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'case':32} {'bytes':>9} {'scanner µs':>11} {'bson.decode µs':>15} {'ratio':>7}  goal"]
    for r in rows:
        dec = f"{r['bson_decode_us']:.2f}" if r["bson_decode_us"] is not None else "-"
        ratio = f"{r['ratio']:.1f}x" if r["ratio"] is not None else "-"
        goal = ""
        if r["goal_ratio"]:
            goal = f">= {r['goal_ratio']:.0f}x " + ("ok" if r["ratio"] >= r["goal_ratio"] else "MISSED")
        lines.append(f"{r['case']:32} {r['bytes']:>9} {r['scanner_us']:>11.2f} {dec:>15} {ratio:>7}  {goal}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print a table, optionally write JSON."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_scanner", description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    args = ap.parse_args(argv)
    rows = run(quick=args.quick)
    print(table(rows))
    if args.json:
        meta = {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "bson": bson.__name__,
            "pymongo": __import__("pymongo").version,
            "quick": args.quick,
        }
        with open(args.json, "w") as fh:
            json.dump({"benchmark": "bench_scanner", "meta": meta, "results": rows}, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
