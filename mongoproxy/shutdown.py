"""Shutdown within the grace period: drain for --drain-seconds, then close every sink within SHUTDOWN_MARGIN.

Invariant: from SIGTERM to exit takes at most drain_seconds + SHUTDOWN_MARGIN_SECONDS (plus the time the
interpreter takes to exit). Sinks are closed in parallel, each on its own daemon thread with the whole margin
as its timeout, so a stuck sink (a full disk, an unreachable collector, a stalled log pipe) costs the margin
once, not once per sink, and never holds the process: what it has not written by then is lost and logged.
`mongoproxy inject` sizes terminationGracePeriodSeconds from the same numbers (grace_seconds()).
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from typing import Any

log = logging.getLogger("mongoproxy")

SHUTDOWN_MARGIN_SECONDS = 5.0  # closing the sinks and the admin endpoint after the drain
EXIT_SLACK_SECONDS = 2  # interpreter exit, signal delivery: added by the injector on top of the margin


def grace_seconds(drain_seconds: float, prestop_seconds: int = 0) -> int:
    """The smallest terminationGracePeriodSeconds that fits a preStop pause, the drain and the margin."""
    return int(math.ceil(prestop_seconds + drain_seconds + SHUTDOWN_MARGIN_SECONDS + EXIT_SLACK_SECONDS))


def close_sinks(sinks: list, budget: float = SHUTDOWN_MARGIN_SECONDS) -> list[str]:
    """Close every sink in parallel within `budget` seconds; the names of those still busy at the deadline."""
    deadline = time.monotonic() + budget
    threads = []
    for sink in sinks:
        close = getattr(sink, "close", None)
        if not callable(close):
            continue
        name = getattr(sink, "name", type(sink).__name__)
        kwargs = {"timeout": max(0.0, budget - 0.25)} if _takes_timeout(close) else {}
        t = threading.Thread(target=_close_one, args=(name, close, kwargs), name=f"mongoproxy-close-{name}")
        t.daemon = True  # a sink stuck past the margin must not keep the process alive
        t.start()
        threads.append((name, t))
    busy = []
    for name, t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            busy.append(name)
    if busy:
        log.warning(
            "sink(s) %s still closing after the %gs shutdown margin: exiting without them", ", ".join(busy), budget
        )
    return busy


def _close_one(name: str, close: Any, kwargs: dict) -> None:
    try:
        close(**kwargs)
    except Exception as exc:  # noqa: BLE001 - a failing close is logged; the others go on
        log.error("closing sink %s failed: %r", name, exc)


def _takes_timeout(fn: Any) -> bool:
    try:
        return "timeout" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
