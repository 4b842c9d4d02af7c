"""A static upstream whose name does not resolve at start-up: the proxy serves unready, retries, and becomes ready
(and forwards) once the name resolves. The name comes from an /etc/hosts bind-mounted in the proxy's own mount
namespace, so the test changes resolution for the proxy alone."""

from __future__ import annotations

import http.client
import subprocess
import sys
import time

from tests.support.ports import free_port
from tests.support.proxy import proxy_env
from tests.support.system import REPO_ROOT, require_root, require_tool

NAME = "upstream-for-dns-test.invalid"


def _readyz(port: int) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/readyz")
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def test_unresolved_upstream_becomes_ready_when_its_name_resolves(tmp_path, secantus):
    require_root("a private mount namespace needs root")
    unshare = require_tool("unshare")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    listen, admin = free_port(), free_port()
    upstream_port = secantus.address[1]
    script = (
        f'mount --bind "{hosts}" /etc/hosts && exec "{sys.executable}" -m mongoproxy run '
        f"--proxy {listen}:{NAME}:{upstream_port} --admin-port {admin}"
    )
    err = open(tmp_path / "stderr.txt", "wb")
    proc = subprocess.Popen(
        [unshare, "--mount", "--propagation", "private", "sh", "-c", script],
        env={**proxy_env(), "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    try:
        deadline = time.monotonic() + 20
        while True:  # until the admin answers with the startup done ("starting" comes first on a busy machine)
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            try:
                status, body = _readyz(admin)
                if body.strip() != "starting":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.05)
        assert status == 503 and NAME in body
        with open(hosts, "r+") as f:  # in place: the bind mount follows the inode
            f.write(f"127.0.0.1 localhost\n127.0.0.1 {NAME}\n")
        deadline = time.monotonic() + 40  # the retry backoff is capped at 30 s
        while _readyz(admin)[0] != 200:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()
            time.sleep(0.2)
        import pymongo

        with pymongo.MongoClient(
            f"mongodb://127.0.0.1:{listen}/?directConnection=true", serverSelectionTimeoutMS=5000
        ) as c:
            assert c.admin.command("ping")["ok"] == 1.0
        assert "resolves now" in (tmp_path / "stderr.txt").read_text()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.close()
    assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()
