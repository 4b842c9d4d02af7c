"""SinkBus: hooks reach only sinks that define them; a failing sink is logged once, counted, never raised."""

import logging

from mongoproxy.events import CommandEvent, Connection, SinkBus, wall_ns
from tests.support.collecting import CollectingSink


def make_event(conn):
    return CommandEvent(
        connection=conn,
        op="ping",
        database="admin",
        collection="",
        request_id=1,
        request_opcode=2013,
        request_size=40,
        request_first_ns=1,
        request_last_ns=2,
        request=None,
    )


class Broken:
    name = "broken"

    def __init__(self):
        self.calls = 0

    def on_command(self, event):
        self.calls += 1
        raise ValueError("sink bug")


class OnlyOpen:
    name = "only-open"

    def __init__(self):
        self.opened = []

    def on_connection_open(self, conn):
        self.opened.append(conn)


def test_failing_sink_is_contained_logged_once_and_counted(caplog):
    good, broken = CollectingSink(), Broken()
    bus = SinkBus([broken, good])
    conn = Connection(id=1, client_host="::1", client_port=1)
    with caplog.at_level(logging.ERROR):
        for _ in range(5):
            bus.command(make_event(conn))
    assert broken.calls == 5 and len(good.commands) == 5
    assert bus.errors == {"broken": 5, "collect": 0}
    assert len([r for r in caplog.records if "sink broken failed" in r.getMessage()]) == 1


def test_hooks_only_reach_sinks_that_define_them():
    only = OnlyOpen()
    bus = SinkBus([only])
    conn = Connection(id=1, client_host="127.0.0.1", client_port=1, upstream_host="::1", upstream_port=27017)
    bus.connection_open(conn)
    bus.command(make_event(conn))  # OnlyOpen has no on_command: nothing happens
    bus.connection_close(conn)
    assert only.opened == [conn]
    assert conn.client == "127.0.0.1:1" and conn.server == "[::1]:27017"


def test_wall_clock_conversion_is_monotonic_offset():
    assert wall_ns(2_000) - wall_ns(1_000) == 1_000
    assert make_event(Connection(id=1, client_host="h", client_port=1)).duration_ns == 0


def test_a_compiled_hook_that_raises_is_contained_and_named_by_its_sink(caplog):
    """The metrics and digest sinks' on_command are compiled hook objects, not bound methods: still contained."""
    from prometheus_client import CollectorRegistry

    from mongoproxy.sinks.digest import DigestSink
    from mongoproxy.sinks.metrics import MetricsSink

    metrics, digest, good = MetricsSink(CollectorRegistry()), DigestSink(), CollectingSink()
    metrics._resolve = None  # a new label key now raises TypeError inside the compiled hook
    digest.digest = None  # counting now raises AttributeError inside the compiled hook
    bus = SinkBus([metrics, digest, good])
    conn = Connection(id=1, client_host="127.0.0.1", client_port=1)
    with caplog.at_level(logging.ERROR, logger="mongoproxy.sinks"):
        bus.command(make_event(conn))
        bus.command(make_event(conn))
    assert len(good.commands) == 2  # the sinks after the failing ones still got every event
    assert bus.errors == {"metrics": 2, "digest": 2, "collect": 0}
    assert caplog.text.count("sink metrics failed in MetricsHook") == 1
    assert caplog.text.count("sink digest failed in DigestHook") == 1
