"""The command log sink and the query-shape helpers, driven with hand-built events (no sockets)."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest

from mongoproxy import config as config_mod
from mongoproxy import querylog
from mongoproxy.errors import ConfigError
from mongoproxy.events import CommandEvent, Connection
from mongoproxy.sinks import SinkContext, commandlog
from mongoproxy.sinks.commandlog import CommandLogSink

MS = 1_000_000
SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "command-log.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def scan(**fields):
    """A stand-in for the scanner's ScanResult with the attributes the sink reads."""
    base = dict(
        write_errors=None,
        write_error_code=None,
        write_error_code_name=None,
        write_concern_error_code=None,
        write_concern_error_code_name=None,
        query_shape=None,
        comment=None,
    )
    base.update(fields)
    return SimpleNamespace(**base)


def conn(app="shop-api", host="127.0.0.1", port=53412):
    return Connection(id=3, client_host=host, client_port=port, upstream_host="db1", upstream_port=27017, app_name=app)


def command(
    op="find",
    db="shop",
    coll="users",
    *,
    latency_ms=0.84,
    ok=True,
    returned=None,
    changed=None,
    no_reply=False,
    request=None,
    reply=None,
    code=None,
    code_name="",
    errmsg="",
    c=None,
    exhaust_index=0,
    cursor_id=None,
    decode_error="",
):
    start = 5_000 * MS
    e = CommandEvent(
        connection=c or conn(),
        op=op,
        database=db,
        collection=coll,
        request_id=11,
        request_opcode=2013,
        request_size=150,
        request_first_ns=start,
        request_last_ns=start + 1000,
        request=request or scan(),
        decode_error=decode_error,
    )
    if no_reply:
        e.more_to_come_request = True
        return e
    e.reply = reply or scan(write_errors=0)
    e.reply_size = 220
    e.reply_first_ns = start + int(latency_ms * MS) - 500
    e.reply_last_ns = start + int(latency_ms * MS)
    e.ok, e.code, e.code_name, e.errmsg = ok, code, code_name, errmsg
    e.documents_returned, e.documents_changed, e.cursor_id = returned, changed, cursor_id
    if exhaust_index:
        e.exhaust, e.exhaust_index = True, exhaust_index
    return e


def run(events, **kwargs):
    """Feed events through a sink writing to a StringIO; return the lines (sink closed)."""
    out = io.StringIO()
    sink = CommandLogSink(out, **kwargs)
    for e in events:
        sink.on_command(e)
    sink.close()
    assert sink.dropped == 0
    return out.getvalue().splitlines()


def validate(line):
    record = json.loads(line)
    VALIDATOR.validate(record)
    return record


# ---- text ----


def test_text_line_fields():
    (line,) = run([command(returned=1, cursor_id=0)])
    assert line.endswith(" 127.0.0.1:53412 app=shop-api shop.users find 0.84ms returned=1 req=150B reply=220B ok")
    assert line[:24].endswith("Z") and line[10] == "T"
    assert "\x1b[" not in line  # a StringIO is not a terminal


def test_text_outcomes():
    lines = run(
        [
            command(
                op="insert",
                changed=0,
                ok=False,
                code=11000,
                code_name="DuplicateKey",
                errmsg="E11000 duplicate key error collection: shop.users index: _id_ dup key: { _id: 1 }",
            ),
            command(op="insert", changed=2, reply=scan(write_errors=1, write_error_code=11000)),
            command(
                op="update",
                changed=1,
                reply=scan(
                    write_errors=0, write_concern_error_code=64, write_concern_error_code_name="WriteConcernFailed"
                ),
            ),
            command(op="insert", no_reply=True),
            command(op="ping", db="admin", coll="", c=conn(app="")),
            command(op="getMore", returned=2, exhaust_index=2),
            command(op="find", decode_error="bad_bson"),
        ]
    )
    assert lines[0].endswith(
        "insert 0.84ms changed=0 req=150B reply=220B 11000 DuplicateKey: E11000 duplicate key "
        "error collection: shop.users index: _id_ dup key: { ? }"
    )
    assert lines[1].endswith("changed=2 req=150B reply=220B 11000 DuplicateKey: 1 write error")
    assert lines[2].endswith("64 WriteConcernFailed: write concern error")
    assert lines[3].endswith("shop.users insert - req=150B reply=- unacknowledged")
    assert " app=- admin ping " in lines[4] and lines[4].endswith(" ok")
    assert lines[5].endswith("returned=2 req=150B reply=220B ok exhaust=2")
    assert lines[6].endswith("decode-error=bad_bson")


