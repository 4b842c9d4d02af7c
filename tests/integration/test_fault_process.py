"""A proxy process with --allow-faults --faults FILE: the drill as the command log prints it, the counter on
/metrics, the file re-read on SIGHUP (a bad file keeps the previous rules and says why), and start-up mistakes."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pymongo

from tests.support.proxy import run_proxy_cli, run_proxy_process

FAILOVER = """
[[rule]]
name = "failover"
op = "insert"
ns = "{db}.*"
action = "error"
code = 91
labels = ["RetryableWriteError"]
max_count = 1
"""


def wait_for(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_retryable_write_drill_in_the_command_log(secantus, db_name, tmp_path):
    rules = tmp_path / "drill.toml"
    rules.write_text(FAILOVER.format(db=db_name))
    log_file = tmp_path / "commands.log"
    args = ["--allow-faults", "--faults", str(rules), "--log-file", str(log_file), "--log-ops", "insert,find"]
    with run_proxy_process(args, upstream=secantus.address) as proxy:
        uri = proxy.uri + "&appName=shop-api&heartbeatFrequencyMS=500"
        with pymongo.MongoClient(uri, retryWrites=True, serverSelectionTimeoutMS=10000) as c:
            c[db_name].orders.insert_one({"_id": 1, "item": "book"})
            assert list(c[db_name].orders.find({})) == [{"_id": 1, "item": "book"}]
        lines = wait_for(
            lambda: [ln for ln in log_file.read_text().splitlines() if " find " in ln], "the find in the log"
        )
        text = log_file.read_text()
        print(text)
        inserts = [ln for ln in text.splitlines() if " insert " in ln]
        assert len(inserts) == 2 and lines
        assert "91 ShutdownInProgress" in inserts[0] and inserts[0].endswith("fault=failover")
        assert " ok" in inserts[1] and "fault=" not in inserts[1]
        metric = proxy.metric("mongoproxy_faults_injected_total", rule="failover", action="error")
        assert metric == 1.0
        print([ln for ln in proxy.metrics_text().splitlines() if "faults_injected" in ln])


def test_json_log_and_sighup_reload(secantus, db_name, tmp_path):
    rules = tmp_path / "drill.yaml"
    rules.write_text(f"- name: no-find\n  op: find\n  ns: {db_name}.*\n  action: error\n  code: 50\n")
    log_file = tmp_path / "commands.jsonl"
    args = ["--allow-faults", "--faults", str(rules), "--log-file", str(log_file), "--log-format", "json"]
    with run_proxy_process(args, upstream=secantus.address) as proxy:
        with pymongo.MongoClient(proxy.uri, serverSelectionTimeoutMS=10000) as c:
            try:
                c[db_name].things.find_one({})
            except pymongo.errors.ExecutionTimeout:
                pass
            else:
                raise AssertionError("the find was not failed")
            bad = "- name: no-find\n  op: find\n  action: error\n  code: 50\n  percentage: 150\n"
            rules.write_text(bad)
            proxy.send_signal(signal.SIGHUP)
            wait_for(lambda: "percentage must be from 0 to 100, got 150" in proxy.stderr_text(), "the reason")
            assert "keeping the previous 1 rule(s)" in proxy.stderr_text()
            try:
                c[db_name].things.find_one({})
            except pymongo.errors.ExecutionTimeout:
                pass
            else:
                raise AssertionError("the previous rule was dropped")
            rules.write_text("[]\n")
            proxy.send_signal(signal.SIGHUP)
            wait_for(lambda: "loaded: 0 rule(s)" in proxy.stderr_text(), "the emptied file")
            assert c[db_name].things.find_one({}) is None
        records = wait_for(
            lambda: (
                [json.loads(ln) for ln in log_file.read_text().splitlines() if '"op":"find"' in ln][:3]
                if log_file.read_text().count('"op":"find"') >= 3
                else None
            ),
            "three finds",
        )
    assert [r["fault"] for r in records] == ["no-find", "no-find", None]
    assert [r["code_name"] for r in records[:2]] == ["MaxTimeMSExpired"] * 2


def test_faults_file_without_allow_faults_is_one_line(tmp_path):
    rules = tmp_path / "drill.toml"
    rules.write_text('[[rule]]\nname = "x"\naction = "close"\n')
    res = run_proxy_cli(["run", "--proxy", "0:127.0.0.1:1", "--faults", str(rules)])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"mongoproxy: error: --faults {rules} needs --allow-faults: fault injection is off unless explicitly allowed"
    ]
    rules.write_text('[[rule]]\nname = "x"\naction = "teleport"\n')
    res = run_proxy_cli(["run", "--proxy", "0:127.0.0.1:1", "--allow-faults", "--faults", str(rules)])
    assert res.returncode == 2 and "action 'teleport' is not known" in res.stderr and "Traceback" not in res.stderr


def test_the_cli_through_the_real_admin_endpoint(secantus, db_name, tmp_path):
    token = tmp_path / "token"
    token.write_text("drill-token-123\n")
    token.chmod(0o600)
    with run_proxy_process(["--allow-faults", "--admin-token-file", str(token)], upstream=secantus.address) as proxy:
        url = f"http://127.0.0.1:{proxy.admin_port}"
        auth = ["--admin", url, "--admin-token-file", str(token)]
        add = ["fault", "add", "orders-errors", "--op", "insert", "--ns", f"{db_name}.orders", "--error", "91"]
        res = run_proxy_cli([*add, "--label", "RetryableWriteError", "--max-count", "1", "--duration", "10m", *auth])
        assert res.returncode == 0, res.stderr
        with pymongo.MongoClient(proxy.uri, retryWrites=False, serverSelectionTimeoutMS=10000) as c:
            try:
                c[db_name].orders.insert_one({"_id": 1})
            except pymongo.errors.NotPrimaryError as exc:
                assert exc.details["code"] == 91
            else:
                raise AssertionError("the insert was not failed")
        listing = run_proxy_cli(["fault", "list", *auth])
        print(listing.stdout)
        assert listing.returncode == 0
        row = listing.stdout.splitlines()[1].split()
        assert row[:2] == ["orders-errors", "error"] and row[-2:] == ["1/1", "done"]
        req = urllib.request.Request(url + "/metrics", headers={"Authorization": "Bearer drill-token-123"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            metrics = resp.read().decode()
        assert 'mongoproxy_faults_injected_total{action="error",rule="orders-errors"} 1.0' in metrics
        no_token = run_proxy_cli(["fault", "list", "--admin", url])
        assert no_token.returncode == 2 and "401" in no_token.stderr
        bad = run_proxy_cli(["fault", "add", "x", "--action", "close", "--percentage", "150", *auth])
        assert bad.returncode == 2
        assert (
            bad.stderr.strip()
            == "mongoproxy: error: POST /faults: 400 rule x: percentage must be from 0 to 100, got 150"
        )
        assert run_proxy_cli(["fault", "rm", "orders-errors", *auth]).returncode == 0
        assert "no fault rules" in run_proxy_cli(["fault", "list", *auth]).stdout
        assert proxy.admin_get("/readyz")[0] == 200


def test_without_allow_faults_the_real_endpoint_answers_403(secantus):
    with run_proxy_process([], upstream=secantus.address) as proxy:
        status, body = proxy.admin_get("/faults")
        assert status == 403 and "--allow-faults" in body and body.count("\n") == 1
        res = run_proxy_cli(["fault", "list", "--admin", f"http://127.0.0.1:{proxy.admin_port}"])
        assert res.returncode == 2 and "403 fault injection is disabled" in res.stderr
