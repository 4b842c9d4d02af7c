"""Replay's view of recorded commands: rewrites, skip reasons, filters, the report and the CLI's one-line errors."""

from __future__ import annotations

import json
import os
import struct

import bson
import pytest
from bson import Int64, Timestamp

from mongoproxy import cli
from mongoproxy.errors import ReplayError
from mongoproxy.replay.extract import load
from mongoproxy.replay.filters import Filters, apply_filters
from mongoproxy.replay.model import SKIP_FILTERED, Outcome
from mongoproxy.replay.report import build_report, percentile
from tests.unit.test_replay_reader import Capture, op_msg, reply, write_pcap_exact

LSID = {"id": bson.Binary(b"\x01" * 16, 4)}


def op_msg_seq(request_id: int, doc: dict, ident: str, docs: list) -> bytes:
    body = struct.pack("<I", 0) + b"\0" + bson.encode(doc)
    payload = ident.encode() + b"\0" + b"".join(bson.encode(d) for d in docs)
    body += b"\1" + struct.pack("<i", 4 + len(payload)) + payload
    return struct.pack("<iiii", 16 + len(body), request_id, 0, 2013) + body


def op_query(request_id: int, ns: str, doc: dict) -> bytes:
    body = struct.pack("<i", 0) + ns.encode() + b"\0" + struct.pack("<ii", 0, -1) + bson.encode(doc)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, 2004) + body


def legacy_insert(request_id: int, ns: str, doc: dict) -> bytes:
    body = struct.pack("<i", 0) + ns.encode() + b"\0" + bson.encode(doc)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, 2002) + body


def workload(tmp_path, exchanges, name="w.pcap"):
    """exchanges: (request bytes, reply bytes or None) on one connection."""
    c = Capture().handshake()
    for req, rep in exchanges:
        c.send(True, req)
        if rep is not None:
            c.send(False, rep)
    return load([write_pcap_exact(tmp_path / name, c.frames)])


def cursor_reply(to: int, cid: int, n: int, first: bool = True, ns: str = "shop.orders") -> bytes:
    key = "firstBatch" if first else "nextBatch"
    return reply(to, {"cursor": {key: [{"_id": i} for i in range(n)], "id": Int64(cid), "ns": ns}, "ok": 1.0})


def sample(tmp_path):
    return workload(
        tmp_path,
        [
            (op_query(1, "admin.$cmd", {"isMaster": 1, "client": {"application": {"name": "shop-web"}}}), reply(1)),
            (op_msg(2, 0, {"saslStart": 1, "payload": b"x", "$db": "admin"}), reply(2)),
            (
                op_msg_seq(
                    3,
                    {
                        "insert": "orders",
                        "lsid": LSID,
                        "txnNumber": Int64(1),
                        "$db": "shop",
                        "$clusterTime": {"clusterTime": Timestamp(1, 1)},
                    },
                    "documents",
                    [{"_id": 1}, {"_id": 2}],
                ),
                reply(3, {"n": 2, "ok": 1.0}),
            ),
            (
                op_msg(
                    4,
                    0,
                    {
                        "find": "orders",
                        "filter": {},
                        "batchSize": 1,
                        "lsid": LSID,
                        "$db": "shop",
                        "readConcern": {"level": "majority", "afterClusterTime": Timestamp(1, 1)},
                    },
                ),
                cursor_reply(4, 77, 1),
            ),
            (
                op_msg(
                    5, 0, {"getMore": Int64(77), "collection": "orders", "batchSize": 1, "lsid": LSID, "$db": "shop"}
                ),
                cursor_reply(5, 77, 1, first=False),
            ),
            (op_msg(6, 0, {"killCursors": "orders", "cursors": [Int64(77)], "lsid": LSID, "$db": "shop"}), reply(6)),
            (
                op_msg(
                    7,
                    0,
                    {
                        "aggregate": "orders",
                        "pipeline": [{"$match": {}}, {"$out": "copy"}],
                        "cursor": {},
                        "$db": "shop",
                    },
                ),
                cursor_reply(7, 0, 0),
            ),
            (op_msg(8, 0, {"count": "users", "$db": "crm"}), reply(8, {"n": 5, "ok": 1.0})),
            (op_msg(9, 0, {"hello": 1, "topologyVersion": {"counter": Int64(0)}, "$db": "admin"}), reply(9)),
            (
                op_msg(
                    10,
                    0,
                    {"update": "orders", "updates": [{"q": {"_id": 1}, "u": {"$set": {"a": 1}}}], "$db": "shop"},
                    flags=2,
                ),
                None,
            ),
            (op_msg(11, 0, {"endSessions": [LSID], "$db": "admin"}), reply(11)),
            (legacy_insert(12, "shop.orders", {"_id": 9}), None),
        ],
    )