def test_text_quotes_app_and_comment():
    (line,) = run([command(c=conn(app='my "app" 1'), request=scan(comment="trace=42 user"))])
    assert 'app="my \\"app\\" 1"' in line and line.endswith(' comment="trace=42 user"')


def _tty_lines(events, **kwargs):
    master, slave = pty.openpty()
    stream = os.fdopen(slave, "w", encoding="utf-8")
    sink = CommandLogSink(stream, **kwargs)
    for e in events:
        sink.on_command(e)
    sink.close()
    stream.close()
    data = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO once the slave side is closed and drained
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    return data.decode().splitlines()


def test_colour_on_a_terminal(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    ok, failed, slow = _tty_lines(
        [command(latency_ms=1), command(ok=False, code=2, code_name="BadValue"), command(latency_ms=150)]
    )
    assert "\x1b[" not in ok
    assert failed.startswith("\x1b[31m") and failed.endswith("\x1b[0m")
    assert slow.startswith("\x1b[33m") and slow.endswith("\x1b[0m")
    (slow_with_threshold,) = _tty_lines([command(latency_ms=30), command(latency_ms=5)], slow_ms=20)
    assert slow_with_threshold.startswith("\x1b[33m")


def test_no_colour_with_NO_COLOR_or_json(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert all("\x1b[" not in line for line in _tty_lines([command(ok=False, code=2)]))
    monkeypatch.delenv("NO_COLOR")
    (line,) = _tty_lines([command(ok=False, code=2)], fmt="json")
    assert "\x1b[" not in line and validate(line)["failed"] is True


# ---- JSON ----


def test_json_lines_validate_and_carry_every_field():
    events = [
        command(returned=1, cursor_id=0),
        command(op="getMore", returned=2, cursor_id=77, exhaust_index=1),
        command(
            op="insert", changed=0, ok=False, code=11000, code_name="DuplicateKey", errmsg="E11000 dup key: { a: 1 }"
        ),
        command(
            op="insert",
            changed=2,
            reply=scan(write_errors=1, write_error_code=11000, write_error_code_name="DuplicateKey"),
        ),
        command(op="update", changed=1, reply=scan(write_errors=0, write_concern_error_code=64)),
        command(op="insert", no_reply=True),
        command(op="ping", db="admin", coll="", c=conn(app="", host="::1")),
        command(decode_error="bad_bson", request=scan(comment="hi")),
    ]
    records = [validate(line) for line in run(events, fmt="json")]
    assert len(records) == len(events)
    first = records[0]
    assert first == {
        **first,
        "client": "127.0.0.1:53412",
        "server": "db1:27017",
        "app": "shop-api",
        "db": "shop",
        "collection": "users",
        "ns": "shop.users",
        "op": "find",
        "request_id": 11,
        "duration_ms": 0.84,
        "slow": False,
        "documents_returned": 1,
        "documents_changed": None,
        "request_bytes": 150,
        "reply_bytes": 220,
        "ok": True,
        "code": None,
        "failed": False,
        "cursor_id": 0,
        "unacknowledged": False,
        "exhaust": False,
        "query": None,
        "shape": None,
    }
    assert records[1]["exhaust"] is True and records[1]["cursor_id"] == 77
    assert records[2]["failed"] is True and records[2]["code_name"] == "DuplicateKey"
    assert records[2]["errmsg"] == "E11000 dup key: { ? }"
    assert records[3]["ok"] is True and records[3]["failed"] is True and records[3]["write_errors"] == 1
    assert records[4]["write_concern_error_code"] == 64 and records[4]["failed"] is True
    assert records[4]["write_concern_error_code_name"] == "WriteConcernTimeout"  # named from the code
    assert records[5]["unacknowledged"] is True and records[5]["duration_ms"] is None
    assert records[5]["reply_bytes"] is None and records[5]["ok"] is None and records[5]["write_errors"] is None
    assert records[6]["ns"] == "admin" and records[6]["client"] == "[::1]:53412"
    assert records[7]["decode_error"] == "bad_bson" and records[7]["comment"] == "hi"


def test_member_state_is_logged_on_member_listeners_and_null_elsewhere():
    member = conn()
    member.member_state = "secondary"  # what topology.MemberSpec.route sets on an --upstream listener
    plain, on_member = (validate(line) for line in run([command(), command(c=member)], fmt="json"))
    assert plain["member_state"] is None
    assert on_member["member_state"] == "secondary"
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate({**on_member, "member_state": "leader"})


def test_schema_rejects_what_it_should():
    (line,) = run([command()], fmt="json")
    record = json.loads(line)
    for broken in (
        {**record, "extra": 1},
        {k: v for k, v in record.items() if k != "op"},
        {**record, "duration_ms": "1"},
        {**record, "shape": "xyz"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            VALIDATOR.validate(broken)


# ---- filters ----


def test_filter_ops_include_and_exclude():
    events = [command(op=op) for op in ("find", "insert", "hello", "isMaster", "update")]
    assert [line.split()[4] for line in run(events, ops=("find", "UPDATE"))] == ["find", "update"]
    assert [line.split()[4] for line in run(events, ops=("!hello", "!ismaster"))] == ["find", "insert", "update"]


def test_monitoring_long_polls_only_when_named():
    poll = command(op="hello", db="admin", coll="")
    poll.awaitable = True
    events = [command(op="hello", db="admin", coll=""), poll, command(op="find")]
    assert [line.split()[4] for line in run(events)] == ["hello", "find"]
    assert [line.split()[4] for line in run(events, ops=("hello",))] == ["hello", "hello"]


def test_filter_namespaces():
    events = [
        command(db="shop", coll="users"),
        command(db="shop", coll="orders"),
        command(db="audit", coll="x"),
        command(op="ping", db="admin", coll=""),
    ]
    assert [line.split()[3] for line in run(events, namespaces=("shop.users",))] == ["shop.users"]
    assert [line.split()[3] for line in run(events, namespaces=("shop.*", "admin"))] == [
        "shop.users",
        "shop.orders",
        "admin",
    ]
    assert [line.split()[3] for line in run(events, namespaces=("audit",))] == ["audit.x"]


def test_filter_slow_ms():
    events = [command(latency_ms=5), command(latency_ms=20), command(latency_ms=19.999), command(no_reply=True)]
    lines = run(events, slow_ms=20)
    assert len(lines) == 1 and " 20.00ms " in lines[0]


# ---- the queue and the writer ----


def test_full_queue_drops_and_counts_without_blocking():
    r, w = os.pipe()
    stream = os.fdopen(w, "w", encoding="utf-8")
    sink = CommandLogSink(stream, queue_size=10)
    # One line bigger than the pipe holds blocks the writer thread inside write().
    sink.on_command(command(request=scan(comment="x" * 200_000)))
    while sink._queue:
        threading.Event().wait(0.01)
    for _ in range(10 + 7):
        sink.on_command(command())  # the event loop side never blocks
    assert sink.dropped == 7
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(r, 65536), b"")))
    reader.start()
    sink.close()
    stream.close()
    reader.join()
    os.close(r)
    assert len(b"".join(chunks).decode().splitlines()) == 11 and sink.written == 11


def test_write_failure_is_counted_and_logged_once(caplog, tmp_path):
    stream = open(tmp_path / "x.log", "w")
    stream.close()  # every write now raises ValueError
    sink = CommandLogSink(stream, logger=logging.getLogger("test.commandlog"))
    with caplog.at_level(logging.ERROR, "test.commandlog"):
        for _ in range(5):
            sink.on_command(command())
        sink.close()
    assert sink.dropped == 5 and sink.written == 0
    assert len([r for r in caplog.records if "cannot write the command log" in r.getMessage()]) == 1


def test_close_writes_everything_queued(tmp_path):
    path = tmp_path / "c.log"
    sink = commandlog.create(
        config_mod.build({"log_file": str(path), "log_format": "json"}, env={}),
        SinkContext(registry=None, version="x", mode="static"),
    )
    for _ in range(2000):
        sink.on_command(command())
    sink.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2000 and all(validate(line)["op"] == "find" for line in lines[:5])
    sink.close()  # idempotent


# ---- --log-query, redaction and shapes ----

FIND_REDACTED = (
    '{"find":"users","filter":{"email":"?","age":{"$gt":"?"}},"lsid":{"id":"?"},'
    '"$clusterTime":{"clusterTime":"?"},"$db":"shop"}'
)
FIND_VALUES = (
    '{"find":"users","filter":{"email":"secret-value-123","age":{"$gt":{"$numberInt":"30"}}},'
    '"lsid":{"id":{"$binary":{"base64":"AAAA","subType":"04"}}},"$db":"shop"}'
)


def test_log_query_redacted_drops_envelope_and_adds_shape():
    lines = run([command(request=scan(query_shape=FIND_REDACTED))], log_query=True)
    assert lines[0].endswith(' query={"find":"users","filter":{"email":"?","age":{"$gt":"?"}}}')
    (line,) = run([command(request=scan(query_shape=FIND_REDACTED))], log_query=True, fmt="json")
    rec = validate(line)
    assert rec["query"] == '{"find":"users","filter":{"email":"?","age":{"$gt":"?"}}}'
    assert len(rec["shape"]) == 16


def test_redaction_holds_even_if_the_rendering_had_values():
    # Without --no-redact the log redacts whatever the scanner rendered.
    lines = run([command(request=scan(query_shape=FIND_VALUES))], log_query=True)
    assert "secret-value-123" not in lines[0] and '"email":"?"' in lines[0]


def test_no_redact_shows_values_but_never_secrets():
    events = [
        command(request=scan(query_shape=FIND_VALUES)),
        command(
            op="saslStart",
            db="admin",
            coll="",
            request=scan(
                query_shape='{"saslStart":1,"mechanism":"SCRAM-SHA-256","payload":{"$binary":{"base64":"bj0sbj1hZG1pbixyPXNlY3JldA==","subType":"00"}},"$db":"admin"}'
            ),
        ),
        command(
            op="saslContinue",
            db="admin",
            coll="",
            request=scan(
                query_shape='{"saslContinue":1,"conversationId":1,"payload":"c2VjcmV0LXByb29m","$db":"admin"}'
            ),
        ),
        command(
            op="createUser",
            db="admin",
            coll="",
            request=scan(query_shape='{"createUser":"bob","pwd":"hunter2","roles":["readWrite"],"$db":"admin"}'),
        ),
        command(
            op="hello",
            db="admin",
            coll="",
            request=scan(
                query_shape='{"hello":1,"speculativeAuthenticate":{"saslStart":1,"payload":"c2VjcmV0"},"$db":"admin"}'
            ),
        ),
    ]
    lines = run(events, log_query=True, show_values=True)
    assert '"email":"secret-value-123"' in lines[0]
    text = "\n".join(lines)
    for secret in ("bj0sbj1", "c2VjcmV0", "hunter2", "SCRAM-SHA-256"):
        assert secret not in text
    assert '"createUser":"bob","pwd":"?","roles":["readWrite"]' in lines[3]


def test_errmsg_values_shown_only_with_no_redact():
    e = command(
        ok=False,
        code=11000,
        code_name="DuplicateKey",
        errmsg='E11000 duplicate key error collection: shop.users index: email_1 dup key: { email: "secret-value-123" }',
    )
    assert "secret-value-123" not in run([e])[0]
    assert "secret-value-123" in run([e], show_values=True, log_query=True)[0]


def test_shape_is_stable_across_values_modes_and_array_lengths():
    a = querylog.prepare(FIND_REDACTED, "find", False)[1]
    b = querylog.prepare(FIND_VALUES, "find", True)[1]
    c = querylog.prepare(FIND_VALUES.replace("secret-value-123", "other"), "find", False)[1]
    assert a == b == c
    in1 = querylog.prepare('{"find":"u","filter":{"_id":{"$in":[1,2,3]}},"$db":"x"}', "find", True)[1]
    in2 = querylog.prepare('{"find":"u","filter":{"_id":{"$in":["?"]}},"$db":"y","lsid":{"id":"?"}}', "find", False)[1]
    assert in1 == in2
    other_field = querylog.prepare('{"find":"u","filter":{"name":{"$in":[1]}}}', "find", True)[1]
    other_coll = querylog.prepare('{"find":"v","filter":{"_id":{"$in":[1]}}}', "find", True)[1]
    assert len({in1, other_field, other_coll}) == 3


def test_truncated_rendering_is_still_redacted():
    cut = '{"find":"users","filter":{"email":"secret-value-123","n":42,"ok":true,"x":nu'
    shown, shape = querylog.prepare(cut, "find", False)
    assert "secret-value-123" not in shown and "42" not in shown and '"email":"?"' in shown
    assert shape == querylog.prepare(cut.replace("secret-value-123", "zzz"), "find", False)[1]
    assert querylog.prepare(cut, "find", True)[0] == cut


# ---- options and create() ----


def test_options_parse():
    cfg = config_mod.build(
        {
            "log_format": "JSON",
            "log_ops": "find, !hello",
            "log_ns": "shop.users,audit.*",
            "slow_ms": "12.5",
            "log_mongo_messages": True,
        },
        env={},
    )
    assert (cfg.log_format, cfg.log_ops, cfg.log_ns, cfg.slow_ms) == (
        "json",
        ("find", "!hello"),
        ("shop.users", "audit.*"),
        12.5,
    )
    env = {"MONGOPROXY_LOG_COMMANDS": "true", "MONGOPROXY_LOG_OPS": "find,update", "MONGOPROXY_NO_REDACT": "1"}
    cfg = config_mod.build({}, env=env)
    assert cfg.log_commands and cfg.log_ops == ("find", "update") and cfg.no_redact
    for flags, needle in (
        ({"log_format": "xml"}, "text or json"),
        ({"log_ops": "find,!"}, "empty command"),
        ({"log_ns": ".users"}, "db.collection"),
        ({"slow_ms": "-1"}, "--slow-ms"),
    ):
        with pytest.raises(ConfigError) as exc:
            config_mod.build(flags, env={})
        assert needle in str(exc.value) and "\n" not in str(exc.value)


CTX = SinkContext(registry=None, version="x", mode="static")


def test_create_off_by_default_and_warns_about_idle_flags(caplog):
    assert commandlog.create(config_mod.build({}, env={}), CTX) is None
    with caplog.at_level(logging.WARNING, "mongoproxy"):
        assert commandlog.create(config_mod.build({"log_format": "json", "log_ops": "find"}, env={}), CTX) is None
    msgs = [r.getMessage() for r in caplog.records]
    assert "--log-format has no effect without --log-commands" in msgs
    assert "--log-ops has no effect without --log-commands" in msgs


@pytest.mark.parametrize(
    "flags", [{"log_commands": True}, {"log_mongo_messages": True}, {"slow_ms": "0"}, {"log_query": True}]
)
def test_create_switches_on(flags):
    sink = commandlog.create(config_mod.build(flags, env={}), CTX)
    try:
        assert isinstance(sink, CommandLogSink)
    finally:
        sink.close()


def test_log_file_errors_at_start_up(tmp_path):
    missing = tmp_path / "nope" / "c.log"
    with pytest.raises(ConfigError) as exc:
        commandlog.create(config_mod.build({"log_file": str(missing)}, env={}), CTX)
    assert "does not exist" in str(exc.value) and str(missing.parent) in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        commandlog.create(config_mod.build({"log_file": str(tmp_path)}, env={}), CTX)
    assert "is a directory" in str(exc.value)


def test_log_file_appends(tmp_path):
    path = tmp_path / "c.log"
    path.write_text("earlier\n")
    sink = commandlog.create(config_mod.build({"log_file": str(path)}, env={}), CTX)
    sink.on_command(command())
    sink.close()
    lines = path.read_text().splitlines()
    assert lines[0] == "earlier" and "shop.users find" in lines[1] and "\x1b[" not in lines[1]


def test_log_file_is_0600_and_reload_reopens_it(tmp_path):
    """The log may hold query shapes: owner-only. reload() (SIGHUP) reopens it after logrotate moved it."""
    path = tmp_path / "c.log"
    old = os.umask(0o022)
    try:
        sink = commandlog.create(config_mod.build({"log_file": str(path)}, env={}), CTX)
        sink.on_command(command())
        deadline = time.monotonic() + 10
        while "find" not in path.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.rename(path, tmp_path / "c.log.1")
        sink.reload()
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        sink.on_command(command())
        sink.close()
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert "shop.users find" in path.read_text()
    assert (tmp_path / "c.log.1").read_text().count("shop.users find") == 1


def test_a_faulted_command_names_its_rule_in_text_and_json():
    event = command(op="insert", ok=False, code=91, code_name="ShutdownInProgress")
    event.fault = "failover"
    (line,) = run([event])
    assert line.endswith("91 ShutdownInProgress fault=failover")
    (record,) = [validate(x) for x in run([event], fmt="json")]
    assert record["fault"] == "failover"
    assert validate(run([command()], fmt="json")[0])["fault"] is None
