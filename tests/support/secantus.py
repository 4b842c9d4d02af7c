"""A SecantusDB server in a subprocess: `python -m secantus --storage-path :memory:` on a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

from .ports import free_port


class SecantusServer:
    """One SecantusDB subprocess; start() waits for `ping`, stop() sends SIGTERM then kills."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self._tmpdir = tempfile.TemporaryDirectory(prefix="secantus-")
        self.log_path = os.path.join(self._tmpdir.name, "secantus.log")

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to connect to."""
        return (self.host, self.port)

    @property
    def uri(self) -> str:
        """A mongodb:// URI with directConnection=true."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mongodb://{host}:{self.port}/?directConnection=true"

    def log_text(self) -> str:
        """Everything the server has written to stdout/stderr so far."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def client(self, **kwargs):
        """A pymongo MongoClient connected directly to this server (caller closes it)."""
        import pymongo

        kwargs.setdefault("directConnection", True)
        kwargs.setdefault("serverSelectionTimeoutMS", 5000)
        return pymongo.MongoClient(self.host, self.port, **kwargs)

    def start(self, timeout: float = 30.0) -> SecantusServer:
        """Start the process and wait until it answers ping; RuntimeError with its log otherwise."""
        # An empty --config disables auto-discovery of a stray ./secantusd.toml.
        config = os.path.join(self._tmpdir.name, "secantusd.toml")
        open(config, "w").close()
        cmd = [
            sys.executable,
            "-m",
            "secantus",
            "--config",
            config,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--storage-path",
            ":memory:",
            "--cache-size",
            "128M",
            *self.extra_args,
        ]
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self._tmpdir.name
            )
        finally:
            log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import pymongo
        from pymongo.errors import PyMongoError

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"SecantusDB exited with {self.proc.returncode} before answering ping; log:\n{self.log_text()}"
                )
            try:
                with pymongo.MongoClient(
                    self.host, self.port, directConnection=True, serverSelectionTimeoutMS=300, connectTimeoutMS=300
                ) as c:
                    c.admin.command("ping")
                return
            except PyMongoError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"SecantusDB on {self.host}:{self.port} did not answer ping within "
                        f"{timeout}s; log:\n{self.log_text()}"
                    ) from None
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        proc, self.proc = self.proc, None
        rc = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            rc = proc.returncode
        return rc

    def close(self) -> None:
        """stop() and remove the log directory."""
        self.stop()
        self._tmpdir.cleanup()

    def __enter__(self) -> SecantusServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.close()
