"""Graceful drain: SIGTERM while a command is in flight still delivers its reply, refuses new connections, exits 0."""

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests.support import wire as tw
from tests.support.ports import free_port, wait_for_port
from tests.support.scripted_server import ScriptedServer


def start_proxy(upstream_port: int, *extra: str):
    port, admin = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mongoproxy",
            "run",
            "--proxy",
            f"{port}:127.0.0.1:{upstream_port}",
            "--admin-port",
            str(admin),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", admin, 20)
        wait_for_port("127.0.0.1", port, 20)
    except Exception:
        proc.kill()
        raise AssertionError(proc.communicate()[0].decode()) from None
    return proc, port, admin


def readyz(admin: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def recv_message(sock: socket.socket) -> bytes:
    head = b""
    while len(head) < 16:
        chunk = sock.recv(16 - len(head))
        assert chunk, "connection closed before a reply"
        head += chunk
    length = int.from_bytes(head[:4], "little")
    body = b""
    while len(body) < length - 16:
        chunk = sock.recv(length - 16 - len(body))
        assert chunk, "connection closed mid-reply"
        body += chunk
    return head + body


def test_sigterm_delivers_in_flight_reply_and_exits_zero():
    async def slow(conn):
        while True:
            msg = await conn.read_message()
            if msg is None:
                return
            await conn.sleep(1.0)
            await conn.reply(msg, {"ok": 1.0, "slow": True}, compress=None)

    with ScriptedServer(slow) as server:
        proc, port, admin = start_proxy(server.address[1], "--drain-seconds", "10")
        try:
            assert readyz(admin) == 200
            sock = socket.create_connection(("127.0.0.1", port))
            request = tw.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=77)
            sock.sendall(request)
            time.sleep(0.3)  # the command is now in flight at the server
            sent_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            assert readyz(admin) == 503
            try:  # new connections are refused while draining
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                refused = False
            except ConnectionRefusedError:
                refused = True
            assert refused
            reply = recv_message(sock)
            assert int.from_bytes(reply[8:12], "little") == 77  # responseTo
            assert b"slow" in reply
            assert sock.recv(1) == b""  # then the proxy closes the idle connection
            sock.close()
            rc = proc.wait(15)
            out = proc.stdout.read().decode()
            assert rc == 0, out
            assert time.monotonic() - sent_at < 9, "drain waited for its deadline instead of the reply"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_second_signal_forces_exit():
    async def never(conn):
        while await conn.read_message() is not None:
            pass  # never replies

    with ScriptedServer(never) as server:
        proc, port, admin = start_proxy(server.address[1], "--drain-seconds", "60")
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(tw.encode_op_msg({"ping": 1, "$db": "admin"}, request_id=1))
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert proc.poll() is None  # still draining: the request is in flight
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(10)
            assert rc != 0
            sock.close()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
