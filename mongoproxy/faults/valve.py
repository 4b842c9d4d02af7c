"""Valve: one direction's ordered output on a gated connection; straight through unless a wait, pace or call is queued.

Everything sent after a wait, a pace or a call queues behind it, so bytes keep
their order. Past HIGH_WATER queued bytes the valve pauses its source, so a
delay never makes memory grow without bound.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

HIGH_WATER = 256 * 1024  # bytes a valve queues before it pauses its source
PACE_TICK = 0.02  # seconds between slices of a paced (throttled) message

_DATA, _WAIT, _PACE, _CALL = range(4)


class Valve:
    """Ordered output of one direction: straight through unless a wait, pace or call is queued ahead."""

    def __init__(self, write: Any, block: Any, unblock: Any) -> None:
        self.write = write
        self._block, self._unblock = block, unblock
        self._queue: collections.deque = collections.deque()
        self._task: asyncio.Task | None = None
        self._held = 0
        self._blocked = False

    @property
    def idle(self) -> bool:
        """Nothing queued or in progress."""
        return self._task is None and not self._queue

    def send(self, data: Any) -> None:
        """Write data now, or after what is queued ahead of it."""
        if self._task is None and not self._queue:
            self.write(data)
            return
        self._queue.append((_DATA, bytes(data)))
        self._held += len(data)
        if self._held > HIGH_WATER and not self._blocked:
            self._blocked = True
            self._block()

    def wait(self, seconds: float) -> None:
        """Hold everything sent after this for `seconds`."""
        self._queue.append((_WAIT, seconds))
        self._start()

    def pace(self, nbytes: int, rate: int) -> None:
        """Deliver the next `nbytes` at `rate` bytes per second."""
        self._queue.append((_PACE, (nbytes, rate)))
        self._start()

    def call(self, fn: Any) -> None:
        """Run fn() once everything queued ahead has been written."""
        if self._task is None and not self._queue:
            fn()
            return
        self._queue.append((_CALL, fn))

    def cancel(self) -> None:
        """Drop what is queued (the connection is closing)."""
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        queue = self._queue
        pace_left, rate = 0, 1
        while queue:
            kind, item = queue.popleft()
            if kind == _WAIT:
                await asyncio.sleep(item)
            elif kind == _PACE:
                pace_left, rate = item
            elif kind == _CALL:
                item()
            else:
                self._held -= len(item)
                if self._blocked and self._held <= HIGH_WATER // 2:
                    self._blocked = False
                    self._unblock()
                view = memoryview(item)
                while pace_left > 0 and view:
                    n = min(len(view), pace_left, max(1, int(rate * PACE_TICK)))
                    self.write(bytes(view[:n]))
                    view, pace_left = view[n:], pace_left - n
                    await asyncio.sleep(n / rate)
                if view:
                    self.write(bytes(view) if len(view) != len(item) else item)
        self._task = None
