"""A proxy process with --allow-faults --faults FILE: the drill as the command log prints it, the counter on
/metrics, the file re-read on SIGHUP (a bad file keeps the previous rules and says why), and start-up mistakes."""

from __future__ import annotations

import json
import signal
import time

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
