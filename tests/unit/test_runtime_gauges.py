"""Runtime gauges: pending-table sizes summed over connections, and the loop's live tasks."""

import asyncio
from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from mongoproxy import wire
from mongoproxy.events import Connection, SinkBus
from mongoproxy.runtime_gauges import RuntimeGauges
from mongoproxy.tracker import Tracker
from tests.support import wire as tw
from tests.support.collecting import CollectingSink


def _side(conn_id, pending_ids):
    conn = Connection(id=conn_id, client_host="127.0.0.1", client_port=5000 + conn_id)
    tracker = Tracker(conn, SinkBus([CollectingSink()]))
    scanner = wire.FrameScanner(False, tracker.on_request, lambda r, d, f: None)
    for rid in pending_ids:
        scanner.feed(tw.encode_op_msg({"find": "c", "$db": "d"}, request_id=rid), 0)
    return SimpleNamespace(tracker=tracker)


def test_gauges_sum_pending_requests_and_count_tasks():
    loop = asyncio.new_event_loop()
    try:
        proxy = SimpleNamespace(connections=[_side(1, [1, 2, 3]), _side(2, [7]), SimpleNamespace(tracker=None)])
        registry = CollectorRegistry()
        registry.register(RuntimeGauges(proxy, loop))
        assert registry.get_sample_value("mongoproxy_pending_requests") == 4
        assert registry.get_sample_value("mongoproxy_exhaust_streams") == 0
        assert registry.get_sample_value("mongoproxy_asyncio_tasks") == 0
        tasks = [loop.create_task(asyncio.sleep(10)) for _ in range(3)]
        assert registry.get_sample_value("mongoproxy_asyncio_tasks") == 3
        for t in tasks:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        assert registry.get_sample_value("mongoproxy_asyncio_tasks") == 0
    finally:
        loop.close()
