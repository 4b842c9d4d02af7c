"""Sinks subscribe to core events. Each module here offers `OPTIONS` and `create(config, ctx)`.

`create` returns a sink object (see mongoproxy.events.Sink) or None when the
sink is switched off by the config. Sinks must never block the event loop.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

SINK_MODULES = (
    "mongoproxy.sinks.metrics",
    "mongoproxy.sinks.commandlog",
    "mongoproxy.sinks.tracing",
    "mongoproxy.sinks.capture",
    "mongoproxy.sinks.mirror",
    "mongoproxy.sinks.digest",
    "mongoproxy.sinks.live",
)


@dataclass
class SinkContext:
    """What a sink may use when it is created."""

    registry: CollectorRegistry
    version: str
    mode: str  # "static", "transparent" or "mixed"
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("mongoproxy"))
    extra: dict[str, Any] = field(default_factory=dict)


def build_sinks(config: Any, ctx: SinkContext) -> list:
    """Create every enabled sink, in SINK_MODULES order."""
    sinks = []
    for name in SINK_MODULES:
        sink = importlib.import_module(name).create(config, ctx)
        if sink is not None:
            sinks.append(sink)
    return sinks
