"""`replay --verify` (divergences and the exit status) and `replay --scale` (copies, their cursors, the sweep).

The sweep's report, table and plot are kept in test-artifacts/replay-scale/.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.integration.test_capture_replay import run_workload, snapshot
from tests.integration.test_mirror import DB, reads, seed
from tests.support.proxy import run_proxy_cli, run_proxy_process
from tests.support.secantus import SecantusServer
from tests.support.system import REPO_ROOT

ARTIFACTS = REPO_ROOT / "test-artifacts" / "replay-scale"


def replay(*args, timeout: float = 300.0):
    return run_proxy_cli(["replay", *map(str, args)], timeout=timeout)


@pytest.fixture(scope="module")
def read_recording(tmp_path_factory):
    """Reads (finds with getMores, aggregates, counts, distinct) recorded against seeded data; (directory, server)."""
    directory = tmp_path_factory.mktemp("reads")
    with SecantusServer() as primary:
        with primary.client() as c:
            seed(c)
        with run_proxy_process(["--record", str(directory)], upstream=primary.address) as proxy:
            with proxy.client() as client:
                for _ in range(2):
                    reads(client)
                    time.sleep(0.3)
    return str(directory)


def test_verify_a_write_workload_against_a_fresh_server_finds_nothing(secantus, tmp_path):
    rec = tmp_path / "rec"
    rec.mkdir()
    db_name = f"verify_{os.getpid()}"
    with run_proxy_process(["--record", str(rec)], upstream=secantus.address) as proxy:
        with proxy.client() as client:
            run_workload(client, db_name)
    with SecantusServer() as target:
        done = replay(
            rec, "--target", target.uri, "--max-speed", "--verify", "documents", "--report", tmp_path / "r.json"
        )
        assert done.returncode == 0, done.stdout + done.stderr
        with secantus.client() as source, target.client() as replayed:
            assert snapshot(replayed, db_name) == snapshot(source, db_name)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verify"] == "documents" and report["divergences_total"] == 0 and report["divergences"] == []
    assert report["replayed"]["operations"] > 15
    assert "divergences (documents): 0" in done.stdout


def test_verify_names_the_missing_document_and_gates_on_max_divergences(read_recording, tmp_path):
    with SecantusServer() as copy, SecantusServer() as missing:
        with copy.client() as c, missing.client() as m:
            seed(c)
            seed(m)
            m[DB].items.delete_one({"_id": 7})
        same = replay(read_recording, "--target", copy.uri, "--max-speed", "--verify", "documents")
        assert same.returncode == 0, same.stdout + same.stderr
        assert "divergences (documents): 0" in same.stdout
        report_path = tmp_path / "missing.json"
        args = (read_recording, "--target", missing.uri, "--max-speed", "--verify", "documents")
        gated = replay(*args, "--report", report_path)
        allowed = replay(*args, "--max-divergences", "1000")
    (ARTIFACTS.parent / "replay-verify").mkdir(parents=True, exist_ok=True)
    (ARTIFACTS.parent / "replay-verify" / "missing-document.txt").write_text(gated.stdout)
    print(gated.stdout)
    assert gated.returncode == 1, gated.stdout + gated.stderr
    assert "more than --max-divergences 0" in gated.stderr
    assert allowed.returncode == 0, allowed.stderr
    report = json.loads(report_path.read_text())
    rows = report["divergences"]
    assert rows and report["divergences_total"] == sum(r["count"] for r in rows)
    assert {r["ns"] for r in rows} == {f"{DB}.items"}
    assert {r["kind"] for r in rows} <= {"document_count", "documents"}
    assert any("missing _id 7" in r["example"] for r in rows), rows
    assert all(r["shape"] for r in rows) and "k1" not in json.dumps(rows)  # shapes carry no values


def test_verify_compares_an_unsorted_cursor_whole_not_batch_by_batch(tmp_path):
    docs = [{"_id": i, "kind": f"k{i % 3}"} for i in range(60)]
    rec = tmp_path / "rec"
    rec.mkdir()
    with SecantusServer() as primary:
        with primary.client() as p:
            p[DB].items.insert_many(docs)
        with run_proxy_process(["--record", str(rec)], upstream=primary.address) as proxy:
            with proxy.client() as client:
                assert len(list(client[DB].items.find({}, batch_size=20))) == 60
    with SecantusServer() as target:
        with target.client() as t:
            t[DB].items.insert_many(docs[::-1])  # the same documents in another natural order: other batches
        same = replay(rec, "--target", target.uri, "--max-speed", "--verify", "documents", "--report", tmp_path / "a")
        with target.client() as t:
            t[DB].items.update_one({"_id": 30}, {"$set": {"kind": "changed"}})
        changed = replay(
            rec, "--target", target.uri, "--max-speed", "--verify", "documents", "--report", tmp_path / "b"
        )
    assert same.returncode == 0, same.stdout + same.stderr
    report = json.loads((tmp_path / "a").read_text())
    assert report["divergences_total"] == 0 and report["documents_not_compared"] == 0
    assert report["replayed"]["operations"] >= 3  # the find and its getMores
    assert changed.returncode == 1, changed.stdout + changed.stderr
    rows = json.loads((tmp_path / "b").read_text())["divergences"]
    assert [(r["op"], r["kind"], r["count"]) for r in rows] == [("getMore", "documents", 1)], rows


def test_scale_runs_copies_with_their_own_cursors(read_recording, tmp_path):
    with SecantusServer() as copy:
        with copy.client() as c:
            seed(c)
        reports = {}
        for n in (1, 4):
            path = tmp_path / f"scale{n}.json"
            done = replay(
                read_recording,
                "--target",
                copy.uri,
                "--max-speed",
                "--scale",
                n,
                "--verify",
                "documents",
                "--report",
                path,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            reports[n] = json.loads(path.read_text())
        with copy.client() as c:
            assert c.admin.command("serverStatus")["metrics"]["cursor"]["open"]["total"] == 0
    one, four = reports[1], reports[4]
    assert four["replayed"]["operations"] == 4 * one["replayed"]["operations"]
    assert four["replayed"]["connections"] == 4 * one["replayed"]["connections"]
    assert four["replayed"]["cursors"] == 4 * one["replayed"]["cursors"] > 0
    counts = {(r["op"], r["ns"]): r["count"] for r in one["by_op"]}
    assert {(r["op"], r["ns"]): r["count"] for r in four["by_op"]} == {k: 4 * v for k, v in counts.items()}
    assert counts[("getMore", f"{DB}.items")] > 0
    # A getMore sent to another copy's cursor would fail or return that copy's remaining documents.
    for r in (one, four):
        assert r["replayed"]["errors"] == 0 and r["divergences_total"] == 0 and r["count_differences_total"] == 0


def test_scale_sweep_reports_and_plots_latency_against_load(read_recording, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    report_path, plot_path = ARTIFACTS / "sweep.json", ARTIFACTS / "scale-sweep.png"
    for p in (report_path, plot_path):
        if p.exists():
            p.unlink()
    with SecantusServer() as copy:
        with copy.client() as c:
            seed(c)
        done = replay(
            read_recording,
            "--target",
            copy.uri,
            "--speed",
            "1",
            "--scale",
            "1,2,4,8",
            "--report",
            report_path,
            "--plot",
            plot_path,
        )
    (ARTIFACTS / "sweep.txt").write_text(done.stdout)
    print(done.stdout)
    assert done.returncode == 0, done.stderr
    rows = json.loads(report_path.read_text())["scale_sweep"]
    assert [r["scale"] for r in rows] == [1, 2, 4, 8]
    base = rows[0]
    for r in rows:
        assert r["operations"] == r["scale"] * base["operations"] and r["errors"] == 0
        assert r["connections"] == r["scale"] * base["connections"]
        assert r["offered_ops_per_s"] > 0 and r["p50_ms"] is not None
    assert "scale sweep" in done.stdout and plot_path.stat().st_size > 5_000
