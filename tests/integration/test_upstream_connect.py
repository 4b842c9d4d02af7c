"""Upstream connects: DNS failing at start-up (serve unready and retry), --connect-timeout 0, rate-limited
warnings, and what `_connect` lets through."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.integration.test_faults import PING
from tests.support.inprocess import LOOP_KINDS, run, running_proxy
from tests.support.ports import free_port
from tests.support.proxy import run_proxy_process
from tests.support.system import REPO_ROOT

BAD_HOST = "no-such-host.invalid"


def test_unresolvable_static_upstream_starts_unready_and_counts_clients():
    """Like Envoy's STRICT_DNS: the process serves, /healthz 200, /readyz 503, clients get a counted dns error."""
    with run_proxy_process(["--proxy", f"{{port}}:{BAD_HOST}:27017"], ready=False) as p:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _ = p.admin_get("/healthz", timeout=1)
                break
            except OSError:
                assert p.poll() is None, p.stderr_text()
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert status == 200
        status, body = p.admin_get("/readyz")
        assert status == 503 and BAD_HOST in body
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
                s.sendall(PING)
                s.settimeout(10)
                try:
                    assert s.recv(1) == b""
                except ConnectionResetError:
                    pass
        deadline = time.monotonic() + 10
        while (p.metric("mongoproxy_upstream_connect_errors_total", reason="dns") or 0) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(2.5)  # at least one retry of the start-up resolution has run
        assert p.poll() is None
        text = p.stderr_text()
        # One start-up line and one per-connection line: the rest are suppressed for a minute.
        assert text.count("cannot resolve upstream host") == 1, text
        assert text.count("cannot reach upstream") == 1, text


def test_connect_timeout_zero_means_no_timeout():
    """--connect-timeout 0 waits for the kernel: an unanswered SYN is still pending after 2 s, with no error."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue; later SYNs are dropped and retried by the kernel
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.2)

        async def main():
            async with running_proxy(port, connect_timeout="0") as proxy:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
                writer.write(PING)
                await asyncio.sleep(2)
                pending = [c for c in proxy.connections if c.upstream is None and not c.closed]
                errors = list(proxy.sink.upstream_errors)
                writer.close()
                return len(pending), errors

        pending, errors = run(main(), "asyncio")
    finally:
        for s in fillers:
            s.close()
        listener.close()
    assert pending == 1
    assert errors == []


SYSTEM_EXIT_SCRIPT = """
import asyncio, socket, sys
from tests.support.inprocess import run, running_proxy
from tests.support.ports import free_port

async def main():
    loop = asyncio.get_running_loop()

    async def exiting(*args, **kwargs):
        raise SystemExit(3)

    loop.create_connection = exiting  # the proxy's upstream connect
    async with running_proxy(free_port(), connect_timeout=sys.argv[2]) as proxy:
        client = socket.socket()  # not through the loop, whose create_connection is replaced
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", proxy.ports[0]))
        await asyncio.sleep(0.5)
        print("still running; upstream errors:", [e.reason for e in proxy.sink.upstream_errors])

run(main(), sys.argv[1])
"""


@pytest.mark.parametrize("loop_kind", ["asyncio"])
@pytest.mark.parametrize("connect_timeout", ["10", "0"])
def test_connect_lets_system_exit_through(loop_kind, connect_timeout):
    """SystemExit while connecting is not an upstream error: it ends the process (exit code 3 here)."""
    r = subprocess.run(
        [sys.executable, "-c", SYSTEM_EXIT_SCRIPT, loop_kind, connect_timeout],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert r.returncode == 3, r.stdout + r.stderr
    assert "still running" not in r.stdout


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_upstream_warnings_are_rate_limited(loop_kind, caplog):
    """A dead upstream costs one warning a minute, not one per client; every failure is still counted."""
    dead = free_port()

    async def main():
        async with running_proxy(dead) as proxy:
            for _ in range(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
                try:
                    await asyncio.wait_for(reader.read(), 5)
                except ConnectionResetError:
                    pass
                writer.close()
            return [e.reason for e in proxy.sink.upstream_errors]

    with caplog.at_level("WARNING", logger="mongoproxy"):
        reasons = run(main(), loop_kind)
    assert reasons == ["refused"] * 5
    assert sum("cannot reach upstream" in r.getMessage() for r in caplog.records) == 1