def test_commands_become_replayable_specs(tmp_path):
    w = sample(tmp_path)
    by_op: dict = {}
    for o in w.ops:
        by_op.setdefault(o.op, o)
    assert [(o.op, o.skip) for o in w.ops] == [
        ("isMaster", "handshake"),
        ("saslStart", "auth"),
        ("insert", ""),
        ("find", ""),
        ("getMore", ""),
        ("killCursors", ""),
        ("aggregate", ""),
        ("count", ""),
        ("hello", "monitoring"),
        ("update", ""),
        ("endSessions", "endSessions"),
        ("insert", ""),  # a legacy OP_INSERT, converted
    ]
    assert w.ops[-1].conversion == "OP_INSERT -> insert" and w.ops[-1].unacknowledged
    assert [dict(d) for d in w.ops[-1].spec["documents"]] == [{"_id": 9}]
    assert w.conversions == {"OP_INSERT -> insert": 1}
    assert w.connections[0].app == "shop-web"
    insert = by_op["insert"].spec
    assert list(insert) == ["insert", "txnNumber", "documents"]  # $db, lsid and $clusterTime are not sent as is
    assert isinstance(insert["txnNumber"], Int64)  # an int64 stays an int64
    assert [dict(d) for d in insert["documents"]] == [{"_id": 1}, {"_id": 2}]  # the kind-1 sequence
    assert by_op["insert"].lsid_key == b"\x01" * 16
    assert by_op["find"].spec["readConcern"] == {"level": "majority"}  # afterClusterTime dropped
    assert by_op["getMore"].cursor_ref == 77 and by_op["getMore"].creator is by_op["find"]
    assert by_op["killCursors"].kill_ids == (77,) and by_op["killCursors"].creator is by_op["find"]
    assert by_op["update"].unacknowledged and by_op["update"].recorded is None
    assert by_op["find"].recorded.cursor_id == 77 and by_op["find"].recorded.returned == 1
    assert by_op["count"].ns == "crm.users" and by_op["count"].recorded.n == 5


def test_legacy_query_command_is_unwrapped(tmp_path):
    w = workload(
        tmp_path,
        [
            (
                op_query(
                    1, "shop.$cmd", {"$query": {"count": "orders"}, "$readPreference": {"mode": "secondaryPreferred"}}
                ),
                reply(1),
            )
        ],
    )
    [op] = w.ops
    assert (op.op, op.ns, op.skip) == ("count", "shop.orders", "")
    assert dict(op.spec) == {"count": "orders"}


def legacy_kill_cursors(request_id: int, ids: list) -> bytes:
    body = struct.pack("<ii", 0, len(ids)) + b"".join(struct.pack("<q", i) for i in ids)
    return struct.pack("<iiii", 16 + len(body), request_id, 0, 2007) + body


def test_legacy_kill_cursors_becomes_kill_cursors_on_the_cursors_collection(tmp_path):
    w = workload(
        tmp_path,
        [
            (op_msg(1, 0, {"find": "orders", "filter": {}, "batchSize": 1, "$db": "shop"}), cursor_reply(1, 77, 1)),
            (legacy_kill_cursors(2, [77]), None),
        ],
    )
    find, kill = w.ops
    assert (kill.op, kill.ns, kill.skip, kill.unacknowledged) == ("killCursors", "shop.orders", "", True)
    assert kill.spec == {"killCursors": "orders", "cursors": [Int64(77)]}
    assert kill.kill_ids == (77,) and kill.creator is find
    assert w.conversions == {"OP_KILL_CURSORS -> killCursors": 1}


def test_read_only_keeps_reads_and_their_cursors(tmp_path):
    w = sample(tmp_path)
    apply_filters(w, Filters(read_only=True))
    assert [o.op for o in w.replayable()] == ["find", "getMore", "killCursors", "count"]


@pytest.mark.parametrize(
    "filters,expected",
    [
        (
            Filters(include_ns=("shop.orders",)),
            ["insert", "find", "getMore", "killCursors", "aggregate", "update", "insert"],
        ),
        (Filters(include_ns=("crm",)), ["count"]),
        (Filters(include_ns=("crm.*",)), ["count"]),
        (Filters(exclude_ns=("shop.*",)), ["count"]),
        (Filters(ops=("find", "getMore")), ["find", "getMore"]),
        (
            Filters(ops=("!find",)),
            ["insert", "aggregate", "count", "update", "insert"],
        ),  # its cursor's getMore/killCursors too
    ],
)
def test_filters(tmp_path, filters, expected):
    w = sample(tmp_path)
    apply_filters(w, filters)
    assert [o.op for o in w.replayable()] == expected
    assert all(o.skip == SKIP_FILTERED for o in w.ops if o.op in {"insert", "find", "count"} - set(expected))


