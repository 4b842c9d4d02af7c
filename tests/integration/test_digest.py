"""The query digest against SecantusDB: a known workload, the admin routes, `mongoproxy top` and recordings."""

from __future__ import annotations

import glob
import json
import time
import urllib.error
from pathlib import Path

import pymongo
import pytest
from pymongo.errors import DuplicateKeyError

from mongoproxy.digest import RELATIVE_ACCURACY, Digest
from tests.support.admin_app import admin_proxy
from tests.support.proxy import run_proxy_cli

N = 30  # commands per shape and app
APPS = ("app-a", "app-b")


def workload(uri: str, db_name: str, apps=APPS, first_id: int = 0) -> None:
    """3 shapes x different literal values x the given apps; app-b's inserts repeat 10 of app-a's ids."""
    for k, app in enumerate(apps):
        with pymongo.MongoClient(uri, appname=app, serverSelectionTimeoutMS=5000) as c:
            orders = c[db_name].orders
            for i in range(N):
                orders.find_one({"sku": f"sku-{k}-{i}"})  # shape 1: equality, a new value each time
                list(orders.find({"qty": {"$in": list(range(i + 1))}}))  # shape 2: $in lists of 1..30 values
                try:
                    orders.insert_one({"_id": first_id + 20 * k + i, "qty": i})  # shape 3
                except DuplicateKeyError:
                    pass


def json_log(path: Path) -> list[dict]:
    """The command log's records (the writer thread may trail: wait until the expected lines are there)."""
    deadline = time.monotonic() + 10
    while True:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if sum(r["collection"] == "orders" for r in records) >= 3 * N * len(APPS) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def key_of(r: dict) -> tuple:
    return (r["shape"], r["db"], r["collection"], r["op"], r["app"])


def order_statistic(values: list[float], q: float) -> float:
    """The value DDSketch approximates for quantile q: rank q*(n-1), rounded down."""
    return sorted(values)[int(q * (len(values) - 1))]


def wait_digest(p, path: str, count: int) -> dict:
    """GET path until its shapes' counts add up to `count` (events trail the replies by a little)."""
    deadline = time.monotonic() + 10
    while True:
        doc = p.get_json(path)
        if sum(s["count"] for s in doc["shapes"]) >= count or time.monotonic() > deadline:
            return doc
        time.sleep(0.05)


def test_known_workload_six_keys_exact_counts_percentiles_and_errors(secantus, db_name, tmp_path):
    log = tmp_path / "commands.jsonl"
    rec = tmp_path / "rec"
    with admin_proxy(secantus.address, log_file=str(log), log_format="json", log_query="true", record=str(rec)) as p:
        workload(p.uri, db_name)
        doc = wait_digest(p, f"/digest?ns={db_name}.orders&sort=count", 3 * N * len(APPS))
        records = [r for r in json_log(log) if r["db"] == db_name and r["collection"] == "orders"]
        # Read and clear in one step, then the table is empty for that namespace.
        again = p.get_json(f"/digest?ns={db_name}.orders&reset=1")
        assert sum(s["count"] for s in again["shapes"]) == 3 * N * len(APPS)
        assert p.get_json(f"/digest?ns={db_name}.orders")["shapes"] == []
    assert doc["version"] == 1
    shapes = doc["shapes"]
    assert len(shapes) == 6
    assert sorted((s["op"], s["app"], s["count"]) for s in shapes) == [
        ("find", "app-a", N),
        ("find", "app-a", N),
        ("find", "app-b", N),
        ("find", "app-b", N),
        ("insert", "app-a", N),
        ("insert", "app-b", N),
    ]
    errors = {s["app"]: s["errors"] for s in shapes if s["op"] == "insert"}
    assert errors == {"app-a": {}, "app-b": {"DuplicateKey": 10}}
    inserts = {s["app"]: s for s in shapes if s["op"] == "insert"}
    assert inserts["app-a"]["docs_changed"] == N and inserts["app-b"]["docs_changed"] == N - 10
    # Two apps share each shape hash: 3 distinct shapes, and the $in lists of 1..30 values are one of them.
    assert len({s["shape"] for s in shapes}) == 3
    for s in shapes:
        assert "sku-" not in s["example"] and '"?"' in s["example"]
    # The command log computed the same shape hashes (one computation, shared), and its latencies agree.
    by_key: dict[tuple, list[float]] = {}
    for r in records:
        by_key.setdefault(key_of(r), []).append(r["duration_ms"])
    assert set(by_key) == {key_of(s) for s in shapes}
    for s in shapes:
        printed = by_key[key_of(s)]
        assert len(printed) == s["count"]
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            exact = order_statistic(printed, q)
            assert abs(s["latency_ms"][name] - exact) <= RELATIVE_ACCURACY * exact + 0.001, (name, s, printed)
        assert s["latency_ms"]["max"] == max(printed) and s["latency_ms"]["min"] == min(printed)

    # The same run, recorded, digested offline: the same keys and counts.
    files = glob.glob(str(rec / "*.pcapng"))
    assert files
    out = run_proxy_cli(["digest", "--json", "--ns", f"{db_name}.orders", *files])
    assert out.returncode == 0, out.stderr
    offline = json.loads(out.stdout)
    live = {key_of(s): (s["count"], s["errors"]) for s in shapes}
    assert {key_of(s): (s["count"], s["errors"]) for s in offline["shapes"]} == live
    table = run_proxy_cli(["digest", "--sort", "count", "--ns", f"{db_name}.orders", *files])
    assert table.returncode == 0 and "DuplicateKey=10" in table.stdout and f"{db_name}.orders" in table.stdout


