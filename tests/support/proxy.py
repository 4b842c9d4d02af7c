"""Run `python -m mongoproxy run ...` as a subprocess for integration and system tests."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence

from .ports import free_port
from .system import REPO_ROOT

PORT = "{port}"  # in an argument: replaced by a fresh free port (each occurrence its own)
ADMIN_PORT = "{admin_port}"  # in an argument: replaced by the admin port chosen for this run

STDERR_TAIL = 8000  # characters of proxy stderr attached to a failure


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _flag_value(args: Sequence[str], flag: str) -> list[str]:
    out = []
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith(flag + "="):
            out.append(a.split("=", 1)[1])
    return out


def proxy_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ without inherited MONGOPROXY_* settings, plus `env`, unbuffered output."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("MONGOPROXY_")}
    out["PYTHONUNBUFFERED"] = "1"
    out.update(env or {})
    return out


class ProxyProcess:
    """A running `mongoproxy run` subprocess with its chosen ports and captured output."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: str) -> None:
        self.args = args
        self.env = env
        self.cwd = cwd
        self.listen_host = (_flag_value(args, "--listen-host") or ["127.0.0.1"])[-1]
        self.admin_host = (_flag_value(args, "--admin-host") or ["127.0.0.1"])[-1]
        self.admin_port = int(_flag_value(args, "--admin-port")[-1])
        heads = [spec.split(":", 1)[0] for spec in _flag_value(args, "--proxy")]
        self.ports = [int(h) for h in heads if h.isdigit()]  # malformed specs are the proxy's to reject
        self._dir = tempfile.mkdtemp(prefix="mongoproxy-test-")
        self.stdout_path = os.path.join(self._dir, "stdout.txt")
        self.stderr_path = os.path.join(self._dir, "stderr.txt")
        self.proc: subprocess.Popen | None = None
        self.waited = False

    @property
    def port(self) -> int:
        """The first listen port."""
        if not self.ports:
            raise AttributeError(f"no --proxy listen port in {self.args}")
        return self.ports[0]

    @property
    def address(self) -> tuple[str, int]:
        """(listen host, first listen port)."""
        return (self.listen_host, self.port)

    @property
    def uri(self) -> str:
        """mongodb:// URI of the first listener with directConnection=true."""
        return f"mongodb://{_bracket(self.listen_host)}:{self.port}/?directConnection=true"

    @property
    def pid(self) -> int:
        """Process id."""
        return self.proc.pid

    def client(self, **kwargs):
        """A pymongo MongoClient through the first listener (caller closes it)."""
        import pymongo

        kwargs.setdefault("serverSelectionTimeoutMS", 5000)
        return pymongo.MongoClient(self.uri, **kwargs)

    def start(self) -> ProxyProcess:
        """Spawn the process (does not wait for readiness)."""
        cmd = [sys.executable, "-m", "mongoproxy", "run", *self.args]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd
            )
        return self

    # ---- output
    def stderr_text(self) -> str:
        """Everything the proxy wrote to stderr so far."""
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def stdout_text(self) -> str:
        """Everything the proxy wrote to stdout so far."""
        with open(self.stdout_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    # ---- admin endpoint
    def admin_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """(status, body) of GET http://ADMIN_HOST:ADMIN_PORT/path."""
        conn = http.client.HTTPConnection(self.admin_host, self.admin_port, timeout=timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def metrics_text(self) -> str:
        """The /metrics body; AssertionError unless it answers 200."""
        status, body = self.admin_get("/metrics")
        assert status == 200, f"/metrics answered {status}: {body[:500]}"
        return body

    def metric(self, name: str, **labels: str) -> float | None:
        """Value of the sample `name` whose labels include `labels` (summed over matches); None if absent."""
        from prometheus_client.parser import text_string_to_metric_families

        total = None
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total = (total or 0.0) + s.value
        return total

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Block until /readyz answers 200; AssertionError with stderr if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self.waited = True
                raise AssertionError(
                    f"mongoproxy exited with {rc} before /readyz answered 200\n"
                    f"args: {self.args}\nstderr:\n{self.stderr_text()[-STDERR_TAIL:]}"
                )
            try:
                status, body = self.admin_get("/readyz", timeout=1.0)
                if status == 200:
                    return
                last = f"{status} {body[:200]!r}"
            except OSError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"mongoproxy /readyz not 200 after {timeout}s (last: {last})\n"
                    f"args: {self.args}\nstderr:\n{self.stderr_text()[-STDERR_TAIL:]}"
                )
            time.sleep(0.03)

    # ---- process control
    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to the proxy."""
        self.proc.send_signal(sig)

    def wait(self, timeout: float | None = 30.0) -> int:
        """Wait for exit and return the exit code (subprocess.TimeoutExpired after `timeout`)."""
        rc = self.proc.wait(timeout)
        self.waited = True
        return rc

    def poll(self) -> int | None:
        """Exit code, or None while running."""
        return self.proc.poll()

    def terminate(self, timeout: float = 30.0) -> tuple[int, bool]:
        """SIGTERM, then SIGKILL after `timeout`; returns (exit code, killed)."""
        if self.proc.poll() is not None:
            return self.proc.returncode, False
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout), False
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(), True

    def cleanup(self) -> None:
        """Remove the captured output files."""
        shutil.rmtree(self._dir, ignore_errors=True)


def prepare_args(args: Sequence[str], upstream: tuple[str, int] | None = None) -> list[str]:
    """Fill `{port}`/`{admin_port}` placeholders, add `--proxy {port}:UPSTREAM` and a free `--admin-port` if absent."""
    args = [str(a) for a in args]
    if upstream is not None and not _flag_value(args, "--proxy"):
        args += ["--proxy", f"{PORT}:{_bracket(upstream[0])}:{upstream[1]}"]
    listen_host = (_flag_value(args, "--listen-host") or ["127.0.0.1"])[-1]
    admin_host = (_flag_value(args, "--admin-host") or ["127.0.0.1"])[-1]
    admin = _flag_value(args, "--admin-port")
    admin_port = int(admin[-1]) if admin and admin[-1] != ADMIN_PORT else free_port(admin_host)
    out = []
    for a in args:
        while PORT in a:
            a = a.replace(PORT, str(free_port(listen_host)), 1)
        out.append(a.replace(ADMIN_PORT, str(admin_port)))
    if not admin:
        out += ["--admin-port", str(admin_port)]
    return out


@contextlib.contextmanager
def run_proxy_process(
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    upstream: tuple[str, int] | None = None,
    ready: bool = True,
    ready_timeout: float = 20.0,
    stop_timeout: float = 30.0,
    check_exit: bool = True,
    cwd: str | None = None,
) -> Iterator[ProxyProcess]:
    """Start `python -m mongoproxy run ARGS`, wait for /readyz 200, yield it; SIGTERM (then kill) on exit.

    - `{port}` in an argument becomes a free port; `upstream=(host, port)` adds `--proxy {port}:host:port`
      when no --proxy is given; a free --admin-port is added when absent.
    - Inherited MONGOPROXY_* variables are dropped; `env` adds to the environment.
    - On a failure inside the block the proxy's stderr is attached as an exception note and printed.
    - `check_exit`: unless the test waited for the exit itself, the proxy must still be running at the end
      and exit 0 on SIGTERM.
    """
    p = ProxyProcess(prepare_args(args, upstream), proxy_env(env), cwd or str(REPO_ROOT))
    p.start()
    failed = False
    try:
        if ready:
            p.wait_ready(ready_timeout)
        yield p
    except BaseException as exc:
        failed = True
        if hasattr(exc, "add_note") and "stderr:" not in str(exc):
            exc.add_note(f"mongoproxy args: {p.args}\nmongoproxy stderr:\n{p.stderr_text()[-STDERR_TAIL:]}")
        raise
    finally:
        died_early = p.proc.poll() is not None and not p.waited
        rc, killed = p.terminate(stop_timeout)
        text = p.stderr_text()
        sys.stderr.write(f"---- mongoproxy {' '.join(p.args)} (exit {rc}) stderr ----\n{text[-STDERR_TAIL:]}\n")
        p.cleanup()
        if check_exit and not failed and not p.waited:
            if died_early:
                raise AssertionError(f"mongoproxy exited with {rc} during the test\nstderr:\n{text[-STDERR_TAIL:]}")
            if killed:
                raise AssertionError(
                    f"mongoproxy ignored SIGTERM for {stop_timeout}s and was killed\nstderr:\n{text[-STDERR_TAIL:]}"
                )
            if rc != 0:
                raise AssertionError(
                    f"mongoproxy exited with {rc} after SIGTERM (expected 0)\nstderr:\n{text[-STDERR_TAIL:]}"
                )


def run_proxy_cli(
    args: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 30.0, cwd: str | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m mongoproxy ARGS` to completion (for --help and one-line error tests); text output."""
    return subprocess.run(
        [sys.executable, "-m", "mongoproxy", *map(str, args)],
        capture_output=True,
        text=True,
        env=proxy_env(env),
        cwd=cwd or str(REPO_ROOT),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
