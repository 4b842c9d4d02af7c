"""Transparent mode without a certificate: a TLS client reaches its server through the proxy, unobserved.

In a network namespace, as tests/system/test_transparent.py: an iptables REDIRECT sends the client's
connection to the proxy, which cannot open its TLS and forwards it untouched (passthrough).
"""

import json
import os
import signal
import subprocess
import sys

from tests.support.netns import SERVER_V4, as_proxy_user, in_ns, redirect_rule, sh, wait_port_in_ns
from tests.support.tlscerts import make_pki

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One TLS connection: insert, find, print the results, then stay open and idle until stdin closes.
CLIENT = r"""
import json, socket, ssl, struct, sys
import bson
ca, host = sys.argv[1], sys.argv[2]
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection((host, 27017), timeout=10), server_hostname=host)
def cmd(doc, rid=[0]):
    rid[0] += 1
    body = b"\x00\x00\x00\x00\x00" + bson.encode(doc)
    s.sendall(struct.pack("<iiii", 16 + len(body), rid[0], 0, 2013) + body)
    head = b""
    while len(head) < 16:
        head += s.recv(16 - len(head))
    n = struct.unpack("<i", head[:4])[0] - 16
    rest = b""
    while len(rest) < n:
        rest += s.recv(n - len(rest))
    return bson.decode(rest[5:])
out = [cmd({"insert": "c", "documents": [{"_id": sys.argv[3], "v": 1}], "$db": "pt"})["n"]]
out.append(cmd({"find": "c", "filter": {"_id": sys.argv[3]}, "$db": "pt"})["cursor"]["firstBatch"])
print(json.dumps(out), flush=True)
sys.stdin.read()  # idle, the connection open, until the test is done
"""


def metrics_in(ns):
    code = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9898/metrics').read().decode())"
    return subprocess.run(in_ns(ns, sys.executable, "-c", code), capture_output=True, text=True, timeout=30).stdout


def sample(text, name):
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_tls_passthrough_in_transparent_mode(netns, tmp_path):
    ns = netns
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(pki_dir, 0o755)
    pki = make_pki(str(pki_dir))
    cert, key = pki.issue("db", SERVER_V4)
    server_log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        in_ns(
            ns,
            sys.executable,
            "-m",
            "secantus",
            "--host",
            SERVER_V4,
            "--port",
            "27017",
            "--storage-path",
            ":memory:",
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
        ),
        stdout=server_log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    rule = redirect_rule(SERVER_V4, 27017)
    sh(*in_ns(ns, "iptables", *rule))
    proxy_log = tmp_path / "proxy.log"
    proxy = subprocess.Popen(
        in_ns(
            ns,
            *as_proxy_user(
                sys.executable,
                "-m",
                "mongoproxy",
                "run",
                "--proxy",
                "27111",
                "--admin-port",
                "9898",
                "--drain-seconds",
                "60",
                "--log-commands",
            ),
        ),
        stdout=subprocess.DEVNULL,
        stderr=open(proxy_log, "w"),
        cwd=REPO,
    )
    client = None
    try:
        wait_port_in_ns(ns, SERVER_V4, 27017)
        wait_port_in_ns(ns, "127.0.0.1", 9898)
        # Directly (as the proxy's uid, which the REDIRECT rule leaves alone), then through the proxy.
        direct = subprocess.run(
            in_ns(ns, *as_proxy_user(sys.executable, "-c", CLIENT, pki.ca, SERVER_V4, "direct")),
            input="",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert direct.returncode == 0, direct.stderr
        client = subprocess.Popen(
            in_ns(ns, sys.executable, "-c", CLIENT, pki.ca, SERVER_V4, "proxied"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proxied = client.stdout.readline()
        assert proxied, client.stderr.read() if client.poll() is not None else proxy_log.read_text()
        metrics = metrics_in(ns)
        # SIGTERM with the TLS connection idle: the drain closes it at once instead of waiting 60 s.
        proxy.send_signal(signal.SIGTERM)
        rc = proxy.wait(30)
    finally:
        if proxy.poll() is None:
            proxy.kill()
            proxy.wait(10)
        if client is not None:
            client.stdin.close()
            client.wait(30)
        server.terminate()
        server.wait(20)
        server_log.close()
    log_text = proxy_log.read_text()
    d, p = json.loads(direct.stdout), json.loads(proxied)
    assert d[0] == p[0] == 1 and [x["v"] for x in d[1]] == [x["v"] for x in p[1]] == [1]
    passthrough = sample(metrics, 'mongoproxy_tls_passthrough_connections_total{reason="no_certificate"}')
    decode_errors = sample(metrics, "mongoproxy_decode_errors_total")
    assert passthrough == 1 and decode_errors == 0, metrics
    assert sample(metrics, "mongoproxy_response_latency_seconds_count") == 0  # unobserved
    assert rc == 0 and "drained cleanly" in log_text, log_text
    assert "is TLS and cannot be opened (no_certificate)" in log_text
    print(
        "\n".join(
            [
                "passthrough run:",
                *[
                    line
                    for line in metrics.splitlines()
                    if "passthrough_connections_total" in line
                    or ("decode_errors_total" in line and not line.startswith("#") and "truncated" in line)
                ],
                f"decode errors (all reasons): {decode_errors:g}",
                *log_text.splitlines(),
            ]
        )
    )
