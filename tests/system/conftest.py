"""System-test fixtures: a network namespace whose loopback holds the "server host" addresses."""

import os

import pytest

from tests.support.netns import SERVER_V4, SERVER_V6, sh
from tests.support.system import require_netns, require_tool


@pytest.fixture
def netns():
    ip = require_netns()
    require_tool("iptables")
    require_tool("ip6tables")
    require_tool("setpriv")
    name = f"mpx-t{os.getpid()}"
    sh(ip, "netns", "add", name)
    try:
        sh(ip, "-n", name, "link", "set", "lo", "up")
        # The "server host" addresses live on the namespace's own loopback: nothing leaves it.
        sh(ip, "-n", name, "addr", "add", f"{SERVER_V4}/32", "dev", "lo")
        sh(ip, "-n", name, "addr", "add", f"{SERVER_V6}/128", "dev", "lo")
        yield name
    finally:
        sh(ip, "netns", "delete", name, check=False)
