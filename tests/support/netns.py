"""Test hosts in a network namespace: the transparent-mode tests' namespace, iptables REDIRECT and the proxy's uid.

The namespace itself is the `netns` fixture in tests/system/conftest.py.
"""

import subprocess
import sys
import time

PROXY_UID = 9999
SERVER_V4 = "10.213.0.2"  # exists only inside the test's namespace
SERVER_V6 = "fd42:213::2"


def sh(*cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def in_ns(ns, *cmd):
    return ["ip", "netns", "exec", ns, *cmd]


def as_proxy_user(*cmd):
    # The interpreter may live under a root-only home: keep only the right to traverse directories.
    return [
        "setpriv",
        f"--reuid={PROXY_UID}",
        f"--regid={PROXY_UID}",
        "--clear-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
        *cmd,
    ]


def wait_port_in_ns(ns, host, port, timeout=30):
    deadline = time.monotonic() + timeout
    probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=0.5).close()"
    while time.monotonic() < deadline:
        # Probing as the proxy's uid bypasses the REDIRECT rule, so the probe reaches the real port.
        if subprocess.run(in_ns(ns, *as_proxy_user(sys.executable, "-c", probe)), capture_output=True).returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"{host}:{port} did not open in {ns}")


def redirect_rule(dst: str, dport: int, to_port: int = 27111) -> list[str]:
    """The nat OUTPUT rule that sends dst:dport to the proxy, except the proxy's own (PROXY_UID) connections."""
    return [
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        dst,
        "--dport",
        str(dport),
        "-m",
        "owner",
        "!",
        "--uid-owner",
        str(PROXY_UID),
        "-j",
        "REDIRECT",
        "--to-ports",
        str(to_port),
    ]