def test_a_filter_matching_nothing_is_an_error(tmp_path):
    w = sample(tmp_path)
    with pytest.raises(
        ReplayError,
        match=r"the filters \(--include-ns nope.x --ops find\) match none of the 8 "
        r"recorded operations; they are aggregate, count, find",
    ):
        apply_filters(w, Filters(include_ns=("nope.x",), ops=("find",)))


def test_handshake_only_capture_has_nothing_to_replay(tmp_path):
    w = workload(tmp_path, [(op_msg(1, 0, {"hello": 1, "$db": "admin"}), reply(1))])
    with pytest.raises(ReplayError, match="nothing to replay: the capture holds only handshake"):
        apply_filters(w, Filters())


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([5], 99) == 5
    values = list(range(1, 101))
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99)) == (50, 90, 99)


def test_report_counts_new_and_gone_errors_and_count_differences(tmp_path):
    w = sample(tmp_path)
    apply_filters(w, Filters())
    ops: dict = {}
    for o in w.ops:
        ops.setdefault(o.op, o)
    for o in w.replayable():
        o.replayed = Outcome(
            ok=True, returned=o.recorded.returned if o.recorded else None, n=o.recorded.n if o.recorded else None
        )
        o.replayed_ns = 2_000_000
    ops["count"].replayed = Outcome(ok=False, code=26, code_name="NamespaceNotFound", errmsg="ns missing")
    ops["insert"].recorded.write_errors = 1
    ops["insert"].recorded.code_name = "DuplicateKey"
    ops["find"].replayed.returned = 0

    class Run:
        started_ns, finished_ns, max_lag_ns, sessions, cursors = 0, 2 * 10**9, 5_000_000, {1: 1}, {}

    report = build_report(w, Run(), Filters(), "mongodb://u:secret@h:1/", 2.0)
    json.dumps(report)
    assert report["target"] == "mongodb://u:***@h:1/"
    assert report["new_errors"] == [
        {
            "op": "count",
            "ns": "crm.users",
            "error": "NamespaceNotFound",
            "code": 26,
            "count": 1,
            "example": "ns missing",
        }
    ]
    assert [e["error"] for e in report["gone_errors"]] == ["DuplicateKey"]
    assert report["count_differences"] == [
        {
            "op": "find",
            "ns": "shop.orders",
            "connection": 0,
            "field": "returned",
            "recorded": 1,
            "replayed": 0,
            "at_s": report["count_differences"][0]["at_s"],
        }
    ]
    find_row = next(r for r in report["by_op"] if r["op"] == "find")
    assert find_row["replayed_ms"] == {"p50": 2.0, "p90": 2.0, "p99": 2.0}
    assert report["replayed"]["max_lag_ms"] == 5.0 and report["replayed"]["ops_per_s"] == 4.0
    assert report["skipped"] == {"handshake": 1, "auth": 1, "monitoring": 1, "endSessions": 1}


def run_cli(capsys, *argv):
    rc = cli.main(["replay", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    sample(tmp_path)
    cap = tmp_path / "w.pcap"
    cases = [
        ((tmp_path / "none.pcap", "--target", "mongodb://localhost"), "none.pcap: no such file"),
        ((cap,), "replay needs --target URI"),
        ((cap, "--target", "mongodb://h", "--speed", "0"), "--speed must be a positive number"),
        ((cap, "--target", "mongodb://h", "--speed", "2", "--max-speed"), "not allowed with argument"),
        ((cap, "--target", "http://nope"), "--target http://nope is not a usable MongoDB URI"),
        ((cap, "--dry-run", "--plot", tmp_path / "no" / "p.png"), "--plot"),
        ((cap, "--dry-run", "--ops", "drop"), "match none of the 8 recorded operations"),
    ]
    for argv, message in cases:
        try:
            rc = cli.main(["replay", *map(str, argv)])
        except SystemExit as exc:  # argparse's own errors
            rc = exc.code
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_dry_run_lists_what_would_be_replayed(tmp_path, capsys):
    sample(tmp_path)
    rc, out, err = run_cli(capsys, tmp_path / "w.pcap", "--dry-run", "--read-only", "--report", tmp_path / "r.json")
    assert rc == 0, err
    assert "would replay 4 operations with --read-only" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert [(x["op"], x["ns"]) for x in report["would_replay"]] == [
        ("find", "shop.orders"),
        ("getMore", "shop.orders"),
        ("killCursors", "shop.orders"),
        ("count", "crm.users"),
    ]
    assert report["dry_run"] is True and "replayed" not in report
    assert os.path.exists(tmp_path / "r.json")
