"""Metrics and the command log of the real proxy process, in front of SecantusDB (and a scripted server).

Every count is exact: each test runs its own proxy, so /metrics holds only
what the test sent.
"""

from __future__ import annotations

import base64
import json
import math
import socket
import time
from pathlib import Path

import jsonschema
import pytest
from pymongo.errors import DuplicateKeyError

from tests.support import wire
from tests.support.ports import free_port
from tests.support.proxy import run_proxy_cli, run_proxy_process

pytestmark = pytest.mark.timeout(180)

SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "docs" / "command-log.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


class Scrape:
    """One /metrics body; get() sums the samples whose labels include the given ones."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.text = text
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def get(self, name: str, **labels: str):
        """Sum of matching samples, None when there is none."""
        values = [
            s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        return sum(values) if values else None

    def label_values(self, name: str, label: str) -> set:
        """Distinct values of `label` among the samples of `name`."""
        return {s.labels.get(label) for s in self.samples if s.name == name}


def scrape(p) -> Scrape:
    return Scrape(p.metrics_text())


def wait_for(p, predicate, timeout: float = 10.0) -> Scrape:
    """Scrape until predicate(scrape) holds (connection closes reach the proxy asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(p)
        if predicate(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; /metrics:\n{s.text[-4000:]}")
        time.sleep(0.05)


def set_name(secantus_client) -> str:
    return secantus_client.admin.command("hello").get("setName", "")


# ---------------------------------------------------------------- exact counts


def test_exact_counts_for_a_known_workload(secantus, secantus_client, db_name):
    N, K, M, U = 5, 6, 7, 3
    with run_proxy_process(["--log-commands"], upstream=secantus.address) as p:
        client = p.client(appname="obs-exact")
        try:
            db = client[db_name]
            db.people.insert_many([{"_id": i, "name": f"p{i}"} for i in range(K)])
            for i in range(N):
                assert db.people.find_one({"_id": i})["_id"] == i
            db.scan.insert_many([{"_id": i} for i in range(M)])
            assert len(list(db.scan.find({}, batch_size=2))) == M
            assert db.people.update_many({"_id": {"$lt": U}}, {"$set": {"u": 1}}).modified_count == U
            with pytest.raises(DuplicateKeyError):
                db.people.insert_one({"_id": 0})
        finally:
            client.close()
        s = wait_for(p, lambda s: s.get("mongoproxy_connections_active") == 0)
        stderr = p.stderr_text()

    base = {
        "db": db_name,
        "app": "obs-exact",
        "server": f"127.0.0.1:{secantus.port}",
        "replicaset": set_name(secantus_client),
    }
    people, scan = dict(base, collection="people"), dict(base, collection="scan")
    lat = "mongoproxy_response_latency_seconds_count"
    getmores = math.ceil((M - 2) / 2)

    assert s.get(lat, op="insert", **people) == 2  # insert_many + the duplicate
    assert s.get("mongoproxy_documents_changed_count", op="insert", **people) == 2
    assert s.get("mongoproxy_documents_changed_sum", op="insert", **people) == K  # the duplicate wrote 0
    assert s.get(lat, op="find", **people) == N
    assert s.get("mongoproxy_documents_returned_sum", op="find", **people) == N
    assert s.get(lat, op="update", **people) == 1
    assert s.get("mongoproxy_documents_changed_sum", op="update", **people) == U
    assert s.get(lat, op="insert", **scan) == 1
    assert s.get("mongoproxy_documents_changed_sum", op="insert", **scan) == M
    assert s.get(lat, op="find", **scan) == 1
    assert s.get("mongoproxy_documents_returned_sum", op="find", **scan) == 2
    # getMore is attributed to its cursor's collection
    assert s.get(lat, op="getMore", **scan) == getmores
    assert s.get("mongoproxy_documents_returned_sum", op="getMore", **scan) == M - 2
    assert s.get(lat, op="getMore", collection="") is None
    assert s.get(lat, op="killCursors") is None  # the cursor was exhausted

    # every command that reached the db is in exactly these series
    assert s.get(lat, db=db_name) == 2 + N + 1 + 1 + 1 + getmores
    assert s.label_values(lat, "collection") >= {"", "people", "scan"}
    for op in ("insert", "find", "getMore", "update"):
        assert (
            s.get("mongoproxy_request_size_bytes_count", op=op, db=db_name)
            == s.get(lat, op=op, db=db_name)
            == s.get("mongoproxy_response_size_bytes_count", op=op, db=db_name)
        )
        assert s.get("mongoproxy_request_size_bytes_sum", op=op, db=db_name) > 0
        for coll in ("people", "scan"):
            assert s.get(
                "mongoproxy_response_latency_seconds_bucket", op=op, collection=coll, db=db_name, le="+Inf"
            ) == s.get(lat, op=op, collection=coll, db=db_name)

    errors = "mongoproxy_command_errors_total"
    assert s.get(errors, op="insert", db=db_name, collection="people", code_name="DuplicateKey") == 1
    assert s.get(errors, db=db_name) == 1
    assert s.get("mongoproxy_decode_errors_total") == 0  # every known reason is there, at 0
    assert s.get("mongoproxy_unmatched_replies_total") == 0
    assert s.get("mongoproxy_requests_dropped_total") == 0
    assert (
        s.get("mongoproxy_client_connections_established_total") == s.get("mongoproxy_client_disconnections_total") >= 1
    )
    assert s.get("mongoproxy_info", mode="static") == 1

    # the text log, one line per command
    lines = [line for line in stderr.splitlines() if f" {db_name}." in line]
    assert len([line for line in lines if f" {db_name}.people find " in line]) == N
    assert len([line for line in lines if f" {db_name}.scan getMore " in line]) == getmores
    dup = [line for line in lines if " 11000 DuplicateKey" in line]
    assert len(dup) == 1 and f" {db_name}.people insert " in dup[0] and " app=obs-exact " in dup[0]


def test_label_cap_puts_overflow_in_other(secantus, db_name):
    with run_proxy_process(["--max-label-values", "3"], upstream=secantus.address) as p:
        client = p.client(appname="obs-cap")
        try:
            for i in range(10):
                client[db_name][f"c{i}"].insert_one({"_id": i})
        finally:
            client.close()
        s = scrape(p)
    lat = "mongoproxy_response_latency_seconds_count"
    kept = {v for v in s.label_values(lat, "collection") if v.startswith("c")}
    assert kept == {"c0", "c1", "c2"}
    for c in kept:
        assert s.get(lat, db=db_name, collection=c) == 1
    assert s.get(lat, db=db_name, collection="_other") == 7
    assert s.get("mongoproxy_label_overflow_total", label="collection") == 7
    assert s.get(lat, db=db_name) == 10


# ---------------------------------------------------------------- connection-level counters


def test_connection_bytes_and_decode_errors_are_exact(secantus):
    with run_proxy_process([], upstream=secantus.address) as p:
        request = wire.encode_op_msg({"ping": 1, "$db": "admin"})
        with socket.create_connection(p.address, timeout=10) as sock:
            sock.sendall(request)
            reply = wire.recv_message(sock)
        s = wait_for(p, lambda s: s.get("mongoproxy_connections_active") == 0)
        assert s.get("mongoproxy_client_connections_established_total") == 1
        assert s.get("mongoproxy_client_disconnections_total") == 1
        assert s.get("mongoproxy_client_bytes_received_total") == len(request)
        assert s.get("mongoproxy_client_bytes_sent_total") == len(reply)
        ping = {"op": "ping", "db": "admin", "collection": "", "app": ""}
        assert s.get("mongoproxy_request_size_bytes_sum", **ping) == len(request)
        assert s.get("mongoproxy_response_size_bytes_sum", **ping) == len(reply)
        assert s.get("mongoproxy_response_latency_seconds_count", **ping) == 1
        assert s.get("mongoproxy_server_connect_time_seconds_count", server=f"127.0.0.1:{secantus.port}") == 1
        assert s.get("mongoproxy_decode_errors_total") == 0

        # Not MongoDB: a header claiming 3 bytes. Forwarded anyway, counted once, observation stops.
        junk = b"\x03\x00\x00\x00" + b"\x00" * 12 + b"not mongodb at all"
        with socket.create_connection(p.address, timeout=10) as sock:
            sock.sendall(junk)
            sock.settimeout(5)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass
        s = wait_for(
            p,
            lambda s: (
                s.get("mongoproxy_connections_active") == 0 and s.get("mongoproxy_client_disconnections_total") == 2
            ),
        )
        assert s.get("mongoproxy_decode_errors_total", direction="request") == 1
        assert s.get("mongoproxy_client_bytes_received_total") == len(request) + len(junk)


def test_upstream_connect_error_is_counted():
    closed = free_port()
    with run_proxy_process(["--proxy", f"{{port}}:127.0.0.1:{closed}"]) as p:
        with socket.create_connection(p.address, timeout=10) as sock:
            sock.settimeout(5)
            assert sock.recv(1) == b""  # closed at once
        s = wait_for(p, lambda s: s.get("mongoproxy_upstream_connect_errors_total") == 1)
        assert s.get("mongoproxy_upstream_connect_errors_total", reason="refused") == 1
        assert s.get("mongoproxy_connections_active") == 0
        assert s.get("mongoproxy_server_connect_time_seconds_count") is None


def test_unmatched_replies_and_dropped_requests(scripted_server):
    async def handler(conn):
        for _ in range(3):
            assert await conn.read_raw_message(timeout=10) is not None
        await conn.send_and_drain(wire.encode_op_msg({"ok": 1.0}, response_to=424242))
        await conn.read()  # until the client leaves

    srv = scripted_server(handler)
    with run_proxy_process(["--max-pending-requests", "2"], upstream=srv.address) as p:
        with socket.create_connection(p.address, timeout=10) as sock:
            for _ in range(3):
                sock.sendall(wire.encode_op_msg({"ping": 1, "$db": "admin"}))
            assert wire.decode_message(wire.recv_message(sock)).response_to == 424242
        s = wait_for(p, lambda s: s.get("mongoproxy_connections_active") == 0)
        assert s.get("mongoproxy_requests_dropped_total") == 1
        assert s.get("mongoproxy_unmatched_replies_total") == 1
        assert s.get("mongoproxy_response_latency_seconds_count") is None  # nothing was answered


# ---------------------------------------------------------------- command log, schema and redaction

SECRET = "secret-value-123"
USER, PASSWORD = "scram_obs", "pencil-123"
# SCRAM client-first-message starts "n,,n=<user>,r=<nonce>": its first 15 bytes encode to fixed base64.
USER_B64 = base64.b64encode(f"n,,n={USER},".encode()).decode()


def _secret_workload(p, db_name):
    client = p.client(appname="obs-log")
    try:
        db = client[db_name]
        db.command("createUser", USER, pwd=PASSWORD, roles=["readWrite"])
        db.users.insert_many([{"_id": i, "email": f"user{i}@example.com"} for i in range(3)])
        assert db.users.find_one({"email": SECRET}) is None
        assert len(list(db.users.find({"_id": {"$in": [0, 1, 2]}}, batch_size=2))) == 3
        with pytest.raises(DuplicateKeyError):
            db.users.insert_one({"_id": 0, "email": SECRET})
    finally:
        client.close()
    # A SCRAM-SHA-256 exchange: speculative saslStart inside hello, then saslContinue.
    authed = p.client(username=USER, password=PASSWORD, authSource=db_name, authMechanism="SCRAM-SHA-256")
    try:
        assert authed[db_name].users.find_one({"_id": 1})["_id"] == 1
    finally:
        authed.close()


def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def _assert_no_credentials(text: str, records: list) -> None:
    assert PASSWORD not in text and USER_B64 not in text
    sasl = [r for r in records if r["op"] in ("saslStart", "saslContinue")]
    hello_auth = [r for r in records if r["query"] and "speculativeAuthenticate" in r["query"]]
    assert sasl and hello_auth, "the workload did not authenticate through the proxy"
    for r in sasl:
        assert set(_leaves(json.loads(r["query"]))) == {"?"}
    for r in hello_auth:
        assert set(_leaves(json.loads(r["query"])["speculativeAuthenticate"])) == {"?"}
    create = [r for r in records if r["op"] == "createUser"]
    assert len(create) == 1 and json.loads(create[0]["query"])["pwd"] == "?"


def _read_json_log(path: Path) -> list:
    lines = path.read_text().splitlines()
    records = []
    for line in lines:
        record = json.loads(line)
        VALIDATOR.validate(record)
        records.append(record)
    return records


def test_json_log_validates_and_redacts_unless_asked(secantus, db_name, tmp_path):
    runs = {}
    for mode, extra in (("redacted", []), ("values", ["--no-redact"])):
        log = tmp_path / f"{mode}.jsonl"
        with run_proxy_process(
            ["--log-query", *extra, "--log-format", "json", "--log-file", str(log)], upstream=secantus.address
        ) as p:
            _secret_workload(p, f"{db_name}_{mode[0]}")
            stderr = p.stderr_text()
        records = _read_json_log(log)  # every line validates against docs/command-log.schema.json
        _assert_no_credentials(log.read_text() + stderr, records)
        runs[mode] = (log.read_text() + stderr, records)

    text, records = runs["redacted"]
    assert SECRET not in text
    mine = [r for r in records if r["db"] == f"{db_name}_r"]
    finds = [r for r in mine if r["op"] == "find" and r["collection"] == "users"]
    assert len(finds) == 3
    by_email = [r for r in finds if '"email"' in r["query"]]
    assert len(by_email) == 1 and json.loads(by_email[0]["query"])["filter"] == {"email": "?"}
    assert by_email[0]["documents_returned"] == 0 and by_email[0]["app"] == "obs-log"
    assert len({r["shape"] for r in finds}) == 3  # three different queries
    getmores = [r for r in mine if r["op"] == "getMore"]
    assert len(getmores) == 1 and getmores[0]["collection"] == "users" and getmores[0]["cursor_id"] == 0
    dup = [r for r in mine if r["failed"]]
    assert len(dup) == 1 and dup[0]["write_error_code"] == 11000
    assert dup[0]["write_error_code_name"] == "DuplicateKey" and dup[0]["ok"] is True
    assert all(r["duration_ms"] is not None and r["duration_ms"] >= 0 for r in mine)

    text, records = runs["values"]
    shown = [r for r in records if r["op"] == "find" and r["query"] and SECRET in r["query"]]
    assert len(shown) == 1 and json.loads(shown[0]["query"])["filter"] == {"email": SECRET}
    assert shown[0]["shape"] == by_email[0]["shape"]  # the shape does not depend on what is shown


def test_text_log_without_query_never_shows_values(secantus, db_name):
    with run_proxy_process(["--log-commands"], upstream=secantus.address) as p:
        _secret_workload(p, db_name)
        time.sleep(0.1)  # the writer thread drains every 20 ms
        stderr = p.stderr_text()
    assert f" {db_name}.users find " in stderr
    assert SECRET not in stderr and PASSWORD not in stderr and USER_B64 not in stderr
    assert "dup key: { ? }" in stderr or "1 write error" in stderr


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--log-file", "/nonexistent-mongoproxy-dir/commands.log"], "/nonexistent-mongoproxy-dir does not exist"),
        (["--metric-labels", "op,ip"], "op,db,collection,app,server,replicaset,member_state,client"),
        (["--latency-buckets", ","], "--latency-buckets is empty"),
        (["--log-format", "yaml"], "use text or json"),
    ],
)
def test_bad_flags_get_one_line_at_start_up(flags, needle):
    upstream = free_port()
    result = run_proxy_cli(["run", "--proxy", f"{free_port()}:127.0.0.1:{upstream}", "--admin-port", "0", *flags])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr
