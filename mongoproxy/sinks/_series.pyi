"""Types for the metrics sink's compiled per-command histograms (mongoproxy/sinks/_series.pyx)."""

from collections.abc import Iterable
from typing import Any

from mongoproxy.tracker import CommandEvent

class Layout:
    """The bucket bounds every Series of one sink shares: latency (seconds), documents, sizes (bytes)."""

    def __init__(self, latency: Iterable[float], documents: Iterable[float], sizes: Iterable[float]) -> None: ...

class Series:
    """The five per-command histograms of one label set."""

    def __init__(self, layout: Layout) -> None: ...
    def observe(self, e: CommandEvent) -> bool:
        """Record one command; True when it failed (ok:0, a write error or a write-concern error)."""
    def snapshot(self, h: int) -> tuple[list[int], float | int]:
        """(non-cumulative bucket counts with +Inf last, sum) of histogram h (metrics._HISTOGRAMS order)."""

LABELS: tuple[str, ...]  # label names the compiled key reads, in the order of metrics.LABEL_SOURCES

class MetricsHook:
    """The metrics sink's on_command: the raw label key built in C, one dict hit, one observe()."""

    def __init__(self, sink: Any, labels: Iterable[str], cache: dict[tuple, Series]) -> None: ...
    def __call__(self, event: CommandEvent) -> None:
        """Record one command in its label set's histograms; count its failure and the handshake's compressor."""
