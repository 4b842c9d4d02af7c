"""Smoke test of the benchmark harness: `python -m benchmarks --quick` completes and writes valid JSON.

No thresholds: the figures depend on the machine. Only the shape of the
output is checked (every scenario ran, every goal was judged).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.support.system import REPO_ROOT

pytestmark = pytest.mark.timeout(240)


def test_quick_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)]
    png = tmp_path / "bench.png"
    plotting = importlib.util.find_spec("matplotlib") is not None
    if plotting:
        cmd += ["--plot", str(png)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    assert "Goals" in proc.stdout

    res = json.loads(out.read_text())
    assert res["quick"] is True
    sc = res["scenarios"]
    assert set(sc) == {"scanner", "hotpath", "memory", "driver", "tls"}
    variants = {"direct", "haproxy", "mongoproxy", "mongoproxy+log", "mongoproxy+trace"}
    for key in ("raw", "pymongo"):
        lat = sc["hotpath"][key]["latency"]
        assert set(lat) == variants
        assert all(0 < row["p50_us"] <= row["p99_us"] for row in lat.values())
    assert set(sc["hotpath"]["raw"]["cpu"]) == variants - {"direct"}
    assert set(sc["hotpath"]["large"]) == {"4MiB", "16MiB"}
    # every proxied command was observed by each mongoproxy variant's metrics
    requests = sc["hotpath"]["raw"]["requests_per_variant"]
    for name, check in sc["hotpath"]["checks"].items():
        assert check["commands_observed"] >= requests, (name, check)
    assert {c["case"] for c in sc["scanner"]["cases"]} >= {"find command", "4 MB reply"}
    assert set(sc["scanner"]["tap"]["mongoproxy"]) == {"bare_us", "metrics_us"}
    assert set(sc["memory"]) == {"mongoproxy", "haproxy"}
    assert set(sc["driver"]) == {"RunCommand", "FindOneByID", "SmallDocInsertOne", "FindManyAndEmptyCursor"}
    tls = sc["tls"]
    assert set(tls["summary"]) == {"direct", "haproxy", "mongoproxy", "mongoproxy_over_haproxy"}
    tls_requests = sum(r["raw"]["requests_per_variant"] for r in tls["repeats"])
    assert tls["commands_observed"] >= tls_requests  # the tap saw every command inside TLS
    assert [g["id"] for g in res["goals"]] == [f"P{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 5)]
    assert all(isinstance(g["met"], bool) for g in res["goals"] if g["id"] != "T4")
    if plotting:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_coldpass_quick_run_measures_every_row_and_both_passes():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.coldpass", "--quick"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-4000:]
    from benchmarks.coldpass import ROWS

    rows = [line.split(" | ")[0].lstrip("| ") for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [label for label, _, _ in ROWS] == rows[1 : 1 + len(ROWS)]
    assert rows[len(ROWS) + 2 :] == ["tap", "+metrics", "+digest"]
