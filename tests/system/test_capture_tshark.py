"""Recordings open in tshark as MongoDB; a tcpdump capture of direct pymongo traffic replays like a recording."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

from mongoproxy.replay.extract import load
from tests.integration.test_capture_replay import run_workload, snapshot
from tests.support.proxy import run_proxy_cli, run_proxy_process
from tests.support.secantus import SecantusServer
from tests.support.system import require_root, require_tool

PI_WARN = 0x00600000  # Wireshark expert severities: comment 0x001, chat 0x002, note 0x004, warn 0x006, error 0x008


def tshark_fields(tshark: str, path: str, port: int, *fields: str, display_filter: str = "") -> list[list[str]]:
    cmd = [
        tshark,
        "-r",
        path,
        "-n",
        "-d",
        f"tcp.port=={port},mongo",
        "-T",
        "fields",
        "-E",
        "occurrence=f",
        "-E",
        "separator=\t",
    ]
    if display_filter:
        cmd += ["-Y", display_filter]
    for f in fields:
        cmd += ["-e", f]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [line.split("\t") for line in done.stdout.splitlines()]


def test_tshark_decodes_every_recorded_command_as_mongo(secantus, tmp_path):
    tshark = require_tool("tshark")
    directory = tmp_path / "rec"
    with run_proxy_process(["--record", str(directory)], upstream=secantus.address) as proxy:
        with proxy.client(appname="tshark-check") as client:
            run_workload(client, f"tshark_{os.getpid()}")
    [name] = os.listdir(directory)
    path = str(directory / name)
    port = secantus.port
    # What the file holds, by replay's own reading: every request, keyed by client port and request id.
    workload = load([path])
    expected = {(int(op.conn.label.split(" -> ")[0].rsplit(":", 1)[1]), op.request_id): op.op for op in workload.ops}
    assert len(expected) >= 20
    decoded = {}
    for src_port, request_id, response_to, opcode, first_element in tshark_fields(
        tshark,
        path,
        port,
        "tcp.srcport",
        "mongo.request_id",
        "mongo.response_to",
        "mongo.opcode",
        "mongo.element.name",
        display_filter="mongo",
    ):
        if int(response_to, 16) == 0:
            decoded[(int(src_port), int(request_id, 16))] = (int(opcode), first_element)
    missing = {k: v for k, v in expected.items() if k not in decoded}
    assert not missing, f"requests tshark did not decode as mongo: {missing}"
    for key, op in expected.items():
        assert decoded[key] == (2013, op) or (
            op.lower() in ("hello", "ismaster") and decoded[key][1].lower() in ("hello", "ismaster")
        ), (key, op, decoded[key])
    # No malformed packets, and TCP analysis finds nothing to warn about (no lost, out-of-order or unseen segments).
    for frame, severities, malformed in tshark_fields(
        tshark, path, port, "frame.number", "_ws.expert.severity", "_ws.malformed"
    ):
        assert not malformed, f"frame {frame} is malformed"
        for s in filter(None, severities.split(",")):
            assert int(s) < PI_WARN, f"frame {frame} has an expert warning or error"
    comments = tshark_fields(tshark, path, port, "frame.comment", display_filter="frame.comment")
    assert any('app "tshark-check"' in c[0] for c in comments)


class StderrLines:
    """Collects a process's stderr lines on a thread; wait_for() blocks until a line contains a string."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def wait_for(self, needle: str, timeout: float) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: self._done or any(needle in x for x in self.lines), timeout)
            if not ok or not any(needle in x for x in self.lines):
                raise AssertionError(f"tcpdump did not say {needle!r} within {timeout}s: {''.join(self.lines)}")

    def text(self) -> str:
        self._thread.join(10)
        return "".join(self.lines)


def test_tcpdump_capture_of_direct_traffic_replays_the_same_way(tmp_path):
    require_root("tcpdump needs root to capture on lo: run the test suite as root, e.g. via .ci/run")
    tcpdump = require_tool("tcpdump")
    db_name = f"tcpdump_{os.getpid()}"
    pcap = tmp_path / "direct.pcap"
    with SecantusServer() as source:
        # --immediate-mode: without it packets still in the kernel's ring block are lost at SIGINT.
        proc = subprocess.Popen(
            [
                tcpdump,
                "-i",
                "lo",
                "-n",
                "-U",
                "--immediate-mode",
                "-s",
                "0",
                "-Z",
                "root",
                "-w",
                str(pcap),
                f"tcp port {source.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        err = StderrLines(proc.stderr)
        try:
            err.wait_for("listening on", 20)
            with source.client(appname="direct") as client:
                run_workload(client, db_name)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(20)
        stats = err.text()
        assert "\n0 packets dropped by kernel" in stats, stats
        with SecantusServer() as target:
            done = run_proxy_cli(
                ["replay", str(pcap), "--target", target.uri, "--max-speed", "--report", str(tmp_path / "r.json")],
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            with source.client() as s, target.client() as t:
                assert snapshot(t, db_name) == snapshot(s, db_name)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["warnings"] == [] and report["new_errors"] == [] and report["count_differences_total"] == 0
    ops = {row["op"]: row["count"] for row in report["by_op"] if row["ns"] == f"{db_name}.orders"}
    assert ops["find"] == 3 and ops["getMore"] == 5 and ops["killCursors"] == 1 and ops["delete"] == 2
    assert report["skipped"]["handshake"] >= 2
