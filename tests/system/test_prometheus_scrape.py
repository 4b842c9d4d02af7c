"""A real Prometheus server (Debian's `prometheus`) scrapes the proxy's admin endpoint."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from tests.support.ports import free_port
from tests.support.proxy import run_proxy_process
from tests.support.system import require_tool

pytestmark = pytest.mark.timeout(240)


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _query(base: str, promql: str) -> list:
    data = _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert data["status"] == "success", data
    return data["data"]["result"]


def _wait(what: str, fn, proc: subprocess.Popen, log_path, timeout: float = 90.0):
    deadline = time.monotonic() + timeout
    last = None
    while True:
        if proc.poll() is not None:
            raise AssertionError(
                f"prometheus exited with {proc.returncode} while waiting for {what}:\n{log_path.read_text()[-4000:]}"
            )
        try:
            last = fn()
            if last:
                return last
        except (OSError, ValueError) as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what} (last: {last!r}); prometheus log:\n{log_path.read_text()[-4000:]}"
            )
        time.sleep(0.25)


def test_prometheus_sees_the_workload(secantus, db_name, tmp_path):
    prometheus = require_tool("prometheus")
    N, M = 4, 5
    with run_proxy_process([], upstream=secantus.address) as p:
        client = p.client(appname="obs-prom")
        try:
            db = client[db_name]
            db.items.insert_many([{"_id": i} for i in range(M)])
            for i in range(N):
                db.items.find_one({"_id": i})
            assert len(list(db.items.find({}, batch_size=2))) == M
        finally:
            client.close()

        web_port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: mongoproxy\n    scrape_interval: 1s\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{p.admin_port}']\n"
        )
        log_path = tmp_path / "prometheus.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{web_port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=tmp_path,
            )
        base = f"http://127.0.0.1:{web_port}"
        try:

            def ready():
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    return r.status == 200

            _wait("/-/ready", ready, proc, log_path)

            def counts():
                result = _query(base, f'sum by (op) (mongoproxy_response_latency_seconds_count{{db="{db_name}"}})')
                got = {r["metric"]["op"]: float(r["value"][1]) for r in result}
                return got if got.get("getMore") else None

            got = _wait("the workload's series", counts, proc, log_path)
            assert got == {"insert": 1.0, "find": N + 1.0, "getMore": float((M - 2 + 1) // 2)}

            def target_up():
                targets = _get_json(f"{base}/api/v1/targets")["data"]["activeTargets"]
                return [t for t in targets if t["health"] == "up"]

            (target,) = _wait("the target to be up", target_up, proc, log_path)
            assert target["labels"]["job"] == "mongoproxy" and target["lastError"] == ""
            info = _query(base, "mongoproxy_info")
            assert len(info) == 1 and info[0]["metric"]["mode"] == "static"
            apps = _query(base, f'count by (app, collection) (mongoproxy_documents_returned_count{{db="{db_name}"}})')
            assert {(r["metric"]["app"], r["metric"]["collection"]) for r in apps} == {("obs-prom", "items")}
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
