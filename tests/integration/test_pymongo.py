"""pymongo (sync and async) through the proxy against SecantusDB: same results as direct, correct events."""

import asyncio
import time

import pytest
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import DuplicateKeyError

from tests.support.inprocess import LOOP_KINDS, ProxyThread, run, running_proxy

N = 11  # documents; find with batch_size=2 needs 5 getMores


def workload(db):
    """CRUD, insert_many, find with getMores, aggregate, a duplicate-key error; returns comparable results."""
    out = {}
    out["insert_one"] = db.items.insert_one({"_id": 1, "x": 1}).inserted_id
    out["insert_many"] = db.items.insert_many([{"_id": i, "x": i} for i in range(2, N + 1)]).inserted_ids
    out["find_one"] = db.items.find_one({"_id": 5})
    out["find"] = list(db.items.find({}, batch_size=2).sort("_id", 1))
    out["update"] = db.items.update_many({"_id": {"$lt": 4}}, {"$set": {"y": 1}}).modified_count
    out["aggregate"] = list(db.items.aggregate([{"$match": {"_id": {"$gte": 5}}}, {"$count": "n"}]))
    out["delete"] = db.items.delete_one({"_id": N}).deleted_count
    try:
        db.items.insert_one({"_id": 1})
        out["dup"] = None
    except DuplicateKeyError as exc:
        out["dup"] = exc.code
    return out


async def async_workload(db):
    out = {}
    out["insert_one"] = (await db.items.insert_one({"_id": 1, "x": 1})).inserted_id
    out["insert_many"] = (await db.items.insert_many([{"_id": i, "x": i} for i in range(2, N + 1)])).inserted_ids
    out["find_one"] = await db.items.find_one({"_id": 5})
    out["find"] = await db.items.find({}, batch_size=2).sort("_id", 1).to_list()
    out["update"] = (await db.items.update_many({"_id": {"$lt": 4}}, {"$set": {"y": 1}})).modified_count
    out["aggregate"] = await (await db.items.aggregate([{"$match": {"_id": {"$gte": 5}}}, {"$count": "n"}])).to_list()
    out["delete"] = (await db.items.delete_one({"_id": N})).deleted_count
    try:
        await db.items.insert_one({"_id": 1})
        out["dup"] = None
    except DuplicateKeyError as exc:
        out["dup"] = exc.code
    return out


def check_events(commands, db_name):
    """The events of one workload run, in order, carry the right op, db, collection, counts and outcome."""
    ev = [e for e in commands if e.database == db_name]
    ops = [e.op for e in ev]
    assert ops == [
        "insert",
        "insert",
        "find",
        "find",
        "getMore",
        "getMore",
        "getMore",
        "getMore",
        "getMore",
        "update",
        "aggregate",
        "delete",
        "insert",
    ], ops
    assert all(e.collection == "items" for e in ev), [(e.op, e.collection) for e in ev]
    ins1, ins_many, find_one, find = ev[0], ev[1], ev[2], ev[3]
    assert ins1.documents_changed == 1 and ins1.request.documents == 1
    assert ins_many.documents_changed == N - 1 and ins_many.request.documents == N - 1
    assert find_one.documents_returned == 1
    assert find.documents_returned == 2 and find.cursor_id not in (None, 0)
    getmores = ev[4:9]
    assert [e.documents_returned for e in getmores] == [2, 2, 2, 2, 1]
    assert all(e.request.cursor_id == find.cursor_id for e in getmores)
    assert getmores[-1].cursor_id == 0
    update, aggregate, delete, dup = ev[9:13]
    assert update.documents_changed == 3
    assert aggregate.documents_returned == 1
    assert delete.documents_changed == 1
    assert dup.ok is True and dup.failed and dup.reply.write_errors == 1 and dup.reply.write_error_code == 11000
    for e in ev:
        assert e.ok is True and e.decode_error == ""
        assert e.request_first_ns <= e.request_last_ns <= e.reply_first_ns <= e.reply_last_ns
        assert e.request_size > 16 and e.reply_size > 16
        assert e.connection.app_name == "itest"
        assert e.connection.replica_set == "secantus"


def fresh_db_name(prefix):
    return f"{prefix}_{time.monotonic_ns()}"


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_sync_pymongo_through_proxy(secantus, loop_kind):
    direct_db, proxied_db = fresh_db_name("direct"), fresh_db_name("proxied")
    with MongoClient(secantus.uri, appname="itest") as direct:
        expected = workload(direct[direct_db])
    with ProxyThread(secantus.port, loop_kind=loop_kind) as proxy:
        with MongoClient(f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true", appname="itest") as client:
            got = workload(client[proxied_db])
        proxy.wait_until(
            lambda: len([e for e in proxy.sink.commands if e.database == proxied_db]) >= 13, what="13 workload events"
        )
        assert got == expected
        check_events(list(proxy.sink.commands), proxied_db)
        assert proxy.sink.decode_errors == [] and proxy.sink.unmatched == []
        conns = proxy.sink.opened
        assert conns and all(c.upstream_port == secantus.port for c in conns)


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_async_pymongo_through_proxy(secantus, loop_kind):
    direct_db, proxied_db = fresh_db_name("adirect"), fresh_db_name("aproxied")

    async def main():
        direct = AsyncMongoClient(secantus.uri, appname="itest")
        try:
            expected = await async_workload(direct[direct_db])
        finally:
            await direct.close()
        async with running_proxy(secantus.port) as proxy:
            client = AsyncMongoClient(f"mongodb://127.0.0.1:{proxy.ports[0]}/?directConnection=true", appname="itest")
            try:
                got = await async_workload(client[proxied_db])
            finally:
                await client.close()
            for _ in range(200):
                if len([e for e in proxy.sink.commands if e.database == proxied_db]) >= 13:
                    break
                await asyncio.sleep(0.01)
            return expected, got, list(proxy.sink.commands), list(proxy.sink.decode_errors)

    expected, got, commands, errors = run(main(), loop_kind)
    assert got == expected
    check_events(commands, proxied_db)
    assert errors == []