def test_updates_and_deletes_from_a_driver_are_keyed_by_their_first_statements_filter(secantus, db_name):
    # pymongo sends update/delete statements in kind-1 `updates`/`deletes` sequences
    with admin_proxy(secantus.address) as p:
        with pymongo.MongoClient(p.uri, appname="writer", serverSelectionTimeoutMS=5000) as c:
            orders = c[db_name].orders
            for i in range(4):
                orders.update_one({"a": i}, {"$set": {"x": i}}, upsert=True)
                orders.update_one({"b": i}, {"$set": {"x": i}})
                orders.delete_one({"a": i})
                orders.delete_one({"b": i})
        doc = wait_digest(p, f"/digest?ns={db_name}.orders", 16)
    shapes = doc["shapes"]
    assert sorted((s["op"], s["count"]) for s in shapes) == [("delete", 4)] * 2 + [("update", 4)] * 2
    assert len({s["shape"] for s in shapes}) == 4
    examples = sorted(s["example"] for s in shapes)
    assert any('"deletes":[{"q":{"a":"?"}' in e for e in examples), examples
    assert any('"updates":[{"q":{"b":"?"},"u":{"$set":{"x":"?"}}' in e for e in examples), examples
    assert all('"x":1' not in e and '"a":0' not in e for e in examples)  # literals stay out


def test_admin_routes_sort_limit_filters_and_reset(secantus, db_name):
    with admin_proxy(secantus.address) as p:
        workload(p.uri, db_name, apps=("app-a",))
        doc = wait_digest(p, f"/digest?ns={db_name}", 3 * N)
        assert len(p.get_json(f"/digest?ns={db_name}&limit=2")["shapes"]) == 2
        assert {s["app"] for s in p.get_json(f"/digest?ns={db_name}&app=app-a")["shapes"]} == {"app-a"}
        assert p.get_json(f"/digest?ns={db_name}&app=nobody")["shapes"] == []
        counts = [s["count"] for s in p.get_json(f"/digest?ns={db_name}&sort=count")["shapes"]]
        assert counts == sorted(counts, reverse=True)
        assert "sketch" in p.get_json(f"/digest?ns={db_name}&sketch=1")["shapes"][0]
        assert "sketch" not in doc["shapes"][0]
        with pytest.raises(urllib.error.HTTPError) as bad:
            p.get_json("/digest?sort=slowest")
        assert bad.value.code == 400
        assert p.get_json("/digest/reset", method="POST")["reset"] is True
        assert p.get_json(f"/digest?ns={db_name}")["shapes"] == []


