"""A `mongoproxy webhook` subprocess on a free loopback port, its certificates (trustme) and an HTTPS client."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.ports import free_port
from tests.support.proxy import proxy_env

REPO_ROOT = Path(__file__).resolve().parents[2]


class Certs:
    """A test CA and a serving certificate for 127.0.0.1 as PEM files; `rotate()` issues a new one.

    The files are laid out as the kubelet lays out a Secret volume: tls.crt -> ..data/tls.crt, and a
    rotation swaps the ..data symlink, so the certificate and its key change together.
    """

    def __init__(self, directory: Path) -> None:
        import trustme

        self.ca = trustme.CA()
        self.dir = directory
        self.cert_path = directory / "tls.crt"
        self.key_path = directory / "tls.key"
        self.serial = 0
        self.generation = 0
        self.rotate()

    def rotate(self) -> int:
        """Write a new serving certificate and key (each file replaced atomically); returns its serial number."""
        from cryptography import x509

        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        pem = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
        version = self.dir / f"..v{self.generation}"
        self.generation += 1
        version.mkdir()
        (version / "tls.crt").write_bytes(pem)
        (version / "tls.key").write_bytes(leaf.private_key_pem.bytes())
        tmp = self.dir / "..data_tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(version.name)
        os.replace(tmp, self.dir / "..data")
        for name in ("tls.crt", "tls.key"):
            if not (self.dir / name).is_symlink():
                (self.dir / name).symlink_to(f"..data/{name}")
        self.serial = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
        return self.serial

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the test CA."""
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


class WebhookProcess:
    """`python -m mongoproxy webhook` with the given certificates and extra arguments."""

    def __init__(self, certs: Certs, *args: str, config: Path | None = None) -> None:
        self.certs = certs
        self.port = free_port()
        self._dir = tempfile.mkdtemp(prefix="mongoproxy-webhook-")
        self.stderr_path = os.path.join(self._dir, "stderr.txt")
        self.args = [
            "--listen",
            f"127.0.0.1:{self.port}",
            "--tls-cert",
            str(certs.cert_path),
            "--tls-key",
            str(certs.key_path),
            *(["--config", str(config)] if config else []),
            *args,
        ]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> WebhookProcess:
        """Spawn it and wait until /readyz answers 200 over TLS."""
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mongoproxy", "webhook", *self.args],
                stdout=subprocess.DEVNULL,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=proxy_env({"PYTHONPATH": str(REPO_ROOT)}),
                cwd=str(REPO_ROOT),
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"webhook exited with {self.proc.returncode}:\n{self.stderr_text()[-3000:]}")
            try:
                if self.request("GET", "/readyz", timeout=1.0)[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"webhook not ready after {timeout}s:\n{self.stderr_text()[-3000:]}")
            time.sleep(0.05)

    def stderr_text(self) -> str:
        """What it logged so far."""
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def connection(self, timeout: float = 5.0) -> http.client.HTTPSConnection:
        """A new HTTPS connection that verifies the serving certificate against the test CA."""
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=self.certs.client_context())

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
        """(status, body) of one request on a new connection."""
        conn = self.connection(timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def review(self, review: dict[str, Any] | bytes) -> dict[str, Any]:
        """POST an AdmissionReview to /mutate; the response document (asserting HTTP 200)."""
        body = review if isinstance(review, bytes) else json.dumps(review).encode()
        status, data = self.request("POST", "/mutate", body)
        assert status == 200, data[:500]
        return json.loads(data)

    def metric(self, name: str, **labels: str) -> float | None:
        """Value of sample `name` with `labels` on /metrics (summed); None when absent."""
        from prometheus_client.parser import text_string_to_metric_families

        status, data = self.request("GET", "/metrics")
        assert status == 200
        total = None
        for family in text_string_to_metric_families(data.decode()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total = (total or 0.0) + s.value
        return total

    def stop(self) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
        return self.proc.returncode
