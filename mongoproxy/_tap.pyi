"""Types for the tap's compiled per-chunk fast path (mongoproxy/_tap.pyx)."""

from collections.abc import Callable
from typing import Any

from mongoproxy.tracker import Tracker

class Tap:
    """Observes one direction of one connection; feed() takes each forwarded chunk."""

    messages: int  # messages observed by the fast path (the rest by the FrameScanner)
    after_reply: Callable[[], Any] | None  # called after each reply matched by the fast path

    def __init__(self, framer: Any, tracker: Tracker, conn: Any, is_reply: bool) -> None: ...
    def feed(self, data: bytes) -> None:
        """Count, time and observe one forwarded chunk. Never raises."""
    def feed_at(self, data: bytes, now_ns: int) -> None:
        """feed() with the chunk's time given (recordings, tests)."""
