"""The live view's sink: bounded per-browser queues that drop and count, and records that show values only when asked."""

from __future__ import annotations

from mongoproxy import _bson_parser
from mongoproxy.sinks.digest import DigestSink
from mongoproxy.sinks.live import LiveHookSink, LiveSink, _Subscriber
from tests.unit.test_digest import event, rendered


def test_a_slow_browser_loses_events_counted_and_never_blocks():
    sink, digest = LiveSink(queue_size=2), DigestSink()
    digest.live = sink  # as sinks.live.create wires them: the digest's hook offers each command
    digest.on_command(event())  # nobody subscribed: nothing kept
    slow, fast = _Subscriber(2), _Subscriber(10)
    sink.subscribers.update({slow, fast})
    for _ in range(5):
        digest.on_command(event())
    assert slow.queue.qsize() == 2 and slow.dropped == 3
    assert fast.queue.qsize() == 5 and fast.dropped == 0
    assert sink.dropped == 3  # exported as mongoproxy_events_dropped_total{sink="live"}


def test_records_are_redacted_unless_no_redact_and_never_show_credentials():
    cmd = {"find": "users", "filter": {"email": "ann@example.com"}, "$db": "shop"}
    redacted = LiveSink().record(event(query_shape=rendered(cmd)))
    assert redacted["query"] == '{"find":"users","filter":{"email":"?"}}' and "ann@" not in str(redacted)
    values = LiveSink(show_values=True).record(event(query_shape=rendered(cmd, _bson_parser.RENDER_VALUES)))
    assert "ann@example.com" in values["query"] and values["shape"] == redacted["shape"]
    secret = {"createUser": "bob", "pwd": "hunter2", "roles": [], "$db": "admin"}
    rec = LiveSink(show_values=True).record(
        event("createUser", query_shape=rendered(secret, _bson_parser.RENDER_VALUES))
    )
    assert "hunter2" not in str(rec) and '"pwd":"?"' in rec["query"]
    failed = LiveSink().record(event(ok=False, code=13, code_name="Unauthorized"))
    assert failed["failed"] is True and failed["error"] == "Unauthorized"


def test_without_the_digest_the_live_view_has_its_own_hook():
    from prometheus_client import CollectorRegistry

    from mongoproxy.sinks import SinkContext, build_sinks
    from tests.support.inprocess import make_config

    def sinks(**flags):
        ctx = SinkContext(registry=CollectorRegistry(), version="t", mode="static")
        return {s.name: s for s in build_sinks(make_config("0:127.0.0.1:1", **flags), ctx)}

    on = sinks()
    assert on["digest"].live is on["live"] and not hasattr(on["live"], "on_command")
    off = sinks(no_digest="true")
    assert "digest" not in off and isinstance(off["live"], LiveHookSink)
    sub = _Subscriber(10)
    off["live"].subscribers.add(sub)
    off["live"].on_command(event())
    assert sub.queue.qsize() == 1
