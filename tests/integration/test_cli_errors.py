"""User mistakes get one line naming the fix and exit 2, never a traceback."""

import socket
import subprocess
import sys

import pytest

from tests.support.ports import free_port


def mongoproxy(*args, env=None, timeout=30):
    return subprocess.run(
        [sys.executable, "-m", "mongoproxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(res, needle):
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("27113:localhost", "use PORT (transparent mode) or PORT:HOST:PORT"),
        ("nope", "malformed"),
        ("27113:::1:27017", "put an IPv6 address in brackets"),
        ("99999", "out of range"),
    ],
)
def test_malformed_spec(spec, needle):
    one_line_error(mongoproxy("run", "--proxy", spec), needle)


def test_bare_proxy_flag_is_run_and_errors_the_same():
    one_line_error(mongoproxy("--proxy", "27113:localhost"), "malformed")


def test_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = one_line_error(
            mongoproxy("run", "--proxy", f"{port}:127.0.0.1:27017", "--admin-port", "0"), "already in use"
        )
    assert str(port) in line


def test_admin_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        admin = s.getsockname()[1]
        one_line_error(
            mongoproxy("run", "--proxy", f"{free_port()}:127.0.0.1:27017", "--admin-port", str(admin)),
            "choose another --admin-port",
        )


def test_duplicate_listen_port():
    port = free_port()
    one_line_error(
        mongoproxy("run", "--proxy", f"{port}:a:1", "--proxy", f"{port}:b:2"), f"listen port {port} is used by both"
    )


def test_no_listener_and_bad_env():
    one_line_error(mongoproxy("run"), "no listener")
    import os

    env = dict(os.environ, MONGOPROXY_DRAIN_SECONDS="soon")
    one_line_error(mongoproxy("run", "--proxy", "27113:a:1", env=env), "MONGOPROXY_DRAIN_SECONDS")


def test_unknown_flag():
    one_line_error(mongoproxy("run", "--proxy", "27113:a:1", "--frobnicate"), "unrecognized arguments")


def test_help_documents_every_core_flag():
    res = mongoproxy("run", "--help")
    assert res.returncode == 0
    for flag in (
        "--proxy",
        "--listen-host",
        "--admin-host",
        "--admin-port",
        "--drain-seconds",
        "--max-message-bytes",
        "--connect-timeout",
        "--verify-checksums",
        "--log-commands",
        "--metric-labels",
        "--latency-buckets",
    ):
        assert flag in res.stdout, flag
    assert "MONGOPROXY_DRAIN_SECONDS" in res.stdout


def test_second_listener_port_in_use_with_admin_on():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        one_line_error(
            mongoproxy(
                "run",
                "--proxy",
                f"{free_port()}:127.0.0.1:1",
                "--proxy",
                f"{port}:127.0.0.1:1",
                "--admin-port",
                str(free_port()),
            ),
            "already in use",
        )
