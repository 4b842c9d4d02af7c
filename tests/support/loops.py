"""Run coroutines on a chosen event loop (asyncio or uvloop) without pytest-asyncio."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

LOOP_KINDS = ("asyncio", "uvloop")


def loop_factory(loop_kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """A new-loop factory for `loop_kind` ("asyncio" or "uvloop")."""
    if loop_kind == "asyncio":
        return asyncio.new_event_loop
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    raise ValueError(f"unknown loop kind {loop_kind!r}; expected one of {LOOP_KINDS}")


def run_async(
    coro: Awaitable[Any] | Callable[[], Awaitable[Any]], loop_kind: str = "asyncio", timeout: float = 60.0
) -> Any:
    """Run a coroutine (or a no-argument coroutine function) to completion on a fresh loop of `loop_kind`.

    `timeout` bounds the whole run so a hung test fails with TimeoutError instead of stalling the suite.
    """
    if not inspect.isawaitable(coro):
        coro = coro()

    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    with asyncio.Runner(loop_factory=loop_factory(loop_kind)) as runner:
        return runner.run(bounded())
