"""Types for the query digest's compiled per-command counting (mongoproxy/_digest.pyx)."""

from collections.abc import Callable
from typing import Any

class EntryBase:
    """One key's aggregates (the fields; mongoproxy.digest.Entry adds the methods)."""

    count: int
    errors: dict[str, int]
    sketch: Any  # digest.LatencySketch
    min_ms: float
    max_ms: float
    total_ms: float
    docs_returned: int
    docs_changed: int
    request_bytes: int
    reply_bytes: int
    first_ns: int
    last_ns: int
    example: str
    pending: dict[int, int]  # sketch bin key -> latencies not yet in the sketch
    cached: list[float | None] | None  # QUANTILES of the sketch, until it changes

class Counting:
    """Counts commands into a digest.Digest; made once by mongoproxy.digest with its Entry type and bin keys."""

    def __init__(
        self, entry_type: type[EntryBase], keys: dict[float, int], bin_key: Callable[[float], int]
    ) -> None: ...
    def __call__(
        self,
        digest: Any,
        key: tuple[str, str, str, str, str],
        example: str,
        at_ns: int,
        duration_ms: float | None,
        error: str | None,
        docs_returned: int | None,
        docs_changed: int | None,
        request_bytes: int,
        reply_bytes: int,
    ) -> None:
        """Count one command under `key` (digest.Digest.add)."""

class DigestHook:
    """The digest sink's on_command: counts every command but drivers' monitoring long polls under its shape."""

    def __init__(
        self, sink: Any, counting: Counting, event_query: Callable[..., Any], error_name: Callable[..., Any]
    ) -> None: ...
    def __call__(self, event: Any) -> None:
        """Count one command (and offer it to the live view when a browser follows it)."""
