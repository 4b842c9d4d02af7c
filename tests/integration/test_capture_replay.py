"""Record a workload through the proxy against SecantusDB, replay it into another server, compare.

The report, the terminal table and the latency plot of the main replay are kept in test-artifacts/capture-replay/.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pymongo
import pytest

from tests.support.ports import free_port
from tests.support.proxy import run_proxy_cli, run_proxy_process
from tests.support.secantus import SecantusServer
from tests.support.system import REPO_ROOT

ARTIFACTS = REPO_ROOT / "test-artifacts" / "capture-replay"
ORDERS = 120
BATCH = 25


def run_workload(client: pymongo.MongoClient, db_name: str, pause: float = 0.0) -> dict:
    """Inserts, updates, finds whose cursors need several getMores, one killed cursor, deletes; pauses between."""
    db = client[db_name]
    orders, users = db.orders, db.users
    seen: dict = {}
    orders.insert_many([{"_id": i, "sku": f"sku-{i % 7}", "qty": i % 5, "note": "x" * 50} for i in range(ORDERS)])
    users.insert_one({"_id": "ann", "visits": 0})
    users.insert_one({"_id": "bob", "visits": 0})
    time.sleep(pause)
    orders.update_one({"_id": 3}, {"$set": {"qty": 99}})
    orders.update_many({"qty": 0}, {"$inc": {"qty": 10}})
    users.update_one({"_id": "ann"}, {"$inc": {"visits": 1}}, upsert=True)
    users.update_one({"_id": "cat"}, {"$set": {"visits": 1}}, upsert=True)
    time.sleep(pause)
    seen["all_orders"] = len(list(orders.find({}, batch_size=BATCH)))  # a find and four getMores
    seen["ann"] = users.find_one({"_id": "ann"})
    cursor = orders.find({}, batch_size=10)
    seen["partial"] = [next(cursor) for _ in range(12)]  # a find and one getMore...
    cursor.close()  # ...then killCursors
    time.sleep(pause)
    orders.delete_one({"_id": 5})
    orders.delete_many({"_id": {"$gte": 100}})
    seen["count"] = orders.count_documents({})
    seen["skus"] = sorted(orders.distinct("sku"))
    time.sleep(pause)
    seen["after"] = len(list(orders.find({"qty": {"$gte": 10}}, batch_size=BATCH)))
    return seen


def snapshot(client: pymongo.MongoClient, db_name: str) -> dict:
    db = client[db_name]
    return {name: list(db[name].find().sort("_id", 1)) for name in sorted(db.list_collection_names())}


def opcounters(client: pymongo.MongoClient) -> dict:
    c = client.admin.command("serverStatus")["opcounters"]
    return {k: c[k] for k in ("insert", "update", "delete")}


@pytest.fixture(scope="module")
def recording(secantus, tmp_path_factory):
    """A ~4.5-second workload recorded through `mongoproxy run --record`; (directory, database name)."""
    directory = tmp_path_factory.mktemp("recording")
    db_name = f"capture_replay_{os.getpid()}"
    with run_proxy_process(["--record", str(directory)], upstream=secantus.address) as proxy:
        with proxy.client(appname="capture-test") as client:
            run_workload(client, db_name, pause=1.1)
    return str(directory), db_name


def replay(*args, timeout: float = 120.0):
    return run_proxy_cli(["replay", *map(str, args)], timeout=timeout)


def test_replay_into_a_fresh_server_reproduces_the_data(recording, secantus):
    directory, db_name = recording
    files = os.listdir(directory)
    assert len(files) == 1 and files[0].endswith(".pcapng"), files
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    report_path, plot_path = ARTIFACTS / "report.json", ARTIFACTS / "latency-cdf.png"
    for p in (report_path, plot_path):
        if p.exists():
            p.unlink()
    with SecantusServer() as target:
        done = replay(directory, "--target", target.uri, "--speed", "4", "--report", report_path, "--plot", plot_path)
        (ARTIFACTS / "report.txt").write_text(done.stdout)
        print(done.stdout)
        assert done.returncode == 0, done.stderr
        with secantus.client() as source, target.client() as replayed:
            assert snapshot(replayed, db_name) == snapshot(source, db_name)
            assert replayed.admin.command("serverStatus")["metrics"]["cursor"]["open"]["total"] == 0
    report = json.loads(report_path.read_text())
    assert report["new_errors"] == [] and report["count_differences_total"] == 0
    assert report["replayed"]["errors"] == 0
    ops = {(row["op"], row["ns"]): row["count"] for row in report["by_op"]}
    orders = f"{db_name}.orders"
    assert ops[("find", orders)] == 3 and ops[("getMore", orders)] == 4 + 1  # all orders; the killed cursor
    assert ops[("killCursors", orders)] == 1 and ops[("insert", orders)] == 1
    assert ops[("delete", orders)] == 2 and ops[("update", f"{db_name}.users")] == 2
    assert "cursor not open on target" not in report["skipped"]
    assert report["skipped"].get("handshake", 0) >= 1
    assert plot_path.stat().st_size > 10_000
    # --speed 4: a recording whose commands span about 4.5 s replays in about a quarter of that.
    schedule = report["replayed"]["schedule_s"]
    assert report["recorded"]["replayable_span_s"] >= 4.0
    assert schedule == pytest.approx(report["recorded"]["replayable_span_s"] / 4, rel=0.01)
    assert schedule * 0.95 <= report["replayed"]["duration_s"] <= schedule + 1.5


def test_read_only_replay_sends_no_writes(recording, secantus):
    directory, db_name = recording
    with secantus.client() as client:
        before, counters = snapshot(client, db_name), opcounters(client)
        done = replay(
            directory, "--target", secantus.uri, "--read-only", "--max-speed", "--report", ARTIFACTS / "read-only.json"
        )
        assert done.returncode == 0, done.stderr
        assert snapshot(client, db_name) == before
        assert opcounters(client) == counters
    report = json.loads((ARTIFACTS / "read-only.json").read_text())
    assert {row["op"] for row in report["by_op"]} <= {
        "find",
        "getMore",
        "killCursors",
        "count",
        "aggregate",
        "distinct",
    }
    assert {row["op"] for row in report["by_op"]} >= {"find", "getMore", "aggregate", "distinct"}
    assert report["skipped"]["filtered"] >= 7 and report["new_errors"] == []


def test_filters_and_dry_run(recording):
    directory, db_name = recording
    done = replay(directory, "--dry-run", "--include-ns", f"{db_name}.users", "--ops", "!find")
    assert done.returncode == 0, done.stderr
    assert "would replay 4 operations with --include-ns" in done.stdout
    nothing = replay(directory, "--dry-run", "--include-ns", "elsewhere.*")
    assert nothing.returncode == 2
    assert "match none of the" in nothing.stderr and len(nothing.stderr.strip().splitlines()) == 1


def test_unreachable_target_is_retried_then_one_clear_line(recording):
    directory, _ = recording
    port = free_port("127.0.0.1")
    started = time.monotonic()
    done = replay(
        directory,
        "--target",
        f"mongodb://127.0.0.1:{port}/?directConnection=true",
        "--connect-retries",
        "2",
        "--connect-timeout",
        "0.3",
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mongoproxy: error: cannot reach the target mongodb://127.0.0.1:{port}/")
    assert "after 2 attempts" in last and "Traceback" not in done.stderr
    assert "retrying in 0.5s" in done.stderr
    assert time.monotonic() - started < 60


def test_auth_is_recorded_blanked_and_replay_uses_the_targets_credentials(tmp_path):
    storage = tmp_path / "data"
    with SecantusServer(extra_args=("--storage-path", str(storage))) as setup:
        with setup.client() as c:
            c.admin.command("createUser", "alice", pwd="alice-secret-pw", roles=["root"])
            c.admin.command("createUser", "bob", pwd="bob-other-pw", roles=["root"])
        port = setup.port
        setup.stop()
    server = SecantusServer(port=port, extra_args=("--storage-path", str(storage), "--auth")).start()
    try:
        directory = tmp_path / "rec"
        with run_proxy_process(["--record", str(directory)], upstream=server.address) as proxy:
            uri = f"mongodb://alice:alice-secret-pw@127.0.0.1:{proxy.port}/?directConnection=true"
            with pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000) as client:
                client.shop.items.insert_many([{"_id": i} for i in range(30)])
                assert len(list(client.shop.items.find({}, batch_size=7))) == 30
        [name] = os.listdir(directory)
        data = (directory / name).read_bytes()
        assert b"n=alice" not in data and b"alice-secret-pw" not in data  # SCRAM client messages are blanked
        done = replay(
            directory,
            "--target",
            f"mongodb://bob:bob-other-pw@127.0.0.1:{port}/?directConnection=true",
            "--read-only",
            "--max-speed",
            "--report",
            tmp_path / "r.json",
        )
        assert done.returncode == 0, done.stderr
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["new_errors"] == [] and report["count_differences_total"] == 0
        assert report["skipped"]["auth"] >= 1 and report["skipped"]["handshake"] >= 1
        assert sum(row["count"] for row in report["by_op"] if row["op"] in ("find", "getMore")) == 5
        refused = replay(
            directory,
            "--target",
            f"mongodb://bob:wrong@127.0.0.1:{port}/?directConnection=true",
            "--connect-retries",
            "1",
        )
        assert refused.returncode == 2 and "refused the URI's credentials" in refused.stderr
        assert "wrong" not in refused.stderr  # the password is not echoed
    finally:
        server.close()
        shutil.rmtree(storage, ignore_errors=True)
