"""Live mirroring (`run --mirror URI`) against two SecantusDB servers, a primary and a shadow, and a slow scripted shadow.

The divergence table of the seeded-differently run is kept in test-artifacts/mirror/divergences.txt.
"""

from __future__ import annotations

import json
import statistics
import time

import pymongo
import pytest

from tests.support.proxy import run_proxy_process
from tests.support.scripted_server import MongoHandler, ScriptedServer
from tests.support.secantus import SecantusServer
from tests.support.system import REPO_ROOT

ARTIFACTS = REPO_ROOT / "test-artifacts" / "mirror"
DB = "mirror_test"
ITEMS = 60
BATCH = 20


def seed(client: pymongo.MongoClient, items: int = ITEMS, users: int = 5) -> None:
    db = client[DB]
    db.items.drop()
    db.users.drop()
    db.items.insert_many([{"_id": i, "kind": f"k{i % 3}", "qty": i % 7} for i in range(items)])
    db.users.insert_many([{"_id": f"u{i}", "age": 20 + i} for i in range(users)])


def reads(client: pymongo.MongoClient) -> dict:
    """Finds needing getMores, aggregates, counts and distincts; how many of each the client sent."""
    db = client[DB]
    sent = {"find": 0, "getMore": 0, "aggregate": 0, "count": 0, "distinct": 0}
    for q in ({}, {"kind": "k1"}):
        n = len(list(db.items.find(q, batch_size=BATCH)))
        sent["find"] += 1
        sent["getMore"] += max(0, -(-n // BATCH) - 1) + (1 if n and n % BATCH == 0 else 0)
    list(db.items.find({}).sort("qty", -1).limit(5))
    sent["find"] += 1
    list(db.items.aggregate([{"$group": {"_id": "$kind", "n": {"$sum": 1}}}]))
    list(db.users.aggregate([{"$match": {"age": {"$gte": 21}}}]))
    sent["aggregate"] += 2
    db.command("count", "items", query={"qty": {"$gt": 2}})
    db.command("count", "users")
    sent["count"] += 2
    db.items.distinct("kind")
    sent["distinct"] += 1
    list(db.users.find({}))
    sent["find"] += 1
    return sent


def settle(proxy, expected: int, timeout: float = 30.0) -> None:
    """Wait until the shadow has answered `expected` copies (or dropped them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = sum(
            proxy.metric(name) or 0
            for name in (
                "mongoproxy_mirror_compared_total",
                "mongoproxy_mirror_dropped_total",
                "mongoproxy_mirror_shadow_errors_total",
            )
        )
        if done >= expected:
            return
        time.sleep(0.1)
    raise AssertionError(f"the mirror answered fewer than {expected} copies in {timeout}s:\n{proxy.metrics_text()}")


def divergence_table(proxy) -> list[tuple[str, str, str, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    rows = []
    for family in text_string_to_metric_families(proxy.metrics_text()):
        for s in family.samples:
            if s.name == "mongoproxy_mirror_divergences_total":
                rows.append((s.labels["op"], s.labels["collection"], s.labels["kind"], s.value))
    return sorted(rows)


@pytest.fixture
def two_servers():
    with SecantusServer() as primary, SecantusServer() as shadow:
        yield primary, shadow


def test_mirror_sees_each_read_and_agrees_with_an_identical_shadow(two_servers):
    primary, shadow = two_servers
    with primary.client() as p, shadow.client() as s:
        seed(p)
        seed(s)
    args = ["--mirror", shadow.uri, "--mirror-compare", "documents"]
    with run_proxy_process(args, upstream=primary.address) as proxy:
        with proxy.client() as client:
            sent = reads(client)
            settle(proxy, sum(sent.values()))
            # Writes are not mirrored without --mirror-writes.
            client[DB].items.insert_one({"_id": "new", "kind": "k9"})
            client[DB].items.update_one({"_id": 1}, {"$set": {"qty": 100}})
            client[DB].items.delete_one({"_id": 2})
            client[DB].command("ping")
        for op, n in sent.items():
            assert proxy.metric("mongoproxy_mirror_requests_total", op=op) == n, (op, proxy.metrics_text())
            assert proxy.metric("mongoproxy_mirror_compared_total", op=op) == n
            # The shadow answered each copy, and the primary's latency is recorded beside it for the same commands.
            assert proxy.metric("mongoproxy_mirror_latency_seconds_count", target="shadow", op=op) == n
            assert proxy.metric("mongoproxy_mirror_latency_seconds_count", target="primary", op=op) == n
        assert divergence_table(proxy) == []
        assert not proxy.metric("mongoproxy_mirror_dropped_total")
        for op in ("insert", "update", "delete", "ping"):
            assert proxy.metric("mongoproxy_mirror_requests_total", op=op) is None
    with shadow.client() as s:
        assert s[DB].items.count_documents({}) == ITEMS and s[DB].items.find_one({"_id": 1})["qty"] == 1


def test_an_unsorted_cursor_is_compared_whole_not_batch_by_batch(two_servers):
    primary, shadow = two_servers
    docs = [{"_id": i, "kind": f"k{i % 3}"} for i in range(ITEMS)]
    with primary.client() as p, shadow.client() as s:
        p[DB].items.drop()
        s[DB].items.drop()
        p[DB].items.insert_many(docs)
        s[DB].items.insert_many(docs[::-1])  # the same documents, in another natural order: other batches
    args = ["--mirror", shadow.uri, "--mirror-compare", "documents"]
    with run_proxy_process(args, upstream=primary.address) as proxy:
        with proxy.client() as client:
            got = list(client[DB].items.find({}, batch_size=BATCH))
            assert [d["_id"] for d in got[:3]] == [0, 1, 2]
            settle(proxy, ITEMS // BATCH + 1)  # the find, its getMores and the empty last one
        with shadow.client() as s:
            assert [d["_id"] for d in s[DB].items.find({}, batch_size=BATCH).limit(3)] == [59, 58, 57]
        assert proxy.metric("mongoproxy_mirror_compared_total", op="getMore") >= ITEMS // BATCH - 1
        assert divergence_table(proxy) == []
        assert not proxy.metric("mongoproxy_mirror_documents_not_compared_total")
        # A document that differs is still found, once, at the cursor's end.
        with shadow.client() as s:
            s[DB].items.update_one({"_id": 30}, {"$set": {"kind": "changed"}})
        with proxy.client() as client:
            list(client[DB].items.find({}, batch_size=BATCH))
            settle(proxy, 2 * (ITEMS // BATCH + 1))
        assert divergence_table(proxy) == [("getMore", "items", "documents", 1.0)]


def test_writes_are_mirrored_only_with_mirror_writes_and_a_warning(two_servers):
    primary, shadow = two_servers
    args = ["--mirror", shadow.uri, "--mirror-writes"]
    with run_proxy_process(args, upstream=primary.address) as proxy:
        with proxy.client() as client:
            client[DB].notes.insert_one({"_id": 1, "text": "hi"})
            client[DB].notes.update_one({"_id": 1}, {"$set": {"text": "ho"}})
            settle(proxy, 2)
        assert proxy.metric("mongoproxy_mirror_requests_total", op="insert") == 1
        assert proxy.metric("mongoproxy_mirror_requests_total", op="update") == 1
        assert "--mirror-writes" in proxy.stderr_text() and "CHANGE its data" in proxy.stderr_text()
    with shadow.client() as s:
        assert s[DB].notes.find_one({"_id": 1}) == {"_id": 1, "text": "ho"}


def test_mirror_names_the_collection_seeded_differently(two_servers):
    primary, shadow = two_servers
    with primary.client() as p, shadow.client() as s:
        seed(p)
        seed(s)
        s[DB].items.delete_one({"_id": 7})  # one document fewer in one collection: kind k1, qty 0
        s[DB].items.update_one({"_id": 8}, {"$set": {"qty": 5}})  # same count, different contents
    args = ["--mirror", shadow.uri, "--mirror-compare", "documents"]
    with run_proxy_process(args, upstream=primary.address) as proxy:
        with proxy.client() as client:
            sent = reads(client)
            settle(proxy, sum(sent.values()))
        table = divergence_table(proxy)
        lines = [f"{'op':10} {'collection':12} {'kind':16} count"] + [
            f"{op:10} {coll:12} {kind:16} {n:.0f}" for op, coll, kind, n in table
        ]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "divergences.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        assert table, proxy.metrics_text()
        assert {coll for _, coll, _, _ in table} == {"items"}
        assert {kind for _, _, kind, _ in table} <= {"document_count", "documents"}
        assert any(kind == "documents" for _, _, kind, _ in table)  # the changed qty, same count
        assert any(kind == "document_count" for _, _, kind, _ in table)  # the missing document
        assert "mirror divergence" in proxy.stderr_text() and "k1" not in proxy.stderr_text()
        # GET /mirror on the admin endpoint gives the same counts as JSON.
        status, body = proxy.admin_get("/mirror")
        assert status == 200, body
        doc = json.loads(body)
        rows = sorted((r["op"], r["collection"], r["kind"], float(r["count"])) for r in doc["divergences"])
        assert rows == table and doc["divergences_total"] == sum(n for *_, n in table)
        assert doc["compare"] == "documents" and doc["shadow"] == shadow.uri
        assert doc["queue"] == {"depth": 0, "capacity": 1000} and doc["dropped"] == {}
        assert doc["compared"] == {op: n for op, n in sent.items() if n}
        assert sum(doc["mirrored"].values()) == sum(sent.values())


def test_a_slow_shadow_drops_copies_and_leaves_the_client_alone(secantus):
    delay = 1.0
    with secantus.client() as c:
        seed(c)
    handler = MongoHandler(delay=delay)
    with ScriptedServer(handler) as slow:
        args = ["--mirror", slow.uri, "--mirror-queue", "2"]
        with (
            run_proxy_process(args, upstream=secantus.address) as mirrored,
            run_proxy_process([], upstream=secantus.address) as plain,
        ):
            timings: dict[str, list[float]] = {"mirror on": [], "mirror off": []}
            with mirrored.client() as on, plain.client() as off:
                for _ in range(40):  # interleaved, side by side
                    for label, client in (("mirror on", on), ("mirror off", off)):
                        t = time.perf_counter()
                        client[DB].users.find_one({"_id": "u1"})
                        timings[label].append(time.perf_counter() - t)
            dropped = mirrored.metric("mongoproxy_mirror_dropped_total", reason="queue_full")
            summary = {k: (statistics.median(v) * 1000, max(v) * 1000) for k, v in timings.items()}
            print("client latency ms (median, max):", summary, "dropped:", dropped)
            assert dropped and dropped >= 40 - 2 - 32 - 1  # queue of 2, 32 in flight at the shadow
            status, body = mirrored.admin_get("/mirror")
            assert status == 200, body
            doc = json.loads(body)
            assert doc["dropped"]["queue_full"] == dropped and doc["queue"]["capacity"] == 2
            assert 0 <= doc["queue"]["depth"] <= 2
            # Had any find waited for the shadow, it would have taken at least the shadow's delay.
            assert max(timings["mirror on"]) < delay
            assert handler.seen["find"] >= 1


def test_mirror_options_are_checked(tmp_path):
    from tests.support.proxy import run_proxy_cli

    done = run_proxy_cli(["run", "--proxy", "1:127.0.0.1:2", "--mirror", "mongodb://x", "--mirror-ratio", "2"])
    assert done.returncode == 2 and "--mirror-ratio must be from 0 to 1" in done.stderr
    assert "Traceback" not in done.stderr
    args = ["run", "--proxy", "1:127.0.0.1:2", "--mirror", "mongodb://u:pw@x", "--mirror-ops", "find,insert"]
    done = run_proxy_cli(args)
    assert done.returncode == 2 and "--mirror-ops insert: writes are mirrored only with --mirror-writes" in done.stderr
    done = run_proxy_cli(["run", "--proxy", "1:127.0.0.1:2", "--mirror", "http://u:pw@x"])
    assert done.returncode == 2 and "--mirror http://u:***@x is not a usable MongoDB URI" in done.stderr
    assert "pw" not in done.stderr
