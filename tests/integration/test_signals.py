"""Signals: SIGHUP reloads (command log reopened for rotation, admin token re-read) and never kills; SIGTERM
exits within --drain-seconds plus the documented shutdown margin even when a sink is stuck."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time

import pytest

from mongoproxy.shutdown import SHUTDOWN_MARGIN_SECONDS
from tests.support.proxy import run_proxy_process


def _get(p, path: str, token: str | None = None) -> int:
    import http.client

    conn = http.client.HTTPConnection(p.admin_host, p.admin_port, timeout=5)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        return conn.getresponse().status
    finally:
        conn.close()


def _wait(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_sighup_reopens_the_log_rereads_the_token_and_keeps_running(secantus, tmp_path):
    log_path = tmp_path / "commands.log"
    token = tmp_path / "token"
    token.write_text("first")
    args = ["--log-file", str(log_path), "--admin-token-file", str(token)]
    with run_proxy_process(args, upstream=secantus.address) as p:
        assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o600
        with p.client() as client:
            client.admin.command("ping")
            _wait(lambda: "ping" in log_path.read_text(), "the first ping in the log")
            os.rename(log_path, tmp_path / "commands.log.1")  # what logrotate does
            token.write_text("second")
            p.send_signal(signal.SIGHUP)
            _wait(lambda: log_path.exists(), "the log reopened under its name")
            client.admin.command("ping")
            _wait(lambda: "ping" in log_path.read_text(), "the second ping in the new log")
        p.send_signal(signal.SIGHUP)  # again: still alive
        time.sleep(0.3)
        assert p.poll() is None
        assert stat.S_IMODE(os.stat(log_path).st_mode) == 0o600
        assert (tmp_path / "commands.log.1").read_text().count("ping") == 1
        assert _get(p, "/metrics", "first") == 401
        assert _get(p, "/metrics", "second") == 200
        assert _get(p, "/healthz") == 200
        assert "SIGHUP received" in p.stderr_text()


def test_shutdown_fits_drain_plus_margin_with_a_stuck_sink(secantus, tmp_path):
    """The command log writes into a pipe nobody reads: SIGTERM still exits within drain + margin."""
    fifo = tmp_path / "stuck.log"
    os.mkfifo(fifo)
    reader_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # held open, never read: writes block once it is full
    drain = 1.0
    try:
        with run_proxy_process(
            ["--log-file", str(fifo), "--drain-seconds", str(drain)], upstream=secantus.address, check_exit=False
        ) as p:
            with p.client() as client:
                stop = threading.Event()

                def load():
                    while not stop.is_set():
                        client.admin.command("ping", comment="x" * 200)

                t = threading.Thread(target=load, daemon=True)
                t.start()
                time.sleep(3)  # far more than the pipe (64 KiB) and the writer's buffer hold
                stop.set()
                t.join(10)
            started = time.monotonic()
            p.send_signal(signal.SIGTERM)
            limit = drain + SHUTDOWN_MARGIN_SECONDS + 3
            try:
                rc = p.wait(timeout=limit)
            except Exception:
                pytest.fail(f"the proxy was still running {limit}s after SIGTERM:\n{p.stderr_text()[-3000:]}")
            took = time.monotonic() - started
            print(f"exit {rc} {took:.2f}s after SIGTERM (drain {drain}s, margin {SHUTDOWN_MARGIN_SECONDS}s)")
            assert rc == 0
            assert "still closing after the" in p.stderr_text()
    finally:
        os.close(reader_fd)
