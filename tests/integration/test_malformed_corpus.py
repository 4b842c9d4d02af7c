"""The malformed-stream corpus (tests/malformed): forwarded unchanged, counted under its reason, never a stall.

One proxy process (with --verify-checksums) serves the whole corpus; each file gets its own connection, and
/metrics is read before and after it, so every count is exact.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mongoproxy import wire as mwire
from tests.malformed import generate
from tests.support import wire
from tests.support.proxy import run_proxy_process
from tests.support.scripted_server import ScriptedServer

pytestmark = pytest.mark.timeout(120)

CORPUS_DIR = Path(generate.__file__).resolve().parent
FILES = sorted(CORPUS_DIR.glob("*.bin"))
FATAL = frozenset({"bad_message_length", "message_too_large"})
IO_TIMEOUT = 10.0

# Request direction: a valid ping follows each non-EOF stream and must be answered.
PING = wire.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=99)
PING_REPLY = wire.encode_op_msg({"ok": 1.0}, request_id=9099, response_to=99)
# Reply direction: the client sends two pings; the malformed reply answers the first, a valid one the second.
PING1 = wire.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=generate.RID)
PING2 = wire.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=2)
PING2_REPLY = wire.encode_op_msg({"ok": 1.0}, request_id=9002, response_to=2)


@dataclass
class Case:
    path: Path
    direction: str
    reason: str
    slug: str

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()

    @property
    def at_eof(self) -> bool:
        return self.slug.endswith("-at-eof")

    @property
    def fatal(self) -> bool:
        return self.reason in FATAL

    @property
    def pings_observed(self) -> int:
        """Replies the proxy should match to a ping on this connection (the metric op="ping" latency count)."""
        if self.at_eof or self.fatal:
            return 0
        return 1 if self.direction == "request" else 2  # reply: the malformed one matches ping 1, too


def parse(path: Path) -> Case:
    direction, reason, slug, ext = path.name.split(".")
    assert direction in ("request", "reply") and ext == "bin", path.name
    return Case(path, direction, reason, slug)


CASES = [parse(p) for p in FILES]


def test_corpus_matches_its_generator_and_readme():
    assert {p.name for p in FILES} == set(generate.build()), "run `python -m tests.malformed.generate`"
    readme = (CORPUS_DIR / "README.md").read_text()
    undocumented = [p.name for p in FILES if f"`{p.name}`" not in readme]
    assert undocumented == []
    # Every category of bad input the issue lists is in the corpus.
    assert {
        "truncated",
        "message_too_large",
        "bad_message_length",
        "bad_length",
        "invalid_utf8",
        "bad_uncompressed_size",
        "unknown_compressor",
        "unknown_opcode",
    } <= {c.reason for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.path.name for c in CASES])
def test_scanner_reason_does_not_depend_on_chunking(case):
    data = case.data
    splits = [[len(data)], [1] * len(data)] + [[cut, len(data) - cut] for cut in range(1, len(data))]
    rng = random.Random(len(data))
    for _ in range(20):
        sizes, left = [], len(data)
        while left > 0:
            sizes.append(min(left, rng.randint(1, 24)))
            left -= sizes[-1]
        splits.append(sizes)
    for sizes in splits:
        errors, messages = [], []
        scanner = mwire.FrameScanner(
            case.direction == "reply",
            messages.append,
            lambda r, d, f: errors.append((r, f)),  # noqa: B023 - called within this iteration
            verify_checksums=True,
        )
        pos = 0
        for n in sizes:
            scanner.feed(data[pos : pos + n], pos)
            pos += n
        if case.at_eof:
            assert errors == [] and scanner.mid_message, sizes
        else:
            assert errors == [(case.reason, case.fatal)], sizes
            assert not scanner.mid_message


# ---------------------------------------------------------------- through the proxy process


class Script:
    """What the scripted server does on its next connection (the tests run one connection at a time)."""

    case: Case | None = None
    received: asyncio.Future | None = None


async def _read_to_eof(conn) -> bytes:
    out = bytearray()
    while True:
        chunk = await asyncio.wait_for(conn.read(), IO_TIMEOUT)
        if not chunk:
            return bytes(out)
        out += chunk


async def handler(conn) -> None:
    case = Script.case
    got = bytearray()
    try:
        if case.direction == "request" and case.at_eof:
            got += await _read_to_eof(conn)
        elif case.direction == "request":
            got += await asyncio.wait_for(conn.read_exactly(len(case.data) + len(PING)), IO_TIMEOUT)
            await conn.send_and_drain(PING_REPLY)
            got += await _read_to_eof(conn)
        elif case.at_eof:
            got += await asyncio.wait_for(conn.read_exactly(len(PING1)), IO_TIMEOUT)
            await conn.send_and_drain(case.data)
            await conn.close()
        else:
            got += await asyncio.wait_for(conn.read_exactly(len(PING1) + len(PING2)), IO_TIMEOUT)
            await conn.send_and_drain(case.data + PING2_REPLY)
            got += await _read_to_eof(conn)
    finally:
        if not Script.received.done():
            Script.received.set_result(bytes(got))


@pytest.fixture(scope="module")
def corpus_proxy():
    srv = ScriptedServer(handler).start()
    try:
        with run_proxy_process(["--verify-checksums"], upstream=srv.address) as p:
            yield p, srv
    finally:
        srv.stop()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes: the connection stalled or was cut")
        buf += chunk
    return bytes(buf)


def _recv_to_eof(sock: socket.socket) -> bytes:
    buf = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(buf)
        buf += chunk


class Metrics:
    def __init__(self, p) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.samples = [s for f in text_string_to_metric_families(p.metrics_text()) for s in f.samples]

    def get(self, name: str, **labels: str) -> float:
        return sum(
            s.value for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


def _wait_idle(p, closes: float) -> Metrics:
    deadline = time.monotonic() + IO_TIMEOUT
    while True:
        m = Metrics(p)
        if m.get("mongoproxy_connections_active") == 0 and m.get("mongoproxy_client_disconnections_total") >= closes:
            return m
        if time.monotonic() > deadline:
            raise AssertionError("the proxy did not see the connection close")
        time.sleep(0.02)


@pytest.mark.parametrize("case", CASES, ids=[c.path.name for c in CASES])
def test_forwarded_unchanged_counted_and_never_stalls(corpus_proxy, case):
    p, srv = corpus_proxy
    before = _wait_idle(p, 0)
    closes = before.get("mongoproxy_client_disconnections_total") + 1
    received: asyncio.Future = srv.call(lambda: asyncio.get_running_loop().create_future())
    Script.case, Script.received = case, received
    data = case.data

    with socket.create_connection(p.address, timeout=IO_TIMEOUT) as sock:
        if case.direction == "request" and case.at_eof:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            assert _recv_to_eof(sock) == b""
            sent_up = data
        elif case.direction == "request":
            sock.sendall(data + PING)
            assert _recv_exactly(sock, len(PING_REPLY)) == PING_REPLY  # the ping after the bad bytes is answered
            sent_up = data + PING
        elif case.at_eof:
            sock.sendall(PING1)
            assert _recv_to_eof(sock) == data
            sent_up = PING1
        else:
            sock.sendall(PING1 + PING2)
            assert _recv_exactly(sock, len(data) + len(PING2_REPLY)) == data + PING2_REPLY
            sent_up = PING1 + PING2
    at_server = srv.call(lambda: asyncio.wait_for(asyncio.shield(received), IO_TIMEOUT))
    assert at_server == sent_up  # forwarded unchanged (the client-side checks above cover the other direction)

    after = _wait_idle(p, closes)
    errors = "mongoproxy_decode_errors_total"
    delta = after.get(errors, direction=case.direction, reason=case.reason) - before.get(
        errors, direction=case.direction, reason=case.reason
    )
    total = after.get(errors) - before.get(errors)
    assert (delta, total) == (1, 1), f"{case.reason}: +{delta}, all reasons +{total}"
    lat = "mongoproxy_response_latency_seconds_count"
    pings = after.get(lat, op="ping") - before.get(lat, op="ping")
    assert pings == case.pings_observed  # scanning resumed after a per-message error, stopped after a fatal one
    # Once requests cannot be framed, the ping's reply has no request to match.
    unmatched = after.get("mongoproxy_unmatched_replies_total") - before.get("mongoproxy_unmatched_replies_total")
    assert unmatched == (1 if case.direction == "request" and case.fatal and not case.at_eof else 0)
    assert p.poll() is None
    assert p.admin_get("/healthz")[0] == 200
