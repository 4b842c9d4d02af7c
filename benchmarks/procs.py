"""The processes a benchmark run starts: backend, haproxy, mongoproxy, OTLP sink, SecantusDB.

Each is a `Proc`: a subprocess with its listen port, CPU time and RSS read
from /proc, stopped (SIGTERM, then SIGKILL) when the run ends. Everything
binds to 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_nofile(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `want` (children inherit it); the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, want), hard) if hard != resource.RLIM_INFINITY else max(soft, want)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def _times_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of process `pid` (all its threads) in clock ticks: fields 14 and 15 of stat(5)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def cpu_ns(pid: int) -> int:
    """utime + stime of process `pid` (all its threads), in ns, from /proc/PID/stat."""
    return sum(_times_ticks(pid)) * 1_000_000_000 // CLK_TCK


def user_ns(pid: int) -> int:
    """utime of process `pid` (all its threads), in ns: the CPU it spent outside the kernel."""
    return _times_ticks(pid)[0] * 1_000_000_000 // CLK_TCK


def status_kb(pid: int, key: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM, ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (clear_refs 5); False when the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Proc:
    """One child process of the run."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        port: int,
        env: dict | None = None,
        stderr_path: str | None = None,
        cwd: str = REPO_ROOT,
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.port = port
        self.stderr_path = stderr_path
        err = open(stderr_path, "wb") if stderr_path else subprocess.DEVNULL
        self.popen = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env, cwd=cwd
        )
        if stderr_path:
            err.close()

    @property
    def pid(self) -> int:
        """Process id."""
        return self.popen.pid

    def cpu_ns(self) -> int:
        """CPU time used so far (user + system, all threads)."""
        return cpu_ns(self.pid)

    def rss_kb(self) -> int:
        """Resident set size now."""
        return status_kb(self.pid, "VmRSS")

    def read_ready(self, timeout: float) -> int:
        """Wait for the child's "ready PORT" line; the port."""
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.popen.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sel.select(max(0.0, deadline - time.monotonic())):
                line = self.popen.stdout.readline().decode()
                if line.startswith("ready "):
                    self.port = int(line.split()[1])
                    return self.port
                if not line:
                    break
        self.stop()
        raise RuntimeError(f"{self.name} did not start: {' '.join(self.cmd)}{self._tail()}")

    def wait_listening(self, timeout: float) -> None:
        """Wait until the port accepts TCP connections."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} is not listening on {self.port}: {' '.join(self.cmd)}{self._tail()}")

    def _tail(self) -> str:
        if not self.stderr_path:
            return ""
        try:
            with open(self.stderr_path, errors="replace") as f:
                return "\n" + f.read()[-2000:]
        except OSError:
            return ""

    def stderr_text(self) -> str:
        """What the child wrote to stderr (when it was captured)."""
        return self._tail().lstrip("\n")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def _env(extra: dict | None = None, root: str = REPO_ROOT) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MONGOPROXY_", "OTEL_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def start_backend(reply_size: int, workdir: str, tls: tuple[str, str] | None = None) -> Proc:
    """The scripted OP_MSG server (benchmarks.backend) in its own process; over TLS with tls=(cert, key)."""
    extra = ["--tls-cert", tls[0], "--tls-key", tls[1]] if tls else []
    p = Proc(
        "backend",
        [sys.executable, "-m", "benchmarks.backend", "--port", "0", "--reply-size", str(reply_size), *extra],
        0,
        _env(),
        os.path.join(workdir, "backend.err"),
    )
    p.read_ready(20)
    return p


def start_otlp_sink(workdir: str) -> Proc:
    """The discard-everything OTLP/HTTP endpoint (benchmarks.otlp_sink)."""
    p = Proc(
        "otlp-sink",
        [sys.executable, "-m", "benchmarks.otlp_sink", "--port", "0"],
        0,
        _env(),
        os.path.join(workdir, "otlp.err"),
    )
    p.read_ready(20)
    return p


HAPROXY_CONFIG = """\
global
    maxconn {maxconn}
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend bench
    bind 127.0.0.1:{listen}
    default_backend upstream
backend upstream
    server s1 127.0.0.1:{upstream}
"""


def start_haproxy(upstream: int, workdir: str, maxconn: int = 6000, tls: tuple[str, str] | None = None) -> Proc:
    """haproxy in TCP mode with its defaults otherwise (threads = CPUs, 16 KB buffers, no splicing).

    tls=(PEM holding certificate and key, CA file): terminate TLS (`bind ... ssl crt`) and originate it
    (`server ... ssl verify required ca-file`), with full handshakes to the server (`no-ssl-reuse`), as
    mongoproxy does.
    """
    if not os.path.exists(HAPROXY):
        raise RuntimeError("haproxy is not installed: apt-get install haproxy")
    listen = free_port()
    cfg = os.path.join(workdir, f"haproxy-{listen}.cfg")
    text = HAPROXY_CONFIG.format(maxconn=maxconn, listen=listen, upstream=upstream)
    if tls:
        text = text.replace(f"bind 127.0.0.1:{listen}", f"bind 127.0.0.1:{listen} ssl crt {tls[0]}")
        text = text.replace(
            f"server s1 127.0.0.1:{upstream}",
            f"server s1 127.0.0.1:{upstream} ssl verify required ca-file {tls[1]} verifyhost localhost no-ssl-reuse",
        )
    with open(cfg, "w") as f:
        f.write(text)
    p = Proc("haproxy", [HAPROXY, "-db", "-f", cfg], listen, _env(), os.path.join(workdir, f"haproxy-{listen}.err"))
    p.wait_listening(20)
    return p


def start_mongoproxy(
    name: str, upstream: int, workdir: str, args: tuple = (), env: dict | None = None, root: str = REPO_ROOT
) -> Proc:
    """`python -m mongoproxy run --proxy P:127.0.0.1:UPSTREAM --admin-port A ARGS...`, once /readyz says 200.

    `root`: the checkout whose mongoproxy runs (another one for a before/after comparison).
    """
    listen, admin = free_port(), free_port()
    cmd = [
        sys.executable,
        "-m",
        "mongoproxy",
        "run",
        "--proxy",
        f"{listen}:127.0.0.1:{upstream}",
        "--admin-port",
        str(admin),
        "--log-level",
        "warning",
        *args,
    ]
    p = Proc(
        name, cmd, listen, _env(env, root), os.path.join(workdir, f"{name.replace('+', '-')}-{listen}.err"), cwd=root
    )
    p.admin_port = admin  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if p.popen.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=0.5) as r:
                if r.status == 200:
                    return p
        except (OSError, urllib.error.HTTPError):
            time.sleep(0.05)
    p.stop()
    raise RuntimeError(f"mongoproxy ({name}) did not become ready: {' '.join(cmd)}{p._tail()}")


def start_secantus(workdir: str) -> Proc:
    """SecantusDB in memory (`python -m secantus --port P --storage-path :memory:`)."""
    port = free_port()
    p = Proc(
        "secantus",
        [sys.executable, "-m", "secantus", "--port", str(port), "--storage-path", ":memory:"],
        port,
        _env(),
        os.path.join(workdir, "secantus.err"),
    )
    p.wait_listening(60)
    return p


def make_workdir() -> str:
    """A temporary directory for configs, logs and stderr captures."""
    return tempfile.mkdtemp(prefix="mongoproxy-bench-")