def test_top_once_merges_two_proxies_exactly(secantus, db_name, tmp_path):
    logs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    with (
        admin_proxy(secantus.address, log_file=str(logs[0]), log_format="json", log_query="true") as pa,
        admin_proxy(secantus.address, log_file=str(logs[1]), log_format="json", log_query="true") as pb,
    ):
        workload(pa.uri, db_name, apps=("app-a",))
        workload(pb.uri, db_name, apps=("app-a",), first_id=1000)
        for p in (pa, pb):
            wait_digest(p, f"/digest?ns={db_name}.orders", 3 * N)
        admins = ["--admin", pa.admin_url, "--admin", pb.admin_url + "/"]
        out = run_proxy_cli(["top", "--once", "--json", "--ns", f"{db_name}.orders", *admins])
        periodic = run_proxy_cli(["top", "--count", "2", "--interval", "0.1", "--ns", f"{db_name}.orders", *admins])
        plain = run_proxy_cli(["top", "--once", "--ns", f"{db_name}.orders", *admins])
    assert out.returncode == 0, out.stderr
    merged = json.loads(out.stdout)
    assert merged["version"] == 1 and len(merged["shapes"]) == 3
    assert all(s["count"] == 2 * N for s in merged["shapes"])
    # The union: every latency both command logs printed, in one digest of its own.
    union = Digest()
    for log in logs:
        for r in (json.loads(line) for line in log.read_text().splitlines()):
            if r["db"] == db_name and r["collection"] == "orders":
                union.add(key_of(r), "", 0, r["duration_ms"], None, None, None, 0, 0)
    expected = {key_of(s): s for s in union.to_json()["shapes"]}
    for s in merged["shapes"]:
        u = expected[key_of(s)]
        assert s["count"] == u["count"] == 2 * N
        for name in ("p50", "p95", "p99", "min", "max"):
            assert s["latency_ms"][name] == u["latency_ms"][name], name
    assert plain.returncode == 0, plain.stderr
    print(plain.stdout)
    lines = plain.stdout.splitlines()
    assert lines[1].split()[:3] == ["total", "ms", "%"] and len(lines) == 2 + 3
    assert all(f"{db_name}.orders" in line and str(2 * N) in line.split() for line in lines[2:])
    # Without a terminal, `top` prints the plain table periodically (here twice, then stops).
    assert periodic.returncode == 0, periodic.stderr
    assert periodic.stdout.count("# digest since") == 2 and periodic.stdout.count("total ms") == 2


def test_top_names_an_unreachable_proxy_in_one_line():
    out = run_proxy_cli(["top", "--once", "--admin", "http://127.0.0.1:9"])
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "cannot read the digest of http://127.0.0.1:9" in out.stderr


def test_bad_digest_flag_is_one_line():
    out = run_proxy_cli(["run", "--proxy", "0:127.0.0.1:1", "--digest-max-shapes", "0"])
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--digest-max-shapes" in out.stderr


