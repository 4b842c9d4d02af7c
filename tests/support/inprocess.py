"""Run the proxy inside the test's own event loop, with a CollectingSink (no subprocess)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from mongoproxy import config as config_mod
from mongoproxy.events import SinkBus
from mongoproxy.server import Proxy
from tests.support.collecting import CollectingSink

LOOP_KINDS = ("asyncio", "uvloop")


def loop_factory(kind: str):
    """An event-loop factory for asyncio.Runner: 'asyncio' or 'uvloop'."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(coro, kind: str = "asyncio"):
    """Run a coroutine to completion on a fresh loop of the given kind."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(coro)


def make_config(*specs: str, **flags: str) -> config_mod.Config:
    """A Config for in-process tests: the given --proxy specs, admin endpoint off, no env."""
    raw = {"proxy": list(specs), "admin_port": "0"}
    raw.update(flags)
    return config_mod.build(raw, env={})


@contextlib.asynccontextmanager
async def running_proxy(
    upstream_port: int | None = None,
    *,
    specs: tuple = (),
    sinks: list | None = None,
    upstream_host: str = "127.0.0.1",
    **flags: str,
) -> AsyncIterator[Proxy]:
    """Start a Proxy on a free port in front of upstream_host:upstream_port; drains on exit."""
    specs = specs or (f"0:{upstream_host}:{upstream_port}",)
    cfg = make_config(*specs, **flags)
    sinks = [CollectingSink()] if sinks is None else sinks
    proxy = Proxy(cfg, SinkBus(sinks))
    proxy.sink = sinks[0] if sinks else None
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.drain(0)
        await proxy.close_listeners()


class ProxyThread:
    """The proxy on its own event loop in a background thread, for synchronous clients."""

    def __init__(
        self,
        upstream_port: int | None = None,
        *,
        loop_kind: str = "uvloop",
        specs: tuple = (),
        sinks: list | None = None,
        upstream_host: str = "127.0.0.1",
        **flags: str,
    ) -> None:
        import threading

        self.sink = CollectingSink()
        self.sinks = [self.sink] if sinks is None else sinks
        self._args = (upstream_port, specs, upstream_host, flags)
        self._kind = loop_kind
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.proxy: Proxy | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="proxy-thread", daemon=True)

    @property
    def port(self) -> int:
        return self.proxy.ports[0]

    def _main(self) -> None:
        run(self._serve(), self._kind)

    async def _serve(self) -> None:
        upstream_port, specs, host, flags = self._args
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with running_proxy(
                upstream_port, specs=specs, sinks=self.sinks, upstream_host=host, **flags
            ) as proxy:
                self.proxy = proxy
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # surfaced to the test in __enter__
            self._error = exc
            self._ready.set()

    def call(self, fn, *args):
        """Run fn(*args) on the proxy's loop and return its result."""
        import concurrent.futures

        fut: concurrent.futures.Future = concurrent.futures.Future()

        def go():
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(go)
        return fut.result(10)

    def wait_until(self, predicate, timeout: float = 10.0, what: str = "condition") -> None:
        """Poll predicate() until true; the tap runs just after forwarding, so events may trail replies."""
        import time

        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.01)

    def __enter__(self) -> ProxyThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
