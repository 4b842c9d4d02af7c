"""`mongoproxy demo`: an embedded SecantusDB, the proxy in front of it and a short sample workload."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from mongoproxy import __version__
from mongoproxy.errors import ConfigError, StartupError

DEMO_APP_NAME = "mongoproxy-demo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class EmbeddedServer:
    """A SecantusDB subprocess on a free loopback port, with in-memory storage."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None
        self.log: Any = None

    def start(self, timeout: float = 60.0) -> None:
        if importlib.util.find_spec("secantus") is None:
            raise ConfigError("the demo needs its embedded server: pip install 'mongoproxy[demo]'")
        self.log = tempfile.NamedTemporaryFile(prefix="mongoproxy-demo-server-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "secantus",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--storage-path",
                ":memory:",
                "--log-level",
                "WARNING",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartupError(
                    f"the embedded server exited with code {self.proc.returncode}; its log is {self.log.name}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise StartupError(f"the embedded server did not start within {timeout:.0f}s; its log is {self.log.name}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()
            try:
                os.unlink(self.log.name)
            except OSError:
                pass


async def workload(port: int) -> None:
    """Inserts, a find with getMores, an update, an aggregate and one failing command."""
    from pymongo import AsyncMongoClient
    from pymongo.errors import DuplicateKeyError

    client: Any = AsyncMongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true", appname=DEMO_APP_NAME)
    try:
        db = client.demo
        await db.orders.insert_many([{"_id": i, "item": f"item-{i % 4}", "qty": i * 3} for i in range(12)])
        await db.orders.insert_one({"_id": 100, "item": "gift", "qty": 1})
        await db.orders.find_one({"_id": 3})
        async for _ in db.orders.find({}, batch_size=4):  # one find and two getMores
            pass
        await db.orders.update_many({"item": "item-1"}, {"$inc": {"qty": 1}})
        await (await db.orders.aggregate([{"$group": {"_id": "$item", "total": {"$sum": "$qty"}}}])).to_list()
        await db.orders.delete_one({"_id": 100})
        try:
            await db.orders.insert_one({"_id": 3, "item": "duplicate"})
        except DuplicateKeyError:
            pass
        await db.command("ping")
    finally:
        await client.close()


async def _demo(port: int, admin_port: int, exit_after_workload: bool) -> int:
    from mongoproxy import config as config_mod
    from mongoproxy import server

    embedded = EmbeddedServer()
    print(f"mongoproxy {__version__} demo: starting an embedded SecantusDB ...", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, embedded.start)
    try:
        if admin_port and not _port_free(admin_port):
            taken, admin_port = admin_port, _free_port()
            print(f"port {taken} is taken; the admin endpoint uses {admin_port} instead", flush=True)
        cfg = config_mod.build(
            {
                "proxy": [f"{port}:127.0.0.1:{embedded.port}"],
                "admin_port": str(admin_port),
                "log_commands": True,
            },
            env={},
        )
        cfg = cfg.replace(drain_seconds=2.0)
        loop = asyncio.get_running_loop()
        started: asyncio.Future = loop.create_future()
        task = loop.create_task(server.serve(cfg, on_started=started.set_result))
        await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()  # start-up failed: raises its StartupError
        proxy_port = started.result().ports[0]
        print(f"proxy on 127.0.0.1:{proxy_port} -> SecantusDB on 127.0.0.1:{embedded.port}", flush=True)
        print("running the sample workload; one line per command the proxy observed:", flush=True)
        await workload(proxy_port)
        await asyncio.sleep(0.2)  # let the command log flush
        print("", flush=True)
        if admin_port:
            print(f"metrics:  http://127.0.0.1:{admin_port}/metrics", flush=True)
        print(f"connect:  mongosh 'mongodb://127.0.0.1:{proxy_port}/?directConnection=true'", flush=True)
        if exit_after_workload:
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            print("the proxy keeps running; press Ctrl-C to stop", flush=True)
        return await task
    finally:
        embedded.stop()


def main(port: int = 0, admin_port: int = 9898, exit_after_workload: bool = False) -> int:
    """Blocking entry point of `mongoproxy demo`."""
    if importlib.util.find_spec("secantus") is None or shutil.which(sys.executable) is None:
        raise ConfigError("the demo needs its embedded server: pip install 'mongoproxy[demo]'")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from mongoproxy.server import _new_loop

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        return runner.run(_demo(port, admin_port, exit_after_workload))
