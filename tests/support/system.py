"""Requirements of system tests: skip with a reason that names the fix, or fail when CI demands them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Debian package that provides each tool, so a skip can say what to install.
APT_PACKAGES = {
    "tshark": "tshark",
    "tcpdump": "tcpdump",
    "haproxy": "haproxy",
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "iptables": "iptables",
    "ip6tables": "iptables",
    "ip": "iproute2",
    "ss": "iproute2",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "setpriv": "util-linux",
    "ps": "procps",
    "node": "nodejs",
}


def system_required() -> bool:
    """True when MONGOPROXY_REQUIRE_SYSTEM=1: a missing requirement is a failure, not a skip."""
    return os.environ.get("MONGOPROXY_REQUIRE_SYSTEM", "") == "1"


def unavailable(reason: str) -> NoReturn:
    """Skip the test with `reason`, or fail it when MONGOPROXY_REQUIRE_SYSTEM=1."""
    if system_required():
        pytest.fail(f"{reason} (MONGOPROXY_REQUIRE_SYSTEM=1 turns this skip into a failure)", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str, reason: str | None = None) -> str:
    """Absolute path of executable `name`, or skip/fail naming how to install it."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/usr/local/sbin/{name}") if os.access(p, os.X_OK)),
        None,
    )
    if path:
        return path
    if reason is None:
        pkg = APT_PACKAGES.get(name, name)
        reason = f"{name} not found: apt-get install {pkg}"
    unavailable(reason)


def require_root(reason: str | None = None) -> None:
    """Skip/fail unless running as root (uid 0)."""
    if os.geteuid() != 0:
        unavailable(reason or "needs root (uid 0): run the test suite as root, e.g. via .ci/run")


def require_netns() -> str:
    """Path of `ip` once it is known that network namespaces can be created here; skip/fail otherwise."""
    require_root("network namespaces need root: run the test suite as root, e.g. via .ci/run")
    ip = require_tool("ip")
    name = f"mpx-probe-{os.getpid()}"
    made = subprocess.run([ip, "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        unavailable(
            f"cannot create a network namespace ({made.stderr.strip() or 'ip netns add failed'}): "
            "run privileged (CAP_SYS_ADMIN, CAP_NET_ADMIN)"
        )
    subprocess.run([ip, "netns", "delete", name], capture_output=True)
    return ip


def require_ipv6_loopback() -> None:
    """Skip/fail unless ::1 can be bound."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        unavailable(f"IPv6 loopback ::1 unavailable ({exc}): enable IPv6 (sysctl net.ipv6.conf.lo.disable_ipv6=0)")


class NodeModules:
    """Where the npm test dependencies live."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.mongosh = str(root / ".bin" / "mongosh")
        self.mongodb = str(root / "mongodb")
        self.node = shutil.which("node") or "node"

    def env(self) -> dict[str, str]:
        """Environment for `node` scripts that `require('mongodb')`."""
        env = dict(os.environ)
        env["NODE_PATH"] = str(self.root)
        return env


def require_node_modules() -> NodeModules:
    """The repo's node_modules with mongosh and the mongodb driver, or skip/fail naming `npm install`."""
    if not shutil.which("node"):
        unavailable("node not found: apt-get install nodejs (v18+), then npm install --no-audit --no-fund")
    root = REPO_ROOT / "node_modules"
    mods = NodeModules(root)
    missing = [p for p in (mods.mongosh, str(Path(mods.mongodb) / "package.json")) if not os.path.exists(p)]
    if missing:
        unavailable(f"{', '.join(missing)} missing: run `npm install --no-audit --no-fund` in {REPO_ROOT}")
    return mods
