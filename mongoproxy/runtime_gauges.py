"""Gauges of the proxy's own state, read at scrape time: pending-table sizes and asyncio tasks.

They exist so a soak can see that nothing grows without bound. Scrapes render in a thread
(admin.py), so each read copies the live collections first and retries when the loop changed
them mid-copy; the values are a consistent-enough snapshot, never an exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily


def _snapshot(items: Any) -> list:
    for _ in range(5):
        try:
            return list(items)
        except RuntimeError:  # "changed size during iteration": the loop thread moved on; try again
            continue
    return []


class RuntimeGauges:
    """A prometheus collector over one Proxy and its event loop."""

    def __init__(self, proxy: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.proxy = proxy
        self.loop = loop

    def collect(self) -> Iterable[Any]:
        """mongoproxy_pending_requests, mongoproxy_exhaust_streams, mongoproxy_asyncio_tasks."""
        pending = exhaust = 0
        for side in _snapshot(self.proxy.connections):
            tracker = side.tracker
            if tracker is not None:
                pending += len(tracker.pending)
                exhaust += len(tracker.exhaust)
        yield GaugeMetricFamily(
            "mongoproxy_pending_requests", "Requests waiting for a reply, over all connections.", value=pending
        )
        yield GaugeMetricFamily(
            "mongoproxy_exhaust_streams", "Exhaust-stream table entries, over all connections.", value=exhaust
        )
        try:
            tasks = len(asyncio.all_tasks(self.loop))  # copies the task set with its own retries
        except RuntimeError:
            tasks = -1
        yield GaugeMetricFamily("mongoproxy_asyncio_tasks", "asyncio tasks alive in the process.", value=tasks)

    def describe(self) -> list:
        """No description at registration: collect() reads live state."""
        return []
