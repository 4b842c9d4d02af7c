"""Limits a sidecar needs: --max-connections, the open-files budget, EMFILE at accept, upstream DNS and connect."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import ssl
import struct
import subprocess
import sys
import time

import pytest

from mongoproxy.limits import ACCEPT_RETRY_SECONDS, RESERVED_FDS, install
from tests.support.inprocess import LOOP_KINDS, run, running_proxy
from tests.support.proxy import ProxyProcess, prepare_args, proxy_env
from tests.support.system import REPO_ROOT


def _silent_upstream() -> socket.socket:
    """A listener that never accepts: the kernel completes the proxy's connects from its backlog."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(512)
    return s


async def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def _reset(writer: asyncio.StreamWriter) -> None:
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _closed_by_peer(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_max_connections_refuses_at_accept_and_counts(loop_kind, caplog):
    """Past --max-connections a client is reset at once and counted; a freed slot admits the next one."""
    upstream = _silent_upstream()
    port = upstream.getsockname()[1]

    async def main():
        async with running_proxy(port, max_connections="2") as proxy:
            addr = ("127.0.0.1", proxy.ports[0])
            first = [await asyncio.open_connection(*addr) for _ in range(2)]
            await _wait_for(lambda: len(proxy.connections) == 2)
            refused_closed = True
            for _ in range(3):  # refused three times, logged once
                reader, writer = await asyncio.open_connection(*addr)
                refused_closed &= await _closed_by_peer(reader)
                writer.close()
            refused = proxy.limiter.refused
            _reset(first[0][1])  # a reset: the proxy keeps half-closed pairs open
            await _wait_for(lambda: len(proxy.connections) == 1)
            r4, w4 = await asyncio.open_connection(*addr)
            await _wait_for(lambda: len(proxy.connections) == 2)
            for _, w in (first[1], (r4, w4)):
                w.close()
            return refused_closed, refused, proxy.limiter.refused

    try:
        refused_closed, refused, refused_after = run(main(), loop_kind)
    finally:
        upstream.close()
    assert refused_closed
    assert refused == 3 and refused_after == 3
    assert sum("refusing a client" in r.getMessage() for r in caplog.records) == 1


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime in clock ticks (USER_HZ is 100 on Linux)


@contextlib.contextmanager
def _proxy_with_nofile(args: list[str], limit: int):
    """`mongoproxy run ARGS` started with RLIMIT_NOFILE (soft and hard) set to `limit`."""

    def low_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    p = ProxyProcess(prepare_args(args), proxy_env(), str(REPO_ROOT))
    with open(p.stdout_path, "wb") as out, open(p.stderr_path, "wb") as err:
        p.proc = subprocess.Popen(
            [sys.executable, "-m", "mongoproxy", "run", *p.args],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=p.env,
            cwd=p.cwd,
            preexec_fn=low_nofile,
        )
    try:
        p.wait_ready()
        yield p
    except BaseException as exc:
        exc.add_note(f"mongoproxy stderr:\n{p.stderr_text()[-4000:]}")
        raise
    finally:
        rc, killed = p.terminate(20)
        p.cleanup()
    assert rc == 0 and not killed


def _connect_many(port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() resets
        out.append(s)
    return out


def test_max_connections_fits_the_open_files_limit():
    """Under RLIMIT_NOFILE 120 the cap is lowered so that clients are refused and counted, not hit by EMFILE."""
    upstream = _silent_upstream()
    limit = 120
    fitted = (limit - RESERVED_FDS) // 2
    clients: list[socket.socket] = []
    try:
        with _proxy_with_nofile(["--proxy", f"{{port}}:127.0.0.1:{upstream.getsockname()[1]}"], limit) as p:
            assert f"serving at most {fitted} connections" in p.stderr_text()
            clients = _connect_many(p.port, fitted + 10)
            deadline = time.monotonic() + 10
            while (p.metric("mongoproxy_connections_refused_total") or 0) < 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert p.metric("mongoproxy_connections_refused_total", reason="max_connections") == 10
            assert p.metric("mongoproxy_connections_active") == fitted
            assert p.metric("mongoproxy_accept_errors_total", reason="emfile") == 0
    finally:
        upstream.close()
        for c in clients:
            c.close()


def test_emfile_at_accept_backs_off_and_recovers():
    """Open-files limit lowered under a running proxy: accepting fails with EMFILE; the proxy does not spin and
    serves again once descriptors are free."""
    upstream = _silent_upstream()
    clients: list[socket.socket] = []
    try:
        with _proxy_with_nofile(["--proxy", f"{{port}}:127.0.0.1:{upstream.getsockname()[1]}"], 1024) as p:
            in_use = len(os.listdir(f"/proc/{p.pid}/fd"))
            resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (in_use + 4, 1024))
            clients = _connect_many(p.port, 40)  # the kernel completes them from the backlog
            time.sleep(0.5)
            cpu_before, wall_before = _cpu_seconds(p.pid), time.monotonic()
            time.sleep(3)
            cpu = _cpu_seconds(p.pid) - cpu_before
            wall = time.monotonic() - wall_before
            print(f"proxy CPU while at EMFILE: {cpu:.2f}s over {wall:.2f}s")
            assert p.poll() is None
            assert cpu < 0.5 * wall  # a busy accept loop burns a whole core
            for c in clients:
                c.close()
            clients = []
            resource.prlimit(p.pid, resource.RLIMIT_NOFILE, (1024, 1024))
            time.sleep(1.5)  # past asyncio's accept retry delay
            clients = _connect_many(p.port, 3)
            deadline = time.monotonic() + 10
            while p.metric("mongoproxy_connections_active") != 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert p.metric("mongoproxy_connections_active") == 3
    finally:
        upstream.close()
        for c in clients:
            c.close()


def test_emfile_is_counted_and_rate_limited_on_asyncio(caplog):
    """On the asyncio loop an accept EMFILE reaches the limiter: counted, logged once, not once per retry."""
    upstream = _silent_upstream()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    async def main():
        async with running_proxy(upstream.getsockname()[1]) as proxy:
            from prometheus_client import CollectorRegistry

            install(proxy, CollectorRegistry(), asyncio.get_running_loop())
            clients = [socket.socket() for _ in range(10)]  # created before the limit drops
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
                for s in clients:
                    s.setblocking(False)
                    s.connect_ex(("127.0.0.1", proxy.ports[0]))  # needs no new descriptor here
                await asyncio.sleep(2.5)  # asyncio retries accepting after 1 s
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                for s in clients:
                    s.close()
            return dict(proxy.limiter.accept_errors)

    try:
        errors = run(main(), "asyncio")
    finally:
        upstream.close()
    assert errors.get("emfile", 0) >= 2
    lines = [r for r in caplog.records if "cannot accept a client" in r.getMessage()]
    assert len(lines) == 1


# ---- the TLS listener goes through the same limits ----


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from tests.support.tlscerts import make_pki

    return make_pki(str(tmp_path_factory.mktemp("pki")))


def _tls_flags(pki) -> dict:
    return {"tls_cert": [pki.server_cert], "tls_key": [pki.server_key]}


def _client_handshake_errors(proxy) -> float:
    from mongoproxy.tls import HANDSHAKE_REASONS

    registry = proxy.tls.registry
    return sum(
        registry.get_sample_value("mongoproxy_tls_handshake_errors_total", {"side": "client", "reason": r}) or 0
        for r in HANDSHAKE_REASONS
    )


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_tls_listener_refuses_over_max_connections_before_the_handshake(loop_kind, pki, caplog):
    """Past --max-connections a TLS client is reset at accept: no handshake is done for it, it is counted as a
    refusal (not as a handshake error), and a freed slot admits the next one."""
    upstream = _silent_upstream()
    ctx = ssl.create_default_context(cafile=pki.ca)

    async def tls_client(port: int):
        return await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 5
        )

    async def main():
        async with running_proxy(upstream.getsockname()[1], max_connections="2", **_tls_flags(pki)) as proxy:
            port = proxy.ports[0]
            first = [await tls_client(port) for _ in range(2)]
            await _wait_for(lambda: len(proxy.connections) == 2)
            outcomes = []
            for _ in range(2):
                try:
                    _, writer = await tls_client(port)
                    outcomes.append("handshake completed")
                    writer.close()
                except (OSError, EOFError) as exc:  # ssl.SSLError is an OSError
                    outcomes.append(type(exc).__name__)
            refused = proxy.limiter.refused
            _reset(first[0][1])
            await _wait_for(lambda: len(proxy.connections) == 1)
            _, w3 = await tls_client(port)
            await _wait_for(lambda: len(proxy.connections) == 2)
            await _wait_for(lambda: proxy.limiter.handshaking == 0)  # every admitted handshake is uncounted
            state = (refused, proxy.limiter.refused, _client_handshake_errors(proxy), proxy.limiter.handshaking)
            for w in (first[1][1], w3):
                w.close()
            return outcomes, state

    try:
        outcomes, (refused, refused_after, hs_errors, handshaking) = run(main(), loop_kind)
    finally:
        upstream.close()
    assert "handshake completed" not in outcomes, outcomes
    assert refused == 2 and refused_after == 2
    assert hs_errors == 0 and handshaking == 0
    assert sum("refusing a client" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("loop_kind", LOOP_KINDS)
def test_tls_listener_emfile_is_counted_rate_limited_and_backs_off(loop_kind, pki, caplog):
    """EMFILE on the TLS listener's accept is counted in mongoproxy_accept_errors_total, logged once, and retried
    after the shared pause (ACCEPT_RETRY_SECONDS), not in a tight loop; once descriptors are free it serves."""
    upstream = _silent_upstream()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    async def main():
        async with running_proxy(upstream.getsockname()[1], **_tls_flags(pki)) as proxy:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry()
            install(proxy, registry, asyncio.get_running_loop())
            clients = [socket.socket() for _ in range(10)]  # created before the limit drops
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
                started = time.monotonic()
                for s in clients:
                    s.setblocking(False)
                    s.connect_ex(("127.0.0.1", proxy.ports[0]))  # needs no new descriptor here
                await asyncio.sleep(2.5)
                elapsed = time.monotonic() - started
                errors = registry.get_sample_value("mongoproxy_accept_errors_total", {"reason": "emfile"})
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                for s in clients:
                    s.close()
            ctx = ssl.create_default_context(cafile=pki.ca)
            _, w = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", proxy.ports[0], ssl=ctx, server_hostname="localhost"), 10
            )
            await _wait_for(lambda: len(proxy.connections) == 1, 10)
            w.close()
            return errors, elapsed

    try:
        errors, elapsed = run(main(), loop_kind)
    finally:
        upstream.close()
    assert errors >= 2
    assert errors <= elapsed / ACCEPT_RETRY_SECONDS + 1  # one attempt per pause at most: no busy retry
    lines = [r for r in caplog.records if "cannot accept a client" in r.getMessage()]
    assert len(lines) == 1