def _read_until(fd: int, needle: str, timeout: float = 15.0) -> str:
    import os
    import select

    seen = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{needle!r} not shown; the terminal got: {seen[-3000:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return seen.decode("utf-8", "replace")


def test_top_on_a_terminal_switches_sort_filters_shows_an_example_and_quits(secantus, db_name):
    import os
    import pty
    import subprocess
    import sys

    from tests.support.proxy import proxy_env
    from tests.support.system import REPO_ROOT

    with admin_proxy(secantus.address) as p:
        workload(p.uri, db_name, apps=("app-a",))
        wait_digest(p, f"/digest?ns={db_name}.orders", 3 * N)
        primary, secondary = pty.openpty()
        env = proxy_env({"COLUMNS": "200", "LINES": "40", "TERM": "xterm"})
        proc = subprocess.Popen(
            [sys.executable, "-m", "mongoproxy", "top", "--admin", p.admin_url, "--interval", "0.3"],
            stdin=secondary,
            stdout=secondary,
            stderr=secondary,
            env=env,
            cwd=str(REPO_ROOT),
        )
        os.close(secondary)
        try:
            _read_until(primary, "total ms ▼")
            os.write(primary, b"c")
            _read_until(primary, "count ▼")
            os.write(primary, b"n" + f"{db_name}.orders".encode() + b"\r")
            _read_until(primary, f"ns={db_name}.orders")
            os.write(primary, b"\r")  # the selected shape's example query
            _read_until(primary, '"?"')
            os.write(primary, b"q")
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(primary)


def test_digest_of_a_capture_without_mongodb_says_so_in_one_line(tmp_path):
    import dpkt

    path = tmp_path / "http.pcap"
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB)
        eth = dpkt.ethernet.Ethernet(
            data=dpkt.ip.IP(
                src=bytes([10, 0, 0, 1]),
                dst=bytes([10, 0, 0, 2]),
                p=6,
                data=dpkt.tcp.TCP(sport=40000, dport=80, data=b"GET / HTTP/1.1\r\n\r\n"),
            )
        )
        w.writepkt(bytes(eth), ts=1.0)
    out = run_proxy_cli(["digest", str(path)])
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "no MongoDB traffic" in out.stderr
    missing = run_proxy_cli(["digest", str(tmp_path / "none.pcapng")])
    assert missing.returncode == 2 and "no such file" in missing.stderr


def _sse_events(resp, want: int, timeout: float = 10.0) -> list[tuple[str, dict]]:
    """Read (event name, data) pairs from an open text/event-stream response until `want` arrived."""
    events: list[tuple[str, dict]] = []
    name, data = "message", ""
    deadline = time.monotonic() + timeout
    while len(events) < want and time.monotonic() < deadline:
        line = resp.fp.readline().decode()
        if line.startswith("event: "):
            name = line[7:].strip()
        elif line.startswith("data: "):
            data += line[6:].strip()
        elif line in ("\n", "\r\n") and data:
            events.append((name, json.loads(data)))
            name, data = "message", ""
    return events


def test_through_the_admin_endpoint_of_a_proxy_process(secantus, db_name, tmp_path):
    import http.client

    from tests.support.proxy import run_proxy_process

    token = tmp_path / "token"
    token.write_text("digest-token\n")
    args = ["--digest-max-shapes", "10", "--admin-token-file", str(token)]
    with run_proxy_process(args, upstream=secantus.address) as p:
        auth = {"Authorization": "Bearer digest-token"}

        def admin(method: str, path: str, headers=auth) -> tuple[int, str]:
            conn = http.client.HTTPConnection(p.admin_host, p.admin_port, timeout=10)
            try:
                conn.request(method, path, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.read().decode()
            finally:
                conn.close()

        assert admin("GET", "/digest", headers={})[0] == 401  # behind the admin's bearer token
        live = http.client.HTTPConnection(p.admin_host, p.admin_port, timeout=10)
        live.request("GET", "/live", headers=auth)
        stream = live.getresponse()
        assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        assert _sse_events(stream, 1)[0][0] == "hello"
        with p.client(appname="proc") as c:
            for i in range(50):  # 50 shapes through a table of 10
                c[db_name].orders.find_one({f"f{i}": i})
        deadline = time.monotonic() + 10
        while True:
            doc = json.loads(admin("GET", "/digest?sort=count")[1])
            kept = {s["example"] for s in doc["shapes"]}
            if (
                '{"find":"orders","filter":{"f49":"?"},"limit":"?","singleBatch":"?"}' in kept
                or time.monotonic() > deadline
            ):
                break
            time.sleep(0.05)
        assert len(doc["shapes"]) == 10 and doc["evictions"] >= 40
        finds = [s for s in doc["shapes"] if s["op"] == "find" and s["db"] == db_name]
        assert len(finds) >= 9 and all(s["app"] == "proc" and s["count"] == 1 for s in finds)
        metrics = admin("GET", "/metrics")[1]
        assert f"mongoproxy_digest_evictions_total {float(doc['evictions'])}" in metrics
        assert "mongoproxy_digest_shapes 10.0" in metrics
        # The stream carried the commands, redacted.
        commands = [d for name, d in _sse_events(stream, 20) if name == "command"]
        assert any(d["db"] == db_name and d["op"] == "find" for d in commands)
        assert all('f0":0' not in d["query"] for d in commands)
        live.close()
        # The page and its assets, from the package.
        status, page = admin("GET", "/")
        assert status == 200 and "Query digest" in page and admin("GET", "/ui/app.js")[0] == 200
        # top, with the token from a file; then reset through the endpoint.
        out = run_proxy_cli(
            [
                "top",
                "--once",
                "--json",
                "--admin",
                f"http://{p.admin_host}:{p.admin_port}",
                "--admin-token-file",
                str(token),
            ]
        )
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)["shapes"]) == 10
        assert admin("POST", "/digest/reset")[0] == 200
        assert all(s["db"] != db_name for s in json.loads(admin("GET", "/digest")[1])["shapes"])
